"""The shared loop's mechanics: gradient accumulation normalised over the whole batch, activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from lmforge.models import build_model
from lmforge.pretrain.config import parse_args
from lmforge.pretrain.objectives import CausalLM
from lmforge.train.activations import enable_activation_checkpointing
from lmforge.train.distributed import DistInfo
from lmforge.train.loop import backward_accumulated

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


def _tiny_gpt():
    torch.manual_seed(0)
    return build_model("gpt", head="causal_lm", n_layer=1, n_head=2, d_model=32, vocab_size=50, max_seq_len=16)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_matches_the_concatenated_batch():
    """Two micro-batches with 3 and 16 target tokens give exactly the gradient of the mean over all 19."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 9), generator=g)
    labels = ids.clone()
    labels[:2, 3:] = -100  # first micro-batch: 2 rows x 2 targets... (positions 1, 2 of each row)
    labels[0, 2] = -100  # ...minus one: 3 targets; second micro-batch: 2 rows x 8 = 16 targets
    micro = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    config = parse_args([])

    model = _tiny_gpt()
    loss = backward_accumulated(model, micro, CausalLM(), config.train.dtype, CPU)
    accumulated = _grads(model)

    oracle = _tiny_gpt()
    reference = oracle(input_ids=ids, labels=labels).loss  # the model's own mean over the concatenated batch
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    for name, grad in _grads(oracle).items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    naive = _tiny_gpt()  # the shipped bug: mean per micro-batch / number of micro-batches
    for batch in micro:
        (naive(**batch).loss / len(micro)).backward()
    assert not torch.allclose(_grads(naive)["tok_emb.weight"], _grads(oracle)["tok_emb.weight"], rtol=1e-3)


def test_activation_checkpointing_keeps_gradients_and_names():
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    plain, checkpointed = _tiny_gpt(), _tiny_gpt()
    assert enable_activation_checkpointing(checkpointed) == 1
    plain(input_ids=ids, labels=ids).loss.backward()
    checkpointed(input_ids=ids, labels=ids).loss.backward()
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(checkpointed)[name], grad, msg=name)


@pytest.mark.parametrize(
    ("dtype", "native", "compiled", "said"),
    [("bfloat16", False, False, "note"), ("bfloat16", False, True, "warning"), ("bfloat16", True, False, None),
     ("float32", False, False, None), ("float32", False, True, None)],
)  # fmt: skip
def test_a_run_in_bf16_on_a_cpu_without_bf16_products_says_how_it_runs(
    tmp_path, monkeypatch, capsys, dtype, native, compiled, said
):
    """On an AVX2 CPU bf16 products are computed in fp32 (lmforge.nn.precision): the user hears that float32 is
    as fast there; compiled, they stay PyTorch's emulation (~10x slower), and the user hears what to drop. One
    line before the first step, nothing on a CPU with bf16 products or in float32."""
    from lmforge.train import loop
    from lmforge.train.config import TrainSection

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    tc = TrainSection(dtype=dtype, threads=0, compile=compiled)
    assert loop.open_run(tc, tmp_path / "run", CPU, 0) is None
    err = capsys.readouterr().err
    assert err.count("\n") == int(said is not None)  # one line, or nothing
    if said is not None:
        assert err.startswith(said) and "--train.dtype=float32" in err
        assert ("--train.compile" in err) is compiled
