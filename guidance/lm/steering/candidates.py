"""Texts of ``prefix + candidate token`` for a decoding step, without decoding every prefix again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["CandidateTexts"]

# Tokens of context decoded together with a candidate, so that merges across the boundary
# (leading spaces, WordPiece "##", multi-byte characters) come out as in a full decode.
DECODE_WINDOW = 6


class CandidateTexts:
    """Texts of ``prefix`` and ``prefix + token`` for a step's candidates, reusing earlier decodes.

    A step's candidate texts are remembered; at the next step the chosen candidate's text is
    the new prefix text (no full decode). Each candidate's text is the prefix text plus the
    difference between decoding the last few prefix tokens with and without the candidate,
    falling back to a full decode where that difference is not a plain suffix (an incomplete
    multi-byte character, a tokenizer clean-up rule). The result equals a full decode.

    Args:
        tokenizer: the generating LM's tokenizer (``decode`` and ``batch_decode`` are used,
            with ``skip_special_tokens=True``).

    ``full_decodes`` counts the full decodes done so far (the slow path).

    Example:
        >>> from transformers import BertTokenizerFast
        >>> from guidance.lm.steering.candidates import CandidateTexts
        >>> from guidance.models.sentiment import encoder_path
        >>> tokenizer = BertTokenizerFast.from_pretrained(encoder_path())
        >>> texts = CandidateTexts(tokenizer)
        >>> prefix = tokenizer("what a", add_special_tokens=False).input_ids
        >>> texts([prefix], [tokenizer.convert_tokens_to_ids(["day", "##s"])])
        (['what a'], [['what a day', 'what as']])
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._known: dict[tuple[int, ...], str] = {}
        self.full_decodes = 0

    def reset(self) -> None:
        """Forget the remembered texts (a new generation starts)."""
        self._known = {}

    def _decode(self, ids: Sequence[int]) -> str:
        self.full_decodes += 1
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prefix_text(self, prefix: Sequence[int]) -> str:
        """The text of ``prefix``: remembered from the last step, else a full decode."""
        text = self._known.get(tuple(prefix))
        return self._decode(prefix) if text is None else text

    def __call__(
        self, prefixes: list[list[int]], candidates: list[list[int]]
    ) -> tuple[list[str], list[list[str]]]:
        """``(prefix texts, candidate texts)``: one text per prefix, one list per row of candidates."""
        prefix_texts = [self.prefix_text(prefix) for prefix in prefixes]
        tails = [prefix[-DECODE_WINDOW:] for prefix in prefixes]
        decode = self.tokenizer.batch_decode
        bases = decode(tails, skip_special_tokens=True)
        extended = iter(
            decode(
                [tail + [token] for tail, row in zip(tails, candidates, strict=True) for token in row],
                skip_special_tokens=True,
            )
        )
        known: dict[tuple[int, ...], str] = {}
        texts: list[list[str]] = []
        for prefix, prefix_text, base, row in zip(prefixes, prefix_texts, bases, candidates, strict=True):
            row_texts = []
            for token in row:
                full = next(extended)
                if full.startswith(base) and not base.endswith("\ufffd"):
                    text = prefix_text + full[len(base) :]
                else:
                    text = self._decode([*prefix, token])
                known[(*prefix, token)] = text
                row_texts.append(text)
            texts.append(row_texts)
        self._known = known
        return prefix_texts, texts
