"""Cross-entropy over a large vocabulary, computed in row chunks.

For logits z (N x V) and targets y, the mean loss over the targets that are not ignored is

    L = (1/n) sum_i [ logsumexp(z_i) - z_i[y_i] ],        dL/dz_i = (softmax(z_i) - onehot(y_i)) / n

`F.cross_entropy` materialises log_softmax(z), an N x V buffer it keeps for the backward pass, then
builds the gradient in two more N x V passes (a zero-filled buffer for the one-hot part, then the softmax
correction). With GPT-2's 50,257-token vocabulary and 1,024 tokens that is 206 MB per pass, written
to fresh memory. Here the forward keeps only the N log-sum-exps, and the backward writes the gradient in
place, a cache-sized chunk of rows at a time, with no other N x V temporary. Same numbers, less
memory traffic and one N x V buffer less held between forward and backward.

Label smoothing (Szegedy et al., 2016, "Rethinking the Inception Architecture", sec. 7) trains against
q = (1 - e) onehot(y) + e / V instead of the one-hot target, which keeps the logits of a confident model from
growing without bound:

    L_i = logsumexp(z_i) - (1 - e) z_i[y_i] - (e / V) sum_v z_i[v],   dL/dz_i = softmax(z_i) - q_i

the same loss as `F.cross_entropy(..., label_smoothing=e)` (its test oracle). e = 0 is the plain loss.

A batch in which every target is ignored gets loss 0 (and zero gradient) rather than 0/0 = NaN, so a fully
masked micro-batch cannot stop a run.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of positions without a target: PyTorch's cross_entropy default ignore_index
CHUNK_ELEMENTS = 1 << 18  # 1 MB of fp32: a chunk stays in cache across its passes, temporaries are reused


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, smoothing: float) -> torch.Tensor:
        n_rows, vocab = logits.shape
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        mean_logit = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
        for start in range(0, n_rows, chunk):
            rows = logits[start : start + chunk].float()
            lse[start : start + chunk] = torch.logsumexp(rows, dim=-1)
            if smoothing:
                mean_logit[start : start + chunk] = rows.mean(dim=-1)
        valid = targets != ignore_index
        safe_targets = targets.masked_fill(~valid, 0)
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        count = valid.sum().clamp(min=1).float()
        ctx.save_for_backward(logits, safe_targets, valid, lse, count)
        ctx.chunk, ctx.smoothing = chunk, smoothing
        per_row = lse - (1.0 - smoothing) * target_logits - smoothing * mean_logit
        return (per_row * valid).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, valid, lse, count = ctx.saved_tensors
        grad = torch.empty_like(logits)
        row_scale = valid.float() * (grad_loss / count)  # (N,): 0 for ignored rows
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            if grad.dtype == torch.float32:  # softmax written straight into the gradient buffer
                probs = torch.sub(logits[rows], lse[rows, None], out=grad[rows]).exp_()
            else:
                probs = torch.exp(logits[rows].float() - lse[rows, None])
            probs.mul_(row_scale[rows, None])
            if ctx.smoothing:
                probs.sub_(row_scale[rows, None] * (ctx.smoothing / logits.shape[1]))
            probs.scatter_add_(1, targets[rows, None], -(1.0 - ctx.smoothing) * row_scale[rows, None])
            if probs.data_ptr() != grad[rows].data_ptr():
                grad[rows] = probs
        return grad, None, None, None


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against integer targets (N,), skipping `ignore_index`, with optional
    label smoothing e in [0, 1)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy needs logits (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if torch.compiler.is_compiling():  # inductor fuses the plain loss itself; the chunk loop would break the graph
        return _compiled_cross_entropy(logits, targets, ignore_index, float(label_smoothing))
    return _ChunkedCrossEntropy.apply(logits, targets, ignore_index, float(label_smoothing))


def _compiled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, smoothing: float):
    """The same loss as `_ChunkedCrossEntropy`, 0 for a batch without targets, written for torch.compile."""
    valid = targets != ignore_index
    per_row = torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=ignore_index, reduction="none", label_smoothing=smoothing
    )
    return per_row.sum() / valid.sum().clamp(min=1)
