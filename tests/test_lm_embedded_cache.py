"""The converted embedded model is a plain transformers folder, in ``save_pretrained``'s layout."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from guidance.models.smollm2 import _CACHE_VERSION, default_model_path


def test_cache_folder_is_versioned_past_the_aliased_layout():
    # v1 stored only `lm_head.weight` (embed_tokens aliased in metadata); it must be rebuilt.
    assert _CACHE_VERSION != "v1"
    assert default_model_path(convert=False).name.endswith(f"-{_CACHE_VERSION}")


@pytest.mark.slow
def test_cache_has_tied_embeddings_and_reloads_with_plain_from_pretrained():
    from transformers import AutoModelForCausalLM

    folder = default_model_path()
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
        embed = weights.get_tensor("model.embed_tokens.weight")
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys  # tied: save_pretrained stores the embedding only
    assert embed.shape == (49152, 576) and bool(embed.abs().sum() > 0)

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert torch.equal(model.get_output_embeddings().weight, embed)
