"""Adaptive guidance state and the fixed-ratio cut-off (guidance.adaptive), without a pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance.adaptive import AdaptiveGuidance, RatioCutoff, UncondPolicy, cosine_similarity


def test_cosine_similarity_matches_torch_on_flattened_samples():
    gen = torch.Generator().manual_seed(0)
    c, u = torch.randn(3, 4, 5, 6, generator=gen), torch.randn(3, 4, 5, 6, generator=gen)
    expected = torch.nn.functional.cosine_similarity(c.flatten(1), u.flatten(1), dim=1)
    torch.testing.assert_close(cosine_similarity(c, u), expected, rtol=1e-6, atol=1e-6)


def test_cosine_similarity_zero_norms_are_defined_not_nan():
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    u = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    assert cosine_similarity(c, u).tolist() == [1.0, 0.0, 0.0]


def test_cosine_similarity_low_precision_and_dims():
    c = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    half = cosine_similarity(c.half(), (2 * c).half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.ones(2), atol=1e-3, rtol=0)
    per_channel = cosine_similarity(c, -c, dims=2)  # one similarity per channel, averaged
    torch.testing.assert_close(per_channel, -torch.ones(2))
    with pytest.raises(ValueError, match="batch dimension"):
        cosine_similarity(c, c, dims=0)
    with pytest.raises(ValueError, match="same shape"):
        cosine_similarity(c, c[:1])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_subnormal=False), min_size=6, max_size=6),
    st.lists(st.floats(-1e3, 1e3, allow_subnormal=False), min_size=6, max_size=6),
)
def test_cosine_similarity_is_finite_and_bounded(a, b):
    cos = cosine_similarity(torch.tensor(a).reshape(2, 3), torch.tensor(b).reshape(2, 3))
    assert bool(torch.isfinite(cos).all())
    assert bool(((cos >= -1) & (cos <= 1)).all())


def test_adaptive_guidance_retires_samples_independently_and_permanently():
    ag = AdaptiveGuidance(threshold=0.99)
    assert isinstance(ag, UncondPolicy)
    assert ag.needs_uncond(0, 5, 3).tolist() == [True, True, True]
    cond = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    uncond = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]])
    cos = ag.update(0, cond, uncond)
    assert cos[0] == 1.0 and cos[1] == 0.0
    assert ag.needs_uncond(1, 5, 3).tolist() == [False, True, True]
    # Step 1 evaluates samples 1 and 2 only; sample 2 now agrees.
    rows = torch.tensor([False, True, True])
    ag.update(1, cond[rows], torch.tensor([[0.0, 1.0], [1.0, 0.0]]), rows)
    assert ag.needs_uncond(2, 5, 3).tolist() == [False, True, False]
    assert ag.passed_at == [0, None, 1]
    assert math.isnan(float(ag.similarities[1][0])) and float(ag.similarities[1][2]) == 1.0
    ag.reset()
    assert ag.needs_uncond(0, 5, 2).tolist() == [True, True]


def test_adaptive_guidance_threshold_one_never_retires_and_min_steps_delays():
    ag = AdaptiveGuidance(threshold=1.0)
    ag.needs_uncond(0, 3, 1)
    ag.update(0, torch.ones(1, 4), torch.ones(1, 4))
    assert ag.needs_uncond(1, 3, 1).tolist() == [True]
    delayed = AdaptiveGuidance(threshold=0.5, min_steps=2)
    delayed.needs_uncond(0, 4, 1)
    delayed.update(0, torch.ones(1, 4), torch.ones(1, 4))
    assert delayed.needs_uncond(1, 4, 1).tolist() == [True]
    delayed.update(1, torch.ones(1, 4), torch.ones(1, 4))
    assert delayed.needs_uncond(2, 4, 1).tolist() == [False]
    assert delayed.passed_at == [1]


def test_adaptive_guidance_rejects_bad_input():
    for bad in (1.5, -1.01, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            AdaptiveGuidance(bad)
    for bad in (True, "0.99", None):
        with pytest.raises(TypeError, match="threshold"):
            AdaptiveGuidance(bad)
    with pytest.raises(ValueError, match="min_steps"):
        AdaptiveGuidance(0.99, min_steps=-1)
    ag = AdaptiveGuidance()
    ag.needs_uncond(0, 4, 2)
    with pytest.raises(ValueError, match="batch size changed"):
        ag.needs_uncond(1, 4, 3)
    with pytest.raises(ValueError, match="rows"):
        ag.update(0, torch.ones(2, 3), torch.ones(2, 3), torch.tensor([True, False]))


@pytest.mark.parametrize("num_steps", [1, 4, 7, 10])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.4, 0.5, 1.0])
def test_ratio_cutoff_follows_diffusers_step_rule(ratio, num_steps):
    cut = RatioCutoff(ratio)
    guided = [bool(cut.needs_uncond(step, num_steps, 2).all()) for step in range(num_steps)]
    # SDCFGCutoffCallback turns guidance off at the end of step int(num_timesteps * ratio).
    cutoff_step = int(num_steps * ratio)
    assert guided == [step <= cutoff_step for step in range(num_steps)]


def test_ratio_cutoff_by_index_and_bad_input():
    cut = RatioCutoff(step=1)
    assert [bool(cut.needs_uncond(s, None, 1)[0]) for s in range(3)] == [True, True, False]
    with pytest.raises(ValueError, match="exactly one"):
        RatioCutoff()
    with pytest.raises(ValueError, match="exactly one"):
        RatioCutoff(0.5, step=2)
    with pytest.raises(ValueError, match="ratio"):
        RatioCutoff(1.5)
    with pytest.raises(ValueError, match="step"):
        RatioCutoff(step=-1)
    with pytest.raises(ValueError, match="num_steps"):
        RatioCutoff(0.5).needs_uncond(0, None, 1)
