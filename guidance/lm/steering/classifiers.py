"""Text classifiers for steering: anything that maps texts to attribute probabilities.

The steering processors call a classifier on decoded text, so its tokenizer need not match
the generating LM's. Accepted classifiers:

* any callable ``texts -> probabilities`` of shape ``(N,)`` or ``(N, C)``;
* a transformers sequence-classification model with its tokenizer
  (:class:`TransformersTextClassifier`, built by :func:`as_text_classifier` when a processor
  gets the model and ``classifier_tokenizer``);
* a torch head over a sentence encoder (:class:`SentenceEncoderClassifier`), such as the
  shipped sentiment head in :mod:`guidance.models.sentiment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from guidance.classifier import TextClassifier
from guidance.validation import check_int

__all__ = [
    "SentenceEncoderClassifier",
    "TransformersTextClassifier",
    "as_text_classifier",
    "mean_pool",
    "resolve_label",
]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``(N, L, D)`` over the positions where ``attention_mask`` ``(N, L)`` is 1.

    Example:
        >>> import torch
        >>> from guidance.lm.steering import mean_pool
        >>> mean_pool(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[1, 1, 0]]))
        tensor([[2.]])
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a module without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_batching(max_length: Any, batch_size: Any) -> None:
    check_int(max_length, "max_length", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)


def _batches(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[start : start + size]) for start in range(0, len(texts), size)]


class TransformersTextClassifier:
    """A transformers sequence-classification model used as ``texts -> probabilities``.

    Returns ``(N, C)`` softmax probabilities, or sigmoid probabilities for
    ``num_labels == 1`` (shape ``(N,)``) and for ``problem_type="multi_label_classification"``.
    ``label2id`` comes from the model config, so a processor's ``label`` may name a class.

    Args:
        model (`PreTrainedModel`): a sequence-classification model (``...ForSequenceClassification``);
            put in eval mode.
        tokenizer: the model's tokenizer (required; any transformers tokenizer).
        max_length (`int`, >= 1): texts are truncated to this many classifier tokens. Default 256.
        batch_size (`int`, >= 1): texts per forward pass. Default 256.

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
        _check_batching(max_length, batch_size)
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
        device = model_device(self.model)
        chunks = []
        for batch_texts in _batches(texts, self.batch_size):
            batch = self.tokenizer(
                batch_texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(device)
            logits = self.model(**batch).logits.float()
            chunks.append(torch.sigmoid(logits) if self._sigmoid else torch.softmax(logits, dim=-1))
        probs = torch.cat(chunks).cpu()
        return probs[:, 0] if probs.shape[-1] == 1 else probs


class SentenceEncoderClassifier:
    """A torch ``head`` over mean-pooled (optionally L2-normalised) sentence-encoder embeddings.

    Args:
        encoder (`nn.Module`): a transformers encoder (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: the encoder's tokenizer.
        head (`nn.Module`): maps ``(N, D)`` embeddings to ``(N, C)`` logits (softmax over
            ``C > 1`` classes) or ``(N,)`` / ``(N, 1)`` logits (sigmoid).
        normalize (`bool`): L2-normalise the pooled embeddings first (as sentence-transformers
            does for MiniLM). Default True.
        labels (`Sequence[str]`, *optional*): class names in column order, so that a
            processor's ``label`` may be a name.
        max_length (`int`, >= 1): texts are truncated to this many encoder tokens. Default 256.
        batch_size (`int`, >= 1): texts per forward pass. Default 256.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel, BertTokenizerFast
        >>> from guidance.lm.steering import SentenceEncoderClassifier
        >>> from guidance.models.sentiment import encoder_path
        >>> tokenizer = BertTokenizerFast.from_pretrained(encoder_path())
        >>> _ = torch.manual_seed(0)
        >>> encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        ...                                num_attention_heads=2, intermediate_size=32))
        >>> head = torch.nn.Linear(16, 2)
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
        _check_batching(max_length, batch_size)
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
        device = model_device(self.encoder)
        chunks = []
        for batch_texts in _batches(texts, self.batch_size):
            batch = self.tokenizer(
                batch_texts,
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
        logits = self.head(embeddings.to(model_device(self.head))).float().cpu()
        if logits.ndim == 2 and logits.shape[-1] > 1:
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits.reshape(-1))

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return self.probabilities(self.embed(texts))


def as_text_classifier(classifier: Any, classifier_tokenizer: Any = None) -> TextClassifier:
    """Wrap a transformers classification model; pass a ``texts -> probabilities`` callable through.

    Args:
        classifier: a ``PreTrainedModel`` (wrapped in :class:`TransformersTextClassifier`) or
            any callable on a list of texts. Other torch modules are rejected: wrap a head over
            a sentence encoder with :class:`SentenceEncoderClassifier`.
        classifier_tokenizer: the tokenizer of a transformers ``classifier`` (required then).

    Example:
        >>> from guidance.lm.steering import as_text_classifier
        >>> classify = as_text_classifier(lambda texts: [0.5] * len(texts))
        >>> classify(["a", "b"])
        [0.5, 0.5]
    """
    if isinstance(classifier, PreTrainedModel):
        return TransformersTextClassifier(classifier, classifier_tokenizer)
    if isinstance(classifier, nn.Module):
        raise ValueError(
            "`classifier` is a torch module that is not a transformers classification model; wrap a head over a "
            "sentence encoder with `SentenceEncoderClassifier(encoder, tokenizer, head)`."
        )
    if not callable(classifier):
        raise TypeError(f"`classifier` must be callable on a list of texts, got {type(classifier).__name__}.")
    return classifier


def resolve_label(label: int | str | None, classifier: Any) -> int | None:
    """A class index from ``label``: an int passes, a name is looked up in ``classifier.label2id``."""
    if label is None or (isinstance(label, int) and not isinstance(label, bool)):
        return label
    if isinstance(label, str):
        label2id = getattr(classifier, "label2id", None) or {}
        if label not in label2id:
            raise ValueError(f"`label` {label!r} is not one of the classifier's labels {sorted(label2id)}.")
        return label2id[label]
    raise ValueError(f"`label` must be a class index, a class name or None, got {label!r}.")
