"""Normalized Attention Guidance (NAG): the operator, the cross-attention hook and the guider through attach.

* The operator equals a float64 reference written from the paper's formula (L1 and L2), is
  ``z_pos`` itself when off, never NaN (zero norms, float16 extremes) and keeps the norm ratio <= tau.
* The hook equals a hand-written cross-attention processor that applies the formula (float32),
  acts only on its rows, and leaves the processors and hooks as they were, also after an exception.
* Through ``attach`` on tiny SD/SDXL: off is bit-identical to the plain pipeline, NAG alone is one
  evaluation per step and equals the reference processors in a plain run, CFG + NAG batches.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance.diffusion import attach, prompt_inputs
from guidance.diffusion.testing import tiny_dit, tiny_stable_diffusion, tiny_stable_diffusion_xl
from guidance.guiders import NormalizedAttention
from guidance.ops import normalized_attention_guidance as nag
from guidance.perturbations import NormalizedCrossAttention
from guidance.perturbations.normalized_attention import is_cross_attention

STEPS = 2
PROMPTS = ["a cat", "dog"]
BATCH = 2 * len(PROMPTS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ the operator


def reference(z_pos, z_neg, s, tau, alpha, p=1):
    """The paper's formula, token by token, in float64."""
    zp, zn = z_pos.double(), z_neg.double()
    extrapolated = s * zp - (s - 1) * zn
    norm_pos = zp.abs().pow(p).sum(-1, keepdim=True).pow(1 / p)
    norm_ext = extrapolated.abs().pow(p).sum(-1, keepdim=True).pow(1 / p)
    ratio = norm_ext / norm_pos  # inf where ||z+|| = 0 < ||z~||, nan where both are 0
    factor = torch.where(ratio > tau, tau / ratio, torch.ones_like(ratio))
    return alpha * extrapolated * factor + (1 - alpha) * zp


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
@pytest.mark.parametrize("s,tau,alpha", [(5.0, 2.5, 0.25), (3.0, 1.5, 0.5), (9.0, 100.0, 1.0), (0.5, 2.5, 0.25)])
def test_op_matches_the_formula(norm, p, s, tau, alpha):
    gen = torch.Generator().manual_seed(0)
    z_pos, z_neg = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    z_neg[0, :3] = z_pos[0, :3] + 1e-3 * z_neg[0, :3]  # some tokens barely extrapolated
    got = nag(z_pos, z_neg, s, tau=tau, alpha=alpha, norm=norm)
    torch.testing.assert_close(got.double(), reference(z_pos, z_neg, s, tau, alpha, p), rtol=1e-6, atol=1e-6)
    capped = nag(z_pos, z_neg, s, tau=tau, alpha=1.0, norm=norm).double()
    ratio = capped.norm(p=p, dim=-1) / z_pos.double().norm(p=p, dim=-1)
    assert bool((ratio <= tau * (1 + 1e-6)).all())


def test_op_off_is_z_pos_itself_and_extremes_are_finite():
    z_pos, z_neg = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert nag(z_pos, z_neg, 1.0) is z_pos and nag(z_pos, z_neg, 7.0, alpha=0.0) is z_pos
    torch.testing.assert_close(nag(z_pos, z_neg, 3.0, tau=math.inf, alpha=1.0), 3 * z_pos - 2 * z_neg)
    zero = torch.zeros(1, 2, 4)
    assert torch.equal(nag(zero, zero, 5.0), zero)
    out = nag(zero, torch.ones(1, 2, 4), 5.0, alpha=1.0)  # ||z+|| = 0: the capped part is 0
    assert torch.equal(out, zero)
    half = torch.full((1, 2, 64), 6e4, dtype=torch.float16)
    out = nag(half, -half, 5.0, tau=10.0, alpha=0.5)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    half = torch.full((1, 2, 64), 3e4, dtype=torch.float16)  # float16 is computed in float32
    assert torch.equal(nag(half, -half, 5.0), nag(half.float(), -half.float(), 5.0).half())


@st.composite
def attention_pairs(draw):
    dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 8)))
    magnitude = draw(st.sampled_from({torch.float16: (1e-4, 1.0, 3e3, 6e4)}.get(dtype, (1e-30, 1.0, 1e4, 1e37))))
    relation = draw(st.sampled_from(("independent", "close", "equal", "opposite", "zero_pos", "zero_both")))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z_pos = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    z_neg = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    z_neg = {"close": z_pos + 1e-2 * z_neg, "equal": z_pos, "opposite": -z_pos}.get(relation, z_neg)
    if relation.startswith("zero"):
        z_pos = torch.zeros_like(z_pos)
        z_neg = z_pos if relation == "zero_both" else z_neg
    limit = torch.finfo(dtype).max
    return tuple(t.clamp(-limit, limit).to(dtype) for t in (z_pos, z_neg))


@settings(max_examples=150)
@given(
    pair=attention_pairs(),
    s=st.one_of(st.sampled_from((0.0, 1.0, 1.5, 5.0, 20.0)), st.floats(-5.0, 50.0)),
    tau=st.sampled_from((0.5, 1.0, 1.5, 2.5, 10.0, math.inf)),
    alpha=st.sampled_from((0.0, 0.25, 0.5, 1.0)),
    norm=st.sampled_from(("l1", "l2")),
)
def test_op_properties(pair, s, tau, alpha, norm):
    z_pos, z_neg = pair
    before = (z_pos.clone(), z_neg.clone())
    out = nag(z_pos, z_neg, s, tau=tau, alpha=alpha, norm=norm)
    assert torch.equal(z_pos, before[0]) and torch.equal(z_neg, before[1])
    assert out.dtype == z_pos.dtype and out.shape == z_pos.shape
    assert not torch.isnan(out).any() and torch.isfinite(out).all()
    if s == 1.0 or alpha == 0.0:
        assert out is z_pos
        return
    # Against the float64 formula, on the power-of-two scaled tokens (the formula is 1-homogeneous).
    zp, zn = z_pos.double(), z_neg.double()
    scale = torch.maximum(zp.abs(), zn.abs()).amax(-1, keepdim=True).clamp_min(1e-300)
    expected = reference(zp / scale, zn / scale, s, tau, alpha, 1 if norm == "l1" else 2)
    expected = torch.nan_to_num(expected, nan=0.0) * scale  # 0/0 ratio (both norms 0): z^ = 0
    limit = torch.finfo(z_pos.dtype).max
    expected = expected.clamp(-limit, limit)
    bound = (abs(s) + abs(s - 1) + 1) * scale  # |z^| <= |z~| (the cap only shrinks)
    tiny = torch.finfo(z_pos.dtype).tiny
    error = (out.double() - expected).abs()
    eps = torch.finfo(z_pos.dtype).eps
    assert bool((error <= 16 * eps * bound + 4 * tiny).all()), float((error - 16 * eps * bound).max())


def test_op_validation():
    z = torch.randn(1, 2, 4)
    for kwargs, kind in [
        ({"tau": 0.0}, ValueError),
        ({"tau": float("nan")}, ValueError),
        ({"alpha": 1.5}, ValueError),
        ({"norm": "l3"}, ValueError),
        ({"scale": float("inf")}, ValueError),
        ({"scale": "5"}, TypeError),
    ]:
        with pytest.raises(kind, match=next(iter(kwargs))):
            nag(z, z, **{"scale": 5.0, **kwargs})
    with pytest.raises(ValueError, match="same shape"):
        nag(z, torch.randn(1, 2, 5), 5.0)
    with pytest.raises(TypeError, match="z_neg"):
        nag(z, z.long(), 5.0)


# ------------------------------------------------------------------ the hook on a UNet


class ReferenceNAG:
    """Cross-attention written out (no diffusers helpers), NAG applied before the output projection."""

    def __init__(self, negative, s, tau, alpha):
        self.negative, self.s, self.tau, self.alpha = negative, s, tau, alpha

    def _attend(self, attn, h, ctx):
        def heads(x):
            return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(h)), heads(attn.to_k(ctx)), heads(attn.to_v(ctx))
        weights = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        return (weights @ v).transpose(1, 2).reshape(h.shape[0], -1, q.shape[1] * q.shape[-1])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert attn.group_norm is None and attn.norm_cross is None and not attn.residual_connection
        negative = self.negative.expand(hidden_states.shape[0], -1, -1)
        z_pos = self._attend(attn, hidden_states, encoder_hidden_states)
        z_neg = self._attend(attn, hidden_states, negative)
        z = reference(z_pos, z_neg, self.s, self.tau, self.alpha).float()
        return attn.to_out[1](attn.to_out[0](z)) / attn.rescale_output_factor


@functools.cache
def _sd():
    return tiny_stable_diffusion()


@functools.cache
def _sdxl():
    return tiny_stable_diffusion_xl()


def _processors(module):
    return {n: m.get_processor() for n, m in module.named_modules() if hasattr(m, "set_processor")}


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _with_processors(module, make):
    originals = _processors(module)
    for sub in module.modules():
        if is_cross_attention(sub):
            sub.set_processor(make())
    return originals


def test_hook_equals_the_reference_processor_and_acts_per_row():
    unet = _sd().unet
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=gen), torch.tensor(500)
    context, negative = torch.randn(4, 16, 32, generator=gen), torch.randn(1, 16, 32, generator=gen)
    hook = NormalizedCrossAttention(negative, scale=4.0, tau=2.0, alpha=0.5)
    before, hooks = _processors(unet), _hook_count(unet)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context).sample
        with hook.apply(unet, None):
            whole = unet(x, t, encoder_hidden_states=context).sample
        with hook.apply(unet, slice(2, 4)):
            rows = unet(x, t, encoder_hidden_states=context).sample
        originals = _with_processors(unet, lambda: ReferenceNAG(negative, 4.0, 2.0, 0.5))
        expected = unet(x, t, encoder_hidden_states=context).sample
    for name, processor in originals.items():
        unet.get_submodule(name).set_processor(processor)
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole, plain, atol=1e-4)
    torch.testing.assert_close(rows[:2], plain[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[2:], whole[2:], rtol=1e-5, atol=1e-6)
    now = _processors(unet)
    assert all(now[k] is before[k] for k in before) and _hook_count(unet) == hooks


def test_hook_restores_the_model_after_an_exception():
    unet = _sd().unet
    before, hooks = _processors(unet), _hook_count(unet)
    hook = NormalizedCrossAttention(torch.randn(1, 16, 7))  # wrong feature size: to_k raises inside
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError), torch.no_grad(), hook.apply(unet, None):
        unet(x, torch.tensor(10), encoder_hidden_states=torch.randn(1, 16, 32))
    now = _processors(unet)
    assert all(now[k] is before[k] for k in before) and _hook_count(unet) == hooks
    with pytest.raises(ValueError, match="2 rows but the branch has 3"), torch.no_grad():
        with NormalizedCrossAttention(torch.randn(2, 16, 32)).apply(unet, None):
            unet(torch.randn(3, 4, 8, 8), torch.tensor(10), encoder_hidden_states=torch.randn(3, 16, 32))
    assert _hook_count(unet) == hooks


# ------------------------------------------------------------------ the guider through attach


def _gens(n=BATCH):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def _run(pipe, **kwargs):
    kwargs.setdefault("guidance_scale", 2.0)
    return pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS, height=16, width=16,
                output_type="latent", generator=_gens(), **kwargs).images


def test_nag_off_is_bit_identical_to_the_plain_pipeline():
    pipe = _sd()
    negative = prompt_inputs(pipe, "blurry")
    plain_cfg, plain = _run_plain(pipe, 3.0), _run_plain(pipe, 1.0)
    with attach(pipe, NormalizedAttention(3.0, 1.0, negative=negative)):
        assert torch.equal(_run(pipe), plain_cfg)
    with attach(pipe, NormalizedAttention(3.0, 5.0, alpha=0.0, negative=negative)):
        assert torch.equal(_run(pipe), plain_cfg)
    with attach(pipe, NormalizedAttention(1.0, 1.0, negative=negative)) as handle:
        assert torch.equal(_run(pipe), plain)
    assert handle.stats.branch_rows == {"cond": BATCH * STEPS}


def _run_plain(pipe, scale):
    return _run(pipe, guidance_scale=scale)


def test_nag_alone_is_one_evaluation_per_step_and_equals_reference_processors():
    pipe = _sd()
    negative = prompt_inputs(pipe, "blurry")
    before, hooks = _processors(pipe.unet), _hook_count(pipe.unet)
    with attach(pipe, NormalizedAttention(1.0, 5.0, negative=negative)) as handle:
        got = _run(pipe)
    assert handle.stats.forward_calls == STEPS and handle.stats.branch_rows == {"cond": BATCH * STEPS}
    now = _processors(pipe.unet)
    assert all(now[k] is before[k] for k in before) and _hook_count(pipe.unet) == hooks
    originals = _with_processors(
        pipe.unet, lambda: ReferenceNAG(negative["encoder_hidden_states"], 5.0, 2.5, 0.25)
    )
    try:
        expected = _run_plain(pipe, 1.0)  # the pipeline's own conditional-only run
    finally:
        for name, processor in originals.items():
            pipe.unet.get_submodule(name).set_processor(processor)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _run_plain(pipe, 1.0), atol=1e-4)


def test_cfg_plus_nag_batches_with_uncond_and_equals_separate_calls():
    pipe = _sd()
    guider = NormalizedAttention(3.0, 4.0, negative=prompt_inputs(pipe, "blurry"), stop=0.5)
    with attach(pipe, guider) as handle:
        batched = _run(pipe, negative_prompt=["ugly", "ugly"])
    with attach(pipe, guider, evaluator="separate") as separate:
        expected = _run(pipe, negative_prompt=["ugly", "ugly"])
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-4)
    assert handle.stats.forward_calls == STEPS and separate.stats.forward_calls == 2 * STEPS
    assert handle.stats.branch_rows == {"uncond": BATCH * STEPS, "cond": BATCH * STEPS}
    assert not torch.allclose(batched, _run_plain(pipe, 3.0), atol=1e-4)


def test_nag_on_sdxl_with_per_sample_negatives():
    pipe = _sdxl()
    before = _processors(pipe.unet)
    negative = prompt_inputs(pipe, "blurry")["encoder_hidden_states"]
    kwargs = dict(num_inference_steps=STEPS, height=32, width=32, output_type="latent")
    plain = pipe("a cat", guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kwargs).images
    with attach(pipe, NormalizedAttention(1.0, 5.0, negative=negative.expand(2, -1, -1).clone())):
        got = pipe("a cat", num_images_per_prompt=2, guidance_scale=2.0,
                   generator=[torch.Generator().manual_seed(0) for _ in range(2)], **kwargs).images
    assert torch.isfinite(got).all() and not torch.allclose(got[:1], plain, atol=1e-4)
    torch.testing.assert_close(got[0], got[1])
    assert all(_processors(pipe.unet)[k] is v for k, v in before.items())


def test_guider_validation_and_unsupported_models():
    negative = torch.randn(1, 16, 32)
    for kwargs, kind, match in [
        ({"tau": -1.0}, ValueError, "tau"),
        ({"alpha": 2.0}, ValueError, "alpha"),
        ({"norm": "max"}, ValueError, "norm"),
        ({"start": 0.8, "stop": 0.5}, ValueError, "stop"),
        ({"negative": torch.randn(16, 32)}, ValueError, "negative"),
        ({"negative": {"pooled_projections": negative}}, ValueError, "encoder_hidden_states"),
        ({"negative": "blurry"}, TypeError, "negative"),
        ({"hook": object()}, TypeError, "hook"),
    ]:
        with pytest.raises(kind, match=match):
            NormalizedAttention(1.0, 5.0, **{"negative": negative, **kwargs})
    with pytest.raises(ValueError, match="finite"):
        NormalizedAttention(1.0, float("nan"))
    with pytest.raises(ValueError, match="negative context"):
        NormalizedAttention(1.0, 5.0).branches(step=0)
    with pytest.raises(ValueError, match="negative context"):
        attach(_sd(), NormalizedAttention(1.0, 5.0))
    assert [b.name for b in NormalizedAttention(2.0, 5.0, negative=negative, stop=0.5).branches(2, 4)] == [
        "cond", "uncond"]
    pipe = tiny_dit()
    with pytest.raises(ValueError, match="cross-attention"):
        attach(pipe, NormalizedAttention(1.0, 5.0, negative=negative))
    assert getattr(pipe, "_guidance_handle", None) is None


# ------------------------------------------------------------------ modular guider component (SDXL modular pipeline)


@functools.cache
def _sdxl_modular():
    from diffusers import EulerDiscreteScheduler
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep,
    )

    sd = _sdxl()
    pipe = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    pipe.update_components(unet=sd.unet, scheduler=EulerDiscreteScheduler.from_config(sd.scheduler.config))
    gen = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(1, 5, 64, generator=gen),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
        "negative_prompt_embeds": torch.randn(1, 5, 64, generator=gen),
        "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
    }
    return pipe, sd.unet, embeds


def _modular_run(guider):
    pipe, unet, embeds = _sdxl_modular()
    calls = []
    handle = unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    pipe.update_components(guider=guider)
    try:
        latents = pipe(**embeds, height=32, width=32, num_inference_steps=STEPS,
                       generator=torch.Generator().manual_seed(0), output="latents")
    finally:
        handle.remove()
    return latents, len(calls)


def test_modular_nag_component_in_the_sdxl_modular_pipeline():
    from diffusers.guiders import ClassifierFreeGuidance

    from guidance.diffusion.modular_perturbed import NAGGuidance

    _, unet, embeds = _sdxl_modular()
    before, hooks = _processors(unet), _hook_count(unet)
    cfg, cfg_calls = _modular_run(ClassifierFreeGuidance(5.0))
    off, off_calls = _modular_run(NAGGuidance(5.0, 1.0))
    assert torch.equal(off, cfg) and off_calls == cfg_calls == 2 * STEPS
    both, _ = _modular_run(NAGGuidance(5.0, 4.0))
    assert not torch.allclose(both, cfg, atol=1e-4)
    only, calls = _modular_run(NAGGuidance(1.0, 4.0))  # negative: the pipeline's negative_prompt_embeds
    assert calls == STEPS
    originals = _with_processors(unet, lambda: ReferenceNAG(embeds["negative_prompt_embeds"], 4.0, 2.5, 0.25))
    try:
        expected, _ = _modular_run(ClassifierFreeGuidance(1.0))
    finally:
        for name, processor in originals.items():
            unet.get_submodule(name).set_processor(processor)
    torch.testing.assert_close(only, expected, rtol=1e-5, atol=1e-5)
    component = NAGGuidance(1.0, 4.0)
    component.negative = torch.zeros(1, 5, 64)  # an explicit negative wins over the pipeline's
    explicit, _ = _modular_run(component)
    assert component.negative is not None and not torch.allclose(explicit, only, atol=1e-4)
    now = _processors(unet)
    assert all(now[k] is before[k] for k in before) and _hook_count(unet) == hooks
