"""The process heap during training: freed tensors are reused without page faults, and the defaults come back;
the activation estimate counts what short CPU training attention keeps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmforge.train.memory import _glibc

CPU = torch.device("cpu")
PAGES_64 = 64 * 2**20 // 4096  # pages of a 64 MiB tensor, above glibc's largest dynamic mmap threshold (32 MiB)

# Run in a fresh interpreter: what the heap holds depends on everything the process did before, so the "outside"
# figures are only glibc's defaults in a process that has done nothing else.
SCENARIO = """
import json, resource, torch
from lmforge.train.memory import retained_heap

def faults(n=2):  # minor page faults of allocating, filling and freeing a 64 MiB tensor n times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.ones(16 * 2**20)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def settle():  # the heap grows to hold the tensor (a freed chunk may be a few bytes short of an aligned one)
    quiet = 0
    for _ in range(6):
        quiet = quiet + 1 if faults(1) < 1000 else 0
        if quiet == 2:
            return

cpu, out = torch.device("cpu"), {}
out["before"] = faults()
with retained_heap(cpu) as on:
    out["on"] = on
    settle()
    out["inside"] = faults(3)
    with retained_heap(cpu):
        settle()
    out["after_inner_exit"] = faults(2)
out["after"] = faults()
with retained_heap(cpu, enabled=False) as on:
    out["disabled_on"], out["disabled"] = on, faults()
with retained_heap(torch.device("meta")) as on:
    out["meta_on"] = on
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def scenario() -> dict:
    if _glibc() is None:
        pytest.skip("mallopt is glibc's (Linux)")
    done = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_inside_and_returned_after(scenario):
    assert scenario["before"] >= PAGES_64  # glibc's default: a fresh mapping, faulted in page by page
    assert scenario["on"]
    assert scenario["inside"] < PAGES_64 // 10  # once the heap holds it, each step's tensor reuses it
    assert scenario["after"] >= PAGES_64  # defaults restored: mapped afresh again


def test_nested_uses_keep_the_setting_until_the_last_leaves(scenario):
    assert scenario["after_inner_exit"] < PAGES_64 // 10


def test_off_when_disabled_or_not_a_cpu(scenario):
    assert not scenario["disabled_on"] and scenario["disabled"] >= PAGES_64
    assert not scenario["meta_on"]


def test_the_activation_estimate_counts_the_attention_weights_short_cpu_training_keeps():
    """On a CPU, sequences of up to SHORT_TRAINING_ATTENTION tokens keep their attention weights for backward
    (B H s^2 fp32 values a block): the pre-flight estimate covers what a training step really saves."""
    from lmforge.models import build_model
    from lmforge.train.memory import activation_bytes, saved_tensor_bytes

    model = build_model("gpt", head="causal_lm", n_layer=2, n_head=8, d_model=32, vocab_size=50, max_seq_len=128)
    ids = torch.randint(0, 50, (2, 128))
    kept = saved_tensor_bytes(model, {"input_ids": ids, "labels": ids})["block"]
    assert activation_bytes(model, 2, 128, "float32", False, CPU) >= kept
    assert activation_bytes(model, 2, 128, "float32", False) < kept / 2  # without the weights: far too low


def test_the_activation_estimate_counts_what_bf16_attention_keeps_on_a_cpu_without_bf16_products(monkeypatch):
    """Past the short path, bf16 attention on such a CPU runs on fp32 copies of q, k, v (lmforge.nn.precision)
    and keeps them: the estimate adds at least what that keeps beyond PyTorch's bf16 autocast, and only there."""
    from lmforge.models import build_model
    from lmforge.nn.precision import WidenedBf16
    from lmforge.train import memory
    from lmforge.train.memory import activation_bytes, saved_tensor_bytes

    model = build_model("gpt", n_layer=2, n_head=4, d_model=128, vocab_size=97, max_seq_len=256, dropout=0.0)
    ids = torch.randint(0, 97, (4, 256))
    with torch.autocast("cpu", torch.bfloat16):
        autocast_kept = saved_tensor_bytes(model, {"input_ids": ids})["block"]
        with WidenedBf16():
            widened_kept = saved_tensor_bytes(model, {"input_ids": ids})["block"]
    estimates = {}
    for native in (True, False):
        monkeypatch.setattr(memory, "bf16_product_dtype", lambda _d, n=native: torch.bfloat16 if n else torch.float32)
        estimates[native] = activation_bytes(model, 4, 256, "bfloat16", False, CPU)
    assert widened_kept > autocast_kept
    assert estimates[False] - estimates[True] >= widened_kept - autocast_kept
