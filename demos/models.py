"""The models behind the demo, each loaded once (in a background thread at start-up, or on first use)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from demos.common import LOG

__all__ = ["ModelStore"]


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


class ModelStore:
    """Loads each model once, on first use (or in :meth:`preload`), thread-safe.

    The loaders are injectable so that tests can use tiny random-weight models. Text
    sampling uses a private generator per request (``generate_text(seed=...)``), so loading a
    model (which draws from torch's global generator) never changes a sampled text: no lock
    is held around generation.

    Args:
        lm_loader: ``() -> (model, tokenizer)``; default: the embedded SmolLM2-135M-Instruct.
        sentiment_loader: ``() -> texts -> probabilities``; default: the shipped sentiment classifier.
        digits_loader: ``() -> pipeline``; default: the shipped digits diffusion pipeline.
        judge_loader: ``() -> classifier`` with ``predict(images)``; default: the shipped digits judge.
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
        # `attach` patches the digits pipeline for the length of a request: one request at a time.
        self.digits_lock = threading.Lock()

    def get(self, name: str) -> Any:
        """The model ``name`` (``"lm"``, ``"sentiment"``, ``"digits"``, ``"judge"``), loading it once."""
        with self._locks[name]:
            if name in self._models:
                return self._models[name]
            start = time.perf_counter()
            try:
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
