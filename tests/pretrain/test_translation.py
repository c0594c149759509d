"""Translation pretraining of the encoder-decoder Transformer on kjv-spanish: it learns, its checkpoint loads
with the tokenizer's special ids, and the run folder holds greedy translations of held-out verses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge import load_model
from lmforge.data import load_dataset
from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.pretrain.config import parse_args
from lmforge.pretrain.objectives import translate
from lmforge.pretrain.trainer import pretrain


@pytest.fixture
def translation_flags(tiny_flags):
    """A 1-layer, 64-wide Transformer on the first 600 verse pairs, a 400-token shared BPE: a few seconds."""

    def flags(**changes) -> list[str]:
        values = {
            "model__name": "transformer-tiny",
            "model__overrides": '{"n_layer": 1, "n_head": 2, "d_model": 64, "d_ff": 128}',
            "data__dataset": "kjv-spanish",
            "data__tokenizer": "train",
            "data__vocab_size": 400,
            "data__max_pairs": 600,
            "data__block_size": 48,
            "train__name": "translation",
            "train__batch_size": 16,
            "train__max_steps": 60,
            "train__eval_every": 30,
            "train__save_every": 30,
            "train__sample_tokens": 16,
            "optim__lr": 0.003,
            "optim__warmup_steps": 5,
        }
        return tiny_flags(**{**values, **changes})

    return flags


def test_translation_run_learns_saves_and_translates(translation_flags):
    flags = translation_flags()
    summary = pretrain(parse_args(flags))
    assert summary["objective"] == "translation"
    run = parse_args(flags).run_dir

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # it learns
    val = [r["loss"] for r in records if r["split"] == "val"]
    assert len(val) == 2 and val[1] < val[0] and math.isfinite(summary["final_val"]["loss"])

    # the checkpoint is a model folder: its config carries the tokenizer's vocabulary and special ids
    checkpoint = run / "checkpoints" / "step_00000060"
    model = load_model(checkpoint).eval()
    tokenizer = load_tokenizer(checkpoint)
    assert type(model).__name__ == "Transformer"
    assert model.config.vocab_size == tokenizer.vocab_size
    ids = (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
    assert ids == (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)

    # samples.txt: the first held-out (test) verses, their references and the greedy translations, which the
    # loaded checkpoint reproduces
    test = load_dataset("kjv-spanish")["test"][:5]
    samples = (run / "samples.txt").read_text(encoding="utf-8")
    blocks = samples.split("=== source ===\n")[1:]
    assert len(blocks) == 5
    outputs = translate(model, tokenizer, [r["en"] for r in test], max_len=16)
    for block, record, output in zip(blocks, test, outputs, strict=True):
        source, rest = block.split("\n=== reference ===\n")
        reference, greedy = rest.split("\n=== greedy ===\n")
        assert (source, reference) == (record["en"], record["es"])
        assert greedy.rstrip("\n") == output and output.strip()


def test_translation_loss_is_the_models_own_mean_over_target_tokens(translation_flags):
    """The trainer's teacher forcing (bos, then the targets shifted right) is the model's own: the evaluated
    loss of a fresh model equals `model(input_ids, attention_mask, labels=...).loss` on the same batches."""
    from lmforge.pretrain.objectives import Translation
    from lmforge.pretrain.trainer import build_pretrain_model, evaluate
    from lmforge.train.distributed import DistInfo

    config = parse_args(translation_flags(train__eval_batches=2))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    objective = Translation()
    data = objective.prepare(config, config.run_dir, info, reuse_tokenizer=False)
    tok = data.tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert all(source[-1] == target[-1] == tok.eos_token_id for source, target in data.train)
    torch.manual_seed(0)
    model = build_pretrain_model(config, objective, tok).eval()
    ours = evaluate(model, data, config, info)["loss"]
    with torch.no_grad():
        sums = [
            (model(**b).loss * (b["labels"] != -100).sum(), (b["labels"] != -100).sum()) for b in data.val_batches(2)
        ]
    assert ours == pytest.approx((sum(s for s, _ in sums) / sum(n for _, n in sums)).item(), rel=1e-5)


def test_translation_rejects_a_text_dataset_and_unknown_languages(translation_flags, tiny_corpus):
    with pytest.raises(ValueError, match="translation needs pairs"):
        pretrain(parse_args(translation_flags(data__dataset=str(tiny_corpus))))
    with pytest.raises(ValueError, match="'fr' is not a field of kjv-spanish's records"):
        pretrain(parse_args(translation_flags(data__target_lang="fr")))
