"""diffusers adapter: guidance for classic pipelines without forking them.

* :func:`attach` / :func:`detach` (:mod:`~guidance.diffusion.attach`): wrap a pipeline's denoiser
  with a guider (any operator of :mod:`guidance.guiders` with its schedule), adaptive guidance or
  a cut-off (:mod:`guidance.adaptive`), or CFG++ (``mode="cfgpp"``); per-run network-evaluation
  counts (:class:`GuidanceStats`).
* Extra branches (Perp-Neg's negative prompt, perturbed or weaker-model evaluations):
  :mod:`~guidance.diffusion.branches` (requests and evaluators), :mod:`~guidance.perturbations.hooks`
  (perturbation hooks), :func:`prompt_inputs` (a prompt's denoiser inputs).
* :class:`ScheduleCallback`, :class:`CFGCutoffCallback`: ``callback_on_step_end`` callbacks that
  drive the pipeline's own ``_guidance_scale`` (batch-correct, unlike diffusers' cut-off callbacks).
* :mod:`~guidance.diffusion.schedulers`: what a scheduler says about noise levels.
* :mod:`guidance.diffusion.modular`: guider components for modular pipelines;
  :mod:`guidance.diffusion.testing`: tiny random-weight pipelines for tests and benchmarks.
"""

from guidance.diffusion.attach import GuidanceHandle, attach, detach
from guidance.diffusion.branches import BatchedEvaluator, BranchEvaluator, BranchRequest, SeparateEvaluator
from guidance.diffusion.callbacks import CFGCutoffCallback, ScheduleCallback, conditioning_inputs
from guidance.diffusion.cfgpp import CFGPP_SCHEDULERS
from guidance.diffusion.prompts import prompt_inputs
from guidance.diffusion.stats import GuidanceStats
from guidance.perturbations.hooks import AttentionProcessors, ForwardHooks

__all__ = [
    "attach",
    "detach",
    "GuidanceHandle",
    "GuidanceStats",
    "CFGPP_SCHEDULERS",
    "BranchRequest",
    "BranchEvaluator",
    "BatchedEvaluator",
    "SeparateEvaluator",
    "AttentionProcessors",
    "ForwardHooks",
    "prompt_inputs",
    "ScheduleCallback",
    "CFGCutoffCallback",
    "conditioning_inputs",
]
