"""Locally typical sampling (Meister et al., "Locally Typical Sampling", TACL 2023), sort-free.

:class:`LocallyTypicalWarper` is a drop-in for transformers' ``TypicalLogitsWarper`` (the same
token set: the token that crosses the mass is kept with all its ties; when that set is smaller
than ``min_tokens_to_keep``, exactly ``min_tokens_to_keep`` tokens, ties broken by token id),
that sorts nothing and decides the boundary exactly. The math
is in ``docs/methods.md``; the implementation in :mod:`samplers.kernels` (Triton on CUDA,
PyTorch elsewhere).

Exact boundary, and where it differs from transformers
------------------------------------------------------
transformers decides the last kept token with a float32 running sum of the sorted
probabilities; here the same scores ``s = |-log p - H|`` (bit-identical, computed by the same
float32 operations) are thresholded where the float64 cumulative mass first reaches
``mass * total``. The two sets differ only when transformers' float32 sum lands within
rounding of the mass, and then only by the tokens between the two crossings (usually one).
Measured on this project's CPU (``python -m samplers.typical``, 1,000 rows per cell,
``typical_p = 0.9`` unless stated), share of rows whose kept set differs from transformers':

================================  =========  =========  =========
logits                            V = 32k    V = 128k   V = 256k
================================  =========  =========  =========
N(0, 1)                           0.9 %      10.5 %     26.3 %
N(0, 2^2)                         2.8 %      16.9 %     44.9 %
Zipf-like (1 / rank, shuffled)    0.0 %      0.0 %      0.1 %
N(0, 1), typical_p = 0.2          0.1 %      0.6 %      1.7 %
================================  =========  =========  =========

so at V = 128k on random logits roughly one row in ten flips its last token. Every such
difference is a boundary token whose inclusion the float32 sum decided (float32 and float64
cumulative masses on opposite sides of ``mass``): ``tests/test_typical.py`` checks it.
"""

from __future__ import annotations

import math

import torch

from guidance.validation import check_bool
from samplers.kernels.dispatch import typical_filter
from samplers.kernels.reference import validate_filter_value, validate_mass, validate_min_tokens_to_keep

__all__ = ["LocallyTypicalWarper", "boundary_flip_rates"]


class LocallyTypicalWarper:
    r"""Logits warper for locally typical sampling with an exact boundary and no sort.

    Keeps the smallest set of tokens, in ascending order of ``|-log p - H|`` (``H`` the
    entropy of the row), whose probability mass reaches ``mass``; other scores become
    ``filter_value``. The same set as transformers' ``TypicalLogitsWarper`` except where its
    float32 running sum rounds across the mass (see the module docstring). The entropy is
    computed with the log-sum-exp and the threshold found by a radix select (PyTorch) or a
    pivot search (Triton, on CUDA; long rows split across programs) instead of sorting the
    vocabulary.

    Tie rule: every token tied with the one that crosses the mass is kept (as transformers);
    when fewer than ``min_tokens_to_keep`` tokens are kept, exactly ``min_tokens_to_keep`` are,
    the first in (score, token id) order (transformers also keeps exactly that many, tied
    tokens in its sort's order).

    It has transformers' ``LogitsProcessor`` call signature ``(input_ids, scores) -> scores``
    and works in a ``LogitsProcessorList`` (transformers calls processors by duck typing), but
    does not subclass ``LogitsProcessor``, so that importing it does not import transformers.

    Args:
        mass (`float`):
            Value of ``typical_p`` in (0, 1]; ``1.0`` turns the warper off (scores returned
            unchanged, unchecked).
        min_tokens_to_keep (`int`, *optional*, defaults to 1):
            Minimum number of tokens kept, >= 1.
        filter_value (`float`, *optional*, defaults to -inf):
            Value given to the filtered scores; any real number but NaN.
        check_finite (`bool`, *optional*, defaults to `True`):
            Raise ``ValueError`` on NaN or ``+inf`` scores (on CUDA this reads one flag per
            row back after the kernel). ``False``: no read-back; such rows come back all-NaN.

    Scores (``(batch, vocab)`` or ``(vocab,)``) may be float16/bfloat16/float32/float64 (the
    selection runs in float32, the output keeps the input dtype). Rows that are entirely
    ``-inf`` are returned unchanged. ``input_ids`` is ignored (may be None).

    Example:

    ```python
    >>> import torch
    >>> from transformers import LogitsProcessorList
    >>> from samplers.typical import LocallyTypicalWarper

    >>> scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> # H = 1.14 nats; -log p = 0.69, 1.20, 1.90, 3.00: token 1 is the most typical, then 0, 2, 3
    >>> LocallyTypicalWarper(mass=0.5)(None, scores)
    tensor([[-0.6931, -1.2040,    -inf,    -inf]])
    >>> processors = LogitsProcessorList([LocallyTypicalWarper(mass=0.9)])
    >>> torch.isfinite(processors(None, scores)).sum().item()
    3

    ```

    With ``model.generate``, pass it as ``logits_processor=LogitsProcessorList([...])`` with
    ``do_sample=True`` instead of ``typical_p`` (it then runs after transformers' warpers).
    """

    def __init__(
        self,
        mass: float,
        min_tokens_to_keep: int = 1,
        filter_value: float = -math.inf,
        check_finite: bool = True,
    ) -> None:
        self.mass = validate_mass(mass)
        self.min_tokens_to_keep = validate_min_tokens_to_keep(min_tokens_to_keep)
        self.filter_value = validate_filter_value(filter_value)
        self.check_finite = check_bool(check_finite, "check_finite")

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.FloatTensor) -> torch.FloatTensor:
        return typical_filter(
            scores, self.mass, self.min_tokens_to_keep, self.filter_value, check_finite=self.check_finite
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mass={self.mass}, min_tokens_to_keep={self.min_tokens_to_keep}, "
            f"filter_value={self.filter_value}, check_finite={self.check_finite})"
        )


def boundary_flip_rates(
    vocab_sizes: tuple[int, ...] = (32_000, 128_000, 256_000), rows: int = 1000, seed: int = 0
) -> dict[str, dict[int, float]]:
    """Share of rows where transformers' float32 boundary differs from the exact one (needs transformers).

    Args:
        vocab_sizes (`tuple[int, ...]`): vocabulary sizes to try, each >= 1.
        rows (`int`): random rows per cell, >= 1.
        seed (`int`): seed of the logits.

    Returns:
        `dict[str, dict[int, float]]`: per kind of logits, per vocabulary size, the share in [0, 1].

    Example:
        >>> from samplers.typical import boundary_flip_rates
        >>> boundary_flip_rates((1000,), rows=4)["N(0, 1)"]
        {1000: 0.0}
    """
    from transformers.generation.logits_process import TypicalLogitsWarper

    from samplers.kernels.reference import typical_filter_torch

    generator = torch.Generator().manual_seed(seed)

    def zipf(batch: int, vocab: int) -> torch.Tensor:
        ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
        logits = -torch.log(ranks).expand(batch, vocab)
        order = torch.argsort(torch.rand(batch, vocab, generator=generator), dim=-1)
        return logits.gather(1, order) + 0.1 * torch.randn(batch, vocab, generator=generator)

    cases = {
        "N(0, 1)": (lambda b, v: torch.randn(b, v, generator=generator), 0.9),
        "N(0, 2^2)": (lambda b, v: 2 * torch.randn(b, v, generator=generator), 0.9),
        "Zipf-like (1 / rank, shuffled)": (zipf, 0.9),
        "N(0, 1), typical_p = 0.2": (lambda b, v: torch.randn(b, v, generator=generator), 0.2),
    }
    rates: dict[str, dict[int, float]] = {}
    for name, (make, mass) in cases.items():
        rates[name] = {}
        for vocab in vocab_sizes:
            chunk = max(1, min(rows, 2**24 // vocab))
            flips = 0
            for start in range(0, rows, chunk):
                logits = make(min(chunk, rows - start), vocab)
                theirs = TypicalLogitsWarper(mass)(None, logits) > -math.inf
                ours = typical_filter_torch(logits, mass) > -math.inf
                flips += int((theirs != ours).any(-1).sum())
            rates[name][vocab] = flips / rows
    return rates


if __name__ == "__main__":
    for case, by_vocab in boundary_flip_rates().items():
        print(f"{case:34s}" + "".join(f"  V={v}: {100 * r:5.1f} %" for v, r in by_vocab.items()))
