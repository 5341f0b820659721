"""Fused CFG / typical kernels: the Triton kernels (interpreted on CPU) against the PyTorch path.

``test_interpreted_*`` run the Triton kernels on CPU tensors through Triton's interpreter,
which needs ``TRITON_INTERPRET=1`` before triton is first imported: without it they are
skipped here and ``test_triton_kernels_under_the_interpreter`` runs them in a child
process that has it (small sizes: the interpreter is slow). GPU tests (``-m gpu``) compile
the same kernels on CUDA and compare them at full vocabulary sizes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

import samplers.kernels as kernels
from guidance.ops import cfg_log_probs
from samplers.kernels import reference

NEG_INF = -math.inf
# the interpreter evaluates both sides of tl.where in numpy, masked lanes included
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}): the Triton kernels cannot be tested"
    return None


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    if not INTERPRETING:
        pytest.skip(
            "needs TRITON_INTERPRET=1 from the start: run by test_triton_kernels_under_the_interpreter"
        )
    if (error := _triton_import_error()) is not None:
        pytest.skip(error)
    from samplers.kernels import triton_kernels

    return triton_kernels


@pytest.mark.skipif(INTERPRETING, reason="already under the interpreter")
def test_triton_kernels_under_the_interpreter() -> None:
    if (error := _triton_import_error()) is not None:
        pytest.skip(error)
    env = {**os.environ, "TRITON_INTERPRET": "1", "GUIDANCE_DISABLE_TRITON": "0"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "test_interpreted_",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]


def _special_rows(vocab: int) -> torch.Tensor:
    rows = _randn(8, vocab, seed=0, scale=2.0)
    rows[1] *= 0.3
    rows[2, ::4] = NEG_INF  # masked tokens
    rows[3] = 0.0  # uniform
    rows[4] = 0.0
    rows[4, 7] = 40.0  # one-hot
    rows[5] = NEG_INF
    rows[5, vocab // 2] = 1.0  # all but one masked
    rows[6, : vocab - 3] = NEG_INF  # three tokens left
    rows[7] = _randn(vocab, seed=1, scale=6.0)  # peaked
    return rows


# --------------------------------------------------------------------------- dispatcher (no Triton needed)


def test_cpu_path_is_guidance_ops() -> None:
    cond, uncond = _randn(3, 50, seed=2), _randn(3, 50, seed=3)
    cond[0, :5] = NEG_INF
    for scale in (0.0, 1.5, -0.5, torch.tensor([1.0, 0.0, 2.0])):
        assert torch.equal(kernels.cfg_log_softmax(cond, uncond, scale), cfg_log_probs(cond, uncond, scale))
    assert kernels.cfg_log_softmax(cond, uncond, 1.0) is cond
    assert not kernels.uses_triton(cond)


def test_dispatcher_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, ndim=2)
    monkeypatch.setattr(kernels, "_triton_module", lambda: object())
    monkeypatch.delenv(kernels.DISABLE_TRITON_ENV, raising=False)
    assert kernels.uses_triton(cuda_like)
    assert not kernels.uses_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64, ndim=2))
    assert not kernels.uses_triton(SimpleNamespace(is_cuda=False, dtype=torch.float32, ndim=2))
    monkeypatch.setenv(kernels.DISABLE_TRITON_ENV, "1")
    assert not kernels.uses_triton(cuda_like)
    monkeypatch.delenv(kernels.DISABLE_TRITON_ENV)
    monkeypatch.setattr(kernels, "_triton_module", lambda: None)  # Triton absent
    assert not kernels.triton_available()
    assert not kernels.uses_triton(cuda_like)
    logits = _randn(2, 30, seed=4)
    assert kernels.cfg_typical_sample(logits, logits.flip(-1), 2.0, 0.9, seed=0).shape == (2,)
    assert torch.equal(kernels.typical_filter(logits, 0.9), reference.typical_filter_torch(logits, 0.9))


# --------------------------------------------------------------------------- Triton, interpreted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_interpreted_cfg_log_softmax_kernel_matches_ops(interpreted: ModuleType, dtype: torch.dtype) -> None:
    vocab = 1500
    cond, uncond = (
        _randn(4, vocab, seed=5, scale=3.0).to(dtype),
        _randn(4, vocab, seed=6, scale=3.0).to(dtype),
    )
    cond[0, :100] = NEG_INF
    uncond[1, 50:60] = NEG_INF
    uncond[2, :] = NEG_INF
    uncond[2, 0] = 0.0
    for scale in (0.0, 1.5, -0.5, 3.0, torch.tensor([1.0, 0.0, 2.5, 0.3])):
        ours = interpreted.cfg_log_softmax_triton(cond, uncond, scale)
        expected = cfg_log_probs(cond, uncond, scale)
        assert ours.dtype == expected.dtype == torch.float32
        assert torch.equal(torch.isneginf(ours), torch.isneginf(expected)), scale
        finite = torch.isfinite(expected)
        torch.testing.assert_close(ours[finite], expected[finite], atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("mass", [1e-6, 0.9, 0.999])
def test_interpreted_typical_filter_kernel_matches_reference(interpreted: ModuleType, mass: float) -> None:
    rows = _special_rows(1100)
    ours = interpreted.typical_filter_triton(rows, mass)
    expected = reference.typical_filter_torch(rows, mass)
    assert torch.equal(ours, expected)


def test_interpreted_typical_filter_kernel_options(interpreted: ModuleType) -> None:
    rows = _special_rows(300)[[0, 2, 3, 6]]
    for keep_at_least in (3, 50, 2000):
        assert torch.equal(
            interpreted.typical_filter_triton(rows, 0.3, keep_at_least),
            reference.typical_filter_torch(rows, 0.3, keep_at_least),
        )
    assert torch.equal(
        interpreted.typical_filter_triton(rows, 0.7, 1, -1000.0),
        reference.typical_filter_torch(rows, 0.7, 1, -1000.0),
    )
    half = rows.to(torch.float16)
    out = interpreted.typical_filter_triton(half, 0.9)
    assert out.dtype == torch.float16 and torch.equal(out, reference.typical_filter_torch(half, 0.9))


def test_interpreted_typical_filter_kernel_all_inf_row_and_nan(interpreted: ModuleType) -> None:
    rows = _randn(3, 300, seed=7)
    rows[1] = NEG_INF
    out = interpreted.typical_filter_triton(rows, 0.9)
    assert torch.isneginf(out[1]).all() and torch.equal(out, reference.typical_filter_torch(rows, 0.9))
    rows[2, 5] = math.nan
    with pytest.raises(ValueError, match=r"NaN or \+inf logits in rows \[2\]"):
        interpreted.typical_filter_triton(rows, 0.9)


@pytest.mark.parametrize(
    "scale, temperature, mass, keep_at_least",
    [(1.0, 1.0, 0.9, 1), (2.5, 0.7, 0.3, 1), (0.0, 1.3, 1.0, 1), (1.5, 1.0, 0.05, 20)],
)
def test_interpreted_sample_kernel_matches_reference_token_for_token(
    interpreted: ModuleType, scale: float, temperature: float, mass: float, keep_at_least: int
) -> None:
    cond, uncond = _special_rows(1100), _randn(8, 1100, seed=8, scale=2.0)
    uncond[5] = cond[5]  # keep the all-but-one row samplable under guidance
    uncond[6] = cond[6]
    uniforms = reference.row_uniforms(8, cond.device, seed=99)
    kwargs = {"temperature": temperature, "min_tokens_to_keep": keep_at_least, "uniforms": uniforms}
    ours = interpreted.cfg_typical_sample_triton(cond, uncond, scale, mass, **kwargs)
    expected = reference.cfg_typical_sample_torch(cond, uncond, scale, mass, **kwargs)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, expected)


def test_interpreted_sample_kernel_per_row_scales_and_no_uncond(interpreted: ModuleType) -> None:
    cond, uncond = _randn(4, 900, seed=9, scale=2.0), _randn(4, 900, seed=10, scale=2.0)
    uniforms = reference.row_uniforms(4, cond.device, seed=7)
    scales = torch.tensor([1.0, 0.0, 2.0, -1.0])
    kwargs = {"temperature": 1.0, "min_tokens_to_keep": 1, "uniforms": uniforms}
    ours = interpreted.cfg_typical_sample_triton(cond, uncond, scales, 0.8, **kwargs)
    assert torch.equal(ours, reference.cfg_typical_sample_torch(cond, uncond, scales, 0.8, **kwargs))
    plain = interpreted.cfg_typical_sample_triton(cond, None, 1.0, 0.8, **kwargs)
    assert torch.equal(plain, reference.cfg_typical_sample_torch(cond, None, 1.0, 0.8, **kwargs))


def test_interpreted_sample_kernel_errors(interpreted: ModuleType) -> None:
    cond, uncond = _randn(2, 100, seed=11), _randn(2, 100, seed=12)
    cond[1, :50] = NEG_INF
    uncond[1, 50:] = NEG_INF
    uniforms = reference.row_uniforms(2, cond.device, seed=0)
    kwargs = {"temperature": 1.0, "min_tokens_to_keep": 1, "uniforms": uniforms}
    with pytest.raises(ValueError, match=r"Rows \[1\] of the guided logits are entirely -inf"):
        interpreted.cfg_typical_sample_triton(cond, uncond, 2.0, 0.9, **kwargs)
    uncond[1] = 0.0
    uncond[0, 3] = math.inf
    with pytest.raises(ValueError, match=r"NaN or \+inf logits in rows \[0\]"):
        interpreted.cfg_typical_sample_triton(cond, uncond, 2.0, 0.9, **kwargs)


def test_interpreted_sample_kernel_draws_the_renormalised_typical_distribution(
    interpreted: ModuleType,
) -> None:
    """Stratified uniforms (i + 1/2) / N: an inverse-CDF draw must give every kept token N p +- 1 times.

    Deterministic and stricter than a chi-square at this size (the interpreter runs one row in
    tens of milliseconds); the seeded chi-square tests are in test_typical.py and below (GPU).
    """
    vocab, draws, mass, scale = 16, 120, 0.8, 1.5
    cond, uncond = _randn(vocab, seed=13, scale=1.5), _randn(vocab, seed=14, scale=1.5)
    guided = cfg_log_probs(cond[None], uncond[None], scale)
    keep = reference.typical_filter_torch(guided, mass)[0] > NEG_INF
    probs = torch.where(keep, torch.softmax(guided[0].double(), -1), 0.0)
    probs = probs / probs.sum()
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    tokens = interpreted.cfg_typical_sample_triton(
        cond.expand(draws, vocab), uncond.expand(draws, vocab), scale, mass,
        temperature=1.0, min_tokens_to_keep=1, uniforms=uniforms,
    )  # fmt: skip
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert 3 <= int(keep.sum()) < vocab
    assert counts[~keep].sum() == 0
    assert (counts - draws * probs).abs().max() <= 1.0, (counts, draws * probs)
    assert torch.equal(tokens, torch.searchsorted(probs.cumsum(0), uniforms * probs.sum(), right=True))


# --------------------------------------------------------------------------- CUDA


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _assert_same_kept_set_up_to_near_ties(
    ours: torch.Tensor, expected: torch.Tensor, scores: torch.Tensor
) -> None:
    """Kept sets equal except tokens whose score ties the threshold within float32 rounding of H.

    The kernel sums the entropy in another order than torch (online, per lane), so H differs in
    its last bits; a token whose ``|-log p - H|`` is within that of the threshold can flip.
    """
    log_p = torch.log_softmax(scores.float(), dim=-1)
    entropy = -(log_p * log_p.exp()).nansum(-1, keepdim=True)
    shifted = (-log_p - entropy).abs()
    kept = expected > NEG_INF
    threshold = torch.where(kept, shifted, 0.0).amax(-1, keepdim=True)
    mismatch = (ours > NEG_INF) != kept
    near = (shifted - threshold).abs() <= 1e-5 * (1.0 + threshold) + 1e-5 * (1.0 + entropy.abs())
    assert bool((~mismatch | near).all()), "a kept-set difference away from the boundary"
    assert int(mismatch.sum()) <= max(2, scores.shape[0] // 4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_kernels_match_reference(dtype: torch.dtype) -> None:
    assert kernels.triton_available()
    torch.manual_seed(0)
    same_tokens = total_tokens = 0
    for batch, vocab in ((8, 128_000), (64, 32_000), (2, 262_144)):
        cond = (2 * torch.randn(batch, vocab, device="cuda")).to(dtype)
        uncond = (2 * torch.randn(batch, vocab, device="cuda")).to(dtype)
        cond[0, :1000] = NEG_INF
        assert kernels.uses_triton(cond, uncond)
        ours = kernels.cfg_log_softmax(cond, uncond, 1.5)
        expected = cfg_log_probs(cond, uncond, 1.5)
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(ours))
        torch.testing.assert_close(ours[finite], expected[finite], atol=1e-4, rtol=1e-5)
        for mass in (0.2, 0.9):
            filtered = kernels.typical_filter(cond, mass)
            assert filtered.dtype == dtype
            _assert_same_kept_set_up_to_near_ties(filtered, reference.typical_filter_torch(cond, mass), cond)
            tokens = kernels.cfg_typical_sample(cond, uncond, 1.5, mass, temperature=0.8, seed=1)
            expected_tokens = kernels.reference.cfg_typical_sample_torch(
                cond, uncond, 1.5, mass, temperature=0.8, min_tokens_to_keep=1,
                uniforms=reference.row_uniforms(batch, cond.device, seed=1),
            )  # fmt: skip
            same_tokens += int((tokens == expected_tokens).sum())
            total_tokens += batch
    assert same_tokens >= 0.9 * total_tokens


@pytest.mark.gpu
@gpu
def test_gpu_sampler_goodness_of_fit() -> None:
    vocab, draws = 64, 200_000
    cond = torch.randn(vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    keep = reference.typical_filter_torch(cond[None], 0.7)[0] > NEG_INF
    probs = torch.where(keep, torch.softmax(cond.double(), -1), 0.0)
    probs = probs / probs.sum()
    tokens = kernels.cfg_typical_sample(cond.expand(draws, vocab), None, 1.0, 0.7, seed=5)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~keep].sum() == 0
    expected = probs[keep] * draws
    statistic = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(keep.sum() - 1), dtype=torch.float64, device="cuda")
    assert float(torch.special.gammaincc(dof / 2, statistic / 2)) > 1e-3
