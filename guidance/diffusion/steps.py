"""Which step of which run a denoiser call belongs to.

The wrapper sees denoiser calls, not the pipeline's loop. :class:`StepTracker` numbers them: the
scheduler's public ``step_index`` where it keeps one, else the number of calls since the run
began offset by the position of the first timestep (img2img starts part-way). A new run begins
when the pipeline calls ``scheduler.set_timesteps`` (a new ``timesteps`` tensor), when the
scheduler is swapped, or when the step goes backwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["StepTracker"]


class StepTracker:
    """Step numbers of successive denoiser calls, and the start of each run."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Make the next call start a new run."""
        self._run_key: tuple[Any, Any] | None = None
        self._calls = 0
        self._offset = 0
        self._last_step: int | None = None

    def _same_run(self, scheduler: Any, timesteps: Any) -> bool:
        key = self._run_key
        return key is not None and key[0] is scheduler and key[1] is timesteps

    def _begin(self, scheduler: Any, timesteps: Any) -> None:
        self._run_key = (scheduler, timesteps)
        self._calls = 0
        self._last_step = None

    def step(self, scheduler: Any, timestep: Any) -> tuple[int, bool]:
        """``(step, new_run)`` for a call at ``timestep``: its step index, and whether it starts a run."""
        timesteps = getattr(scheduler, "timesteps", None)
        new_run = not self._same_run(scheduler, timesteps)
        if new_run:
            self._begin(scheduler, timesteps)
        index = getattr(scheduler, "step_index", None)
        if isinstance(index, int):
            step = index
        else:
            if self._calls == 0:
                self._offset = _first_index(scheduler, timesteps, timestep)
            step = self._offset + self._calls
        if self._last_step is not None and step < self._last_step:
            self._begin(scheduler, timesteps)
            new_run = True
        self._calls += 1
        self._last_step = step
        return step, new_run


def _first_index(scheduler: Any, timesteps: Any, timestep: Any) -> int:
    begin = getattr(scheduler, "begin_index", None)
    if isinstance(begin, int):
        return begin
    if not isinstance(timesteps, Tensor) or timestep is None:
        return 0
    t = timestep.flatten()[0] if isinstance(timestep, Tensor) else torch.tensor(timestep)
    matches = (timesteps == t.to(timesteps.device, timesteps.dtype)).nonzero()
    return int(matches[0, 0]) if len(matches) else 0
