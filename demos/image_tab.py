"""The Image tab: the class-conditional digits diffusion model, one column of samples per scale.

Every column starts from the same initial noise; the table shows the network evaluations each
used (CFG, APG, guidance rescale, CFG-Zero*, CFG++; schedules; adaptive guidance).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from demos.common import (
    LIMITS,
    SCHEDULES,
    choice,
    describe_schedule,
    make_schedule,
    number,
    page_errors,
    toggle_visible,
)
from demos.models import ModelStore

if TYPE_CHECKING:
    import torch

    from guidance.schedules import Schedule

__all__ = [
    "DEFAULT_LAMBDAS",
    "DEFAULT_SCALES",
    "IMAGE_METHODS",
    "TABLE_HEADERS",
    "DigitsColumn",
    "DigitsRequest",
    "build_image_tab",
    "make_guider",
    "parse_scales",
    "render_grid",
    "sample_columns",
    "sample_digits",
    "scales_for_method",
]


def _guider_factories() -> dict[str, Callable[[float | Schedule], Any]]:
    """Method name -> guider built from a schedule (imported on first use: the page loads without them)."""
    from guidance import guiders as g

    return {
        "CFG": g.CFG,
        "APG": lambda s: g.APG(s, eta=0.0, convention="paper"),
        "Rescaled CFG": lambda s: g.RescaledCFG(s, rescale=0.7),
        "CFG-Zero*": g.CFGZeroStar,
        "CFG++": g.CFG,  # a plain CFG carrying lambda; attach(mode="cfgpp") does the rest
        "TCFG": g.TangentialCFG,
        "MAMBO-G": lambda s: g.MagnitudeAware(s, alpha=8.0),
        "APG-mix": lambda s: g.APGMix(s, apg_scale=s, momentum=-0.5, norm_threshold=10.0, apg_start_step=5),
        "CFGNorm": lambda s: g.CFGNorm(s, strength=1.0),
        "CFG-Renorm": lambda s: g.RenormCFG(s, renorm=1.0, trunc=1.0),
        "Mahiro": g.SimilarityAdaptive,
        "FreSca": lambda s: g.FreSca(s, scale_low=1.0, scale_high=1.25, freq_cutoff=2),
        # perturbation guidance on top of CFG: a third, perturbed evaluation batched with the other two
        "CFG + PAG": lambda s: g.PerturbedAttention(s, perturbed_scale=1.0, layers="mid"),
        "CFG + SEG": lambda s: g.SmoothedEnergy(s, perturbed_scale=1.0, layers="mid"),
    }


IMAGE_METHODS = (
    "CFG",
    "APG",
    "Rescaled CFG",
    "CFG-Zero*",
    "CFG++",
    "TCFG",
    "MAMBO-G",
    "APG-mix",
    "CFGNorm",
    "CFG-Renorm",
    "Mahiro",
    "FreSca",
    "CFG + PAG",
    "CFG + SEG",
)
DEFAULT_SCALES = "1, 2, 3, 5"
DEFAULT_LAMBDAS = "0.2, 0.4, 0.6, 0.8"  # CFG++'s scale is lambda in [0, 1]
# Any value > 1 makes the pipeline batch [uncond, cond]; the attached guider sets the real scale.
PIPELINE_CFG_SCALE = 2.0
TABLE_HEADERS = [
    "scale",
    "network evaluations",
    "per image",
    "retired early (adaptive)",
    "judged correct",
    "seconds",
]


def parse_scales(text: Any, method: str) -> list[float]:
    """Comma- or space-separated scales; CFG++ scales are its lambda in ``[0, 1]``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("Scales is empty: give one or more numbers, e.g. 1, 2, 3, 5.")
    high = 1.0 if method == "CFG++" else LIMITS.image_scale
    name = "CFG++ scales (lambda)" if method == "CFG++" else "Scales"
    scales = []
    for item in text.replace(",", " ").split():
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not a number.") from None
        scales.append(float(number(value, name, 0.0, high)))
    if len(scales) > LIMITS.image_scales:
        raise ValueError(f"{name}: at most {LIMITS.image_scales} scales, got {len(scales)}.")
    return scales


def make_guider(method: str, schedule: float | Schedule) -> Any:
    """The guider of ``method`` (one of ``IMAGE_METHODS``) with ``schedule``."""
    choice(method, "Method", IMAGE_METHODS)
    return _guider_factories()[method](schedule)


@dataclass(frozen=True)
class DigitsRequest:
    """A validated image-tab request; build it with :meth:`from_inputs` (the controls' values, bounded by ``LIMITS``)."""

    digit: int
    method: str
    scales: tuple[float, ...]
    schedule: str
    ramp_start: float
    adaptive: bool
    threshold: float
    min_steps: int
    samples: int
    steps: int
    seed: int

    @classmethod
    def from_inputs(
        cls,
        digit: Any,
        method: Any,
        scales: Any,
        schedule: Any,
        ramp_start: Any,
        adaptive: Any,
        threshold: Any,
        min_steps: Any,
        samples: Any,
        steps: Any,
        seed: Any,
    ) -> DigitsRequest:
        """Check the controls' values in the order of the page; a ValueError names the first bad one."""
        method = choice(method, "Method", IMAGE_METHODS)
        cfgpp = method == "CFG++"
        ramp_name = "Ramp start" + (" (CFG++ lambda)" if cfgpp else "")
        return cls(
            digit=int(number(digit, "Digit", 0, 9, integer=True)),
            method=method,
            scales=tuple(parse_scales(scales, method)),
            schedule=choice(schedule, "Schedule", SCHEDULES),
            ramp_start=float(number(ramp_start, ramp_name, 0.0, 1.0 if cfgpp else LIMITS.image_scale)),
            adaptive=bool(adaptive),
            threshold=float(number(threshold, "Adaptive threshold", -1.0, 1.0)),
            min_steps=int(
                number(min_steps, "Guided steps before adaptive", 0, LIMITS.diffusion_steps, integer=True)
            ),
            samples=int(number(samples, "Samples per scale", 1, LIMITS.samples_per_scale, integer=True)),
            steps=int(number(steps, "Steps", 1, LIMITS.diffusion_steps, integer=True)),
            seed=int(number(seed, "Seed", 0, LIMITS.seed, integer=True)),
        )

    @property
    def symbol(self) -> str:
        """The scale's symbol in labels: CFG++'s lambda or the CFG scale w."""
        return "λ" if self.method == "CFG++" else "w"

    def label(self, scale: float) -> str:
        return describe_schedule(self.schedule, scale, self.ramp_start, self.symbol)


@dataclass
class DigitsColumn:
    """The samples of one guidance scale and what they cost."""

    scale: float
    images: torch.Tensor  # (N, 1, 8, 8) in [0, 1]
    evaluations: int  # UNet rows evaluated (one row = one network evaluation of one sample)
    retired: int  # samples that adaptive guidance took off the unconditional branch
    correct: int | None  # samples the judge classifies as the requested digit (None: no judge)
    seconds: float


def _sample_column(
    pipe: Any, judge: Any, request: DigitsRequest, scale: float, noise: torch.Tensor
) -> DigitsColumn:
    import torch

    from guidance.adaptive import AdaptiveGuidance
    from guidance.diffusion import attach
    from guidance.models.digits import to_unit_range

    guider = make_guider(request.method, make_schedule(request.schedule, scale, request.ramp_start))
    policy = AdaptiveGuidance(request.threshold, min_steps=request.min_steps) if request.adaptive else None
    start = time.perf_counter()
    with attach(
        pipe, guider, adaptive=policy, mode="cfgpp" if request.method == "CFG++" else "guide"
    ) as handle:
        latents = pipe(
            [request.digit] * request.samples,
            guidance_scale=PIPELINE_CFG_SCALE,
            num_inference_steps=request.steps,
            latents=noise.clone(),
            output_type="latent",
        ).images
    images = to_unit_range(latents.float())
    correct = None
    if judge is not None:
        with torch.no_grad():
            correct = int((judge.predict(images) == request.digit).sum())
    return DigitsColumn(
        scale=scale,
        images=images,
        evaluations=handle.stats.evaluations,
        retired=sum(step is not None for step in handle.stats.passed_at),
        correct=correct,
        seconds=time.perf_counter() - start,
    )


def sample_columns(store: ModelStore, request: DigitsRequest) -> list[DigitsColumn]:
    """One :class:`DigitsColumn` per scale of ``request``, all from the same initial noise (``request.seed``)."""
    import torch

    pipe = store.digits()
    judge = store.judge()
    config = pipe.unet.config
    shape = (request.samples, config.in_channels, config.sample_size, config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed), dtype=pipe.unet.dtype)
    with store.digits_lock:
        return [_sample_column(pipe, judge, request, scale, noise) for scale in request.scales]


def sample_digits(store: ModelStore, *inputs: Any) -> tuple[Any, list[list[Any]]]:
    """Image-tab callback: ``(grid image, table rows)``; ``inputs`` are those of :meth:`DigitsRequest.from_inputs`."""
    request = DigitsRequest.from_inputs(*inputs)
    columns = sample_columns(store, request)
    rows = [
        [
            request.label(c.scale),
            c.evaluations,
            round(c.evaluations / request.samples, 2),
            c.retired if request.adaptive else "-",
            f"{c.correct}/{request.samples}" if c.correct is not None else "n/a",
            round(c.seconds, 2),
        ]
        for c in columns
    ]
    return render_grid(columns, request), rows


def render_grid(columns: list[DigitsColumn], request: DigitsRequest) -> Any:
    """Samples in columns, one per scale, headed by the scale and its network evaluations (a PIL image)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from PIL import Image

    width = max(1.0 * len(columns), 2.6) + 0.2
    fig = Figure(figsize=(width, 1.0 * request.samples + 0.95), dpi=110)
    axes = fig.subplots(request.samples, len(columns), squeeze=False)
    for j, column in enumerate(columns):
        for i in range(request.samples):
            ax = axes[i][j]
            ax.imshow(
                column.images[i, 0].cpu().numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(f"{request.label(column.scale)}\n{column.evaluations} NFE", fontsize=8)
    adaptive = f", adaptive τ={request.threshold:g} from step {request.min_steps}" if request.adaptive else ""
    fig.suptitle(f"digit {request.digit} · {request.method} · {request.steps} steps{adaptive}", fontsize=8)
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def scales_for_method(method: str, scales: str) -> str:
    """Swap the scales box to defaults that suit ``method`` when its current contents do not."""
    if method == "CFG++":
        try:
            parse_scales(scales, "CFG++")
            return scales
        except ValueError:
            return DEFAULT_LAMBDAS
    return DEFAULT_SCALES if scales.strip() == DEFAULT_LAMBDAS else scales


# ----------------------------------------------------------------------------- layout
def _method_controls() -> list[Any]:
    """``[digit, method, scales, schedule, ramp]``."""
    with gr.Row():
        digit = gr.Dropdown(list(range(10)), value=3, label="Digit (class)", elem_id="image-digit")
        method = gr.Dropdown(list(IMAGE_METHODS), value="CFG", label="Method", elem_id="image-method")
    scales = gr.Textbox(
        value=DEFAULT_SCALES,
        label=f"Scales, one column each (at most {LIMITS.image_scales}; CFG++: lambda in [0, 1])",
        elem_id="image-scales",
    )
    schedule = gr.Radio(
        list(SCHEDULES), value="constant", label="Schedule over steps", elem_id="image-schedule"
    )
    ramp = gr.Slider(
        0.0,
        LIMITS.image_scale,
        value=1.0,
        step=0.1,
        label="Ramp start (first step; the ramp ends at the column's scale)",
        visible=False,
        elem_id="image-ramp",
    )
    method.change(scales_for_method, [method, scales], scales, queue=False)
    schedule.change(toggle_visible, schedule, ramp, queue=False)
    return [digit, method, scales, schedule, ramp]


def _adaptive_controls() -> list[Any]:
    """``[adaptive, threshold, min_steps]``."""
    with gr.Group():
        adaptive = gr.Checkbox(
            value=False,
            label="Adaptive guidance: a sample stops evaluating u once cos(c, u) > τ",
            elem_id="image-adaptive",
        )
        with gr.Row():
            threshold = gr.Slider(
                0.99, 1.0, value=0.998, step=0.0005, label="Cosine threshold τ", elem_id="image-threshold"
            )
            min_steps = gr.Slider(
                0,
                LIMITS.diffusion_steps,
                value=4,
                step=1,
                label="Always guide the first steps",
                elem_id="image-min-steps",
            )
    return [adaptive, threshold, min_steps]


def _run_controls() -> list[Any]:
    """``[samples, steps, seed]``."""
    with gr.Row():
        samples = gr.Slider(
            1, LIMITS.samples_per_scale, value=4, step=1, label="Samples per scale", elem_id="image-samples"
        )
        steps = gr.Slider(
            1, LIMITS.diffusion_steps, value=20, step=1, label="Steps (DDIM)", elem_id="image-steps"
        )
    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="image-seed")
    return [samples, steps, seed]


def build_image_tab(store: ModelStore) -> None:
    """The Image tab's controls, outputs and events (inside a ``gr.Blocks``)."""

    @page_errors
    def on_image(*values: Any) -> tuple[Any, list[list[Any]]]:
        return sample_digits(store, *values)

    with gr.Tab("Image", id="image", elem_id="tab-image"), gr.Row():
        with gr.Column(scale=1, min_width=320):
            inputs = _method_controls() + _adaptive_controls() + _run_controls()
            button = gr.Button("Sample", variant="primary", elem_id="image-generate")
        with gr.Column(scale=2):
            grid = gr.Image(label="Samples", type="pil", format="png", elem_id="image-grid", height=480)
            table = gr.Dataframe(
                headers=TABLE_HEADERS,
                label="Network evaluations (UNet rows) per scale",
                interactive=False,
                elem_id="image-table",
            )
    button.click(on_image, inputs, [grid, table], concurrency_limit=1, concurrency_id="image")
