"""Adaptive CFG decoding (guidance.lm.adaptive): rules, per-row unconditional caches, cfg_generate keyword."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation import GenerateDecoderOnlyOutput

from guidance import cfg_generate, ops
from guidance.lm import compat
from guidance.lm.adaptive import (
    EXACT_SKIP,
    FINISHED,
    GUIDED,
    HEURISTIC_SKIP,
    AdaptiveGenerateOutput,
    AdaptiveLMGuidance,
    AdaptiveStats,
    HeadBound,
    UnconditionalRows,
    as_adaptive,
    greedy_certificate,
    head_bound,
    required_uncond_preference,
)

PROMPTS = [[5, 17, 33, 8, 41, 12], [7, 3, 50], [60, 61, 62, 63]]
NEGATIVES = [[9, 27, 4], [11], [30, 31, 32, 33, 34, 35, 36]]
NEVER_SKIP = AdaptiveLMGuidance(threshold=math.inf, certify=False)


def _left_pad(rows):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _gen(model, scale=1.5, negative=True, **kwargs):
    ids, mask = _left_pad(PROMPTS)
    if negative:
        neg_ids, neg_mask = _left_pad(NEGATIVES)
        kwargs.update(cfg_negative_prompt_ids=neg_ids, cfg_negative_prompt_attention_mask=neg_mask)
    torch.manual_seed(kwargs.pop("seed", 0))
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=kwargs.pop("max_new_tokens", 10), guidance_scale=scale,
        custom_generate=cfg_generate, return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs,
    )


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).nonzero()
    return int(diff[0]) if diff.numel() else None


# --- off, and never skipping ---------------------------------------------------------------


@pytest.mark.parametrize("sampling", [False, True])
def test_off_is_bit_identical(tiny_lm, sampling):
    kwargs = dict(do_sample=sampling, top_k=20) if sampling else {}
    default = _gen(tiny_lm, **kwargs)
    off = _gen(tiny_lm, guidance_adaptive=None, **kwargs)
    assert type(off) is GenerateDecoderOnlyOutput
    assert torch.equal(default.sequences, off.sequences)
    assert all(torch.equal(a, b) for a, b in zip(default.scores, off.scores, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(default.logits, off.logits, strict=True))


def test_scale_one_with_adaptive_is_plain_generate(tiny_lm):
    ids, mask = _left_pad(PROMPTS)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    plain = tiny_lm.generate(**kwargs)
    ours = tiny_lm.generate(**kwargs, guidance_scale=1.0, custom_generate=cfg_generate, guidance_adaptive=4.0)
    assert torch.equal(plain.sequences, ours.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, ours.scores, strict=True))


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("cfg_form", ["log_probs", "logits"])
def test_never_skipping_matches_batched_cfg(tiny_lm, negative, cfg_form):
    """Every token guided: the per-row caches, chunked catch-up and padding give batched CFG's numbers."""
    full = _gen(tiny_lm, negative=negative, cfg_form=cfg_form, eos_token_id=None)
    ours = _gen(tiny_lm, negative=negative, cfg_form=cfg_form, eos_token_id=None, guidance_adaptive=NEVER_SKIP)
    assert isinstance(ours, AdaptiveGenerateOutput) and isinstance(ours, GenerateDecoderOnlyOutput)
    assert torch.equal(full.sequences, ours.sequences)
    for a, b in zip(full.scores, ours.scores, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
    for a, b in zip(full.logits, ours.logits, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
    stats = ours.adaptive_stats
    assert (stats.decisions == GUIDED).all()
    assert torch.equal(stats.unconditional_positions, stats.full_cfg_positions)
    assert torch.equal(stats.live_cfg_positions, stats.full_cfg_positions)
    contexts = [len(n) for n in NEGATIVES] if negative else [1, 1, 1]
    assert stats.full_cfg_positions.tolist() == [c + 9 for c in contexts]
    assert stats.fraction == 1.0


def test_threshold_zero_decodes_the_conditional_model_alone(tiny_lm):
    ids, mask = _left_pad(PROMPTS)
    plain = tiny_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    ours = _gen(tiny_lm, eos_token_id=None, guidance_adaptive=AdaptiveLMGuidance(threshold=0.0, certify=False))
    assert torch.equal(plain, ours.sequences)
    assert ours.adaptive_stats.unconditional_positions.tolist() == [0, 0, 0]
    assert (ours.adaptive_stats.decisions == HEURISTIC_SKIP).all()
    # log-prob form: skipping rows get log_softmax(c), the guided scores without the unconditional term
    torch.testing.assert_close(ours.scores[0], torch.log_softmax(ours.logits[0], -1))


# --- the claim: greedy differs from full CFG only where a heuristic skip happened -------------


@pytest.mark.parametrize("scale", [0.7, 1.5, 3.0])
def test_greedy_diverges_only_at_heuristic_skips(tiny_lm, scale):
    full = _gen(tiny_lm, scale=scale, max_new_tokens=14)
    prompt = full.sequences.shape[1] - 14
    skipped = 0
    for threshold in (0.5, 2.0, 6.0):
        ours = _gen(tiny_lm, scale=scale, max_new_tokens=14, guidance_adaptive=threshold)
        decisions = ours.adaptive_stats.decisions
        for row in range(len(PROMPTS)):
            step = _first_difference(full.sequences[row, prompt:], ours.sequences[row, prompt:])
            if step is not None:
                assert decisions[row, step] == HEURISTIC_SKIP, (threshold, row, step, decisions[row].tolist())
        skipped += int((decisions == HEURISTIC_SKIP).sum())
    assert skipped > 0  # the rule did skip something


@pytest.mark.parametrize("scale", [1.02, 0.97, 1.1])
def test_head_certificate_alone_reproduces_greedy_cfg(tiny_lm, scale):
    """Exact rule only (threshold inf): greedy output equals full CFG, with skipped unconditional positions."""
    full = _gen(tiny_lm, scale=scale, max_new_tokens=14, eos_token_id=None)
    exact = AdaptiveLMGuidance(threshold=math.inf, certify=True)
    ours = _gen(tiny_lm, scale=scale, max_new_tokens=14, eos_token_id=None, guidance_adaptive=exact)
    assert torch.equal(full.sequences, ours.sequences)
    assert (ours.adaptive_stats.decisions == EXACT_SKIP).sum() >= 3  # the certificate fired


def test_finished_rows_stop_computing_the_unconditional_branch(tiny_lm):
    class StopRow(StoppingCriteria):
        eos_token_id = None  # marks rows finished, so they get padding (as an EOS criterion does)

        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[1] = input_ids.shape[1] >= 8  # row 1 stops after its 2nd generated token
            return done

    ours = _gen(tiny_lm, eos_token_id=None, stopping_criteria=StoppingCriteriaList([StopRow()]),
                guidance_adaptive=NEVER_SKIP)
    stats = ours.adaptive_stats
    assert stats.decisions[1, :2].tolist() == [GUIDED, GUIDED]
    assert (stats.decisions[1, 2:] == FINISHED).all() and (stats.decisions[[0, 2]] == GUIDED).all()
    assert stats.unconditional_positions[1] == len(NEGATIVES[1]) + 1
    assert stats.full_cfg_positions[1] == len(NEGATIVES[1]) + 9
    assert stats.live_cfg_positions.tolist() == [len(NEGATIVES[0]) + 9, len(NEGATIVES[1]) + 1, len(NEGATIVES[2]) + 9]
    assert stats.fraction == 1.0
    assert (ours.sequences[1, 8:] == 0).all()


def test_schedule_window_scale_one_steps_are_exact_skips_and_guidance_end_is_unguided(tiny_lm):
    from guidance.schedules import Window

    ids, mask = _left_pad(PROMPTS)
    out = tiny_lm.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, custom_generate=cfg_generate,
        guidance_schedule=Window(2.0, 2, 5), guidance_adaptive=NEVER_SKIP, return_dict_in_generate=True,
    )
    decisions = out.adaptive_stats.decisions
    assert decisions[:, :2].eq(EXACT_SKIP).all() and decisions[:, 2:5].eq(GUIDED).all()
    assert decisions[:, 5:].eq(-1).all()
    assert out.adaptive_stats.unconditional_positions.tolist() == [5, 5, 5]  # context + 4 fed tokens


def test_sampling_is_reproducible(tiny_lm):
    a = _gen(tiny_lm, do_sample=True, seed=3, guidance_adaptive=4.0)
    b = _gen(tiny_lm, do_sample=True, seed=3, guidance_adaptive=4.0)
    assert torch.equal(a.sequences, b.sequences)


def test_plain_tensor_output_without_return_dict(tiny_lm):
    ids, mask = _left_pad(PROMPTS)
    out = tiny_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, guidance_scale=1.5,
                           custom_generate=cfg_generate, guidance_adaptive=2.0)
    assert isinstance(out, torch.Tensor) and out.shape == (3, ids.shape[1] + 4)


# --- the unconditional rows: per-row caches and chunked catch-up ------------------------------


def test_unconditional_rows_catch_up_in_chunks_like_a_full_forward(tiny_lm):
    contexts = [torch.tensor(n) for n in NEGATIVES]
    rows = UnconditionalRows(tiny_lm, contexts, compat.cache_argument(tiny_lm))
    generated = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15, 16, 17]])
    schedule = [[0, 1, 2], [1], [], [0, 2], [0, 1, 2]]  # rows asked after each token (lags of 1 to 3 tokens)
    for step, asked in enumerate(schedule):
        if asked:
            got = rows.run(asked)
            for i, row in enumerate(asked):
                seq = torch.cat([contexts[row], generated[:step, row]])[None]
                expected = tiny_lm(input_ids=seq).logits[0, -1]
                torch.testing.assert_close(got[i], expected, atol=2e-5, rtol=1e-5)
        rows.append(generated[step], torch.ones(3, dtype=torch.bool))
    assert rows.positions.tolist() == [len(c) + 4 for c in contexts]
    single = rows.run([1])  # one row alone: its own cache, no gathering
    expected = tiny_lm(input_ids=torch.cat([contexts[1], generated[:, 1]])[None]).logits[0, -1]
    torch.testing.assert_close(single[0], expected, atol=2e-5, rtol=1e-5)


# --- the rules as pure functions ----------------------------------------------------------


def test_required_uncond_preference():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, -math.inf, -math.inf], [-math.inf] * 3])
    torch.testing.assert_close(required_uncond_preference(logits, 1.5), torch.tensor([6.0, math.inf, 0.0]))
    torch.testing.assert_close(required_uncond_preference(logits[:1], 0.5), torch.tensor([2.0]))
    assert required_uncond_preference(logits, 1.0).isinf().all()
    assert (required_uncond_preference(logits, -1.0) == 0).all()


def test_required_uncond_preference_is_the_flip_threshold():
    """An unconditional preference just below it never flips the greedy token; just above, it can."""
    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 1.5, 4.0):
        c = torch.randn(1, 6, generator=gen) * 3
        need = float(required_uncond_preference(c, scale))
        a, runner = c.topk(2).indices[0].tolist()
        for factor, flips in ((0.99, False), (1.01, True)):
            u = torch.zeros_like(c)
            u[0, a if scale > 1 else runner] = need * factor  # the most harmful preference of that size
            guided = ops.cfg_logits(c, u, scale)
            assert (int(guided.argmax()) != a) == flips


def _random_head(seed: int, vocab: int = 12, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=gen)
    gamma = torch.rand(dim, generator=gen) * 2 + 0.1
    return weight, gamma


def _head_logits(weight, gamma, x):
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))  # the RMSNorm output direction, norm sqrt(d)
    return (x_hat * gamma) @ weight.T


def _worst_guided_margin(cond_row, a, weight, gamma, scale):
    """max over tokens k != a of g_k - g_a, at the unconditional states most harmful to ``a`` (one per rival)."""
    worst = -math.inf
    for j in range(weight.shape[0]):
        if j != a:
            harmful = (weight[a] - weight[j]) * gamma * (1 if scale > 1 else -1)  # maximises (w-1)(u_a - u_j)
            guided = ops.cfg_logits(cond_row[None], _head_logits(weight, gamma, harmful[None]), scale)[0]
            worst = max(worst, float(guided.scatter(0, torch.tensor([a]), -math.inf).max() - guided[a]))
    return worst


@pytest.mark.parametrize("seed", range(4))
def test_greedy_certificate_is_exact_and_tight(seed):
    """Certified: no unconditional hidden state can flip the greedy token. Not certified: one can (or ties)."""
    weight, gamma = _random_head(seed)
    bound = HeadBound(weight, gamma, math.sqrt(weight.shape[1]))
    gen = torch.Generator().manual_seed(100 + seed)
    cond = _head_logits(weight, gamma, torch.randn(48, weight.shape[1], generator=gen))
    cond[:16] += 100.0 * torch.nn.functional.one_hot(cond[:16].argmax(-1), weight.shape[0])  # confident rows
    for scale in (0.3, 0.9, 1.05, 1.5, 3.0):
        certified = greedy_certificate(cond, scale, bound)
        for row in range(cond.shape[0]):
            worst = _worst_guided_margin(cond[row], int(cond[row].argmax()), weight, gamma, scale)
            if abs(worst) > 1e-3:  # outside the rounding band
                assert bool(certified[row]) == (worst < 0), (scale, row, worst)
        assert certified.any() and not certified.all(), scale


def test_greedy_certificate_edge_cases():
    weight, gamma = _random_head(0)
    bound = HeadBound(weight, gamma, math.sqrt(weight.shape[1]))
    cond = torch.full((2, weight.shape[0]), -math.inf)
    cond[0, 3] = 1.0  # one token left: nothing can beat it
    assert greedy_certificate(cond, 1.5, bound).tolist() == [True, False]
    assert greedy_certificate(cond, 1.0, bound).all()
    assert not greedy_certificate(cond, -0.5, bound).any()


def test_head_bound_supports_llama_heads_and_refuses_others(tiny_lm):
    bound = head_bound(tiny_lm)
    assert bound is not None and bound is head_bound(tiny_lm)  # cached per head
    norm_weight = tiny_lm.model.norm.weight
    expected = math.sqrt(32) * (tiny_lm.lm_head.weight * norm_weight).norm(dim=1)
    torch.testing.assert_close(bound.spread_max, expected.detach())
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    assert head_bound(gpt2) is None  # LayerNorm head: no certificate
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="certify=True"):
        gpt2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, guidance_scale=1.5,
                      custom_generate=cfg_generate, guidance_adaptive=AdaptiveLMGuidance(certify=True), pad_token_id=0)
    out = gpt2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, guidance_scale=1.5,
                        custom_generate=cfg_generate, guidance_adaptive=2.0, pad_token_id=0)
    assert out.shape == (1, 6)  # heuristic rule works on any full-attention model


# --- validation -----------------------------------------------------------------------------


def test_as_adaptive_and_config_validation():
    assert as_adaptive(None) is None
    assert as_adaptive(3) == AdaptiveLMGuidance(threshold=3.0)
    config = AdaptiveLMGuidance(threshold=math.inf, certify=False)
    assert as_adaptive(config) is config
    with pytest.raises(TypeError, match="guidance_adaptive"):
        as_adaptive("fast")
    with pytest.raises(TypeError, match="guidance_adaptive"):
        as_adaptive(True)
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveLMGuidance(threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveLMGuidance(threshold=math.nan)
    with pytest.raises(TypeError, match="certify"):
        AdaptiveLMGuidance(certify="yes")


def test_beam_search_is_rejected(tiny_lm):
    with pytest.raises(ValueError, match="guidance_adaptive"):
        _gen(tiny_lm, num_beams=2, guidance_adaptive=2.0)


@pytest.mark.slow
def test_embedded_model_adaptive_diverges_only_at_heuristic_skips(smollm2):
    model, tokenizer = smollm2
    prompts = [
        "Paris is the capital of France, and Rome is the capital of",
        "The opposite of hot is cold, and the opposite of early is",
        "Every summer the family rented a small cabin by the lake. When autumn came, they were sad to leave the",
    ]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(**inputs, max_new_tokens=8, guidance_scale=1.5, custom_generate=cfg_generate,
                  return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    full = model.generate(**kwargs)
    ours = model.generate(**kwargs, guidance_adaptive=6.0)
    stats = ours.adaptive_stats
    assert (stats.decisions == HEURISTIC_SKIP).any() and (stats.decisions == GUIDED).any()
    assert (stats.unconditional_positions <= stats.full_cfg_positions).all()
    start = inputs["input_ids"].shape[1]
    for row in range(len(prompts)):
        step = _first_difference(full.sequences[row, start:], ours.sequences[row, start:])
        if step is not None:
            assert stats.decisions[row, step] == HEURISTIC_SKIP


def test_cli_flag_reaches_cfg_generate(monkeypatch, capsys):
    import guidance.lm.text
    import guidance.models
    from guidance import cli
    from guidance.lm.text import GenerationResult

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--guidance-adaptive", "-1"])
    assert exit_info.value.code == 2 and "--guidance-adaptive" in capsys.readouterr().err
    calls = []

    def fake_generate_text(model, tokenizer, prompt, **kwargs):
        calls.append(kwargs)
        stats = None if "guidance_adaptive" not in kwargs else AdaptiveStats(
            torch.tensor([3]), torch.tensor([9]), torch.tensor([8]), torch.tensor([[GUIDED, HEURISTIC_SKIP, GUIDED]])
        )
        return GenerationResult(texts=["text"], new_tokens=1, seconds=1.0, adaptive_stats=stats)

    monkeypatch.setattr(guidance.models, "load_default_lm", lambda: (None, None))
    monkeypatch.setattr(guidance.lm.text, "generate_text", fake_generate_text)
    assert cli.main(["--guidance-adaptive", "6", "--width", "80"]) == 0
    assert "guidance_adaptive" not in calls[0] and calls[1]["guidance_adaptive"] == 6.0
    out = capsys.readouterr().out
    assert "adaptive (threshold 6)" in out
    assert "adaptive: 3 of 8 unconditional positions computed, 2 of 3 tokens guided" in out
