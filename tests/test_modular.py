"""guidance.diffusion.modular: our guiders as diffusers guider components.

Two levels, as diffusers tests its own guiders: the component interface directly
(set_state / prepare_inputs / forward, config round trip), and a tiny random-weight
StableDiffusion3 modular pipeline (the core denoise blocks, fed prompt embeddings) built from configs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
)
from diffusers.modular_pipelines.modular_pipeline import BlockState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec
from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
    StableDiffusion3T2ICoreDenoiseStep,
)
from diffusers.utils import logging as diffusers_logging

from guidance.diffusion.modular import APGGuidance, BetaCFGGuidance, CFGGuidance, CFGZeroStarGuidance
from guidance.schedules import Linear

diffusers_logging.set_verbosity_error()


def _pair(seed=0, shape=(2, 4, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(shape, generator=gen)
    return cond, 0.8 * cond + 0.3 * torch.randn(shape, generator=gen)


def _run_steps(guider, num_steps, seed_offset=0):
    """Drives a guider the way the modular denoise blocks do; returns per-step (num_batches, pred)."""
    results = []
    for step in range(num_steps):
        cond, uncond = _pair(seed=step + seed_offset)
        guider.set_state(step=step, num_inference_steps=num_steps, timestep=torch.tensor(1000 - step))
        batches = guider.prepare_inputs({"encoder_hidden_states": (cond[:, :1], uncond[:, :1])})
        predictions = {"pred_cond": cond, "pred_uncond": uncond}
        for batch in batches:
            batch.noise_pred = predictions[getattr(batch, guider._identifier_key)]
        results.append((len(batches), guider(batches).pred))
    return results


# ---------------------------------------------------------------------------------------- interface


def test_cfg_component_equals_classifier_free_guidance():
    for rescale in (0.0, 0.7):
        ours = _run_steps(CFGGuidance(guidance_scale=5.0, guidance_rescale=rescale), 3)
        reference = _run_steps(ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=rescale), 3)
        for (n_ours, p_ours), (n_ref, p_ref) in zip(ours, reference, strict=True):
            assert n_ours == n_ref == 2
            assert torch.equal(p_ours, p_ref)


@pytest.mark.parametrize("momentum", [None, -0.5])
@pytest.mark.parametrize("norm_threshold", [None, 1.0])
def test_apg_component_diffusers_convention_equals_adaptive_projected_guidance(momentum, norm_threshold):
    ours = APGGuidance(
        guidance_scale=7.5, eta=1.0, momentum=momentum, norm_threshold=norm_threshold, convention="diffusers"
    )
    reference = AdaptiveProjectedGuidance(
        guidance_scale=7.5,
        adaptive_projected_guidance_momentum=momentum,
        adaptive_projected_guidance_rescale=norm_threshold or 0.0,
        eta=1.0,
    )
    for run in range(2):  # momentum must restart at step 0 of the second run
        for (_, p_ours), (_, p_ref) in zip(
            _run_steps(ours, 4, seed_offset=run), _run_steps(reference, 4, seed_offset=run), strict=True
        ):
            assert torch.equal(p_ours, p_ref)


def test_apg_component_comfyui_convention_equals_original_formulation():
    ours = _run_steps(APGGuidance(guidance_scale=4.0, eta=0.5, norm_threshold=2.0, convention="comfyui"), 2)
    reference = _run_steps(
        AdaptiveProjectedGuidance(
            guidance_scale=4.0,
            adaptive_projected_guidance_rescale=2.0,
            eta=0.5,
            use_original_formulation=True,
        ),
        2,
    )
    for (_, p_ours), (_, p_ref) in zip(ours, reference, strict=True):
        assert torch.equal(p_ours, p_ref)


@pytest.mark.parametrize("zero_init_steps", [0, 2])
def test_cfg_zero_star_component_equals_diffusers(zero_init_steps):
    ours = _run_steps(CFGZeroStarGuidance(guidance_scale=5.0, zero_init_steps=zero_init_steps), 4)
    reference = _run_steps(
        ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=zero_init_steps), 4
    )
    for step, ((n_ours, p_ours), (_, p_ref)) in enumerate(zip(ours, reference, strict=True)):
        assert torch.equal(p_ours, p_ref)
        assert n_ours == (1 if step < zero_init_steps else 2)  # zero-init steps skip the uncond pass


def test_schedule_turns_off_the_unconditional_batch():
    guider = CFGGuidance(schedule=Linear(start=1.0, end=5.0))
    assert guider.num_conditions == 2  # asked before the loop: guidance happens at some step
    results = _run_steps(guider, 3)
    assert [n for n, _ in results] == [1, 2, 2]
    cond0, _ = _pair(seed=0)
    assert torch.equal(results[0][1], cond0)
    cond2, uncond2 = _pair(seed=2)
    assert torch.equal(results[2][1], uncond2 + 5.0 * (cond2 - uncond2))


def test_constant_scale_one_is_off_before_and_during_the_loop():
    guider = CFGGuidance(guidance_scale=1.0)
    assert guider.num_conditions == 1
    results = _run_steps(guider, 2)
    assert all(n == 1 for n, _ in results)
    assert torch.equal(results[1][1], _pair(seed=1)[0])


def test_start_stop_and_disable():
    guider = APGGuidance(guidance_scale=5.0, start=0.25, stop=0.75)
    counts = [n for n, _ in _run_steps(guider, 4)]
    assert counts == [1, 2, 2, 1]
    guider.disable()
    assert guider.num_conditions == 1
    (_, pred), *_ = _run_steps(guider, 1)
    assert torch.equal(pred, _pair(seed=0)[0])


def test_prepare_inputs_from_block_state():
    guider = BetaCFGGuidance(guidance_scale=7.5)
    guider.set_state(step=1, num_inference_steps=3, timestep=torch.tensor(500))
    state = BlockState(prompt_embeds=torch.ones(1, 2), negative_prompt_embeds=torch.zeros(1, 2))
    batches = guider.prepare_inputs_from_block_state(
        state, {"encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds")}
    )
    assert [getattr(b, guider._identifier_key) for b in batches] == ["pred_cond", "pred_uncond"]
    assert torch.equal(batches[1].encoder_hidden_states, torch.zeros(1, 2))


def test_config_round_trip_and_new(tmp_path):
    guider = APGGuidance(guidance_scale=6.0, momentum=0.5, norm_threshold=10.0, convention="comfyui", eta=0.3)
    guider.save_pretrained(tmp_path)
    loaded = APGGuidance.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(guider.config)
    assert "schedule" not in guider.config
    assert repr(loaded.guider) == repr(guider.guider)
    scheduled = CFGGuidance(schedule=Linear(1.0, 4.0))
    copy = scheduled.new(guidance_rescale=0.5)
    assert copy.guider.schedule == Linear(1.0, 4.0) and copy.guidance_rescale == 0.5
    spec = ComponentSpec.from_component("guider", guider)
    assert spec.default_creation_method == "from_config"


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: APGGuidance(convention="webui"), "convention"),
        (lambda: APGGuidance(momentum=2.0), "momentum"),
        (lambda: CFGGuidance(guidance_scale=float("nan")), "guidance_scale"),
        (lambda: CFGGuidance(guidance_rescale=1.5), "rescale"),
        (lambda: CFGZeroStarGuidance(zero_init_steps=-1), "zero_init_steps"),
        (lambda: CFGGuidance(start=0.8, stop=0.2), "stop"),
    ],
)
def test_bad_configuration(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


# ---------------------------------------------------------------------------------------- tiny pipeline


@pytest.fixture(scope="module")
def sd3_modular():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    calls = []
    transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    gen = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(2, 5, 32, generator=gen),
        "pooled_prompt_embeds": torch.randn(2, 64, generator=gen),
        "negative_prompt_embeds": torch.randn(2, 5, 32, generator=gen),
        "negative_pooled_prompt_embeds": torch.randn(2, 64, generator=gen),
    }

    def run(guider):
        pipe.update_components(guider=guider)
        calls.clear()
        latents = pipe(
            **embeds,
            height=32,
            width=32,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output="latents",
        )
        return latents, len(calls)

    return run


def test_pipeline_cfg_component_is_bit_identical_to_diffusers_guider(sd3_modular):
    ours, our_calls = sd3_modular(CFGGuidance(guidance_scale=5.0))
    reference, reference_calls = sd3_modular(ClassifierFreeGuidance(guidance_scale=5.0))
    assert torch.equal(ours, reference)
    assert our_calls == reference_calls == 6
    plain, _ = sd3_modular(ClassifierFreeGuidance(guidance_scale=1.0))
    assert not torch.equal(ours, plain)


def test_pipeline_guidance_off_is_the_unguided_pipeline(sd3_modular):
    ours, our_calls = sd3_modular(CFGGuidance(guidance_scale=1.0))
    reference, _ = sd3_modular(ClassifierFreeGuidance(guidance_scale=1.0))
    assert torch.equal(ours, reference)
    assert our_calls == 3


def test_pipeline_apg_component_equals_adaptive_projected_guidance(sd3_modular):
    ours, _ = sd3_modular(
        APGGuidance(guidance_scale=6.0, eta=1.0, momentum=-0.5, norm_threshold=0.5, convention="diffusers")
    )
    reference, _ = sd3_modular(
        AdaptiveProjectedGuidance(
            guidance_scale=6.0,
            adaptive_projected_guidance_momentum=-0.5,
            adaptive_projected_guidance_rescale=0.5,
        )
    )
    assert torch.equal(ours, reference)
    cfg_only, _ = sd3_modular(CFGGuidance(guidance_scale=6.0))
    assert not torch.allclose(ours, cfg_only)  # momentum and threshold changed the result


def test_pipeline_cfg_zero_star_and_schedule_save_evaluations(sd3_modular):
    ours, our_calls = sd3_modular(CFGZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1))
    reference, reference_calls = sd3_modular(
        ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1)
    )
    assert torch.equal(ours, reference)
    assert (our_calls, reference_calls) == (5, 6)
    _, scheduled_calls = sd3_modular(CFGGuidance(schedule=Linear(start=1.0, end=5.0)))
    assert scheduled_calls == 5
