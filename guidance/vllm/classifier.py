"""Classifier-weighted logits (CAIF/FUDGE) as a vLLM logits processor.

For each request that sets ``extra_args["classifier_alpha"]`` (``vllm_xargs`` when served),
the ``top_k`` highest-scoring tokens of its row are candidates; the texts ``prefix + token``
of every such row are scored by ONE classifier call per step, and
``alpha * log p(attribute | prefix + token)`` is added to each candidate
(:func:`guidance.classifier.classifier_weighted_logits`; tokens outside the top k removed,
as in CAIF). Same numbers as :class:`guidance.lm.ClassifierWeightedLogitsProcessor`.

Per request (``extra_args``): ``classifier_alpha`` (finite; 0 is off), ``classifier_label``
(class index or name; default: the classifier's single output, or the last class),
``classifier_top_k`` (default 20).

The classifier is loaded once per engine, on first use, from
``additional_config={"guidance_classifier": "module:factory"}`` (``--additional-config`` when
served; the factory takes no argument and returns a ``texts -> probabilities`` callable);
default: the embedded sentiment classifier (``guidance.models.sentiment``, labels
``negative``/``positive``). Or subclass :class:`ClassifierLogitsProcessor` and override
:meth:`~ClassifierLogitsProcessor.load_classifier`.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

from guidance.classifier import (  # the math, shared with guidance.lm.steering
    as_probabilities,
    attribute_log_probs,
    classifier_weighted_logits,
    top_k_candidates,
)
from guidance.validation import check_finite, check_int
from guidance.vllm._rows import RowTable, admission_check

__all__ = ["CLASSIFIER_KEYS", "DEFAULT_CLASSIFIER", "ClassifierLogitsProcessor", "classifier_settings"]

CLASSIFIER_KEYS = ("classifier_alpha", "classifier_label", "classifier_top_k")
DEFAULT_CLASSIFIER = "guidance.models.sentiment:load_sentiment_classifier"

logger = logging.getLogger(__name__)
_UNKNOWN = object()


@dataclass(frozen=True)
class ClassifierSettings:
    alpha: float
    label: int | str | None = None
    top_k: int = 20


def classifier_settings(params: SamplingParams | None) -> ClassifierSettings | None:
    """The request's classifier settings from ``extra_args``, or None when off (absent or alpha 0).

    Example:
        >>> from vllm import SamplingParams
        >>> from guidance.vllm.classifier import classifier_settings
        >>> classifier_settings(SamplingParams(extra_args={"classifier_alpha": 2, "classifier_label": "positive"}))
        ClassifierSettings(alpha=2.0, label='positive', top_k=20)
    """
    extra = (params.extra_args if params is not None else None) or {}
    if "classifier_alpha" not in extra:
        if any(key in extra for key in CLASSIFIER_KEYS):
            raise ValueError("`classifier_label` and `classifier_top_k` need `classifier_alpha` in extra_args.")
        return None
    alpha = check_finite(extra["classifier_alpha"], "classifier_alpha")
    label = extra.get("classifier_label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
        raise TypeError(f"`classifier_label` must be a class index or name, got {label!r}.")
    top_k = check_int(extra.get("classifier_top_k", 20), "classifier_top_k", minimum=1)
    if alpha == 0:
        return None
    scale = extra.get("guidance_scale")
    if scale is not None and scale != 1:
        raise ValueError("`classifier_alpha` cannot be combined with `guidance_scale` in one vLLM request yet.")
    return ClassifierSettings(alpha, label, top_k)


@dataclass
class _Row:
    settings: ClassifierSettings
    prompt_ids: list[int]
    output_ids: list[int]


def _load_factory(path: str) -> Any:
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"`guidance_classifier` must look like 'package.module:factory', got {path!r}.")
    return getattr(importlib.import_module(module), name)()


class ClassifierLogitsProcessor(V1LogitsProcessor):
    r"""vLLM (V1 runner) logits processor for CAIF-style classifier-weighted logits.

    Scores the top-k candidates of every row that asks for it with one classifier call per
    step, and adds ``alpha * log p(label | prompt + generated + candidate)``; the other
    tokens of those rows are removed. Rows without ``classifier_alpha`` are untouched.
    Runs before penalties and temperature (on the model's scores, as transformers runs
    logits processors before its warpers). Not combinable with ``guidance_scale`` in the same
    request yet (refused at admission).

    ``stats`` counts steps, classifier calls, rows scored and texts scored.

    Example (offline; an engine start takes about a minute on a CPU):

    ```python
    >>> from vllm import LLM, SamplingParams  # doctest: +SKIP
    >>> from guidance.vllm import ClassifierLogitsProcessor, default_model_folder  # doctest: +SKIP
    >>> llm = LLM(model=str(default_model_folder()), logits_processors=[ClassifierLogitsProcessor])  # doctest: +SKIP
    >>> params = SamplingParams(temperature=0, max_tokens=20,
    ...                         extra_args={"classifier_alpha": 4.0, "classifier_label": "positive"})  # doctest: +SKIP
    >>> llm.generate(["The movie was"], params)[0].outputs[0].text  # doctest: +SKIP
    ```
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # The transformers adapter's text cache, reused.
        from guidance.lm.steering.candidates import CandidateTexts

        self.vllm_config = vllm_config
        self.table: RowTable[_Row] = RowTable()
        self._classifier: Any = None
        self._tokenizer: Any = None
        self._texts_cls = CandidateTexts
        self._texts: Any = None
        self.stats = {"steps": 0, "classifier_calls": 0, "rows_scored": 0, "texts_scored": 0}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        admission_check(classifier_settings, sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def load_classifier(self) -> Any:
        """The ``texts -> probabilities`` classifier (called once, on first use)."""
        extra = getattr(self.vllm_config, "additional_config", None) or {}
        path = extra.get("guidance_classifier", DEFAULT_CLASSIFIER) if isinstance(extra, dict) else DEFAULT_CLASSIFIER
        return _load_factory(path)

    def _ready(self) -> None:
        if self._classifier is None:
            from transformers import AutoTokenizer

            config = self.vllm_config.model_config
            self._tokenizer = AutoTokenizer.from_pretrained(
                config.tokenizer, revision=config.tokenizer_revision, trust_remote_code=config.trust_remote_code
            )
            self._texts = self._texts_cls(self._tokenizer)
            self._classifier = self.load_classifier()

    def _label(self, label: int | str | None, columns: int) -> Any:
        """The probability column of ``label`` (None: the single output, or the last class); ``_UNKNOWN`` if none."""
        if label is None:
            return None if columns <= 1 else columns - 1
        if isinstance(label, str):
            names = getattr(self._classifier, "label2id", None) or {}
            if label not in names:
                logger.warning("classifier_label %r is not one of %s; the request is not steered.", label, sorted(names))
                return _UNKNOWN
            return names[label]
        if not -columns <= label < max(columns, 1):
            logger.warning("classifier_label %r is out of range for %d classes; the request is not steered.", label, columns)
            return _UNKNOWN
        return label

    def _attribute_log_probs(self, raw: Any, count: int, label: int | str | None) -> Tensor | None:
        values = torch.as_tensor(raw)
        columns = values.shape[1] if values.ndim == 2 else 1
        column = self._label(label, columns)
        if column is _UNKNOWN:
            return None
        return attribute_log_probs(as_probabilities(values, count, column))

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def make(params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> _Row | None:
            settings = classifier_settings(params)
            return None if settings is None else _Row(settings, list(prompt_ids or ()), output_ids)

        self.table.update(batch_update, make)

    def apply(self, logits: Tensor) -> Tensor:
        if not self.table.rows:
            return logits
        self._ready()
        self.stats["steps"] += 1
        rows = sorted(self.table.rows)
        states = [self.table.rows[r] for r in rows]
        candidates = []
        for row, state in zip(rows, states, strict=True):
            ids, finite = top_k_candidates(logits[row : row + 1], min(state.settings.top_k, logits.shape[-1]))
            candidates.append([t for t, ok in zip(ids[0].tolist(), finite[0].tolist(), strict=True) if ok])
        prefixes = [state.prompt_ids + list(state.output_ids) for state in states]
        _, texts = self._texts(prefixes, candidates)
        unique = list(dict.fromkeys(text for row_texts in texts for text in row_texts))
        position = {text: i for i, text in enumerate(unique)}
        raw = self._classifier(unique)
        self.stats["classifier_calls"] += 1
        self.stats["rows_scored"] += len(rows)
        self.stats["texts_scored"] += len(unique)
        by_label: dict[Any, Tensor | None] = {}
        for row, state, ids, row_texts in zip(rows, states, candidates, texts, strict=True):
            label = state.settings.label
            if label not in by_label:
                by_label[label] = self._attribute_log_probs(raw, len(unique), label)
            if by_label[label] is None or not ids:
                continue
            log_probs = by_label[label][[position[t] for t in row_texts]]
            index = torch.tensor([ids], dtype=torch.long, device=logits.device)
            logits[row] = classifier_weighted_logits(
                logits[row : row + 1].float(), index, log_probs[None].to(logits.device), state.settings.alpha
            )[0].to(logits.dtype)
        return logits
