"""Our chunked cross-entropy must equal F.cross_entropy in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.nn import loss as loss_module
from lmforge.nn.loss import IGNORE_INDEX, cross_entropy


@pytest.mark.parametrize("n_rows, vocab", [(7, 5), (64, 1000), (33, 50257)])
def test_matches_torch_cross_entropy_value_and_gradient(n_rows, vocab, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 4 * vocab)  # several chunks, a ragged last one
    torch.manual_seed(0)
    logits = (3 * torch.randn(n_rows, vocab)).requires_grad_()
    targets = torch.randint(0, vocab, (n_rows,))
    targets[::3] = -100
    ours = cross_entropy(logits, targets)
    (g_ours,) = torch.autograd.grad(2.5 * ours, logits)
    theirs = F.cross_entropy(logits, targets, ignore_index=-100)
    (g_theirs,) = torch.autograd.grad(2.5 * theirs, logits)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-7, rtol=1e-5)


def test_bf16_logits_get_bf16_gradients_close_to_fp32():
    torch.manual_seed(0)
    logits = torch.randn(16, 300)
    targets = torch.randint(0, 300, (16,))
    half = logits.bfloat16().requires_grad_()
    loss = cross_entropy(half, targets)
    loss.backward()
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets), atol=2e-2, rtol=0)


def test_all_targets_ignored_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = cross_entropy(logits, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs logits \(N, V\) and targets \(N,\)"):
        cross_entropy(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_matches_torch_value_and_gradient(smoothing, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 64)  # several chunks
    torch.manual_seed(0)
    logits = torch.randn(40, 17, requires_grad=True)
    targets = torch.randint(0, 17, (40,))
    targets[::7] = IGNORE_INDEX
    ours = cross_entropy(logits, targets, label_smoothing=smoothing)
    (grad,) = torch.autograd.grad(ours, logits)
    reference = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
    (ref_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_label_smoothing_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=1.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_compiled_path_traces_whole_and_matches_the_chunked_loss(smoothing):
    """Under torch.compile the loss is the plain one inductor fuses (the chunk loop would break the graph):
    fullgraph=True fails on any break, and value and gradient equal the eager chunked loss."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(30, 11)).requires_grad_()
    targets = torch.randint(0, 11, (30,))
    targets[::4] = IGNORE_INDEX
    compiled = torch.compile(cross_entropy, fullgraph=True, backend="aot_eager")
    ours = compiled(logits, targets, label_smoothing=smoothing)
    (grad,) = torch.autograd.grad(ours, logits)
    eager = cross_entropy(logits, targets, label_smoothing=smoothing)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-7)
    nothing = compiled(logits, torch.full((30,), IGNORE_INDEX))  # no target at all: 0, not 0/0
    assert nothing.item() == 0.0
