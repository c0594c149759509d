"""The `lmforge` command as a user runs it: a real subprocess, its output and its exit code."""

import json
import subprocess
import sys


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120)


def test_info_prints_the_config_and_its_size_as_json():
    result = lmforge("info", "gpt2")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == 124_439_808
    assert info["config"]["family"] == "gpt" and info["config"]["n_layer"] == 12


def test_info_applies_overrides():
    info = json.loads(lmforge("info", "llama-tiny", "--set", "n_layer=2", "tie_embeddings=false").stdout)
    assert info["config"]["n_layer"] == 2 and info["config"]["tie_embeddings"] is False


def test_models_lists_every_preset():
    result = lmforge("models")
    assert result.returncode == 0
    for name in ("gpt2", "llama-135m", "bert-base", "roberta-base", "t5-small", "transformer-base", "gpt-tiny"):
        assert name in result.stdout


def test_bad_input_exits_non_zero_with_one_clear_line():
    for args, message in [
        (("info", "gpt5"), "unknown model 'gpt5'"),
        (("info", "gpt", "--set", "n_head=5"), "n_head=5 does not divide d_model=768"),
        (("info", "gpt", "--set", "widht=3"), "unknown config key(s) ['widht']"),
        (("info", "gpt", "--set", "n_layer"), "must look like key=value"),
    ]:
        result = lmforge(*args)
        assert result.returncode == 2
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
