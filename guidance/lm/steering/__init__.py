"""transformers adapters for classifier-weighted logits (CAIF/FUDGE and GeDi).

Both processors are ordinary ``LogitsProcessor`` objects: pass them to
``model.generate(logits_processor=LogitsProcessorList([...]))``, alone or together with CFG
(``custom_generate=cfg_generate`` passes the list through) and with any sampling warper.
transformers runs user processors before its temperature/top-k/top-p/typical warpers, so
they see the model's (or the CFG-guided) scores. The math lives in :mod:`guidance.classifier`;
the formulas and conventions are in ``docs/methods.md`` ("Classifier-weighted logits").

Modules, one concept each:

* :mod:`~guidance.lm.steering.classifiers`: texts -> probabilities (transformers models,
  sentence-encoder heads, plain callables);
* :mod:`~guidance.lm.steering.candidates`: texts of ``prefix + token`` for the candidates;
* :mod:`~guidance.lm.steering.caif`: :class:`ClassifierWeightedLogitsProcessor` (CAIF/FUDGE);
* :mod:`~guidance.lm.steering.gedi`: :class:`GeDiLogitsProcessor`.
"""

from guidance.lm.steering.caif import ClassifierWeightedLogitsProcessor
from guidance.lm.steering.candidates import CandidateTexts
from guidance.lm.steering.classifiers import (
    SentenceEncoderClassifier,
    TransformersTextClassifier,
    as_text_classifier,
    mean_pool,
)
from guidance.lm.steering.gedi import GeDiLogitsProcessor

__all__ = [
    "CandidateTexts",
    "ClassifierWeightedLogitsProcessor",
    "GeDiLogitsProcessor",
    "SentenceEncoderClassifier",
    "TransformersTextClassifier",
    "as_text_classifier",
    "mean_pool",
]
