"""The process heap during training: freed tensors are reused without page faults, and the defaults come back."""

from __future__ import annotations

import resource

import pytest
import torch

from lmforge.train.memory import _glibc, retained_heap

CPU = torch.device("cpu")
MIB_64 = 16 * 2**20  # float32 elements: 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
PAGES_64 = 64 * 2**20 // 4096
glibc = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's (Linux)")


def faults_of_fresh_tensors(n: int = 2) -> int:
    """Minor page faults of allocating, filling and freeing a 64 MiB tensor n times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.ones(MIB_64)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def settle() -> None:
    """Let the heap grow to hold a 64 MiB tensor: it may take a second one (a freed chunk can be a few bytes short
    of an aligned request, and glibc then extends the heap before the two free chunks merge)."""
    quiet = 0
    for _ in range(6):  # until two tensors in a row take no fresh pages
        quiet = quiet + 1 if faults_of_fresh_tensors(1) < PAGES_64 // 10 else 0
        if quiet == 2:
            return


@glibc
def test_freed_memory_is_reused_inside_and_returned_after():
    assert faults_of_fresh_tensors() >= PAGES_64  # glibc's default: a fresh mapping, faulted in page by page
    with retained_heap(CPU) as on:
        assert on
        settle()  # the heap grows to hold the tensor
        assert faults_of_fresh_tensors(3) < PAGES_64 // 10  # then each step's tensor reuses it
    assert faults_of_fresh_tensors() >= PAGES_64  # defaults restored: mapped afresh again


@glibc
def test_nested_uses_keep_the_setting_until_the_last_leaves():
    with retained_heap(CPU):
        with retained_heap(CPU):
            settle()
        assert faults_of_fresh_tensors(2) < PAGES_64 // 10
    assert faults_of_fresh_tensors() >= PAGES_64


@glibc
def test_off_when_disabled_or_not_a_cpu():
    with retained_heap(CPU, enabled=False) as on:
        assert not on
        assert faults_of_fresh_tensors() >= PAGES_64
    with retained_heap(torch.device("meta")) as on:
        assert not on


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
