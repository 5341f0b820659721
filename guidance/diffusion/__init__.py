"""diffusers adapter: guidance for classic pipelines without forking them.

* :func:`attach` / :func:`detach`: wrap a pipeline's denoiser with a guider (any operator of
  :mod:`guidance.guiders` with its schedule), adaptive guidance or a cut-off
  (:mod:`guidance.adaptive`), or CFG++ (``mode="cfgpp"``); per-run network-evaluation counts.
* :class:`ScheduleCallback`, :class:`CFGCutoffCallback`: ``callback_on_step_end`` callbacks that
  drive the pipeline's own ``_guidance_scale`` (batch-correct, unlike diffusers' cut-off callbacks).
* :mod:`guidance.diffusion.testing`: tiny random-weight pipelines for tests and benchmarks.
"""

from guidance.diffusion.callbacks import CFGCutoffCallback, ScheduleCallback, conditioning_inputs
from guidance.diffusion.classic import CFGPP_SCHEDULERS, GuidanceHandle, GuidanceStats, attach, detach

__all__ = [
    "attach",
    "detach",
    "GuidanceHandle",
    "GuidanceStats",
    "CFGPP_SCHEDULERS",
    "ScheduleCallback",
    "CFGCutoffCallback",
    "conditioning_inputs",
]
