"""transformers adapters for classifier-weighted logits (CAIF/FUDGE and GeDi).

Both processors are ordinary ``LogitsProcessor`` objects: pass them to
``model.generate(logits_processor=LogitsProcessorList([...]))``, alone or together with CFG
(``custom_generate=cfg_generate`` passes the list through) and with any sampling warper.
transformers runs user processors before its temperature/top-k/top-p/typical warpers, so
they see the model's (or the CFG-guided) scores. The math lives in :mod:`guidance.classifier`.

Classifiers are used through text, so their tokenizer need not match the LM's:

* any callable ``texts -> probabilities`` of shape ``(N,)`` or ``(N, C)``;
* a transformers sequence-classification model with its tokenizer
  (:class:`TransformersTextClassifier`, built for you when you pass the model and
  ``classifier_tokenizer``);
* a torch head over a sentence encoder (:class:`SentenceEncoderClassifier`), such as the
  shipped sentiment head in :mod:`guidance.models.sentiment`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import LongTensor, Tensor, nn
from transformers import LogitsProcessor, PreTrainedModel

from guidance.classifier import (
    OUTSIDE_TOP_K,
    TextClassifier,
    as_probabilities,
    attribute_log_probs,
    classifier_weighted_logits,
    entropy,
    gedi_class_log_probs,
    gedi_logits,
    top_k_candidates,
    validate_top_k,
)
from guidance.ops import validate_scale

__all__ = [
    "ClassifierWeightedLogitsProcessor",
    "GeDiLogitsProcessor",
    "SentenceEncoderClassifier",
    "TransformersTextClassifier",
    "as_text_classifier",
    "mean_pool",
]

# Float32 logits of the prompt that GeDi's prefill may hold at once (512 MiB); longer prompts
# are scored in chunks of rows.
_PROMPT_LOGITS_BUDGET = 2**27

# Tokens of context decoded together with a candidate, so that merges across the boundary
# (leading spaces, WordPiece "##", multi-byte characters) come out as in a full decode.
_DECODE_WINDOW = 6


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``(N, L, D)`` over the positions where ``attention_mask`` is 1."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class TransformersTextClassifier:
    """A transformers sequence-classification model used as ``texts -> probabilities``.

    Returns ``(N, C)`` softmax probabilities (sigmoid for ``num_labels == 1``, giving
    ``(N,)``, and for ``problem_type="multi_label_classification"``). ``label2id`` comes from
    the model config, so a processor's ``label`` may name a class.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
        >>> from guidance.models.sentiment import encoder_path
        >>> from guidance.lm.steering import TransformersTextClassifier
        >>> tokenizer = BertTokenizerFast.from_pretrained(encoder_path())
        >>> _ = torch.manual_seed(0)
        >>> config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=32, num_labels=2)
        >>> classify = TransformersTextClassifier(BertForSequenceClassification(config).eval(), tokenizer)
        >>> classify(["good", "bad"]).shape
        torch.Size([2, 2])
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, *, max_length: int = 256, batch_size: int = 256
    ) -> None:
        if tokenizer is None:
            raise ValueError("`classifier_tokenizer` is required with a transformers classification model.")
        if max_length < 1 or batch_size < 1:
            raise ValueError(
                f"`max_length` and `batch_size` must be positive, got {max_length} and {batch_size}."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        config = model.config
        self.label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        self._sigmoid = (
            config.num_labels == 1 or getattr(config, "problem_type", None) == "multi_label_classification"
        )

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        device = _model_device(self.model)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            logits = self.model(**batch).logits.float()
            chunks.append(torch.sigmoid(logits) if self._sigmoid else torch.softmax(logits, dim=-1))
        probs = torch.cat(chunks).cpu()
        return probs[:, 0] if probs.shape[-1] == 1 else probs


class SentenceEncoderClassifier:
    """A torch ``head`` over mean-pooled (optionally L2-normalised) sentence-encoder embeddings.

    ``encoder`` is a transformers encoder (``AutoModel``) and ``tokenizer`` its tokenizer;
    ``head`` maps ``(N, D)`` embeddings to ``(N, C)`` logits (softmax) or ``(N,)``/``(N, 1)``
    logits (sigmoid). ``labels`` names the classes so that a processor's ``label`` may be a
    name.

    Example:
        >>> import torch
        >>> from guidance.lm.steering import SentenceEncoderClassifier
        >>> from guidance.models.sentiment import load_encoder
        >>> encoder, tokenizer = load_encoder()
        >>> head = torch.nn.Linear(encoder.config.hidden_size, 2)
        >>> classify = SentenceEncoderClassifier(encoder, tokenizer, head, labels=["negative", "positive"])
        >>> probs = classify(["What a lovely day.", "This is awful."])
        >>> probs.shape, bool(torch.allclose(probs.sum(-1), torch.ones(2)))
        (torch.Size([2, 2]), True)
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        head: nn.Module,
        *,
        normalize: bool = True,
        labels: Sequence[str] | None = None,
        max_length: int = 256,
        batch_size: int = 256,
    ) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError(
                f"`max_length` and `batch_size` must be positive, got {max_length} and {batch_size}."
            )
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.head = head.eval()
        self.normalize = normalize
        self.max_length = max_length
        self.batch_size = batch_size
        self.label2id = {name: index for index, name in enumerate(labels or ())}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """``(N, D)`` sentence embeddings (mean pooling, L2-normalised if ``normalize``)."""
        device = _model_device(self.encoder)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                padding_side="right",  # absolute position embeddings (BERT) must start at 0
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            hidden = self.encoder(**batch).last_hidden_state
            pooled = mean_pool(hidden.float(), batch["attention_mask"])
            chunks.append(nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled)
        if not chunks:
            return torch.zeros(0, getattr(self.encoder.config, "hidden_size", 0))
        return torch.cat(chunks)

    @torch.no_grad()
    def probabilities(self, embeddings: Tensor) -> Tensor:
        """Class probabilities from embeddings (softmax over ``C > 1`` logits, else sigmoid)."""
        head_device = _model_device(self.head)
        logits = self.head(embeddings.to(head_device)).float().cpu()
        if logits.ndim == 2 and logits.shape[-1] > 1:
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits.reshape(-1))

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return self.probabilities(self.embed(texts))


def as_text_classifier(classifier: Any, classifier_tokenizer: Any = None) -> TextClassifier:
    """Wrap a transformers classification model; pass a ``texts -> probabilities`` callable through."""
    if isinstance(classifier, PreTrainedModel):
        return TransformersTextClassifier(classifier, classifier_tokenizer)
    if isinstance(classifier, nn.Module):
        raise ValueError(
            "`classifier` is a torch module that is not a transformers classification model; wrap a head over a "
            "sentence encoder with `SentenceEncoderClassifier(encoder, tokenizer, head)`."
        )
    if not callable(classifier):
        raise ValueError(
            f"`classifier` must be callable on a list of texts, got {type(classifier).__name__}."
        )
    return classifier


def _resolve_label(label: int | str | None, classifier: Any) -> int | None:
    if label is None or (isinstance(label, int) and not isinstance(label, bool)):
        return label
    if isinstance(label, str):
        label2id = getattr(classifier, "label2id", None) or {}
        if label not in label2id:
            raise ValueError(f"`label` {label!r} is not one of the classifier's labels {sorted(label2id)}.")
        return label2id[label]
    raise ValueError(f"`label` must be a class index, a class name or None, got {label!r}.")


class _CandidateTexts:
    """Texts of ``prefix`` and ``prefix + token`` for a step's candidates, reusing earlier decodes.

    A step's candidate texts are remembered; at the next step the chosen candidate's text is
    the new prefix text (no full decode). Each candidate's text is the prefix text plus the
    difference between decoding the last few prefix tokens with and without the candidate,
    falling back to a full decode where that difference is not a plain suffix (an incomplete
    multi-byte character, a tokenizer clean-up rule).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._known: dict[tuple[int, ...], str] = {}
        self.full_decodes = 0

    def reset(self) -> None:
        self._known = {}

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prefix_text(self, prefix: Sequence[int]) -> str:
        text = self._known.get(tuple(prefix))
        if text is None:
            self.full_decodes += 1
            text = self._decode(prefix)
        return text

    def __call__(
        self, prefixes: list[list[int]], candidates: list[list[int]]
    ) -> tuple[list[str], list[list[str]]]:
        prefix_texts = [self.prefix_text(prefix) for prefix in prefixes]
        tails = [prefix[-_DECODE_WINDOW:] for prefix in prefixes]
        decode = self.tokenizer.batch_decode
        bases = decode(tails, skip_special_tokens=True)
        extended = decode(
            [tail + [token] for tail, row in zip(tails, candidates, strict=True) for token in row],
            skip_special_tokens=True,
        )
        known: dict[tuple[int, ...], str] = {}
        texts: list[list[str]] = []
        position = 0
        for prefix, prefix_text, base, row in zip(prefixes, prefix_texts, bases, candidates, strict=True):
            row_texts = []
            key = tuple(prefix)
            for token in row:
                full = extended[position]
                position += 1
                if full.startswith(base) and not base.endswith("\ufffd"):
                    text = prefix_text + full[len(base) :]
                else:
                    self.full_decodes += 1
                    text = self._decode([*prefix, token])
                known[(*key, token)] = text
                row_texts.append(text)
            texts.append(row_texts)
        self._known = known
        return prefix_texts, texts


class _GenerationTracker:
    """Notices when ``input_ids`` start a new generation rather than extend the last one by a token."""

    def __init__(self) -> None:
        self.prompt_length = 0
        self._prompt: Tensor | None = None
        self._length = -1

    def update(self, input_ids: LongTensor) -> bool:
        """Record ``input_ids``; True if they begin a new generation."""
        continues = (
            self._prompt is not None
            and input_ids.shape[1] == self._length + 1
            and input_ids.shape[0] == self._prompt.shape[0]
            and torch.equal(input_ids[:, : self.prompt_length], self._prompt.to(input_ids.device))
        )
        self._length = input_ids.shape[1]
        if not continues:
            self.prompt_length = input_ids.shape[1]
            self._prompt = input_ids.detach().clone()
        return not continues


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
    a short-window decode of the new token (equal to a full decode; a full decode is the
    fallback where a character is split across tokens).

    Args:
        tokenizer: the generating LM's tokenizer (to turn token ids into text).
        classifier: a ``texts -> probabilities`` callable (shape ``(N,)`` or ``(N, C)``), a
            transformers sequence-classification model (give ``classifier_tokenizer``), or a
            :class:`SentenceEncoderClassifier`.
        alpha: classifier weight, any finite number.
        top_k: candidates scored per row (CAIF uses 20-100, FUDGE 200).
        label: the attribute's column when the classifier returns ``(N, C)``: an index, or a
            name from the classifier's ``label2id``.
        classifier_tokenizer: the classification model's tokenizer (for a transformers model).
        entropy_threshold: rows whose next-token entropy (nats) is below this are left
            untouched and not scored (the LM is confident; CAIF's speed-up). ``None``: score all.
        include_prompt: classify the prompt with the continuation (default) or the
            generated continuation only.
        context_tokens: classify at most the last ``context_tokens`` LM tokens of the prefix
            (bounds the classifier's cost on long texts). ``None``: the whole text.
        outside_top_k: ``"remove"`` or ``"prefix"``, see above.
        filter_value: the score given to removed tokens.

    ``stats`` counts classifier calls, texts scored and rows skipped, since construction.

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
        validate_scale(alpha, "alpha")
        validate_top_k(top_k, len(tokenizer) if hasattr(tokenizer, "__len__") else None)
        if entropy_threshold is not None and (
            isinstance(entropy_threshold, bool)
            or not isinstance(entropy_threshold, (int, float))
            or not math.isfinite(entropy_threshold)
            or entropy_threshold < 0
        ):
            raise ValueError(
                f"`entropy_threshold` must be None or a finite number >= 0 (nats), got {entropy_threshold!r}."
            )
        if context_tokens is not None and (
            isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1
        ):
            raise ValueError(f"`context_tokens` must be None or a positive integer, got {context_tokens!r}.")
        if outside_top_k not in OUTSIDE_TOP_K:
            raise ValueError(f"`outside_top_k` must be one of {OUTSIDE_TOP_K}, got {outside_top_k!r}.")
        self.tokenizer = tokenizer
        self.classifier = as_text_classifier(classifier, classifier_tokenizer)
        self.label = _resolve_label(label, self.classifier)
        self.alpha = float(alpha)
        self.top_k = top_k
        self.entropy_threshold = entropy_threshold
        self.include_prompt = include_prompt
        self.context_tokens = context_tokens
        self.outside_top_k = outside_top_k
        self.filter_value = filter_value
        self.stats = {
            "steps": 0,
            "classifier_calls": 0,
            "texts_scored": 0,
            "rows_scored": 0,
            "rows_skipped": 0,
        }
        self._texts = _CandidateTexts(tokenizer)
        self._tracker = _GenerationTracker()

    def _prefix_ids(self, row: Tensor) -> list[int]:
        ids = row if self.include_prompt else row[self._tracker.prompt_length :]
        if self.context_tokens is not None:
            ids = ids[-self.context_tokens :]
        return ids.tolist()

    @torch.no_grad()
    def __call__(self, input_ids: LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.alpha == 0:
            return scores
        validate_top_k(self.top_k, scores.shape[-1])
        if self._tracker.update(input_ids):
            self._texts.reset()
        self.stats["steps"] += 1
        if self.entropy_threshold is None:
            rows = torch.arange(scores.shape[0], device=scores.device)
        else:
            rows = torch.nonzero(entropy(scores) >= self.entropy_threshold).flatten()
        self.stats["rows_skipped"] += scores.shape[0] - rows.numel()
        if rows.numel() == 0:
            return scores
        self.stats["rows_scored"] += rows.numel()
        row_scores = scores[rows]
        candidate_ids, finite = top_k_candidates(row_scores, self.top_k)
        input_rows = input_ids[rows.to(input_ids.device)].cpu()
        prefixes = [self._prefix_ids(row) for row in input_rows]
        candidate_lists = candidate_ids.cpu().tolist()
        finite_lists = finite.cpu().tolist()
        # Only finite candidates are worth scoring; masked ones stay -inf whatever they get.
        wanted = [
            [token for token, ok in zip(ids, oks, strict=True) if ok]
            for ids, oks in zip(candidate_lists, finite_lists, strict=True)
        ]
        prefix_texts, candidate_texts = self._texts(prefixes, wanted)
        unique: dict[str, int] = {}
        for row_texts in candidate_texts:
            for text in row_texts:
                unique.setdefault(text, len(unique))
        if self.outside_top_k == "prefix":
            for text in prefix_texts:
                unique.setdefault(text, len(unique))
        texts = list(unique)
        probs = as_probabilities(self.classifier(texts), len(texts), self.label)
        self.stats["classifier_calls"] += 1
        self.stats["texts_scored"] += len(texts)
        log_probs = attribute_log_probs(probs)
        candidate_log_probs = torch.zeros(candidate_ids.shape, dtype=torch.float32)
        for r, (oks, row_texts) in enumerate(zip(finite_lists, candidate_texts, strict=True)):
            columns = [k for k, ok in enumerate(oks) if ok]
            if columns:
                candidate_log_probs[r, columns] = log_probs[[unique[text] for text in row_texts]]
        prefix_log_probs = None
        if self.outside_top_k == "prefix":
            prefix_log_probs = log_probs[[unique[text] for text in prefix_texts]]
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


class GeDiLogitsProcessor(LogitsProcessor):
    r"""GeDi: weight every token by ``p(desired class | prefix + token)`` from a class-conditional LM.

    The class-conditional LM ``class_lm`` is run once per class on
    ``class_prompts[c] + prompt + generated`` (all classes and rows in one batched forward
    per step, each with its KV cache), and Bayes' rule over the classes gives, for the whole
    vocabulary at once, ``log p(class | prefix + v)`` length-normalised as in GeDi (see
    :func:`guidance.classifier.gedi_class_log_probs`). The processor returns
    ``scores + omega * log p(desired_class | prefix + v)``; ``omega = 0`` is off (scores
    untouched, no forward). ``class_lm`` may be the generating model itself under attribute
    prompts (no extra model, one extra batched forward per step) or a separate small LM that
    shares the generating LM's vocabulary.

    Args:
        class_lm: a transformers causal LM.
        class_prompts: one prompt per class (at least 2): strings (encoded with
            ``tokenizer``, no special tokens added) or token-id lists; each must be non-empty.
        omega: the class weight (GeDi's ``disc_weight``); negative steers away.
        tokenizer: needed for string prompts; its ``pad_token_id`` marks left padding.
        desired_class: the index of the class to steer toward.
        class_bias: per-class bias added after length normalisation (a log prior).
        logit_scale: GeDi's ``logit_scale`` (1 for an LM that was not trained as GeDi).
        length_normalize: divide the class log-likelihoods by the number of scored tokens.
        score_prompt: include the prompt's tokens in the class log-likelihoods (GeDi does);
            otherwise only generated tokens count.
        pad_token_id: the id of left padding in ``input_ids`` (default: the tokenizer's).

    ``stats`` counts steps, full prefills (a new generation) and beam reorderings of the cache.

    GeDi's extra filtering heuristic (dropping low-``p(desired)`` tokens from the nucleus)
    is not applied; combine with ``top_p``/``typical_p`` for that role.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
        >>> from guidance.lm.steering import GeDiLogitsProcessor
        >>> _ = torch.manual_seed(0)
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                   num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
        >>> gedi = GeDiLogitsProcessor(lm, class_prompts=[[5, 6], [7, 8]], omega=3.0, pad_token_id=0)
        >>> prompt = torch.tensor([[1, 2, 3]])
        >>> out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
        ...                   logits_processor=LogitsProcessorList([gedi]))
        >>> out.shape
        torch.Size([1, 7])
    """

    def __init__(
        self,
        class_lm: PreTrainedModel,
        class_prompts: Sequence[str | Sequence[int]],
        omega: float,
        *,
        tokenizer: Any = None,
        desired_class: int = 0,
        class_bias: Sequence[float] | Tensor | None = None,
        logit_scale: float = 1.0,
        length_normalize: bool = True,
        score_prompt: bool = True,
        pad_token_id: int | None = None,
    ) -> None:
        validate_scale(omega, "omega")
        validate_scale(logit_scale, "logit_scale")
        if isinstance(class_prompts, str) or len(class_prompts) < 2:
            raise ValueError(
                f"`class_prompts` must hold at least 2 prompts (one per class), got {class_prompts!r}."
            )
        prompt_ids: list[list[int]] = []
        for prompt in class_prompts:
            if isinstance(prompt, str):
                if tokenizer is None:
                    raise ValueError("`tokenizer` is required when `class_prompts` are strings.")
                ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
            else:
                ids = [int(token) for token in prompt]
            if not ids:
                raise ValueError(
                    f"Every class prompt must be non-empty (it predicts the first token), got {prompt!r}."
                )
            prompt_ids.append(ids)
        if (
            isinstance(desired_class, bool)
            or not isinstance(desired_class, int)
            or not 0 <= desired_class < len(prompt_ids)
        ):
            raise ValueError(
                f"`desired_class` must be an index in [0, {len(prompt_ids)}), got {desired_class!r}."
            )
        if class_bias is not None:
            bias = torch.as_tensor(class_bias, dtype=torch.float32)
            if bias.shape != (len(prompt_ids),) or not bool(torch.isfinite(bias).all()):
                raise ValueError(
                    f"`class_bias` must be {len(prompt_ids)} finite numbers, got {class_bias!r}."
                )
            class_bias = bias
        self.class_lm = class_lm
        self.class_prompt_ids = prompt_ids
        self.omega = float(omega)
        self.desired_class = desired_class
        self.class_bias = class_bias
        self.logit_scale = float(logit_scale)
        self.length_normalize = length_normalize
        self.score_prompt = score_prompt
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = pad_token_id
        self.stats = {"steps": 0, "prefills": 0, "reorders": 0}
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(class_lm.forward).parameters
        self._state: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_prompt_ids)

    def _content(self, row: list[int]) -> list[int]:
        start = 0
        if self.pad_token_id is not None:
            while start < len(row) - 1 and row[start] == self.pad_token_id:
                start += 1
        return row[start:]

    def _forward(self, keep: int | None, **inputs: Any) -> Any:
        if keep is not None and self._accepts_logits_to_keep:
            inputs["logits_to_keep"] = keep
        return self.class_lm(**inputs)

    def _content_log_likelihood(self, logits: Tensor, ids: Tensor, lengths: Tensor, longest: int) -> Tensor:
        """``sum_j log P(x_j | x_<j)`` over each row's last ``lengths[row]`` tokens, from the last logits."""
        logits = logits[:, -longest - 1 : -1].float()
        targets = ids[:, -longest:]
        token_log_probs = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
        scored = (
            torch.arange(longest, device=ids.device)[None, :] >= (longest - lengths.to(ids.device))[:, None]
        )
        return torch.where(scored, token_log_probs, torch.zeros((), device=ids.device)).sum(-1)

    def _prefill(self, input_ids: LongTensor) -> None:
        device = _model_device(self.class_lm)
        contents = [self._content(row) for row in input_ids.tolist()]
        sequences = [prompt + content for prompt in self.class_prompt_ids for content in contents]
        length = max(len(seq) for seq in sequences)
        ids = torch.zeros(len(sequences), length, dtype=torch.long)
        mask = torch.zeros(len(sequences), length, dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, length - len(seq) :] = torch.tensor(seq)
            mask[i, length - len(seq) :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, position_ids = ids.to(device), mask.to(device), position_ids.to(device)
        batch = input_ids.shape[0]
        lengths = torch.tensor([len(content) for content in contents]).repeat(self.num_classes)
        longest = int(lengths.max())
        vocab = int(getattr(self.class_lm.config, "vocab_size", 0) or 0)
        rows_per_pass = max(1, _PROMPT_LOGITS_BUDGET // max(1, (longest + 1) * vocab))
        one_pass = self.score_prompt and rows_per_pass >= len(sequences)
        out = self._forward(
            longest + 1 if one_pass else 1,
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
        )
        if not self.score_prompt:
            prefix_ll = torch.zeros(len(sequences), device=device)
            counts = torch.zeros(batch)
        elif one_pass:
            prefix_ll = self._content_log_likelihood(out.logits, ids, lengths, longest)
            counts = lengths[:batch].to(torch.float32)
        else:  # long prompts: score them in row chunks so the logits never exceed the budget
            chunks = []
            for first in range(0, len(sequences), rows_per_pass):
                rows = slice(first, first + rows_per_pass)
                chunk = self._forward(
                    longest + 1,
                    input_ids=ids[rows],
                    attention_mask=mask[rows],
                    position_ids=position_ids[rows],
                    use_cache=False,
                )
                chunks.append(self._content_log_likelihood(chunk.logits, ids[rows], lengths[rows], longest))
            prefix_ll = torch.cat(chunks)
            counts = lengths[:batch].to(torch.float32)
        logits = out.logits[:, -1].float()
        self._state = {
            "cache": out.past_key_values,
            "mask": mask,
            "position": position_ids[:, -1],
            "next_log_probs": torch.log_softmax(logits, dim=-1).view(self.num_classes, batch, -1),
            "prefix_ll": prefix_ll.view(self.num_classes, batch).to(logits.device),
            "counts": counts.to(logits.device),
            "input_ids": input_ids.detach().clone(),
        }

    def _advance(self, input_ids: LongTensor) -> None:
        state = self._state
        assert state is not None
        device = state["mask"].device
        tokens = input_ids[:, -1].to(device)
        next_log_probs = state["next_log_probs"]
        state["prefix_ll"] = (
            state["prefix_ll"]
            + next_log_probs.gather(-1, tokens.view(1, -1, 1).expand(self.num_classes, -1, 1))[..., 0]
        )
        state["counts"] = state["counts"] + 1
        step_ids = tokens.repeat(self.num_classes)[:, None]
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(step_ids.shape)], dim=-1)
        state["position"] = state["position"] + 1
        out = self.class_lm(
            input_ids=step_ids,
            attention_mask=state["mask"],
            position_ids=state["position"][:, None],
            past_key_values=state["cache"],
            use_cache=True,
        )
        state["cache"] = out.past_key_values
        state["next_log_probs"] = torch.log_softmax(out.logits[:, -1].float(), dim=-1).view(
            self.num_classes, input_ids.shape[0], -1
        )
        state["input_ids"] = input_ids.detach().clone()

    def _reorder(self, input_ids: LongTensor) -> bool:
        """Follow a beam-search reordering of rows; False if some row has no parent row."""
        state = self._state
        assert state is not None
        previous = state["input_ids"]
        if previous.shape[1] + 1 != input_ids.shape[1] or previous.shape[0] != input_ids.shape[0]:
            return False
        parents = {tuple(row): i for i, row in enumerate(previous.tolist())}
        order = [parents.get(tuple(row)) for row in input_ids[:, :-1].tolist()]
        if any(index is None for index in order):
            return False
        batch = input_ids.shape[0]
        rows = torch.tensor(order, device=state["mask"].device)
        class_rows = (
            torch.arange(self.num_classes, device=rows.device)[:, None] * batch + rows[None, :]
        ).flatten()
        cache = state["cache"]
        if not hasattr(cache, "reorder_cache"):
            return False
        cache.reorder_cache(class_rows)
        self.stats["reorders"] += 1
        state["mask"] = state["mask"][class_rows]
        state["position"] = state["position"][class_rows]
        state["next_log_probs"] = state["next_log_probs"][:, rows]
        state["prefix_ll"] = state["prefix_ll"][:, rows]
        state["counts"] = state["counts"][rows]
        state["input_ids"] = previous[rows.cpu()]
        return True

    @torch.no_grad()
    def __call__(self, input_ids: LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.omega == 0:
            return scores
        state = self._state
        continues = (
            state is not None
            and state["input_ids"].shape[0] == input_ids.shape[0]
            and state["input_ids"].shape[1] + 1 == input_ids.shape[1]
            and torch.equal(state["input_ids"].to(input_ids.device), input_ids[:, :-1])
        )
        self.stats["steps"] += 1
        if continues or (state is not None and self._reorder(input_ids)):
            self._advance(input_ids)
        else:
            self.stats["prefills"] += 1
            self._prefill(input_ids)
        state = self._state
        assert state is not None
        class_vocab = state["next_log_probs"].shape[-1]
        if class_vocab < scores.shape[-1]:
            raise ValueError(
                f"The class-conditional LM's vocabulary ({class_vocab}) is smaller than the generating LM's "
                f"({scores.shape[-1]}); it must share the generating LM's tokenizer."
            )
        posterior = gedi_class_log_probs(
            state["next_log_probs"][..., : scores.shape[-1]],
            state["prefix_ll"],
            state["counts"],
            class_bias=self.class_bias,
            logit_scale=self.logit_scale,
            length_normalize=self.length_normalize,
        )
        return gedi_logits(scores, posterior[self.desired_class].to(scores.device), self.omega)
