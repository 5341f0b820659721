"""Locally typical sampling: parity with transformers' TypicalLogitsWarper, exact boundary, draws."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers.generation.logits_process import TypicalLogitsWarper

from guidance.ops import cfg_log_probs
from samplers.kernels import cfg_typical_sample, typical_filter
from samplers.kernels.reference import row_uniforms, splitmix64, typical_filter_torch, typical_keep_mask
from samplers.typical import LocallyTypicalWarper

NEG_INF = -math.inf


def _scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' float32 log p, p and s = |-log p - H|."""
    normalized = torch.log_softmax(logits.float(), dim=-1)
    p = normalized.exp()
    ent = -(normalized * p).nansum(-1, keepdim=True)
    return normalized, p, torch.abs(-normalized - ent)


def exact_keep(logits: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """The oracle: transformers' algorithm (sort) with the cumulative mass summed in float64."""
    _, p, shifted = _scores(logits)
    sorted_s, order = torch.sort(shifted, dim=-1, stable=True)
    cum = p.double().gather(1, order).cumsum(-1)
    last = (cum < mass * cum[:, -1:]).sum(-1).clamp(max=logits.shape[-1] - 1)
    threshold = sorted_s.gather(1, last[:, None])
    if min_tokens_to_keep > 1:
        keep_at_least = min(min_tokens_to_keep, logits.shape[-1])
        threshold = torch.maximum(threshold, sorted_s[:, keep_at_least - 1 : keep_at_least])
    return shifted <= threshold


def transformers_keep(logits: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    return TypicalLogitsWarper(mass, min_tokens_to_keep=min_tokens_to_keep)(None, logits.float()) > NEG_INF


def ours_keep(logits: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    return LocallyTypicalWarper(mass, min_tokens_to_keep=min_tokens_to_keep)(None, logits) > NEG_INF


def assert_only_float32_boundary_differences(logits: torch.Tensor, mass: float) -> int:
    """Every token kept by exactly one of (ours, transformers) is one whose inclusion the float32 sum decided.

    In transformers' sorted order, token ``i`` is kept iff the running mass before it is below
    ``mass``. For every mismatched token, the float32 running sum (transformers' exact
    operations, against ``mass`` rounded to float32) and the float64 one must fall on opposite
    sides of ``mass``, and be within
    float32 rounding of each other. Returns the number of rows that differ.
    """
    ours, theirs = ours_keep(logits, mass), transformers_keep(logits, mass)
    assert torch.equal(ours, exact_keep(logits, mass)), "the kept set is not the exact (float64) typical set"
    _, p, shifted = _scores(logits)
    _, order = torch.sort(shifted, dim=-1, stable=True)
    cum32 = logits.float().gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    p_sorted = p.double().gather(1, order)
    cum64 = p_sorted.cumsum(-1) / p_sorted.sum(-1, keepdim=True)
    mass32 = float(torch.tensor(mass, dtype=torch.float32))  # transformers compares float32 with float32
    mismatch = (ours != theirs).gather(1, order)
    for row, position in mismatch.nonzero().tolist():
        assert position > 0
        before32, before64 = float(cum32[row, position - 1]), float(cum64[row, position - 1])
        assert (before32 < mass32) != (before64 < mass), (row, position, before32, before64)
        assert abs(before32 - before64) < 1e-4
    return int(mismatch.any(-1).sum())


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _zipf_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    """Real-ish next-token logits: Zipf-distributed probabilities in random token order."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = -1.1 * torch.log(ranks).expand(batch, vocab)
    order = torch.argsort(torch.rand(batch, vocab, generator=generator), dim=-1)
    return 3.0 + logits.gather(1, order) + 0.3 * torch.randn(batch, vocab, generator=generator)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mass", [1e-6, 0.2, 0.5, 0.9, 0.95, 0.999999])
@pytest.mark.parametrize("scale", [0.5, 1.0, 4.0])
def test_same_set_as_transformers_on_random_logits(mass: float, scale: float) -> None:
    logits = _randn(16, 2000, seed=int(mass * 1000) + int(scale * 10), scale=scale)
    assert_only_float32_boundary_differences(logits, mass)
    if mass < 0.99:  # away from 1 the float32 sum has room: the sets are identical here
        assert torch.equal(ours_keep(logits, mass), transformers_keep(logits, mass))


@pytest.mark.parametrize("mass", [0.2, 0.9, 0.95])
def test_same_set_as_transformers_on_real_ish_logits(mass: float) -> None:
    logits = _zipf_logits(8, 49152, seed=7)  # SmolLM2's vocabulary size
    assert assert_only_float32_boundary_differences(logits, mass) <= 1


def test_boundary_flips_at_128k_are_only_float32_rounding() -> None:
    """At V = 128k transformers' float32 running sum flips the last token in a few rows in ten."""
    logits = _randn(24, 128_000, seed=3)
    differing_rows = assert_only_float32_boundary_differences(logits, 0.9)
    assert 1 <= differing_rows <= 12  # 7 of these 24 rows (about one row in ten over 1,000 rows)


def test_vocab_over_150k_and_batch_256() -> None:
    big = _randn(2, 151_936, seed=11, scale=2.0)
    assert_only_float32_boundary_differences(big, 0.9)
    assert_only_float32_boundary_differences(big, 0.3)
    wide = _randn(256, 512, seed=12, scale=1.5)
    assert torch.equal(ours_keep(wide, 0.9), transformers_keep(wide, 0.9))
    one = _randn(1, 4096, seed=13)
    assert torch.equal(ours_keep(one, 0.9), transformers_keep(one, 0.9))


def test_special_rows_match_transformers() -> None:
    vocab = 300
    one_hot = torch.zeros(vocab)
    one_hot[17] = 50.0
    all_but_one = torch.full((vocab,), NEG_INF)
    all_but_one[123] = 0.5
    with_masked = _randn(vocab, seed=1, scale=2.0)
    with_masked[::3] = NEG_INF
    peaked = _randn(vocab, seed=2)
    peaked[5] = 12.0
    rows = torch.stack(
        [one_hot, all_but_one, with_masked, torch.zeros(vocab), torch.full((vocab,), 3.5), peaked]
    )
    for mass in (1e-6, 0.2, 0.9, 0.999):
        ours, theirs = ours_keep(rows, mass), transformers_keep(rows, mass)
        assert torch.equal(ours, theirs), mass
    keep = ours_keep(rows, 0.9)
    assert keep[0].nonzero().flatten().tolist() == [17]
    assert keep[1].nonzero().flatten().tolist() == [123]
    assert not keep[2, ::3].any()
    assert keep[3].all() and keep[4].all()  # uniform rows: all tokens tie, all kept


def test_ties_at_the_boundary_are_kept() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    # H = 1.47: s = 0.55, 0.14, 0.14, 0.83, 0.83; mass 0.25 crosses inside the tie {1, 2}
    keep = ours_keep(logits, 0.25)
    assert keep[0].tolist() == [False, True, True, False, False]
    assert torch.equal(keep, transformers_keep(logits, 0.25))


def test_min_tokens_to_keep() -> None:
    logits = _randn(8, 1000, seed=4, scale=3.0)
    for keep_at_least in (2, 10, 100):
        ours = ours_keep(logits, 1e-6, keep_at_least)
        assert torch.equal(ours, transformers_keep(logits, 1e-6, keep_at_least))
        assert (ours.sum(-1) == keep_at_least).all()
    assert ours_keep(logits, 1e-6, 5000).all()  # more than the vocabulary: everything


def test_min_tokens_to_keep_tie_rule_on_a_near_one_hot_row() -> None:
    """Exactly k tokens at the min_tokens_to_keep boundary, ties broken by the lower token id.

    4,095 tokens tie at the second-lowest score: transformers keeps exactly 3 (the peak and two
    of the tied tokens, whichever its sort puts first); so do we, the two with the lowest ids.
    """
    row = torch.zeros(1, 4096)
    row[0, 1000] = 30.0
    ours, theirs = ours_keep(row, 0.9, 3)[0], transformers_keep(row, 0.9, 3)[0]
    assert ours.nonzero().flatten().tolist() == [0, 1, 1000]
    assert int(theirs.sum()) == 3 and bool(theirs[1000])
    assert int(ours_keep(row, 0.9, 1).sum()) == 1 == int(transformers_keep(row, 0.9, 1).sum())
    # the floor counts masked tokens too (their score is +inf), as transformers does
    masked = torch.full((1, 6), NEG_INF)
    masked[0, 4] = 0.0
    assert typical_keep_mask(masked, 0.5, 3)[0][0].nonzero().flatten().tolist() == [0, 1, 4]
    out = LocallyTypicalWarper(0.5, 3, filter_value=-50.0)(None, masked)
    theirs_out = TypicalLogitsWarper(0.5, min_tokens_to_keep=3, filter_value=-50.0)(None, masked)
    assert torch.equal(out.sort().values, theirs_out.sort().values)


def test_ties_above_the_floor_are_all_kept() -> None:
    """When the mass set already holds k tokens, the mass rule decides: its ties are all kept."""
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    for keep_at_least in (1, 2):
        keep = ours_keep(logits, 0.25, keep_at_least)
        assert keep[0].tolist() == [False, True, True, False, False]
        assert torch.equal(keep, transformers_keep(logits, 0.25, keep_at_least))
    assert ours_keep(logits, 0.25, 3)[0].tolist() == [True, True, True, False, False]
    assert ours_keep(logits, 0.25, 4)[0].tolist() == [True, True, True, True, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype: torch.dtype) -> None:
    logits = _randn(4, 5000, seed=5, scale=2.0).to(dtype)
    out = LocallyTypicalWarper(0.9)(None, logits)
    assert out.dtype == dtype
    keep = out > NEG_INF
    # generate hands warpers float32 logits: compare with transformers on the upcast scores
    assert torch.equal(keep, transformers_keep(logits.float(), 0.9))
    assert torch.equal(out[keep], logits[keep])


def test_mass_one_is_off_and_filter_value_is_used() -> None:
    logits = _randn(3, 100, seed=6)
    assert LocallyTypicalWarper(1.0)(None, logits) is logits
    out = LocallyTypicalWarper(0.5, filter_value=-1000.0)(None, logits)
    theirs = TypicalLogitsWarper(0.5, filter_value=-1000.0)(None, logits)
    assert torch.equal(out, theirs)


@pytest.mark.parametrize("filter_value", [NEG_INF, -100.0])
@pytest.mark.parametrize("keep_at_least", [1, 3])
def test_all_inf_rows_are_returned_unchanged(filter_value: float, keep_at_least: int) -> None:
    logits = _randn(3, 50, seed=8)
    logits[1] = NEG_INF
    warper = LocallyTypicalWarper(0.9, keep_at_least, filter_value)
    out = warper(None, logits)
    assert torch.isneginf(out[1]).all()
    assert torch.equal(out[[0, 2]], warper(None, logits[[0, 2]]))
    assert torch.isneginf(warper(None, logits[1])).all()  # (vocab,) path
    assert not torch.isnan(out).any()
    theirs = TypicalLogitsWarper(0.9, min_tokens_to_keep=keep_at_least, filter_value=filter_value)
    assert torch.equal(out[1], theirs(None, logits)[1])  # transformers leaves it alone too


def test_one_dimensional_scores() -> None:
    logits = _randn(64, seed=9)
    assert torch.equal(typical_filter(logits, 0.7), typical_filter(logits[None], 0.7)[0])


def test_warper_in_generate_matches_typical_p() -> None:
    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.tensor([[1, 5, 9, 30]])
    common = {"do_sample": True, "max_new_tokens": 12, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    torch.manual_seed(1)
    reference = model.generate(prompt, typical_p=0.6, **common)
    torch.manual_seed(1)
    ours = model.generate(prompt, logits_processor=LogitsProcessorList([LocallyTypicalWarper(0.6)]), **common)
    assert torch.equal(ours, reference)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mass", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_mass(mass: float) -> None:
    with pytest.raises(ValueError, match=r"`mass` must be a number in \(0.0, 1.0\]"):
        LocallyTypicalWarper(mass)
    with pytest.raises(ValueError, match="`mass`"):
        typical_filter(torch.zeros(1, 4), mass)


@pytest.mark.parametrize("mass", [True, "0.9", None])
def test_mass_of_the_wrong_type(mass: object) -> None:
    with pytest.raises(TypeError, match="`mass` must be a real number"):
        LocallyTypicalWarper(mass)  # type: ignore[arg-type]


def test_bad_min_tokens_and_filter_value() -> None:
    with pytest.raises(ValueError, match="`min_tokens_to_keep` must be an integer in \\[1, inf\\]"):
        LocallyTypicalWarper(0.9, min_tokens_to_keep=0)
    with pytest.raises(TypeError, match="min_tokens_to_keep"):
        LocallyTypicalWarper(0.9, min_tokens_to_keep=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="filter_value"):
        LocallyTypicalWarper(0.9, filter_value=math.nan)
    with pytest.raises(TypeError, match="check_finite"):
        LocallyTypicalWarper(0.9, check_finite="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`scores` must be a torch.Tensor"):
        LocallyTypicalWarper(0.9)(None, [[0.0, 1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`scores` must be a floating-point tensor"):
        LocallyTypicalWarper(0.9)(None, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`scores` must have shape \(batch, vocab\) or \(vocab,\)"):
        LocallyTypicalWarper(0.9)(None, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="vocab >= 1"):
        LocallyTypicalWarper(0.9)(None, torch.zeros(2, 0))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_logits_raise(bad: float) -> None:
    logits = _randn(2, 20, seed=10)
    logits[1, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or \+inf logits in rows \[1\]"):
        LocallyTypicalWarper(0.9)(None, logits)
    with pytest.raises(ValueError, match=r"`cond_logits` contains NaN or \+inf"):
        cfg_typical_sample(logits, torch.zeros_like(logits), 1.5, 0.9, seed=0)
    with pytest.raises(ValueError, match=r"`uncond_logits` contains NaN or \+inf"):
        cfg_typical_sample(torch.zeros_like(logits), logits, 1.5, 0.9, seed=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_unchecked_nan_or_inf_rows_come_back_marked(bad: float) -> None:
    """check_finite=False: no read-back; a bad row is all-NaN (filter) or token -1 (sampler)."""
    logits = _randn(3, 20, seed=10)
    logits[1, 3] = bad
    out = LocallyTypicalWarper(0.9, check_finite=False)(None, logits)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()
    assert torch.equal(out[[0, 2]], typical_filter(logits[[0, 2]], 0.9))
    tokens = cfg_typical_sample(logits, torch.zeros_like(logits), 1.5, 0.9, seed=0, check_finite=False)
    assert tokens[1] == -1 and (tokens[[0, 2]] >= 0).all()
    checked = cfg_typical_sample(logits[[0, 2]], torch.zeros(2, 20), 1.5, 0.9, seed=torch.tensor([0, 2]))
    assert torch.equal(tokens[[0, 2]], checked)


def test_sampling_an_all_inf_row_raises() -> None:
    cond = _randn(2, 20, seed=11)
    uncond = _randn(2, 20, seed=12)
    cond[0, :10] = NEG_INF
    uncond[0, 10:] = NEG_INF  # guided row 0: every token masked in one branch
    with pytest.raises(ValueError, match=r"Rows \[0\] of the guided logits have no token to sample"):
        cfg_typical_sample(cond, uncond, 2.0, 0.9, seed=0)
    tokens = cfg_typical_sample(cond, uncond, 2.0, 0.9, seed=0, check_finite=False)
    assert tokens[0] == -1 and tokens[1] >= 0
    dead = torch.full((1, 20), NEG_INF)
    with pytest.raises(ValueError, match="no token to sample"):
        cfg_typical_sample(dead, None, 1.0, 0.9, seed=0)
    with pytest.raises(ValueError, match="no token to sample"):
        cfg_typical_sample(torch.zeros(1, 20), dead, 0.0, 0.9, seed=0)  # scale 0: uncond only
    assert cfg_typical_sample(torch.zeros(1, 20), dead, 1.0, 0.9, seed=0) >= 0  # scale 1: cond only


def test_bad_sampling_arguments() -> None:
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="`temperature` must be a number in \\[1e-05, inf\\)"):
        cfg_typical_sample(logits, None, 1.0, 0.9, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        cfg_typical_sample(logits, None, 1.0, 0.9, temperature=math.inf)
    with pytest.raises(ValueError, match="either `seed` or `generator`"):
        cfg_typical_sample(logits, None, 1.0, 0.9, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="`seed` must be an integer in \\[0, "):
        cfg_typical_sample(logits, None, 1.0, 0.9, seed=-1)
    with pytest.raises(TypeError, match="`seed`"):
        cfg_typical_sample(logits, None, 1.0, 0.9, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`seed` as a tensor must hold integers"):
        cfg_typical_sample(logits, None, 1.0, 0.9, seed=torch.zeros(2))
    with pytest.raises(ValueError, match=r"`seed` as a tensor must have shape \(2,\)"):
        cfg_typical_sample(logits, None, 1.0, 0.9, seed=torch.arange(3))
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator"):
        cfg_typical_sample(logits, None, 1.0, 0.9, generator=0)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"`scale` must be a number in \[-3.4028234663852886e\+38, 3.4028234663852886e\+38\]"
    ):
        cfg_typical_sample(logits, logits, math.nan, 0.9)
    with pytest.raises(ValueError, match="`scale` must be finite"):
        cfg_typical_sample(logits, logits, torch.tensor([1.0, math.inf]), 0.9)
    with pytest.raises(
        ValueError, match=r"`scale` must be a number or a tensor of shape \(\), \(1,\) or \(2,\)"
    ):
        cfg_typical_sample(logits, logits, torch.ones(3), 0.9)
    with pytest.raises(ValueError, match="`cond_logits` and `uncond_logits` must have the same shape"):
        cfg_typical_sample(logits, torch.zeros(2, 6), 1.5, 0.9)
    with pytest.raises(ValueError, match=r"`cond_logits` must have shape \(batch, vocab\)"):
        cfg_typical_sample(torch.zeros(5), None, 1.0, 0.9)
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        cfg_typical_sample(logits, None, 1.0, 0.9, min_tokens_to_keep=0)


# --------------------------------------------------------------------------- sampling


def test_splitmix64_matches_the_reference_algorithm() -> None:
    def reference(x: int) -> int:
        mask = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seeds = [0, 1, 2, 12345, 2**40 + 7, 2**62 + 3]
    ours = splitmix64(torch.tensor(seeds)).tolist()
    assert [v & ((1 << 64) - 1) for v in ours] == [reference(s) for s in seeds]
    uniforms = row_uniforms(4, torch.device("cpu"), seed=10)
    assert uniforms.dtype == torch.float64 and ((uniforms >= 0) & (uniforms < 1)).all()
    assert torch.equal(uniforms, row_uniforms(4, torch.device("cpu"), seed=torch.arange(10, 14)))


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((probs > 0).sum().item() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


def _renormalised_typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    keep = exact_keep(logits[None], mass)[0]
    probs = torch.where(keep, torch.softmax(logits.double(), -1), 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("scale, temperature, mass", [(1.0, 1.0, 0.8), (1.5, 0.7, 0.6), (3.0, 1.3, 0.95)])
def test_draws_follow_the_renormalised_typical_distribution(
    scale: float, temperature: float, mass: float
) -> None:
    vocab, draws = 40, 20_000
    cond, uncond = _randn(vocab, seed=20, scale=2.0), _randn(vocab, seed=21, scale=2.0)
    guided = cfg_log_probs(cond[None], uncond[None], scale)[0] / temperature
    probs = _renormalised_typical(guided, mass)
    tokens = cfg_typical_sample(
        cond.expand(draws, vocab),
        uncond.expand(draws, vocab),
        scale,
        mass,
        temperature=temperature,
        seed=1234,
    )
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[probs == 0].sum() == 0, "drew a token outside the typical set"
    assert _chi_square_p_value(counts[probs > 0], probs[probs > 0]) > 1e-3


def test_draws_are_reproducible_per_row_seed() -> None:
    cond, uncond = _randn(6, 1000, seed=30), _randn(6, 1000, seed=31)
    first = cfg_typical_sample(cond, uncond, 1.5, 0.9, seed=5)
    assert torch.equal(first, cfg_typical_sample(cond, uncond, 1.5, 0.9, seed=5))
    row_seeds = torch.arange(5, 11)
    assert torch.equal(first, cfg_typical_sample(cond, uncond, 1.5, 0.9, seed=row_seeds))
    # a row's draw depends on its own seed and logits only
    assert torch.equal(first[2:4], cfg_typical_sample(cond[2:4], uncond[2:4], 1.5, 0.9, seed=row_seeds[2:4]))
    generator = torch.Generator().manual_seed(0)
    a = cfg_typical_sample(cond, uncond, 1.5, 0.9, generator=generator)
    b = cfg_typical_sample(cond, uncond, 1.5, 0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_scale_one_is_plain_typical_sampling_of_cond() -> None:
    cond, uncond = _randn(8, 500, seed=40), _randn(8, 500, seed=41)
    no_guidance = cfg_typical_sample(cond, uncond, 1.0, 0.9, seed=3)
    assert torch.equal(no_guidance, cfg_typical_sample(cond, None, 1.0, 0.9, seed=3))
    kept = typical_filter_torch(cond, 0.9) > NEG_INF
    assert kept.gather(1, no_guidance[:, None]).all()
    per_row = cfg_typical_sample(cond, uncond, torch.tensor([1.0, 2.0] * 4), 0.9, seed=3)
    assert torch.equal(per_row[::2], no_guidance[::2])  # rows at scale 1 draw from cond alone


def test_mass_one_samples_the_full_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    tokens = cfg_typical_sample(logits.expand(8000, 4), None, 1.0, 1.0, seed=0)
    counts = torch.bincount(tokens, minlength=4).double()
    assert _chi_square_p_value(counts, logits.exp().double()) > 1e-3


# --------------------------------------------------------------------------- fused warpers


def test_fused_warpers_supported_recognises_what_the_kernel_fuses() -> None:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from samplers.kernels import FusedSampling, fused_warpers_supported

    both = LogitsProcessorList([TemperatureLogitsWarper(0.7), TypicalLogitsWarper(0.9, min_tokens_to_keep=2)])
    assert fused_warpers_supported(both) == FusedSampling(temperature=0.7, mass=0.9, min_tokens_to_keep=2)
    assert fused_warpers_supported([LocallyTypicalWarper(0.5)]) == FusedSampling(mass=0.5)
    assert fused_warpers_supported([TemperatureLogitsWarper(1.3)]) == FusedSampling(temperature=1.3)
    assert fused_warpers_supported([]) == FusedSampling()
    for not_fused in (
        [TopKLogitsWarper(50)],
        [TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)],
        [TypicalLogitsWarper(0.9), TemperatureLogitsWarper(0.7)],  # temperature after the filter
        [LocallyTypicalWarper(0.9), LocallyTypicalWarper(0.8)],
        [LocallyTypicalWarper(0.9, filter_value=-100.0)],  # filtered tokens keep some probability
        [lambda input_ids, scores: scores],
    ):
        assert fused_warpers_supported(not_fused) is None, not_fused


def test_fused_sampling_is_the_warpers_then_a_draw() -> None:
    """Same kept set as temperature + typical warpers, same tokens as cfg_typical_sample for a seed."""
    from transformers.generation.logits_process import TemperatureLogitsWarper

    from samplers.kernels import FusedSampling, fused_warpers_supported

    cond, uncond = _randn(6, 300, seed=50, scale=2.0), _randn(6, 300, seed=51, scale=2.0)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.8), LocallyTypicalWarper(0.7)])
    step = fused_warpers_supported(warpers)
    tokens = step.sample(cond, uncond, 2.0, seed=11)
    assert torch.equal(tokens, cfg_typical_sample(cond, uncond, 2.0, 0.7, temperature=0.8, seed=11))
    kept = warpers(None, cfg_log_probs(cond, uncond, 2.0)) > NEG_INF
    assert kept.gather(1, tokens[:, None]).all()
    generator = torch.Generator().manual_seed(3)
    first = step.sample(cond, uncond, 2.0, generator=generator)
    assert torch.equal(first, step.sample(cond, uncond, 2.0, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="`mass`"):
        FusedSampling(mass=0.0)
    with pytest.raises(ValueError, match="`temperature`"):
        FusedSampling(temperature=0.0)


def test_warper_merges_with_generate_own_typical_warper() -> None:
    """generate merges a custom list with its own warpers by type: ours is kept next to transformers'."""
    config = LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    calls = []
    warper = LocallyTypicalWarper(0.9)

    class Spy:
        def __call__(self, input_ids, scores):
            calls.append(scores.shape)
            return warper(input_ids, scores)

    processors = LogitsProcessorList([Spy(), warper])
    out = model.generate(
        torch.tensor([[1, 5, 9]]), do_sample=True, typical_p=0.8, top_k=0, max_new_tokens=3,
        logits_processor=processors,
    )  # fmt: skip
    assert out.shape == (1, 6) and len(calls) == 3
