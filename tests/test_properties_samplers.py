"""Property-based tests (hypothesis) of every public sampler: contracts that hold for all inputs.

For :mod:`samplers.kernels` (``typical_filter``, ``cfg_log_softmax``, ``cfg_typical_sample``,
``FusedSampling``), :class:`samplers.typical.LocallyTypicalWarper`, the PyTorch reference
functions and the CFG++ steps of :mod:`samplers.cfgpp`:

* finite inputs give finite outputs (or the documented ``-inf`` mask), in float32, float16 and
  bfloat16; ``-inf`` tokens stay masked and nothing becomes NaN;
* guidance off (scale exactly 1, scalar or per row) returns ``cond`` bit for bit;
* no input is modified in place;
* the typical set is the exact one (a sort-based float64 oracle with the documented tie rule);
* bad arguments raise ``ValueError`` / ``TypeError`` naming the argument.

Shapes are drawn small (``(V,)`` and ``(B, V)`` up to 4 x 300, with heavy ties and masks);
``test_fixed_large_shapes`` runs the extreme ``(64, 128256)`` once. Whole file: about a minute
on one core.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from guidance.ops import cfg
from guidance.spaces import NoiseLevel
from samplers import cfgpp
from samplers.kernels import (
    FusedSampling,
    cfg_log_softmax,
    cfg_typical_sample,
    reference,
    typical_filter,
)
from samplers.typical import LocallyTypicalWarper

NEG_INF = -math.inf
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# SAMPLERS_PROPERTY_EXAMPLES=2000 runs a deeper, randomised sweep (the default is fixed and fast)
_DEEP = int(os.environ.get("SAMPLERS_PROPERTY_EXAMPLES", "0"))
PROFILE = settings(
    max_examples=_DEEP or 60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=not _DEEP,
)


@st.composite
def logits(draw: st.DrawFn, min_vocab: int = 1, max_vocab: int = 300, one_d: bool = True) -> torch.Tensor:
    """(B, V) or (V,) logits: normal, quantised (many ties), with masked tokens and dead rows."""
    batch = draw(st.integers(1, 4))
    vocab = draw(st.integers(min_vocab, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0.01, 1.0, 4.0, 30.0]))
    generator = torch.Generator().manual_seed(seed)
    x = spread * torch.randn(batch, vocab, generator=generator)
    if draw(st.booleans()):  # a few distinct values: ties at every boundary
        x = torch.round(x / spread * 2) * spread
    masked = draw(st.sampled_from([0.0, 0.0, 0.3, 0.9]))
    x[torch.rand(batch, vocab, generator=generator) < masked] = NEG_INF
    if batch > 1 and draw(st.booleans()):
        x[draw(st.integers(0, batch - 1))] = NEG_INF  # an all -inf row
    dtype = draw(st.sampled_from(DTYPES))
    x = x.to(dtype)
    if one_d and batch == 1 and draw(st.booleans()):
        x = x[0]
    return x


def exact_keep(scores: torch.Tensor, mass: float, k: int) -> torch.Tensor:
    """Oracle: stable sort by (score, token id), float64 cumulative mass, the documented tie rule.

    Kept: every token whose score is <= the score of the token that crosses ``mass`` (ties at the
    mass boundary all kept), and at least the first ``k`` tokens in (score, token id) order.
    Rows without a finite score keep everything.
    """
    work = scores.float() if scores.ndim == 2 else scores.float()[None]
    normalized = torch.log_softmax(work, -1)
    p = normalized.exp()
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = (-normalized - ent).abs()
    keep = torch.ones_like(work, dtype=torch.bool)
    for row in range(work.shape[0]):
        if not (work[row] > NEG_INF).any():
            continue
        order = torch.sort(shifted[row], stable=True).indices
        cum = p[row].double()[order].cumsum(0)
        crossing = min(int((cum < mass * cum[-1]).sum()), work.shape[1] - 1)
        count = max(int((shifted[row] <= shifted[row, order[crossing]]).sum()), min(k, work.shape[1]))
        keep[row] = False
        keep[row, order[:count]] = True
    return keep if scores.ndim == 2 else keep[0]


def _kept(out: torch.Tensor, scores: torch.Tensor, filter_value: float) -> torch.Tensor:
    """Which tokens a filter kept, read from its output (a kept -inf token reads as kept)."""
    if math.isnan(filter_value) or filter_value == NEG_INF:
        return (out == scores) & (scores > NEG_INF) | (scores == NEG_INF)
    return out != filter_value


# --------------------------------------------------------------------------- typical filter


@PROFILE
@given(
    scores=logits(),
    # within ~1e-12 of 1 the crossing is float64 rounding (the sum order decides): not an exact oracle
    mass=st.one_of(st.floats(1e-6, 1.0 - 1e-9), st.just(1.0)),
    k=st.integers(1, 8),
    filter_value=st.sampled_from([NEG_INF, -1e4, 0.0]),
)
def test_typical_filter_is_the_exact_typical_set(
    scores: torch.Tensor, mass: float, k: int, filter_value: float
) -> None:
    before = scores.clone()
    out = typical_filter(scores, mass, k, filter_value)
    assert torch.equal(scores, before)  # not modified in place
    assert out.shape == scores.shape and out.dtype == scores.dtype
    assert not torch.isnan(out).any()
    if mass == 1.0:
        assert out is scores
        return
    keep = exact_keep(scores, mass, k)
    expected = torch.where(keep, scores, torch.tensor(filter_value, dtype=scores.dtype))
    assert torch.equal(out, expected)
    rows = scores if scores.ndim == 2 else scores[None]
    live = (rows > NEG_INF).any(-1)
    assert (keep if keep.ndim == 2 else keep[None])[live].sum(-1).ge(min(k, rows.shape[-1])).all()
    assert torch.equal((out if out.ndim == 2 else out[None])[~live], rows[~live])  # all -inf: unchanged


@PROFILE
@given(scores=logits(), mass=st.floats(0.05, 0.99), k=st.integers(1, 4))
def test_warper_is_the_filter_and_ignores_input_ids(scores: torch.Tensor, mass: float, k: int) -> None:
    warper = LocallyTypicalWarper(mass, k)
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert torch.equal(warper(ids, scores), typical_filter(scores, mass, k))
    assert torch.equal(warper(None, scores), typical_filter(scores, mass, k))


@PROFILE
@given(scores=logits(one_d=False), mass=st.floats(0.05, 0.99), bad=st.sampled_from([math.nan, math.inf]))
def test_typical_filter_nan_and_inf_rows(scores: torch.Tensor, mass: float, bad: float) -> None:
    row = scores.shape[0] - 1
    scores = scores.clone()
    scores[row, 0] = bad
    with pytest.raises(ValueError, match=rf"`scores` contains NaN or \+inf logits in rows \[{row}\]"):
        typical_filter(scores, mass)
    out = typical_filter(scores, mass, check_finite=False)
    assert torch.isnan(out[row]).all()
    assert torch.equal(out[:row], typical_filter(scores[:row], mass)) if row else True


# --------------------------------------------------------------------------- CFG log-softmax


@st.composite
def logit_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    cond = draw(logits(one_d=False))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([1.0, 100.0, 1e4]))
    uncond = (spread * torch.randn(cond.shape, generator=generator)).to(cond.dtype)
    if draw(st.booleans()):
        uncond[torch.rand(cond.shape, generator=generator) < 0.2] = NEG_INF
    return cond, uncond


scales = st.one_of(st.floats(-50.0, 50.0), st.sampled_from([0.0, 1.0, -1.0, 7.5]))


@PROFILE
@given(pair=logit_pairs(), scale=scales, per_row=st.booleans())
def test_cfg_log_softmax_masks_never_nan(
    pair: tuple[torch.Tensor, torch.Tensor], scale: float, per_row: bool
) -> None:
    cond, uncond = pair
    before = (cond.clone(), uncond.clone())
    w = torch.full((cond.shape[0],), scale) if per_row else scale
    if per_row:
        scale = float(w[0])  # float32: a tiny scale rounds to 0
    out = cfg_log_softmax(cond, uncond, w)
    assert torch.equal(cond, before[0]) and torch.equal(uncond, before[1])
    assert not torch.isnan(out).any()
    assert not (out == math.inf).any()
    if scale == 1:  # guidance off: cond bit for bit (the tensor itself for a number)
        assert (out is cond) if not per_row else torch.equal(out, cond.float())
        return
    assert out.dtype == torch.float32
    masked = uncond == NEG_INF if scale == 0 else (cond == NEG_INF) | (uncond == NEG_INF)
    assert torch.isneginf(out[masked]).all()
    assert torch.isfinite(out[~masked]).all()  # finite inputs: finite outputs


@PROFILE
@given(pair=logit_pairs(), scales_=st.lists(st.sampled_from([1.0, 0.0, 2.5, -3.0]), min_size=4, max_size=4))
def test_cfg_log_softmax_per_row_scale_is_rowwise(
    pair: tuple[torch.Tensor, torch.Tensor], scales_: list[float]
) -> None:
    cond, uncond = pair
    w = torch.tensor(scales_[: cond.shape[0]])
    out = cfg_log_softmax(cond, uncond, w)
    for row, scale in enumerate(w.tolist()):
        alone = cfg_log_softmax(cond[row : row + 1], uncond[row : row + 1], scale)
        assert torch.equal(out[row], alone[0].float()), (row, scale)


# --------------------------------------------------------------------------- fused draw


@PROFILE
@given(
    pair=logit_pairs(),
    scale=scales,
    mass=st.floats(0.05, 1.0),
    temperature=st.floats(0.05, 5.0),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**40),
)
def test_cfg_typical_sample_draws_a_kept_token(
    pair: tuple[torch.Tensor, torch.Tensor], scale: float, mass: float, temperature: float, k: int, seed: int
) -> None:
    cond, uncond = pair
    before = (cond.clone(), uncond.clone())
    guided = reference.guided_log_probs(cond, uncond, scale) / temperature
    empty = ~(guided > NEG_INF).any(-1)
    if empty.any():
        with pytest.raises(ValueError, match="no token to sample"):
            cfg_typical_sample(
                cond, uncond, scale, mass, temperature=temperature, min_tokens_to_keep=k, seed=seed
            )
        tokens = cfg_typical_sample(
            cond,
            uncond,
            scale,
            mass,
            temperature=temperature,
            min_tokens_to_keep=k,
            seed=seed,
            check_finite=False,
        )
        assert (tokens[empty] == -1).all()
        return
    tokens = cfg_typical_sample(
        cond, uncond, scale, mass, temperature=temperature, min_tokens_to_keep=k, seed=seed
    )
    assert torch.equal(cond, before[0]) and torch.equal(uncond, before[1])
    assert tokens.dtype == torch.int64 and tokens.shape == (cond.shape[0],)
    keep = exact_keep(guided, mass, k) & (guided > NEG_INF)
    assert keep.gather(1, tokens[:, None]).all()  # drawn from the typical set, never a masked token
    again = FusedSampling(temperature, mass, k).sample(cond, uncond, scale, seed=seed)
    assert torch.equal(tokens, again)  # same seed, same tokens
    if scale == 1:  # guidance off: the draw of cond alone
        assert torch.equal(
            tokens,
            cfg_typical_sample(
                cond, None, 1.0, mass, temperature=temperature, min_tokens_to_keep=k, seed=seed
            ),
        )


# --------------------------------------------------------------------------- reference functions


@PROFILE
@given(batch=st.integers(1, 64), seed=st.integers(0, 2**62))
def test_row_uniforms_are_in_unit_interval_and_seed_pure(batch: int, seed: int) -> None:
    assume(seed < (1 << 63) - batch)
    u = reference.row_uniforms(batch, torch.device("cpu"), seed=seed)
    assert u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all()
    per_row = reference.row_uniforms(batch, torch.device("cpu"), seed=seed + torch.arange(batch))
    assert torch.equal(u, per_row)
    state = torch.get_rng_state()
    reference.row_uniforms(batch, torch.device("cpu"), generator=torch.Generator().manual_seed(seed % 1000))
    assert torch.equal(torch.get_rng_state(), state)  # a generator never touches the global one


@PROFILE
@given(scores=logits(one_d=False), mass=st.floats(0.05, 0.99), k=st.integers(1, 4))
def test_reference_paths_agree(scores: torch.Tensor, mass: float, k: int) -> None:
    keep, normalized = reference.typical_keep_mask(scores, mass, k)
    assert torch.equal(keep, exact_keep(scores, mass, k))
    assert normalized.dtype == torch.float32
    assert torch.equal(reference.typical_filter_torch(scores, mass, k), typical_filter(scores, mass, k))


# --------------------------------------------------------------------------- bad arguments


FLOAT32_MAX = torch.finfo(torch.float32).max


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_X = torch.zeros(2, 5)
SCALAR_ARGUMENTS = [
    # (argument name, call with the value, whether the value is legitimate)
    ("mass", lambda v: typical_filter(_X, v), lambda v: _real(v) and 0 < v <= 1),
    ("mass", lambda v: LocallyTypicalWarper(v), lambda v: _real(v) and 0 < v <= 1),
    ("mass", lambda v: cfg_typical_sample(_X, None, 1.0, v, seed=0), lambda v: _real(v) and 0 < v <= 1),
    ("min_tokens_to_keep", lambda v: typical_filter(_X, 0.5, v), lambda v: _real(v) and isinstance(v, int) and v >= 1),
    ("filter_value", lambda v: typical_filter(_X, 0.5, 1, v), lambda v: _real(v) and not math.isnan(v)),
    ("temperature", lambda v: cfg_typical_sample(_X, None, 1.0, 0.9, temperature=v, seed=0),
     lambda v: _real(v) and 1e-5 <= v < math.inf),
    ("seed", lambda v: cfg_typical_sample(_X, None, 1.0, 0.9, seed=v),
     lambda v: v is None or (_real(v) and isinstance(v, int) and 0 <= v < 2**63 - 2)),
    ("scale", lambda v: cfg_log_softmax(_X, _X, v), lambda v: _real(v) and abs(v) <= FLOAT32_MAX),
    ("scale", lambda v: cfg_typical_sample(_X, _X, v, 0.9, seed=0), lambda v: _real(v) and abs(v) <= FLOAT32_MAX),
    ("scale", lambda v: cfgpp.euler_cfgpp_step(_X, _X, _X, 2.0, 1.0, v), lambda v: _real(v) and 0 <= v <= 1),
    ("eta", lambda v: cfgpp.get_ancestral_step(2.0, 1.0, v), lambda v: _real(v) and 0 <= v < math.inf),
    ("sigma_from", lambda v: cfgpp.get_ancestral_step(v, 0.0), lambda v: _real(v) and 0 <= v < math.inf),
    ("s_noise", lambda v: cfgpp.euler_ancestral_cfgpp_step(_X, _X, _X, 2.0, 1.0, 0.5, noise=_X, s_noise=v),
     lambda v: _real(v) and 0 <= v < math.inf),
]  # fmt: skip


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-3, 3),
        st.sampled_from([0.0, 1.0, 0.5, 2**64, -(2**64), 3.5e38, True, False, None, "0.5", (0.5,)]),
    )
)
def test_scalar_arguments_are_validated(value: object) -> None:
    """Every scalar argument: a legitimate value works, any other raises an error naming the argument."""
    for name, call, legitimate in SCALAR_ARGUMENTS:
        if legitimate(value):
            call(value)
            continue
        with pytest.raises((ValueError, TypeError), match=f"`{name}"):
            call(value)


@pytest.mark.parametrize("bad", [math.nan, -0.5, 1.5, "1"])
def test_bad_cfgpp_levels_raise(bad: object) -> None:
    x = torch.zeros(1, 3)
    with pytest.raises((ValueError, TypeError), match="`sigma`"):
        cfgpp.flow_euler_cfgpp_step(x, x, x, bad, 0.5, 0.5)
    with pytest.raises((ValueError, TypeError), match="`alpha_cumprod_prev`"):
        cfgpp.ddim_cfgpp_step(x, x, x, 0.5, bad, 0.5)


# --------------------------------------------------------------------------- CFG++ steps


@st.composite
def samples(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = draw(st.sampled_from([(1,), (3,), (2, 4), (1, 2, 3, 3)]))
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return tuple((magnitude * torch.randn(shape, generator=generator)).to(dtype) for _ in range(3))


@PROFILE
@given(
    xcu=samples(),
    lam=st.floats(0.0, 1.0),
    sigma=st.floats(1e-3, 80.0),
    ratio=st.floats(0.0, 1.0),
    eta=st.floats(0.0, 1.5),
)
def test_cfgpp_steps_finite_and_pure(
    xcu: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lam: float, sigma: float, ratio: float, eta: float
) -> None:
    x, c, u = xcu
    before = [t.clone() for t in xcu]
    sigma_next = sigma * ratio
    noise = torch.zeros_like(x)
    outs = [
        cfgpp.euler_cfgpp_step(x, c, u, sigma, sigma_next, lam),
        cfgpp.euler_ancestral_cfgpp_step(x, c, u, sigma, sigma_next, lam, noise=noise, eta=eta),
        cfgpp.flow_euler_cfgpp_step(x, c, u, min(sigma, 1.0), min(sigma_next, 1.0), lam),
        cfgpp.ddim_cfgpp_step(
            x, c, u, 1 / (1 + sigma**2), 1 / (1 + sigma_next**2), lam, eta=eta, noise=noise
        ),
    ]
    for out in outs:
        assert out.dtype == x.dtype and out.shape == x.shape
        assert torch.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(before, xcu, strict=True))
    # lambda = 1 takes x0 from cond: the last step is cond itself
    assert torch.equal(cfgpp.euler_cfgpp_step(x, c, u, sigma, 0.0, 1.0), c)


@PROFILE
@given(sigma_from=st.floats(0.0, 1e6), ratio=st.floats(0.0, 1.0), eta=st.floats(0.0, 3.0))
def test_ancestral_step_splits_the_variance(sigma_from: float, ratio: float, eta: float) -> None:
    sigma_to = sigma_from * ratio
    assume(sigma_to == 0 or sigma_to > 1e-300)  # subnormal levels carry too few bits for the check below
    down, up = cfgpp.get_ancestral_step(sigma_from, sigma_to, eta)
    assert 0.0 <= down <= sigma_to * (1 + 1e-12) and 0.0 <= up <= sigma_to
    if sigma_to > 0:
        assert (down / sigma_to) ** 2 + (up / sigma_to) ** 2 == pytest.approx(1.0, abs=1e-9)


@PROFILE
@given(xcu=samples(), sigmas=st.lists(st.floats(0.01, 20.0), min_size=1, max_size=4), lam=st.floats(0.0, 1.0))
def test_cfgpp_loops_finite(
    xcu: tuple[torch.Tensor, torch.Tensor, torch.Tensor], sigmas: list[float], lam: float
) -> None:
    x, c, u = xcu
    sigmas = [*sorted(sigmas, reverse=True), 0.0]
    out = cfgpp.sample_euler_ancestral_cfgpp(
        lambda sample, sigma: (c, u), x, sigmas, lam, generator=torch.Generator().manual_seed(0)
    )
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    assert torch.equal(out, cfg(c, u, lam))  # the last step (sigma_next = 0) returns x0_hat exactly
    x0 = cfgpp.cfgpp_step(x, c, u, NoiseLevel.karras(sigmas[0]), NoiseLevel.karras(0.0))
    assert torch.equal(x0, c)  # cfgpp_step takes the guided x0 itself


# --------------------------------------------------------------------------- fixed large shapes


def test_fixed_large_shapes() -> None:
    """(64, 128256): the vocabulary of Llama 3, a full batch; bfloat16 scores, per-row scales."""
    generator = torch.Generator().manual_seed(0)
    cond = (3 * torch.randn(64, 128256, generator=generator)).to(torch.bfloat16)
    uncond = (3 * torch.randn(64, 128256, generator=generator)).to(torch.bfloat16)
    cond[0, :1000] = NEG_INF
    filtered = typical_filter(cond, 0.9, 2)
    assert filtered.dtype == torch.bfloat16 and not torch.isnan(filtered).any()
    kept = filtered > NEG_INF
    assert (kept.sum(-1) >= 2).all() and torch.equal(filtered[kept], cond[kept])
    w = torch.linspace(0.0, 3.0, 64)
    w[5] = 1.0
    guided = cfg_log_softmax(cond, uncond, w)
    assert torch.isfinite(guided[1:]).all() and torch.equal(guided[5], cond[5].float())
    tokens = cfg_typical_sample(cond, uncond, w, 0.9, temperature=0.7, seed=0)
    assert ((tokens >= 0) & (tokens < 128256)).all() and (tokens[0] >= 1000)
