"""The explanation methods, one object each, registered by name in `METHODS`.

    ig          integrated gradients on the token embeddings (Sundararajan et al., 2017), Captum's
                LayerIntegratedGradients: a_i = (e_i - e'_i) . int_0^1 dF(e' + a (e - e'))/de_i da, so that
                sum_i a_i = F(x) - F(baseline) (completeness, their Prop. 1); reported as `completeness_error`.
    attention   the attention weights softmax(Q K^T / sqrt(d) + M) of every layer and head (explicit path of
                `lmforge.nn.attention.recorded_attention`); token scores: what the read-out position attends to
                in the last layer, averaged over heads.
    rollout     attention rollout (Abnar & Zuidema, 2020, eq. 1): per layer the head-mean A_l, the residual
                A'_l = 0.5 A_l + 0.5 I renormalised by rows, then R = A'_L ... A'_1; token scores: R's row at
                the read-out position.
    occlusion   Captum's Occlusion (Zeiler & Fergus, 2014) over tokens: score(x) - score(x with token i replaced by
                the baseline token), one token at a time.
    logit-lens  causal LMs only (nostalgebraist, 2020): each layer's residual stream through the final norm and the
                LM head, i.e. what the model would predict if it stopped there; top tokens per layer and position.

A method declares the heads it applies to (`kinds`); `run(subject)` returns an `Explanation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lmforge.explain.subject import KINDS, Subject
from lmforge.nn.attention import Attention, recorded_attention

METHODS: dict[str, Method] = {}


@dataclass
class Explanation:
    """One method's result for one subject. `token_scores`: one number per input token (what the heatmaps show);
    `attention`: (layers, heads, T, T) weights; `lens`: the logit-lens table; `values`: scalar facts (completeness)."""

    method: str
    token_scores: list[float] | None = None
    attention: torch.Tensor | None = None
    lens: dict[str, Any] | None = None
    values: dict[str, float] = field(default_factory=dict)


class Method:
    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = KINDS
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a named method registers; an abstract refinement (AttentionMethod) does not
            METHODS[cls.name] = cls()

    def check(self, subject: Subject) -> None:
        if subject.kind not in self.kinds:
            raise ValueError(
                f"--method {self.name} does not apply to a {subject.kind.replace('_', ' ')} model; it needs "
                f"{' or '.join(k.replace('_', ' ') for k in self.kinds)} (choose another method)"
            )

    def run(self, subject: Subject, steps: int) -> Explanation:
        raise NotImplementedError


class IntegratedGradients(Method):
    name = "ig"
    summary = "integrated gradients on the token embeddings (Captum LayerIntegratedGradients)"

    def run(self, subject: Subject, steps: int) -> Explanation:
        from captum.attr import LayerIntegratedGradients

        lig = LayerIntegratedGradients(subject.score, subject.model.tok_emb)
        attributions, delta = lig.attribute(
            subject.input_ids,
            baselines=subject.baseline_ids(),
            n_steps=steps,
            internal_batch_size=steps,
            return_convergence_delta=True,
        )
        scores = attributions.sum(-1)[0]  # (T,): each token's share, summed over embedding features
        with torch.no_grad():
            f_x, f_base = (float(subject.score(ids)[0]) for ids in (subject.input_ids, subject.baseline_ids()))
        gap = f_x - f_base
        return Explanation(
            self.name,
            token_scores=scores.tolist(),
            values={
                "score": f_x,
                "baseline_score": f_base,
                "attribution_sum": float(scores.sum()),
                "completeness_error": abs(float(delta[0])) / max(abs(gap), 1e-12),
                "steps": steps,
            },
        )


class AttentionMethod(Method):
    """A method that reads attention weights: refused for a model without self-attention (a recurrent one)."""

    def check(self, subject: Subject) -> None:
        super().check(subject)
        if not any(isinstance(m, Attention) and not m.cross for m in subject.model.modules()):
            raise ValueError(
                f"--method {self.name} needs self-attention and the {subject.config.family} model has none "
                "(choose ig or occlusion)"
            )


def attention_maps(subject: Subject) -> torch.Tensor:
    """(layers, heads, T, T): every self-attention layer's weights for the subject's input."""
    with torch.no_grad(), recorded_attention(subject.model) as layers:
        subject.logits(subject.input_ids)
        return torch.stack([layer.weights[0].float() for layer in layers])


class AttentionMaps(AttentionMethod):
    name = "attention"
    summary = "attention weights of every layer and head"

    def run(self, subject: Subject, steps: int) -> Explanation:
        maps = attention_maps(subject)
        scores = maps[-1, :, subject.position].mean(0)  # (T,)
        return Explanation(self.name, token_scores=scores.tolist(), attention=maps)


def rollout(maps: torch.Tensor) -> torch.Tensor:
    """Attention rollout of (layers, heads, T, T) weights -> (T, T) (Abnar & Zuidema, 2020): with A'_l the
    head-averaged weights plus the residual, 0.5 A + 0.5 I, rows renormalised to 1, R = A'_L ... A'_1."""
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype)
    result = eye
    for layer in maps:
        mixed = 0.5 * layer.mean(0) + 0.5 * eye
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed @ result
    return result


class Rollout(AttentionMethod):
    name = "rollout"
    summary = "attention rollout with the residual 0.5 (A + I) (Abnar & Zuidema, 2020)"

    def run(self, subject: Subject, steps: int) -> Explanation:
        maps = attention_maps(subject)
        return Explanation(self.name, token_scores=rollout(maps)[subject.position].tolist())


class Occlusion(Method):
    name = "occlusion"
    summary = "score drop when each token is replaced by the baseline token (Captum Occlusion)"

    def run(self, subject: Subject, steps: int) -> Explanation:
        from captum.attr import Occlusion as CaptumOcclusion

        with torch.no_grad():
            scores = CaptumOcclusion(subject.score).attribute(
                subject.input_ids, sliding_window_shapes=(1,), baselines=subject.baseline_id()
            )
        return Explanation(self.name, token_scores=scores[0].float().tolist())


def lens_logits(subject: Subject) -> torch.Tensor:
    """(layers + 1, T, vocab): the residual stream entering the first block (the embeddings) and leaving each block,
    through the final norm and the LM head."""
    model = subject.model
    states: list[torch.Tensor] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]  # embeddings
    hooks += [block.register_forward_hook(lambda m, a, out: states.append(out)) for block in model.blocks]
    try:
        with torch.no_grad():
            subject.logits(subject.input_ids)
            return torch.stack([model.lm_head(model.norm(h))[0] for h in states]).float()
    finally:
        for hook in hooks:
            hook.remove()


class LogitLens(Method):
    name = "logit-lens"
    kinds = ("causal_lm",)
    summary = "each layer's hidden state through the final norm and the LM head (causal LMs)"
    top_k = 5

    def run(self, subject: Subject, steps: int) -> Explanation:
        logits = lens_logits(subject)  # (L + 1, T, V)
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (L + 1, T, k)
        decode = subject.tokenizer.decode
        lens = {
            "layers": ["embeddings", *(f"layer {i}" for i in range(1, logits.shape[0]))],
            "top_tokens": [[[decode([int(i)]) for i in pos] for pos in layer] for layer in top_i],
            "top_probs": top_p.tolist(),
            "target_prob": probs[:, subject.position, subject.target].tolist(),
        }
        return Explanation(self.name, token_scores=None, lens=lens)


METHOD_NAMES = tuple(METHODS)
