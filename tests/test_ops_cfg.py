"""The CFG operators of guidance.ops: conventions, masked logits, per-sample scales."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

from guidance.ops import (
    cfg,
    cfg_log_probs,
    cfg_logits,
    scale_from_ho_salimans,
    scale_to_ho_salimans,
    validate_scale,
)

NEG_INF = -math.inf


def test_scale_one_returns_cond_itself_and_zero_returns_uncond():
    c, u = torch.randn(3, 5), torch.randn(3, 5)
    for op in (cfg, cfg_logits, cfg_log_probs):
        assert op(c, u, 1.0) is c
    assert cfg(c, u, 0.0) is u and cfg_logits(c, u, 0) is u
    torch.testing.assert_close(cfg_log_probs(c, u, 0.0), torch.log_softmax(u, -1), rtol=0, atol=0)


def test_cfg_formula_and_ho_salimans_convention():
    c, u = torch.randn(4, 7), torch.randn(4, 7)
    torch.testing.assert_close(cfg(c, u, 3.0), u + 3.0 * (c - u))
    w_prime = 2.0  # Ho & Salimans: (1 + w') c - w' u
    torch.testing.assert_close(cfg(c, u, scale_from_ho_salimans(w_prime)), (1 + w_prime) * c - w_prime * u)
    assert scale_to_ho_salimans(scale_from_ho_salimans(0.25)) == 0.25


def test_raw_logit_form_matches_transformers_batched_processor():
    c, u = torch.randn(2, 11), torch.randn(2, 11)
    reference = ClassifierFreeGuidanceLogitsProcessor(2.5)(torch.zeros(2, 1, dtype=torch.long), torch.cat([c, u]))
    torch.testing.assert_close(cfg_logits(c, u, 2.5), reference, rtol=0, atol=0)


def test_log_prob_form_is_sanchez_et_al():
    c, u = torch.randn(2, 9), torch.randn(2, 9)
    lc, lu = torch.log_softmax(c, -1), torch.log_softmax(u, -1)
    torch.testing.assert_close(cfg_log_probs(c, u, 1.5), 1.5 * (lc - lu) + lu, rtol=0, atol=0)
    # The forms differ by a per-row constant only.
    diff = cfg_log_probs(c, u, 1.5) - cfg_logits(c, u, 1.5)
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff))


@pytest.mark.parametrize("scale", [0.5, 1.5, 4.0, -1.0])
def test_masked_tokens_never_become_nan(scale):
    c = torch.tensor([[1.0, NEG_INF, 0.5, NEG_INF], [NEG_INF, NEG_INF, NEG_INF, 2.0]])
    u = torch.tensor([[0.0, NEG_INF, NEG_INF, 1.0], [0.3, NEG_INF, 0.1, 0.2]])
    for op in (cfg_logits, cfg_log_probs):
        out = op(c, u, scale)
        assert not torch.isnan(out).any()
        assert not torch.isposinf(out).any()
        masked = torch.isinf(c) | torch.isinf(u)
        assert torch.isneginf(out[masked]).all()
        assert torch.isfinite(out[~masked]).all()


def test_per_sample_scales_keep_scale_one_rows_bit_exact():
    c, u = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    out = cfg(c, u, torch.tensor([1.0, 2.0, 0.0]))
    assert torch.equal(out[0], c[0]) and torch.equal(out[2], u[2])
    torch.testing.assert_close(out[1], u[1] + 2.0 * (c[1] - u[1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    c, u = (torch.randn(2, 50) * 30).to(dtype), (torch.randn(2, 50) * 30).to(dtype)
    out = cfg_log_probs(c, u, 3.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert cfg(c, u, 2.0).dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "2", None])
def test_non_finite_or_non_numeric_scales_are_rejected(bad):
    with pytest.raises((TypeError, ValueError), match="guidance_scale"):
        validate_scale(bad)
    with pytest.raises(ValueError, match="guidance_scale"):
        validate_scale(torch.tensor([1.0, float("nan")]))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        cfg(torch.zeros(2, 3), torch.zeros(2, 4), 2.0)
