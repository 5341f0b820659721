"""Measure what each guidance method does to the shipped digits diffusion model.

For every method and scale it draws ``--per-class`` samples of each digit (500 by default)
from the same initial noise with DDIM (``--steps``, default 25, eta 0) and reports:

* ``accuracy``: the independent judge's accuracy for the requested class;
* ``diversity``: mean pairwise distance of the judge's 64-d features within a class,
  averaged over classes (``diversity_pixels``: the same in pixel space, ``[0, 1]`` range);
* ``saturation``: the rate of pixels that land more than half a grey level outside the
  data range (they would be clipped when quantised to 0..16), ``overshoot`` their mean
  distance outside it (model space, data range ``[-1, 1]``);
* ``fd``: Frechet distance to the held-out digits in the judge's feature space;
* ``nfe``: network evaluations (UNet rows) per image, from the guidance handle.

Methods: CFG, APG (paper form on x0, and diffusers' form on eps), guidance rescale,
CFG-Zero*, CFG++ (its scale is lambda in [0, 1]), linear and cosine increasing schedules
at equal mean scale, the guidance interval, adaptive guidance and a fixed-ratio cut-off; and
the prediction-only guiders TCFG, FDG, MAMBO-G, APG-mix, CFGNorm, CFG-Renorm, Mahiro, FreSca,
plus ICG and TSG (their reference branch, the conditional rows under a random class or a noisy
time embedding, is evaluated by ``attach``'s branch mechanism); and the perturbation guiders PAG,
SEG, SLG, TPG, S^2-Guidance and AutoGuidance (the shipped weak digits model). NAG is not measured:
it guides in cross-attention space and this UNet is conditioned by a class embedding, without
cross-attention.
Writes a JSON table, the plots and image grids, and prints the table.

The JSON is rewritten after every setting (``"partial": true`` until the run ends); the README's
scales (3 and 8) run first. ``--replot`` redraws the figures from a JSON.

The README's run (about 70 minutes of wall time on 2 busy CPU cores, 30 CPU-minutes; ``--quick``
for a smoke run):
    python benchmarks/digits_guidance_eval.py --per-class 30 --scales 1.5 3 5 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from guidance.adaptive import AdaptiveGuidance, RatioCutoff  # noqa: E402
from guidance.diffusion import attach  # noqa: E402
from guidance.guiders import (  # noqa: E402
    APG,
    CFG,
    APGMix,
    AutoGuidance,
    CFGNorm,
    CFGZeroStar,
    FrequencyDecoupled,
    FreSca,
    IndependentCondition,
    MagnitudeAware,
    PerturbedAttention,
    RenormCFG,
    RescaledCFG,
    SimilarityAdaptive,
    SkipLayer,
    SmoothedEnergy,
    StochasticSelf,
    TangentialCFG,
    TimestepGuidance,
    TokenPerturbation,
)
from guidance.models.digits import (  # noqa: E402
    NUM_CLASSES,
    load_digits_pipeline,
    load_digits_split,
    to_unit_range,
)
from guidance.models.digits_judge import (  # noqa: E402
    frechet_distance,
    load_digits_judge,
    mean_pairwise_distance,
)
from guidance.schedules import Cosine, Interval, Linear, MeanNormalized  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCALES = (1.5, 2.0, 3.0, 5.0, 8.0)
DEFAULT_LAMBDAS = (0.2, 0.4, 0.6, 0.8, 1.0)
# Guidance interval (Kynkaanniemi et al. 2024): their EDM2 values, in k-diffusion sigma.
INTERVAL_SIGMA = (0.28, 5.42)
# (cosine threshold, min_steps). 0.99 is the paper's range; on this eps model cos(c, u) > 0.999
# at the first step, so min_steps variants show the per-sample criterion at work.
ADAPTIVE_SETTINGS = ((0.99, 0), (0.999, 0), (0.9995, 0), (0.999, 8), (0.998, 8))
ADAPTIVE_SCALE = 3.0
CUTOFF_RATIOS = (0.2, 0.4, 0.6)
# Half a grey level of sklearn's 0..16 digits, in model space ([-1, 1] spans 16 levels).
SATURATION_TOLERANCE = 1.0 / 16.0


@dataclass
class Setting:
    """One row of the table: a method at one scale."""

    method: str
    scale: float
    build: Callable[[], dict[str, Any]] | None  # None: the plain pipeline, no guidance
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        suffix = "".join(f",{k}={v}" for k, v in self.extra.items())
        return f"{self.method}@{self.scale:g}{suffix}"


# The guiders of issue 12. FDG: w on the fine band, (w + 1) / 2 on the coarse one (the paper's
# high/low split); FreSca: cutoff 2 (the node's 20 covers all of an 8 x 8 latent, i.e. plain CFG).
NEW_GUIDERS: dict[str, tuple[Callable[[float], Any], str]] = {
    "tcfg": (lambda w: TangentialCFG(w), "eps space"),
    "fdg": (lambda w: FrequencyDecoupled((w, (w + 1) / 2)), "fine band w, coarse (w+1)/2"),
    "mambo_g": (lambda w: MagnitudeAware(w, alpha=8.0), "alpha=8, eps space"),
    "apg_mix": (
        lambda w: APGMix(w, apg_scale=w, momentum=-0.5, norm_threshold=10.0, apg_start_step=5),
        "CFG for steps 0-5, then APG (diffusers form, beta=-0.5, r=10)",
    ),
    "cfg_norm": (lambda w: CFGNorm(w), "x0 space (ComfyUI)"),
    "renorm": (lambda w: RenormCFG(w, renorm=1.0), "rho=1, eps space"),
    "mahiro": (lambda w: SimilarityAdaptive(w), "x0 space, per sample"),
    "fresca": (lambda w: FreSca(w, scale_low=1.0, scale_high=1.25, freq_cutoff=2), "low 1.0, high 1.25, cutoff 2"),
    "icg": (lambda w: IndependentCondition(w, num_classes=NUM_CLASSES), "random class label per step"),
    "tsg": (lambda w: TimestepGuidance(w), "s=3, a=0.25, t/1000, times std"),
    "tsg_gentle": (lambda w: TimestepGuidance(w, noise_scale=1.0), "s=1 (the reported s=3 breaks this model)"),
}


# The perturbation guiders of issue 12 (guidance from a perturbed forward or a weaker model). The
# scale axis is the same as CFG's: ``p + w (c - p)`` with ``p`` the perturbed (or weak) prediction,
# i.e. perturbed scale ``s = w - 1`` and no CFG; ``*_cfg`` rows add the perturbation (s = 1) to CFG at w.
# The digits UNet has self-attention at 2x2 in down_blocks.2, mid_block and up_blocks.0.
def _weak_unet() -> Any:
    from guidance.models.digits_weak import load_digits_weak_unet

    return load_digits_weak_unet()


PERTURBED_GUIDERS: dict[str, tuple[Callable[[float], Any], str]] = {
    "pag": (lambda w: PerturbedAttention(1.0, w - 1.0, layers="mid"), "identity attention in mid, s=w-1, no CFG"),
    "pag_cfg": (lambda w: PerturbedAttention(w, 1.0, layers="mid"), "CFG w + PAG s=1 (mid)"),
    "seg": (lambda w: SmoothedEnergy(1.0, w - 1.0, layers="mid"), "mean query in mid, s=w-1, no CFG"),
    "slg": (
        lambda w: SkipLayer(1.0, w - 1.0, layers="mid_block.attentions.0", start=0.0, stop=1.0),
        "mid attention skipped, every step, s=w-1, no CFG",
    ),
    "slg_cfg": (
        lambda w: SkipLayer(w, 1.0, layers="mid_block.attentions.0"),
        "CFG w + SLG s=1, window 0.01-0.2",
    ),
    "tpg": (lambda w: TokenPerturbation(1.0, w - 1.0, layers="mid_block.attentions.0"), "tokens shuffled before mid attention, s=w-1"),
    "s2g": (
        lambda w: StochasticSelf(1.0, w - 1.0, layers="*.attentions.[0-9]", ratio=0.5),
        "2 of 4 attention layers dropped at random per step, s=w-1",
    ),
    "autoguidance": (lambda w: AutoGuidance(w, model=_weak_unet()), "weak model: 1/4 channels, 600 steps"),
}


def build_settings(
    scales: tuple[float, ...], lambdas: tuple[float, ...], methods: set[str] | None
) -> list[Setting]:
    """All method/scale combinations of the sweep (``methods`` filters by method name)."""
    settings: list[Setting] = [Setting("unguided", 1.0, None, "plain pipeline, conditional only")]
    for w in scales:
        settings += [
            Setting("cfg", w, lambda w=w: {"guider": CFG(w)}),
            Setting(
                "apg_paper", w, lambda w=w: {"guider": APG(w, eta=0.0, convention="paper")}, "x0 space, eta=0"
            ),
            Setting(
                "apg_paper_momentum",
                w,
                lambda w=w: {"guider": APG(w, eta=0.0, momentum=-0.5, convention="paper")},
                "x0 space, eta=0, beta=-0.5",
            ),
            Setting(
                "apg_diffusers",
                w,
                lambda w=w: {"guider": APG(w, eta=0.0, convention="diffusers")},
                "eps space, eta=0",
            ),
            Setting("rescale", w, lambda w=w: {"guider": RescaledCFG(w, rescale=0.7)}, "phi=0.7"),
            Setting(
                "cfg_zero_star", w, lambda w=w: {"guider": CFGZeroStar(w, zero_init_steps=0)}, "no zero-init"
            ),
            Setting(
                "linear",
                w,
                lambda w=w: {"guider": CFG(MeanNormalized(Linear(1.0, 2.0), w))},
                "1 -> 2w-1, mean w",
            ),
            Setting(
                "cosine",
                w,
                lambda w=w: {"guider": CFG(MeanNormalized(Cosine(1.0, 2.0), w))},
                "1 -> 2w-1, mean w",
            ),
            Setting(
                "interval",
                w,
                lambda w=w: {"guider": CFG(Interval(w, *INTERVAL_SIGMA))},
                f"w for sigma in ({INTERVAL_SIGMA[0]}, {INTERVAL_SIGMA[1]}]",
            ),
        ]
        for method, (make, note) in (NEW_GUIDERS | PERTURBED_GUIDERS).items():
            settings.append(Setting(method, w, lambda w=w, make=make: {"guider": make(w)}, note))
    top = max(scales)
    settings.append(
        Setting(
            "apg_diffusers_defaults",
            top,
            lambda: {"guider": APG(top, eta=1.0, norm_threshold=15.0, convention="diffusers")},
            "diffusers' defaults eta=1, r=15 (CFG unless ||c - u|| > 15)",
        )
    )
    for lam in lambdas:
        settings.append(
            Setting("cfgpp", lam, lambda lam=lam: {"guider": CFG(lam), "mode": "cfgpp"}, "DDIM CFG++, lambda")
        )
    for tau, min_steps in ADAPTIVE_SETTINGS:
        settings.append(
            Setting(
                "adaptive",
                ADAPTIVE_SCALE,
                lambda tau=tau, m=min_steps: {
                    "guider": CFG(ADAPTIVE_SCALE),
                    "adaptive": AdaptiveGuidance(tau, min_steps=m),
                },
                f"cos threshold {tau}, min_steps {min_steps}",
                {"threshold": tau, "min_steps": min_steps},
            )
        )
    for ratio in CUTOFF_RATIOS:
        settings.append(
            Setting(
                "cutoff",
                ADAPTIVE_SCALE,
                lambda ratio=ratio: {"guider": CFG(ADAPTIVE_SCALE), "adaptive": RatioCutoff(ratio)},
                f"guidance for steps 0..int({ratio} N)",
                {"ratio": ratio},
            )
        )
    if methods:
        unknown = methods - {s.method for s in settings}
        if unknown:
            raise ValueError(
                f"`--methods`: unknown method(s) {sorted(unknown)}; known: {sorted({s.method for s in settings})}."
            )
        settings = [s for s in settings if s.method in methods or s.method == "unguided"]
    return settings


def saturation_stats(samples: torch.Tensor) -> tuple[float, float]:
    """``(rate of pixels beyond the data range by more than half a grey level, mean overshoot)``."""
    excess = (samples.abs() - 1.0).clamp_min(0)
    return float((excess > SATURATION_TOLERANCE).float().mean()), float(excess.mean())


def class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean within-class pairwise feature distance, averaged over the classes."""
    return float(np.mean([mean_pairwise_distance(features[labels == k]) for k in range(NUM_CLASSES)]))


@torch.no_grad()
def evaluate_samples(
    samples: torch.Tensor, labels: torch.Tensor, judge, heldout_features: torch.Tensor
) -> dict[str, Any]:
    """All image metrics of one setting; ``samples`` in model space (unclipped)."""
    images = to_unit_range(samples)
    features = judge.features(images)
    predicted = judge.head(features).argmax(-1)
    correct = predicted == labels
    saturation, overshoot = saturation_stats(samples)
    flat = images.flatten(1)
    return {
        "accuracy": float(correct.float().mean()),
        "accuracy_per_class": [
            round(float(correct[labels == k].float().mean()), 4) for k in range(NUM_CLASSES)
        ],
        "diversity": class_diversity(features, labels),
        "diversity_pixels": class_diversity(flat, labels),
        "saturation": saturation,
        "overshoot": overshoot,
        "fd": frechet_distance(features, heldout_features),
    }


def run_setting(
    pipe, setting: Setting, labels: torch.Tensor, latents: torch.Tensor, steps: int
) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """Sample with one setting: ``(samples in model space, network evaluations per image, extra stats)``."""
    if setting.build is None:
        out = pipe(
            labels,
            guidance_scale=1.0,
            num_inference_steps=steps,
            latents=latents.clone(),
            output_type="latent",
        )
        return out.images, float(steps), {}
    options = setting.build()
    with attach(
        pipe, options["guider"], adaptive=options.get("adaptive"), mode=options.get("mode", "guide")
    ) as handle:
        # Any scale > 1 makes the pipeline build the [uncond, cond] batch; the guider sets the real scale.
        out = pipe(
            labels,
            guidance_scale=2.0,
            num_inference_steps=steps,
            latents=latents.clone(),
            output_type="latent",
        )
        stats = handle.stats
    extra: dict[str, Any] = {}
    if options.get("adaptive") is not None and any(p is not None for p in stats.passed_at):
        retired = [p for p in stats.passed_at if p is not None]
        extra = {
            "retired_fraction": len(retired) / len(stats.passed_at),
            "retired_at_mean_step": float(np.mean(retired)),
        }
    return out.images, stats.evaluations_per_image, extra


def reference_rows(
    judge, heldout_images: torch.Tensor, heldout_labels: torch.Tensor, per_class: int, seed: int
) -> dict[str, Any]:
    """The same metrics for real digits: the held-out split itself and a class-balanced training subset."""
    train_images, train_labels = load_digits_split("train")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.cat(
        [
            torch.nonzero(train_labels == k).flatten()[
                torch.randperm(int((train_labels == k).sum()), generator=gen)[:per_class]
            ]
            for k in range(NUM_CLASSES)
        ]
    )
    heldout_features = judge.features(to_unit_range(heldout_images))
    rows = {}
    for name, imgs, labs in (
        ("data_train_subset", train_images[pick], train_labels[pick]),
        ("data_heldout", heldout_images, heldout_labels),
    ):
        rows[name] = evaluate_samples(imgs, labs, judge, heldout_features) | {"nfe": 0.0, "seconds": 0.0}
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mosaic(samples: torch.Tensor, labels: torch.Tensor, per_row: int, overlay: bool = False) -> np.ndarray:
    """Digits 0..9 as rows, the first ``per_row`` samples of each class as columns, 1-pixel gaps.

    Returns a grey image ``(H, W)``, or with ``overlay`` an RGB image ``(H, W, 3)`` in which pixels
    that overshoot the data range by more than the saturation tolerance are red (too dark: ink
    beyond 16) or blue (too light: below 0).
    """
    grey = to_unit_range(samples)[:, 0].numpy()
    raw = samples[:, 0].numpy()
    size = grey.shape[-1] + 1
    canvas = np.ones((NUM_CLASSES * size - 1, per_row * size - 1, 3), dtype=np.float32)
    for k in range(NUM_CLASSES):
        members = np.flatnonzero(labels.numpy() == k)[:per_row]
        for j, i in enumerate(members):
            tile = np.repeat((1.0 - grey[i])[..., None], 3, axis=-1)  # ink is dark
            if overlay:
                tile[raw[i] > 1 + SATURATION_TOLERANCE] = (0.85, 0.1, 0.1)
                tile[raw[i] < -1 - SATURATION_TOLERANCE] = (0.2, 0.45, 0.95)
            canvas[k * size : k * size + size - 1, j * size : j * size + size - 1] = tile
    return canvas if overlay else canvas[..., 0]


def save_grids(grids: dict[str, list[tuple[float, np.ndarray]]], out_dir: Path) -> list[Path]:
    """One PNG per method: a panel per scale (digits 0..9 down, samples across)."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for method, panels in grids.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels) + 0.4, 2.7), squeeze=False)
        for ax, (scale, image) in zip(axes[0], panels, strict=True):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{'lambda' if method == 'cfgpp' else 'w'} = {scale:g}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(method, fontsize=10)
        fig.tight_layout()
        path = out_dir / f"digits_grid_{method}.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        paths.append(path)
    return paths


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


PLOT_STYLE = {
    "cfg": ("black", "o"),
    "apg_paper": ("tab:red", "s"),
    "apg_paper_momentum": ("salmon", "s"),
    "apg_diffusers": ("tab:pink", "D"),
    "rescale": ("tab:blue", "^"),
    "cfg_zero_star": ("tab:cyan", "v"),
    "cfgpp": ("tab:green", "P"),
    "linear": ("tab:orange", "<"),
    "cosine": ("tab:brown", ">"),
    "interval": ("tab:purple", "X"),
    "adaptive": ("tab:olive", "*"),
    "cutoff": ("tab:gray", "h"),
    "tcfg": ("darkgreen", "o"),
    "fdg": ("navy", "s"),
    "mambo_g": ("teal", "D"),
    "apg_mix": ("crimson", "^"),
    "cfg_norm": ("gold", "v"),
    "renorm": ("darkorange", "P"),
    "mahiro": ("magenta", "<"),
    "fresca": ("slateblue", ">"),
    "icg": ("sienna", "X"),
    "tsg": ("darkslategray", "*"),
    "tsg_gentle": ("silver", "*"),
    "pag": ("deeppink", "P"),
    "pag_cfg": ("lightcoral", "P"),
    "seg": ("darkcyan", "d"),
    "slg": ("olive", "s"),
    "slg_cfg": ("yellowgreen", "s"),
    "tpg": ("indigo", "v"),
    "s2g": ("peru", "^"),
    "autoguidance": ("dimgray", "h"),
}
# The README's two trade-off figures: the methods before issue 12, and issue 12's guiders against CFG.
CLASSIC = [m for m in PLOT_STYLE if m not in ("adaptive", "cutoff") and m not in NEW_GUIDERS | PERTURBED_GUIDERS]
# TSG at the reported s = 3 breaks the samples (FD in the hundreds) and would squash the other curves.
ISSUE12 = ["cfg", *(m for m in NEW_GUIDERS if m != "tsg"), *PERTURBED_GUIDERS]


def plot_tradeoffs(
    rows: list[dict[str, Any]], references: dict[str, Any], path: Path, methods: list[str] = CLASSIC
) -> None:
    """Accuracy vs diversity, FD and saturation vs scale, and saturation vs FD of ``methods``."""
    plt = _pyplot()
    base = next(r for r in rows if r["method"] == "unguided")
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 10))
    (ax_div, ax_fd), (ax_sat, ax_pair) = axes
    for method in methods:
        color, marker = PLOT_STYLE[method]
        mrows = [r for r in rows if r["method"] == method]
        if not mrows:
            continue
        chain = [base, *mrows]
        # Marker area grows with the scale (CFG++: with lambda, 1 ~ the largest scale).
        top = max(r["scale"] for r in mrows)
        sizes = [12] + [12 + 110 * (r["scale"] / top) for r in mrows]
        kw = {"color": color, "alpha": 0.85}
        ax_div.plot([r["diversity"] for r in chain], [100 * r["accuracy"] for r in chain], lw=1, **kw)
        ax_div.scatter(
            [r["diversity"] for r in chain],
            [100 * r["accuracy"] for r in chain],
            s=sizes,
            marker=marker,
            label=method,
            **kw,
        )
        ax_pair.plot([r["fd"] for r in chain], [100 * r["saturation"] for r in chain], lw=1, **kw)
        ax_pair.scatter(
            [r["fd"] for r in chain],
            [100 * r["saturation"] for r in chain],
            s=sizes,
            marker=marker,
            label=method,
            **kw,
        )
        if method != "cfgpp":
            xs = [1.0] + [r["scale"] for r in mrows]
            ax_fd.plot(xs, [r["fd"] for r in chain], marker=marker, label=method, **kw)
            ax_sat.plot(xs, [100 * r["saturation"] for r in chain], marker=marker, label=method, **kw)
    for name, marker, text in (
        ("data_heldout", "*", "held-out digits"),
        ("data_train_subset", "d", "training digits"),
    ):
        ref = references[name]
        ax_div.scatter(
            [ref["diversity"]],
            [100 * ref["accuracy"]],
            color="gold",
            edgecolor="black",
            marker=marker,
            s=180,
            zorder=5,
            label=text,
        )
    ax_div.scatter(
        [base["diversity"]],
        [100 * base["accuracy"]],
        color="white",
        edgecolor="black",
        s=90,
        zorder=5,
        label="unguided (w=1)",
    )
    ax_div.set_xlabel("within-class diversity (mean pairwise distance of judge features)")
    ax_div.set_ylabel("judge accuracy of the requested class (%)")
    ax_div.set_title("Accuracy vs diversity (marker size grows with the scale)")
    ax_div.legend(fontsize=7, ncol=2, loc="lower left")
    ax_fd.axhline(
        references["data_train_subset"]["fd"], color="goldenrod", ls="--", label="training digits (floor)"
    )
    ax_fd.set_xlabel("guidance scale w (mean scale for linear/cosine)")
    ax_fd.set_ylabel("Frechet distance to held-out digits")
    ax_fd.set_title("Frechet distance in the judge's feature space (lower is better)")
    ax_fd.set_yscale("log")
    ax_fd.legend(fontsize=7, ncol=2)
    ax_sat.set_xlabel("guidance scale w (mean scale for linear/cosine)")
    ax_sat.set_ylabel("% pixels beyond the data range (> half a grey level)")
    ax_sat.set_title("Saturation")
    ax_sat.legend(fontsize=7, ncol=2)
    ax_pair.set_xscale("log")
    top_fd = max(r["fd"] for r in rows if r["method"] in methods)
    log_ticks = [t for t in (4, 5, 7, 10, 15, 20, 30, 40, 60, 80, 120, 160) if t <= 1.25 * top_fd]
    ax_fd.set_yticks(log_ticks)
    ax_pair.set_xticks(log_ticks)
    for axis in (ax_fd.yaxis, ax_pair.xaxis):
        axis.set_major_formatter(matplotlib_ticker().FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib_ticker().NullFormatter())
    ax_pair.set_xlabel("Frechet distance to held-out digits (log)")
    ax_pair.set_ylabel("% pixels beyond the data range")
    ax_pair.set_title("Saturation vs Frechet distance (lower left is better)")
    ax_pair.legend(fontsize=7, ncol=2)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_all_tradeoffs(rows: list[dict[str, Any]], references: dict[str, Any], images_dir: Path) -> None:
    """The two README trade-off figures (classic methods; issue 12's guiders against CFG)."""
    present = {r["method"] for r in rows}
    for methods, name in ((CLASSIC, "digits_guidance_tradeoff.png"), (ISSUE12, "digits_guidance_tradeoff_new.png")):
        if present & set(methods) - {"cfg"}:
            plot_tradeoffs(rows, references, images_dir / name, methods)


def plot_evaluations(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy and FD against network evaluations per image, at the adaptive-guidance scale."""
    plt = _pyplot()
    w = ADAPTIVE_SCALE
    fixed = [
        r
        for r in rows
        if r["method"] == "unguided" or (r["method"] in ("cfg", "interval", "linear") and r["scale"] == w)
    ]
    adaptive = [r for r in rows if r["method"] == "adaptive"]
    cutoff = [r for r in rows if r["method"] == "cutoff"]
    points: list[tuple[dict[str, Any], str, Any, str]] = []
    for r in fixed:
        color, marker = PLOT_STYLE.get(r["method"], ("white", "o"))
        tag = "unguided" if r["method"] == "unguided" else f"{r['method']} w={r['scale']:g}"
        points.append((r, tag, color, marker))
    greens = plt.get_cmap("viridis")
    for i, r in enumerate(adaptive):
        tag = f"adaptive: cos > {r['threshold']:g}" + (
            f", min_steps {r['min_steps']}" if r["min_steps"] else ""
        )
        points.append((r, tag, greens(0.35 + 0.6 * i / max(1, len(adaptive) - 1)), "*"))
    greys = plt.get_cmap("Greys")
    for i, r in enumerate(cutoff):
        points.append(
            (
                r,
                f"cut-off after {r['ratio']:g} of the steps",
                greys(0.35 + 0.6 * i / max(1, len(cutoff) - 1)),
                "h",
            )
        )
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, label in (
        (axes[0], "accuracy", "judge accuracy (%)"),
        (axes[1], "fd", "Frechet distance (lower is better)"),
    ):
        for r, tag, color, marker in points:
            y = 100 * r[key] if key == "accuracy" else r[key]
            ax.scatter(
                [r["nfe"]],
                [y],
                color=color,
                marker=marker,
                s=110,
                edgecolor="black",
                linewidth=0.5,
                zorder=3,
                label=tag,
            )
        ax.set_xlabel("network evaluations per image (25 DDIM steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"Adaptive guidance and cut-offs vs CFG at w={w:g}")
    axes[1].set_title("Distribution distance at the same budget")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


README_GRID = (
    "unguided@1",
    "cfg@8",
    "apg_paper@8",
    "apg_paper_momentum@8",
    "rescale@8",
    "cosine@8",
    "interval@8",
    "cfgpp@1",
)
# Issue 12's guiders: the prediction guiders at w = 8 (where CFG saturates), the reference and
# perturbation guiders at w = 3.
README_GRID_NEW = (
    "unguided@1",
    "cfg@3",
    "cfg@8",
    "tcfg@8",
    "mambo_g@8",
    "cfg_norm@8",
    "tsg_gentle@3",
    "pag@3",
    "slg@3",
    "autoguidance@3",
)


def plot_readme_grid(
    samples: dict[str, torch.Tensor], labels: torch.Tensor, path: Path, per_row: int
) -> None:
    """A README grid: one panel per setting, pixels clipped by saturation in red/blue."""
    plt = _pyplot()
    keys = list(samples)
    fig, axes = plt.subplots(1, len(keys), figsize=(1.55 * len(keys) + 0.3, 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.imshow(mosaic(samples[key], labels, per_row, overlay=True), interpolation="nearest")
        method, scale = key.split("@")
        ax.set_title(
            f"{method.replace('_', ' ')}\n{'lambda' if method == 'cfgpp' else 'w'} = {scale}", fontsize=8
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("red / blue: pixels beyond the data range (clipped on display)", fontsize=8, y=0.035)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'setting':34s} {'acc':>6s} {'div':>6s} {'divpx':>6s} {'sat%':>6s} {'over':>7s} {'FD':>8s} {'NFE':>6s} {'s':>6s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:34s} {r['accuracy']:6.3f} {r['diversity']:6.2f} {r['diversity_pixels']:6.3f} "
            f"{100 * r['saturation']:6.2f} {r['overshoot']:7.4f} {r['fd']:8.2f} {r['nfe']:6.1f} {r['seconds']:6.1f}"
        )


def run_priority(setting: Setting) -> int:
    """Sampling order: the README's scales (3 and 8) first, so a run cut short still fills the table."""
    if setting.method == "unguided":
        return 0
    return 1 if setting.method != "cfgpp" and setting.scale in (3.0, 8.0) else 2


def settings_block(args: argparse.Namespace, samples: int) -> dict[str, Any]:
    """The run's settings, recorded in the JSON."""
    return {
        "samples": samples,
        "per_class": args.per_class,
        "steps": args.steps,
        "scales": list(args.scales),
        "lambdas": list(args.lambdas),
        "scheduler": "DDIM eta=0, leading spacing",
        "seed": args.seed,
        "saturation_tolerance": SATURATION_TOLERANCE,
        "interval_sigma": INTERVAL_SIGMA,
        "adaptive_scale": ADAPTIVE_SCALE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_json(
    path: Path, settings: dict[str, Any], references: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    result = {"settings": settings, "references": references, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50, help="samples per digit (10 digits)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    parser.add_argument(
        "--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS), help="CFG++ lambdas"
    )
    parser.add_argument("--methods", nargs="+", default=None, help="subset of methods (unguided always runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "digits_guidance_full.json")
    parser.add_argument("--grids-dir", type=Path, default=ROOT / "benchmarks" / "results" / "digits_grids")
    parser.add_argument(
        "--images-dir", type=Path, default=ROOT / "docs" / "images", help="where the README figures go"
    )
    parser.add_argument(
        "--weights-dir", type=Path, default=None, help="model and judge weights (default: shipped)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 per class, 6 steps, two scales")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the trade-off plots from --json without sampling"
    )
    args = parser.parse_args(argv)
    if args.replot:
        result = json.loads(args.json.read_text())
        print_table([{"name": k, **v} for k, v in result["references"].items()] + result["rows"])
        plot_all_tradeoffs(result["rows"], result["references"], args.images_dir)
        plot_evaluations(result["rows"], args.images_dir / "digits_guidance_nfe.png")
        return result
    if args.quick:
        args.per_class, args.steps, args.scales, args.lambdas = 5, 6, [2.0, 5.0], [0.6]
    if args.per_class < 2:
        raise ValueError(f"`--per-class` must be >= 2, got {args.per_class}.")
    if args.threads:
        torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    settings = build_settings(
        tuple(args.scales), tuple(args.lambdas), set(args.methods) if args.methods else None
    )
    pipe = load_digits_pipeline("ddim", weights_dir=args.weights_dir)
    judge = load_digits_judge(args.weights_dir)
    heldout_images, heldout_labels = load_digits_split("heldout")
    heldout_features = judge.features(to_unit_range(heldout_images))
    references = reference_rows(judge, heldout_images, heldout_labels, args.per_class, args.seed)

    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    latents = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    grids: dict[str, list[tuple[float, np.ndarray]]] = {}
    kept: dict[str, torch.Tensor] = {}
    per_row = min(8, args.per_class)
    block = settings_block(args, len(labels))
    order = sorted(range(len(settings)), key=lambda i: run_priority(settings[i]))
    done: dict[int, dict[str, Any]] = {}
    bar = tqdm([settings[i] for i in order], desc="digits guidance sweep", unit="setting")
    for index, setting in zip(order, bar, strict=True):
        bar.set_postfix_str(setting.name)
        start = time.perf_counter()
        samples, nfe, stats = run_setting(pipe, setting, labels, latents, args.steps)
        seconds = time.perf_counter() - start
        if not bool(torch.isfinite(samples).all()):
            raise RuntimeError(f"{setting.name} produced non-finite samples.")
        row = {
            "name": setting.name,
            "method": setting.method,
            "scale": setting.scale,
            "note": setting.note,
            **setting.extra,
        }
        row |= evaluate_samples(samples, labels, judge, heldout_features)
        row |= {"nfe": nfe, "seconds": round(seconds, 2), **stats}
        done[index] = row
        rows = [done[i] for i in sorted(done)]
        # A checkpoint after every setting: a run cut short still leaves its rows.
        write_json(args.json, block | {"partial": len(done) < len(settings)}, references, rows)
        if not setting.extra:
            grids.setdefault(setting.method, []).append((setting.scale, mosaic(samples, labels, per_row)))
        if setting.name in README_GRID + README_GRID_NEW:
            kept[setting.name] = samples

    base = grids.pop("unguided")[0]
    for method in grids:
        grids[method].sort(key=lambda panel: panel[0])
        if method != "cfgpp":
            grids[method].insert(0, base)
    result = write_json(args.json, block | {"wall_seconds": round(time.perf_counter() - began)}, references, rows)
    print_table([{"name": k, **v} for k, v in references.items()] + rows)
    save_grids(grids, args.grids_dir)
    plot_all_tradeoffs(rows, references, args.images_dir)
    plot_evaluations(rows, args.images_dir / "digits_guidance_nfe.png")
    for keys, name in ((README_GRID, "digits_grid.png"), (README_GRID_NEW, "digits_grid_new.png")):
        if any(k in kept for k in keys if k != "unguided@1"):
            plot_readme_grid(
                {k: kept[k] for k in keys if k in kept}, labels, args.images_dir / name, min(6, per_row)
            )
    print(
        f"wrote {args.json}, {args.grids_dir}/ and, in {args.images_dir}/, digits_guidance_tradeoff*.png, "
        "digits_guidance_nfe.png, digits_grid*.png",
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    main()
