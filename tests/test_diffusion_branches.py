"""Extra branches through attach: Perp-Neg's negative prompt, hooked (perturbed) and weaker-model evaluations.

References are hand-written denoiser wrappers that evaluate each branch in its own forward call
(no product code in them): the "separate" evaluator must equal them bit for bit (what a run
with one branch per device computes), the default "batched" evaluator within float32 noise.
Hooks must leave the model exactly as it was: processors, parameters and outputs, also after an
exception inside the forward.
"""

from __future__ import annotations

import functools
import inspect
import os

import pytest
import torch

from guidance import ops
from guidance.adaptive import AdaptiveGuidance
from guidance.branches import COND, UNCOND, Branch
from guidance.diffusion import (
    AttentionProcessors,
    ForwardHooks,
    SeparateEvaluator,
    attach,
    detach,
    prompt_inputs,
)
from guidance.diffusion.batch import DenoiserCall
from guidance.diffusion.testing import (
    tiny_dit,
    tiny_stable_diffusion,
    tiny_stable_diffusion_3,
    tiny_stable_diffusion_xl,
)
from guidance.guiders import CFG, Guider, PerpNeg

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = 2
PROMPTS = ["a cat", "dog"]
BATCH = 2 * len(PROMPTS)  # two images per prompt
PIPES = {
    "sd": (tiny_stable_diffusion, {"height": 16, "width": 16}, {}),
    "sdxl": (tiny_stable_diffusion_xl, {"height": 16, "width": 16}, {}),
    "sd3": (
        tiny_stable_diffusion_3,
        {"height": 8, "width": 8, "max_sequence_length": 4},
        {"max_sequence_length": 4},
    ),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _pipe(name: str):
    return PIPES[name][0]()


@pytest.fixture
def sd():
    pipe = _pipe("sd")
    yield pipe
    detach(pipe)


def run(pipe, extra, **kwargs):
    kwargs.setdefault("generator", [torch.Generator().manual_seed(i) for i in range(BATCH)])
    kwargs.setdefault("guidance_scale", 2.0)
    return pipe(
        PROMPTS, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="latent", **extra, **kwargs
    ).images


# ---------------------------------------------------------------- hand-written references


def _rows(value, rows, full):
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == full:
        return value[rows]
    if isinstance(value, dict):
        return {k: _rows(v, rows, full) for k, v in value.items()}
    return value


def _merge(kwargs, inputs, n):
    out = dict(kwargs)
    for key, value in inputs.items():
        if isinstance(value, dict):
            out[key] = _merge(out[key], value, n)
        else:
            out[key] = value.expand(n, *value.shape[1:]) if value.shape[0] == 1 else value
    return out


class Reference:
    """Replaces ``module.forward``: each branch in its own call, then ``combine(cond, uncond, **extras)``.

    ``extras`` maps a branch name to ``(inputs, model)``: inputs replaced on the conditional rows,
    and the network to run (``None``: the pipeline's).
    """

    def __init__(self, module, combine, extras=None, cond_first=False):
        self.module, self.combine, self.extras, self.cond_first = module, combine, extras or {}, cond_first

    def __enter__(self):
        self.original = self.module.forward
        self.module.forward = self
        return self

    def __exit__(self, *exc):
        del self.module.forward

    def __call__(self, *args, **kwargs):
        name = next(iter(inspect.signature(self.original).parameters))
        if name in kwargs:
            sample = kwargs.pop(name)
        else:
            sample, args = args[0], args[1:]
        full, half = sample.shape[0], sample.shape[0] // 2
        cond_rows, uncond_rows = (slice(0, half), slice(half, full))[:: 1 if self.cond_first else -1]

        def forward(rows, inputs=None, model=None):
            a = tuple(_rows(x, rows, full) for x in args)
            kw = _merge({k: _rows(v, rows, full) for k, v in kwargs.items()}, inputs or {}, half)
            kw[name] = sample[rows]
            out = (model or self.original)(*a, **kw) if not a else (model or self.original)(kw.pop(name), *a, **kw)
            self.kind = type(out)
            return out[0] if isinstance(out, tuple) else out.sample

        uncond, cond = forward(uncond_rows), forward(cond_rows)
        extras = {name: forward(cond_rows, inputs, model) for name, (inputs, model) in self.extras.items()}
        both = torch.cat([self.combine(cond, uncond, **extras)] * 2)
        return (both,) if issubclass(self.kind, tuple) else self.kind(sample=both)


# ---------------------------------------------------------------- Perp-Neg through attach


@pytest.mark.parametrize("name", list(PIPES))
def test_perp_neg_through_attach_matches_separate_forward_calls(name):
    pipe = _pipe(name)
    extra, encode = PIPES[name][1], PIPES[name][2]
    negative = prompt_inputs(pipe, "blur", **encode)
    module = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer

    def combine(cond, uncond, negative):
        return ops.perp_neg(cond, uncond, negative, 3.0, 1.5)

    with Reference(module, combine, {"negative": (negative, None)}):
        expected = run(pipe, extra)
    with attach(
        pipe, PerpNeg(3.0, 1.5), branch_inputs={"negative": negative}, evaluator="separate"
    ) as handle:
        separate = run(pipe, extra)
    assert torch.equal(separate, expected)
    assert handle.stats.branch_rows == {
        "uncond": BATCH * STEPS,
        "cond": BATCH * STEPS,
        "negative": BATCH * STEPS,
    }
    assert handle.stats.forward_calls == 3 * STEPS
    with attach(pipe, PerpNeg(3.0, 1.5), branch_inputs={"negative": negative}) as handle:
        batched = run(pipe, extra)
    assert handle.stats.forward_calls == STEPS  # [uncond, cond, negative] in one call
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)


def test_perp_neg_on_the_digits_pipeline_with_a_negative_class():
    digits = pytest.importorskip("guidance.models.digits")
    pipe = digits.load_digits_pipeline("ddim")
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    def sample():
        return pipe(
            [1, 7], guidance_scale=2.0, num_inference_steps=3, latents=latents, output_type="latent"
        ).images

    negative = {"class_labels": torch.tensor([4])}
    with Reference(
        pipe.unet,
        lambda c, u, negative: ops.perp_neg(c, u, negative, 3.0, 1.0),
        {"negative": (negative, None)},
    ):
        expected = sample()
    with attach(pipe, PerpNeg(3.0, 1.0), branch_inputs={"negative": negative}, evaluator="separate"):
        assert torch.equal(sample(), expected)
    with attach(pipe, PerpNeg(3.0, 1.0), branch_inputs={"negative": negative}) as handle:
        torch.testing.assert_close(sample(), expected, rtol=1e-5, atol=1e-5)
    assert handle.stats.evaluations == 3 * 2 * 3


def test_separate_evaluator_is_bit_identical_to_one_call_per_branch_and_close_to_the_batch(sd):
    extra = PIPES["sd"][1]
    with Reference(sd.unet, lambda c, u: ops.cfg(c, u, 4.0)):
        expected = run(sd, extra)
    with attach(sd, CFG(4.0), evaluator="separate") as handle:
        assert torch.equal(run(sd, extra), expected)
    assert handle.stats.forward_calls == 2 * STEPS
    batched = run(sd, extra, guidance_scale=4.0)  # the pipeline's own batched CFG
    torch.testing.assert_close(expected, batched, rtol=1e-5, atol=1e-6)


class RecordingEvaluator(SeparateEvaluator):
    def __init__(self):
        self.seen: list[list[tuple[str, int]]] = []

    def evaluate(self, requests):
        self.seen.append([(request.name, len(request)) for request in requests])
        return super().evaluate(requests)


def test_requests_come_in_the_pipeline_order_then_the_extra_branches(sd):
    recorder = RecordingEvaluator()
    negative = prompt_inputs(sd, "blur")
    with attach(sd, PerpNeg(3.0), branch_inputs={"negative": negative}, evaluator=recorder):
        run(sd, PIPES["sd"][1])
    assert recorder.seen == [[("uncond", BATCH), ("cond", BATCH), ("negative", BATCH)]] * STEPS
    dit, recorder = tiny_dit(), RecordingEvaluator()
    with attach(dit, CFG(3.0), evaluator=recorder):
        dit(class_labels=[1, 2], num_inference_steps=STEPS, output_type="latent", guidance_scale=2.0)
    assert recorder.seen == [[("cond", 2), ("uncond", 2)]] * STEPS


# ---------------------------------------------------------------- hooks


class ScaledOutput:
    """An attention processor wrapper: the original's output times ``factor`` on ``rows`` (all when None)."""

    def __init__(self, original, factor, rows=None, fail_at=None):
        self.original, self.factor, self.rows, self.fail_at = original, factor, rows, fail_at

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if self.fail_at is not None:
            raise RuntimeError("boom")
        out = self.original(attn, hidden_states, *args, **kwargs)
        if self.rows is None:
            return out * self.factor
        out = out.clone()
        out[self.rows] = out[self.rows] * self.factor
        return out


class PerturbedCFG(CFG):
    """``CFG + s (c - c_perturbed)``: a test stand-in for PAG-style guiders, the perturbed branch on ``steps``."""

    def __init__(self, scale, perturbed_scale, hook, steps=None):
        super().__init__(scale)
        self.perturbed_scale, self.hook, self.steps = perturbed_scale, hook, steps

    def branches(self, step, num_steps=None, sigma=None):
        own = (COND, UNCOND) if self.needs_uncond(step, num_steps, sigma) else (COND,)
        perturb = self.steps is None or step in self.steps
        return own + ((Branch("perturbed", hook=self.hook),) if perturb else ())

    def __call__(self, cond, uncond, *, step, num_steps=None, sigma=None, perturbed=None):
        guided = super().__call__(cond, uncond, step=step, num_steps=num_steps, sigma=sigma)
        return guided if perturbed is None else guided + self.perturbed_scale * (cond - perturbed)


def _processors(module):
    return {
        name: sub.get_processor() for name, sub in module.named_modules() if hasattr(sub, "set_processor")
    }


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_restored(module, processors, state):
    assert "forward" not in module.__dict__
    now = _processors(module)
    assert now.keys() == processors.keys() and all(now[k] is processors[k] for k in now)
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("per_row", [False, True])
def test_hooked_branch_matches_a_hand_written_perturbed_forward(sd, per_row):
    extra = PIPES["sd"][1]
    hook = AttentionProcessors(
        lambda name, original, rows: ScaledOutput(original, 0.5, rows), "*attn1", per_row=per_row
    )
    processors, state = _processors(sd.unet), _state(sd.unet)

    def perturbed_model(*args, **kwargs):  # the perturbed forward, processors swapped by hand
        for name, sub in sd.unet.named_modules():
            if name.endswith("attn1"):
                sub.set_processor(ScaledOutput(processors[name], 0.5))
        try:
            return ref.original(*args, **kwargs)
        finally:
            for name, sub in sd.unet.named_modules():
                if name in processors:
                    sub.set_processor(processors[name])

    def combine(c, u, perturbed):
        return ops.cfg(c, u, 3.0) + 2.0 * (c - perturbed)

    ref = Reference(sd.unet, combine, {"perturbed": ({}, lambda *a, **k: perturbed_model(*a, **k))})
    with ref:
        expected = run(sd, extra)
    _assert_restored(sd.unet, processors, state)
    with attach(sd, PerturbedCFG(3.0, 2.0, hook), evaluator="separate") as handle:
        assert torch.equal(run(sd, extra), expected)
    with attach(sd, PerturbedCFG(3.0, 2.0, hook)) as handle:
        batched = run(sd, extra)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    assert handle.stats.branch_rows["perturbed"] == BATCH * STEPS
    assert handle.stats.forward_calls == (1 if per_row else 2) * STEPS  # a per-row hook shares the call
    _assert_restored(sd.unet, processors, state)


def test_schedules_and_adaptive_guidance_skip_extra_branches(sd):
    extra = PIPES["sd"][1]
    hook = AttentionProcessors(
        lambda name, original, rows: ScaledOutput(original, 0.5, rows), "*attn1", per_row=True
    )
    with attach(sd, PerturbedCFG(3.0, 2.0, hook, steps={0})) as handle:
        run(sd, extra)
    assert handle.stats.branch_rows == {"uncond": BATCH * STEPS, "cond": BATCH * STEPS, "perturbed": BATCH}
    with attach(sd, PerturbedCFG(1.0, 2.0, hook)) as handle:  # CFG off: cond and perturbed only
        run(sd, extra)
    assert handle.stats.branch_rows == {"cond": BATCH * STEPS, "perturbed": BATCH * STEPS}
    assert handle.stats.uncond_skipped == BATCH * STEPS
    with attach(sd, PerturbedCFG(3.0, 2.0, hook), adaptive=AdaptiveGuidance(-1.0)) as handle:
        run(sd, extra)  # every sample retires after step 0: no uncond, no perturbed rows after it
    assert handle.stats.branch_rows == {"uncond": BATCH, "cond": BATCH * STEPS, "perturbed": BATCH}
    assert handle.stats.passed_at == [0] * BATCH


def test_a_hook_that_raises_leaves_the_model_exactly_as_it_was(sd):
    extra = PIPES["sd"][1]
    reference = run(sd, extra)
    processors, state = _processors(sd.unet), _state(sd.unet)
    failing = AttentionProcessors(
        lambda name, original, rows: ScaledOutput(original, 0.5, fail_at=0), "*attn1"
    )
    with pytest.raises(RuntimeError, match="boom"):
        with attach(sd, PerturbedCFG(3.0, 2.0, failing)):
            run(sd, extra)
    _assert_restored(sd.unet, processors, state)
    assert getattr(sd, "_guidance_handle", None) is None
    assert torch.equal(run(sd, extra), reference)  # forward bit-identical after detach


def test_forward_hooks_skip_blocks_and_are_removed():
    digits = pytest.importorskip("guidance.models.digits")
    pipe = digits.load_digits_pipeline("ddim")
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    skip = ForwardHooks(lambda name, module, args, output, rows: args[0], "mid_block.attentions.0")

    class SkipGuidance(CFG):
        def branches(self, step, num_steps=None, sigma=None):
            return (COND, UNCOND, Branch("skipped", hook=skip))

        def __call__(self, cond, uncond, *, step, num_steps=None, sigma=None, skipped=None):
            return super().__call__(cond, uncond, step=step) + 1.5 * (cond - skipped)

    with attach(pipe, SkipGuidance(2.0)) as handle:
        out = pipe(
            [1, 7], guidance_scale=2.0, num_inference_steps=3, latents=latents, output_type="latent"
        ).images
    assert bool(torch.isfinite(out).all()) and handle.stats.branch_rows["skipped"] == 2 * 3
    assert all(not m._forward_hooks for m in pipe.unet.modules())
    plain = pipe(
        [1, 7], guidance_scale=2.0, num_inference_steps=3, latents=latents, output_type="latent"
    ).images
    assert not torch.equal(out, plain)


# ---------------------------------------------------------------- a second (weaker) model


class WeakModelGuidance(Guider):
    """``weak + w (c - weak)`` with the weak model on the conditional inputs (AutoGuidance's form)."""

    def __init__(self, scale, weak):
        super().__init__(scale)
        self.weak = weak

    def branches(self, step, num_steps=None, sigma=None):
        on = self.scale_at(step, num_steps, sigma) != 1.0
        return (COND, Branch("weak", model=self.weak)) if on else (COND,)

    def __call__(self, cond, uncond, *, step, num_steps=None, sigma=None, weak=None):
        return cond if weak is None else ops.cfg(cond, weak, self.scale_at(step, num_steps, sigma))


def test_a_weaker_model_branch_runs_the_other_network(sd):
    extra = PIPES["sd"][1]
    weak = tiny_stable_diffusion(seed=1).unet
    with Reference(sd.unet, lambda c, u, weak: ops.cfg(c, weak, 2.5), {"weak": ({}, weak)}):
        expected = run(sd, extra)
    with attach(sd, WeakModelGuidance(2.5, weak)) as handle:
        assert torch.equal(run(sd, extra), expected)
    assert handle.stats.branch_rows == {"cond": BATCH * STEPS, "weak": BATCH * STEPS}
    assert handle.stats.forward_calls == 2 * STEPS and handle.stats.uncond_skipped == BATCH * STEPS


# ---------------------------------------------------------------- inputs and errors


def test_denoiser_call_views_select_replace_and_concatenate():
    def forward(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, txt_ids=None):
        return sample

    x = torch.arange(4.0).reshape(4, 1)
    kwargs = {
        "encoder_hidden_states": torch.arange(8.0).reshape(4, 2),
        "added_cond_kwargs": {"text_embeds": torch.arange(4.0).reshape(4, 1), "time_ids": torch.ones(4, 3)},
        "txt_ids": torch.zeros(4, 3),  # never per-sample
    }
    call = DenoiserCall(inspect.signature(forward), (x, torch.tensor(5)), kwargs, batch=4)
    whole = call.rows([0, 1, 2, 3])
    assert whole.materialize()[0] is call.args  # the pipeline's own call, untouched
    negative = call.rows([2, 3]).replace(
        {"added_cond_kwargs": {"text_embeds": torch.tensor([[9.0]])}}, torch.tensor([0, 1]), 2, "neg"
    )
    both = type(negative).concat([call.rows([0, 1]), negative])
    args, kw = both.materialize()
    assert args[0].flatten().tolist() == [0, 1, 2, 3] and int(args[1]) == 5
    assert kw["added_cond_kwargs"]["text_embeds"].flatten().tolist() == [0, 1, 9, 9]
    assert kw["added_cond_kwargs"]["time_ids"].shape == (4, 3) and kw["txt_ids"] is kwargs["txt_ids"]
    assert both.take(slice(2, 4)).materialize()[1]["encoder_hidden_states"].tolist() == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="no per-sample input"):
        call.rows([0]).replace({"txt_ids": torch.zeros(1, 3)}, torch.tensor([0]), 2, "x")
    with pytest.raises(ValueError, match="shaped"):
        call.rows([0]).replace({"encoder_hidden_states": torch.zeros(1, 3)}, torch.tensor([0]), 2, "x")


def test_bad_branch_configurations_are_rejected(sd):
    embeds = prompt_inputs(sd, "blur")["encoder_hidden_states"]
    cases = [
        (dict(guider=PerpNeg(3.0)), ValueError, "negative"),
        (dict(branch_inputs={"negative": {"encoder_hidden_state": embeds}}), ValueError, "has no argument"),
        (dict(branch_inputs={"cond": {"encoder_hidden_states": embeds}}), ValueError, "other than 'cond'"),
        (dict(branch_inputs={"negative": {"encoder_hidden_states": "blur"}}), TypeError, "must be a torch.Tensor"),
        (dict(branch_inputs=[("negative", embeds)]), TypeError, "branch_inputs"),
        (dict(evaluator="parallel"), ValueError, "evaluator"),
        (dict(evaluator=object()), TypeError, "evaluator"),
    ]
    for kwargs, error, match in cases:
        guider = kwargs.pop("guider", PerpNeg(3.0) if "branch_inputs" in kwargs else CFG(3.0))
        with pytest.raises(error, match=match):
            attach(sd, guider, **kwargs)
        assert getattr(sd, "_guidance_handle", None) is None
    with attach(sd, PerpNeg(3.0), branch_inputs={"negative": {"encoder_hidden_states": embeds[:, :3]}}):
        with pytest.raises(ValueError, match="shaped"):
            run(sd, PIPES["sd"][1])

    class SameAsCond(CFG):
        def branches(self, step, num_steps=None, sigma=None):
            return (COND, UNCOND, Branch("again"))

    with attach(sd, SameAsCond(3.0)):
        with pytest.raises(ValueError, match="conditional prediction again"):
            run(sd, PIPES["sd"][1])
    assert "forward" not in sd.unet.__dict__
