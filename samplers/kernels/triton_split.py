"""Split-row Triton kernels for the typical filter and the fused draw: many programs per row.

One program per row (:mod:`samplers.kernels.triton_kernels`) leaves most of the GPU idle when
the batch is small and the vocabulary large (batch 1 at 128k tokens runs on one SM). Here each
row is cut into ``C`` chunks and every pass is a launch over ``(batch, C)`` programs; a pass
that needs the whole row first combines the per-chunk partials of the pass before (``C``
small numbers, read by every program: no atomics, no extra launch, deterministic). The kept
set is exactly that of the one-program kernel and of the PyTorch path (same scores, same
float64 threshold search), up to float32 rounding of the entropy (summed in another order).

Passes (``[x]`` = per-chunk partials written, combined by the next pass):

1. with guidance: ``[max, sum exp]`` of each branch (the log-softmax normalisers);
2. the guided, tempered ``z``: ``[max m, S = sum e, A = sum e (z - m)]``; combined they give
   ``log S`` and the entropy ``H = log S - A / S`` of the row, and a NaN / +inf flag;
3. threshold search on the int32 bits of ``s = |-log p - H|``: a fixed number of launches
   (``NPASS = ceil(31 / log2(K))``, enough for the key interval to close), each over ``K``
   pivots: ``[float64 mass below each pivot, nearest key at or below, nearest key above]``;
   the next launch narrows ``[lo, hi]`` to the pivot gap where the mass crosses
   ``mass * total`` and to the real keys at its ends (a converged row returns at once). With
   ``min_tokens_to_keep = k > 1`` a second search (weights 1, target ``k``) finds the
   ``k``-th smallest key, and one more pass counts ``[keys below it, keys equal to it]`` per
   chunk, so that the ties kept are the first ones in token order, across chunks;
4. filter: write the row; draw: ``[kept mass]`` per chunk, then the one program whose chunk
   holds ``u * total`` scans it (the inverse-CDF draw in token order).

The search state of pass ``p`` is written by chunk 0 of pass ``p`` (slot ``p``) and read by
pass ``p + 1``; partials alternate between two buffers. Rows are independent.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from samplers.kernels.triton_kernels import (
    _combine_entropy_terms,
    _count_below,
    _draw,
    _entropy_stats,
    _kept_mass,
    _pivot_pass,
    _pivots,
    _shrink,
    _span_logsumexp,
    _write_filtered,
    split_float64,
)

__all__ = ["cfg_typical_sample_split", "typical_filter_split", "chunk_layout", "K", "NPASS"]

TILE = 1024  # tokens per loop step in the elementwise passes
SEARCH_TILE = 256  # tokens per loop step in the pivot passes ([SEARCH_TILE, K] float64 accumulators)
K = 16  # pivots per search pass
NPASS = math.ceil(31 / math.log2(K))  # the key interval (< 2^31 wide) closes in this many passes
NUM_WARPS = 4


def chunk_layout(vocab: int, chunks: int) -> tuple[int, int]:
    """``(chunk, C)``: tokens per chunk (a multiple of ``TILE``) and the number of chunks for ``chunks`` wanted.

    Args:
        vocab (`int`): tokens per row, >= 1.
        chunks (`int`): chunks wanted, >= 1 (fewer when the row is short).

    Example:
        >>> from samplers.kernels.triton_split import chunk_layout
        >>> chunk_layout(5000, 5)
        (1024, 5)
    """
    chunk = _ceil_div(_ceil_div(vocab, max(1, chunks)), TILE) * TILE
    return chunk, _ceil_div(vocab, chunk)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def _branch_lse(lse_ptr, row, C, C_PAD: tl.constexpr):
    """Combine per-chunk ``[max, sum exp]`` of both branches into their log-softmax normalisers."""
    cc = tl.arange(0, C_PAD)
    present = cc < C
    base = lse_ptr + (row * C + cc) * 4
    m_c = tl.load(base, mask=present, other=float("-inf"))
    s_c = tl.load(base + 1, mask=present, other=0.0)
    m_u = tl.load(base + 2, mask=present, other=float("-inf"))
    s_u = tl.load(base + 3, mask=present, other=0.0)
    max_c = tl.max(m_c, axis=0)
    max_u = tl.max(m_u, axis=0)
    sum_c = tl.sum(s_c * tl.where(m_c > float("-inf"), tl.exp(m_c - max_c), 0.0), axis=0)
    sum_u = tl.sum(s_u * tl.where(m_u > float("-inf"), tl.exp(m_u - max_u), 0.0), axis=0)
    return max_c, tl.log(sum_c), max_u, tl.log(sum_u)


@triton.jit
def _row_constants(
    lse_ptr, stats_ptr, bad_ptr, scale_ptr, row, C, HAS_UNCOND: tl.constexpr, C_PAD: tl.constexpr
):
    """Branch normalisers, scale, and the guided row's max, log-sum-exp, entropy and flags."""
    max_c = 0.0
    log_sum_c = 0.0
    max_u = 0.0
    log_sum_u = 0.0
    w = 1.0
    if HAS_UNCOND:
        w = tl.load(scale_ptr + row)
        max_c, log_sum_c, max_u, log_sum_u = _branch_lse(lse_ptr, row, C, C_PAD)
    cc = tl.arange(0, C_PAD)
    present = cc < C
    base = stats_ptr + (row * C + cc) * 3
    m = tl.load(base, mask=present, other=float("-inf"))
    s = tl.load(base + 1, mask=present, other=0.0)
    a = tl.load(base + 2, mask=present, other=0.0)
    row_max, total, weighted = _combine_entropy_terms(m, s, a)
    log_sum = tl.log(total)
    entropy = log_sum - weighted / total
    bad = tl.max(tl.load(bad_ptr + row * C + cc, mask=present, other=0), axis=0)
    flags = tl.where(bad != 0, 1, 0) | tl.where(row_max == float("-inf"), 2, 0)
    return max_c, log_sum_c, max_u, log_sum_u, w, row_max, log_sum, entropy, flags


@triton.jit
def _search_state(
    state_i_ptr,
    state_f_ptr,
    below_ptr,
    max_le_ptr,
    min_gt_ptr,
    row,
    B,
    C,
    p,
    fraction,
    count,
    S: tl.constexpr,
    K: tl.constexpr,
    NPASS: tl.constexpr,
    C_PAD: tl.constexpr,
):
    """``(lo, hi, target)`` of search ``S`` (0 mass, 1 count) for pass ``p`` (``p = NPASS``: final)."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0x7F800000, tl.int32)
    target = tl.full([], -1.0, tl.float64)
    if S == 1:
        target = tl.zeros([], tl.float64) + count
    if p > 0:
        slot = (S * B + row) * NPASS + (p - 1)
        lo = tl.load(state_i_ptr + slot * 2)
        hi = tl.load(state_i_ptr + slot * 2 + 1)
        target = tl.load(state_f_ptr + slot)
        if lo < hi:  # pass p - 1 wrote partials: narrow the interval with them
            cc = tl.arange(0, C_PAD)
            kk = tl.arange(0, K)
            parity = (p - 1) % 2
            offs = (((S * 2 + parity) * B + row) * C + cc[:, None]) * K + kk[None, :]
            present = (cc < C)[:, None]
            below = tl.sum(tl.load(below_ptr + offs, mask=present, other=0.0), axis=0)
            max_le = tl.max(tl.load(max_le_ptr + offs, mask=present, other=-1), axis=0)
            min_gt = tl.min(tl.load(min_gt_ptr + offs, mask=present, other=0x7FFFFFFF), axis=0)
            lo, hi, target, _unused = _shrink(lo, hi, target, fraction, below, max_le, min_gt, S == 1, K)
    return lo, hi, target


@triton.jit
def _thresholds(
    state_i_ptr,
    state_f_ptr,
    below_ptr,
    max_le_ptr,
    min_gt_ptr,
    tie_ptr,
    row,
    chunk,
    B,
    C,
    fraction,
    count,
    SEARCH_MASS: tl.constexpr,
    USE_FLOOR: tl.constexpr,
    K: tl.constexpr,
    NPASS: tl.constexpr,
    C_PAD: tl.constexpr,
):
    """``(threshold, tie_key, room, ties_before)`` of the kept set for this chunk (see ``_keep_block``)."""
    threshold = tl.full([], 0x7F800000, tl.int32)
    tie_key = tl.full([], -1, tl.int32)
    room = tl.full([], 0, tl.int32)
    ties_before = tl.full([], 0, tl.int32)
    if SEARCH_MASS:
        _lo, threshold, _target = _search_state(
            state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, row, B, C, NPASS, fraction, count,
            0, K, NPASS, C_PAD,
        )  # fmt: skip
    if USE_FLOOR:
        _lo, kth, _target = _search_state(
            state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, row, B, C, NPASS, fraction, count,
            1, K, NPASS, C_PAD,
        )  # fmt: skip
        if kth > threshold:
            cc = tl.arange(0, C_PAD)
            present = cc < C
            less = tl.load(tie_ptr + (row * C + cc) * 2, mask=present, other=0)
            equal = tl.load(tie_ptr + (row * C + cc) * 2 + 1, mask=present, other=0)
            room = count - tl.sum(less, axis=0)
            ties_before = tl.sum(tl.where(cc < chunk, equal, 0), axis=0)
            threshold = kth - 1
            tie_key = kth
    return threshold, tie_key, room, ties_before


@triton.jit
def _lse_kernel(
    cond_ptr, uncond_ptr, lse_ptr, stats_ptr, bad_ptr, scale_ptr, V, stride_c, stride_u, temperature,
    CHUNK, C, state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, B,
    mass_hi, mass_mid, mass_lo, count,
    HAS_UNCOND: tl.constexpr, APPLY_TEMPERATURE: tl.constexpr, SEARCH_MASS: tl.constexpr,
    USE_FLOOR: tl.constexpr, K: tl.constexpr, NPASS: tl.constexpr, C_PAD: tl.constexpr,
    TILE: tl.constexpr, SEARCH_TILE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    m_c, s_c, bad_c = _span_logsumexp(cond_ptr + row * stride_c, lo, hi, TILE)
    m_u, s_u, bad_u = _span_logsumexp(uncond_ptr + row * stride_u, lo, hi, TILE)
    base = lse_ptr + (row * C + chunk) * 4
    tl.store(base, m_c)
    tl.store(base + 1, s_c)
    tl.store(base + 2, m_u)
    tl.store(base + 3, s_u)
    w = tl.load(scale_ptr + row)
    bad_w = ((w != w) | (tl.abs(w) == float("inf"))).to(tl.int32)
    tl.store(bad_ptr + row * C + chunk, bad_c | bad_u | bad_w)


@triton.jit
def _stats_kernel(
    cond_ptr, uncond_ptr, lse_ptr, stats_ptr, bad_ptr, scale_ptr, V, stride_c, stride_u, temperature,
    CHUNK, C, state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, B,
    mass_hi, mass_mid, mass_lo, count,
    HAS_UNCOND: tl.constexpr, APPLY_TEMPERATURE: tl.constexpr, SEARCH_MASS: tl.constexpr,
    USE_FLOOR: tl.constexpr, K: tl.constexpr, NPASS: tl.constexpr, C_PAD: tl.constexpr,
    TILE: tl.constexpr, SEARCH_TILE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    max_c = 0.0
    log_sum_c = 0.0
    max_u = 0.0
    log_sum_u = 0.0
    w = 1.0
    bad = 0
    if HAS_UNCOND:
        w = tl.load(scale_ptr + row)
        max_c, log_sum_c, max_u, log_sum_u = _branch_lse(lse_ptr, row, C, C_PAD)
        bad = tl.load(bad_ptr + row * C + chunk)
    m, s, a, bad_z = _entropy_stats(
        cond_ptr + row * stride_c, uncond_ptr + row * stride_u, lo, hi, max_c, log_sum_c, max_u,
        log_sum_u, w, temperature, HAS_UNCOND, APPLY_TEMPERATURE, TILE,
    )  # fmt: skip
    base = stats_ptr + (row * C + chunk) * 3
    tl.store(base, m)
    tl.store(base + 1, s)
    tl.store(base + 2, a)
    tl.store(bad_ptr + row * C + chunk, bad | bad_z)


@triton.jit
def _search_kernel(
    cond_ptr, uncond_ptr, lse_ptr, stats_ptr, bad_ptr, scale_ptr, V, stride_c, stride_u, temperature,
    CHUNK, C, state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, B,
    mass_hi, mass_mid, mass_lo, count, p,
    HAS_UNCOND: tl.constexpr, APPLY_TEMPERATURE: tl.constexpr, SEARCH_MASS: tl.constexpr,
    USE_FLOOR: tl.constexpr, K: tl.constexpr, NPASS: tl.constexpr, C_PAD: tl.constexpr,
    TILE: tl.constexpr, SEARCH_TILE: tl.constexpr, S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    max_c, log_sum_c, max_u, log_sum_u, w, row_max, log_sum, entropy, flags = _row_constants(
        lse_ptr, stats_ptr, bad_ptr, scale_ptr, row, C, HAS_UNCOND, C_PAD
    )
    if flags == 0:
        fraction = ((tl.zeros([], tl.float64) + mass_hi) + mass_mid) + mass_lo
        lo, hi, target = _search_state(
            state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, row, B, C, p, fraction, count,
            S, K, NPASS, C_PAD,
        )  # fmt: skip
        if chunk == 0:
            slot = (S * B + row) * NPASS + p
            tl.store(state_i_ptr + slot * 2, lo)
            tl.store(state_i_ptr + slot * 2 + 1, hi)
            tl.store(state_f_ptr + slot, target)
        if lo < hi:
            pivots = _pivots(lo, hi, K)
            start = chunk * CHUNK
            below, max_le, min_gt = _pivot_pass(
                cond_ptr + row * stride_c, uncond_ptr + row * stride_u, start, tl.minimum(start + CHUNK, V),
                max_c, log_sum_c, max_u, log_sum_u, w, temperature, row_max, log_sum, entropy, pivots,
                HAS_UNCOND, APPLY_TEMPERATURE, S == 1, K, SEARCH_TILE,
            )  # fmt: skip
            kk = tl.arange(0, K)
            offs = (((S * 2 + p % 2) * B + row) * C + chunk) * K + kk
            tl.store(below_ptr + offs, below)
            tl.store(max_le_ptr + offs, max_le)
            tl.store(min_gt_ptr + offs, min_gt)


@triton.jit
def _ties_kernel(
    cond_ptr, uncond_ptr, lse_ptr, stats_ptr, bad_ptr, scale_ptr, V, stride_c, stride_u, temperature,
    CHUNK, C, state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, B,
    mass_hi, mass_mid, mass_lo, count,
    HAS_UNCOND: tl.constexpr, APPLY_TEMPERATURE: tl.constexpr, SEARCH_MASS: tl.constexpr,
    USE_FLOOR: tl.constexpr, K: tl.constexpr, NPASS: tl.constexpr, C_PAD: tl.constexpr,
    TILE: tl.constexpr, SEARCH_TILE: tl.constexpr,
):  # fmt: skip
    """Per chunk: how many keys lie below the ``k``-th smallest and how many tie with it."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    max_c, log_sum_c, max_u, log_sum_u, w, row_max, log_sum, entropy, flags = _row_constants(
        lse_ptr, stats_ptr, bad_ptr, scale_ptr, row, C, HAS_UNCOND, C_PAD
    )
    less = tl.full([], 0, tl.int32)
    equal = tl.full([], 0, tl.int32)
    if flags == 0:
        fraction = ((tl.zeros([], tl.float64) + mass_hi) + mass_mid) + mass_lo
        _lo, kth, _target = _search_state(
            state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, row, B, C, NPASS, fraction, count,
            1, K, NPASS, C_PAD,
        )  # fmt: skip
        start = chunk * CHUNK
        less, equal = _count_below(
            cond_ptr + row * stride_c, uncond_ptr + row * stride_u, start, tl.minimum(start + CHUNK, V),
            max_c, log_sum_c, max_u, log_sum_u, w, temperature, row_max, log_sum, entropy, kth,
            HAS_UNCOND, APPLY_TEMPERATURE, TILE,
        )  # fmt: skip
    tl.store(tie_ptr + (row * C + chunk) * 2, less)
    tl.store(tie_ptr + (row * C + chunk) * 2 + 1, equal)


@triton.jit
def _apply_kernel(
    cond_ptr, uncond_ptr, lse_ptr, stats_ptr, bad_ptr, scale_ptr, V, stride_c, stride_u, temperature,
    CHUNK, C, state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, B,
    mass_hi, mass_mid, mass_lo, count, out_ptr, flags_ptr, stride_o, filter_value,
    HAS_UNCOND: tl.constexpr, APPLY_TEMPERATURE: tl.constexpr, SEARCH_MASS: tl.constexpr,
    USE_FLOOR: tl.constexpr, K: tl.constexpr, NPASS: tl.constexpr, C_PAD: tl.constexpr,
    TILE: tl.constexpr, SEARCH_TILE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    _mc, _lc, _mu, _lu, _w, row_max, log_sum, entropy, flags = _row_constants(
        lse_ptr, stats_ptr, bad_ptr, scale_ptr, row, C, HAS_UNCOND, C_PAD
    )
    if chunk == 0:
        tl.store(flags_ptr + row, flags)
    threshold = tl.full([], 0x7F800000, tl.int32)
    tie_key = tl.full([], -1, tl.int32)
    room = tl.full([], 0, tl.int32)
    ties_before = tl.full([], 0, tl.int32)
    if flags == 0:
        fraction = ((tl.zeros([], tl.float64) + mass_hi) + mass_mid) + mass_lo
        threshold, tie_key, room, ties_before = _thresholds(
            state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, row, chunk, B, C,
            fraction, count, SEARCH_MASS, USE_FLOOR, K, NPASS, C_PAD,
        )  # fmt: skip
    start = chunk * CHUNK
    _write_filtered(
        cond_ptr + row * stride_c, out_ptr + row * stride_o, start, tl.minimum(start + CHUNK, V),
        row_max, log_sum, entropy, temperature, threshold, tie_key, room, ties_before, flags,
        filter_value, APPLY_TEMPERATURE, TILE,
    )  # fmt: skip


@triton.jit
def _kept_kernel(
    cond_ptr, uncond_ptr, lse_ptr, stats_ptr, bad_ptr, scale_ptr, V, stride_c, stride_u, temperature,
    CHUNK, C, state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, B,
    mass_hi, mass_mid, mass_lo, count, kept_ptr,
    HAS_UNCOND: tl.constexpr, APPLY_TEMPERATURE: tl.constexpr, SEARCH_MASS: tl.constexpr,
    USE_FLOOR: tl.constexpr, K: tl.constexpr, NPASS: tl.constexpr, C_PAD: tl.constexpr,
    TILE: tl.constexpr, SEARCH_TILE: tl.constexpr,
):  # fmt: skip
    """Float64 kept probability mass of each chunk (0 for invalid rows)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    max_c, log_sum_c, max_u, log_sum_u, w, row_max, log_sum, entropy, flags = _row_constants(
        lse_ptr, stats_ptr, bad_ptr, scale_ptr, row, C, HAS_UNCOND, C_PAD
    )
    kept = tl.zeros([], tl.float64)
    if flags == 0:
        fraction = ((tl.zeros([], tl.float64) + mass_hi) + mass_mid) + mass_lo
        threshold, tie_key, room, ties_before = _thresholds(
            state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, row, chunk, B, C,
            fraction, count, SEARCH_MASS, USE_FLOOR, K, NPASS, C_PAD,
        )  # fmt: skip
        start = chunk * CHUNK
        kept = _kept_mass(
            cond_ptr + row * stride_c, uncond_ptr + row * stride_u, start, tl.minimum(start + CHUNK, V),
            max_c, log_sum_c, max_u, log_sum_u, w, temperature, row_max, log_sum, entropy,
            threshold, tie_key, room, ties_before, HAS_UNCOND, APPLY_TEMPERATURE, TILE,
        )  # fmt: skip
    tl.store(kept_ptr + row * C + chunk, kept)


@triton.jit
def _draw_kernel(
    cond_ptr, uncond_ptr, lse_ptr, stats_ptr, bad_ptr, scale_ptr, V, stride_c, stride_u, temperature,
    CHUNK, C, state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, B,
    mass_hi, mass_mid, mass_lo, count, kept_ptr, uniform_ptr, tokens_ptr, flags_ptr,
    HAS_UNCOND: tl.constexpr, APPLY_TEMPERATURE: tl.constexpr, SEARCH_MASS: tl.constexpr,
    USE_FLOOR: tl.constexpr, K: tl.constexpr, NPASS: tl.constexpr, C_PAD: tl.constexpr,
    TILE: tl.constexpr, SEARCH_TILE: tl.constexpr,
):  # fmt: skip
    """The chunk holding ``u * total`` (in token order) draws; exactly one program per row writes."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    max_c, log_sum_c, max_u, log_sum_u, w, row_max, log_sum, entropy, flags = _row_constants(
        lse_ptr, stats_ptr, bad_ptr, scale_ptr, row, C, HAS_UNCOND, C_PAD
    )
    cc = tl.arange(0, C_PAD)
    kept = tl.load(kept_ptr + row * C + cc, mask=cc < C, other=0.0)
    inclusive = tl.cumsum(kept, axis=0)
    total = tl.max(inclusive, axis=0)
    before = tl.sum(tl.where(cc == chunk - 1, inclusive, 0.0), axis=0)
    upto = tl.sum(tl.where(cc == chunk, inclusive, 0.0), axis=0)
    last_chunk = tl.max(tl.where((cc < C) & (kept > 0.0), cc, -1), axis=0)
    target = tl.load(uniform_ptr + row) * total
    owner = ((before <= target) & (target < upto)) | ((target >= total) & (chunk == last_chunk))
    valid = (flags == 0) & (total > 0.0)
    if chunk == 0:
        tl.store(flags_ptr + row, tl.where((flags == 0) & (total <= 0.0), 2, flags))
        if (flags != 0) | (total <= 0.0):
            tl.store(tokens_ptr + row, -1)
    if valid & owner:
        fraction = ((tl.zeros([], tl.float64) + mass_hi) + mass_mid) + mass_lo
        threshold, tie_key, room, ties_before = _thresholds(
            state_i_ptr, state_f_ptr, below_ptr, max_le_ptr, min_gt_ptr, tie_ptr, row, chunk, B, C,
            fraction, count, SEARCH_MASS, USE_FLOOR, K, NPASS, C_PAD,
        )  # fmt: skip
        start = chunk * CHUNK
        token = _draw(
            cond_ptr + row * stride_c, uncond_ptr + row * stride_u, start, tl.minimum(start + CHUNK, V),
            max_c, log_sum_c, max_u, log_sum_u, w, temperature, row_max, log_sum, entropy,
            threshold, tie_key, room, ties_before, before, target, HAS_UNCOND, APPLY_TEMPERATURE, TILE,
        )  # fmt: skip
        tl.store(tokens_ptr + row, token)


def _pipeline(
    cond: Tensor,
    uncond: Tensor,
    scales: Tensor,
    has_uncond: bool,
    mass: float,
    temperature: float,
    min_tokens_to_keep: int,
    chunks: int,
) -> tuple[tuple, dict, tuple[int, int]]:
    """Run passes 1-3 (normalisers, entropy, searches, tie counts); return the launch arguments."""
    batch, vocab = cond.shape
    device = cond.device
    chunk, n_chunks = chunk_layout(vocab, chunks)
    count = min(int(min_tokens_to_keep), vocab)
    search_mass = mass < 1.0
    use_floor = search_mass and count > 1  # at mass 1 every token is kept anyway

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, needed: bool = True) -> Tensor:
        # written before read (each pass writes what the next one reads); 1 element when unused
        return torch.empty(shape if needed else (1,), dtype=dtype, device=device)

    searches = 2 if use_floor else 1
    args = (
        cond, uncond,
        alloc((batch, n_chunks, 4), torch.float32, has_uncond),
        alloc((batch, n_chunks, 3), torch.float32),
        alloc((batch, n_chunks), torch.int32),
        scales, vocab, cond.stride(0), uncond.stride(0), float(temperature), chunk, n_chunks,
        alloc((searches, batch, NPASS, 2), torch.int32, search_mass),
        alloc((searches, batch, NPASS), torch.float64, search_mass),
        alloc((searches, 2, batch, n_chunks, K), torch.float64, search_mass),
        alloc((searches, 2, batch, n_chunks, K), torch.int32, search_mass),
        alloc((searches, 2, batch, n_chunks, K), torch.int32, search_mass),
        alloc((batch, n_chunks, 2), torch.int32, use_floor),
        batch, *split_float64(mass), count,
    )  # fmt: skip
    meta = {
        "HAS_UNCOND": has_uncond,
        "APPLY_TEMPERATURE": temperature != 1.0,
        "SEARCH_MASS": search_mass,
        "USE_FLOOR": use_floor,
        "K": K,
        "NPASS": NPASS,
        "C_PAD": triton.next_power_of_2(n_chunks),
        "TILE": TILE,
        "SEARCH_TILE": SEARCH_TILE,
        "num_warps": NUM_WARPS,
        "enable_fp_fusion": False,
    }
    grid = (batch, n_chunks)
    if has_uncond:
        _lse_kernel[grid](*args, **meta)
    _stats_kernel[grid](*args, **meta)
    for search, wanted in ((0, search_mass), (1, use_floor)):
        for p in range(NPASS if wanted else 0):
            _search_kernel[grid](*args, p, **meta, S=search)
    if use_floor:
        _ties_kernel[grid](*args, **meta)
    return args, meta, grid


def typical_filter_split(
    scores: Tensor, mass: float, min_tokens_to_keep: int, filter_value: float, chunks: int
) -> tuple[Tensor, Tensor]:
    """Typical filter of (B, V) ``scores`` with each row split into about ``chunks`` programs.

    Returns the filtered scores and the per-row flags (bit 0: NaN / +inf, bit 1: all -inf);
    the caller validates the arguments (``mass < 1``) and raises on flags.

    Args:
        scores (`torch.Tensor`): ``(batch, vocab)`` CUDA scores, float16/bfloat16/float32.
        mass (`float`): ``typical_p`` in (0, 1).
        min_tokens_to_keep (`int`): >= 1.
        filter_value (`float`): not NaN.
        chunks (`int`): programs wanted per row, >= 1 (see :func:`chunk_layout`).

    Example:
        >>> import torch
        >>> from samplers.kernels.triton_split import typical_filter_split
        >>> out, flags = typical_filter_split(torch.randn(1, 100_000, device="cuda"), 0.9, 1, -float("inf"), 8)  # doctest: +SKIP
    """
    batch = scores.shape[0]
    dummy_scales = torch.ones(batch, dtype=torch.float32, device=scores.device)
    args, meta, grid = _pipeline(scores, scores, dummy_scales, False, mass, 1.0, min_tokens_to_keep, chunks)
    out = torch.empty_like(scores)
    flags = torch.empty(batch, dtype=torch.int32, device=scores.device)
    _apply_kernel[grid](*args, out, flags, out.stride(0), float(filter_value), **meta)
    return out, flags


def cfg_typical_sample_split(
    cond: Tensor,
    uncond: Tensor,
    scales: Tensor,
    has_uncond: bool,
    mass: float,
    temperature: float,
    min_tokens_to_keep: int,
    uniforms: Tensor,
    chunks: int,
) -> tuple[Tensor, Tensor]:
    """Fused CFG + temperature + typical + draw with rows split into about ``chunks`` programs.

    ``scales`` one float32 per row, ``uniforms`` one float64 per row; returns int32 tokens (-1
    for invalid rows) and the per-row flags. The caller validates the arguments.

    Args:
        cond (`torch.Tensor`): ``(batch, vocab)`` CUDA logits, float16/bfloat16/float32.
        uncond (`torch.Tensor`): the same shape (``cond`` itself when ``has_uncond`` is False).
        scales (`torch.Tensor`): ``(batch,)`` float32 guidance scales.
        has_uncond (`bool`): whether to guide.
        mass (`float`): ``typical_p`` in (0, 1].
        temperature (`float`): in [1e-5, inf).
        min_tokens_to_keep (`int`): >= 1.
        uniforms (`torch.Tensor`): ``(batch,)`` float64 uniforms in [0, 1).
        chunks (`int`): programs wanted per row, >= 1.

    Example:
        >>> import torch
        >>> from samplers.kernels.triton_split import cfg_typical_sample_split
        >>> c = torch.randn(1, 100_000, device="cuda")  # doctest: +SKIP
        >>> one, u = torch.ones(1, device="cuda"), torch.rand(1, dtype=torch.float64, device="cuda")  # doctest: +SKIP
        >>> tokens, flags = cfg_typical_sample_split(c, c, one, False, 0.9, 1.0, 1, u, 8)  # doctest: +SKIP
    """
    batch = cond.shape[0]
    if not has_uncond:
        scales = torch.ones(batch, dtype=torch.float32, device=cond.device)
    args, meta, grid = _pipeline(
        cond, uncond, scales, has_uncond, mass, temperature, min_tokens_to_keep, chunks
    )
    kept = torch.empty((batch, grid[1]), dtype=torch.float64, device=cond.device)
    _kept_kernel[grid](*args, kept, **meta)
    tokens = torch.full((batch,), -1, dtype=torch.int32, device=cond.device)
    flags = torch.empty(batch, dtype=torch.int32, device=cond.device)
    _draw_kernel[grid](*args, kept, uniforms, tokens, flags, **meta)
    return tokens, flags
