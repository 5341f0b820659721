"""cfg_generate's fused sampling step (cfg_fused_sampling): when it is taken, its distribution, its seeds."""

from __future__ import annotations

import math

import pytest
import torch

from guidance import cfg_generate
from guidance.schedules import Window
from samplers.kernels import FusedSampling

PROMPT = torch.tensor([[5, 17, 33, 8, 41, 12]])
# top_k=0 removes transformers' default top-k warper, which the fused step does not fuse.
FUSABLE = dict(do_sample=True, top_k=0, temperature=3.0, typical_p=0.95, guidance_scale=2.0)


def _gen(model, ids=PROMPT, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), custom_generate=cfg_generate, **kwargs)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = FusedSampling.sample

    def spy(self, cond, uncond, scale, **kwargs):
        calls.append((self, uncond is not None, scale))
        return original(self, cond, uncond, scale, **kwargs)

    monkeypatch.setattr(FusedSampling, "sample", spy)
    return calls


def test_fused_step_is_taken_when_asked_and_not_by_default_on_cpu(tiny_lm, fused_calls, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    out = _gen(tiny_lm, cfg_fused_sampling=True, generator=gen, **FUSABLE)
    steps = out.shape[1] - PROMPT.shape[1]
    assert len(fused_calls) == steps
    assert fused_calls[0][0] == FusedSampling(temperature=3.0, mass=0.95)
    assert all(has_uncond and scale == 2.0 for _, has_uncond, scale in fused_calls)
    fused_calls.clear()
    _gen(tiny_lm, generator=torch.Generator().manual_seed(0), **FUSABLE)  # default: CUDA + Triton only
    assert fused_calls == []

    def no_multinomial(*args, **kwargs):
        raise AssertionError("torch.multinomial called on the fused path")

    monkeypatch.setattr(torch, "multinomial", no_multinomial)
    _gen(tiny_lm, cfg_fused_sampling=True, **FUSABLE)  # the global generator's case, too


def test_scale_one_keeps_plain_generate_even_when_fused_is_asked(tiny_lm, fused_calls):
    kwargs = dict(FUSABLE, guidance_scale=1.0)
    torch.manual_seed(4)
    plain = tiny_lm.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=6,
                             **{k: v for k, v in kwargs.items() if k != "guidance_scale"})
    torch.manual_seed(4)
    assert torch.equal(_gen(tiny_lm, cfg_fused_sampling=True, **kwargs), plain)
    assert fused_calls == []


def test_guidance_that_ends_draws_from_the_conditional_logits(tiny_lm, fused_calls):
    schedule = Window(2.0, start_step=0, end_step=2)
    out = _gen(tiny_lm, cfg_fused_sampling=True, guidance_schedule=schedule, do_sample=True, top_k=0)
    assert out.shape[1] - PROMPT.shape[1] == len(fused_calls) > 3
    assert [has_uncond for _, has_uncond, _ in fused_calls[:2]] == [True, True]
    assert not any(has_uncond for _, has_uncond, _ in fused_calls[2:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(do_sample=True), "TopKLogitsWarper"),
        (dict(do_sample=True, top_k=0, top_p=0.9), "TopPLogitsWarper"),
        (dict(do_sample=False), "sampling only"),
        (dict(do_sample=True, top_k=0, num_beams=2), "sampling only"),
        (dict(do_sample=True, top_k=0, return_dict_in_generate=True, output_scores=True), "output_scores"),
    ],
)
def test_fused_true_refuses_what_it_cannot_fuse(tiny_lm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gen(tiny_lm, cfg_fused_sampling=True, guidance_scale=2.0, **kwargs)


def test_fused_flag_type_is_checked(tiny_lm):
    with pytest.raises(TypeError, match="cfg_fused_sampling"):
        _gen(tiny_lm, cfg_fused_sampling=1, **FUSABLE)


def test_output_logits_are_the_conditional_logits_on_the_fused_path(tiny_lm):
    out = _gen(tiny_lm, cfg_fused_sampling=True, return_dict_in_generate=True, output_logits=True, **FUSABLE)
    assert out.scores is None
    assert len(out.logits) == out.sequences.shape[1] - PROMPT.shape[1]
    first = tiny_lm(PROMPT).logits[:, -1]
    torch.testing.assert_close(out.logits[0], first, atol=1e-4, rtol=1e-4)


def test_same_generator_seed_same_tokens_and_the_global_generator_is_untouched(tiny_lm):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = _gen(tiny_lm, cfg_fused_sampling=True, generator=torch.Generator().manual_seed(7), **FUSABLE)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(10)  # whatever the global generator does meanwhile
    assert torch.equal(_gen(tiny_lm, cfg_fused_sampling=True, generator=torch.Generator().manual_seed(7), **FUSABLE),
                       first)
    others = [_gen(tiny_lm, cfg_fused_sampling=True, generator=torch.Generator().manual_seed(s), **FUSABLE)
              for s in range(8, 12)]
    assert any(not torch.equal(other, first) for other in others)


def test_generator_advances_by_one_float64_per_row_and_token(tiny_lm):
    ids = PROMPT.expand(3, -1)
    gen = torch.Generator().manual_seed(5)
    out = _gen(tiny_lm, ids, cfg_fused_sampling=True, generator=gen, **FUSABLE)
    expected = torch.Generator().manual_seed(5)
    for _ in range(out.shape[1] - ids.shape[1]):
        torch.rand(3, dtype=torch.float64, generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())


def test_without_a_generator_the_global_seed_repeats_the_tokens(tiny_lm):
    torch.manual_seed(9)
    first = _gen(tiny_lm, cfg_fused_sampling=True, **FUSABLE)
    torch.manual_seed(9)
    assert torch.equal(_gen(tiny_lm, cfg_fused_sampling=True, **FUSABLE), first)


def test_fused_first_token_has_the_unfused_kept_set_and_distribution(tiny_lm):
    """One guided step for many identical rows: the fused draws follow the processors' distribution."""
    rows, settings = 4000, dict(FUSABLE, temperature=0.8, typical_p=0.9)  # detects a 10% temperature error
    ids = PROMPT.expand(rows, -1)
    reference = _gen(tiny_lm, PROMPT, cfg_fused_sampling=False, max_new_tokens=1, return_dict_in_generate=True,
                     output_scores=True, **settings)
    probs = torch.softmax(reference.scores[0][0].double(), dim=-1)
    kept = probs > 0
    assert 3 <= int(kept.sum()) < probs.numel()  # a real filter with a real choice
    out = _gen(tiny_lm, ids, cfg_fused_sampling=True, max_new_tokens=1,
               generator=torch.Generator().manual_seed(0), **settings)
    counts = torch.bincount(out[:, -1], minlength=probs.numel()).double()
    assert bool(kept[counts > 0].all())  # never a token outside the kept set
    expected = probs[kept] * rows
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    # Wilson-Hilferty: chi2 above mean + 4.5 sd of its normal approximation is a ~3e-6 event
    limit = dof * (1 - 2 / (9 * dof) + 4.5 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit)
