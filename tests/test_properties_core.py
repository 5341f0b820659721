"""Property-based contracts of the core (issue 11): every operator, guider, schedule, spaces function.

Properties, over float32, float16 and bfloat16 and shapes from ``(1,)`` to ``(B, C, H, W)`` (plus a
few fixed large cases up to ``(64, 128256)`` logits):

* finite inputs give finite outputs wherever the exact result is representable, and never NaN;
  ``-inf`` logits (masked tokens) never become NaN;
* results match a float64 evaluation of the same formula within the dtype's precision;
* scale 1 returns ``cond`` bit for bit, as a Python number and as a per-row tensor scale;
* no input is modified in place;
* bad arguments raise ``ValueError``/``TypeError`` naming the argument.

Tensors are built from a drawn seed, magnitude and relation between ``cond`` and ``uncond`` (fast
to generate, and it reaches the extremes: 1e-30, 6e4 in float16, 1e37, equal or opposite branches,
zero vectors). The "ci" hypothesis profile (``tests/conftest.py``) makes the run deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance import ops
from guidance.adaptive import AdaptiveGuidance, RatioCutoff, cosine_similarity
from guidance.classifier import classifier_weighted_logits, gedi_logits
from guidance.guiders import APG, CFG, BetaCFG, CFGZeroStar, PerpNeg, RescaledCFG, guide
from guidance.schedules import (
    DYNAMIC_THRESHOLDING_MODES,
    BetaPdf,
    Constant,
    Cosine,
    Cutoff,
    DynamicThresholdingSchedule,
    Interval,
    Linear,
    MeanNormalized,
    Window,
)
from guidance.spaces import NoiseLevel, convert, from_x0, to_x0

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
MAGNITUDES = {
    torch.float32: (1e-30, 1e-13, 1e-3, 1.0, 30.0, 1e4, 1e20, 1e37),
    torch.float16: (1e-4, 1e-2, 1.0, 30.0, 1e3, 3e4, 6e4),
    torch.bfloat16: (1e-30, 1e-3, 1.0, 30.0, 1e4, 1e20, 1e37),
}
RELATIONS = ("independent", "close", "equal", "opposite", "zero_uncond", "zero_both")
NICE_SCALES = (0.0, 1.0, -1.0, 0.5, 1.5, 3.0, 7.5, 20.0, 1e3)
EXAMPLES = 75


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


# ---------------------------------------------------------------------------------------- strategies


@st.composite
def shapes(draw, min_ndim: int = 1, max_ndim: int = 4) -> tuple[int, ...]:
    ndim = draw(st.integers(min_ndim, max_ndim))
    batch = draw(st.integers(1, 4))
    rest = [draw(st.integers(1, 6)) for _ in range(ndim - 1)]
    return (batch, *rest)


@st.composite
def pairs(draw, min_ndim: int = 1, dtypes=FLOAT_TYPES, relations=RELATIONS):
    """``(cond, uncond, extra)`` of one dtype; ``extra`` is a third tensor of the same shape."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(shapes(min_ndim=min_ndim))
    magnitude = draw(st.sampled_from(MAGNITUDES[dtype]))
    relation = draw(st.sampled_from(relations))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cond = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    noise = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    extra = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    uncond = {
        "independent": noise,
        "close": cond + 1e-2 * noise,
        "equal": cond,
        "opposite": -cond,
        "zero_uncond": torch.zeros_like(cond),
        "zero_both": torch.zeros_like(cond),
    }[relation]
    if relation == "zero_both":
        cond = torch.zeros_like(cond)
    limit = _max(dtype)
    return tuple(t.clamp(-limit, limit).to(dtype) for t in (cond, uncond, extra))


@st.composite
def logit_pairs(draw):
    """``(cond_logits, uncond_logits)`` of shape ``(V,)`` or ``(B, V)`` with some ``-inf`` (masked) entries."""
    dtype = draw(st.sampled_from(FLOAT_TYPES))
    shape = draw(st.one_of(st.tuples(st.integers(1, 64)), st.tuples(st.integers(1, 4), st.integers(1, 64))))
    magnitude = draw(st.sampled_from((1e-3, 1.0, 10.0, 100.0, 1e4)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out = []
    for _ in range(2):
        logits = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
        mask_rate = draw(st.sampled_from((0.0, 0.0, 0.3, 0.9, 1.0)))
        logits[torch.rand(shape, generator=gen, dtype=torch.float64) < mask_rate] = -math.inf
        out.append(logits.to(dtype))
    return tuple(out)


@st.composite
def scales(draw, batch: int, allow_tensor: bool = True):
    """A Python scale or a per-row tensor scale (often holding exact 0s and 1s)."""
    # Scales far below 1 in magnitude (say 1e-300) round to 0 or lose their digits against the
    # inputs in the work dtype; the contract is about scales used in practice.
    drawn = st.floats(-20.0, 20.0, allow_nan=False).filter(lambda w: w == 0 or abs(w) >= 1e-3)
    single = st.one_of(st.sampled_from(NICE_SCALES), drawn)
    if allow_tensor and draw(st.booleans()):
        return torch.tensor([draw(single) for _ in range(batch)], dtype=torch.float32)
    return draw(single)


def _batch(x: torch.Tensor) -> int:
    return x.shape[0] if x.ndim else 1


def _rows(scale, like: torch.Tensor, value: float) -> list[int]:
    """Batch rows whose scale is exactly ``value``."""
    if isinstance(scale, torch.Tensor):
        return [i for i, w in enumerate(scale.tolist()) if w == value]
    return list(range(_batch(like))) if scale == value else []


# ---------------------------------------------------------------------------------------- checks


def _assert_finite_where_representable(out: torch.Tensor, reference: torch.Tensor, inputs_finite: torch.Tensor):
    """Finite wherever the inputs are (results beyond the range saturate to +-max, never inf or NaN)."""
    assert not torch.isnan(out[inputs_finite]).any(), "NaN from finite inputs"
    assert torch.isfinite(out[inputs_finite & torch.isfinite(reference)]).all(), "inf from finite inputs"


def _per_sample_max(x: torch.Tensor) -> torch.Tensor:
    x = x.double().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return x.reshape(x.shape[0], -1).amax(dim=1) if x.ndim else x.reshape(1)


def _assert_close_per_sample(out, reference, scale_bound: torch.Tensor, dtype: torch.dtype, factor: float = 16.0):
    """``|out - ref| <= factor * eps * bound`` per sample, over samples where both are finite."""
    if out.ndim == 0:
        out, reference = out.reshape(1), reference.reshape(1)
    limit = _max(out.dtype)  # the contract: results beyond the range saturate
    reference = torch.where(torch.isfinite(reference), reference.double().clamp(-limit, limit), reference.double())
    diff = (out.double() - reference).abs()
    ok = torch.isfinite(out.double()) & torch.isfinite(reference.double())
    diff = torch.where(ok, diff, torch.zeros_like(diff)).reshape(out.shape[0], -1).amax(dim=1)
    allowed = factor * _eps(dtype) * scale_bound + 4 * torch.finfo(dtype).tiny
    assert bool((diff <= allowed).all()), f"error {diff.tolist()} above {allowed.tolist()}"


def _unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b, a), "an input was modified in place"


# ---------------------------------------------------------------------------------------- CFG family


@settings(max_examples=EXAMPLES * 2)
@given(data=st.data(), tensors=pairs())
def test_cfg_is_finite_accurate_and_exact_at_one(data, tensors):
    cond, uncond, _ = tensors
    scale = data.draw(scales(_batch(cond)))
    before = [cond.clone(), uncond.clone()]
    out = ops.cfg(cond, uncond, scale)
    _unchanged(before, [cond, uncond])
    w = ops._common._as_batch_scale(scale, cond.double())
    exact = uncond.double() + w * (cond.double() - uncond.double())
    _assert_finite_where_representable(out, exact, torch.ones_like(cond, dtype=torch.bool))
    bound = _per_sample_max(uncond) + _per_sample_max(w * (cond.double() - uncond.double()))
    _assert_close_per_sample(out, exact, bound, cond.dtype, factor=4.0)
    for i in _rows(scale, cond, 1.0):
        assert torch.equal(out[i], cond[i])
    for i in _rows(scale, cond, 0.0):
        assert torch.equal(out[i], uncond[i])
    assert ops.cfg(cond, uncond, 1.0) is cond and ops.cfg(cond, uncond, 0) is uncond


def _log_softmax64(x: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(x.double(), dim=-1)
    return torch.where(torch.isnan(lp), torch.full_like(lp, -math.inf), lp)


@settings(max_examples=EXAMPLES * 2)
@given(data=st.data(), logits=logit_pairs(), log_probs=st.booleans())
def test_logit_cfg_masks_without_nan_and_matches_float64(data, logits, log_probs):
    cond, uncond = logits
    scale = data.draw(scales(cond.shape[0] if cond.ndim == 2 else 1))
    op = ops.cfg_log_probs if log_probs else ops.cfg_logits
    before = [cond.clone(), uncond.clone()]
    out = op(cond, uncond, scale)
    _unchanged(before, [cond, uncond])
    assert not torch.isnan(out).any() and not torch.isposinf(out).any()
    c, u = (_log_softmax64(cond), _log_softmax64(uncond)) if log_probs else (cond.double(), uncond.double())
    w = ops._common._as_batch_scale(scale, c)
    masked = torch.isneginf(c) | torch.isneginf(u)
    cz, uz = c.masked_fill(masked, 0.0), u.masked_fill(masked, 0.0)
    exact = (uz + w * (cz - uz)).masked_fill(masked, -math.inf)
    if isinstance(w, torch.Tensor):
        exact = torch.where(w == 1, cond.double(), torch.where(w == 0, u, exact))
    elif scale == 0:
        exact = u
    elif scale == 1:
        exact = cond.double()
    assert torch.equal(torch.isneginf(out), torch.isneginf(exact))
    if cond.ndim == 1:  # one row: view it as a batch of one for the per-row checks
        out, exact, cond, c, u = (t[None] for t in (out, exact, cond, c, u))
    w_max = float(scale.abs().max()) if isinstance(scale, torch.Tensor) else abs(scale)
    # log-softmax rounding of each branch is amplified by w
    bound = (1 + w_max) * (_per_sample_max(u) + _per_sample_max(c)) + _per_sample_max(cond.double())
    _assert_close_per_sample(out, exact, bound, out.dtype if log_probs else cond.dtype, factor=8.0)
    for i in _rows(scale, cond, 1.0):
        assert torch.equal(out[i], cond[i].to(out.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary_rows(dtype):
    gen = torch.Generator().manual_seed(0)
    cond = (torch.randn(64, 128256, generator=gen) * 5).to(dtype)
    uncond = (torch.randn(64, 128256, generator=gen) * 5).to(dtype)
    cond[:, 100_000:] = -math.inf  # a processor masked the tail
    uncond[3] = -math.inf  # a row with nothing left in the unconditional branch
    scale = torch.full((64,), 3.0)
    scale[::8] = 1.0
    for op in (ops.cfg_logits, ops.cfg_log_probs):
        out = op(cond, uncond, scale)
        assert not torch.isnan(out).any() and not torch.isposinf(out).any()
        assert torch.equal(out[8], cond[8].to(out.dtype))
        assert torch.isneginf(out[3]).all() and torch.isneginf(out[:, 100_000:][1:3]).all()
        assert torch.isfinite(out[1, :100_000]).all()


# ---------------------------------------------------------------------------------------- norm-based operators


def _norm_op(name: str, data):
    """``(fn(cond, uncond, extra, scale), extra_needed)`` for a drawn configuration of operator ``name``."""
    if name == "cfg_rescaled":
        phi = data.draw(st.sampled_from((0.0, 0.3, 0.7, 1.0)))
        return lambda c, u, n, w: ops.cfg_rescaled(c, u, w, phi=phi)
    if name == "rescale":
        phi = data.draw(st.sampled_from((0.0, 0.7, 1.0)))
        return lambda c, u, n, w: ops.rescale(ops.cfg(c, u, w), c, phi)
    if name == "apg":
        convention = data.draw(st.sampled_from(ops.APG_CONVENTIONS))
        eta = data.draw(st.sampled_from((0.0, 0.5, 1.0)))
        threshold = data.draw(st.sampled_from((None, 0.5, 15.0)))
        return lambda c, u, n, w: ops.apg(c, u, w, eta=eta, norm_threshold=threshold, convention=convention)
    if name == "cfg_zero_star":
        eps = data.draw(st.sampled_from((0.0, 1e-8)))
        return lambda c, u, n, w: ops.cfg_zero_star(c, u, w, eps=eps)
    if name == "perp_neg":
        neg_scale = data.draw(st.sampled_from((0.0, 1.0, 2.5)))
        return lambda c, u, n, w: ops.perp_neg(c, u, n, w, neg_scale)
    gamma = data.draw(st.sampled_from((0.0, 0.5, 1.0, 2.0)))
    return lambda c, u, n, w: ops.beta_cfg(c, u, w, gamma)


NORM_OPS = ("cfg_rescaled", "rescale", "apg", "cfg_zero_star", "perp_neg", "beta_cfg")


@pytest.mark.parametrize("name", NORM_OPS)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), tensors=pairs())
def test_norm_operators_are_finite_and_agree_with_float64(name, data, tensors):
    cond, uncond, negative = tensors
    fn = _norm_op(name, data)
    scale = data.draw(scales(_batch(cond), allow_tensor=name != "rescale"))
    if abs(float(scale.abs().max()) if isinstance(scale, torch.Tensor) else abs(scale)) > 20 and name == "beta_cfg":
        scale = 3.0
    before = [t.clone() for t in (cond, uncond, negative)]
    out = fn(cond, uncond, negative, scale)
    _unchanged(before, [cond, uncond, negative])
    assert out.shape == cond.shape and out.dtype == cond.dtype
    reference = fn(cond.double(), uncond.double(), negative.double(), scale)
    _assert_finite_where_representable(out, reference, torch.ones_like(cond, dtype=torch.bool))
    w_max = float(scale.abs().max()) if isinstance(scale, torch.Tensor) else abs(scale)
    if name == "beta_cfg":  # d / ||d||^gamma: its magnitude is its own scale
        bound = _per_sample_max(reference) + _per_sample_max(uncond) + (1 + w_max)
    else:
        bound = (1 + w_max) * (_per_sample_max(cond) + _per_sample_max(uncond) + _per_sample_max(negative))
    _assert_close_per_sample(out, reference, bound, cond.dtype, factor=64.0)
    if name == "rescale":  # rescale(cfg(...)) has no "guidance off": nothing more to check
        return
    assert fn(cond, uncond, negative, 1.0) is cond
    for i in _rows(scale, cond, 1.0):
        assert torch.equal(out[i], cond[i])


LARGE_CASES = {
    "cfg_rescaled": lambda c, u, n, w: ops.cfg_rescaled(c, u, w, phi=0.7),
    "apg": lambda c, u, n, w: ops.apg(c, u, w, eta=0.5, norm_threshold=15.0, momentum_buffer=ops.MomentumBuffer(-0.5)),
    "cfg_zero_star": lambda c, u, n, w: ops.cfg_zero_star(c, u, w),
    "perp_neg": lambda c, u, n, w: ops.perp_neg(c, u, n, w),
    "beta_cfg": lambda c, u, n, w: ops.beta_cfg(c, u, w, gamma=0.5),
}


@pytest.mark.parametrize("name", sorted(LARGE_CASES))
def test_norm_operators_on_large_half_precision_latents(name):
    gen = torch.Generator().manual_seed(1)
    cond, uncond, negative = ((torch.randn(2, 4, 128, 128, generator=gen) * 200).half() for _ in range(3))
    out = LARGE_CASES[name](cond, uncond, negative, torch.tensor([1.0, 5.0]))
    assert out.dtype == torch.float16 and torch.equal(out[0], cond[0])
    reference = LARGE_CASES[name](cond.float(), uncond.float(), negative.float(), torch.tensor([1.0, 5.0]))
    _assert_finite_where_representable(out, reference, torch.ones_like(cond, dtype=torch.bool))


# ---------------------------------------------------------------------------------------- bad arguments


BAD_NUMBERS = (math.nan, math.inf, -math.inf)
BAD_TYPES = ("2", None, True, [2.0], 2j)


def _operators():
    c = torch.randn(2, 3)
    return {
        "cfg": lambda **k: ops.cfg(c, c, **k),
        "cfg_logits": lambda **k: ops.cfg_logits(c, c, **k),
        "cfg_log_probs": lambda **k: ops.cfg_log_probs(c, c, **k),
        "cfg_rescaled": lambda **k: ops.cfg_rescaled(c, c, **k),
        "apg": lambda **k: ops.apg(c, c, **k),
        "cfg_zero_star": lambda **k: ops.cfg_zero_star(c, c, **k),
        "perp_neg": lambda **k: ops.perp_neg(c, c, c, **k),
        "beta_cfg": lambda **k: ops.beta_cfg(c, c, **k),
    }


@pytest.mark.parametrize("name", sorted(_operators()))
@settings(max_examples=15)
@given(bad=st.one_of(st.sampled_from(BAD_NUMBERS + BAD_TYPES), st.integers(3, 5)))
def test_bad_scales_name_the_argument(name, bad):
    call = _operators()[name]
    if isinstance(bad, int) and not isinstance(bad, bool):  # a per-sample scale of the wrong length
        with pytest.raises(ValueError, match="`scale`"):
            call(scale=torch.ones(bad))
        return
    error = ValueError if isinstance(bad, float) else TypeError
    with pytest.raises(error, match="`scale`"):
        call(scale=bad)


@pytest.mark.parametrize(
    ("name", "argument", "bad"),
    [
        ("cfg_rescaled", "phi", 1.5),
        ("cfg_rescaled", "phi", math.nan),
        ("apg", "eta", math.inf),
        ("apg", "norm_threshold", -1.0),
        ("apg", "convention", "webui"),
        ("apg", "dims", (0,)),
        ("cfg_zero_star", "eps", -1.0),
        ("cfg_zero_star", "eps", math.inf),
        ("perp_neg", "neg_scale", math.nan),
        ("beta_cfg", "gamma", -0.5),
        ("beta_cfg", "gamma", math.inf),
    ],
)
def test_bad_settings_name_the_argument(name, argument, bad):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        _operators()[name](scale=2.0, **{argument: bad})


def _tensor_calls(a, b):
    return {
        "cfg": lambda: ops.cfg(a, b, 2.0),
        "cfg_logits": lambda: ops.cfg_logits(a, b, 2.0),
        "cfg_log_probs": lambda: ops.cfg_log_probs(a, b, 2.0),
        "cfg_rescaled": lambda: ops.cfg_rescaled(a, b, 2.0),
        "apg": lambda: ops.apg(a, b, 2.0),
        "cfg_zero_star": lambda: ops.cfg_zero_star(a, b, 2.0),
        "perp_neg": lambda: ops.perp_neg(a, a, b, 2.0),
        "beta_cfg": lambda: ops.beta_cfg(a, b, 2.0),
    }


@pytest.mark.parametrize("name", sorted(_operators()))
def test_tensors_of_other_shapes_or_types_are_refused(name):
    c = torch.randn(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        _tensor_calls(c, torch.randn(1, 3))[name]()
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        _tensor_calls(c, c.tolist())[name]()
    with pytest.raises(TypeError, match="floating-point"):
        _tensor_calls(c, c.long())[name]()


# ---------------------------------------------------------------------------------------- guiders


def _guider(kind: str, scale: float):
    return {
        "cfg": lambda: CFG(scale),
        "rescaled": lambda: RescaledCFG(scale, rescale=0.7),
        "apg": lambda: APG(scale, eta=0.5, momentum=-0.5, norm_threshold=5.0, space="prediction"),
        "zero_star": lambda: CFGZeroStar(scale, zero_init_steps=1),
        "perp_neg": lambda: PerpNeg(scale, neg_scale=1.0),
        "beta": lambda: BetaCFG(Constant(scale), gamma=1.0),
    }[kind]()


GUIDER_KINDS = ("cfg", "rescaled", "apg", "zero_star", "perp_neg", "beta")


@pytest.mark.parametrize("kind", GUIDER_KINDS)
@settings(max_examples=EXAMPLES // 2)
@given(tensors=pairs(min_ndim=2), scale=st.sampled_from(NICE_SCALES), steps=st.integers(1, 4))
def test_guiders_run_their_op_and_are_exact_at_one(kind, tensors, scale, steps):
    cond, uncond, negative = tensors
    guider = _guider(kind, scale)
    guider.reset()
    before = [t.clone() for t in tensors]
    for step in range(steps):
        extra = {"negative": negative} if guider.needs_negative else {}
        needs = guider.needs_uncond(step, steps)
        out = guider(cond, uncond if needs else None, step=step, num_steps=steps, **extra)
        assert out.shape == cond.shape and not torch.isnan(out).any()
        if scale == 1.0 and kind != "zero_star":
            assert out is cond
    _unchanged(before, list(tensors))


@settings(max_examples=EXAMPLES // 2)
@given(tensors=pairs(min_ndim=2, dtypes=(torch.float32,), relations=("independent", "close")))
def test_guide_in_x0_space_is_finite(tensors):
    cond, uncond, sample = tensors
    out = guide(
        APG(5.0), cond, uncond, step=0, sample=sample, prediction_type="epsilon", noise_level=NoiseLevel.ddpm(0.5)
    )
    assert out.shape == cond.shape and not torch.isnan(out).any()


# ---------------------------------------------------------------------------------------- schedules


finite = st.floats(-1e6, 1e6, allow_nan=False)
steps_and_count = st.integers(1, 50).flatmap(lambda n: st.tuples(st.integers(0, n + 3), st.just(n)))


@st.composite
def schedules(draw):
    kind = draw(st.sampled_from(("constant", "linear", "cosine", "window", "interval", "beta", "cutoff", "dyn")))
    if kind == "constant":
        return Constant(draw(finite))
    if kind in ("linear", "cosine"):
        return (Linear if kind == "linear" else Cosine)(draw(finite), draw(finite))
    if kind == "window":
        start = draw(st.integers(0, 10))
        return Window(draw(finite), start, draw(st.one_of(st.none(), st.integers(start, 20))), draw(finite))
    if kind == "interval":
        lo = draw(st.floats(0, 100))
        return Interval(draw(finite), lo, draw(st.one_of(st.just(math.inf), st.floats(lo + 1, 200))))
    if kind == "beta":
        return BetaPdf(draw(finite), draw(st.floats(1, 50)), draw(st.floats(1, 50)))
    if kind == "cutoff":
        return Cutoff(draw(finite), draw(st.floats(0, 1)))
    mode = draw(st.sampled_from(DYNAMIC_THRESHOLDING_MODES))
    return DynamicThresholdingSchedule(draw(finite), mode, draw(finite), draw(st.floats(0, 1e6)))


@settings(max_examples=EXAMPLES * 2)
@given(schedule=schedules(), step_count=steps_and_count, sigma=st.floats(0, 1e3))
def test_schedules_return_finite_floats(schedule, step_count, sigma):
    step, num_steps = step_count
    value = schedule(step, num_steps, sigma)
    assert isinstance(value, float) and math.isfinite(value)
    normalized = MeanNormalized(Linear(1.0, 3.0), 5.0)(step, num_steps, sigma) if num_steps > 1 else 5.0
    assert math.isfinite(normalized)


@settings(max_examples=EXAMPLES)
@given(schedule=schedules(), bad=st.sampled_from((math.nan, -1, 2.5, "3", None)))
def test_schedules_reject_bad_steps(schedule, bad):
    error = TypeError if not isinstance(bad, int) or isinstance(bad, bool) else ValueError
    with pytest.raises(error, match="`step`"):
        schedule(bad, 10, 1.0)
    with pytest.raises(ValueError, match="`sigma`"):
        schedule(0, 10, math.nan)


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda bad: Constant(bad), "scale"),
        (lambda bad: Linear(bad, 1.0), "start"),
        (lambda bad: Cosine(1.0, bad), "end"),
        (lambda bad: Window(bad), "scale"),
        (lambda bad: Interval(2.0, bad), "sigma_lo"),
        (lambda bad: BetaPdf(2.0, bad), "a"),
        (lambda bad: Cutoff(2.0, bad), "fraction"),
        (lambda bad: DynamicThresholdingSchedule(2.0, "sawtooth", bad), "minimum"),
        (lambda bad: MeanNormalized(Linear(1, 2), bad), "target_mean"),
    ],
)
@settings(max_examples=6)
@given(bad=st.sampled_from((math.nan, math.inf, -math.inf)))
def test_schedule_settings_reject_non_finite_numbers(make, argument, bad):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make(bad)


# ---------------------------------------------------------------------------------------- spaces


@st.composite
def levels(draw):
    kind = draw(st.sampled_from(("ddpm", "flow", "karras")))
    value = draw(st.floats(1e-4, 1 - 1e-4) if kind != "karras" else st.floats(1e-3, 1e3))
    if draw(st.booleans()):
        value = torch.tensor([value], dtype=torch.float64)
    return {"ddpm": NoiseLevel.ddpm, "flow": NoiseLevel.flow_matching, "karras": NoiseLevel.karras}[kind](value)


@settings(max_examples=EXAMPLES * 2)
@given(tensors=pairs(), level=levels(), types=st.data())
def test_conversions_are_finite_and_invert(tensors, level, types):
    pred, sample, _ = tensors
    names = ["epsilon", "sample", "flow_prediction" if level.is_flow else "v_prediction"]
    from_type, to_type = types.draw(st.sampled_from(names)), types.draw(st.sampled_from(names))
    before = [pred.clone(), sample.clone()]
    out = convert(pred, sample, from_type, to_type, level)
    _unchanged(before, [pred, sample])
    reference = convert(pred.double(), sample.double(), from_type, to_type, level)
    _assert_finite_where_representable(out, reference, torch.ones_like(pred, dtype=torch.bool))
    assert out.dtype == pred.dtype
    if pred.dtype == torch.float32:
        x0 = to_x0(pred.double(), sample.double(), from_type, level)
        back = to_x0(from_x0(x0, sample.double(), from_type, level), sample.double(), from_type, level)
        bound = _per_sample_max(x0) + _per_sample_max(sample) * 1e4
        _assert_close_per_sample(back, x0, bound, torch.float64, factor=1e4)


@settings(max_examples=EXAMPLES // 2)
@given(bad=st.sampled_from((math.nan, math.inf, -1.0, "1", None)), which=st.sampled_from(("alpha", "sigma")))
def test_noise_levels_reject_bad_values(bad, which):
    error = ValueError if isinstance(bad, float) else TypeError
    kwargs = {"alpha": 0.5, "sigma": 0.5, which: bad}
    with pytest.raises(error, match=f"`{which}`"):
        NoiseLevel(**kwargs)


# ---------------------------------------------------------------------------------------- adaptive


@settings(max_examples=EXAMPLES * 2)
@given(tensors=pairs(min_ndim=2), shift=st.tuples(st.integers(-40, 40), st.integers(-40, 40)))
def test_cosine_similarity_is_bounded_and_scale_invariant(tensors, shift):
    cond, uncond, _ = tensors
    cos = cosine_similarity(cond, uncond)
    assert cos.shape == (cond.shape[0],) and torch.isfinite(cos).all()
    assert bool(((cos >= -1) & (cos <= 1)).all())
    # power-of-two rescaling is exact: where no entry leaves the normal range, the similarity does not move
    c32, u32 = cond.float(), uncond.float()
    c2, u2 = torch.ldexp(c32, torch.tensor(shift[0])), torch.ldexp(u32, torch.tensor(shift[1]))
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max

    def normal(x):
        return bool(((x == 0) | ((x.abs() >= tiny) & (x.abs() <= huge))).all())

    if all(normal(x) for x in (c32, u32, c2, u2)):
        assert torch.equal(cosine_similarity(c2, u2), cosine_similarity(c32, u32))


@settings(max_examples=EXAMPLES // 2)
@given(threshold=st.floats(-1, 1), batch=st.integers(1, 4), steps=st.integers(1, 5), ratio=st.floats(0, 1))
def test_uncond_policies_return_masks(threshold, batch, steps, ratio):
    policy = AdaptiveGuidance(threshold)
    cut = RatioCutoff(ratio)
    for step in range(steps):
        mask = policy.needs_uncond(step, steps, batch)
        assert mask.dtype == torch.bool and mask.shape == (batch,)
        policy.update(step, torch.randn(batch, 3), torch.randn(batch, 3))
        assert cut.needs_uncond(step, steps, batch).shape == (batch,)


# ---------------------------------------------------------------------------------------- classifier steering


@settings(max_examples=EXAMPLES)
@given(logits=logit_pairs(), alpha=st.floats(-10, 10), omega=st.floats(-10, 10))
def test_classifier_weighting_keeps_masks_and_stays_finite(logits, alpha, omega):
    scores, other = logits
    if scores.ndim == 1:
        scores, other = scores[None], other[None]
    k = min(3, scores.shape[-1])
    ids = torch.topk(scores.float(), k, dim=-1).indices
    log_p = torch.log(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)))
    out = classifier_weighted_logits(scores, ids, log_p, alpha)
    assert not torch.isnan(out).any() and not torch.isposinf(out).any()
    desired = torch.log_softmax(other.float(), dim=-1).nan_to_num(nan=-math.inf)
    guided = gedi_logits(scores, desired, omega)
    assert not torch.isnan(guided).any() and not torch.isposinf(guided).any()
    assert torch.equal(torch.isneginf(guided), torch.isneginf(scores)) or omega == 0
