"""CAIF/FUDGE as a transformers ``LogitsProcessor``: classifier-weighted top-k candidates.

The math is :func:`guidance.classifier.classifier_weighted_logits`; this module decodes the
candidates to text, calls the classifier once per step and hands the log-probabilities over.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import LongTensor, Tensor
from transformers import LogitsProcessor, PreTrainedModel

from guidance.classifier import (
    OUTSIDE_TOP_K,
    TextClassifier,
    as_probabilities,
    attribute_log_probs,
    classifier_weighted_logits,
    entropy,
    top_k_candidates,
    validate_top_k,
)
from guidance.lm.generation_state import GenerationTracker
from guidance.lm.steering.candidates import CandidateTexts
from guidance.lm.steering.classifiers import as_text_classifier, resolve_label
from guidance.validation import check_bool, check_choice, check_finite, check_int, check_range

__all__ = ["ClassifierWeightedLogitsProcessor"]


def _check_options(entropy_threshold: Any, context_tokens: Any, outside_top_k: Any) -> None:
    if entropy_threshold is not None:
        check_range(entropy_threshold, "entropy_threshold", 0.0, math.inf, hi_open=True)
    if context_tokens is not None:
        check_int(context_tokens, "context_tokens", minimum=1)
    check_choice(outside_top_k, "outside_top_k", OUTSIDE_TOP_K)


def _unique_texts(candidate_texts: list[list[str]], prefix_texts: list[str] | None) -> dict[str, int]:
    """Each distinct text once, with its position in the classifier's batch."""
    unique: dict[str, int] = {}
    for row_texts in candidate_texts:
        for text in row_texts:
            unique.setdefault(text, len(unique))
    for text in prefix_texts or ():
        unique.setdefault(text, len(unique))
    return unique


class ClassifierWeightedLogitsProcessor(LogitsProcessor):
    r"""CAIF/FUDGE: reweight each row's top-k candidates by a text classifier of the attribute.

    For every row the ``top_k`` highest-scoring tokens are candidates; the texts
    ``prefix + token`` (decoded with the LM's ``tokenizer``) are scored by ``classifier`` in
    ONE call per step for all rows and candidates (duplicate texts scored once), and
    ``alpha * log p(attribute | prefix + token)`` is added to each candidate's score (see
    :func:`guidance.classifier.classifier_weighted_logits`). ``alpha > 0`` steers toward the
    attribute, ``alpha < 0`` away from it, ``alpha = 0`` returns the scores untouched (no
    classifier call, no filtering), so generation is bit-identical to plain ``generate``.

    Tokens outside the top k are removed (``outside_top_k="remove"``, CAIF/FUDGE), or kept
    with ``alpha * log p(attribute | prefix)`` added (``outside_top_k="prefix"``). Special
    tokens (EOS) decode to nothing, so their text is the prefix itself: stopping now is
    scored as the text so far. Candidate texts are built from the previous step's decode plus
    a short-window decode of the new token (equal to a full decode). A new generation is
    detected by :class:`guidance.lm.generation_state.GenerationTracker`.

    Args:
        tokenizer: the generating LM's tokenizer (turns token ids into text).
        classifier: a ``texts -> probabilities`` callable (shape ``(N,)`` or ``(N, C)``, values
            in ``[0, 1]``), a transformers sequence-classification model (give
            ``classifier_tokenizer``), or a :class:`SentenceEncoderClassifier`.
        alpha (`float`): classifier weight, any finite number; 0 is off.
        top_k (`int`): candidates scored per row, ``1 <= top_k <= vocab size`` (CAIF uses 20-100,
            FUDGE 200). Default 20.
        label (`int | str`, *optional*): the attribute's column when the classifier returns
            ``(N, C)``: an index in ``[0, C)``, or a name from the classifier's ``label2id``.
        classifier_tokenizer: the classification model's tokenizer (for a transformers model).
        entropy_threshold (`float >= 0`, *optional*): rows whose next-token entropy (nats) is
            below this are left untouched and not scored (the LM is confident; CAIF's
            speed-up). ``None`` (default): score all rows.
        include_prompt (`bool`): classify the prompt with the continuation (default) or the
            generated continuation only.
        context_tokens (`int >= 1`, *optional*): classify at most the last ``context_tokens``
            LM tokens of the prefix (bounds the classifier's cost). ``None``: the whole text.
        outside_top_k (`str`): ``"remove"`` (default) or ``"prefix"``, see above.
        filter_value (`float`): the score of removed tokens, a number in ``[-inf, inf)``. Default ``-inf``.

    Incoming scores with NaN, and classifier answers with NaN, infinities or values outside
    ``[0, 1]``, raise ``ValueError``. ``stats`` counts steps, classifier calls, texts scored,
    rows scored and rows skipped since construction.

    Example:
        >>> import torch
        >>> from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessorList
        >>> from guidance.lm.steering import ClassifierWeightedLogitsProcessor
        >>> from guidance.models.sentiment import encoder_path
        >>> tokenizer = AutoTokenizer.from_pretrained(encoder_path())  # any tokenizer will do here
        >>> _ = torch.manual_seed(0)
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                   pad_token_id=0, eos_token_id=102, bos_token_id=101)).eval()
        >>> def likes_the(texts):  # p(attribute | text): texts whose last word is "the" are on-attribute
        ...     return torch.tensor([0.99 if t.split()[-1:] == ["the"] else 0.01 for t in texts])
        >>> steer = ClassifierWeightedLogitsProcessor(tokenizer, likes_the, alpha=10.0, top_k=len(tokenizer))
        >>> prompt = tokenizer("hello", return_tensors="pt", add_special_tokens=False).input_ids
        >>> out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
        ...                   suppress_tokens=tokenizer.all_special_ids, logits_processor=LogitsProcessorList([steer]))
        >>> tokenizer.decode(out[0, prompt.shape[1]:])
        'the the the'
    """

    def __init__(
        self,
        tokenizer: Any,
        classifier: TextClassifier | PreTrainedModel,
        alpha: float,
        top_k: int = 20,
        *,
        label: int | str | None = None,
        classifier_tokenizer: Any = None,
        entropy_threshold: float | None = None,
        include_prompt: bool = True,
        context_tokens: int | None = None,
        outside_top_k: str = "remove",
        filter_value: float = -math.inf,
    ) -> None:
        check_finite(alpha, "alpha")
        validate_top_k(top_k, len(tokenizer) if hasattr(tokenizer, "__len__") else None)
        _check_options(entropy_threshold, context_tokens, outside_top_k)
        include_prompt = check_bool(include_prompt, "include_prompt")
        filter_value = check_range(filter_value, "filter_value", -math.inf, math.inf, hi_open=True)
        self.tokenizer = tokenizer
        self.classifier = as_text_classifier(classifier, classifier_tokenizer)
        self.label = resolve_label(label, self.classifier)
        self.alpha = float(alpha)
        self.top_k = top_k
        self.entropy_threshold = entropy_threshold
        self.include_prompt = include_prompt
        self.context_tokens = context_tokens
        self.outside_top_k = outside_top_k
        self.filter_value = filter_value
        self.stats = dict.fromkeys(
            ("steps", "classifier_calls", "texts_scored", "rows_scored", "rows_skipped"), 0
        )
        self._texts = CandidateTexts(tokenizer)
        self._tracker = GenerationTracker()

    def _prefix_ids(self, row: Tensor) -> list[int]:
        ids = row if self.include_prompt else row[self._tracker.prompt_length :]
        if self.context_tokens is not None:
            ids = ids[-self.context_tokens :]
        return ids.tolist()

    def _rows_to_score(self, scores: Tensor) -> Tensor:
        if self.entropy_threshold is None:
            rows = torch.arange(scores.shape[0], device=scores.device)
        else:
            rows = torch.nonzero(entropy(scores) >= self.entropy_threshold).flatten()
        self.stats["rows_skipped"] += scores.shape[0] - rows.numel()
        self.stats["rows_scored"] += rows.numel()
        return rows

    def _classify(self, texts: list[str]) -> Tensor:
        """``log p(attribute | text)`` for each text, from one classifier call."""
        probs = as_probabilities(self.classifier(texts), len(texts), self.label)
        self.stats["classifier_calls"] += 1
        self.stats["texts_scored"] += len(texts)
        return attribute_log_probs(probs)

    def _candidate_log_probs(
        self, input_rows: Tensor, candidate_ids: Tensor, finite: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """``(B, K)`` classifier log-probs of the finite candidates (0 elsewhere), and of the prefixes."""
        prefixes = [self._prefix_ids(row) for row in input_rows]
        finite_lists = finite.cpu().tolist()
        # Only finite candidates are worth scoring; masked ones stay -inf whatever they get.
        wanted = [
            [token for token, ok in zip(ids, oks, strict=True) if ok]
            for ids, oks in zip(candidate_ids.cpu().tolist(), finite_lists, strict=True)
        ]
        prefix_texts, candidate_texts = self._texts(prefixes, wanted)
        with_prefix = prefix_texts if self.outside_top_k == "prefix" else None
        unique = _unique_texts(candidate_texts, with_prefix)
        log_probs = self._classify(list(unique))
        candidate_log_probs = torch.zeros(candidate_ids.shape, dtype=torch.float32)
        for r, (oks, row_texts) in enumerate(zip(finite_lists, candidate_texts, strict=True)):
            columns = [k for k, ok in enumerate(oks) if ok]
            if columns:
                candidate_log_probs[r, columns] = log_probs[[unique[text] for text in row_texts]]
        prefix_log_probs = None if with_prefix is None else log_probs[[unique[t] for t in with_prefix]]
        return candidate_log_probs, prefix_log_probs

    @torch.no_grad()
    def __call__(self, input_ids: LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.alpha == 0:
            return scores
        validate_top_k(self.top_k, scores.shape[-1])
        if bool(torch.isnan(scores).any()):
            raise ValueError("`scores` contain NaN; classifier weighting needs finite or -inf scores.")
        if self._tracker.update(input_ids):
            self._texts.reset()
        self.stats["steps"] += 1
        rows = self._rows_to_score(scores)
        if rows.numel() == 0:
            return scores
        row_scores = scores[rows]
        candidate_ids, finite = top_k_candidates(row_scores, self.top_k)
        input_rows = input_ids[rows.to(input_ids.device)].cpu()
        candidate_log_probs, prefix_log_probs = self._candidate_log_probs(input_rows, candidate_ids, finite)
        guided = classifier_weighted_logits(
            row_scores,
            candidate_ids,
            candidate_log_probs.to(scores.device),
            self.alpha,
            outside_top_k=self.outside_top_k,
            prefix_log_probs=None if prefix_log_probs is None else prefix_log_probs.to(scores.device),
            filter_value=self.filter_value,
        )
        if rows.numel() == scores.shape[0]:
            return guided
        out = scores.to(guided.dtype).clone()
        out[rows] = guided
        return out
