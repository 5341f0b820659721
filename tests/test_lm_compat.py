"""The transformers surface the adapter relies on; each failure names the installed version.

When one of these fails after a transformers upgrade, the adapter's assumptions changed:
fix ``guidance/lm/compat.py`` (the only place that knows them) and widen the tested range.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from transformers import GenerationMixin, LogitsProcessorList
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

from guidance.lm import compat

VERSION = transformers.__version__
CHANGED = f"transformers {VERSION} changed what guidance/lm/compat.py relies on: "


def test_installed_version_is_in_the_tested_range():
    low, high = compat.TESTED_TRANSFORMERS
    assert compat._release(low) <= compat._release(VERSION) <= compat._release(high), (
        f"transformers {VERSION} is outside the tested range {low}..{high}"
    )
    compat.check_transformers_version()  # no error, no warning


@pytest.mark.parametrize("version", ["5.999.0", "6.0.0", "4.57.1", "5.25.0.dev0"])
def test_untested_versions_are_refused_naming_the_range(version, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    low, high = compat.TESTED_TRANSFORMERS
    with pytest.raises(ImportError, match=rf"tested with transformers {low} to {high}.*{version}"):
        compat.check_transformers_version(version)


def test_the_environment_variable_downgrades_the_refusal_to_a_warning(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match=compat.ALLOW_UNTESTED_ENV):
        compat.check_transformers_version("6.0.0")


def test_range_ends_are_accepted():
    for version in compat.TESTED_TRANSFORMERS:
        compat.check_transformers_version(version)


def test_pyproject_bounds_match_the_checked_range():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    low, high = compat.TESTED_TRANSFORMERS
    assert re.search(rf'"transformers>={re.escape(low)},<={re.escape(high)}"', text), (
        "pyproject.toml's transformers range must equal guidance.lm.compat.TESTED_TRANSFORMERS"
    )


def test_cache_keyword_is_accepted_by_forward_without_warnings(tiny_lm):
    from transformers import DynamicCache

    name = compat.cache_argument(tiny_lm)
    assert name in inspect.signature(tiny_lm.forward).parameters, CHANGED + "cache keyword"
    cache = DynamicCache(config=tiny_lm.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_lm(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 3, CHANGED + f"forward did not fill the cache passed as `{name}`"


def test_dynamic_cache_reorder_selects_and_drops_rows(tiny_lm):
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny_lm.config)
    ids = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11]])
    tiny_lm(input_ids=ids, use_cache=True, **{compat.cache_argument(tiny_lm): cache})
    keys = [layer.keys.clone() for layer in cache.layers]
    cache.reorder_cache(torch.tensor([2, 0]))
    for before, layer in zip(keys, cache.layers, strict=True):
        assert torch.equal(layer.keys, before[[2, 0]]), CHANGED + "DynamicCache.reorder_cache"


def test_transformers_cfg_processor_settings_are_readable(tiny_lm):
    negative = torch.tensor([[9, 27, 4]])
    mask = torch.ones_like(negative)
    processor = UnbatchedClassifierFreeGuidanceLogitsProcessor(
        1.7, tiny_lm, unconditional_ids=negative, unconditional_attention_mask=mask
    )
    scale, ids, got_mask = compat.transformers_cfg_settings(processor)
    assert scale == 1.7 and ids is negative and got_mask is mask, CHANGED + "CFG processor attributes"
    default = UnbatchedClassifierFreeGuidanceLogitsProcessor(2.0, tiny_lm)
    assert compat.transformers_cfg_settings(default) == (2.0, None, None), CHANGED + "CFG processor defaults"
    assert compat.transformers_cfg_settings(object()) is None


def test_generate_passes_custom_generate_what_we_expect(tiny_lm):
    """A callable custom_generate gets the prepared processors, our own keyword arguments, and no streamer."""
    seen = {}

    def spy(model, input_ids, logits_processor, stopping_criteria, generation_config, my_option=None, **kwargs):
        seen.update(kwargs, my_option=my_option, processors=logits_processor, config=generation_config)
        return input_ids

    class Streamer:
        def put(self, value):
            pass

        def end(self):
            pass

    negative = torch.tensor([[9, 27, 4]])
    tiny_lm.generate(
        input_ids=torch.tensor([[5, 17, 33]]), attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2,
        guidance_scale=1.5, negative_prompt_ids=negative, streamer=Streamer(), my_option=7, custom_generate=spy,
    )
    assert seen["my_option"] == 7, CHANGED + "custom keyword arguments no longer reach custom_generate"
    assert "streamer" not in seen, (
        CHANGED + "generate now passes `streamer` to a callable custom_generate: use it instead of `cfg_streamer`"
    )
    settings = [compat.transformers_cfg_settings(p) for p in seen["processors"]]
    assert any(s is not None and s[1] is negative for s in settings), (
        CHANGED + "guidance_scale / negative_prompt_ids no longer arrive as the CFG processor"
    )
    assert isinstance(seen["processors"], LogitsProcessorList)


@pytest.mark.parametrize("mode, name", [("greedy", "_sample"), ("sample", "_sample"), ("beam", "_beam_search")])
def test_private_decoding_methods_keep_their_signature(mode, name):
    method = getattr(GenerationMixin, name, None)
    assert method is not None, CHANGED + f"GenerationMixin.{name} is gone"
    parameters = inspect.signature(method).parameters
    for argument in ("input_ids", "logits_processor", "stopping_criteria", "generation_config", "model_kwargs"):
        assert argument in parameters, CHANGED + f"GenerationMixin.{name} lost `{argument}`"
    if mode != "beam":
        assert "streamer" in parameters, CHANGED + f"GenerationMixin.{name} lost `streamer`"
