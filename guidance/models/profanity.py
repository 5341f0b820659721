"""A profanity classifier for steering: ``alt-profanity-check`` as ``texts -> p(profane)``.

``alt-profanity-check`` (``pip install alt-profanity-check``) is a linear SVM over a TF-IDF
bag of words, calibrated to probabilities, trained on ~200k human-labelled comments. Its
vectorizer and model ship inside the package as joblib files, which the package itself
loads on import; this module never loads a model file from anywhere else.

Use it to steer away from profanity with a negative weight (a classifier of the attribute
"profane", ``alpha < 0``), or as an independent judge of generated text.

Example:
    >>> from guidance.models.profanity import ProfanityClassifier
    >>> judge = ProfanityClassifier()
    >>> [round(p) for p in judge(["Have a lovely afternoon.", "shut up you fucking idiot"]).tolist()]
    [0, 1]
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ProfanityClassifier"]


class ProfanityClassifier:
    """``texts -> (N,)`` float32 probabilities that each text is profane/offensive."""

    label2id = {"profane": 0}

    def __init__(self) -> None:
        try:
            self._module = importlib.import_module("profanity_check")
        except ImportError as error:
            raise RuntimeError(
                "The profanity classifier needs `alt-profanity-check`: `pip install alt-profanity-check`."
            ) from error

    def __call__(self, texts: Sequence[str]) -> Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros(0)
        # The vectorizer lower-cases and tokenises; an empty string is a valid (clean) text.
        return torch.as_tensor(self._module.predict_prob(texts), dtype=torch.float32)
