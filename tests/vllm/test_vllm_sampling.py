"""The CFG pair's sampling steps (guidance.vllm.sampling) against vLLM's own implementations."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM (tests/vllm itself can look like a namespace package "vllm")

import torch  # noqa: E402
from vllm.model_executor.layers.utils import apply_penalties as vllm_apply_penalties  # noqa: E402
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch  # noqa: E402

from guidance.vllm.sampling import (  # noqa: E402
    RowSettings,
    apply_penalties,
    decide_tokens,
    draw,
    min_p_filter,
    position_uniform,
    top_k_top_p_filter,
)
from samplers.kernels import typical_filter  # noqa: E402

VOCAB = 64


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def _pad(lists: list[list[int]]) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([x + [VOCAB] * (width - len(x)) for x in lists])


def test_penalties_match_vllm():
    logits = _logits(3)
    prompts = [[1, 2, 3], [5], [7, 7, 8]]
    outputs = [[2, 9, 9, 9], [], [8, 10]]
    settings = [
        RowSettings(repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.5),
        RowSettings(repetition_penalty=0.8),
        RowSettings(frequency_penalty=-0.4, presence_penalty=1.0),
    ]
    ours = apply_penalties(logits, prompts, outputs, settings)
    theirs = vllm_apply_penalties(
        logits.clone(),
        _pad(prompts),
        _pad(outputs),
        torch.tensor([s.presence_penalty for s in settings]),
        torch.tensor([s.frequency_penalty for s in settings]),
        torch.tensor([s.repetition_penalty for s in settings]),
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.equal(ours, logits)


def test_no_penalty_returns_the_scores_themselves():
    logits = _logits(2)
    assert apply_penalties(logits, [[1], [2]], [[3], []], [RowSettings(), RowSettings()]) is logits


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (10, 0.5), (1, 0.9), (VOCAB, 0.3)])
def test_top_k_top_p_match_vllm(top_k, top_p):
    logits = _logits(4, seed=top_k)
    logits[0, :10] = logits[0, 0]  # ties at the top-k boundary
    k = torch.full((4,), top_k, dtype=torch.long)
    p = torch.full((4,), top_p)
    ours = top_k_top_p_filter(logits, k, p)
    theirs = apply_top_k_top_p_pytorch(logits.clone(), None if top_k == 0 else k, None if top_p == 1.0 else p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])


def test_min_p_matches_vllm_builtin_rule():
    logits = _logits(3)
    min_p = torch.tensor([0.0, 0.1, 0.5])
    ours = min_p_filter(logits, min_p)
    probs = logits.softmax(-1)
    expected = probs >= probs.amax(-1, keepdim=True) * min_p[:, None]
    assert torch.equal(torch.isfinite(ours), expected)


def test_position_uniform_depends_on_seed_and_position_only():
    values = [position_uniform(seed, pos) for seed in range(20) for pos in range(50)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == len(values)
    assert position_uniform(3, 7) == position_uniform(3, 7)
    mean = sum(values) / len(values)
    assert abs(mean - 0.5) < 0.03


def test_draw_is_inverse_cdf_and_never_picks_masked_tokens():
    logits = torch.log(torch.tensor([[0.2, 0.0, 0.5, 0.3]]))
    picks = [int(draw(logits, torch.tensor([u]))) for u in (0.0, 0.1, 0.21, 0.69, 0.71, 0.99)]
    assert picks == [0, 0, 2, 2, 3, 3]
    samples = [int(draw(logits, torch.tensor([position_uniform(1, i)]))) for i in range(4000)]
    freq = torch.bincount(torch.tensor(samples), minlength=4).float() / len(samples)
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.0, 0.5, 0.3]), atol=0.03, rtol=0)


def test_decide_tokens_greedy_is_argmax_after_penalties():
    logits = torch.tensor([[5.0, 4.0, 0.0], [1.0, 2.0, 3.0]])
    settings = [RowSettings(temperature=0.0, repetition_penalty=2.0), RowSettings(temperature=0.0)]
    tokens = decide_tokens(logits, settings, [[0], [0]], [[], [2]])
    assert tokens.tolist() == [1, 2]  # 5/2 < 4 once token 0 (in the prompt) is penalised


def test_decide_tokens_sampled_follows_filters_in_vllm_order():
    logits = _logits(1, seed=3).repeat(200, 1)
    settings = [RowSettings(temperature=0.7, top_k=8, min_p=0.05, typical_p=0.8, seed=s) for s in range(200)]
    tokens = decide_tokens(logits, settings, [[]] * 200, [[]] * 200)
    z = logits[:1] / 0.7
    z = min_p_filter(z, torch.tensor([0.05]))
    z = typical_filter(z, 0.8)
    z = top_k_top_p_filter(z, torch.tensor([8]), torch.tensor([1.0]))
    allowed = set(torch.isfinite(z[0]).nonzero().flatten().tolist())
    assert set(tokens.tolist()) <= allowed
    assert len(set(tokens.tolist())) > 1


def test_decide_tokens_is_reproducible_per_seed_and_position():
    logits = _logits(2)
    a = decide_tokens(logits, [RowSettings(seed=5), RowSettings(seed=6)], [[], []], [[1, 2], [3]])
    b = decide_tokens(logits.flip(0), [RowSettings(seed=6), RowSettings(seed=5)], [[], []], [[3], [1, 2]])
    assert a.tolist() == b.flip(0).tolist()


def test_masked_guided_tokens_are_never_drawn():
    logits = _logits(50)
    logits[:, : VOCAB - 2] = -math.inf
    settings = [RowSettings(seed=i) for i in range(50)]
    tokens = decide_tokens(logits, settings, [[]] * 50, [[]] * 50)
    assert set(tokens.tolist()) <= {VOCAB - 2, VOCAB - 1}
