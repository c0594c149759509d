"""`lmforge explain` end to end: the page, the PNGs and the scores; bad input is one line and exit 2."""

from __future__ import annotations

import json
import re

from lmforge.cli import main
from lmforge.explain.report import read_inputs


def test_explain_writes_a_self_contained_page_pngs_and_scores(tiny_models, tmp_path, capsys):
    *_, folder = tiny_models("gpt-tiny", "causal_lm")
    out = tmp_path / "out"
    argv = [str(folder), "--input", "the film was good", "--method", "attention", "--method", "logit-lens"]
    assert main(["explain", *argv, "--target", "d", "--out", str(out)]) == 0
    record = json.loads((out / "scores.json").read_text())["inputs"][0]
    assert set(record["methods"]) == {"attention", "logit-lens"} and record["target"] == "d"
    assert len(record["methods"]["attention"]["token_scores"]) == len(record["text_tokens"])
    assert len(record["methods"]["logit-lens"]["lens"]["layers"]) == 3  # embeddings + 2 layers
    page = (out / "explanation.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    for name in ("input1_attention.png", "input1_attention_grid.png", "input1_logit_lens.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert "target 'd' at token" in capsys.readouterr().err


def test_a_file_gives_one_input_per_non_empty_line(tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the film was good\n\n  the plot was dull \n", encoding="utf-8")
    assert read_inputs(str(inputs)) == ["the film was good", "the plot was dull"]
    assert read_inputs("just a text") == ["just a text"]


def test_explain_refuses_a_method_the_head_lacks_in_one_line(tiny_models, tmp_path, capsys):
    *_, folder = tiny_models("bert-tiny", "sequence_classification")
    out = tmp_path / "out"
    assert main(["explain", str(folder), "--input", "good film", "--method", "logit-lens", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge explain: error: --method logit-lens does not apply to a sequence classification")
    assert "\n" not in err and not out.exists()  # nothing half-written
    assert main(["explain", str(folder), "--input", "good film", "--target", "joyful", "--out", str(out)]) == 2
    assert "'joyful' is not a label of this model" in capsys.readouterr().err
