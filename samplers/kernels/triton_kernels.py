"""Triton kernels, one program per row: fused CFG + log-softmax, and CFG + temperature + typical filter (+ draw).

The typical kernel reads the conditional and unconditional logits and never writes a
vocabulary-sized intermediate: every pass recomputes the guided log-probs from the inputs (they
stay in L2 for small batches).

* pass 1 (with guidance): log-sum-exp of both branches (online max / sum, per lane);
* pass 2: the guided, tempered logits ``z``; their log-sum-exp and entropy ``H`` together
  (online: ``H = log S - sum(e (z - m)) / S``);
* threshold passes: the score ``s = |-log p - H|`` as its int32 bit pattern (ordered like ``s``
  since ``s >= 0``); ``K`` pivots split the current key interval, one pass sums ``p`` in float64
  below every pivot and records the nearest real keys on each side, the interval shrinks to
  the pivot gap where the mass crosses ``mass * total`` and then to the real keys at its ends.
  It ends when one key is left: that is the score of the crossing token (about log_K of the
  number of tokens passes; at most 31 / log2(K) + 1). With ``min_tokens_to_keep = k > 1`` the
  same search with weights 1 finds the ``k``-th smallest key, and when it lies above the mass
  threshold one more pass counts the keys below it (the tie rule keeps exactly ``k`` tokens,
  ties broken by token id);
* last pass: write the filtered scores, or the inverse-CDF draw over the kept tokens (float64
  running sum, with the row's uniform from ``reference.row_uniforms``), which stops at the
  sampled token.

``flags`` reports per row: bit 0 NaN or +inf logits (or a non-finite scale), bit 1 no finite
guided logit. Invalid rows come out all-NaN (filter, log-softmax) or as token -1 (draw); the
wrappers raise ``ValueError`` on them when asked to check (one read of the flags).

:mod:`samplers.kernels.triton_split` splits long rows across programs for small batches; the
wrappers here pick it through :func:`samplers.kernels.split_chunks`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["cfg_log_softmax_triton", "cfg_typical_sample_triton", "typical_filter_triton", "TRITON_DTYPES"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INF_KEY = 0x7F800000
NO_KEY = 0x7FFFFFFF
BAD_LOGITS = 1
NO_FINITE = 2

# launch configuration: the fastest of six tried on an H100 for the filter at V = 128k
# (benchmarks/results/typical_sampling_h100_tune.txt); no register spills (cuobjdump)
BLOCK = 2048
SEARCH_BLOCK = 1024
PIVOTS = 4
NUM_WARPS = 8


@triton.jit
def _span_logsumexp(row_ptr, lo, hi, BLOCK: tl.constexpr):
    """Max, sum(exp(x - max)) of ``row[lo:hi]`` (sum 0 and max -inf when all -inf), and a NaN / +inf flag."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
        bad = bad | ((x != x) | (x == float("inf"))).to(tl.int32)
        m_new = tl.maximum(m, x)
        alpha = tl.where(m > float("-inf"), tl.exp(m - m_new), 0.0)
        s = s * alpha + tl.where(x > float("-inf"), tl.exp(x - m_new), 0.0)
        m = m_new
    span_max = tl.max(m, axis=0)
    s = s * tl.where(m > float("-inf"), tl.exp(m - span_max), 0.0)
    return span_max, tl.sum(s, axis=0), tl.max(bad, axis=0)


@triton.jit
def _row_logsumexp(row_ptr, V, BLOCK: tl.constexpr):
    """Max and log(sum(exp(x - max))) of one row, plus a flag for NaN / +inf entries."""
    row_max, total, bad = _span_logsumexp(row_ptr, 0, V, BLOCK)
    return row_max, tl.log(total), bad


@triton.jit
def _load_guided(
    cond_row,
    uncond_row,
    idx,
    in_range,
    max_c,
    log_sum_c,
    max_u,
    log_sum_u,
    w,
    temperature,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
):
    """Guided and tempered logits of one block: ``cfg_log_softmax`` (raw ``c`` where ``w == 1``).

    A token that is -inf in a branch that counts stays -inf; a branch row that is entirely -inf
    never makes NaN (its log-probs are -inf, not ``-inf - -inf``).
    """
    c = tl.load(cond_row + idx, mask=in_range, other=float("-inf")).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_row + idx, mask=in_range, other=float("-inf")).to(tl.float32)
        lc = tl.where(c > float("-inf"), (c - max_c) - log_sum_c, float("-inf"))
        lu = tl.where(u > float("-inf"), (u - max_u) - log_sum_u, float("-inf"))
        both = (c > float("-inf")) & (u > float("-inf"))
        lc0 = tl.where(both, lc, 0.0)
        lu0 = tl.where(both, lu, 0.0)
        guided = tl.where(both, w * (lc0 - lu0) + lu0, float("-inf"))
        z = tl.where(w == 1.0, c, tl.where(w == 0.0, lu, guided))
    else:
        z = c
    if APPLY_TEMPERATURE:
        z = z / temperature
    return z


@triton.jit
def _cfg_log_softmax_kernel(
    cond_ptr,
    uncond_ptr,
    out_ptr,
    scale_ptr,
    flags_ptr,
    V,
    stride_c,
    stride_u,
    stride_o,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cond_row = cond_ptr + row * stride_c
    uncond_row = uncond_ptr + row * stride_u
    out_row = out_ptr + row * stride_o
    w = tl.load(scale_ptr + row)
    max_c, log_sum_c, bad_c = _row_logsumexp(cond_row, V, BLOCK)
    max_u, log_sum_u, bad_u = _row_logsumexp(uncond_row, V, BLOCK)
    bad = (bad_c | bad_u | ((w != w) | (tl.abs(w) == float("inf"))).to(tl.int32)) != 0
    tl.store(flags_ptr + row, tl.where(bad, 1, 0))
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        in_range = idx < V
        z = _load_guided(
            cond_row, uncond_row, idx, in_range, max_c, log_sum_c, max_u, log_sum_u, w, 1.0, True, False
        )
        tl.store(out_row + idx, tl.where(bad, float("nan"), z), mask=in_range)


@triton.jit
def _entropy_stats(
    cond_row,
    uncond_row,
    lo,
    hi,
    max_c,
    log_sum_c,
    max_u,
    log_sum_u,
    w,
    temperature,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Over ``[lo, hi)``: max ``m``, ``S = sum e``, ``A = sum e (z - m)`` with ``e = exp(z - m)``, and a flag."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    a = tl.zeros([BLOCK], tl.float32)  # sum of e * (z - m)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        in_range = idx < hi
        z = _load_guided(
            cond_row,
            uncond_row,
            idx,
            in_range,
            max_c,
            log_sum_c,
            max_u,
            log_sum_u,
            w,
            temperature,
            HAS_UNCOND,
            APPLY_TEMPERATURE,
        )
        bad = bad | ((z != z) | (z == float("inf"))).to(tl.int32)
        m_new = tl.maximum(m, z)
        seen = m > float("-inf")
        alpha = tl.where(seen, tl.exp(m - m_new), 0.0)
        shift = tl.where(seen, m - m_new, 0.0)
        e = tl.where(z > float("-inf"), tl.exp(z - m_new), 0.0)
        ez = tl.where(z > float("-inf"), e * (z - m_new), 0.0)
        a = alpha * (a + s * shift) + ez
        s = alpha * s + e
        m = m_new
    span_max, total, weighted = _combine_entropy_terms(m, s, a)
    return span_max, total, weighted, tl.max(bad, axis=0)


@triton.jit
def _combine_entropy_terms(m, s, a):
    """Combine per-lane (or per-chunk) ``(m, S, A)`` into one ``(M, S, A)`` relative to ``M = max m``."""
    top = tl.max(m, axis=0)
    seen = m > float("-inf")
    beta = tl.where(seen, tl.exp(m - top), 0.0)
    shift = tl.where(seen, m - top, 0.0)
    total = tl.sum(beta * s, axis=0)
    weighted = tl.sum(beta * (a + s * shift), axis=0)
    return top, total, weighted


@triton.jit
def _score_keys(z, idx, in_range, row_max, log_sum, entropy):
    """log p and the int32 bits of s = |-log p - H| (NO_KEY past the vocabulary)."""
    log_p = (z - row_max) - log_sum
    score = tl.abs((-log_p) - entropy)
    keys = tl.where(in_range, score.to(tl.int32, bitcast=True), 0x7FFFFFFF)
    return log_p, keys


@triton.jit
def _keep_block(keys, threshold, tie_key, room, ties_before):
    """Kept tokens of a block: ``keys <= threshold``, plus tokens with ``key == tie_key`` while their
    rank among those ties (token order, ``ties_before`` of them in earlier blocks) is <= ``room``.

    ``tie_key = -1`` disables the tie part (keys are >= 0). Returns the mask and the new tie count.
    """
    keep = keys <= threshold
    if tie_key >= 0:
        tie = (keys == tie_key).to(tl.int32)
        rank = tl.cumsum(tie, axis=0) + ties_before
        keep = keep | ((tie != 0) & (rank <= room))
        ties_before = ties_before + tl.sum(tie, axis=0)
    return keep, ties_before


@triton.jit
def _pivot_pass(
    cond_row,
    uncond_row,
    lo_idx,
    hi_idx,
    max_c,
    log_sum_c,
    max_u,
    log_sum_u,
    w,
    temperature,
    row_max,
    log_sum,
    entropy,
    pivots,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
    COUNT: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Over tokens ``[lo_idx, hi_idx)``: weight below each pivot (float64) and the nearest keys around it."""
    offs = tl.arange(0, BLOCK)
    # per-lane accumulators: the loop body is elementwise, one reduction per pass
    below_lanes = tl.zeros([BLOCK, K], tl.float64)
    max_le_lanes = tl.full([BLOCK, K], -1, tl.int32)
    min_gt_lanes = tl.full([BLOCK, K], 0x7FFFFFFF, tl.int32)
    for start in range(lo_idx, hi_idx, BLOCK):
        idx = start + offs
        in_range = idx < hi_idx
        z = _load_guided(
            cond_row,
            uncond_row,
            idx,
            in_range,
            max_c,
            log_sum_c,
            max_u,
            log_sum_u,
            w,
            temperature,
            HAS_UNCOND,
            APPLY_TEMPERATURE,
        )
        log_p, keys = _score_keys(z, idx, in_range, row_max, log_sum, entropy)
        if COUNT:
            weights = tl.where(in_range, 1.0, 0.0).to(tl.float64)
        else:
            weights = tl.exp(log_p).to(tl.float64)
        le = keys[:, None] <= pivots[None, :]
        below_lanes += tl.where(le, weights[:, None], 0.0)
        max_le_lanes = tl.maximum(max_le_lanes, tl.where(le, keys[:, None], -1))
        min_gt_lanes = tl.minimum(min_gt_lanes, tl.where(le, 0x7FFFFFFF, keys[:, None]))
    return tl.sum(below_lanes, axis=0), tl.max(max_le_lanes, axis=0), tl.min(min_gt_lanes, axis=0)


@triton.jit
def _pivots(lo, hi, K: tl.constexpr):
    """``K`` increasing pivots splitting ``[lo, hi]``; the last one is ``hi``."""
    kk = tl.arange(0, K)
    width = (hi - lo).to(tl.int64) + 1
    return (lo.to(tl.int64) - 1 + ((kk + 1).to(tl.int64) * width) // K).to(tl.int32)


@triton.jit
def _shrink(lo, hi, target, fraction, below, max_le, min_gt, COUNT: tl.constexpr, K: tl.constexpr):
    """New ``[lo, hi]`` from one pivot pass: the pivot gap where the weight crosses ``target``,
    narrowed to the real keys at its ends. ``target < 0`` (mass search, first pass) becomes
    ``fraction`` times the total weight (the weight below the last pivot, ``hi``)."""
    kk = tl.arange(0, K)
    if not COUNT:
        total = tl.sum(tl.where(kk == K - 1, below, 0.0), axis=0)
        target = tl.where(target < 0.0, fraction * total, target)
    j = tl.minimum(tl.sum((below < target).to(tl.int32), axis=0), K - 1)
    new_hi = tl.max(tl.where(kk == j, max_le, -1), axis=0)
    hi_weight = tl.sum(tl.where(kk == j, below, 0.0), axis=0)
    lo = tl.where(j > 0, tl.max(tl.where(kk == j - 1, min_gt, -1), axis=0), lo)
    return lo, new_hi, target, hi_weight


@triton.jit
def _search_threshold(
    cond_row,
    uncond_row,
    V,
    max_c,
    log_sum_c,
    max_u,
    log_sum_u,
    w,
    temperature,
    row_max,
    log_sum,
    entropy,
    fraction,
    count,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
    COUNT: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Smallest key t with weight(keys <= t) >= target; returns t and that weight (float64).

    COUNT=False: weights p, target ``fraction * total``. COUNT=True: weights 1, target ``count``.
    """
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0x7F800000, tl.int32)
    hi_weight = tl.full([], 0.0, tl.float64)
    target = tl.full([], -1.0, tl.float64)
    if COUNT:
        target = tl.zeros([], tl.float64) + count
    steps = tl.full([], 0, tl.int32)
    while (lo < hi) & (steps < 40):
        pivots = _pivots(lo, hi, K)
        below, max_le, min_gt = _pivot_pass(
            cond_row,
            uncond_row,
            0,
            V,
            max_c,
            log_sum_c,
            max_u,
            log_sum_u,
            w,
            temperature,
            row_max,
            log_sum,
            entropy,
            pivots,
            HAS_UNCOND,
            APPLY_TEMPERATURE,
            COUNT,
            K,
            BLOCK,
        )
        lo, hi, target, hi_weight = _shrink(lo, hi, target, fraction, below, max_le, min_gt, COUNT, K)
        steps += 1
    return hi, hi_weight


@triton.jit
def _count_below(
    cond_row,
    uncond_row,
    lo_idx,
    hi_idx,
    max_c,
    log_sum_c,
    max_u,
    log_sum_u,
    w,
    temperature,
    row_max,
    log_sum,
    entropy,
    key,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Over ``[lo_idx, hi_idx)``: how many keys are ``< key`` and how many ``== key``."""
    offs = tl.arange(0, BLOCK)
    less = tl.zeros([BLOCK], tl.int32)
    equal = tl.zeros([BLOCK], tl.int32)
    for start in range(lo_idx, hi_idx, BLOCK):
        idx = start + offs
        in_range = idx < hi_idx
        z = _load_guided(
            cond_row,
            uncond_row,
            idx,
            in_range,
            max_c,
            log_sum_c,
            max_u,
            log_sum_u,
            w,
            temperature,
            HAS_UNCOND,
            APPLY_TEMPERATURE,
        )
        _log_p, keys = _score_keys(z, idx, in_range, row_max, log_sum, entropy)
        less += (keys < key).to(tl.int32)
        equal += (keys == key).to(tl.int32)
    return tl.sum(less, axis=0), tl.sum(equal, axis=0)


@triton.jit
def _kept_mass(
    cond_row,
    uncond_row,
    lo_idx,
    hi_idx,
    max_c,
    log_sum_c,
    max_u,
    log_sum_u,
    w,
    temperature,
    row_max,
    log_sum,
    entropy,
    threshold,
    tie_key,
    room,
    ties_before,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Float64 probability mass of the kept tokens in ``[lo_idx, hi_idx)``."""
    offs = tl.arange(0, BLOCK)
    kept = tl.zeros([BLOCK], tl.float64)
    for start in range(lo_idx, hi_idx, BLOCK):
        idx = start + offs
        in_range = idx < hi_idx
        z = _load_guided(
            cond_row,
            uncond_row,
            idx,
            in_range,
            max_c,
            log_sum_c,
            max_u,
            log_sum_u,
            w,
            temperature,
            HAS_UNCOND,
            APPLY_TEMPERATURE,
        )
        log_p, keys = _score_keys(z, idx, in_range, row_max, log_sum, entropy)
        keep, ties_before = _keep_block(keys, threshold, tie_key, room, ties_before)
        kept += tl.where(keep, tl.exp(log_p), 0.0).to(tl.float64)
    return tl.sum(kept, axis=0)


@triton.jit
def _draw(
    cond_row,
    uncond_row,
    lo_idx,
    hi_idx,
    max_c,
    log_sum_c,
    max_u,
    log_sum_u,
    w,
    temperature,
    row_max,
    log_sum,
    entropy,
    threshold,
    tie_key,
    room,
    ties_before,
    running,
    target,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Inverse-CDF draw over ``[lo_idx, hi_idx)``: the first kept token whose running float64 mass
    (from ``running``) exceeds ``target``; the last kept token of the span if none does (-1 if none)."""
    offs = tl.arange(0, BLOCK)
    token = tl.full([], -1, tl.int32)
    last_lanes = tl.full([BLOCK], -1, tl.int32)
    start = lo_idx
    # block totals until the block where the kept mass crosses the target, then one scan
    while (token < 0) & (start < hi_idx):
        idx = start + offs
        in_range = idx < hi_idx
        z = _load_guided(
            cond_row,
            uncond_row,
            idx,
            in_range,
            max_c,
            log_sum_c,
            max_u,
            log_sum_u,
            w,
            temperature,
            HAS_UNCOND,
            APPLY_TEMPERATURE,
        )
        log_p, keys = _score_keys(z, idx, in_range, row_max, log_sum, entropy)
        keep, ties_before = _keep_block(keys, threshold, tie_key, room, ties_before)
        weights = tl.where(keep & in_range, tl.exp(log_p), 0.0).to(tl.float64)
        last_lanes = tl.maximum(last_lanes, tl.where(weights > 0.0, idx, -1))
        block_total = tl.sum(weights, axis=0)
        if running + block_total > target:
            cum = tl.cumsum(weights, axis=0) + running
            hit = (cum > target) & (weights > 0.0)
            first = tl.min(tl.where(hit, idx, 0x7FFFFFFF), axis=0)
            token = tl.where(first < 0x7FFFFFFF, first, token)
            running = tl.max(cum, axis=0)
        else:
            running = running + block_total
        start += BLOCK
    return tl.where(token >= 0, token, tl.max(last_lanes, axis=0))


@triton.jit
def _typical_kernel(
    cond_ptr,
    uncond_ptr,
    out_ptr,
    tokens_ptr,
    flags_ptr,
    scale_ptr,
    uniform_ptr,
    V,
    stride_c,
    stride_u,
    stride_o,
    temperature,
    mass_hi,
    mass_mid,
    mass_lo,
    min_keep,
    filter_value,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
    SAMPLE: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
):
    # long only through the argument lists of its helpers (Triton passes no structs): the steps
    # are the passes of the module docstring.
    # the mass arrives as three float32 parts (kernel float arguments are float32) that sum to
    # the caller's float64 exactly, so the boundary is decided against the same number as on CPU
    mass = ((tl.zeros([], tl.float64) + mass_hi) + mass_mid) + mass_lo
    row = tl.program_id(0).to(tl.int64)
    cond_row = cond_ptr + row * stride_c
    uncond_row = uncond_ptr + row * stride_u
    max_c = 0.0
    log_sum_c = 0.0
    max_u = 0.0
    log_sum_u = 0.0
    w = 1.0
    bad = 0
    if HAS_UNCOND:
        w = tl.load(scale_ptr + row)
        max_c, log_sum_c, bad_c = _row_logsumexp(cond_row, V, BLOCK)
        max_u, log_sum_u, bad_u = _row_logsumexp(uncond_row, V, BLOCK)
        bad = bad_c | bad_u | ((w != w) | (tl.abs(w) == float("inf"))).to(tl.int32)
    row_max, total, weighted, bad_z = _entropy_stats(
        cond_row,
        uncond_row,
        0,
        V,
        max_c,
        log_sum_c,
        max_u,
        log_sum_u,
        w,
        temperature,
        HAS_UNCOND,
        APPLY_TEMPERATURE,
        BLOCK,
    )
    log_sum = tl.log(total)
    entropy = log_sum - weighted / total
    bad = bad | bad_z
    empty = row_max == float("-inf")
    flags = tl.where(bad != 0, 1, 0) | tl.where(empty, 2, 0)
    tl.store(flags_ptr + row, flags)
    valid = flags == 0

    threshold = tl.full([], 0x7F800000, tl.int32)
    kept_total = tl.full([], -1.0, tl.float64)
    tie_key = tl.full([], -1, tl.int32)
    room = tl.full([], 0, tl.int32)
    no_ties = tl.full([], 0, tl.int32)
    if valid & (mass < 1.0):
        threshold, kept_total = _search_threshold(
            cond_row,
            uncond_row,
            V,
            max_c,
            log_sum_c,
            max_u,
            log_sum_u,
            w,
            temperature,
            row_max,
            log_sum,
            entropy,
            mass,
            min_keep,
            HAS_UNCOND,
            APPLY_TEMPERATURE,
            False,
            K,
            SEARCH_BLOCK,
        )
    if valid & (min_keep > 1):
        kth, _unused = _search_threshold(
            cond_row,
            uncond_row,
            V,
            max_c,
            log_sum_c,
            max_u,
            log_sum_u,
            w,
            temperature,
            row_max,
            log_sum,
            entropy,
            mass,
            min_keep,
            HAS_UNCOND,
            APPLY_TEMPERATURE,
            True,
            K,
            SEARCH_BLOCK,
        )
        if kth > threshold:  # the floor decides: keys below the k-th, then ties by token id
            less, _equal = _count_below(
                cond_row,
                uncond_row,
                0,
                V,
                max_c,
                log_sum_c,
                max_u,
                log_sum_u,
                w,
                temperature,
                row_max,
                log_sum,
                entropy,
                kth,
                HAS_UNCOND,
                APPLY_TEMPERATURE,
                BLOCK,
            )
            threshold = kth - 1
            tie_key = kth
            room = min_keep - less
            kept_total = tl.full([], -1.0, tl.float64)

    if SAMPLE:
        token = tl.full([], -1, tl.int32)
        if valid:
            if kept_total < 0.0:
                kept_total = _kept_mass(
                    cond_row,
                    uncond_row,
                    0,
                    V,
                    max_c,
                    log_sum_c,
                    max_u,
                    log_sum_u,
                    w,
                    temperature,
                    row_max,
                    log_sum,
                    entropy,
                    threshold,
                    tie_key,
                    room,
                    no_ties,
                    HAS_UNCOND,
                    APPLY_TEMPERATURE,
                    BLOCK,
                )
            target = tl.load(uniform_ptr + row) * kept_total
            token = _draw(
                cond_row,
                uncond_row,
                0,
                V,
                max_c,
                log_sum_c,
                max_u,
                log_sum_u,
                w,
                temperature,
                row_max,
                log_sum,
                entropy,
                threshold,
                tie_key,
                room,
                no_ties,
                tl.zeros([], tl.float64),
                target,
                HAS_UNCOND,
                APPLY_TEMPERATURE,
                BLOCK,
            )
        tl.store(tokens_ptr + row, token)
    else:
        _write_filtered(
            cond_row,
            out_ptr + row * stride_o,
            0,
            V,
            row_max,
            log_sum,
            entropy,
            temperature,
            threshold,
            tie_key,
            room,
            no_ties,
            flags,
            filter_value,
            APPLY_TEMPERATURE,
            BLOCK,
        )


@triton.jit
def _write_filtered(
    row_ptr,
    out_row,
    lo_idx,
    hi_idx,
    row_max,
    log_sum,
    entropy,
    temperature,
    threshold,
    tie_key,
    room,
    ties_before,
    flags,
    filter_value,
    APPLY_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write ``[lo_idx, hi_idx)`` of a filtered row: kept scores, ``filter_value`` elsewhere;
    an all -inf row unchanged (flags bit 1), a row with NaN / +inf all NaN (flags bit 0)."""
    offs = tl.arange(0, BLOCK)
    for start in range(lo_idx, hi_idx, BLOCK):
        idx = start + offs
        in_range = idx < hi_idx
        x = tl.load(row_ptr + idx, mask=in_range, other=float("-inf"))
        z = x.to(tl.float32)
        if APPLY_TEMPERATURE:
            z = z / temperature
        _log_p, keys = _score_keys(z, idx, in_range, row_max, log_sum, entropy)
        keep, ties_before = _keep_block(keys, threshold, tie_key, room, ties_before)
        out = tl.where(keep | (flags == 2), x.to(tl.float32), filter_value)
        out = tl.where((flags & 1) != 0, float("nan"), out)
        tl.store(out_row + idx, out, mask=in_range)


def split_float64(value: float) -> tuple[float, float, float]:
    """Three float32 numbers whose float64 sum is ``value`` exactly (kernel float arguments are float32).

    Args:
        value (`float`): any finite float64.

    Example:
        >>> from samplers.kernels.triton_kernels import split_float64
        >>> sum(split_float64(0.9)) == 0.9
        True
    """
    parts = []
    rest = float(value)
    for _ in range(3):
        part = float(torch.tensor(rest, dtype=torch.float32))
        parts.append(part)
        rest -= part
    return parts[0], parts[1], parts[2]


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def row_scales(scale: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """One float32 scale per row on ``device`` (a number, or a tensor of 1 or ``batch`` values).

    Args:
        scale (`float` or `torch.Tensor`): the scale(s).
        batch (`int`): rows, >= 1.
        device (`torch.device`): where the result lives.

    Example:
        >>> import torch
        >>> from samplers.kernels.triton_kernels import row_scales
        >>> row_scales(1.5, 2, torch.device("cpu"))
        tensor([1.5000, 1.5000])
    """
    if isinstance(scale, Tensor):
        return scale.to(device=device, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
    return torch.full((batch,), float(scale), dtype=torch.float32, device=device)


def raise_on_flags(flags: Tensor, what: str, empty_is_error: bool) -> None:
    """Raise ``ValueError`` for rows flagged by a kernel (reads the flags: waits for the kernel).

    Args:
        flags (`torch.Tensor`): ``(batch,)`` int32 flags (bit 0: NaN / ``+inf``, bit 1: nothing finite).
        what (`str`): the argument names for the message.
        empty_is_error (`bool`): whether bit 1 is an error (a draw) or not (a filter).
    """
    mask = (flags & BAD_LOGITS) != 0
    if empty_is_error:
        mask = mask | ((flags & NO_FINITE) != 0)
    if not bool(mask.any()):
        return
    bad_rows = ((flags & BAD_LOGITS) != 0).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(
            f"`{what}` contains NaN or +inf logits in rows {bad_rows[:10]} (or their scale is not finite); "
            "logits must be finite or -inf."
        )
    empty_rows = ((flags & NO_FINITE) != 0).nonzero().flatten().tolist()
    raise ValueError(
        f"Rows {empty_rows[:10]} of the guided logits have no token to sample: they are entirely -inf "
        "(or not finite after guidance and temperature)."
    )


def cfg_log_softmax_triton(
    cond_logits: Tensor, uncond_logits: Tensor, scale: float | Tensor, *, check_finite: bool = True
) -> Tensor:
    """Fused ``cfg_log_softmax`` of (B, V) logits for a scale that is not the number 1 (float32 out).

    The caller (:func:`samplers.kernels.cfg_log_softmax`) validates the arguments and handles a
    scale of 1. Rows with NaN / +inf logits or a non-finite scale come out all-NaN, and raise
    ``ValueError`` with ``check_finite`` (one read of the per-row flags).

    Args:
        cond_logits (`torch.Tensor`): ``(batch, vocab)`` CUDA logits, float16/bfloat16/float32.
        uncond_logits (`torch.Tensor`): the same shape and device.
        scale (`float` or `torch.Tensor`): a finite number, or 1 or ``batch`` values.
        check_finite (`bool`, *optional*, defaults to `True`): raise on flagged rows.

    Example:
        >>> import torch
        >>> from samplers.kernels.triton_kernels import cfg_log_softmax_triton
        >>> cond, uncond = torch.randn(2, 8, device="cuda"), torch.randn(2, 8, device="cuda")  # doctest: +SKIP
        >>> cfg_log_softmax_triton(cond, uncond, 1.5).shape  # doctest: +SKIP
        torch.Size([2, 8])
    """
    cond, uncond = _rows(cond_logits), _rows(uncond_logits)
    batch, vocab = cond.shape
    out = torch.empty((batch, vocab), dtype=torch.float32, device=cond.device)
    flags = torch.empty(batch, dtype=torch.int32, device=cond.device)
    scales = row_scales(scale, batch, cond.device)
    _cfg_log_softmax_kernel[(batch,)](
        cond,
        uncond,
        out,
        scales,
        flags,
        vocab,
        cond.stride(0),
        uncond.stride(0),
        out.stride(0),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    if check_finite:
        raise_on_flags(flags, "cond_logits/uncond_logits", empty_is_error=False)
    return out


def _chunks(batch: int, vocab: int, device: torch.device, chunks: int | None) -> int:
    if chunks is not None:
        return max(1, min(int(chunks), -(-vocab // 1024)))
    from samplers.kernels import split_chunks

    return split_chunks(batch, vocab, device)


def typical_filter_triton(
    scores: Tensor,
    mass: float,
    min_tokens_to_keep: int = 1,
    filter_value: float = -math.inf,
    *,
    check_finite: bool = True,
    chunks: int | None = None,
) -> Tensor:
    """Typical filter of (B, V) scores (mass < 1; the caller validates and handles mass 1).

    ``chunks`` programs share each row (default :func:`samplers.kernels.split_chunks`; 1: one
    program per row, the kernel above; more: :mod:`samplers.kernels.triton_split`).

    Args:
        scores (`torch.Tensor`): ``(batch, vocab)`` CUDA scores, float16/bfloat16/float32.
        mass (`float`): ``typical_p`` in (0, 1).
        min_tokens_to_keep (`int`, *optional*, defaults to 1): >= 1.
        filter_value (`float`, *optional*, defaults to ``-inf``): not NaN.
        check_finite (`bool`, *optional*, defaults to `True`): raise on NaN / ``+inf`` rows.
        chunks (`int`, *optional*): programs per row, >= 1 (default: ``split_chunks``).

    Example:
        >>> import torch
        >>> from samplers.kernels.triton_kernels import typical_filter_triton
        >>> typical_filter_triton(torch.randn(2, 50_000, device="cuda"), 0.9).shape  # doctest: +SKIP
        torch.Size([2, 50000])
    """
    scores = _rows(scores)
    batch, vocab = scores.shape
    if _chunks(batch, vocab, scores.device, chunks) > 1:
        from samplers.kernels import triton_split

        out, flags = triton_split.typical_filter_split(
            scores, mass, min_tokens_to_keep, filter_value, _chunks(batch, vocab, scores.device, chunks)
        )
    else:
        out = torch.empty_like(scores)
        flags = torch.empty(batch, dtype=torch.int32, device=scores.device)
        _typical_kernel[(batch,)](
            scores,
            scores,
            out,
            flags,
            flags,
            flags,
            flags,
            vocab,
            scores.stride(0),
            scores.stride(0),
            out.stride(0),
            1.0,
            *split_float64(mass),
            min(int(min_tokens_to_keep), vocab),
            float(filter_value),
            HAS_UNCOND=False,
            APPLY_TEMPERATURE=False,
            SAMPLE=False,
            K=PIVOTS,
            BLOCK=BLOCK,
            SEARCH_BLOCK=SEARCH_BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    if check_finite:
        raise_on_flags(flags, "scores", empty_is_error=False)
    return out


def cfg_typical_sample_triton(
    cond_logits: Tensor,
    uncond_logits: Tensor | None,
    scale: float | Tensor,
    mass: float,
    *,
    temperature: float,
    min_tokens_to_keep: int,
    uniforms: Tensor,
    check_finite: bool = True,
    chunks: int | None = None,
) -> Tensor:
    """CFG (log-prob form) + temperature + typical filter + inverse-CDF draw, fused (int64 tokens).

    The caller validates the arguments; ``uncond_logits`` None (or a scale of the number 1) is
    no guidance. Invalid rows get token -1, and raise ``ValueError`` with ``check_finite``.
    ``chunks`` as in :func:`typical_filter_triton`.

    Args:
        cond_logits (`torch.Tensor`): ``(batch, vocab)`` CUDA logits, float16/bfloat16/float32.
        uncond_logits (`torch.Tensor` or None): the same shape and device, or None.
        scale (`float` or `torch.Tensor`): a finite number, or 1 or ``batch`` values.
        mass (`float`): ``typical_p`` in (0, 1].
        temperature (`float`): in [1e-5, inf).
        min_tokens_to_keep (`int`): >= 1.
        uniforms (`torch.Tensor`): ``(batch,)`` float64 uniforms in [0, 1).
        check_finite (`bool`, *optional*, defaults to `True`): raise on rows with no token.
        chunks (`int`, *optional*): programs per row, >= 1 (default: ``split_chunks``).

    Example:
        >>> import torch
        >>> from samplers.kernels.triton_kernels import cfg_typical_sample_triton
        >>> cond = torch.randn(2, 50_000, device="cuda")  # doctest: +SKIP
        >>> u = torch.rand(2, dtype=torch.float64, device="cuda")  # doctest: +SKIP
        >>> cfg_typical_sample_triton(cond, None, 1.0, 0.9, temperature=1.0, min_tokens_to_keep=1, uniforms=u).shape  # doctest: +SKIP
        torch.Size([2])
    """
    cond = _rows(cond_logits)
    batch, vocab = cond.shape
    has_uncond = uncond_logits is not None and (isinstance(scale, Tensor) or scale != 1)
    uncond = _rows(uncond_logits) if has_uncond else cond
    scales = row_scales(scale, batch, cond.device) if has_uncond else uniforms
    uniforms = uniforms.to(device=cond.device, dtype=torch.float64).contiguous()
    n_chunks = _chunks(batch, vocab, cond.device, chunks)
    if n_chunks > 1:
        from samplers.kernels import triton_split

        tokens, flags = triton_split.cfg_typical_sample_split(
            cond, uncond, scales, has_uncond, mass, temperature, min_tokens_to_keep, uniforms, n_chunks
        )
    else:
        tokens = torch.empty(batch, dtype=torch.int32, device=cond.device)
        flags = torch.empty(batch, dtype=torch.int32, device=cond.device)
        _typical_kernel[(batch,)](
            cond,
            uncond,
            tokens,
            tokens,
            flags,
            scales,
            uniforms,
            vocab,
            cond.stride(0),
            uncond.stride(0),
            0,
            float(temperature),
            *split_float64(mass),
            min(int(min_tokens_to_keep), vocab) if mass < 1.0 else 1,
            0.0,
            HAS_UNCOND=has_uncond,
            APPLY_TEMPERATURE=temperature != 1.0,
            SAMPLE=True,
            K=PIVOTS,
            BLOCK=BLOCK,
            SEARCH_BLOCK=SEARCH_BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    if check_finite:
        raise_on_flags(flags, "cond_logits/uncond_logits", empty_is_error=True)
    return tokens.long()
