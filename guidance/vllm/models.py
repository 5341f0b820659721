"""A vLLM-loadable folder of the embedded SmolLM2 model.

vLLM's Llama loader reads the input embedding from ``model.embed_tokens.weight`` and, with
tied embeddings, ignores ``lm_head.weight``. A cache written with only ``lm_head.weight``
would load with a zero embedding (vLLM then emits token 0 forever), so
:func:`default_model_folder` returns the project's cache folder when it has the embedding,
and otherwise a sibling folder holding the same weights under both names (written once).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["default_model_folder", "has_input_embedding"]

_EMBEDDING = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"


def has_input_embedding(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder/model.safetensors`` stores ``model.embed_tokens.weight``."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as handle:
        return _EMBEDDING in handle.keys()


def default_model_folder() -> Path:
    """Folder of the embedded SmolLM2-135M-Instruct that ``vllm.LLM(model=...)`` loads correctly.

    Converts the embedded GGUF on first use (see :func:`guidance.models.default_model_path`).
    Nothing is downloaded.

    Example:
        >>> from guidance.vllm.models import default_model_folder, has_input_embedding
        >>> has_input_embedding(default_model_folder())  # doctest: +SKIP
        True
    """
    from guidance.models import default_model_path

    source = default_model_path()
    if has_input_embedding(source):
        return source
    target = source.with_name(source.name + "-vllm")
    if (target / "model.safetensors").exists():
        return target
    _write_with_embedding(source, target)
    return target


def _write_with_embedding(source: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source / "model.safetensors"))
    if _HEAD not in tensors:
        raise RuntimeError(f"{source} has neither {_EMBEDDING} nor {_HEAD}; delete it to reconvert.")
    tensors[_EMBEDDING] = tensors[_HEAD].clone()
    staging = Path(tempfile.mkdtemp(prefix=".vllm-", dir=target.parent))
    try:
        for item in source.iterdir():
            if item.name != "model.safetensors" and item.is_file():
                shutil.copy2(item, staging / item.name)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.replace(staging, target)  # atomic: a concurrent writer never exposes half a folder
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
