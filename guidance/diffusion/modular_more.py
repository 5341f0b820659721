"""More guider components for modular pipelines: the prediction-only guiders of :mod:`guidance.guiders`.

Same plumbing and rules as :mod:`guidance.diffusion.modular` (exported from there): each class is a
``diffusers.guiders.BaseGuidance`` over one of our guiders, saved and loaded with its config, with
optional scale schedules (``schedule=``). Modular guider components see only the denoiser's raw
predictions, so every operator acts on eps/v/flow velocity here, also those whose classic-pipeline
default is x0 (``CFGNorm``, ``SimilarityAdaptive``: ComfyUI's form needs the classic wrapper).
ICG and TSG need an extra, perturbed evaluation and have no component here.

Example:
    >>> import torch
    >>> from guidance.diffusion.modular_more import TCFGGuidance
    >>> g = TCFGGuidance(guidance_scale=3.0)
    >>> g.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    >>> g.num_conditions
    2
    >>> g.forward(torch.ones(1, 4), torch.ones(1, 4)).pred  # u parallel to c: plain CFG
    tensor([[1., 1., 1., 1.]])
"""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from guidance.diffusion.modular import GuiderComponent
from guidance.guiders import (
    APGMix,
    CFGNorm,
    FrequencyDecoupled,
    FreSca,
    Guider,
    MagnitudeAware,
    RenormCFG,
    SimilarityAdaptive,
    TangentialCFG,
)
from guidance.schedules import Schedule

__all__ = [
    "TCFGGuidance",
    "FDGGuidance",
    "MAMBOGuidance",
    "APGMixGuidance",
    "CFGNormGuidance",
    "RenormCFGGuidance",
    "MahiroGuidance",
    "FreScaGuidance",
]


class TCFGGuidance(GuiderComponent):
    """TCFG (:class:`~guidance.guiders.TangentialCFG`) as a diffusers guider; matches diffusers' ``TangentialClassifierFreeGuidance``."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.guidance_rescale = guidance_rescale
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return TangentialCFG(scale, rescale=self.guidance_rescale)


class FDGGuidance(GuiderComponent):
    """FDG (:class:`~guidance.guiders.FrequencyDecoupled`) as a diffusers guider, without kornia.

    ``guidance_scales`` from the finest band to the coarsest, as diffusers' ``FrequencyDecoupledGuidance``
    (whose numbers it reproduces); ``schedule`` is not supported (pass schedules to the guider itself).
    """

    @register_to_config
    def __init__(
        self,
        guidance_scales: list[float] | tuple[float, ...] = (10.0, 5.0),
        parallel_weights: float | list[float] | None = None,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        if schedule is not None:
            raise ValueError("`schedule` is not supported by FDGGuidance: give FrequencyDecoupled per-band schedules.")
        self.guidance_scales = list(guidance_scales)
        self.parallel_weights = list(parallel_weights) if isinstance(parallel_weights, (list, tuple)) else parallel_weights
        self.guidance_rescale = guidance_rescale
        if not self.guidance_scales:
            raise ValueError("`guidance_scales` must hold at least one scale (one per pyramid band).")
        self._setup(self.guidance_scales[0], None, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return FrequencyDecoupled(self.guidance_scales, self.parallel_weights, rescale=self.guidance_rescale)


class MAMBOGuidance(GuiderComponent):
    """MAMBO-G (:class:`~guidance.guiders.MagnitudeAware`) as a diffusers guider; matches ``MagnitudeAwareGuidance``."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 10.0,
        alpha: float = 8.0,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.alpha, self.guidance_rescale = alpha, guidance_rescale
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return MagnitudeAware(scale, alpha=self.alpha, rescale=self.guidance_rescale)


class APGMixGuidance(GuiderComponent):
    """CFG then APG (:class:`~guidance.guiders.APGMix`); matches diffusers' ``AdaptiveProjectedMixGuidance``."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 3.5,
        apg_scale: float = 10.0,
        momentum: float | None = -0.5,
        norm_threshold: float | None = 10.0,
        eta: float = 0.0,
        apg_start_step: int = 5,
        convention: str = "diffusers",
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.apg_scale, self.momentum, self.norm_threshold = apg_scale, momentum, norm_threshold
        self.eta, self.apg_start_step, self.convention = eta, apg_start_step, convention
        self.guidance_rescale = guidance_rescale
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return APGMix(
            scale,
            apg_scale=self.apg_scale,
            momentum=self.momentum,
            norm_threshold=self.norm_threshold,
            eta=self.eta,
            apg_start_step=self.apg_start_step,
            convention=self.convention,
            rescale=self.guidance_rescale,
        )


class CFGNormGuidance(GuiderComponent):
    """ComfyUI's ``CFGNorm`` (:class:`~guidance.guiders.CFGNorm`) on the raw prediction."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.strength = strength
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return CFGNorm(scale, self.strength, space="prediction")


class RenormCFGGuidance(GuiderComponent):
    """CFG-Renorm / CFG-Trunc (:class:`~guidance.guiders.RenormCFG`, Lumina-Image 2.0) on the raw prediction."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 4.0,
        renorm: float = 1.0,
        trunc: float = 1.0,
        convention: str = "paper",
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.renorm, self.trunc, self.convention = renorm, trunc, convention
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return RenormCFG(scale, self.renorm, self.trunc, self.convention)


class MahiroGuidance(GuiderComponent):
    """ComfyUI's ``Mahiro`` (:class:`~guidance.guiders.SimilarityAdaptive`) on the raw prediction."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        convention: str = "per_sample",
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.convention = convention
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return SimilarityAdaptive(scale, self.convention, space="prediction")


class FreScaGuidance(GuiderComponent):
    """FreSca (:class:`~guidance.guiders.FreSca`, ComfyUI's node) as a diffusers guider."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        scale_low: float = 1.0,
        scale_high: float = 1.25,
        freq_cutoff: int = 20,
        convention: str = "clamped",
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.scale_low, self.scale_high, self.freq_cutoff = scale_low, scale_high, freq_cutoff
        self.convention = convention
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return FreSca(scale, self.scale_low, self.scale_high, self.freq_cutoff, self.convention)
