"""What both tabs share: request limits, input checks, schedules and page errors.

torch, transformers and guidance are imported where they are used, so that the page is
served while they load (in the model preload thread); gradio alone is imported up front.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

if TYPE_CHECKING:
    from guidance.schedules import Schedule

__all__ = [
    "LIMITS",
    "SCHEDULES",
    "Limits",
    "describe_schedule",
    "make_schedule",
    "page_errors",
    "page_errors_stream",
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


def number(value: Any, name: str, low: float, high: float, *, integer: bool = False) -> float | int:
    """``value`` as a finite number in ``[low, high]``, or a ValueError naming the control and the range."""
    if value is None or isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}].")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}.") from None
    if not math.isfinite(result) or not low <= result <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}.")
    if integer:
        if result != int(result):
            raise ValueError(f"{name} must be a whole number in [{low:g}, {high:g}], got {value!r}.")
        return int(result)
    return result


def choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def make_schedule(kind: str, scale: float, start: float) -> float | Schedule:
    """``scale`` at every step (``"constant"``), or a ramp from ``start`` (first step) to ``scale`` (last step)."""
    from guidance.schedules import Constant, Cosine, Linear

    choice(kind, "Schedule", SCHEDULES)
    if kind == "constant":
        return Constant(scale)
    if kind == "linear":
        return Linear(start, scale)
    return Cosine(start, scale)


def describe_schedule(kind: str, scale: float, start: float, symbol: str = "w") -> str:
    """A short label of a schedule, e.g. ``w = 3`` or ``linear w 1 → 3``."""
    if kind == "constant":
        return f"{symbol} = {scale:g}"
    return f"{kind} {symbol} {start:g} → {scale:g}"


def as_page_error(error: Exception) -> gr.Error:
    """The message a page shows for ``error`` (unexpected errors are logged with their traceback)."""
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


def page_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors become a message in the page (gr.Error), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as error:
            raise as_page_error(error) from error

    return wrapper


def page_errors_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """:func:`page_errors` for a streaming (generator) callback."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Iterator[Any]:
        try:
            yield from fn(*args)
        except Exception as error:
            raise as_page_error(error) from error

    return wrapper


def toggle_visible(kind: str) -> Any:
    """Show the ramp-start control only for a ramped schedule."""
    return gr.update(visible=kind != "constant")
