"""The pure classifier-weighting math: CAIF/FUDGE top-k reweighting and GeDi's Bayes rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guidance.classifier import (
    as_probabilities,
    attribute_log_probs,
    classifier_weighted_logits,
    entropy,
    gedi_class_log_probs,
    gedi_logits,
    top_k_candidates,
    validate_top_k,
)

INF = math.inf


# --- classifier outputs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [[0.1, 0.7], np.array([0.1, 0.7]), torch.tensor([0.1, 0.7], dtype=torch.float64), [[0.1], [0.7]]],
)
def test_as_probabilities_accepts_vectors(output):
    assert torch.equal(as_probabilities(output, 2), torch.tensor([0.1, 0.7]))


def test_as_probabilities_picks_the_label_column():
    probs = [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]
    assert torch.equal(as_probabilities(probs, 3, label=1), torch.tensor([0.1, 0.8, 0.5]))
    assert torch.equal(as_probabilities(probs, 3, label=0), torch.tensor([0.9, 0.2, 0.5]))


@pytest.mark.parametrize(
    ("output", "label", "match"),
    [
        ([0.1, 0.2, 0.3], None, r"shape \(2,\).*got \(3,\)"),
        ([[0.5, 0.5], [0.5, 0.5]], None, "pass `label`"),
        ([[0.5, 0.5], [0.5, 0.5]], 2, r"`label` must be in \[0, 2\)"),
        (torch.zeros(2, 2, 2), 0, "shape"),
        ([0.1, float("nan")], None, "NaN"),
        ([0.1, float("inf")], None, "NaN or infinite"),
        ([0.1, 1.5], None, r"in \[0, 1\]"),
        ([-0.2, 0.5], None, r"in \[0, 1\]"),
        ("not numbers", None, "classifier"),
    ],
)
def test_as_probabilities_rejects_bad_output(output, label, match):
    with pytest.raises(ValueError, match=match):
        as_probabilities(output, 2, label=label)


def test_as_probabilities_clamps_round_off():
    assert torch.equal(as_probabilities([1.00001, -0.00001], 2), torch.tensor([1.0, 0.0]))


def test_attribute_log_probs_is_finite_at_zero():
    out = attribute_log_probs(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(out).all()
    assert out[0] < -80 and out[1] == pytest.approx(math.log(0.5)) and out[2] == 0


# --- CAIF / FUDGE ---------------------------------------------------------------------------


def test_top_k_candidates_and_validation():
    scores = torch.tensor([[0.0, 3.0, -INF, 1.0], [2.0, -INF, -INF, -INF]])
    ids, finite = top_k_candidates(scores, 3)
    assert ids[0].tolist() == [1, 3, 0]
    assert finite.tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match=r"`top_k` must be at most the vocabulary size 4, got 5"):
        top_k_candidates(scores, 5)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"`top_k` must be an integer in \[1, inf\]"):
            validate_top_k(bad)
    for bad in (2.5, True, "3"):
        with pytest.raises(TypeError, match="`top_k` must be an integer"):
            validate_top_k(bad)


def test_classifier_weighted_logits_exact_values_remove():
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    ids = torch.tensor([[0, 2], [3, 1]])
    probs = torch.tensor([[0.5, 0.25], [0.9, 0.1]])
    out = classifier_weighted_logits(scores, ids, probs.log(), alpha=2.0)
    expected = torch.tensor(
        [
            [2.0 + 2 * math.log(0.5), -INF, 0.5 + 2 * math.log(0.25), -INF],
            [-INF, 2 * math.log(0.1), -INF, 2 * math.log(0.9)],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_classifier_weighted_logits_prefix_mode_scores_the_tail_as_the_prefix():
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    ids = torch.tensor([[0, 2]])
    log_p = torch.tensor([[math.log(0.5), math.log(0.25)]])
    prefix = torch.tensor([math.log(0.4)])
    out = classifier_weighted_logits(
        scores, ids, log_p, alpha=-3.0, outside_top_k="prefix", prefix_log_probs=prefix
    )
    expected = torch.tensor(
        [
            [
                2.0 - 3 * math.log(0.5),
                1.0 - 3 * math.log(0.4),
                0.5 - 3 * math.log(0.25),
                -1.0 - 3 * math.log(0.4),
            ]
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="prefix_log_probs"):
        classifier_weighted_logits(scores, ids, log_p, alpha=1.0, outside_top_k="prefix")
    with pytest.raises(ValueError, match="outside_top_k"):
        classifier_weighted_logits(scores, ids, log_p, alpha=1.0, outside_top_k="keep")


def test_negative_alpha_reverses_the_preference():
    scores = torch.zeros(1, 2)
    ids = torch.tensor([[0, 1]])
    log_p = torch.tensor([[math.log(0.9), math.log(0.1)]])
    assert classifier_weighted_logits(scores, ids, log_p, 1.0).argmax().item() == 0
    assert classifier_weighted_logits(scores, ids, log_p, -1.0).argmax().item() == 1


def test_alpha_zero_is_identity_and_bad_alpha_is_rejected():
    scores = torch.randn(2, 5)
    ids = torch.tensor([[0, 1], [2, 3]])
    assert classifier_weighted_logits(scores, ids, torch.zeros(2, 2), 0.0) is scores
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="`alpha` must be a finite real number"):
            classifier_weighted_logits(scores, ids, torch.zeros(2, 2), bad)
    with pytest.raises(TypeError, match="`alpha` must be a real number"):
        classifier_weighted_logits(scores, ids, torch.zeros(2, 2), "1")


def test_masked_candidates_and_extreme_probabilities_never_give_nan():
    scores = torch.tensor([[1.0, -INF, 0.0]], dtype=torch.float16)
    ids = torch.tensor([[0, 1, 2]])
    log_p = attribute_log_probs(torch.tensor([[0.0, 1.0, 1.0]]))
    for alpha in (5.0, -5.0):
        out = classifier_weighted_logits(scores, ids, log_p, alpha)
        assert out.dtype == torch.float32
        assert not torch.isnan(out).any()
        assert out[0, 1] == -INF  # masked stays masked
        assert torch.isfinite(out[0, [0, 2]]).all()
    out = classifier_weighted_logits(scores.to(torch.bfloat16), ids, log_p, 1.0)
    assert out.dtype == torch.float32 and not torch.isnan(out).any()


def test_entropy():
    assert entropy(torch.zeros(1, 8)).item() == pytest.approx(math.log(8))
    assert entropy(torch.tensor([[0.0, -INF, -INF]])).item() == 0
    assert entropy(torch.tensor([[0.0, 0.0, -INF, -INF]])).item() == pytest.approx(math.log(2))


# --- GeDi -----------------------------------------------------------------------------------


def _gedi_reference(next_log_probs, prefix_ll, counts, bias, scale):
    """GeDi's generation code, written out: sum log-likelihoods, divide by length, bias, log_softmax over classes."""
    total = (prefix_ll[..., None].double() + next_log_probs.double()) / (counts.double()[None, :, None] + 1)
    total = scale * total + bias.double()[:, None, None]
    return torch.log_softmax(total, dim=0)


def test_gedi_bayes_rule_matches_the_written_out_formula():
    torch.manual_seed(0)
    classes, batch, vocab = 3, 4, 11
    next_lp = torch.log_softmax(torch.randn(classes, batch, vocab), dim=-1)
    prefix_ll = -torch.rand(classes, batch) * 20
    counts = torch.tensor([0.0, 3.0, 7.0, 12.0])
    bias = torch.tensor([0.3, -0.2, 0.0])
    out = gedi_class_log_probs(next_lp, prefix_ll, counts, class_bias=bias, logit_scale=1.7)
    torch.testing.assert_close(
        out.double(), _gedi_reference(next_lp, prefix_ll, counts, bias, 1.7), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(out.exp().sum(0), torch.ones(batch, vocab), rtol=0, atol=1e-5)


def test_gedi_two_classes_by_hand():
    # p(v | c0) = (0.5, 0.5), p(v | c1) = (0.1, 0.9), prefix log-likelihoods -1 and -3 over 1 token.
    next_lp = torch.tensor([[[0.5, 0.5]], [[0.1, 0.9]]]).log()
    prefix_ll = torch.tensor([[-1.0], [-3.0]])
    out = gedi_class_log_probs(next_lp, prefix_ll, 1).exp()
    for v, (a, b) in enumerate([(0.5, 0.1), (0.5, 0.9)]):
        s0, s1 = (-1 + math.log(a)) / 2, (-3 + math.log(b)) / 2
        assert out[0, 0, v].item() == pytest.approx(math.exp(s0) / (math.exp(s0) + math.exp(s1)), abs=1e-6)
    unnormalised = gedi_class_log_probs(next_lp, prefix_ll, 1, length_normalize=False).exp()
    s0, s1 = -1 + math.log(0.5), -3 + math.log(0.1)
    assert unnormalised[0, 0, 0].item() == pytest.approx(
        math.exp(s0) / (math.exp(s0) + math.exp(s1)), abs=1e-6
    )


def test_gedi_token_no_class_allows_gets_the_prior():
    next_lp = torch.tensor([[[0.0, -INF]], [[0.0, -INF]]])
    out = gedi_class_log_probs(next_lp, torch.zeros(2, 1), 0, class_bias=[math.log(0.75), math.log(0.25)])
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[:, 0, 1].exp(), torch.tensor([0.75, 0.25]))


def test_gedi_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        gedi_class_log_probs(torch.zeros(1, 2, 3), torch.zeros(1, 2), 0)
    with pytest.raises(ValueError, match="prefix_log_likelihood"):
        gedi_class_log_probs(torch.zeros(2, 2, 3), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="class_bias"):
        gedi_class_log_probs(torch.zeros(2, 2, 3), torch.zeros(2, 2), 0, class_bias=[0.0])
    with pytest.raises(ValueError, match="`logit_scale`"):
        gedi_class_log_probs(torch.zeros(2, 2, 3), torch.zeros(2, 2), 0, logit_scale=math.nan)


def test_gedi_logits_weight_and_clamp():
    scores = torch.tensor([[1.0, 2.0, -INF]])
    desired = torch.tensor([[math.log(0.5), -INF, 0.0]])
    assert gedi_logits(scores, desired, 0.0) is scores
    out = gedi_logits(scores, desired, -2.0)
    assert out[0, 0].item() == pytest.approx(1.0 - 2 * math.log(0.5))
    assert torch.isfinite(out[0, 1])  # p(desired) = 0 with a negative weight: a big but finite bonus
    assert out[0, 2] == -INF
    with pytest.raises(ValueError, match="`omega`"):
        gedi_logits(scores, desired, math.inf)
    with pytest.raises(ValueError, match="shape"):
        gedi_logits(scores, desired[:, :2], 1.0)
