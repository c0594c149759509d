"""The top-K teacher cache: with K = V the cached loss is the on-the-fly loss; with K < V it is the divergence of the
(K+1)-way coarsened distributions (SciPy's KL and Jensen-Shannon as the oracle); cached sequences never run the
teacher again, in this run or the next; a cache of other settings is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from lmforge import build_model
from lmforge.compress.distill import DistillObjective, DistillSettings
from lmforge.nn.loss import IGNORE_INDEX
from lmforge.train.objective import Objective, summed_token_loss

VOCAB = 48


class NextToken(Objective):
    """A stand-in causal-LM task: every real position but the last predicts the next token."""

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        following = F.pad(batch["input_ids"][:, 1:], (0, 1), value=IGNORE_INDEX)
        real_next = F.pad(batch["attention_mask"][:, 1:], (0, 1), value=0).bool()
        return following.masked_fill(~real_next, IGNORE_INDEX)

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.targets(batch) != IGNORE_INDEX).sum()

    def loss_sum(self, model, batch):
        return summed_token_loss(model, batch, self.targets(batch))


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = build_model("llama-tiny", vocab_size=VOCAB, n_layer=2).eval()
    student = build_model("gpt-tiny", vocab_size=VOCAB, n_layer=1, d_model=64).eval()
    return student, teacher


def batch(rows: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, 7:] = 0  # a shorter last row, right-padded
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def objective(tmp_path, student, teacher, **settings) -> DistillObjective:
    return DistillObjective(NextToken(), student, teacher, DistillSettings(**settings), cache_dir=tmp_path / "cache")


class Calls:
    """Counts a module's forward calls and the rows each saw."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows: list[int] = []
        module.register_forward_hook(self.count, with_kwargs=True)

    def count(self, _module, _args, kwargs, _output) -> None:
        self.rows.append(len(kwargs["input_ids"]))


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_cache_of_the_whole_vocabulary_equals_the_on_the_fly_loss(tmp_path, divergence):
    student, teacher = models()
    settings = {"divergence": divergence, "temperature": 2.0, "beta": 0.3}
    live = DistillObjective(NextToken(), student, teacher, DistillSettings(**settings)).loss_sum(student, batch())
    cached = objective(tmp_path, student, teacher, cache_topk=VOCAB, **settings)
    filled = cached.loss_sum(student, batch())  # runs the teacher, writes the shard
    read = cached.loss_sum(student, batch())  # from the cache
    torch.testing.assert_close(filled, live, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read, live, rtol=1e-5, atol=1e-5)


def coarsened(p: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(K+1)-way distributions: the teacher's top-K tokens, then everything else as one bucket."""
    top = np.argsort(p)[::-1][:k]
    return np.append(p[top], 1 - p[top].sum()), np.append(q[top], 1 - q[top].sum())


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_top_k_cache_is_the_divergence_of_the_coarsened_distributions(tmp_path, divergence):
    student, teacher = models()
    k, temperature, ids = 5, 1.5, batch()
    settings = {"cache_topk": k, "divergence": divergence, "temperature": temperature, "hard": 0.0}
    cached = objective(tmp_path, student, teacher, **settings)
    got = cached.loss_sum(student, ids).item()
    again = cached.loss_sum(student, ids).item()
    with torch.no_grad():
        p_all = F.softmax(teacher(**ids).logits.double() / temperature, -1)
        q_all = F.softmax(student(**ids).logits.double() / temperature, -1)
    units = NextToken().targets(ids) != IGNORE_INDEX
    by_name = {  # D(p_teacher, q_student)
        "kl": lambda p, q: entropy(p, q),
        "reverse_kl": lambda p, q: entropy(q, p),
        "jsd": lambda p, q: jensenshannon(p, q) ** 2,  # beta = 0.5; SciPy's distance is the root of the divergence
    }
    expected, full = 0.0, 0.0
    for p, q in zip(p_all[units].numpy(), q_all[units].numpy(), strict=True):
        pk, qk = coarsened(p, q, k)
        expected += by_name[divergence](pk, qk)
        full += by_name[divergence](p, q)
    assert got == pytest.approx(temperature**2 * expected, rel=1e-4)
    assert again == pytest.approx(got, rel=1e-6)
    assert got < temperature**2 * full  # the data-processing inequality: a lower bound of the full divergence


def test_cached_sequences_never_run_the_teacher_again(tmp_path):
    student, teacher = models()
    calls = Calls(teacher)
    cached = objective(tmp_path, student, teacher, cache_topk=8)
    cached.loss_sum(student, batch())
    assert calls.rows == [3]
    cached.loss_sum(student, batch())
    assert calls.rows == [3]  # the same sequences: read from the cache
    resumed = objective(tmp_path, student, teacher, cache_topk=8)  # a new run on the same folder reads the shards
    resumed.loss_sum(student, batch())
    assert calls.rows == [3]
    mixed = batch()
    mixed["input_ids"][1, 0] = (mixed["input_ids"][1, 0] + 1) % VOCAB  # one sequence changed
    resumed.loss_sum(student, mixed)
    assert calls.rows == [3, 1]  # the teacher ran on that one only
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperature": 1.0}, "temperature 2.0 (this run: 1.0)"),
        ({"cache_topk": 4}, "k 8 (this run: 4)"),
        ({"teacher_seed": 1}, "teacher"),
    ],
)
def test_a_cache_built_with_other_settings_is_refused(tmp_path, change, message):
    student, teacher = models()
    objective(tmp_path, student, teacher, cache_topk=8, temperature=2.0).loss_sum(student, batch())
    settings = {"cache_topk": 8, "temperature": 2.0} | {k: v for k, v in change.items() if k != "teacher_seed"}
    if "teacher_seed" in change:
        torch.manual_seed(change["teacher_seed"])
        teacher = build_model("llama-tiny", vocab_size=VOCAB, n_layer=2)
    with pytest.raises(ValueError, match="was built with another .*" + message.replace("(", r"\(").replace(")", r"\)")):
        objective(tmp_path, student, teacher, **settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cache_topk": 0}, "--cache-topk 0 must be a whole number >= 1"),
        ({"cache_topk": 8, "hidden": 1.0}, "needs its hidden states on every batch"),
        ({"cache_topk": 8, "soft": 0.0}, "--soft 0 does not use"),
    ],
)
def test_bad_cache_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        DistillSettings(**settings)


def test_k_above_the_vocabulary_is_refused(tmp_path):
    student, teacher = models()
    with pytest.raises(ValueError, match=f"--cache-topk 99 must be between 1 and the teacher's vocabulary of {VOCAB}"):
        objective(tmp_path, student, teacher, cache_topk=99)
