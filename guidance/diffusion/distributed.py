"""Process groups for CFG-parallel sampling: find or create one, exchange bytes, fail with a clear message.

:class:`~guidance.diffusion.parallel.DistributedEvaluator` needs one process group whose ranks
each evaluate some of a step's branches. :func:`connect` finds it, in this order:

1. the group the caller passes (``DistributedEvaluator(group=...)``);
2. xfuser's classifier-free-guidance group (``get_cfg_group()``), when xfuser is installed, a
   CUDA device is present and xfuser's model parallelism is initialised (xfuser is never
   imported otherwise);
3. under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set) with
   no process group yet, the default group is initialised here: NCCL when the denoiser is on a
   CUDA device, gloo on the CPU, with ``timeout`` (which also bounds how long the ranks wait for
   each other to start). It stays up until the process exits, for later ``attach`` calls with
   the same timeout, and is destroyed at exit;
4. when a default group exists (the script's own, or one initialised here with another
   timeout): a new group over all its ranks with ``timeout`` (gloo for a denoiser on the CPU,
   else the default backend), destroyed on ``detach``.

:class:`Exchange` all-gathers raw bytes over the group. Every collective has the group's
timeout, and a failure (a peer that exited, or stalled past the timeout) becomes a
:class:`ParallelError` that names the rank and the call instead of a backend traceback.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

__all__ = ["ParallelError", "Group", "connect", "is_main_process", "TORCHRUN_VARIABLES"]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_STATE: dict[str, Any] = {"owns_default": False, "timeout": None}


class ParallelError(RuntimeError):
    """A collective of a CFG-parallel run failed, or the ranks disagree about what they compute."""


def is_main_process() -> bool:
    """Whether this process should save and print results: global rank 0, or not distributed at all.

    Every rank of a CFG-parallel run returns the same images; guard file writes with this.

    Example:
        >>> from guidance.diffusion.parallel import is_main_process
        >>> is_main_process()  # a plain (not distributed) process
        True
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass
class Group:
    """The process group a CFG-parallel run exchanges predictions in.

    Args:
        group: a ``torch.distributed`` process group.
        rank (int): this process's rank in ``group`` (``0 <= rank < world_size``).
        world_size (int): the number of ranks in ``group``.
        device (torch.device): where the exchanged tensors live (CUDA for NCCL, else the CPU).
        source (str): where the group came from ("given", "xfuser", "subgroup", "torchrun").
        owned (bool): whether :meth:`close` destroys it (groups created for this run).
        closed (bool): whether :meth:`close` ran (the group is not used any more).
    """

    group: Any
    rank: int
    world_size: int
    device: torch.device
    source: str
    owned: bool = False
    closed: bool = False

    def close(self) -> None:
        """Stop using the group; destroy it if it was created for this run. ``rank`` and ``world_size`` stay."""
        if self.owned and not self.closed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group(self.group)
        self.closed = True


def connect(group: Any, timeout: float, model_device: torch.device) -> Group:
    """The process group for a CFG-parallel run; see the module docstring for the order of choices."""
    dist = torch.distributed
    if not dist.is_available():
        raise ValueError("parallel='cfg' needs torch.distributed, which this PyTorch build does not include.")
    if group is not None:
        return _described(group, "given", model_device)
    xfuser_group = _xfuser_cfg_group()
    if xfuser_group is not None:
        return _described(xfuser_group, "xfuser", model_device)
    delta = timedelta(seconds=timeout)
    if dist.is_initialized():
        if _STATE["owns_default"] and _STATE["timeout"] == timeout:
            return _described(dist.group.WORLD, "torchrun", model_device)
        backend = None if model_device.type == "cuda" else "gloo"  # NCCL cannot exchange CPU tensors
        subgroup = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=delta, backend=backend)
        return _described(subgroup, "subgroup", model_device, owned=True)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            "parallel='cfg' runs one process per branch: launch the script with "
            "`torchrun --nproc-per-node 2 script.py` (or initialise torch.distributed yourself). "
            f"This process has no process group and no torchrun environment ({', '.join(missing)} unset)."
        )
    backend = "nccl" if model_device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and model_device.index is not None:
        torch.cuda.set_device(model_device)
    dist.init_process_group(backend=backend, timeout=delta)
    _STATE.update(owns_default=True, timeout=timeout)
    atexit.register(_destroy_default)
    return _described(dist.group.WORLD, "torchrun", model_device)


def _destroy_default() -> None:
    dist = torch.distributed
    if _STATE["owns_default"] and dist.is_initialized():
        _STATE["owns_default"] = False
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - at exit, after a failed run: nothing left to clean up
            pass


def _described(group: Any, source: str, model_device: torch.device, owned: bool = False) -> Group:
    dist = torch.distributed
    backend = str(dist.get_backend(group)).lower()
    device = model_device if "nccl" in backend and model_device.type == "cuda" else torch.device("cpu")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(
            f"This process (global rank {dist.get_rank()}) is not a member of the {source} group."
        )
    return Group(group, rank, world_size, device, source, owned)


def _xfuser_cfg_group() -> Any:
    """xfuser's CFG device group, where xfuser is installed and initialised on a CUDA machine; else ``None``."""
    if not torch.cuda.is_available() or importlib.util.find_spec("xfuser") is None:
        return None
    try:
        from xfuser.core.distributed import get_cfg_group, model_parallel_is_initialized
    except ImportError:
        return None
    if not model_parallel_is_initialized():
        return None
    coordinator = get_cfg_group()
    if getattr(coordinator, "world_size", 1) < 2:
        return None
    return coordinator.device_group


class Exchange:
    """All-gathers over a :class:`Group`, turning backend failures into :class:`ParallelError`."""

    def __init__(self, group: Group, timeout: float):
        self.group, self.timeout = group, timeout

    def all_gather(self, tensor: Tensor, what: str) -> list[Tensor]:
        """``tensor`` from every rank, in rank order (the same shape and dtype on every rank)."""
        group = self.group
        local = tensor.to(group.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(group.world_size)]
        try:
            torch.distributed.all_gather(parts, local, group=group.group)
        except RuntimeError as exc:  # DistBackendError and timeouts derive from RuntimeError
            raise ParallelError(
                f"CFG-parallel: exchanging {what} failed on rank {group.rank} of {group.world_size}: another "
                f"rank has probably exited or stalled for more than the timeout ({self.timeout:g} s). Check the "
                f"other ranks' output; every rank must run the same script with the same inputs. ({exc})"
            ) from exc
        return parts
