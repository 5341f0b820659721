"""The embedded image model: a small class-conditional diffusion model of handwritten digits.

The data are scikit-learn's bundled digits (``sklearn.datasets.load_digits``: 1,797 grey
images of 8x8 pixels, values 0..16, 10 classes), the one image data set available offline.
The model is a diffusers :class:`~diffusers.UNet2DModel` (about 1.1M parameters) with a
class embedding of 11 entries: the digits 0..9 and a null class (index 10) that training
substitutes for the label 15% of the time, so one network gives both the conditional and
the unconditional prediction that classifier-free guidance needs.

Conventions:

* Pixel space: ``x = 2 * value / 16 - 1``, so the data range is ``[-1, 1]`` (background
  is exactly ``-1``). Images leave the pipeline in ``[0, 1]`` (``output_type`` "np", "pt",
  "pil") or unclipped in model space (``output_type="latent"``), which is what a
  saturation measure needs.
* Prediction type: noise (``epsilon``), trained on 1,000 steps of the cosine
  (``squaredcos_cap_v2``) schedule. The shipped sampler is DDIM (``eta=0``, no clipping,
  "leading" timestep spacing); DPM-Solver++ and Euler are available from the same config.

:class:`DigitsPipeline` follows the classic diffusers CFG pattern (``[uncond, cond]``
batch, ``noise_uncond + guidance_scale * (noise_cond - noise_uncond)``), so the
project's :func:`guidance.diffusion.attach` works on it as on Stable Diffusion.

Example:
    >>> import torch
    >>> from guidance.models.digits import load_digits_pipeline
    >>> pipe = load_digits_pipeline()
    >>> out = pipe([3, 7], guidance_scale=3.0, num_inference_steps=10,
    ...            generator=torch.Generator().manual_seed(0), output_type="pt")
    >>> tuple(out.images.shape)
    (2, 1, 8, 8)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from guidance.validation import check_choice, check_finite, check_int, check_range

__all__ = [
    "NUM_CLASSES",
    "NULL_CLASS",
    "IMAGE_SIZE",
    "WEIGHTS_DIR",
    "DigitsPipeline",
    "digits_unet_config",
    "digits_scheduler_config",
    "build_digits_unet",
    "load_digits_unet",
    "load_unet",
    "load_digits_scheduler",
    "load_digits_pipeline",
    "load_digits_split",
    "to_model_space",
    "to_unit_range",
]

NUM_CLASSES = 10
NULL_CLASS = 10  # the class-embedding index that means "no label" (unconditional)
IMAGE_SIZE = 8
MAX_PIXEL_VALUE = 16.0  # sklearn's digits take integer values 0..16
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_WEIGHTS = "digits_unet.safetensors"
UNET_CONFIG = "digits_unet_config.json"
SCHEDULER_CONFIG = "digits_scheduler_config.json"

_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def digits_unet_config() -> dict[str, Any]:
    """The UNet2DModel configuration of the shipped model (8x8 -> 4x4 -> 2x2, attention at 2x2)."""
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 16,
        "attention_head_dim": 32,
        "num_class_embeds": NUM_CLASSES + 1,
    }


def digits_scheduler_config() -> dict[str, Any]:
    """The training noise schedule, shared by every sampler built from it."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "set_alpha_to_one": True,
    }


def build_digits_unet(seed: int | None = None) -> UNet2DModel:
    """A randomly initialised UNet with the shipped architecture (``seed`` makes the init reproducible)."""
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DModel(**digits_unet_config())


def load_unet(
    weights_dir: str | Path | None, weights_name: str, config_name: str, default_config: dict[str, Any], trainer: str
) -> UNet2DModel:
    """A trained digits UNet from ``weights_dir`` (default: the shipped weights) in float32 and eval mode.

    Weights are read from safetensors (no pickle); the config from ``config_name`` there, else
    ``default_config``. A missing weights file raises ``FileNotFoundError`` naming ``trainer``,
    the module that trains it.
    """
    from safetensors.torch import load_file

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    weights = folder / weights_name
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing; train it with `python -m {trainer}`.")
    config_path = folder / config_name
    config = json.loads(config_path.read_text()) if config_path.exists() else default_config
    unet = UNet2DModel(**config)
    unet.load_state_dict(load_file(str(weights)), strict=True)
    return unet.eval().requires_grad_(False)


def load_digits_unet(weights_dir: str | Path | None = None) -> UNet2DModel:
    """The trained UNet, read from safetensors (no pickle), in float32 and eval mode."""
    return load_unet(weights_dir, UNET_WEIGHTS, UNET_CONFIG, digits_unet_config(), "guidance.models.digits_train")


def load_digits_scheduler(kind: str = "ddim", weights_dir: str | Path | None = None, **overrides: Any):
    """A sampler for the shipped model: ``kind`` is "ddim" (default), "dpm" (DPM-Solver++ 2M) or "euler".

    Keyword ``overrides`` replace entries of the shipped scheduler config.
    """
    check_choice(kind, "kind", sorted(_SCHEDULERS))
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    config_path = folder / SCHEDULER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.exists() else digits_scheduler_config()
    config.update(overrides)
    return _SCHEDULERS[kind].from_config(config)


def load_digits_pipeline(
    scheduler: str = "ddim", weights_dir: str | Path | None = None, **scheduler_overrides: Any
) -> DigitsPipeline:
    """The shipped digits model as a :class:`DigitsPipeline` on the CPU, ready to sample.

    Example:
        >>> from guidance.models.digits import load_digits_pipeline
        >>> pipe = load_digits_pipeline("euler")
        >>> type(pipe.scheduler).__name__
        'EulerDiscreteScheduler'
    """
    unet = load_digits_unet(weights_dir)
    sched = load_digits_scheduler(scheduler, weights_dir, **scheduler_overrides)
    pipe = DigitsPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_model_space(pixels: np.ndarray | Tensor) -> Tensor:
    """sklearn digit values (0..16) to the model's ``[-1, 1]`` space."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
    return x * (2.0 / MAX_PIXEL_VALUE) - 1.0


def to_unit_range(samples: Tensor) -> Tensor:
    """Model space to displayable ``[0, 1]``, clipping what falls outside the data range."""
    return (samples / 2 + 0.5).clamp(0, 1)


def load_digits_split(split: str) -> tuple[Tensor, Tensor]:
    """The fixed train / held-out split: ``(images (N, 1, 8, 8) in [-1, 1], labels (N,) int64)``.

    ``split`` is "train" (1,438 images) or "heldout" (359 images, 20% of each class chosen
    with a fixed seed, independent of the scikit-learn version). Needs scikit-learn.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"`split` must be 'train' or 'heldout', got {split!r}.")
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = data.images.astype(np.float32), data.target.astype(np.int64)
    rng = np.random.RandomState(SPLIT_SEED)
    heldout = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        count = int(round(HELD_OUT_FRACTION * len(members)))
        heldout[rng.permutation(members)[:count]] = True
    keep = heldout if split == "heldout" else ~heldout
    x = to_model_space(images[keep]).unsqueeze(1)
    return x, torch.from_numpy(labels[keep])


def _as_label_tensor(class_labels: int | Sequence[int] | Tensor) -> Tensor:
    if isinstance(class_labels, Tensor):
        labels = class_labels.detach().to("cpu").reshape(-1)
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(
                f"`class_labels` must be integers in [0, {NUM_CLASSES - 1}], got dtype {labels.dtype}."
            )
        labels = labels.long()
    else:
        values = [class_labels] if isinstance(class_labels, (int, np.integer)) else list(class_labels)
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise ValueError(
                f"`class_labels` must be integers in [0, {NUM_CLASSES - 1}], got {class_labels!r}."
            )
        labels = torch.tensor([int(v) for v in values], dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError("`class_labels` must name at least one class.")
    if bool((labels < 0).any()) or bool((labels >= NUM_CLASSES).any()):
        raise ValueError(f"`class_labels` must be integers in [0, {NUM_CLASSES - 1}], got {labels.tolist()}.")
    return labels


class DigitsPipeline(DiffusionPipeline):
    """Class labels in, 8x8 digit images out, with classic classifier-free guidance.

    When ``guidance_scale > 1`` each step runs the UNet once on the batch
    ``torch.cat([latents] * 2)`` with ``class_labels = cat([null_labels, labels])`` and
    combines ``noise_uncond + guidance_scale * (noise_cond - noise_uncond)`` (the scale
    convention of :mod:`guidance.ops`); otherwise it runs the conditional batch alone.
    That is the Stable Diffusion pattern, so :func:`guidance.diffusion.attach` and diffusers
    step callbacks (``callback_on_step_end`` may change ``pipe._guidance_scale``) work here.

    Args:
        unet: a class-conditional :class:`~diffusers.UNet2DModel` whose class embedding has
            ``null_class_label + 1`` entries.
        scheduler: any diffusers scheduler built from the model's noise schedule.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]
    null_class_label = NULL_CLASS

    def __init__(self, unet: UNet2DModel, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._interrupt = False

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def check_inputs(
        self,
        guidance_scale: float,
        num_inference_steps: int,
        num_images_per_prompt: int,
        output_type: str,
        eta: float,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> None:
        check_finite(guidance_scale, "guidance_scale")
        check_int(num_inference_steps, "num_inference_steps", 1, self.scheduler.config.num_train_timesteps)
        check_int(num_images_per_prompt, "num_images_per_prompt", minimum=1)
        check_choice(output_type, "output_type", ("np", "pt", "pil", "latent"))
        check_range(eta, "eta", 0.0, 1.0)
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got {unknown}."
                )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | Tensor,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per label (times ``num_images_per_prompt``).

        Args:
            class_labels: digits to draw, an int, a list of ints or an integer tensor in ``[0, 9]``.
            num_images_per_prompt: samples per label; labels are repeated in place
                (``[3, 7]`` with 2 per label draws ``3, 3, 7, 7``).
            guidance_scale: ``w`` in ``u + w (c - u)``; ``1`` (default) is the plain
                conditional model with no unconditional evaluation.
            num_inference_steps: sampling steps.
            generator: a torch generator (or one per image) for the initial noise.
            latents: initial noise of shape ``(B, 1, 8, 8)`` instead of drawing it.
            eta: DDIM's stochasticity (ignored by other schedulers).
            output_type: "np" (``(B, 8, 8, 1)`` float in ``[0, 1]``), "pt" (``(B, 1, 8, 8)`` in
                ``[0, 1]``), "pil" (8x8 greyscale images) or "latent" (unclipped model space,
                data range ``[-1, 1]``).
            return_dict: return an ``ImagePipelineOutput`` (default) or a tuple ``(images,)``.
            callback_on_step_end: diffusers step callback ``fn(pipe, step, timestep, kwargs) -> dict``
                (or a ``PipelineCallback``), called after every step; a ``"latents"`` entry in
                what it returns replaces the latents.
            callback_on_step_end_tensor_inputs: tensors passed to the callback in ``kwargs``;
                only ``"latents"`` is available.
        """
        self.check_inputs(
            guidance_scale,
            num_inference_steps,
            num_images_per_prompt,
            output_type,
            eta,
            callback_on_step_end_tensor_inputs,
        )
        device = self._execution_device
        labels = _as_label_tensor(class_labels).repeat_interleave(num_images_per_prompt).to(device)
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        latents = self._initial_latents(labels.shape[0], generator, latents, device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs: dict[str, Any] = {}
        if isinstance(self.scheduler, DDIMScheduler):
            step_kwargs = {"eta": eta, "generator": generator}

        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            latents = self._denoise_step(latents, t, labels, step_kwargs)
            if callback_on_step_end is not None:
                available = {"latents": latents}
                callback_kwargs = {k: available[k] for k in (callback_on_step_end_tensor_inputs or ())}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)

        self.maybe_free_model_hooks()
        images = self._postprocess(latents, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _initial_latents(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: Tensor | None,
        device: torch.device,
    ) -> Tensor:
        shape = (
            batch_size,
            self.unet.config.in_channels,
            self.unet.config.sample_size,
            self.unet.config.sample_size,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators; expected one per image ({batch_size})."
            )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        return latents.to(device=device, dtype=self.unet.dtype)

    def _denoise_step(self, latents: Tensor, t: Tensor, labels: Tensor, step_kwargs: dict[str, Any]) -> Tensor:
        """One step: the UNet on ``[uncond, cond]`` (with guidance) or ``cond``, CFG, the scheduler update."""
        if self.do_classifier_free_guidance:
            latent_model_input = torch.cat([latents] * 2)
            input_labels = torch.cat([torch.full_like(labels, self.null_class_label), labels])
        else:
            latent_model_input = latents
            input_labels = labels
        latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
        noise_pred = self.unet(latent_model_input, t, class_labels=input_labels).sample
        if self.do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_cond - noise_pred_uncond)
        return self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

    @staticmethod
    def _postprocess(latents: Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = to_unit_range(latents.float())
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        from PIL import Image

        return [Image.fromarray((a[..., 0] * 255).round().astype(np.uint8)) for a in array]
