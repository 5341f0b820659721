"""Without vLLM installed (the default test environment): the adapter says what is missing."""

from __future__ import annotations

import importlib.util

import pytest

_spec = importlib.util.find_spec("vllm")
if _spec is not None and _spec.origin is not None:  # tests/vllm itself may show up as a namespace package
    pytest.skip("vLLM is installed; these tests are for environments without it", allow_module_level=True)


def test_using_the_adapter_without_vllm_names_the_missing_package():
    import guidance.vllm

    with pytest.raises(ImportError, match="needs vLLM"):
        guidance.vllm.generate  # noqa: B018
    assert "CFGScheduler" in dir(guidance.vllm)
