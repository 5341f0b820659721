"""When a row is long enough to split across programs: the dispatch rule of the split-row kernels."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: str) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


def split_chunks(batch: int, vocab: int, device: torch.device | str | None = None) -> int:
    """How many programs share one row in the Triton typical kernels (1: one program per row).

    Rows are split when the batch alone cannot fill the GPU (fewer rows than streaming
    multiprocessors) and a row is long enough to split (at least two chunks of
    4,096 tokens): about two programs per multiprocessor in all. A first choice, not tuned on
    a GPU yet (``benchmarks/typical_sampling.py --chunks`` compares others).

    Args:
        batch (`int`): rows, >= 1.
        vocab (`int`): tokens per row, >= 1.
        device (`torch.device`, *optional*): a CUDA device (its multiprocessor count); without
            one (or on CPU) 132 multiprocessors are assumed.

    Example:
        >>> from samplers.kernels import split_chunks
        >>> split_chunks(1, 256_000), split_chunks(1, 2_000), split_chunks(512, 256_000)
        (62, 1, 1)
    """
    sms = _multiprocessors(str(device)) if device is not None and torch.device(device).type == "cuda" else 132
    if batch >= sms:
        return 1
    from_gpu = -(-2 * sms // batch)
    min_chunk = 4096
    return max(1, min(from_gpu, vocab // min_chunk))
