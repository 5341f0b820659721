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


# ---------------------------------------------------------------------------------------- contracts (issue 11)


@pytest.mark.parametrize("op", [cfg, cfg_logits, cfg_log_probs])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_python_scales_are_rejected_by_every_op(op, bad):
    with pytest.raises(ValueError, match="`scale` must be a finite real number"):
        op(torch.ones(1, 2), torch.zeros(1, 2), bad)


@pytest.mark.parametrize("op", [cfg, cfg_logits, cfg_log_probs])
def test_wrong_types_raise_type_error(op):
    with pytest.raises(TypeError, match="`scale`"):
        op(torch.ones(1, 2), torch.zeros(1, 2), "2")
    with pytest.raises(TypeError, match="`scale`"):
        op(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([True]))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        op([[1.0, 0.0]], torch.zeros(1, 2), 2.0)
    with pytest.raises(TypeError, match="floating-point"):
        op(torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), 2.0)


@pytest.mark.parametrize("op", [cfg, cfg_logits, cfg_log_probs])
def test_per_sample_scale_of_wrong_length_is_a_clear_error(op):
    with pytest.raises(ValueError, match=r"`scale` must be a number or a tensor of shape \(\), \(1,\) or \(2,\)"):
        op(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="one scale per sample"):
        op(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("op", [cfg_logits, cfg_log_probs])
@pytest.mark.parametrize(("value", "word"), [(math.nan, "NaN"), (math.inf, r"\+inf")])
@pytest.mark.parametrize("branch", [0, 1])
def test_nan_and_pos_inf_logits_are_rejected(op, value, word, branch):
    logits = [torch.zeros(2, 5), torch.zeros(2, 5)]
    logits[branch][1, 3] = value
    name = "cond_logits" if branch == 0 else "uncond_logits"
    with pytest.raises(ValueError, match=f"`{name}` contains {word}"):
        op(*logits, 2.0)
    with pytest.raises(ValueError, match=f"`{name}` contains {word}"):
        op(*logits, torch.tensor([2.0, 0.5]))


def test_all_masked_rows_never_become_nan():
    c = torch.tensor([[NEG_INF, NEG_INF, NEG_INF], [1.0, 2.0, 3.0], [NEG_INF] * 3])
    u = torch.tensor([[0.0, 1.0, 2.0], [NEG_INF, NEG_INF, NEG_INF], [NEG_INF] * 3])
    # scale 0: the unconditional row alone counts; a row masked there stays all -inf
    out = cfg_log_probs(c, u, 0.0)
    torch.testing.assert_close(out[0], torch.log_softmax(u[0], -1))
    assert torch.isneginf(out[1:]).all()
    # guided: a token masked in either branch is masked, so both rows are all -inf
    for op in (cfg_logits, cfg_log_probs):
        assert torch.isneginf(op(c, u, 2.0)).all()
    # per-row scales: rows of scale 1 are cond, of scale 0 uncond (log-softmaxed), others masked
    out = cfg_log_probs(c, u, torch.tensor([0.0, 1.0, 3.0]))
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[0], torch.log_softmax(u[0], -1))
    assert torch.equal(out[1], c[1]) and torch.isneginf(out[2]).all()
    out = cfg_logits(c, u, torch.tensor([0.0, 1.0, 3.0]))
    assert torch.equal(out[0], u[0]) and torch.equal(out[1], c[1]) and torch.isneginf(out[2]).all()


def test_per_row_scale_one_is_bit_identical_to_cond_in_log_prob_cfg():
    c, u = torch.randn(3, 7) * 5, torch.randn(3, 7) * 5
    out = cfg_log_probs(c, u, torch.tensor([1.0, 2.0, 1.0]))
    assert torch.equal(out[0], c[0]) and torch.equal(out[2], c[2])
    torch.testing.assert_close(out[1], cfg_log_probs(c[1:2], u[1:2], 2.0)[0], rtol=0, atol=0)
    half = cfg_log_probs(c.half(), u.half(), torch.tensor([1.0, 2.0, 1.0]))
    assert torch.equal(half[0], c[0].half().float())


def test_half_precision_difference_overflow_gives_the_exact_answer():
    h = torch.full((2, 3), 6e4, dtype=torch.float16)
    assert torch.equal(cfg(h, -h, 0.5), torch.zeros_like(h))
    assert torch.equal(cfg(h, -h, torch.tensor([0.0, 0.5])), torch.stack([-h[0], torch.zeros_like(h[0])]))
    assert torch.equal(cfg_logits(h, -h, 0.5), torch.zeros_like(h))
    # out of range exactly: saturates to the largest float16, never inf or NaN
    assert torch.equal(cfg(h, -h, 2.0), torch.full_like(h, 65504.0))
    assert torch.equal(cfg_logits(h, -h, -2.0), torch.full_like(h, -65504.0))
    inf = torch.full_like(h, math.inf)
    assert torch.isposinf(cfg(inf, h, 2.0)).all()  # infinite inputs propagate
    big = torch.full((1, 2), 3e38, dtype=torch.bfloat16)
    assert torch.equal(cfg(big, -big, 0.5), torch.zeros_like(big))


def test_tensor_scale_zero_gives_uncond_without_nan():
    h = torch.full((1, 4), 6e4, dtype=torch.float16)
    assert torch.equal(cfg(h, -h, torch.tensor([0.0])), -h)
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(cfg(c, u, torch.tensor([0.0, 0.0])), u)


def test_inputs_are_not_modified():
    c, u = torch.randn(2, 5), torch.randn(2, 5)
    c[0, 1] = NEG_INF
    c0, u0 = c.clone(), u.clone()
    for op in (cfg, cfg_logits, cfg_log_probs):
        op(c, u, torch.tensor([2.0, 1.0]))
        op(c, u, 3.0)
    assert torch.equal(c, c0) and torch.equal(u, u0)


def test_ho_salimans_conversions_validate():
    with pytest.raises(ValueError, match="w_prime"):
        scale_from_ho_salimans(math.nan)
    with pytest.raises(TypeError, match="scale"):
        scale_to_ho_salimans(None)


def test_surely_finite_is_never_wrong_when_it_says_true():
    from guidance.tensors import surely_finite

    assert surely_finite(torch.randn(4, 7), torch.randn(3))
    assert not surely_finite(torch.tensor([1.0, float("nan")]))
    assert not surely_finite(torch.tensor([1.0]), torch.tensor([float("-inf"), 2.0]))
    assert not surely_finite(torch.tensor([float("inf"), float("-inf")]))  # the sum is NaN
    assert not surely_finite(torch.tensor([3e38, 3e38]))  # finite, but the sum overflows: the slow path
    assert surely_finite(torch.full((4,), 6e4, dtype=torch.float16))  # half precision sums in float32


def test_fast_path_of_the_log_prob_combine_is_the_repaired_combine_bit_for_bit(monkeypatch):
    from guidance.ops import _common

    repaired = _common._combine
    calls = []
    monkeypatch.setattr(_common, "_combine", lambda *args: calls.append(1) or repaired(*args))
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(6, 1000, generator=gen) * 30, torch.randn(6, 1000, generator=gen) * 30
    for w in (1.5, -2.0, torch.tensor([[0.5], [2.0], [3.0], [1.0], [0.0], [7.0]])):
        fast = _common._masked_combine(cond, uncond, w, (cond, uncond), ("cond", "uncond"))
        assert not calls  # finite inputs and result: the fast path, no repair
        assert torch.equal(fast, repaired(cond, uncond, w))
    masked = cond.clone()
    masked[0, 0] = -torch.inf
    _common._masked_combine(masked, uncond, 1.5, (masked, uncond), ("cond", "uncond"))
    assert calls  # a masked token takes the repairing path
