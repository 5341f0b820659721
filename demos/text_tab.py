"""The Text tab: unguided and guided continuations of one prompt, streamed side by side.

SmolLM2-135M-Instruct (embedded) with CFG (scale or schedule, negative prompt, adaptive
guidance), typical sampling and sentiment steering with the shipped classifier. Both columns use the same seed;
the unguided one runs first, so each column's tokens per second is measured alone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import gradio as gr

from demos.common import (
    LIMITS,
    LOG,
    SCHEDULES,
    choice,
    describe_schedule,
    make_schedule,
    number,
    page_errors_stream,
    toggle_visible,
)
from demos.models import ModelStore

if TYPE_CHECKING:
    import torch

__all__ = ["STEERING_TARGETS", "TEXT_EXAMPLES", "TextRequest", "build_text_tab", "stream_text"]

STEERING_TARGETS = ("positive", "negative")
STEERING_TOP_K = 10
STEERING_CONTEXT_TOKENS = 64
ADAPTIVE_MAX_THRESHOLD = 20.0  # nats; beyond it adaptive CFG skips only where the exact rules allow
TEXT_EXAMPLES = [
    ["Write a short review of a pizza restaurant.", "Write a short negative review.", 3.0],
    ["Describe the sea in two sentences.", "", 1.5],
    ["Give me three tips for learning to cook.", "Give me generic advice.", 2.5],
]


def _prompt_text(value: Any, name: str, *, required: bool) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be text.")
    text = (value or "").strip()
    if not text:
        if required:
            raise ValueError(f"{name} is empty: type something for the model to continue.")
        return None
    if len(text) > LIMITS.prompt_chars:
        raise ValueError(f"{name} is too long: {len(text)} characters, at most {LIMITS.prompt_chars}.")
    return text


@dataclass(frozen=True)
class TextRequest:
    """A validated text-tab request; build it with :meth:`from_inputs` (the controls' values, bounded by ``LIMITS``)."""

    prompt: str
    negative_prompt: str | None
    scale: float
    schedule: str
    ramp_start: float
    adaptive: bool
    adaptive_threshold: float
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
        adaptive: Any,
        adaptive_threshold: Any,
        do_sample: Any,
        typical_p: Any,
        steering: Any,
        steering_target: Any,
        steering_strength: Any,
        max_new_tokens: Any,
        seed: Any,
    ) -> TextRequest:
        """Check the controls' values in the order of the page; a ValueError names the first bad one."""
        return cls(
            prompt=str(_prompt_text(prompt, "Prompt", required=True)),
            negative_prompt=_prompt_text(negative_prompt, "Negative prompt", required=False),
            scale=float(number(scale, "Guidance scale", 0.0, LIMITS.text_scale)),
            schedule=choice(schedule, "Schedule", SCHEDULES),
            ramp_start=float(number(ramp_start, "Ramp start", 0.0, LIMITS.text_scale)),
            adaptive=bool(adaptive),
            adaptive_threshold=float(number(adaptive_threshold, "Adaptive threshold", 0.0, ADAPTIVE_MAX_THRESHOLD)),
            do_sample=bool(do_sample),
            typical_p=float(number(typical_p, "typical_p", 0.01, 1.0)),
            steering=bool(steering),
            steering_target=choice(steering_target, "Steering target", STEERING_TARGETS),
            steering_strength=float(
                number(steering_strength, "Steering strength", 0.0, LIMITS.steering_strength)
            ),
            max_new_tokens=int(number(max_new_tokens, "New tokens", 1, LIMITS.new_tokens, integer=True)),
            seed=int(number(seed, "Seed", 0, LIMITS.seed, integer=True)),
        )

    @property
    def steers(self) -> bool:
        return self.steering and self.steering_strength > 0

    @property
    def cfg_on(self) -> bool:
        return self.scale != 1.0 or self.schedule != "constant"

    @property
    def guided(self) -> bool:
        schedule_on = self.schedule != "constant" and not (self.ramp_start == 1.0 and self.scale == 1.0)
        return self.scale != 1.0 or schedule_on or self.steers


# ----------------------------------------------------------------------------- streaming
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
    adaptive_stats: Any = None  # the final progress of an adaptive CFG run: guidance.lm.AdaptiveStats

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
    yield _Progress(result.texts[0], result.new_tokens, result.seconds, done=True, adaptive_stats=result.adaptive_stats)


def _check_prompt_tokens(tokenizer: Any, text: str, name: str) -> None:
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if count > LIMITS.prompt_tokens:
        raise ValueError(f"{name} is too long: {count} tokens, at most {LIMITS.prompt_tokens}.")


def _guidance_note(request: TextRequest) -> str:
    parts = []
    if request.cfg_on:
        parts.append(f"CFG {describe_schedule(request.schedule, request.scale, request.ramp_start)}")
        parts.append("negative prompt" if request.negative_prompt else "unconditional = last prompt token")
        if request.adaptive:
            parts.append(f"adaptive, threshold {request.adaptive_threshold:g} nats")
    if request.steers:
        parts.append(f"steering → {request.steering_target} (α = {request.steering_strength:g})")
    return ", ".join(parts) if parts else "guidance off (same as unguided)"


def _adaptive_note(stats: Any) -> str:
    """Per row: unconditional positions computed against what full CFG computes, and the tokens guided."""
    if stats is None:
        return ""
    rows = []
    for computed, needed, guided, steps in zip(
        stats.unconditional_positions.tolist(),
        stats.live_cfg_positions.tolist(),
        stats.guided_steps.tolist(),
        [stats.decisions.shape[1]] * stats.decisions.shape[0],
        strict=True,
    ):
        share = f" ({100 * computed / needed:.0f}%)" if needed else ""
        rows.append(f"unconditional positions computed: {computed} of {needed}{share}; tokens guided: {guided} of {steps}")
    return "  \n".join(rows)


def _sampling_kwargs(request: TextRequest) -> dict[str, Any]:
    sampling: dict[str, Any] = {
        "do_sample": request.do_sample,
        "max_new_tokens": request.max_new_tokens,
        "seed": request.seed,
    }
    if request.do_sample and request.typical_p < 1.0:
        sampling["typical_p"] = request.typical_p
    return sampling


def _guided_kwargs(store: ModelStore, request: TextRequest, tokenizer: Any) -> dict[str, Any]:
    """``generate_text`` arguments of the guided column: CFG, negative prompt, steering."""
    kwargs = _sampling_kwargs(request)
    if request.schedule == "constant":
        kwargs["guidance_scale"] = request.scale
    else:
        kwargs["guidance_schedule"] = make_schedule(request.schedule, request.scale, request.ramp_start)
    if request.negative_prompt:
        kwargs["negative_prompts"] = request.negative_prompt
    if request.adaptive and request.cfg_on:
        kwargs["guidance_adaptive"] = request.adaptive_threshold
    if request.steers:
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
        kwargs["logits_processor"] = LogitsProcessorList([steer])
    return kwargs


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
    guided_kwargs = _guided_kwargs(store, request, tokenizer)
    unguided, guided = ["", "starting…"], ["", "waiting for the unguided run…"]
    stop = threading.Event()
    try:
        yield unguided[0], guided[0], unguided[1], guided[1]
        plain = _stream_generation(
            model, tokenizer, request.prompt, stop, guidance_scale=1.0, **_sampling_kwargs(request)
        )
        for progress in plain:
            unguided = [progress.text, progress.markdown("plain sampling")]
            yield unguided[0], guided[0], unguided[1], guided[1]
        guided[1] = "starting…"
        yield unguided[0], guided[0], unguided[1], guided[1]
        note = _guidance_note(request)
        for progress in _stream_generation(model, tokenizer, request.prompt, stop, **guided_kwargs):
            extra = _adaptive_note(progress.adaptive_stats)
            guided = [progress.text, progress.markdown(f"{note}  \n{extra}" if extra else note)]
            yield unguided[0], guided[0], unguided[1], guided[1]
    finally:
        stop.set()  # the page went away or Stop was pressed: end the generation thread early


# ----------------------------------------------------------------------------- layout
@dataclass
class _TextControls:
    """The text tab's inputs, in the order of :meth:`TextRequest.from_inputs`."""

    prompt: Any
    negative: Any
    scale: Any
    schedule: Any
    ramp: Any
    adaptive: Any
    adaptive_threshold: Any
    do_sample: Any
    typical_p: Any
    steering: Any
    steering_target: Any
    steering_strength: Any
    new_tokens: Any
    seed: Any

    def inputs(self) -> list[Any]:
        return [getattr(self, field.name) for field in fields(self)]


def _guidance_controls() -> dict[str, Any]:
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
    scale = gr.Slider(
        0.0,
        LIMITS.text_scale,
        value=TEXT_EXAMPLES[0][2],
        step=0.1,
        label="Guidance scale w (1 = off)",
        elem_id="text-scale",
    )
    with gr.Row():
        schedule = gr.Radio(
            list(SCHEDULES), value="constant", label="Schedule over the new tokens", elem_id="text-schedule"
        )
        ramp = gr.Slider(
            0.0,
            LIMITS.text_scale,
            value=1.0,
            step=0.1,
            label="Ramp start (first token → w)",
            visible=False,
            elem_id="text-ramp",
        )
    schedule.change(toggle_visible, schedule, ramp, queue=False)
    return {"prompt": prompt, "negative": negative, "scale": scale, "schedule": schedule, "ramp": ramp,
            **_adaptive_controls()}


def _adaptive_controls() -> dict[str, Any]:
    with gr.Row(equal_height=True):
        adaptive = gr.Checkbox(
            value=False,
            label="Adaptive guidance (skip the unconditional forward where it cannot change the token)",
            elem_id="text-adaptive",
            min_width=160,
        )
        threshold = gr.Slider(
            0.0,
            ADAPTIVE_MAX_THRESHOLD,
            value=4.0,
            step=0.5,
            label="Adaptive threshold (nats; larger = closer to full CFG)",
            elem_id="text-adaptive-threshold",
        )
    return {"adaptive": adaptive, "adaptive_threshold": threshold}


def _sampling_controls() -> dict[str, Any]:
    with gr.Row(equal_height=True):
        do_sample = gr.Checkbox(
            value=True, label="Sample (off: greedy)", elem_id="text-sample", min_width=120
        )
        typical_p = gr.Slider(
            0.05, 1.0, value=0.9, step=0.05, label="typical_p (1 = off)", elem_id="text-typical"
        )
    with gr.Row():
        new_tokens = gr.Slider(
            1, LIMITS.new_tokens, value=48, step=1, label="New tokens", elem_id="text-tokens"
        )
        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="text-seed", min_width=100)
    return {"do_sample": do_sample, "typical_p": typical_p, "new_tokens": new_tokens, "seed": seed}


def _steering_controls() -> dict[str, Any]:
    with gr.Group():
        steering = gr.Checkbox(
            value=False,
            label="Sentiment steering (guided column; shipped classifier, CAIF top-10)",
            elem_id="text-steering",
        )
        with gr.Row():
            target = gr.Radio(
                list(STEERING_TARGETS), value="positive", label="Toward", elem_id="text-steer-target"
            )
            strength = gr.Slider(
                0.0,
                LIMITS.steering_strength,
                value=8.0,
                step=0.5,
                label="Strength α",
                elem_id="text-steer-alpha",
            )
    return {"steering": steering, "steering_target": target, "steering_strength": strength}


def _text_outputs() -> list[Any]:
    """``[unguided text, guided text, unguided stats, guided stats]``."""
    with gr.Row():
        with gr.Column(min_width=240):
            unguided = gr.Textbox(
                label="Unguided (w = 1, plain sampling)", lines=16, interactive=False, elem_id="text-unguided"
            )
            unguided_stats = gr.Markdown(elem_id="text-unguided-stats", elem_classes="stats")
        with gr.Column(min_width=240):
            guided = gr.Textbox(label="Guided", lines=16, interactive=False, elem_id="text-guided")
            guided_stats = gr.Markdown(elem_id="text-guided-stats", elem_classes="stats")
    return [unguided, guided, unguided_stats, guided_stats]


def build_text_tab(store: ModelStore) -> None:
    """The Text tab's controls, outputs and events (inside a ``gr.Blocks``)."""

    @page_errors_stream
    def on_text(*values: Any) -> Iterator[tuple[str, str, str, str]]:
        yield from stream_text(store, *values)

    with gr.Tab("Text", id="text", elem_id="tab-text"), gr.Row():
        with gr.Column(scale=2, min_width=380):
            controls = _TextControls(**_guidance_controls(), **_sampling_controls(), **_steering_controls())
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id="text-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="text-stop")
            gr.Examples(
                TEXT_EXAMPLES,
                [controls.prompt, controls.negative, controls.scale],
                label="Examples",
                example_labels=[example[0] for example in TEXT_EXAMPLES],
            )
        with gr.Column(scale=3):
            outputs = _text_outputs()
    event = button.click(on_text, controls.inputs(), outputs, concurrency_limit=1, concurrency_id="text")
    stop.click(None, None, None, cancels=[event], queue=False)
