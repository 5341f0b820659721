"""Gradio demo of classifier-free guidance for text and images, on the embedded models.

Start it with::

    python -m demos.app            # http://127.0.0.1:7860
    python -m demos.app --port 8000 --host 0.0.0.0

Two tabs:

* **Text**: SmolLM2-135M-Instruct, unguided and guided continuations side by side, streamed
  token by token with tokens per second (guidance scale and schedule, negative prompt,
  typical sampling, sentiment steering with the shipped classifier).
* **Image**: the class-conditional digits diffusion model; one column of samples per
  guidance scale, drawn from the same initial noise, with the network evaluations each used
  (CFG, APG, guidance rescale, CFG-Zero*, CFG++; schedules; adaptive guidance).

Everything runs offline. The models load in a background thread at start-up (the page is
served at once; a request that arrives earlier waits for its model). Requests are queued,
one generation per tab at a time, and every input is bounded, so concurrent users cannot
exhaust memory. Bad input shows as a message in the page.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if __name__ == "__main__" and not __package__:  # `python demos/app.py` in a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradio as gr  # noqa: E402

if TYPE_CHECKING:
    import torch

    from guidance.schedules import Schedule

# torch, transformers and guidance are imported where they are used, so that the page is served
# while they load (in the model preload thread); gradio alone is imported before serving.

__all__ = [
    "IMAGE_METHODS",
    "LIMITS",
    "SCHEDULES",
    "DigitsColumn",
    "DigitsRequest",
    "ModelStore",
    "TextRequest",
    "build_app",
    "main",
    "make_guider",
    "make_schedule",
    "parse_scales",
    "render_grid",
    "sample_columns",
    "sample_digits",
    "stream_text",
]

LOG = logging.getLogger("demos.app")


@dataclass(frozen=True)
class Limits:
    """Bounds on every request: they cap the memory and time one request can take."""

    prompt_chars: int = 2000
    prompt_tokens: int = 512
    new_tokens: int = 128
    text_scale: float = 10.0
    steering_strength: float = 20.0
    image_scale: float = 20.0
    image_scales: int = 6
    samples_per_scale: int = 8
    diffusion_steps: int = 50
    seed: int = 2**31 - 1
    queue_size: int = 16
    stream_timeout_s: float = 600.0


LIMITS = Limits()
SCHEDULES = ("constant", "linear", "cosine")
IMAGE_METHODS = ("CFG", "APG", "Rescaled CFG", "CFG-Zero*", "CFG++")
STEERING_TARGETS = ("positive", "negative")
DEFAULT_SCALES = "1, 2, 3, 5"
DEFAULT_LAMBDAS = "0.2, 0.4, 0.6, 0.8"  # CFG++'s scale is lambda in [0, 1]
# Any value > 1 makes the pipeline batch [uncond, cond]; the attached guider sets the real scale.
PIPELINE_CFG_SCALE = 2.0
STEERING_TOP_K = 10
STEERING_CONTEXT_TOKENS = 64

TEXT_EXAMPLES = [
    ["Write a short review of a pizza restaurant.", "Write a short negative review.", 3.0],
    ["Describe the sea in two sentences.", "", 1.5],
    ["Give me three tips for learning to cook.", "Give me generic advice.", 2.5],
]


# ----------------------------------------------------------------------------- models
class ModelStore:
    """Loads each model once, on first use (or in :meth:`preload`), thread-safe.

    The loaders are injectable so that tests can use tiny random-weight models.
    """

    def __init__(
        self,
        lm_loader: Callable[[], tuple[Any, Any]] | None = None,
        sentiment_loader: Callable[[], Any] | None = None,
        digits_loader: Callable[[], Any] | None = None,
        judge_loader: Callable[[], Any] | None = None,
    ) -> None:
        self._loaders: dict[str, Callable[[], Any]] = {
            "lm": lm_loader or _load_lm,
            "sentiment": sentiment_loader or _load_sentiment,
            "digits": digits_loader or _load_digits,
            "judge": judge_loader or _load_judge,
        }
        self._models: dict[str, Any] = {}
        self._locks = {name: threading.Lock() for name in self._loaders}
        self.load_seconds: dict[str, float] = {}
        # The digits pipeline is patched by `attach` for the length of a request: one request at a time.
        self.digits_lock = threading.Lock()
        # Text sampling draws from torch's global generator, and so does initialising a model before its
        # weights are loaded: the two never overlap, so that a seed gives the same text every time. (A plain
        # Lock: gradio may resume a streaming callback on another thread than the one that acquired it.)
        self.rng_lock = threading.Lock()

    def get(self, name: str) -> Any:
        with self._locks[name]:
            if name in self._models:
                return self._models[name]
            start = time.perf_counter()
            try:
                with self.rng_lock:
                    model = self._loaders[name]()
            except (FileNotFoundError, ImportError, RuntimeError) as error:  # missing weights or package
                LOG.warning("Loading %s failed: %s", name, error)
                raise
            except Exception:
                LOG.exception("Loading %s failed", name)
                raise
            self.load_seconds[name] = time.perf_counter() - start
            LOG.info("Loaded %s in %.1f s", name, self.load_seconds[name])
            self._models[name] = model
            return model

    def lm(self) -> tuple[Any, Any]:
        return self.get("lm")

    def sentiment(self) -> Any:
        return self.get("sentiment")

    def digits(self) -> Any:
        return self.get("digits")

    def judge(self) -> Any | None:
        """The digit classifier that labels samples, or ``None`` if it cannot be loaded (it is optional)."""
        try:
            return self.get("judge")
        except Exception:
            return None

    def preload(self, names: tuple[str, ...] = ("lm", "digits", "judge", "sentiment")) -> threading.Thread:
        """Load ``names`` in a background thread (failures are logged and reported at request time)."""

        def work() -> None:
            for name in names:
                try:
                    self.get(name)
                except Exception:
                    pass

        thread = threading.Thread(target=work, name="preload-models", daemon=True)
        thread.start()
        return thread


def _load_lm() -> tuple[Any, Any]:
    from guidance.models import load_default_lm

    return load_default_lm()


def _load_sentiment() -> Any:
    from guidance.models.sentiment import load_sentiment_classifier

    return load_sentiment_classifier()


def _load_digits() -> Any:
    from guidance.models.digits import load_digits_pipeline

    return load_digits_pipeline()


def _load_judge() -> Any:
    from guidance.models.digits_judge import load_digits_judge

    return load_digits_judge()


# ----------------------------------------------------------------------------- validation
def _number(value: Any, name: str, low: float, high: float, *, integer: bool = False) -> float | int:
    """``value`` as a finite number in ``[low, high]``, or a ValueError naming the control and the range."""
    if value is None or isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}].")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}.") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}.")
    if integer:
        if number != int(number):
            raise ValueError(f"{name} must be a whole number in [{low:g}, {high:g}], got {value!r}.")
        return int(number)
    return number


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def make_schedule(kind: str, scale: float, start: float) -> float | Schedule:
    """``scale`` at every step (``"constant"``), or a ramp from ``start`` (first step) to ``scale`` (last step)."""
    from guidance.schedules import Constant, Cosine, Linear

    _choice(kind, "Schedule", SCHEDULES)
    if kind == "constant":
        return Constant(scale)
    if kind == "linear":
        return Linear(start, scale)
    return Cosine(start, scale)


def _describe_schedule(kind: str, scale: float, start: float, symbol: str = "w") -> str:
    if kind == "constant":
        return f"{symbol} = {scale:g}"
    return f"{kind} {symbol} {start:g} → {scale:g}"


@dataclass(frozen=True)
class TextRequest:
    """A validated text-tab request."""

    prompt: str
    negative_prompt: str | None
    scale: float
    schedule: str
    ramp_start: float
    do_sample: bool
    typical_p: float
    steering: bool
    steering_target: str
    steering_strength: float
    max_new_tokens: int
    seed: int

    @classmethod
    def from_inputs(
        cls,
        prompt: Any,
        negative_prompt: Any,
        scale: Any,
        schedule: Any,
        ramp_start: Any,
        do_sample: Any,
        typical_p: Any,
        steering: Any,
        steering_target: Any,
        steering_strength: Any,
        max_new_tokens: Any,
        seed: Any,
    ) -> TextRequest:
        prompt = (prompt or "").strip() if isinstance(prompt, str) or prompt is None else None
        if prompt is None:
            raise ValueError("Prompt must be text.")
        if not prompt:
            raise ValueError("Prompt is empty: type something for the model to continue.")
        if len(prompt) > LIMITS.prompt_chars:
            raise ValueError(f"Prompt is too long: {len(prompt)} characters, at most {LIMITS.prompt_chars}.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError("Negative prompt must be text.")
        negative = (negative_prompt or "").strip() or None
        if negative is not None and len(negative) > LIMITS.prompt_chars:
            raise ValueError(
                f"Negative prompt is too long: {len(negative)} characters, at most {LIMITS.prompt_chars}."
            )
        return cls(
            prompt=prompt,
            negative_prompt=negative,
            scale=float(_number(scale, "Guidance scale", 0.0, LIMITS.text_scale)),
            schedule=_choice(schedule, "Schedule", SCHEDULES),
            ramp_start=float(_number(ramp_start, "Ramp start", 0.0, LIMITS.text_scale)),
            do_sample=bool(do_sample),
            typical_p=float(_number(typical_p, "typical_p", 0.01, 1.0)),
            steering=bool(steering),
            steering_target=_choice(steering_target, "Steering target", STEERING_TARGETS),
            steering_strength=float(
                _number(steering_strength, "Steering strength", 0.0, LIMITS.steering_strength)
            ),
            max_new_tokens=int(_number(max_new_tokens, "New tokens", 1, LIMITS.new_tokens, integer=True)),
            seed=int(_number(seed, "Seed", 0, LIMITS.seed, integer=True)),
        )

    @property
    def guided(self) -> bool:
        schedule_on = self.schedule != "constant" and not (self.ramp_start == 1.0 and self.scale == 1.0)
        return self.scale != 1.0 or schedule_on or (self.steering and self.steering_strength > 0)


# ----------------------------------------------------------------------------- text
class _TokenStreamer:
    """A ``generate`` streamer: receives the tokens (batch of one), queues the text so far after every token."""

    def __init__(self, tokenizer: Any, timeout: float | None = None) -> None:
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.tokens: list[int] = []
        self._prompt_seen = False
        self._queue: queue.Queue[str | None] = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate sends the prompt first
            self._prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        self._queue.put(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                text = self._queue.get(timeout=self.timeout)
            except queue.Empty:
                raise TimeoutError(f"No token for {self.timeout:g} s; generation was abandoned.") from None
            if text is None:
                return
            yield text


class _StopWhenSet:
    """Stops generation when ``event`` is set (the page was closed or the user pressed Stop)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


@dataclass
class _Progress:
    text: str
    tokens: int
    seconds: float
    done: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def markdown(self, note: str = "") -> str:
        state = "done" if self.done else "streaming…"
        line = f"**{self.tokens_per_second:.1f} tokens/s**: {self.tokens} tokens in {self.seconds:.1f} s ({state})"
        return f"{line}  \n{note}" if note else line


def _stream_generation(
    model: Any, tokenizer: Any, prompt: str, stop: threading.Event, **kwargs: Any
) -> Iterator[_Progress]:
    """Run :func:`guidance.lm.generate_text` in a thread and yield the text after every token."""
    from transformers import StoppingCriteriaList

    from guidance.lm import generate_text

    streamer = _TokenStreamer(tokenizer, timeout=LIMITS.stream_timeout_s)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = generate_text(model, tokenizer, prompt, streamer=streamer, **kwargs)
            if stop.is_set():
                LOG.info(
                    "Generation stopped after %d tokens (Stop pressed or page closed).",
                    box["result"].new_tokens,
                )
        except BaseException as error:  # noqa: B036 - re-raised in the consuming thread
            box["error"] = error
            streamer.end()

    kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(stop)])
    thread = threading.Thread(target=work, name="generate", daemon=True)
    start = time.perf_counter()
    thread.start()
    for text in streamer:
        yield _Progress(text.rstrip("\ufffd"), len(streamer.tokens), time.perf_counter() - start)
    thread.join()
    if "error" in box:
        raise box["error"]
    result = box["result"]
    yield _Progress(result.texts[0], result.new_tokens, result.seconds, done=True)


def _check_prompt_tokens(tokenizer: Any, text: str, name: str) -> None:
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if count > LIMITS.prompt_tokens:
        raise ValueError(f"{name} is too long: {count} tokens, at most {LIMITS.prompt_tokens}.")


def _guidance_note(request: TextRequest) -> str:
    parts = []
    if request.scale != 1.0 or request.schedule != "constant":
        parts.append(f"CFG {_describe_schedule(request.schedule, request.scale, request.ramp_start)}")
        parts.append("negative prompt" if request.negative_prompt else "unconditional = last prompt token")
    if request.steering and request.steering_strength > 0:
        parts.append(f"steering → {request.steering_target} (α = {request.steering_strength:g})")
    return ", ".join(parts) if parts else "guidance off (same as unguided)"


def stream_text(store: ModelStore, *inputs: Any) -> Iterator[tuple[str, str, str, str]]:
    """Text-tab callback: yields ``(unguided text, guided text, unguided stats, guided stats)`` after every token.

    ``inputs`` are those of :meth:`TextRequest.from_inputs`. The unguided continuation (scale 1,
    no negative prompt, no steering) runs first, then the guided one, with the same seed and
    sampling settings, so each column's tokens per second is measured alone.
    """
    request = TextRequest.from_inputs(*inputs)
    model, tokenizer = store.lm()
    _check_prompt_tokens(tokenizer, request.prompt, "Prompt")
    if request.negative_prompt:
        _check_prompt_tokens(tokenizer, request.negative_prompt, "Negative prompt")
    if not request.guided:
        gr.Warning("Guidance is off (scale 1, no steering): both columns sample the plain model.")

    sampling: dict[str, Any] = {"do_sample": request.do_sample, "max_new_tokens": request.max_new_tokens}
    if request.do_sample and request.typical_p < 1.0:
        sampling["typical_p"] = request.typical_p
    guided_kwargs: dict[str, Any] = dict(sampling)
    schedule = make_schedule(request.schedule, request.scale, request.ramp_start)
    if request.schedule == "constant":
        guided_kwargs["guidance_scale"] = request.scale
    else:
        guided_kwargs["guidance_schedule"] = schedule
    if request.negative_prompt:
        guided_kwargs["negative_prompts"] = request.negative_prompt
    if request.steering and request.steering_strength > 0:
        from transformers import LogitsProcessorList

        from guidance.lm.steering import ClassifierWeightedLogitsProcessor

        steer = ClassifierWeightedLogitsProcessor(
            tokenizer,
            store.sentiment(),
            alpha=request.steering_strength,
            top_k=STEERING_TOP_K,
            label=request.steering_target,
            include_prompt=False,  # score the continuation, not the chat template around the prompt
            context_tokens=STEERING_CONTEXT_TOKENS,
        )
        guided_kwargs["logits_processor"] = LogitsProcessorList([steer])

    unguided_text, guided_text = "", ""
    unguided_stats, guided_stats = "starting…", "waiting for the unguided run…"
    note = _guidance_note(request)
    stop = threading.Event()
    try:
        yield unguided_text, guided_text, unguided_stats, guided_stats
        with store.rng_lock:
            for progress in _stream_generation(
                model, tokenizer, request.prompt, stop, guidance_scale=1.0, seed=request.seed, **sampling
            ):
                unguided_text, unguided_stats = progress.text, progress.markdown("plain sampling")
                yield unguided_text, guided_text, unguided_stats, guided_stats
            guided_stats = "starting…"
            yield unguided_text, guided_text, unguided_stats, guided_stats
            for progress in _stream_generation(
                model, tokenizer, request.prompt, stop, seed=request.seed, **guided_kwargs
            ):
                guided_text, guided_stats = progress.text, progress.markdown(note)
                yield unguided_text, guided_text, unguided_stats, guided_stats
    finally:
        stop.set()  # the page went away or Stop was pressed: end the generation thread early


# ----------------------------------------------------------------------------- images
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
        scales.append(float(_number(value, name, 0.0, high)))
    if len(scales) > LIMITS.image_scales:
        raise ValueError(f"{name}: at most {LIMITS.image_scales} scales, got {len(scales)}.")
    return scales


def make_guider(method: str, schedule: float | Schedule) -> Any:
    """The guider of ``method`` with ``schedule`` (for CFG++ a plain CFG carrying lambda; ``attach`` does the rest)."""
    from guidance.guiders import APG, CFG, CFGZeroStar, RescaledCFG

    _choice(method, "Method", IMAGE_METHODS)
    if method == "APG":
        return APG(schedule, eta=0.0, convention="paper")
    if method == "Rescaled CFG":
        return RescaledCFG(schedule, rescale=0.7)
    if method == "CFG-Zero*":
        return CFGZeroStar(schedule)
    return CFG(schedule)


@dataclass(frozen=True)
class DigitsRequest:
    """A validated image-tab request."""

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
        method = _choice(method, "Method", IMAGE_METHODS)
        high = 1.0 if method == "CFG++" else LIMITS.image_scale
        return cls(
            digit=int(_number(digit, "Digit", 0, 9, integer=True)),
            method=method,
            scales=tuple(parse_scales(scales, method)),
            schedule=_choice(schedule, "Schedule", SCHEDULES),
            ramp_start=float(
                _number(
                    ramp_start, "Ramp start" + (" (CFG++ lambda)" if method == "CFG++" else ""), 0.0, high
                )
            ),
            adaptive=bool(adaptive),
            threshold=float(_number(threshold, "Adaptive threshold", -1.0, 1.0)),
            min_steps=int(
                _number(min_steps, "Guided steps before adaptive", 0, LIMITS.diffusion_steps, integer=True)
            ),
            samples=int(_number(samples, "Samples per scale", 1, LIMITS.samples_per_scale, integer=True)),
            steps=int(_number(steps, "Steps", 1, LIMITS.diffusion_steps, integer=True)),
            seed=int(_number(seed, "Seed", 0, LIMITS.seed, integer=True)),
        )


@dataclass
class DigitsColumn:
    """The samples of one guidance scale and what they cost."""

    scale: float
    images: torch.Tensor  # (N, 1, 8, 8) in [0, 1]
    evaluations: int  # UNet rows evaluated (one row = one network evaluation of one sample)
    retired: int  # samples that adaptive guidance took off the unconditional branch
    correct: int | None  # samples the judge classifies as the requested digit (None: no judge)
    seconds: float


TABLE_HEADERS = [
    "scale",
    "network evaluations",
    "per image",
    "retired early (adaptive)",
    "judged correct",
    "seconds",
]


def sample_columns(store: ModelStore, request: DigitsRequest) -> list[DigitsColumn]:
    """One :class:`DigitsColumn` per scale of ``request``, all from the same initial noise (``request.seed``)."""
    import torch

    from guidance.adaptive import AdaptiveGuidance
    from guidance.diffusion import attach
    from guidance.models.digits import to_unit_range

    pipe = store.digits()
    judge = store.judge()
    config = pipe.unet.config
    shape = (request.samples, config.in_channels, config.sample_size, config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed), dtype=pipe.unet.dtype)
    labels = [request.digit] * request.samples
    mode = "cfgpp" if request.method == "CFG++" else "guide"
    columns = []
    with store.digits_lock:
        for scale in request.scales:
            guider = make_guider(request.method, make_schedule(request.schedule, scale, request.ramp_start))
            policy = (
                AdaptiveGuidance(request.threshold, min_steps=request.min_steps) if request.adaptive else None
            )
            start = time.perf_counter()
            with attach(pipe, guider, adaptive=policy, mode=mode) as handle:
                latents = pipe(
                    labels,
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
            columns.append(
                DigitsColumn(
                    scale=scale,
                    images=images,
                    evaluations=handle.stats.evaluations,
                    retired=sum(step is not None for step in handle.stats.passed_at),
                    correct=correct,
                    seconds=time.perf_counter() - start,
                )
            )
    return columns


def sample_digits(store: ModelStore, *inputs: Any) -> tuple[Any, list[list[Any]]]:
    """Image-tab callback: ``(grid image, table rows)``; ``inputs`` are those of :meth:`DigitsRequest.from_inputs`."""
    request = DigitsRequest.from_inputs(*inputs)
    columns = sample_columns(store, request)
    symbol = "λ" if request.method == "CFG++" else "w"
    rows = [
        [
            _describe_schedule(request.schedule, c.scale, request.ramp_start, symbol),
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

    symbol = "λ" if request.method == "CFG++" else "w"
    cell = 1.0
    width = max(cell * len(columns), 2.6) + 0.2
    fig = Figure(figsize=(width, cell * request.samples + 0.95), dpi=110)
    axes = fig.subplots(request.samples, len(columns), squeeze=False)
    for j, column in enumerate(columns):
        for i in range(request.samples):
            ax = axes[i][j]
            ax.imshow(
                column.images[i, 0].cpu().numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
        label = _describe_schedule(request.schedule, column.scale, request.ramp_start, symbol)
        axes[0][j].set_title(f"{label}\n{column.evaluations} NFE", fontsize=8)
    adaptive = f", adaptive τ={request.threshold:g} from step {request.min_steps}" if request.adaptive else ""
    fig.suptitle(f"digit {request.digit} · {request.method} · {request.steps} steps{adaptive}", fontsize=8)
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# ----------------------------------------------------------------------------- errors
def _as_page_error(error: Exception) -> gr.Error:
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, ValueError):
        return gr.Error(str(error))
    if isinstance(error, (FileNotFoundError, RuntimeError, ImportError, TimeoutError)):
        return gr.Error(f"{type(error).__name__}: {error}")
    LOG.exception("Request failed")
    return gr.Error(
        f"Something went wrong ({type(error).__name__}: {error}). The server log has the details."
    )


def _page_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors become a message in the page (gr.Error), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as error:
            raise _as_page_error(error) from error

    return wrapper


def _page_errors_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(fn)
    def wrapper(*args: Any) -> Iterator[Any]:
        try:
            yield from fn(*args)
        except Exception as error:
            raise _as_page_error(error) from error

    return wrapper


# ----------------------------------------------------------------------------- UI
INTRO = """\
# guidance-decoding demo
Classifier-free guidance and its successors on the embedded models, offline.
**Text**: SmolLM2-135M-Instruct, the same seed with and without guidance.
**Image**: an 8×8 class-conditional digits diffusion model, one column per guidance scale from the same noise.
"""

CSS = """
.stats { min-height: 3.2em; }
"""


def _scales_for_method(method: str, scales: str) -> str:
    """Swap the scales box to defaults that suit ``method`` when its current contents do not."""
    if method == "CFG++":
        try:
            parse_scales(scales, "CFG++")
            return scales
        except ValueError:
            return DEFAULT_LAMBDAS
    return DEFAULT_SCALES if scales.strip() == DEFAULT_LAMBDAS else scales


def build_app(store: ModelStore | None = None) -> gr.Blocks:
    """The two-tab Gradio app (not launched). ``store`` defaults to the embedded models."""
    store = store or ModelStore()

    @_page_errors_stream
    def on_text(*values: Any) -> Iterator[tuple[str, str, str, str]]:
        yield from stream_text(store, *values)

    @_page_errors
    def on_image(*values: Any) -> tuple[Any, list[list[Any]]]:
        return sample_digits(store, *values)

    with gr.Blocks(title="guidance-decoding demo", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Text", id="text", elem_id="tab-text"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=380):
                        prompt = gr.Textbox(
                            label="Prompt",
                            value=TEXT_EXAMPLES[0][0],
                            lines=2,
                            max_length=LIMITS.prompt_chars,
                            elem_id="text-prompt",
                        )
                        negative = gr.Textbox(
                            label="Negative prompt (empty: the last prompt token)",
                            value=TEXT_EXAMPLES[0][1],
                            lines=1,
                            max_length=LIMITS.prompt_chars,
                            elem_id="text-negative",
                        )
                        text_scale = gr.Slider(
                            0.0,
                            LIMITS.text_scale,
                            value=TEXT_EXAMPLES[0][2],
                            step=0.1,
                            label="Guidance scale w (1 = off)",
                            elem_id="text-scale",
                        )
                        with gr.Row():
                            text_schedule = gr.Radio(
                                list(SCHEDULES),
                                value="constant",
                                label="Schedule over the new tokens",
                                elem_id="text-schedule",
                            )
                            text_ramp = gr.Slider(
                                0.0,
                                LIMITS.text_scale,
                                value=1.0,
                                step=0.1,
                                label="Ramp start (first token → w)",
                                visible=False,
                                elem_id="text-ramp",
                            )
                        with gr.Row(equal_height=True):
                            do_sample = gr.Checkbox(
                                value=True, label="Sample (off: greedy)", elem_id="text-sample", min_width=120
                            )
                            typical_p = gr.Slider(
                                0.05,
                                1.0,
                                value=0.9,
                                step=0.05,
                                label="typical_p (1 = off)",
                                elem_id="text-typical",
                            )
                        with gr.Row():
                            new_tokens = gr.Slider(
                                1,
                                LIMITS.new_tokens,
                                value=48,
                                step=1,
                                label="New tokens",
                                elem_id="text-tokens",
                            )
                            text_seed = gr.Number(
                                value=0,
                                precision=0,
                                label="Seed",
                                minimum=0,
                                elem_id="text-seed",
                                min_width=100,
                            )
                        with gr.Group():
                            steering = gr.Checkbox(
                                value=False,
                                label="Sentiment steering (guided column; shipped classifier, CAIF top-10)",
                                elem_id="text-steering",
                            )
                            with gr.Row():
                                steering_target = gr.Radio(
                                    list(STEERING_TARGETS),
                                    value="positive",
                                    label="Toward",
                                    elem_id="text-steer-target",
                                )
                                steering_strength = gr.Slider(
                                    0.0,
                                    LIMITS.steering_strength,
                                    value=8.0,
                                    step=0.5,
                                    label="Strength α",
                                    elem_id="text-steer-alpha",
                                )
                        with gr.Row():
                            text_button = gr.Button("Generate", variant="primary", elem_id="text-generate")
                            text_stop = gr.Button("Stop", variant="stop", elem_id="text-stop")
                        gr.Examples(
                            TEXT_EXAMPLES,
                            [prompt, negative, text_scale],
                            label="Examples",
                            example_labels=[example[0] for example in TEXT_EXAMPLES],
                        )
                    with gr.Column(scale=3):
                        with gr.Row():
                            with gr.Column(min_width=240):
                                unguided_out = gr.Textbox(
                                    label="Unguided (w = 1, plain sampling)",
                                    lines=16,
                                    interactive=False,
                                    elem_id="text-unguided",
                                )
                                unguided_stats = gr.Markdown(
                                    elem_id="text-unguided-stats", elem_classes="stats"
                                )
                            with gr.Column(min_width=240):
                                guided_out = gr.Textbox(
                                    label="Guided",
                                    lines=16,
                                    interactive=False,
                                    elem_id="text-guided",
                                )
                                guided_stats = gr.Markdown(elem_id="text-guided-stats", elem_classes="stats")
                text_schedule.change(
                    lambda kind: gr.update(visible=kind != "constant"), text_schedule, text_ramp, queue=False
                )
                text_event = text_button.click(
                    on_text,
                    [
                        prompt,
                        negative,
                        text_scale,
                        text_schedule,
                        text_ramp,
                        do_sample,
                        typical_p,
                        steering,
                        steering_target,
                        steering_strength,
                        new_tokens,
                        text_seed,
                    ],
                    [unguided_out, guided_out, unguided_stats, guided_stats],
                    concurrency_limit=1,
                    concurrency_id="text",
                )
                text_stop.click(None, None, None, cancels=[text_event], queue=False)

            with gr.Tab("Image", id="image", elem_id="tab-image"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        with gr.Row():
                            digit = gr.Dropdown(
                                list(range(10)), value=3, label="Digit (class)", elem_id="image-digit"
                            )
                            method = gr.Dropdown(
                                list(IMAGE_METHODS), value="CFG", label="Method", elem_id="image-method"
                            )
                        scales = gr.Textbox(
                            value=DEFAULT_SCALES,
                            label=f"Scales, one column each (at most {LIMITS.image_scales}; CFG++: lambda in [0, 1])",
                            elem_id="image-scales",
                        )
                        image_schedule = gr.Radio(
                            list(SCHEDULES),
                            value="constant",
                            label="Schedule over steps",
                            elem_id="image-schedule",
                        )
                        image_ramp = gr.Slider(
                            0.0,
                            LIMITS.image_scale,
                            value=1.0,
                            step=0.1,
                            label="Ramp start (first step; the ramp ends at the column's scale)",
                            visible=False,
                            elem_id="image-ramp",
                        )
                        with gr.Group():
                            adaptive = gr.Checkbox(
                                value=False,
                                label="Adaptive guidance: a sample stops evaluating u once cos(c, u) > τ",
                                elem_id="image-adaptive",
                            )
                            with gr.Row():
                                threshold = gr.Slider(
                                    0.99,
                                    1.0,
                                    value=0.998,
                                    step=0.0005,
                                    label="Cosine threshold τ",
                                    elem_id="image-threshold",
                                )
                                min_steps = gr.Slider(
                                    0,
                                    LIMITS.diffusion_steps,
                                    value=4,
                                    step=1,
                                    label="Always guide the first steps",
                                    elem_id="image-min-steps",
                                )
                        with gr.Row():
                            samples = gr.Slider(
                                1,
                                LIMITS.samples_per_scale,
                                value=4,
                                step=1,
                                label="Samples per scale",
                                elem_id="image-samples",
                            )
                            steps = gr.Slider(
                                1,
                                LIMITS.diffusion_steps,
                                value=20,
                                step=1,
                                label="Steps (DDIM)",
                                elem_id="image-steps",
                            )
                        image_seed = gr.Number(
                            value=0, precision=0, label="Seed", minimum=0, elem_id="image-seed"
                        )
                        image_button = gr.Button("Sample", variant="primary", elem_id="image-generate")
                    with gr.Column(scale=2):
                        grid = gr.Image(
                            label="Samples", type="pil", format="png", elem_id="image-grid", height=480
                        )
                        table = gr.Dataframe(
                            headers=TABLE_HEADERS,
                            label="Network evaluations (UNet rows) per scale",
                            interactive=False,
                            elem_id="image-table",
                        )
                method.change(_scales_for_method, [method, scales], scales, queue=False)
                image_schedule.change(
                    lambda kind: gr.update(visible=kind != "constant"),
                    image_schedule,
                    image_ramp,
                    queue=False,
                )
                image_button.click(
                    on_image,
                    [
                        digit,
                        method,
                        scales,
                        image_schedule,
                        image_ramp,
                        adaptive,
                        threshold,
                        min_steps,
                        samples,
                        steps,
                        image_seed,
                    ],
                    [grid, table],
                    concurrency_limit=1,
                    concurrency_id="image",
                )
    demo.queue(max_size=LIMITS.queue_size, default_concurrency_limit=1, api_open=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demos.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--share", action="store_true", help="also make a public gradio.live link (off by default)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="load each model on its first request instead of in the background at start",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported: every thread uses it
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(args.threads)
    start = time.perf_counter()
    store = ModelStore()
    if not args.lazy:
        store.preload()
    demo = build_app(store)
    LOG.info("App built in %.1f s (since start of main)", time.perf_counter() - start)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        inbrowser=False,
        show_error=False,
        css=CSS,
        footer_links=[],
    )


if __name__ == "__main__":
    main()
