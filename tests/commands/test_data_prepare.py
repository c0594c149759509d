"""`lmforge tokenizer train` -> `lmforge data prepare` -> `lmforge pretrain`: the chain the README shows, run
as a user types it, works end to end on the shards."""

from __future__ import annotations

import json
import math

from lmforge.cli import main


def test_tokenizer_train_then_data_prepare_then_pretrain_on_the_shards(shakespeare_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = shakespeare_path.read_text()[:200_000]
    (tmp_path / "input.txt").write_text(text[: text.rfind("\n") + 1])
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "512", "--out", "tok", "input.txt"]) == 0
    assert main(["data", "prepare", "input.txt", "--tokenizer", "tok", "--out", "shards"]) == 0
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert set(meta["splits"]) == {"train", "validation"} and meta["vocab_size"] == 512
    capsys.readouterr()
    flags = ["--max-steps", "3", "--eval-every", "0", "--train.sample_tokens=0", "--train.progress=false"]
    flags += ["--train.tensorboard=false", "--data.block_size=32", "--train.batch_size=4"]
    assert main(["pretrain", "--data", "shards", *flags]) == 0
    printed = "".join(capsys.readouterr())
    train_tokens = meta["splits"]["train"]["tokens"]
    assert f"on shards: {train_tokens:,} train tokens, vocab 512" in printed  # it read the shards, not the text
    summary = json.loads(next(tmp_path.glob("runs/*/summary.json")).read_text())
    assert summary["dataset"] == "shards" and summary["steps"] == 3
    assert math.isfinite(summary["final_val"]["loss"])  # the validation split was read and scored
