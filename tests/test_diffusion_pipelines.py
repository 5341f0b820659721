"""guidance.diffusion on tiny random-weight diffusers pipelines (built from configs, no hub access).

Parity in float32: plain CFG attached reproduces the pipeline bit for bit, guidance off (scale 1,
detached) reproduces the unguided pipeline bit for bit; adaptive guidance, the guidance interval
and cut-offs really skip unconditional rows (counted at the denoiser's input layer, independently
of the wrapper's own statistics); the step callbacks are batch-correct where diffusers' cut-off
callback is not; bad input gets clear errors or warnings.
"""

from __future__ import annotations

import functools
import os
import types
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import SDCFGCutoffCallback

from guidance.adaptive import AdaptiveGuidance, RatioCutoff
from guidance.diffusion import CFGCutoffCallback, ScheduleCallback, attach, conditioning_inputs, detach
from guidance.diffusion.schedulers import schedule_sigma
from guidance.diffusion.testing import (
    tiny_dit,
    tiny_flux_transformer,
    tiny_stable_diffusion,
    tiny_stable_diffusion_3,
    tiny_stable_diffusion_xl,
)
from guidance.guiders import APG, CFG, CFGZeroStar, PerpNeg
from guidance.schedules import FunctionSchedule, Interval, Window
from guidance.spaces import NoiseLevel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a cat", "dog"]
NEGATIVE = ["blur", "ugly"]
STEPS = 3
IMAGES_PER_PROMPT = 2
BATCH = len(PROMPTS) * IMAGES_PER_PROMPT

BUILDERS = {
    "sd": (tiny_stable_diffusion, {"height": 16, "width": 16}),
    "sdxl": (tiny_stable_diffusion_xl, {"height": 16, "width": 16}),
    "sd3": (tiny_stable_diffusion_3, {"height": 8, "width": 8, "max_sequence_length": 4}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _pipe(name: str):
    return BUILDERS[name][0]()


@pytest.fixture(params=list(BUILDERS))
def text_pipe(request):
    pipe = _pipe(request.param)
    yield pipe, BUILDERS[request.param][1]
    detach(pipe)


@pytest.fixture
def sd():
    pipe = _pipe("sd")
    yield pipe
    detach(pipe)


def run(pipe, extra, *, prompts=PROMPTS, negative=NEGATIVE, per_prompt=IMAGES_PER_PROMPT, **kwargs):
    n = len(prompts) * per_prompt
    kwargs.setdefault("generator", [torch.Generator().manual_seed(i) for i in range(n)])
    return pipe(
        prompts,
        negative_prompt=negative,
        num_images_per_prompt=per_prompt,
        num_inference_steps=kwargs.pop("num_inference_steps", STEPS),
        output_type="latent",
        **extra,
        **kwargs,
    ).images


class RowCounter:
    """Counts the sample rows that reach the denoiser's first layer (the real network evaluations)."""

    def __init__(self, pipe):
        module = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        layer = module.conv_in if hasattr(module, "conv_in") else module.pos_embed
        self.rows = 0
        self._hook = layer.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.rows += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


# ---------------------------------------------------------------- parity


def test_plain_cfg_attached_is_bit_identical_to_the_pipeline(text_pipe):
    pipe, extra = text_pipe
    reference = run(pipe, extra, guidance_scale=4.5)
    with RowCounter(pipe) as counter, attach(pipe, CFG(4.5)) as handle:
        out = run(pipe, extra, guidance_scale=2.0)  # the pipeline's own scale no longer matters
    assert torch.equal(out, reference)
    assert handle.stats.evaluations == counter.rows == 2 * BATCH * STEPS
    assert handle.stats.batch_size == BATCH and handle.stats.scales == [4.5] * STEPS


def test_guidance_off_is_bit_identical_to_the_unguided_pipeline(text_pipe):
    pipe, extra = text_pipe
    unguided = run(pipe, extra, guidance_scale=1.0, negative=None)
    with RowCounter(pipe) as counter, attach(pipe, CFG(1.0)) as handle:
        out = run(pipe, extra, guidance_scale=3.0)
    assert torch.equal(out, unguided)
    assert counter.rows == handle.stats.cond_rows == BATCH * STEPS
    assert handle.stats.uncond_rows == 0 and handle.stats.uncond_skipped == BATCH * STEPS


def test_attach_without_guider_follows_the_pipeline_scale_and_detach_restores(sd):
    reference = run(sd, BUILDERS["sd"][1], guidance_scale=3.0)
    handle = attach(sd)
    assert "forward" in sd.unet.__dict__ and sd._guidance_handle is handle
    out = run(sd, BUILDERS["sd"][1], guidance_scale=3.0)
    detach(sd)
    assert torch.equal(out, reference)
    assert "forward" not in sd.unet.__dict__ and getattr(sd, "_guidance_handle", None) is None
    assert torch.equal(run(sd, BUILDERS["sd"][1], guidance_scale=3.0), reference)
    detach(sd)  # no-op
    with pytest.raises(RuntimeError, match="boom"):
        with attach(sd, CFG(2.0)):
            raise RuntimeError("boom")
    assert "forward" not in sd.unet.__dict__


def test_guider_state_is_reset_for_every_run(sd):
    with attach(sd, APG(3.0, momentum=-0.5, norm_threshold=5.0)) as handle:
        first = run(sd, BUILDERS["sd"][1], guidance_scale=2.0)
        second = run(sd, BUILDERS["sd"][1], guidance_scale=2.0)
    assert torch.equal(first, second)  # momentum from run 1 must not leak into run 2
    assert len(handle.runs) == 2 and handle.runs[0].evaluations == handle.runs[1].evaluations


def test_dit_cond_first_batch_with_class_labels_and_learned_variance():
    pipe = tiny_dit()

    def sample(**kwargs):
        return pipe(
            class_labels=[1, 2, 3],
            num_inference_steps=STEPS,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images

    reference, unguided = sample(guidance_scale=4.0), sample(guidance_scale=1.0)
    with attach(pipe, CFG(4.0)) as handle:
        assert torch.equal(sample(guidance_scale=1.5), reference)
    assert handle.stats.evaluations == 2 * 3 * STEPS
    with attach(pipe, CFG(1.0)):
        assert torch.equal(sample(guidance_scale=1.5), unguided)
    with RowCounter(pipe) as counter, attach(pipe, CFG(4.0), adaptive=AdaptiveGuidance(-1.0)) as handle:
        sample(guidance_scale=1.5)
    assert counter.rows == handle.stats.evaluations == 2 * 3 + 3 * (STEPS - 1)


def test_digits_pipeline_works_with_attach():
    digits = pytest.importorskip("guidance.models.digits")
    pipe = digits.DigitsPipeline(
        unet=digits.build_digits_unet(seed=0).eval(),
        scheduler=DDIMScheduler.from_config(digits.digits_scheduler_config()),
    )
    pipe.set_progress_bar_config(disable=True)

    def sample(**kwargs):
        return pipe(
            [3, 7],
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **kwargs,
        ).images

    reference = sample(guidance_scale=3.0)
    with attach(pipe, CFG(3.0)):
        assert torch.equal(sample(guidance_scale=2.0), reference)
    with attach(pipe, 0.5, mode="cfgpp") as handle:
        assert bool(torch.isfinite(sample(guidance_scale=2.0)).all())
    assert handle.stats.evaluations == 2 * 2 * STEPS


# ---------------------------------------------------------------- saved evaluations


def test_adaptive_guidance_really_skips_unconditional_rows(text_pipe):
    pipe, extra = text_pipe
    with RowCounter(pipe) as counter, attach(pipe, CFG(4.0), adaptive=AdaptiveGuidance(-1.0)) as handle:
        run(pipe, extra, guidance_scale=2.0)
    # Every sample passes the threshold at step 0: the later steps run the conditional rows only.
    assert counter.rows == handle.stats.evaluations == 2 * BATCH + BATCH * (STEPS - 1)
    assert handle.stats.passed_at == [0] * BATCH
    reference = run(pipe, extra, guidance_scale=4.0)
    with attach(pipe, CFG(4.0), adaptive=AdaptiveGuidance(1.0)) as handle:  # never passes: plain CFG
        assert torch.equal(run(pipe, extra, guidance_scale=2.0), reference)
    assert handle.stats.passed_at == [None] * BATCH


def test_adaptive_decisions_are_per_sample(sd):
    extra = BUILDERS["sd"][1]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kwargs = dict(negative=None, per_prompt=1, latents=latents, generator=None, guidance_scale=2.0)
    probe = AdaptiveGuidance(1.0)
    with attach(sd, CFG(5.0), adaptive=probe):
        run(sd, extra, **kwargs)
    cos0 = probe.similarities[0]
    assert cos0[0] != cos0[1]
    threshold = float(cos0.mean())
    early = int(cos0.argmax())
    with RowCounter(sd) as counter, attach(sd, CFG(5.0), adaptive=AdaptiveGuidance(threshold)) as handle:
        batched = run(sd, extra, **kwargs)
    passed_at = handle.stats.passed_at
    assert passed_at[early] == 0 and (passed_at[1 - early] is None or passed_at[1 - early] > 0)
    expected_rows = sum(2 * (p + 1) + (STEPS - p - 1) if p is not None else 2 * STEPS for p in passed_at)
    assert counter.rows == handle.stats.evaluations == expected_rows
    for i in range(2):  # each sample follows the trajectory it would follow alone
        single_kwargs = dict(kwargs, latents=latents[i : i + 1])
        with attach(sd, CFG(5.0), adaptive=AdaptiveGuidance(threshold)) as single:
            alone = run(sd, extra, prompts=[PROMPTS[i]], **single_kwargs)
        assert single.stats.passed_at == [passed_at[i]]
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_guidance_interval_skips_uncond_outside_and_gets_the_scheduler_sigma(text_pipe):
    pipe, extra = text_pipe
    by_step: dict[int, float] = {}
    with attach(pipe, CFG(FunctionSchedule(lambda step, n, sigma: by_step.setdefault(step, sigma) and 1.0))):
        run(pipe, extra, guidance_scale=2.0)
    seen = [by_step[step] for step in range(STEPS)]
    scheduler = pipe.scheduler
    if hasattr(scheduler, "sigmas"):
        expected = [float(s) for s in scheduler.sigmas[:STEPS]]
    else:
        expected = [float(((1 - a) / a) ** 0.5) for a in scheduler.alphas_cumprod[scheduler.timesteps]]
    assert seen == pytest.approx(expected, rel=1e-5)
    middle = seen[1]
    interval = Interval(4.0, sigma_lo=(middle + seen[2]) / 2, sigma_hi=(middle + seen[0]) / 2)
    with RowCounter(pipe) as counter, attach(pipe, CFG(interval)) as handle:
        out = run(pipe, extra, guidance_scale=2.0)
    assert handle.stats.scales == [1.0, 4.0, 1.0]
    assert counter.rows == BATCH + 2 * BATCH + BATCH
    with attach(pipe, CFG(Window(4.0, start_step=1, end_step=2))):
        assert torch.equal(run(pipe, extra, guidance_scale=2.0), out)


def test_zero_init_steps_of_cfg_zero_star_skip_the_unconditional_rows(sd):
    with RowCounter(sd) as counter, attach(sd, CFGZeroStar(3.0, zero_init_steps=1)) as handle:
        out = run(sd, BUILDERS["sd"][1], guidance_scale=2.0)
    assert counter.rows == BATCH + 2 * BATCH * (STEPS - 1)
    assert bool(torch.isfinite(out).all()) and handle.stats.uncond_skipped == BATCH


# ---------------------------------------------------------------- x0-space guiders


class RecordingX0CFG(CFG):
    space = "x0"

    def __init__(self, scale):
        super().__init__(scale)
        self.guided_x0: list[torch.Tensor] = []

    def combine(self, cond, uncond, scale, *, step, **extra):
        out = super().combine(cond, uncond, scale, step=step)
        self.guided_x0.append(out.clone())
        return out


def test_x0_guiders_convert_with_the_scheduler_noise_level(text_pipe):
    pipe, extra = text_pipe
    scheduler = pipe.scheduler
    scheduler_x0: list[torch.Tensor] = []
    original_step = scheduler.step

    @functools.wraps(original_step)
    def recording_step(model_output, timestep, sample, *args, **kwargs):
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            index = (
                scheduler.step_index
                if scheduler.step_index is not None
                else scheduler.index_for_timestep(timestep)
            )
            scheduler_x0.append(sample - scheduler.sigmas[index] * model_output)
            return original_step(model_output, timestep, sample, *args, **kwargs)
        out = original_step(model_output, timestep, sample, *args, **kwargs)
        scheduler_x0.append(out[1] if isinstance(out, tuple) else out.pred_original_sample)
        return out

    guider = RecordingX0CFG(3.0)
    scheduler.step = recording_step
    try:
        with attach(pipe, guider):
            run(pipe, extra, guidance_scale=2.0)
    finally:
        del scheduler.step
    assert len(guider.guided_x0) == len(scheduler_x0) == STEPS
    for ours, theirs in zip(
        guider.guided_x0, scheduler_x0, strict=True
    ):  # the x0 the scheduler sees is the guided one
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-4)


def test_zero_predictions_give_no_nan(sd):
    original = sd.unet.forward
    sd.unet.forward = lambda sample, *args, **kwargs: (torch.zeros_like(sample),)
    try:
        with attach(
            sd, APG(5.0, momentum=-0.5, norm_threshold=1.0), adaptive=AdaptiveGuidance(0.99)
        ) as handle:
            out = run(sd, BUILDERS["sd"][1], guidance_scale=2.0)
        assert "forward" in sd.unet.__dict__  # the instance-level forward set above is restored
    finally:
        del sd.unet.forward
    assert bool(torch.isfinite(out).all())
    assert handle.stats.passed_at == [0] * BATCH  # zero vectors are identical: similarity 1
    assert sd.unet.forward.__func__ is original.__func__


# ---------------------------------------------------------------- step callbacks


def test_diffusers_cutoff_callback_is_batch_1_only_ours_is_batch_correct(sd):
    extra = BUILDERS["sd"][1]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(negative=None, per_prompt=1, generator=None, guidance_scale=4.0)
    # Batch 1: all three forms agree bit for bit.
    one = dict(kwargs, prompts=PROMPTS[:1], latents=latents[:1])
    theirs = run(sd, extra, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4), **one)
    ours = run(sd, extra, callback_on_step_end=CFGCutoffCallback(cutoff_step_ratio=0.4), **one)
    with attach(sd, CFG(4.0), adaptive=RatioCutoff(0.4)) as handle:
        attached = run(sd, extra, **one)
    assert torch.equal(theirs, ours) and torch.equal(ours, attached)
    assert handle.stats.uncond_rows == 2  # int(3 * 0.4) = 1: steps 0 and 1 guided
    # Batch 2: diffusers keeps prompt_embeds[-1:] (one row for two samples) and fails.
    two = dict(kwargs, latents=latents)
    with pytest.raises(RuntimeError):
        run(sd, extra, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4), **two)
    ours = run(sd, extra, callback_on_step_end=CFGCutoffCallback(cutoff_step_ratio=0.4), **two)
    with attach(sd, CFG(4.0), adaptive=RatioCutoff(0.4)):
        assert torch.equal(run(sd, extra, **two), ours)
    for i in range(2):
        alone = run(
            sd,
            extra,
            callback_on_step_end=CFGCutoffCallback(cutoff_step_ratio=0.4),
            **dict(kwargs, prompts=[PROMPTS[i]], latents=latents[i : i + 1]),
        )
        torch.testing.assert_close(ours[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_cutoff_callback_for_pipeline_handles_sdxl_and_sd3_conditioning(text_pipe):
    pipe, extra = text_pipe
    callback = CFGCutoffCallback.for_pipeline(pipe, cutoff_step_ratio=0.4)
    out = run(pipe, extra, guidance_scale=4.0, callback_on_step_end=callback)
    with attach(pipe, CFG(4.0), adaptive=RatioCutoff(0.4)):
        assert torch.equal(run(pipe, extra, guidance_scale=4.0), out)


def test_schedule_callback_matches_attach_and_restores_uncond(text_pipe):
    pipe, extra = text_pipe
    values = [5.0, 1.0, 3.0]  # off in the middle: the uncond conditioning must come back at step 2
    schedule = FunctionSchedule(lambda step: values[step])
    callback = ScheduleCallback.for_pipeline(pipe, schedule)
    with RowCounter(pipe) as counter:
        out = run(pipe, extra, guidance_scale=callback.first_scale(STEPS), callback_on_step_end=callback)
    assert callback.scales == values
    assert counter.rows == 2 * BATCH + BATCH + 2 * BATCH
    with attach(pipe, CFG(schedule)):
        assert torch.equal(run(pipe, extra, guidance_scale=2.0), out)


def test_schedule_callback_warns_about_the_first_step_and_scales_below_one(sd):
    callback = ScheduleCallback(FunctionSchedule(lambda step: [5.0, 0.5, 2.0][step]))
    with pytest.warns(UserWarning) as record:
        run(sd, BUILDERS["sd"][1], guidance_scale=2.0, callback_on_step_end=callback)
    messages = " ".join(str(w.message) for w in record)
    assert "Step 0 ran at the pipeline's guidance_scale=2.0" in messages
    assert "scale 0.5" in messages


def test_step_callbacks_run_on_every_shipped_pipeline(text_pipe):
    pipe, extra = text_pipe
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, sorted(callback_kwargs)))
        if step == STEPS - 1:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return callback_kwargs

    names = ["latents", *conditioning_inputs(pipe)]
    with attach(pipe, CFG(3.0)):
        out = run(
            pipe,
            extra,
            guidance_scale=2.0,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=names,
        )
    assert seen == [(i, sorted(names)) for i in range(STEPS)]
    assert torch.equal(out, torch.zeros_like(out))


def test_dit_pipeline_takes_no_step_callback():
    # diffusers' DiTPipeline has no `callback_on_step_end`: nothing to test there but that it stays so.
    import inspect

    assert "callback_on_step_end" not in inspect.signature(type(tiny_dit()).__call__).parameters


# ---------------------------------------------------------------- bad input


def test_a_pipeline_that_does_not_do_cfg_warns_and_runs_unguided(sd):
    extra = BUILDERS["sd"][1]
    unguided = run(sd, extra, guidance_scale=1.0, negative=None)
    with attach(sd, CFG(5.0)) as handle:
        with pytest.warns(UserWarning, match="not doing classifier-free guidance"):
            out = run(sd, extra, guidance_scale=1.0, negative=None)
    assert torch.equal(out, unguided)
    assert handle.stats.passthrough_rows == BATCH * STEPS


def test_guidance_rescale_in_the_pipeline_warns(sd):
    with attach(sd, CFG(3.0)):
        with pytest.warns(UserWarning, match="guidance_rescale"):
            run(sd, BUILDERS["sd"][1], guidance_scale=2.0, guidance_rescale=0.7)


def test_guidance_distilled_models_are_rejected():
    flux_like = types.SimpleNamespace(
        transformer=tiny_flux_transformer(), scheduler=FlowMatchEulerDiscreteScheduler()
    )
    with pytest.raises(ValueError, match="guidance_embeds=True`: it is a guidance-distilled"):
        attach(flux_like, CFG(3.0))
    lcm = types.SimpleNamespace(
        unet=types.SimpleNamespace(config={"time_cond_proj_dim": 256}), scheduler=DDIMScheduler()
    )
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        attach(lcm, CFG(3.0))


def test_unknown_prediction_types_and_undrivable_configurations_are_rejected(sd):
    with pytest.raises(ValueError, match="prediction_type"):
        attach(sd, APG(3.0), prediction_type="noise")
    original = sd.scheduler
    sd.scheduler = DDIMScheduler.from_config(original.config, prediction_type="velocity")
    try:
        with pytest.raises(ValueError, match="prediction_type"):
            attach(sd, APG(3.0))  # acts on x0: must know what the model predicts
        with attach(sd, CFG(3.0)):  # acts on the raw prediction: no conversion needed
            pass
    finally:
        sd.scheduler = original
    stub = types.SimpleNamespace(
        unet=sd.unet, scheduler=types.SimpleNamespace(config={"prediction_type": "epsilon"})
    )
    with pytest.raises(ValueError, match="exposes neither `sigmas` nor `alphas_cumprod`"):
        attach(stub, APG(3.0))
    with pytest.raises(ValueError, match="cfgpp"):
        attach(sd, APG(0.5), mode="cfgpp")
    with pytest.raises(ValueError, match="mode"):
        attach(sd, CFG(3.0), mode="cfg++")
    with pytest.raises(ValueError, match="order"):
        attach(sd, CFG(3.0), order="first")
    with pytest.raises(ValueError, match="negative"):
        attach(sd, PerpNeg(3.0))
    with pytest.raises(TypeError, match="adaptive"):
        attach(sd, CFG(3.0), adaptive=0.99)
    with pytest.raises(TypeError, match="guider"):
        attach(sd, "cfg")
    with pytest.raises(TypeError, match="guider"):
        attach(sd, True)
    with pytest.raises(TypeError, match="denoiser"):
        attach(sd, CFG(3.0), denoiser=0)
    with pytest.raises(ValueError, match="denoiser"):
        attach(sd, CFG(3.0), denoiser="prior")
    with attach(sd, CFG(3.0)):
        with pytest.raises(ValueError, match="already has guidance attached"):
            attach(sd, CFG(3.0))
    assert getattr(sd, "_guidance_handle", None) is None


def test_sd3_skip_layer_guidance_calls_pass_through_silently():
    pipe = _pipe("sd3")
    with attach(pipe, CFG(3.0)) as handle, warnings.catch_warnings():
        warnings.simplefilter("error")
        run(
            pipe,
            BUILDERS["sd3"][1],
            guidance_scale=2.0,
            skip_guidance_layers=[0],
            skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0,
        )
    assert handle.stats.passthrough_rows > 0 and handle.stats.steps == STEPS


def test_noise_level_helper_matches_the_scheduler_conventions():
    assert schedule_sigma(NoiseLevel.flow_matching(0.25)) == 0.25
    assert schedule_sigma(NoiseLevel.ddpm(0.2)) == pytest.approx((0.8 / 0.2) ** 0.5)
    assert schedule_sigma(None) is None


def test_tiny_builders_give_the_same_weights_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = tiny_stable_diffusion()
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is where it was
    second = tiny_stable_diffusion()
    for (name, a), (_, b) in zip(first.unet.state_dict().items(), second.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    dit = tiny_dit(seed=1)
    assert not torch.equal(next(dit.transformer.parameters()), next(tiny_dit(seed=2).transformer.parameters()))
