"""The shipped digits diffusion model, its pipeline and its judge (fast: no training)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("sklearn")

from guidance.models.digits import (  # noqa: E402
    NULL_CLASS,
    NUM_CLASSES,
    WEIGHTS_DIR,
    DigitsPipeline,
    load_digits_pipeline,
    load_digits_split,
    to_unit_range,
)
from guidance.models.digits_judge import (  # noqa: E402
    frechet_distance,
    load_digits_judge,
    mean_pairwise_distance,
)

# Measured on the shipped judge: 0.989 (355 of 359 held-out digits). The bound leaves room for
# BLAS differences across machines, not for a worse model.
JUDGE_HELDOUT_ACCURACY_BOUND = 0.97


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    return load_digits_pipeline("ddim")


@pytest.fixture(scope="module")
def judge():
    return load_digits_judge()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shipped_files_are_safetensors_and_small():
    for name in ("digits_unet.safetensors", "digits_judge.safetensors"):
        path = WEIGHTS_DIR / name
        assert path.exists()
        assert path.stat().st_size < 8 * 2**20
        with open(path, "rb") as f:  # safetensors: 8-byte header length, then a JSON header
            header_len = int.from_bytes(f.read(8), "little")
            assert json.loads(f.read(header_len))
    config = json.loads((WEIGHTS_DIR / "digits_unet_config.json").read_text())
    assert config["num_class_embeds"] == NUM_CLASSES + 1
    scheduler = json.loads((WEIGHTS_DIR / "digits_scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"


def test_split_is_fixed_disjoint_and_stratified():
    train_x, train_y = load_digits_split("train")
    test_x, test_y = load_digits_split("heldout")
    assert train_x.shape == (1438, 1, 8, 8) and test_x.shape == (359, 1, 8, 8)
    assert float(train_x.min()) == -1.0 and float(train_x.max()) == 1.0
    assert torch.bincount(test_y, minlength=10).min() >= 35
    train_rows = {tuple(r) for r in train_x.flatten(1).tolist()}
    assert not any(tuple(r) in train_rows for r in test_x.flatten(1).tolist())  # no image in both splits
    again_x, _ = load_digits_split("heldout")
    assert torch.equal(test_x, again_x)
    with pytest.raises(ValueError, match="split"):
        load_digits_split("test")


def test_output_types_shapes_and_ranges(pipe):
    kwargs = {"num_images_per_prompt": 2, "num_inference_steps": 4, "guidance_scale": 2.0}
    np_out = pipe([0, 5], generator=_gen(), output_type="np", **kwargs).images
    assert isinstance(np_out, np.ndarray) and np_out.shape == (4, 8, 8, 1)
    assert np_out.min() >= 0.0 and np_out.max() <= 1.0
    pt_out = pipe([0, 5], generator=_gen(), output_type="pt", **kwargs).images
    assert pt_out.shape == (4, 1, 8, 8)
    np.testing.assert_array_equal(pt_out.permute(0, 2, 3, 1).numpy(), np_out)
    pil_out = pipe([0, 5], generator=_gen(), output_type="pil", **kwargs).images
    assert len(pil_out) == 4 and pil_out[0].size == (8, 8) and pil_out[0].mode == "L"
    latent = pipe([0, 5], generator=_gen(), output_type="latent", **kwargs).images
    assert torch.isfinite(latent).all()
    torch.testing.assert_close(to_unit_range(latent), pt_out, rtol=0, atol=0)
    (tuple_out,) = pipe(3, generator=_gen(), num_inference_steps=2, return_dict=False)
    assert tuple_out.shape == (1, 8, 8, 1)


def test_generator_makes_sampling_deterministic(pipe):
    a = pipe(
        [1, 2, 3], guidance_scale=3.0, num_inference_steps=5, generator=_gen(7), output_type="latent"
    ).images
    b = pipe(
        [1, 2, 3], guidance_scale=3.0, num_inference_steps=5, generator=_gen(7), output_type="latent"
    ).images
    c = pipe(
        [1, 2, 3], guidance_scale=3.0, num_inference_steps=5, generator=_gen(8), output_type="latent"
    ).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def _manual_sampling(pipe, labels, latents, steps, scale):
    """The sampling loop written out with the raw UNet and scheduler (what diffusers' pipelines do)."""
    from guidance.ops import cfg

    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    x = latents.clone()
    for t in scheduler.timesteps:
        if scale == 1.0:
            eps = pipe.unet(x, t, class_labels=labels).sample
        else:
            both = pipe.unet(
                torch.cat([x, x]), t, class_labels=torch.cat([torch.full_like(labels, NULL_CLASS), labels])
            ).sample
            uncond, cond = both.chunk(2)
            eps = cfg(cond, uncond, scale)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_pipeline_equals_the_plain_loop(pipe, scale):
    labels = torch.tensor([0, 4, 9])
    latents = torch.randn((3, 1, 8, 8), generator=_gen(3))
    out = pipe(
        labels, guidance_scale=scale, num_inference_steps=6, latents=latents, output_type="latent"
    ).images
    assert torch.equal(out, _manual_sampling(pipe, labels, latents, 6, scale))


def test_guidance_off_is_the_conditional_model(pipe):
    """At scale 1 the pipeline never evaluates the null class: one UNet row per image per step."""
    calls = []
    original = pipe.unet.forward

    def spy(sample, *args, **kwargs):
        calls.append((sample.shape[0], kwargs["class_labels"].clone()))
        return original(sample, *args, **kwargs)

    pipe.unet.forward = spy
    try:
        pipe([2, 3], guidance_scale=1.0, num_inference_steps=3, generator=_gen())
        pipe([2, 3], guidance_scale=2.0, num_inference_steps=3, generator=_gen())
    finally:
        del pipe.unet.forward
    assert [n for n, _ in calls] == [2, 2, 2, 4, 4, 4]
    assert all(NULL_CLASS not in lab for _, lab in calls[:3])
    assert calls[3][1].tolist() == [NULL_CLASS, NULL_CLASS, 2, 3]


def test_attach_drives_the_digits_pipeline(pipe):
    from guidance.diffusion import attach
    from guidance.guiders import CFG

    labels, latents = [1, 7], torch.randn((2, 1, 8, 8), generator=_gen(5))
    own = pipe(
        labels, guidance_scale=3.0, num_inference_steps=5, latents=latents, output_type="latent"
    ).images
    plain = pipe(
        labels, guidance_scale=1.0, num_inference_steps=5, latents=latents, output_type="latent"
    ).images
    with attach(pipe, CFG(3.0)) as handle:
        guided = pipe(
            labels, guidance_scale=2.0, num_inference_steps=5, latents=latents, output_type="latent"
        ).images
        assert handle.stats.evaluations == 2 * 2 * 5
    with attach(pipe, CFG(1.0)) as handle:
        off = pipe(
            labels, guidance_scale=2.0, num_inference_steps=5, latents=latents, output_type="latent"
        ).images
        assert handle.stats.evaluations == 2 * 5
    assert torch.equal(guided, own)
    assert torch.equal(off, plain)


class RecordingCallback:
    """A step callback that records what it receives and replaces the latents at one step."""

    def __init__(self, replace_at: int):
        self.replace_at = replace_at
        self.seen: list[tuple[int, float, tuple[int, ...]]] = []

    def __call__(self, pipeline, step, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        self.seen.append((step, float(timestep), tuple(latents.shape)))
        if step == self.replace_at:
            return {"latents": torch.zeros_like(latents)}
        return callback_kwargs


def test_step_callback_receives_the_latents_and_can_replace_them(pipe):
    callback = RecordingCallback(replace_at=2)
    images = pipe(
        [1, 7],
        guidance_scale=2.0,
        num_inference_steps=3,
        generator=_gen(),
        output_type="latent",
        callback_on_step_end=callback,
    ).images
    timesteps = pipe.scheduler.timesteps.tolist()
    assert callback.seen == [(i, float(t), (2, 1, 8, 8)) for i, t in enumerate(timesteps)]
    assert torch.equal(images, torch.zeros_like(images))  # the last step's replacement is the output
    untouched = RecordingCallback(replace_at=-1)
    with_callback = pipe(
        [1, 7],
        guidance_scale=2.0,
        num_inference_steps=3,
        generator=_gen(),
        output_type="latent",
        callback_on_step_end=untouched,
    ).images
    without = pipe(
        [1, 7], guidance_scale=2.0, num_inference_steps=3, generator=_gen(), output_type="latent"
    ).images
    assert torch.equal(with_callback, without)


def test_other_schedulers_sample(pipe):
    for kind in ("dpm", "euler"):
        other = load_digits_pipeline(kind)
        out = other(
            [3, 8], guidance_scale=2.0, num_inference_steps=8, generator=_gen(), output_type="latent"
        ).images
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
        assert float(out.abs().max()) < 4.0
    with pytest.raises(ValueError, match="kind"):
        load_digits_pipeline("heun")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"class_labels": [10]}, "class_labels"),
        ({"class_labels": [-1]}, "class_labels"),
        ({"class_labels": [1.5]}, "class_labels"),
        ({"class_labels": []}, "class_labels"),
        ({"class_labels": [1], "num_inference_steps": 0}, "num_inference_steps"),
        ({"class_labels": [1], "guidance_scale": float("nan")}, "guidance_scale"),
        ({"class_labels": [1], "output_type": "jpeg"}, "output_type"),
        ({"class_labels": [1], "num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"class_labels": [1], "latents": torch.zeros(2, 1, 8, 8)}, "latents"),
    ],
)
def test_bad_input_is_rejected_before_work(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_judge_heldout_accuracy(judge):
    images, labels = load_digits_split("heldout")
    accuracy = float((judge.predict(to_unit_range(images)) == labels).float().mean())
    assert accuracy >= JUDGE_HELDOUT_ACCURACY_BOUND
    assert judge.features(to_unit_range(images[:4])).shape == (4, 64)
    with pytest.raises(ValueError, match="images"):
        judge.features(torch.zeros(2, 8, 8))


def test_frechet_distance_and_diversity_measures():
    gen = _gen(0)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    assert frechet_distance(a, a) < 1e-8
    # Same covariance, mean shifted by (2, 0, 0): FD -> 4 (plus sampling noise).
    shifted = b + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    assert abs(frechet_distance(a, shifted) - 4.0) < 0.15
    # Scaled by 2: FD = sum (2 - 1)^2 over 3 unit-variance dims = 3.
    assert abs(frechet_distance(a, 2 * b) - 3.0) < 0.2
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(pts) == pytest.approx((5 + 5 + 0) / 3)
    with pytest.raises(ValueError):
        frechet_distance(a, torch.randn(10, 4))


# Measured on the shipped model (20 per class, 6 DDIM steps), seeds 0..3: unguided accuracy
# 0.975 / 0.975 / 0.975 / 0.985 and mean log-probability of the requested class -0.087 / -0.222 /
# -0.061 / -0.053; at w = 3 always 1.0 and > -0.001. The test uses seed 0.
CFG_TEST_SCALE = 3.0


def test_cfg_raises_judge_accuracy_for_the_requested_class(pipe, judge):
    labels = torch.arange(NUM_CLASSES).repeat_interleave(20)
    latents = torch.randn((len(labels), 1, 8, 8), generator=_gen(0))

    def judged(scale: float) -> tuple[float, float]:
        images = pipe(
            labels, guidance_scale=scale, num_inference_steps=6, latents=latents, output_type="pt"
        ).images
        with torch.no_grad():
            log_probs = judge(images).log_softmax(-1)[torch.arange(len(labels)), labels]
        return float((judge.predict(images) == labels).float().mean()), float(log_probs.mean())

    (acc_off, logp_off), (acc_on, logp_on) = judged(1.0), judged(CFG_TEST_SCALE)
    assert acc_off <= 0.99, acc_off  # the unguided model does make mistakes
    assert acc_on >= 0.995 and acc_on >= acc_off + 0.01, (acc_off, acc_on)
    assert logp_on >= logp_off + 0.03, (logp_off, logp_on)
