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
from pathlib import Path
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


@pytest.mark.slow  # about a minute: every kernel under TRITON_INTERPRET=1 in a fresh interpreter
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
    for scale in (0.0, 1.5, -0.5):
        assert torch.equal(kernels.cfg_log_softmax(cond, uncond, scale), cfg_log_probs(cond, uncond, scale))
    per_row = kernels.cfg_log_softmax(cond, uncond, torch.tensor([1.0, 0.0, 2.0]))
    assert torch.equal(per_row[0], cond[0])  # a row at scale 1 is cond itself, bit for bit
    assert torch.equal(per_row[1:], cfg_log_probs(cond, uncond, torch.tensor([1.0, 0.0, 2.0]))[1:])
    assert kernels.cfg_log_softmax(cond, uncond, 1.0) is cond
    row = cond[0]
    assert kernels.cfg_log_softmax(row, uncond[0], 1) is row
    assert torch.equal(
        kernels.cfg_log_softmax(cond[1], uncond[1], 2.0), kernels.cfg_log_softmax(cond, uncond, 2.0)[1]
    )
    assert not kernels.uses_triton(cond)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cfg_log_softmax_per_row_scale_one_is_cond_bit_for_bit(dtype: torch.dtype) -> None:
    cond, uncond = _randn(4, 64, seed=21, scale=4.0).to(dtype), _randn(4, 64, seed=22, scale=4.0).to(dtype)
    out = kernels.cfg_log_softmax(cond, uncond, torch.tensor([1.0, 3.0, 1.0, -2.0]))
    assert out.dtype == torch.float32
    assert torch.equal(out[[0, 2]], cond[[0, 2]].float())
    assert torch.isfinite(out).all()


def test_cfg_log_softmax_dead_branch_rows_are_masked_never_nan() -> None:
    cond, uncond = _randn(3, 10, seed=23), _randn(3, 10, seed=24)
    uncond[0] = NEG_INF  # dead unconditional row
    cond[1] = NEG_INF  # dead conditional row
    for scale in (0.0, 2.0, 0.5, torch.tensor([0.0, 1.0, 2.0])):
        out = kernels.cfg_log_softmax(cond, uncond, scale)
        assert not torch.isnan(out).any(), scale
        assert torch.isneginf(out[0]).all()  # uncond counts at every scale but 1
    per_row = kernels.cfg_log_softmax(cond, uncond, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.isneginf(per_row[0]).all() and torch.isneginf(per_row[1]).all()  # w=0 reads u, w=1 reads c
    assert torch.isfinite(per_row[2]).all()
    at_zero = kernels.cfg_log_softmax(cond, uncond, 0.0)
    assert torch.isneginf(at_zero[0]).all() and torch.isfinite(at_zero[1]).all()  # a dead cond does not count


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_cfg_log_softmax_rejects_nan_and_inf_logits(bad: float) -> None:
    cond, uncond = _randn(3, 10, seed=25), _randn(3, 10, seed=26)
    uncond[2, 4] = bad
    with pytest.raises(ValueError, match=r"`uncond_logits` contains NaN or \+inf logits in rows \[2\]"):
        kernels.cfg_log_softmax(cond, uncond, 1.5)
    out = kernels.cfg_log_softmax(cond, uncond, 1.5, check_finite=False)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[:2]).all()
    assert torch.equal(out[:2], kernels.cfg_log_softmax(cond[:2], uncond[:2], 1.5))


def test_value_checks_read_every_entry_only_when_a_sum_is_not_finite(monkeypatch) -> None:
    dispatch = sys.modules[kernels.cfg_log_softmax.__module__]
    calls: list[str] = []
    original = dispatch.check_logit_values
    monkeypatch.setattr(dispatch, "check_logit_values", lambda t, name: calls.append(name) or original(t, name))
    cond, uncond = _randn(3, 10, seed=27), _randn(3, 10, seed=28)
    kernels.cfg_log_softmax(cond, uncond, 1.5)
    kernels.typical_filter(cond, 0.9)
    assert calls == []
    cond[1, 3] = -math.inf  # a masked token: the full check runs and lets it through
    assert torch.isneginf(kernels.cfg_log_softmax(cond, uncond, 1.5)[1, 3])
    assert calls == ["cond_logits", "uncond_logits"]
    cond[0, 0] = math.nan
    with pytest.raises(ValueError, match="`scores` contains NaN"):
        kernels.typical_filter(cond, 0.9)


def test_cfg_log_softmax_argument_errors() -> None:
    cond = torch.zeros(2, 4)
    with pytest.raises(
        ValueError, match=r"`scale` must be a number in \[-3.4028234663852886e\+38, 3.4028234663852886e\+38\]"
    ):
        kernels.cfg_log_softmax(cond, cond, math.nan)
    with pytest.raises(TypeError, match="`scale` must be a real number"):
        kernels.cfg_log_softmax(cond, cond, "2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`scale` must be a number in"):  # past float32: 0 * inf there
        kernels.cfg_log_softmax(cond, cond, 1e39)
    with pytest.raises(ValueError, match="`scale` must be finite"):
        kernels.cfg_log_softmax(cond, cond, torch.tensor([1.0, math.nan]))
    with pytest.raises(
        ValueError, match=r"`scale` must be a number or a tensor of shape \(\), \(1,\) or \(2,\)"
    ):
        kernels.cfg_log_softmax(cond, cond, torch.ones(3))
    with pytest.raises(TypeError, match="`scale` must be a real tensor"):
        kernels.cfg_log_softmax(cond, cond, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="`cond_logits` and `uncond_logits` must have the same shape"):
        kernels.cfg_log_softmax(cond, torch.zeros(2, 5), 2.0)
    with pytest.raises(TypeError, match="`uncond_logits` must be a torch.Tensor"):
        kernels.cfg_log_softmax(cond, None, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`cond_logits` must be a floating-point tensor"):
        kernels.cfg_log_softmax(torch.zeros(2, 4, dtype=torch.long), cond, 2.0)
    with pytest.raises(ValueError, match=r"`cond_logits` must have shape \(batch, vocab\) or \(vocab,\)"):
        kernels.cfg_log_softmax(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), 2.0)


def test_split_chunks_rule() -> None:
    """Rows are split only when the batch cannot fill the GPU and a row holds 2+ chunks of 4,096."""
    assert kernels.split_chunks(1, 256_000) == 62  # vocab-bound: 62 chunks of ~4k tokens
    assert kernels.split_chunks(1, 32_000) == 7
    assert kernels.split_chunks(8, 128_000) == 31  # ceil(2 * 132 / 8) = 33 programs wanted, 31 fit
    assert kernels.split_chunks(64, 128_000) == 5
    assert kernels.split_chunks(132, 256_000) == 1 and kernels.split_chunks(256, 256_000) == 1
    assert kernels.split_chunks(1, 6_000) == 1  # too short to split


def test_samplers_import_light() -> None:
    """The samplers load neither transformers, diffusers, vllm nor triton (adapters stay lazy)."""
    code = (
        "import sys, samplers, samplers.cfgpp, samplers.kernels, samplers.typical\n"
        "from samplers import LocallyTypicalWarper, cfg_typical_sample, sample_euler_cfgpp\n"
        "LocallyTypicalWarper(0.9)\n"
        "heavy = [m for m in ('transformers', 'diffusers', 'vllm', 'triton', 'guidance.lm',"
        " 'guidance.diffusion', 'guidance.vllm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_dispatcher_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, ndim=2)
    monkeypatch.setattr(kernels.dispatch, "_triton_module", lambda: object())
    monkeypatch.delenv(kernels.DISABLE_TRITON_ENV, raising=False)
    assert kernels.uses_triton(cuda_like)
    assert not kernels.uses_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64, ndim=2))
    assert not kernels.uses_triton(SimpleNamespace(is_cuda=False, dtype=torch.float32, ndim=2))
    monkeypatch.setenv(kernels.DISABLE_TRITON_ENV, "1")
    assert not kernels.uses_triton(cuda_like)
    monkeypatch.delenv(kernels.DISABLE_TRITON_ENV)
    monkeypatch.setattr(kernels.dispatch, "_triton_module", lambda: None)  # Triton absent
    assert not kernels.triton_available()
    assert not kernels.uses_triton(cuda_like)
    logits = _randn(2, 30, seed=4)
    assert kernels.cfg_typical_sample(logits, logits.flip(-1), 2.0, 0.9, seed=0).shape == (2,)
    assert torch.equal(kernels.typical_filter(logits, 0.9), reference.typical_filter_torch(logits, 0.9))


# --------------------------------------------------------------------------- Triton, interpreted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_cfg_log_softmax_kernel_matches_ops(interpreted: ModuleType, dtype: torch.dtype) -> None:
    vocab = 1500
    cond, uncond = (
        _randn(5, vocab, seed=5, scale=3.0).to(dtype),
        _randn(5, vocab, seed=6, scale=3.0).to(dtype),
    )
    cond[0, :100] = NEG_INF
    uncond[1, 50:60] = NEG_INF
    uncond[2, :] = NEG_INF
    uncond[2, 0] = 0.0
    uncond[4, :] = NEG_INF  # a dead branch: -inf rows where it counts, never NaN
    for scale in (0.0, -0.5, 3.0, torch.tensor([1.0, 0.0, 2.5, 0.3, 1.0])):
        ours = interpreted.cfg_log_softmax_triton(cond, uncond, scale)
        expected = reference.cfg_log_softmax_torch(cond, uncond, scale)
        assert ours.dtype == expected.dtype == torch.float32
        assert not torch.isnan(ours).any() and not torch.isnan(expected).any()
        assert torch.equal(torch.isneginf(ours), torch.isneginf(expected)), scale
        finite = torch.isfinite(expected)
        torch.testing.assert_close(ours[finite], expected[finite], atol=2e-5, rtol=1e-6)
        if isinstance(scale, torch.Tensor):  # rows at scale 1: cond itself, bit for bit
            assert torch.equal(ours[[0, 4]], cond[[0, 4]].float())
        else:
            torch.testing.assert_close(
                ours[finite], cfg_log_probs(cond, uncond, scale)[finite], atol=2e-5, rtol=0
            )


def test_interpreted_cfg_log_softmax_kernel_flags(interpreted: ModuleType) -> None:
    cond, uncond = _randn(3, 200, seed=15), _randn(3, 200, seed=16)
    cond[1, 3] = math.nan
    with pytest.raises(ValueError, match=r"NaN or \+inf logits in rows \[1\]"):
        interpreted.cfg_log_softmax_triton(cond, uncond, 2.0)
    out = interpreted.cfg_log_softmax_triton(
        cond, uncond, torch.tensor([2.0, 2.0, math.inf]), check_finite=False
    )
    assert torch.isnan(out[1:]).all() and not torch.isnan(out[0]).any()


@pytest.mark.parametrize("mass", [1e-6, 0.999])
def test_interpreted_typical_filter_kernel_matches_reference(interpreted: ModuleType, mass: float) -> None:
    rows = _special_rows(1100)
    ours = interpreted.typical_filter_triton(rows, mass, chunks=1)
    expected = reference.typical_filter_torch(rows, mass)
    assert torch.equal(ours, expected)


def test_interpreted_typical_filter_kernel_options(interpreted: ModuleType) -> None:
    rows = _special_rows(300)[[0, 2, 3, 4, 6]]
    for keep_at_least in (3, 2000):  # row 3 (uniform) and 4 (one-hot) tie at the floor
        ours = interpreted.typical_filter_triton(rows, 0.3, keep_at_least, chunks=1)
        assert torch.equal(ours, reference.typical_filter_torch(rows, 0.3, keep_at_least)), keep_at_least
    assert int((ours[2] > NEG_INF).sum()) == 300
    assert torch.equal(
        interpreted.typical_filter_triton(rows, 0.7, 1, -1000.0, chunks=1),
        reference.typical_filter_torch(rows, 0.7, 1, -1000.0),
    )
    half = rows.to(torch.float16)
    out = interpreted.typical_filter_triton(half, 0.9, chunks=1)
    assert out.dtype == torch.float16 and torch.equal(out, reference.typical_filter_torch(half, 0.9))


def test_interpreted_typical_filter_kernel_all_inf_row_and_nan(interpreted: ModuleType) -> None:
    rows = _randn(3, 300, seed=7)
    rows[1] = NEG_INF
    out = interpreted.typical_filter_triton(rows, 0.9, 2, -50.0, chunks=1)
    assert torch.isneginf(out[1]).all() and torch.equal(
        out, reference.typical_filter_torch(rows, 0.9, 2, -50.0)
    )
    rows[2, 5] = math.nan
    with pytest.raises(ValueError, match=r"NaN or \+inf logits in rows \[2\]"):
        interpreted.typical_filter_triton(rows, 0.9, chunks=1)
    out = interpreted.typical_filter_triton(rows, 0.9, check_finite=False, chunks=1)
    assert torch.isnan(out[2]).all() and torch.isneginf(out[1]).all()
    torch.testing.assert_close(
        out, reference.typical_filter_torch(rows, 0.9, mark_invalid=True), rtol=0, atol=0, equal_nan=True
    )


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
    cond[3] = 0.0  # uniform: ties at the floor
    uniforms = reference.row_uniforms(8, cond.device, seed=99)
    kwargs = {"temperature": temperature, "min_tokens_to_keep": keep_at_least, "uniforms": uniforms}
    ours = interpreted.cfg_typical_sample_triton(cond, uncond, scale, mass, **kwargs, chunks=1)
    expected = reference.cfg_typical_sample_torch(cond, uncond, scale, mass, **kwargs)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, expected)


def test_interpreted_sample_kernel_per_row_scales_and_no_uncond(interpreted: ModuleType) -> None:
    cond, uncond = _randn(4, 900, seed=9, scale=2.0), _randn(4, 900, seed=10, scale=2.0)
    uniforms = reference.row_uniforms(4, cond.device, seed=7)
    scales = torch.tensor([1.0, 0.0, 2.0, -1.0])
    kwargs = {"temperature": 1.0, "min_tokens_to_keep": 1, "uniforms": uniforms, "chunks": 1}
    ours = interpreted.cfg_typical_sample_triton(cond, uncond, scales, 0.8, **kwargs)
    kwargs.pop("chunks")
    assert torch.equal(ours, reference.cfg_typical_sample_torch(cond, uncond, scales, 0.8, **kwargs))
    plain = interpreted.cfg_typical_sample_triton(cond, None, 1.0, 0.8, **kwargs, chunks=1)
    assert torch.equal(plain, reference.cfg_typical_sample_torch(cond, None, 1.0, 0.8, **kwargs))


def test_interpreted_sample_kernel_errors(interpreted: ModuleType) -> None:
    cond, uncond = _randn(2, 100, seed=11), _randn(2, 100, seed=12)
    cond[1, :50] = NEG_INF
    uncond[1, 50:] = NEG_INF
    uniforms = reference.row_uniforms(2, cond.device, seed=0)
    kwargs = {"temperature": 1.0, "min_tokens_to_keep": 1, "uniforms": uniforms, "chunks": 1}
    with pytest.raises(ValueError, match=r"Rows \[1\] of the guided logits have no token to sample"):
        interpreted.cfg_typical_sample_triton(cond, uncond, 2.0, 0.9, **kwargs)
    tokens = interpreted.cfg_typical_sample_triton(cond, uncond, 2.0, 0.9, **kwargs, check_finite=False)
    assert tokens[1] == -1 and tokens[0] >= 0
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
    vocab, draws, mass, scale = 16, 24, 0.8, 1.5
    cond, uncond = _randn(vocab, seed=13, scale=1.5), _randn(vocab, seed=14, scale=1.5)
    guided = cfg_log_probs(cond[None], uncond[None], scale)
    keep = reference.typical_filter_torch(guided, mass)[0] > NEG_INF
    probs = torch.where(keep, torch.softmax(guided[0].double(), -1), 0.0)
    probs = probs / probs.sum()
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    tokens = interpreted.cfg_typical_sample_triton(
        cond.expand(draws, vocab), uncond.expand(draws, vocab), scale, mass,
        temperature=1.0, min_tokens_to_keep=1, uniforms=uniforms, chunks=1,
    )  # fmt: skip
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert 3 <= int(keep.sum()) < vocab
    assert counts[~keep].sum() == 0
    assert (counts - draws * probs).abs().max() <= 1.0, (counts, draws * probs)
    assert torch.equal(tokens, torch.searchsorted(probs.cumsum(0), uniforms * probs.sum(), right=True))


# split rows: vocab 3000 in chunks of 1024 tokens (3 programs per row), the kernels of triton_split


def _split_rows() -> torch.Tensor:
    rows = _randn(4, 3000, seed=17, scale=2.0)
    rows[1, 1::3] = NEG_INF
    rows[2] = 0.0
    rows[2, 2500] = 10.0  # p = 0.88; the 2,999 others tie (at the floor's score), across the chunks
    rows[3] = NEG_INF  # all -inf: unchanged
    return rows


def test_interpreted_split_layout(interpreted: ModuleType) -> None:
    from samplers.kernels.triton_split import NPASS, chunk_layout

    assert chunk_layout(3000, 3) == (1024, 3) and chunk_layout(5000, 5) == (1024, 5)
    assert chunk_layout(128_000, 62)[1] <= 62 and chunk_layout(100, 8) == (1024, 1)
    assert 16**NPASS >= 2**31  # the pivot search closes a 31-bit key interval in NPASS passes


@pytest.mark.parametrize("mass, keep_at_least, rows", [(0.9, 1, [0, 1, 2, 3]), (0.2, 1500, [0, 2])])
def test_interpreted_split_filter_matches_reference(
    interpreted: ModuleType, mass: float, keep_at_least: int, rows: list[int]
) -> None:
    scores = _split_rows()[rows]
    ours = interpreted.typical_filter_triton(scores, mass, keep_at_least, chunks=3)
    expected = reference.typical_filter_torch(scores, mass, keep_at_least)
    assert torch.equal(ours, expected)
    if keep_at_least > 1:  # exactly k kept on the near-one-hot row: the peak and ids 0..k-2
        assert (ours[1] > NEG_INF).nonzero().flatten().tolist() == [*range(keep_at_least - 1), 2500]


def test_interpreted_split_filter_flags(interpreted: ModuleType) -> None:
    rows = _split_rows()[[0, 3]].to(torch.bfloat16)
    rows[0, 2100] = math.inf
    with pytest.raises(ValueError, match=r"NaN or \+inf logits in rows \[0\]"):
        interpreted.typical_filter_triton(rows, 0.9, chunks=3)
    out = interpreted.typical_filter_triton(rows, 0.9, 1, -7.0, check_finite=False, chunks=3)
    assert out.dtype == torch.bfloat16 and torch.isnan(out[0]).all() and torch.isneginf(out[1]).all()


def test_interpreted_split_sample_matches_reference_token_for_token(interpreted: ModuleType) -> None:
    cond, uncond = _split_rows()[:3], _randn(3, 3000, seed=18, scale=2.0)
    uniforms = reference.row_uniforms(3, cond.device, seed=5)
    kwargs = {"temperature": 0.8, "min_tokens_to_keep": 1, "uniforms": uniforms}
    scales = torch.tensor([1.5, 0.0, 1.0])
    ours = interpreted.cfg_typical_sample_triton(cond, uncond, scales, 0.9, **kwargs, chunks=3)
    assert torch.equal(ours, reference.cfg_typical_sample_torch(cond, uncond, scales, 0.9, **kwargs))
    # the floor on the near-one-hot row: 40 tokens, ties by token id, drawn across chunks
    low = torch.tensor([1e-4], dtype=torch.float64)  # lands among the kept ties 0..38, before the peak
    kwargs = {"temperature": 1.0, "min_tokens_to_keep": 40, "uniforms": low}
    ours = interpreted.cfg_typical_sample_triton(cond[2:], None, 1.0, 0.3, **kwargs, chunks=3)
    assert torch.equal(ours, reference.cfg_typical_sample_torch(cond[2:], None, 1.0, 0.3, **kwargs))
    assert 0 <= int(ours) < 39
    # the owner chunk changes with u: a low and a high uniform land in the first and last chunk
    flat = torch.zeros(2, 3000)
    edges = torch.tensor([0.0001, 0.9999], dtype=torch.float64)
    kwargs = {"temperature": 1.0, "min_tokens_to_keep": 1, "uniforms": edges}
    tokens = interpreted.cfg_typical_sample_triton(flat, None, 1.0, 1.0, **kwargs, chunks=3)
    assert tokens.tolist() == [0, 2999]
    dead = torch.full((1, 3000), NEG_INF)
    kwargs["uniforms"] = edges[:1]
    with pytest.raises(ValueError, match="no token to sample"):
        interpreted.cfg_typical_sample_triton(dead, None, 1.0, 0.9, **kwargs, chunks=3)
    assert (
        interpreted.cfg_typical_sample_triton(dead, None, 1.0, 0.9, **kwargs, chunks=3, check_finite=False)
        == -1
    )


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


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch, vocab", [(1, 262_144), (4, 128_256), (16, 32_000)])
def test_gpu_split_rows_match_the_row_kernel_and_reference(batch: int, vocab: int) -> None:
    """The split-row kernels keep the row kernel's set (same float32 scores up to entropy rounding)."""
    from samplers.kernels import triton_kernels

    torch.manual_seed(1)
    cond = 2 * torch.randn(batch, vocab, device="cuda")
    uncond = 2 * torch.randn(batch, vocab, device="cuda")
    cond[0, : vocab // 3] = NEG_INF
    assert kernels.split_chunks(batch, vocab, cond.device) > 1  # the dispatcher splits these
    for mass, keep_at_least in ((0.9, 1), (0.2, 1), (1e-6, 50)):
        expected = reference.typical_filter_torch(cond, mass, keep_at_least)
        for chunks in (1, 7, None):
            ours = triton_kernels.typical_filter_triton(cond, mass, keep_at_least, chunks=chunks)
            _assert_same_kept_set_up_to_near_ties(ours, expected, cond)
            if keep_at_least > 1:
                assert ((ours > NEG_INF).sum(-1) == keep_at_least).all()
    uniforms = reference.row_uniforms(batch, cond.device, seed=3)
    kwargs = {"temperature": 0.8, "min_tokens_to_keep": 1, "uniforms": uniforms}
    row = triton_kernels.cfg_typical_sample_triton(cond, uncond, 1.5, 0.9, **kwargs, chunks=1)
    split = triton_kernels.cfg_typical_sample_triton(cond, uncond, 1.5, 0.9, **kwargs, chunks=9)
    expected = reference.cfg_typical_sample_torch(cond, uncond, 1.5, 0.9, **kwargs)
    assert int((row == split).sum()) >= batch - 1 and int((split == expected).sum()) >= batch - 1


@pytest.mark.gpu
@gpu
def test_gpu_split_rows_edge_rows_and_no_read_back() -> None:
    from samplers.kernels import triton_kernels

    rows = torch.randn(3, 100_000, device="cuda")
    rows[1] = NEG_INF
    rows[2, 5] = math.nan
    out = triton_kernels.typical_filter_triton(rows, 0.9, 1, -5.0, check_finite=False, chunks=8)
    assert torch.isneginf(out[1]).all() and torch.isnan(out[2]).all() and not torch.isnan(out[0]).any()
    with pytest.raises(ValueError, match=r"NaN or \+inf logits in rows \[2\]"):
        triton_kernels.typical_filter_triton(rows, 0.9, chunks=8)
    tokens = kernels.cfg_typical_sample(rows, None, 1.0, 0.9, seed=0, check_finite=False)
    assert tokens[1:].tolist() == [-1, -1] and 0 <= int(tokens[0]) < 100_000
