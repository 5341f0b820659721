"""Perturbation guidance (PAG, SEG, SLG, TPG, S^2-Guidance, AutoGuidance) through attach, and parity with diffusers.

* PAG through ``attach`` equals ``StableDiffusionPAGPipeline`` (same tiny weights, float32).
* Each guider diffusers ships (PAG, SLG, SEG, AutoGuidance) equals diffusers' guider ``forward``
  driven step by step (``set_state``) on the same predictions, window and scales included.
* Scale 1 / perturbation off is bit-identical to the plain pipeline; detach restores the model,
  also after an exception; the perturbed branch shares the batched call (hooks act per row) and
  equals a separate evaluation.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from guidance import ops
from guidance.diffusion import attach
from guidance.diffusion.testing import (
    tiny_dit,
    tiny_stable_diffusion,
    tiny_stable_diffusion_3,
    tiny_stable_diffusion_xl,
)
from guidance.guiders import (
    AutoGuidance,
    PerturbedAttention,
    SkipLayer,
    SmoothedEnergy,
    StochasticSelf,
    TokenPerturbation,
    guide,
)
from guidance.perturbations import (
    IdentityAttention,
    ShuffleTokens,
    SkipBlocks,
    SmoothedQueries,
    StochasticSkip,
    blur_queries,
    layer_matcher,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = 3
PROMPTS = ["a cat", "dog"]
BATCH = 2 * len(PROMPTS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _sd():
    return tiny_stable_diffusion()


def _gens(n=BATCH):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def _run_sd(pipe, **kwargs):
    kwargs.setdefault("guidance_scale", 2.0)
    return pipe(
        PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS, height=16, width=16,
        output_type="latent", generator=_gens(), **kwargs,
    ).images


def _processors(module):
    return {n: m.get_processor() for n, m in module.named_modules() if hasattr(m, "set_processor")}


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ------------------------------------------------------------------ PAG parity with diffusers' pipeline


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_pag_through_attach_equals_stable_diffusion_pag_pipeline(cfg):
    from diffusers import StableDiffusionPAGPipeline

    pipe = _sd()
    pag = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers="mid")
    pag.set_progress_bar_config(disable=True)
    before = _processors(pipe.unet)
    expected = _run_sd(pag, guidance_scale=cfg, pag_scale=3.0)
    for name, processor in before.items():  # whatever the PAG pipeline left, the same processors again
        pipe.unet.get_submodule(name).set_processor(processor)
    guider = PerturbedAttention(cfg, 3.0, layers="mid")
    # attach needs the pipeline to do CFG to see a batch; with cfg=1 the guider drops `uncond`.
    with attach(pipe, guider) as handle:
        got = _run_sd(pipe, guidance_scale=2.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert handle.stats.forward_calls == STEPS  # [uncond, cond, perturbed] (or [cond, perturbed]) in one call
    assert handle.stats.branch_rows["perturbed"] == BATCH * STEPS


def test_pag_off_is_bit_identical_and_detach_restores_the_model():
    pipe = _sd()
    processors, state = _processors(pipe.unet), {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = _run_sd(pipe, guidance_scale=3.0)
    with attach(pipe, PerturbedAttention(3.0, 0.0)) as handle:
        assert torch.equal(_run_sd(pipe), plain)
    assert "perturbed" not in handle.stats.branch_rows
    with attach(pipe, PerturbedAttention(1.0, 0.0)):
        off = _run_sd(pipe)
    assert torch.equal(off, _run_sd(pipe, guidance_scale=1.0))
    now = _processors(pipe.unet)
    assert all(now[k] is processors[k] for k in processors)
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())


class Boom(IdentityAttention):
    def _make(self, name, original, rows):
        def fail(*args, **kwargs):
            raise RuntimeError("boom")

        return fail


@pytest.mark.parametrize("hook", [Boom("mid"), SkipBlocks("mid_block.attentions.0"), ShuffleTokens("mid_block.attentions.0")])
def test_model_restored_after_an_exception_inside_the_perturbed_forward(hook):
    pipe = _sd()
    processors, hooks = _processors(pipe.unet), _hook_count(pipe.unet)
    if not isinstance(hook, Boom):
        original = pipe.unet.mid_block.forward

        def failing(*a, **k):
            raise RuntimeError("boom")

        pipe.unet.mid_block.forward = failing
    try:
        with pytest.raises(RuntimeError, match="boom"), attach(pipe, PerturbedAttention(3.0, 2.0, hook=hook)):
            _run_sd(pipe)
    finally:
        if not isinstance(hook, Boom):
            pipe.unet.mid_block.forward = original
    now = _processors(pipe.unet)
    assert all(now[k] is processors[k] for k in processors) and _hook_count(pipe.unet) == hooks
    assert "forward" not in pipe.unet.__dict__


# ------------------------------------------------------------------ batched == separate, every hook, every pipeline

SD3_KW = {"height": 8, "width": 8, "max_sequence_length": 4}
PIPES = {
    "sd": (tiny_stable_diffusion, {"height": 16, "width": 16}),
    "sdxl": (tiny_stable_diffusion_xl, {"height": 16, "width": 16}),
    "sd3": (tiny_stable_diffusion_3, SD3_KW),
}
LAYERS = {
    "sd": {"attn": "mid", "block": "mid_block.attentions.0.transformer_blocks.0", "tokens": "mid_block.attentions.0.transformer_blocks.0"},
    "sdxl": {"attn": "mid", "block": "mid_block.attentions.0.transformer_blocks.0", "tokens": "down_blocks.1.attentions.0.transformer_blocks.0"},
    "sd3": {"attn": "transformer_blocks.0", "block": "transformer_blocks.0", "tokens": "transformer_blocks.0"},
    "dit": {"attn": "transformer_blocks.0", "block": "transformer_blocks.0", "tokens": "transformer_blocks.0"},
}


def _guiders(layers):
    return {
        "pag": lambda: PerturbedAttention(3.0, 2.0, layers=layers["attn"]),
        "seg": lambda: SmoothedEnergy(3.0, 2.0, layers=layers["attn"], sigma=1.5),
        "slg": lambda: SkipLayer(3.0, 2.0, layers=layers["block"], start=0.0, stop=1.0),
        "tpg": lambda: TokenPerturbation(3.0, 2.0, layers=layers["tokens"]),
        "s2g": lambda: StochasticSelf(3.0, 0.5, layers=layers["block"], ratio=1.0),
    }


@functools.cache
def _pipe(name):
    return tiny_dit() if name == "dit" else PIPES[name][0]()


def _run(name, pipe, **kw):
    if name == "dit":
        return pipe(class_labels=[1, 2], num_inference_steps=STEPS, output_type="latent", guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(0)).images
    extra = PIPES[name][1]
    return pipe(PROMPTS, negative_prompt=["blur", "dark"], num_images_per_prompt=2, num_inference_steps=STEPS,
                output_type="latent", guidance_scale=2.0, generator=_gens(), **extra, **kw).images


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "dit"])
@pytest.mark.parametrize("method", ["pag", "seg", "slg", "tpg", "s2g"])
def test_every_perturbation_runs_batched_equal_to_separate_on_every_pipeline(name, method):
    pipe = _pipe(name)
    make = _guiders(LAYERS[name])[method]
    with attach(pipe, make(), evaluator="separate") as separate:
        expected = _run(name, pipe)
    with attach(pipe, make()) as batched:
        got = _run(name, pipe)
    got, expected = torch.as_tensor(got), torch.as_tensor(expected)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert batched.stats.forward_calls == STEPS and separate.stats.forward_calls == 3 * STEPS
    plain = torch.as_tensor(_run(name, pipe))
    assert not torch.allclose(got, plain)  # the perturbation changed something


# ------------------------------------------------------------------ digits pipeline: self-attention blocks, weak model


@functools.cache
def _digits():
    digits = pytest.importorskip("guidance.models.digits")
    return digits.load_digits_pipeline("ddim")


def _digits_run(pipe, **kw):
    kw.setdefault("guidance_scale", 2.0)
    return pipe([1, 7, 3], num_inference_steps=4, output_type="latent",
                generator=[torch.Generator().manual_seed(i) for i in range(3)], **kw).images


@pytest.mark.parametrize(
    "guider",
    [
        PerturbedAttention(3.0, 2.0, layers="down_blocks.2.attentions.0"),
        SmoothedEnergy(3.0, 2.0, layers="up_blocks.0.attentions.*"),
        SkipLayer(3.0, 2.0, layers="mid_block.attentions.0", start=0.0, stop=1.0),
        TokenPerturbation(3.0, 2.0, layers="mid_block.attentions.0"),
        StochasticSelf(3.0, 0.5, layers="*.attentions.[0-9]", ratio=0.5),
    ],
    ids=repr,
)
def test_perturbation_guiders_on_the_digits_pipeline(guider):
    pipe = _digits()
    with attach(pipe, guider, evaluator="separate"):
        expected = _digits_run(pipe)
    with attach(pipe, guider) as handle:
        got = _digits_run(pipe)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert handle.stats.forward_calls == 4 and torch.isfinite(got).all()


def test_autoguidance_with_the_weak_digits_model_equals_a_hand_computed_run():
    weak_module = pytest.importorskip("guidance.models.digits_weak")
    pipe, weak = _digits(), weak_module.load_digits_weak_unet()
    with attach(pipe, AutoGuidance(2.0, model=weak)) as handle:
        got = _digits_run(pipe)
    assert handle.stats.branch_rows == {"cond": 12, "weak": 12}
    # by hand: the same sampler, epsilon = weak + w (cond - weak)
    unet, forward = pipe.unet, pipe.unet.forward

    def guided(sample, timestep, class_labels=None, **kw):
        half = sample.shape[0] // 2
        x, y = sample[half:], class_labels[half:]
        c, p = forward(x, timestep, class_labels=y).sample, weak(x, timestep, class_labels=y).sample
        g = p + 2.0 * (c - p)
        return type(forward(x, timestep, class_labels=y))(sample=torch.cat([g, g]))

    unet.forward = guided
    try:
        expected = _digits_run(pipe)
    finally:
        del unet.forward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with attach(pipe, AutoGuidance(1.0, model=weak)):
        off = _digits_run(pipe)
        with pytest.warns(UserWarning, match="not doing classifier-free guidance"):
            assert torch.equal(off, _digits_run(pipe, guidance_scale=1.0))


# ------------------------------------------------------------------ parity with diffusers' guiders, step by step


def _drive(theirs, ours, steps=10, with_uncond=True, extra_name="perturbed"):
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        c, u, p = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        theirs.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(999 - 100 * step))
        cfg_on = theirs._is_cfg_enabled()
        perturb_on = (theirs._is_seg_enabled if hasattr(theirs, "_is_seg_enabled") else theirs._is_slg_enabled)()
        given = {"pred_cond": c, "pred_uncond": u if cfg_on else None}
        given[theirs._input_predictions[2]] = p if perturb_on else None
        expected = theirs.forward(**given).pred
        kwargs = {extra_name: p}
        got = ours(c, u, step=step, num_steps=steps, **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_pag_slg_seg_match_diffusers_guiders_step_by_step(cfg):
    from diffusers.guiders import PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance
    from diffusers.hooks import LayerSkipConfig
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig

    config = LayerSkipConfig(indices=[0], fqn="transformer_blocks")
    pairs = [
        (PerturbedAttentionGuidance(cfg, 2.8, perturbed_guidance_config=config),
         PerturbedAttention(cfg, 2.8, start=0.01, stop=0.2, convention="diffusers")),
        (SkipLayerGuidance(cfg, 2.8, skip_layer_config=LayerSkipConfig(indices=[0], fqn="transformer_blocks")),
         SkipLayer(cfg, 2.8, layers="transformer_blocks.0", convention="diffusers")),
        (SmoothedEnergyGuidance(cfg, 2.8, seg_guidance_config=SmoothedEnergyGuidanceConfig(indices=[0], fqn="transformer_blocks")),
         SmoothedEnergy(cfg, 2.8, start=0.0, stop=1.0, convention="diffusers")),
    ]
    for theirs, ours in pairs:
        _drive(theirs, ours, steps=20)


def test_autoguidance_matches_diffusers_guider_step_by_step():
    from diffusers.guiders import AutoGuidance as DiffusersAutoGuidance
    from diffusers.hooks import LayerSkipConfig

    theirs = DiffusersAutoGuidance(3.0, auto_guidance_config=LayerSkipConfig(indices=[0], fqn="transformer_blocks"))
    ours = AutoGuidance(3.0, hook=SkipBlocks("transformer_blocks.0"), source="uncond")
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        c, weak = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
        theirs.set_state(step=step, num_inference_steps=5, timestep=torch.tensor(step))
        expected = theirs.forward(c, weak).pred
        torch.testing.assert_close(ours(c, None, weak=weak, step=step, num_steps=5), expected, rtol=0, atol=1e-6)
    assert [b.source for b in ours.branches(0)] == ["cond", "uncond"]


# ------------------------------------------------------------------ pieces


def test_layer_matcher_semantics():
    match = layer_matcher("blocks.1")
    assert match("transformer_blocks.1.attn", None) and not match("transformer_blocks.10.attn", None)
    assert layer_matcher("mid")("mid_block.attentions.0.transformer_blocks.0.attn1", None)
    assert layer_matcher("down_blocks.*.attn1")("down_blocks.1.attentions.0.transformer_blocks.0.attn1", None)
    with pytest.raises(TypeError):
        layer_matcher([])


def test_blur_queries_limits_and_validation():
    q = torch.randn(2, 16, 4)
    assert torch.allclose(blur_queries(q, 1e-3), q)  # tiny sigma: kernel of size 1
    blurred = blur_queries(q, 1.0)
    assert blurred.shape == q.shape and torch.allclose(blurred.mean(1), q.mean(1), atol=0.3)
    with pytest.raises(ValueError, match="sigma"):
        blur_queries(q, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        SmoothedQueries("mid", sigma=-1.0)


def test_guider_validation_and_extremes():
    with pytest.raises(ValueError, match="layers"):
        SkipLayer(3.0)
    with pytest.raises(ValueError, match="stop"):
        PerturbedAttention(3.0, start=0.5, stop=0.2)
    with pytest.raises(ValueError, match="convention"):
        PerturbedAttention(3.0, convention="comfy")
    with pytest.raises(TypeError, match="hook"):
        PerturbedAttention(3.0, hook=object())
    with pytest.raises(ValueError, match="model"):
        AutoGuidance(2.0)
    with pytest.raises(ValueError, match="ratio"):
        StochasticSkip("x", ratio=0.0)
    guider = PerturbedAttention(3.0, 2.0)
    c = torch.ones(1, 4)
    with pytest.raises(ValueError, match="perturbed"):
        guider(c, c, step=0)
    torch.testing.assert_close(PerturbedAttention(1.0, 2.0)(c, None, step=0, perturbed=c * 0), 3 * c)
    assert PerturbedAttention(1.0, 0.0)(c, None, step=0) is c
    half = torch.ones(1, 4, dtype=torch.float16) * 6e4
    out = ops.perturbed_guidance(half, half, half * 0, 2.0, 0.5)
    assert not torch.isnan(out).any()


def test_guide_converts_every_extra_branch_to_x0():
    from guidance.guiders import APG
    from guidance.spaces import NoiseLevel, to_x0

    class X0Perturbed(PerturbedAttention):
        space = "x0"

    x = torch.randn(1, 4)
    level = NoiseLevel.ddpm(0.5)
    c, u, p = torch.randn(1, 4), torch.randn(1, 4), torch.randn(1, 4)
    out = guide(X0Perturbed(2.0, 1.0), c, u, step=0, sample=x, prediction_type="epsilon", noise_level=level, perturbed=p)
    x0 = [to_x0(t, x, "epsilon", level) for t in (c, u, p)]
    expected_x0 = ops.perturbed_guidance(*x0, 2.0, 1.0)
    from guidance.spaces import from_x0

    torch.testing.assert_close(out, from_x0(expected_x0, x, "epsilon", level))
    assert APG  # the existing x0 guider still imports


# ------------------------------------------------------------------ modular components (SD3 modular pipeline)


@functools.cache
def _sd3_modular():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    return pipe, transformer


def _modular_run(guider):
    pipe, transformer = _sd3_modular()
    calls = []
    handle = transformer.register_forward_hook(lambda m, a, o: calls.append(1))
    gen = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(2, 5, 32, generator=gen),
        "pooled_prompt_embeds": torch.randn(2, 64, generator=gen),
        "negative_prompt_embeds": torch.randn(2, 5, 32, generator=gen),
        "negative_pooled_prompt_embeds": torch.randn(2, 64, generator=gen),
    }
    pipe.update_components(guider=guider)
    try:
        latents = pipe(**embeds, height=32, width=32, num_inference_steps=3,
                       generator=torch.Generator().manual_seed(0), output="latents")
    finally:
        handle.remove()
    return latents, len(calls)


def test_modular_pag_and_slg_components_equal_diffusers_guiders_in_the_sd3_modular_pipeline():
    from diffusers.guiders import ClassifierFreeGuidance

    from guidance.diffusion.modular_perturbed import PAGGuidance, SLGGuidance

    _, transformer = _sd3_modular()
    processors, hooks = _processors(transformer), _hook_count(transformer)
    # diffusers' own SkipLayerGuidance cannot be the reference here: its whole-block skip hook
    # returns SD3's joint-block outputs in the wrong order (the run fails on a reshape).
    ours, calls = _modular_run(SLGGuidance(5.0, 2.8, layers="transformer_blocks.0", perturbed_start=0.0,
                                           perturbed_stop=1.0, convention="diffusers"))
    assert calls == 2 * 1 + 3 * 2 and torch.isfinite(ours).all()  # strict window: step 0 without the skip branch
    pag, pag_calls = _modular_run(PAGGuidance(5.0, 3.0, layers="transformer_blocks.1"))
    assert pag_calls == 9 and torch.isfinite(pag).all()
    cfg, _ = _modular_run(ClassifierFreeGuidance(5.0))
    assert not torch.allclose(pag, cfg) and not torch.allclose(ours, cfg)
    off, off_calls = _modular_run(PAGGuidance(5.0, 0.0, layers="transformer_blocks.1"))
    assert torch.equal(off, cfg) and off_calls == 6
    now = _processors(transformer)
    assert all(now[k] is processors[k] for k in processors) and _hook_count(transformer) == hooks + 0
