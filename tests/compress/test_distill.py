"""The distillation losses against their definitions (torch's kl_div, SciPy's Jensen-Shannon distance) and the
student built from every k-th teacher layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon

from lmforge import build_model
from lmforge.compress.distill import DIVERGENCES, DistillSettings, keep_every, layer_map


def logits_pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_equal_torch_kl_div(temperature):
    student, teacher = logits_pair()
    log_s, log_t = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # KL(p_t || p_s)
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)  # KL(p_s || p_t)
    torch.testing.assert_close(DIVERGENCES["kl"](student, teacher, temperature, 0.5), forward)
    torch.testing.assert_close(DIVERGENCES["reverse_kl"](student, teacher, temperature, 0.5), reverse)


def test_jsd_at_half_equals_scipy_jensen_shannon():
    student, teacher = logits_pair()
    ours = DIVERGENCES["jsd"](student, teacher, 1.0, 0.5).numpy()
    p_s, p_t = F.softmax(student, -1).numpy(), F.softmax(teacher, -1).numpy()
    scipy = np.array([jensenshannon(t, s) ** 2 for t, s in zip(p_t, p_s, strict=True)])  # distance = sqrt(JSD)
    np.testing.assert_allclose(ours, scipy, rtol=1e-5)


def test_divergences_vanish_when_student_equals_teacher():
    _, teacher = logits_pair()
    for divergence in DIVERGENCES.values():
        assert float(divergence(teacher, teacher, 2.0, 0.3).abs().max()) < 1e-6


def test_keep_every_second_layer_copies_those_layers():
    torch.manual_seed(0)
    teacher = build_model("gpt-tiny", vocab_size=128)  # 4 layers
    student = keep_every(teacher, 2)
    assert student.config.n_layer == 2 and len(student.blocks) == 2
    for i, j in enumerate([0, 2]):
        for (name, a), (_, b) in zip(
            student.blocks[i].state_dict().items(), teacher.blocks[j].state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    torch.testing.assert_close(student.tok_emb.weight, teacher.tok_emb.weight)
    assert layer_map(2, 4) == [1, 3] and layer_map(3, 6) == [1, 3, 5]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"divergence": "wasserstein"}, "--divergence 'wasserstein' is unknown"),
        ({"temperature": 0.0}, "--temperature 0.0 must be positive"),
        ({"soft": 0.0, "hard": 0.0}, "must be >= 0 and not all 0"),
        ({"beta": 1.0}, "--beta 1.0 must be in"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DistillSettings(**changes)


def test_recorded_attention_reproduces_the_model_and_sums_to_one():
    """While recording, attention runs through softmax(Q K^T * s + M) V: the outputs equal the model's own
    (fused SDPA), and every recorded row is a distribution over the keys a query may see."""
    from lmforge.compress.distill import Capture

    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=128, n_layer=2).eval()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        with Capture(model, hidden=False, attention=True) as caught:
            got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], rtol=1e-4, atol=1e-5)
    assert len(caught.attention) == 2 and caught.attention[0].shape == (2, 4, 12, 12)
    torch.testing.assert_close(caught.attention[0].sum(-1), torch.ones(2, 4, 12))
    assert float(caught.attention[0][0, :, 0, 1:].abs().max()) == 0  # causal: the first query sees itself only
    assert model.blocks[0].attn.attend.__name__ == "sdpa_attention"  # restored


def test_width_projections_are_learned_only_when_widths_differ_and_a_hidden_term_is_on():
    from lmforge.compress.distill import width_projections

    teacher = build_model("gpt-tiny", vocab_size=64)  # 4 layers of width 128
    narrow = build_model("gpt-tiny", vocab_size=64, d_model=64, n_layer=2)
    projections = width_projections(narrow, teacher, DistillSettings(hidden=1.0))
    assert [tuple(p.weight.shape) for p in projections] == [(128, 64), (128, 64)]  # one per student layer
    assert not list(width_projections(narrow, teacher, DistillSettings(cosine=0.0)).parameters())
    assert not list(width_projections(teacher, teacher, DistillSettings(hidden=1.0)).parameters())
