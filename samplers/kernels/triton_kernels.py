"""Triton kernels: fused CFG + log-softmax, and fused CFG + temperature + typical filter + draw.

One program per row. The typical kernel reads the conditional and unconditional logits and
never writes a vocabulary-sized intermediate: every pass recomputes the guided log-probs from
the inputs (they stay in L2 for small batches).

* pass 1 (with guidance): log-sum-exp of both branches (online max / sum, per lane);
* pass 2: the guided, tempered logits ``z``; their log-sum-exp and entropy ``H`` together
  (online: ``H = log S - sum(e (z - m)) / S``);
* threshold passes: the score ``s = |-log p - H|`` as its int32 bit pattern (ordered like ``s``
  since ``s >= 0``); ``K`` pivots split the current key interval, one pass sums ``p`` in float64
  below every pivot and records the nearest real keys on each side, the interval shrinks to
  the pivot gap where the mass crosses ``mass * total`` and then to the real keys at its ends.
  It ends when one key is left: that is the score of the crossing token (about log_K of the
  number of tokens passes; at most 31 / log2(K) + 1);
* last pass: write the filtered scores, or the inverse-CDF draw over the kept tokens (float64
  running sum, with the row's uniform from ``reference.row_uniforms``), which stops at the
  sampled token.

``flags`` reports per row: bit 0 NaN or +inf logits, bit 1 no finite guided logit.
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
def _row_logsumexp(row_ptr, V, BLOCK: tl.constexpr):
    """Max and log(sum(exp(x - max))) of one row, plus a flag for NaN / +inf entries."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        bad = bad | ((x != x) | (x == float("inf"))).to(tl.int32)
        m_new = tl.maximum(m, x)
        alpha = tl.where(m > float("-inf"), tl.exp(m - m_new), 0.0)
        s = s * alpha + tl.where(x > float("-inf"), tl.exp(x - m_new), 0.0)
        m = m_new
    row_max = tl.max(m, axis=0)
    s = s * tl.where(m > float("-inf"), tl.exp(m - row_max), 0.0)
    return row_max, tl.log(tl.sum(s, axis=0)), tl.max(bad, axis=0)


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
    """Guided (log-prob CFG, as guidance.ops.cfg_log_probs) and tempered logits of one block."""
    c = tl.load(cond_row + idx, mask=in_range, other=float("-inf")).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_row + idx, mask=in_range, other=float("-inf")).to(tl.float32)
        lc = (c - max_c) - log_sum_c
        lu = (u - max_u) - log_sum_u
        both = (c > float("-inf")) & (u > float("-inf"))
        lc0 = tl.where(both, lc, 0.0)
        lu0 = tl.where(both, lu, 0.0)
        guided = tl.where(both, w * (lc0 - lu0) + lu0, float("-inf"))
        z = tl.where(w == 1.0, lc, tl.where(w == 0.0, lu, guided))
    else:
        z = c
    if APPLY_TEMPERATURE:
        z = z / temperature
    return z


@triton.jit
def _cfg_log_softmax_kernel(
    cond_ptr, uncond_ptr, out_ptr, scale_ptr, V, stride_c, stride_u, stride_o, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cond_row = cond_ptr + row * stride_c
    uncond_row = uncond_ptr + row * stride_u
    out_row = out_ptr + row * stride_o
    w = tl.load(scale_ptr + row)
    max_c, log_sum_c, bad_c = _row_logsumexp(cond_row, V, BLOCK)
    max_u, log_sum_u, bad_u = _row_logsumexp(uncond_row, V, BLOCK)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        in_range = idx < V
        z = _load_guided(
            cond_row, uncond_row, idx, in_range, max_c, log_sum_c, max_u, log_sum_u, w, 1.0, True, False
        )
        tl.store(out_row + idx, z, mask=in_range)


@triton.jit
def _entropy_stats(
    cond_row,
    uncond_row,
    V,
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
    """Max, log-sum-exp and entropy of the guided row in one pass (per-lane online updates)."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    a = tl.zeros([BLOCK], tl.float32)  # sum of e * (z - m)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        in_range = idx < V
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
    row_max = tl.max(m, axis=0)
    seen = m > float("-inf")
    beta = tl.where(seen, tl.exp(m - row_max), 0.0)
    shift = tl.where(seen, m - row_max, 0.0)
    total = tl.sum(beta * s, axis=0)
    log_sum = tl.log(total)
    entropy = log_sum - tl.sum(beta * (a + s * shift), axis=0) / total
    return row_max, log_sum, entropy, tl.max(bad, axis=0)


@triton.jit
def _score_keys(z, idx, in_range, row_max, log_sum, entropy):
    """log p and the int32 bits of s = |-log p - H| (NO_KEY past the vocabulary)."""
    log_p = (z - row_max) - log_sum
    score = tl.abs((-log_p) - entropy)
    keys = tl.where(in_range, score.to(tl.int32, bitcast=True), 0x7FFFFFFF)
    return log_p, keys


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
    kk = tl.arange(0, K)
    offs = tl.arange(0, BLOCK)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0x7F800000, tl.int32)
    hi_weight = tl.full([], 0.0, tl.float64)
    target = tl.full([], -1.0, tl.float64)
    if COUNT:
        target = tl.zeros([], tl.float64) + count
    steps = tl.full([], 0, tl.int32)
    while (lo < hi) & (steps < 40):
        width = (hi - lo).to(tl.int64) + 1
        pivots = (lo.to(tl.int64) - 1 + ((kk + 1).to(tl.int64) * width) // K).to(tl.int32)
        # per-lane accumulators: the loop body is elementwise, one reduction per pass
        below_lanes = tl.zeros([BLOCK, K], tl.float64)
        max_le_lanes = tl.full([BLOCK, K], -1, tl.int32)
        min_gt_lanes = tl.full([BLOCK, K], 0x7FFFFFFF, tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            in_range = idx < V
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
        below = tl.sum(below_lanes, axis=0)
        max_le = tl.max(max_le_lanes, axis=0)
        min_gt = tl.min(min_gt_lanes, axis=0)
        if not COUNT:
            total = tl.sum(tl.where(kk == K - 1, below, 0.0), axis=0)
            target = tl.where(target < 0.0, fraction * total, target)
        j = tl.minimum(tl.sum((below < target).to(tl.int32), axis=0), K - 1)
        new_hi = tl.max(tl.where(kk == j, max_le, -1), axis=0)
        hi_weight = tl.sum(tl.where(kk == j, below, 0.0), axis=0)
        lo = tl.where(j > 0, tl.max(tl.where(kk == j - 1, min_gt, -1), axis=0), lo)
        hi = new_hi
        steps += 1
    return hi, hi_weight


@triton.jit
def _kept_mass(
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
    threshold,
    HAS_UNCOND: tl.constexpr,
    APPLY_TEMPERATURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    kept = tl.zeros([BLOCK], tl.float64)
    for start in range(0, V, BLOCK):
        idx = start + offs
        in_range = idx < V
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
        kept += tl.where(keys <= threshold, tl.exp(log_p), 0.0).to(tl.float64)
    return tl.sum(kept, axis=0)


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
        bad = bad_c | bad_u
    row_max, log_sum, entropy, bad_z = _entropy_stats(
        cond_row,
        uncond_row,
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
    bad = bad | bad_z
    empty = row_max == float("-inf")
    flags = tl.where(bad != 0, 1, 0) | tl.where(empty, 2, 0)
    tl.store(flags_ptr + row, flags)
    valid = flags == 0

    threshold = tl.full([], 0x7F800000, tl.int32)
    kept_total = tl.full([], -1.0, tl.float64)
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
        at_least, _unused = _search_threshold(
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
        kept_total = tl.where(at_least > threshold, -1.0, kept_total)
        threshold = tl.maximum(threshold, at_least)

    offs = tl.arange(0, BLOCK)
    if SAMPLE:
        token = tl.full([], -1, tl.int32)
        if valid:
            if kept_total < 0.0:
                kept_total = _kept_mass(
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
                    threshold,
                    HAS_UNCOND,
                    APPLY_TEMPERATURE,
                    BLOCK,
                )
            target = tl.load(uniform_ptr + row) * kept_total
            running = tl.full([], 0.0, tl.float64)
            last_lanes = tl.full([BLOCK], -1, tl.int32)
            start = tl.full([], 0, tl.int32)
            # block totals until the block where the kept mass crosses the target, then one scan
            while (token < 0) & (start < V):
                idx = start + offs
                in_range = idx < V
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
                weights = tl.where(keys <= threshold, tl.exp(log_p), 0.0).to(tl.float64)
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
            token = tl.where(token >= 0, token, tl.max(last_lanes, axis=0))
        tl.store(tokens_ptr + row, token)
    else:
        out_row = out_ptr + row * stride_o
        for start in range(0, V, BLOCK):
            idx = start + offs
            in_range = idx < V
            x = tl.load(cond_row + idx, mask=in_range, other=float("-inf"))
            z = x.to(tl.float32)
            if APPLY_TEMPERATURE:
                z = z / temperature
            log_p, keys = _score_keys(z, idx, in_range, row_max, log_sum, entropy)
            keep = (keys <= threshold) | (flags != 0)
            out = tl.where(keep, x.to(tl.float32), filter_value)
            tl.store(out_row + idx, out, mask=in_range)


def split_float64(value: float) -> tuple[float, float, float]:
    """Three float32 numbers whose float64 sum is ``value`` exactly."""
    parts = []
    rest = float(value)
    for _ in range(3):
        part = float(torch.tensor(rest, dtype=torch.float32))
        parts.append(part)
        rest -= part
    return parts[0], parts[1], parts[2]


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_scales(scale: float | Tensor, batch: int, device: torch.device) -> Tensor:
    if isinstance(scale, Tensor):
        return scale.to(device=device, dtype=torch.float32).expand(batch).contiguous()
    return torch.full((batch,), float(scale), dtype=torch.float32, device=device)


def cfg_log_softmax_triton(cond_logits: Tensor, uncond_logits: Tensor, scale: float | Tensor) -> Tensor:
    """Fused ``guidance.ops.cfg_log_probs`` for scale != 1 (float32 out); the caller handles scale 1."""
    cond, uncond = _rows(cond_logits), _rows(uncond_logits)
    batch, vocab = cond.shape
    out = torch.empty((batch, vocab), dtype=torch.float32, device=cond.device)
    scales = _row_scales(scale, batch, cond.device)
    _cfg_log_softmax_kernel[(batch,)](
        cond,
        uncond,
        out,
        scales,
        vocab,
        cond.stride(0),
        uncond.stride(0),
        out.stride(0),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out


def _raise_on_flags(flags: Tensor, what: str, empty_is_error: bool) -> None:
    mask = (flags & BAD_LOGITS) != 0
    if empty_is_error:
        mask = mask | ((flags & NO_FINITE) != 0)
    if not bool(mask.any()):
        return
    bad_rows = ((flags & BAD_LOGITS) != 0).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(
            f"`{what}` contains NaN or +inf logits in rows {bad_rows[:10]}; logits must be finite or -inf."
        )
    empty_rows = ((flags & NO_FINITE) != 0).nonzero().flatten().tolist()
    raise ValueError(
        f"Rows {empty_rows[:10]} of the guided logits are entirely -inf: there is no token to sample."
    )


def typical_filter_triton(
    scores: Tensor, mass: float, min_tokens_to_keep: int = 1, filter_value: float = -math.inf
) -> Tensor:
    """Typical filter of (B, V) scores in one kernel (mass < 1; the caller handles mass 1)."""
    scores = _rows(scores)
    batch, vocab = scores.shape
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
    _raise_on_flags(flags, "scores", empty_is_error=False)
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
) -> Tensor:
    """One kernel: CFG (log-prob form) + temperature + typical filter + inverse-CDF draw."""
    cond = _rows(cond_logits)
    batch, vocab = cond.shape
    has_uncond = uncond_logits is not None and (isinstance(scale, Tensor) or scale != 1)
    uncond = _rows(uncond_logits) if has_uncond else cond
    scales = _row_scales(scale, batch, cond.device) if has_uncond else uniforms
    tokens = torch.empty(batch, dtype=torch.int32, device=cond.device)
    flags = torch.empty(batch, dtype=torch.int32, device=cond.device)
    uniforms = uniforms.to(device=cond.device, dtype=torch.float64).contiguous()
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
        min(int(min_tokens_to_keep), vocab),
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
    _raise_on_flags(flags, "cond_logits/uncond_logits", empty_is_error=True)
    return tokens.long()
