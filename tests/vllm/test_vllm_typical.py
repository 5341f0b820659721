"""TypicalLogitsProcessor: the kept set of samplers.LocallyTypicalWarper, row bookkeeping, both runners' interfaces."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM (tests/vllm itself can look like a namespace package "vllm")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor  # noqa: E402

from guidance.vllm.typical import TypicalLogitsProcessor, typical_settings  # noqa: E402
from samplers import LocallyTypicalWarper  # noqa: E402


def _params(**extra) -> SamplingParams:
    return SamplingParams(temperature=1.0, extra_args=extra or None)


def _update(size, added=(), removed=(), moved=()):
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def _logits(rows=4, vocab=200, seed=0):
    return 2 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_settings_are_validated_with_the_argument_named():
    assert typical_settings(_params(typical_p=0.5)) == (0.5, 1)
    assert typical_settings(_params(typical_p=1.0)) is None
    assert typical_settings(_params()) is None
    assert typical_settings(_params(typical_p=0.5, typical_min_tokens_to_keep=3)) == (0.5, 3)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="typical_p"):
            typical_settings(_params(typical_p=bad))
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="typical_p"):
            typical_settings(_params(typical_p=bad))
    with pytest.raises(ValueError, match="typical_min_tokens_to_keep"):
        typical_settings(_params(typical_p=0.5, typical_min_tokens_to_keep=0))
    with pytest.raises(ValueError, match="needs `typical_p`"):
        typical_settings(_params(typical_min_tokens_to_keep=2))
    with pytest.raises(ValueError, match="typical_p"):
        TypicalLogitsProcessor.validate_params(_params(typical_p=2))
    with pytest.raises(ValueError, match="typical_p"):  # vLLM answers ValueError with HTTP 400
        TypicalLogitsProcessor.validate_params(_params(typical_p="0.5"))


def test_one_class_implements_both_runner_interfaces():
    assert issubclass(TypicalLogitsProcessor, V1LogitsProcessor)
    assert issubclass(TypicalLogitsProcessor, V2LogitsProcessor)
    assert TypicalLogitsProcessor(None, torch.device("cpu"), False).is_argmax_invariant()


def test_v1_rows_get_the_warper_kept_set_and_others_are_untouched():
    processor = TypicalLogitsProcessor(None, torch.device("cpu"), False)
    processor.update_state(
        _update(4, added=[(0, _params(typical_p=0.3), [1], []), (1, _params(), [1], []),
                          (3, _params(typical_p=0.9, typical_min_tokens_to_keep=5), [1], [])])
    )
    logits = _logits()
    out = processor.apply(logits.clone())
    torch.testing.assert_close(out[0], LocallyTypicalWarper(0.3)(None, logits[:1])[0])
    torch.testing.assert_close(out[3], LocallyTypicalWarper(0.9, min_tokens_to_keep=5)(None, logits[3:])[0])
    assert torch.equal(out[1], logits[1]) and torch.equal(out[2], logits[2])
    assert int(torch.isfinite(out[0]).sum()) < 200


def test_v1_moves_swaps_and_removals_follow_the_rows():
    processor = TypicalLogitsProcessor(None, torch.device("cpu"), False)
    processor.update_state(_update(3, added=[(0, _params(typical_p=0.3), [1], []), (2, _params(typical_p=0.6), [1], [])]))
    processor.update_state(_update(3, moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert processor.table.rows == {1: (0.3, 1), 2: (0.6, 1)}
    processor.update_state(_update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert processor.table.rows == {1: (0.6, 1)}
    processor.update_state(_update(2, added=[(1, _params(), [1], [])]))
    assert processor.table.rows == {}
    processor.update_state(None)
    logits = _logits(2)
    assert torch.equal(processor.apply(logits.clone()), logits)


def test_v2_masks_the_set_kept_after_temperature_and_skips_greedy_rows():
    processor = TypicalLogitsProcessor(None, SimpleNamespace())
    assert processor.add_request(5, SamplingParams(temperature=0.5, extra_args={"typical_p": 0.4}))
    assert not processor.add_request(6, SamplingParams(temperature=0.0, extra_args={"typical_p": 0.4}))
    assert not processor.add_request(7, SamplingParams(temperature=1.0))
    logits = _logits(3)
    ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor([6, 5, 7]))
    out = processor.apply(logits.clone(), ctx)
    kept = torch.isfinite(LocallyTypicalWarper(0.4)(None, logits[1:2] / 0.5))[0]
    assert torch.equal(torch.isfinite(out[1]), kept)
    torch.testing.assert_close(out[1][kept], logits[1][kept])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert out[1][~kept].eq(-math.inf).all()
