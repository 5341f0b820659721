"""Sampling runs shared by the CFG-parallel tests: the ranks run them with ``parallel=``, pytest without.

Each scenario is one pipeline call with a fixed seed; ``run(name, **attach_kwargs)`` attaches the
scenario's guider with the given extra arguments (``parallel="cfg"``, ``evaluator="separate"``,
...) and returns the latents. Kept small: the digits model at 8x8 and the tiny random Stable
Diffusion at 16x16, a few steps each.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from guidance.adaptive import AdaptiveGuidance  # noqa: E402
from guidance.branches import COND, UNCOND, Branch  # noqa: E402
from guidance.diffusion import ForwardHooks, attach  # noqa: E402
from guidance.guiders import (  # noqa: E402
    APG,
    CFG,
    AutoGuidance,
    CFGZeroStar,
    PerpNeg,
    StochasticSelf,
    TokenPerturbation,
)
from guidance.schedules import Window  # noqa: E402

DIGIT_LABELS = [1, 3, 7, 9]
DIGIT_STEPS = 4
SD_PROMPTS = ["a cat", "dog"]
SD_STEPS = 2


@functools.cache
def pipe_of(kind: str) -> Any:
    if kind == "digits":
        from guidance.models.digits import load_digits_pipeline

        return load_digits_pipeline("ddim")
    from guidance.diffusion.testing import tiny_stable_diffusion

    return tiny_stable_diffusion()


@functools.cache
def weak_digits_unet() -> Any:
    from guidance.models.digits_weak import load_digits_weak_unet

    return load_digits_weak_unet()


def _digits(pipe: Any, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    kwargs.setdefault("guidance_scale", 2.0)
    return pipe(
        DIGIT_LABELS,
        num_inference_steps=DIGIT_STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).images


def _sd(pipe: Any, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    return pipe(
        SD_PROMPTS,
        num_inference_steps=SD_STEPS,
        height=16,
        width=16,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).images


class SkipLayerCFG(CFG):
    """CFG plus ``1.5 (c - c_skipped)`` from step 1 on: a hooked third branch (the mid-block attention skipped)."""

    def __init__(self, scale: float, splittable: bool = True):
        super().__init__(scale)
        self.hook = ForwardHooks(lambda name, module, args, output, rows: args[0], "mid_block.attentions.0")
        self.hook.splittable = splittable

    def branches(self, step, num_steps=None, sigma=None):
        return (COND, UNCOND) + ((Branch("skipped", hook=self.hook),) if step >= 1 else ())

    def __call__(self, cond, uncond, *, step, num_steps=None, sigma=None, skipped=None):
        guided = super().__call__(cond, uncond, step=step, num_steps=num_steps, sigma=sigma)
        return guided if skipped is None else guided + 1.5 * (cond - skipped)


@dataclass
class Scenario:
    kind: str
    guider: Callable[[], Any]
    attach: dict[str, Any] = field(default_factory=dict)  # extra attach arguments (adaptive, branch_inputs)
    call: dict[str, Any] = field(default_factory=dict)  # extra pipeline arguments


SCENARIOS: dict[str, Scenario] = {
    "digits_cfg": Scenario("digits", lambda: CFG(3.0)),
    "digits_apg": Scenario("digits", lambda: APG(5.0, momentum=-0.5, norm_threshold=2.0)),
    "digits_zero_star": Scenario("digits", lambda: CFGZeroStar(3.0, zero_init_steps=1)),
    "digits_interval": Scenario("digits", lambda: CFG(Window(3.0, start_step=1, end_step=3))),
    "digits_adaptive": Scenario("digits", lambda: CFG(3.0), {"adaptive": lambda: AdaptiveGuidance(0.998)}),
    "digits_perp_neg": Scenario(
        "digits",
        lambda: PerpNeg(3.0, 1.0),
        {"branch_inputs": lambda: {"negative": {"class_labels": torch.tensor([4])}}},
    ),
    "digits_skip_layer": Scenario("digits", lambda: SkipLayerCFG(3.0)),
    # Hooks with state from call to call: the perturbed branch must stay on one rank (CFG is off at
    # step 0, so the branches there are [cond, perturbed] and afterwards [uncond, cond, perturbed]).
    "digits_tpg": Scenario(
        "digits", lambda: TokenPerturbation(Window(3.0, start_step=1), 2.0, layers="mid_block.attentions.0")
    ),
    "digits_s2g": Scenario(
        "digits", lambda: StochasticSelf(3.0, 0.5, layers="*.attentions.[0-9]", ratio=0.5)
    ),
    "digits_autoguidance": Scenario("digits", lambda: AutoGuidance(2.0, model=weak_digits_unet())),
    "digits_cfgpp": Scenario("digits", lambda: 0.6, {"mode": lambda: "cfgpp"}),
    "sd_cfg": Scenario("sd", lambda: CFG(4.0)),
    "sd_apg": Scenario("sd", lambda: APG(6.0, momentum=-0.5, norm_threshold=5.0)),
    "sd_zero_star": Scenario("sd", lambda: CFGZeroStar(4.0, zero_init_steps=1)),
}


def run(name: str, seed: int = 0, guider: Any = None, **attach_kwargs: Any) -> torch.Tensor:
    """The latents of scenario ``name`` (its guider, or ``guider``) with ``attach_kwargs`` added."""
    scenario = SCENARIOS[name]
    pipe = pipe_of(scenario.kind)
    extra = {key: make() for key, make in scenario.attach.items()}
    guider = scenario.guider() if guider is None else guider
    with attach(pipe, guider, **extra, **attach_kwargs) as handle:
        sample = _digits if scenario.kind == "digits" else _sd
        out = sample(pipe, seed, **scenario.call)
    run.last_handle = handle  # type: ignore[attr-defined]
    return out


def run_unguided_digits(**attach_kwargs: Any) -> torch.Tensor:
    """The digits pipeline called with guidance_scale=1 (no [uncond, cond] batch)."""
    pipe = pipe_of("digits")
    with attach(pipe, CFG(3.0), **attach_kwargs):
        return _digits(pipe, guidance_scale=1.0)
