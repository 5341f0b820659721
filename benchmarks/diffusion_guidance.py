"""Network evaluations and wall time per image of diffusion guidance, and per-step operator overhead.

    python benchmarks/diffusion_guidance.py                         # tiny random-weight SD, CPU
    python benchmarks/diffusion_guidance.py --pipeline digits --steps 25 --json out.json --plot sweep.png

Part 1 runs the same pipeline call (``--batch`` images, ``--steps`` steps, same seed) under plain
CFG (the pipeline's own), attached plain CFG, guidance off, adaptive guidance at several
thresholds, the guidance interval (Kynkaanniemi et al.; by default the middle half of the
run's noise levels) and a fixed-ratio cut-off. For each it reports network evaluations per image
(sample rows through the denoiser, counted at its input layer), wall time per image (median of
``--repeats`` rounds after one untimed call; each round times every configuration once, so that
load from other processes biases none; ``--clock process`` counts this process's CPU time, which
other processes on a shared machine barely disturb), both relative to plain CFG, and the largest absolute
difference of the final latents from plain CFG (0 = same images). With ``--new-guiders`` (default)
it adds the prediction-only guiders (TCFG, FDG, MAMBO-G, APG-mix, CFGNorm, Mahiro, FreSca,
CFG-Renorm: two evaluations, the cost of their operator) and ICG and TSG (the conditional rows
plus a reference branch batched with them). With ``--perturbed`` (default) it adds the
perturbation guiders (CFG plus a perturbed branch: PAG batched and one call per branch, SEG,
SLG, TPG, S^2-Guidance; AutoGuidance with the weak model on ``digits``, whose evaluations are
counted on the main denoiser only; NAG alone and CFG + NAG on ``sd``/``sdxl``, the pipelines
with cross-attention).

Part 2 times each guidance operator on one step's predictions (``guide()``: the guider plus,
for x0-space operators, the conversions) and the adaptive cosine similarity, relative to one
denoiser call on the stacked ``[uncond, cond]`` batch of the same pipeline.

``--pipeline`` is ``sd`` (tiny StableDiffusionPipeline, DDIM), ``sdxl`` (Euler), ``sd3`` (flow
matching), ``dit`` or ``digits`` (the project's trained digits model, if its weights are
installed). Random-weight models give meaningful timings and evaluation counts, but their
cosine similarities (hence where adaptive guidance stops) are not those of a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from guidance.adaptive import AdaptiveGuidance, RatioCutoff, cosine_similarity  # noqa: E402
from guidance.diffusion import attach  # noqa: E402
from guidance.diffusion.schedulers import noise_level_at, schedule_sigma  # noqa: E402
from guidance.diffusion.schedulers import prediction_type as scheduler_prediction_type  # noqa: E402
from guidance.guiders import (  # noqa: E402
    APG,
    CFG,
    APGMix,
    AutoGuidance,
    BetaCFG,
    CFGNorm,
    CFGZeroStar,
    FrequencyDecoupled,
    FreSca,
    IndependentCondition,
    MagnitudeAware,
    NormalizedAttention,
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
    guide,
)
from guidance.schedules import Interval  # noqa: E402

PROMPTS = ["a red cat", "a dog on a hill", "blue sky", "an old tree"]


def build(name: str, size: int) -> tuple[Any, Callable[..., Any]]:
    """The pipeline and a function ``call(pipe, batch, steps, scale, seed) -> latents``."""
    from guidance.diffusion import testing

    if name in ("sd", "sdxl", "sd3"):
        builder = {
            "sd": testing.tiny_stable_diffusion,
            "sdxl": testing.tiny_stable_diffusion_xl,
            "sd3": testing.tiny_stable_diffusion_3,
        }[name]
        # SD3's tiny VAE does not downsample; SD/SDXL latents are size / 2.
        extra = (
            {"height": size // 2, "width": size // 2, "max_sequence_length": 4}
            if name == "sd3"
            else {"height": size, "width": size}
        )
        pipe = builder()

        def call(pipe: Any, batch: int, steps: int, scale: float, seed: int) -> torch.Tensor:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            return pipe(
                prompts,
                guidance_scale=scale,
                num_inference_steps=steps,
                output_type="latent",
                generator=torch.Generator().manual_seed(seed),
                **extra,
            ).images

        return pipe, call
    if name == "dit":
        pipe = testing.tiny_dit()

        def call(pipe: Any, batch: int, steps: int, scale: float, seed: int) -> torch.Tensor:
            return pipe(
                class_labels=[i % 10 for i in range(batch)],
                guidance_scale=scale,
                num_inference_steps=steps,
                output_type="pt",
                generator=torch.Generator().manual_seed(seed),
            ).images

        return pipe, call
    if name == "digits":
        from guidance.models.digits import load_digits_pipeline

        try:
            pipe = load_digits_pipeline()
        except FileNotFoundError as error:
            raise SystemExit(f"--pipeline digits: {error}") from error

        def call(pipe: Any, batch: int, steps: int, scale: float, seed: int) -> torch.Tensor:
            return pipe(
                [i % 10 for i in range(batch)],
                guidance_scale=scale,
                num_inference_steps=steps,
                output_type="latent",
                generator=torch.Generator().manual_seed(seed),
            ).images

        return pipe, call
    raise SystemExit(f"unknown --pipeline {name!r}")


def denoiser_of(pipe: Any) -> Any:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


class RowCounter:
    """Sample rows reaching the denoiser's first layer: the network evaluations actually run."""

    def __init__(self, pipe: Any):
        module = denoiser_of(pipe)
        layer = module.conv_in if hasattr(module, "conv_in") else module.pos_embed
        self.rows = 0
        self._hook = layer.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: tuple) -> None:
        self.rows += args[0].shape[0]

    def close(self) -> None:
        self._hook.remove()


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def interval_bounds(pipe: Any, steps: int) -> tuple[float, float]:
    """sigma bounds keeping the middle half of this run's steps (schedule-sigma convention)."""
    pipe.scheduler.set_timesteps(steps)
    sigmas = [
        schedule_sigma(noise_level_at(pipe.scheduler, t, i)) for i, t in enumerate(pipe.scheduler.timesteps)
    ]
    lo_step, hi_step = (3 * steps) // 4, steps // 4
    return sigmas[min(lo_step, steps - 1)], sigmas[hi_step] * 1.0000001


# Layers the perturbation guiders act on, per pipeline: (self-attention layers, blocks to skip/shuffle).
PERTURBED_LAYERS = {
    "sd": ("mid", "mid_block.attentions.0.transformer_blocks.0"),
    "sdxl": ("mid", "mid_block.attentions.0.transformer_blocks.0"),
    "sd3": ("transformer_blocks.0", "transformer_blocks.0"),
    "dit": ("transformer_blocks.0", "transformer_blocks.0"),
    "digits": ("mid", "mid_block.attentions.0"),
}


def prediction_guiders(w: float) -> list[tuple[str, Callable[[], Any]]]:
    """The two-evaluation guiders of issue 12, as ``(name, make guider)``."""
    return [
        ("TCFG", lambda: TangentialCFG(w)),
        ("FDG", lambda: FrequencyDecoupled((w, (w + 1) / 2))),
        ("MAMBO-G", lambda: MagnitudeAware(w)),
        ("APG-mix", lambda: APGMix(w, apg_scale=w)),
        ("CFGNorm", lambda: CFGNorm(w)),
        ("Mahiro", lambda: SimilarityAdaptive(w)),
        ("FreSca", lambda: FreSca(w)),
        ("CFG-Renorm", lambda: RenormCFG(w)),
    ]


def reference_configs(args: argparse.Namespace, pipe: Any) -> list[tuple[str, Callable[[], Any]]]:
    """The prediction-only guiders, and ICG/TSG (conditional rows + a reference branch, batched)."""
    w = args.scale
    classes = 10 if args.pipeline in ("digits", "dit") else None
    configs = [(name, lambda make=make: attach(pipe, make())) for name, make in prediction_guiders(w)]
    configs += [
        ("ICG (cond + random condition, batched)", lambda: attach(pipe, IndependentCondition(w, num_classes=classes))),
        ("TSG (cond + noisy time embedding, batched)", lambda: attach(pipe, TimestepGuidance(w))),
    ]
    return configs


def perturbed_configs(args: argparse.Namespace, pipe: Any) -> list[tuple[str, Callable[[], Any]]]:
    """CFG plus a perturbed branch (s = 1, every step): batched in one call, and PAG also one call per branch."""
    attention, blocks = PERTURBED_LAYERS[args.pipeline]
    w = args.scale
    configs: list[tuple[str, Callable[[], Any]]] = [
        ("PAG (CFG + perturbed, batched)", lambda: attach(pipe, PerturbedAttention(w, 1.0, layers=attention))),
        (
            "PAG (one call per branch)",
            lambda: attach(pipe, PerturbedAttention(w, 1.0, layers=attention), evaluator="separate"),
        ),
        ("SEG (batched)", lambda: attach(pipe, SmoothedEnergy(w, 1.0, layers=attention))),
        ("SLG (batched, every step)", lambda: attach(pipe, SkipLayer(w, 1.0, layers=blocks, start=0.0, stop=1.0))),
        ("SLG (window 0.01-0.2)", lambda: attach(pipe, SkipLayer(w, 1.0, layers=blocks))),
        ("TPG (batched)", lambda: attach(pipe, TokenPerturbation(w, 1.0, layers=blocks))),
        ("S2-Guidance (batched)", lambda: attach(pipe, StochasticSelf(w, 0.25, layers=blocks, ratio=1.0))),
    ]
    if args.pipeline in ("sd", "sdxl"):  # NAG needs cross-attention layers (not SD3, DiT, digits)
        from guidance.diffusion import prompt_inputs

        negative = prompt_inputs(pipe, "blurry")
        configs += [
            ("NAG alone (no CFG, one pass)", lambda: attach(pipe, NormalizedAttention(1.0, 5.0, negative=negative))),
            ("CFG + NAG (batched)", lambda: attach(pipe, NormalizedAttention(w, 5.0, negative=negative))),
        ]
    if args.pipeline == "digits":
        from guidance.models.digits_weak import load_digits_weak_unet

        weak = load_digits_weak_unet()
        configs.append(("AutoGuidance (weak model, no CFG)", lambda: attach(pipe, AutoGuidance(w, model=weak))))
    return configs


def run_config(
    args: argparse.Namespace, pipe: Any, call: Callable[..., Any], name: str, make: Callable[[], Any] | None
) -> dict[str, Any]:
    """One untimed call under a configuration: its evaluations per image, latents and adaptive stops."""
    handle = make() if make is not None else None
    counter = RowCounter(pipe)
    try:
        latents = call(pipe, args.batch, args.steps, args.scale, args.seed)
    finally:
        counter.close()
        if handle is not None:
            handle.detach()
    row: dict[str, Any] = {"config": name, "evaluations_per_image": counter.rows / args.batch, "latents": latents}
    if handle is not None and isinstance(handle.adaptive, AdaptiveGuidance):
        passed = [p for p in handle.stats.passed_at if p is not None]
        row["samples_stopped"] = f"{len(passed)}/{args.batch}"
    return row


def part1(args: argparse.Namespace, pipe: Any, call: Callable[..., Any]) -> list[dict[str, Any]]:
    lo, hi = interval_bounds(pipe, args.steps)
    configs: list[tuple[str, Callable[[], Any] | None]] = [
        ("plain CFG (pipeline)", None),
        ("CFG attached", lambda: attach(pipe, CFG(args.scale))),
        ("guidance off (scale 1)", lambda: attach(pipe, CFG(1.0))),
    ]
    for threshold in args.thresholds:
        configs.append(
            (
                f"adaptive {threshold}",
                lambda t=threshold: attach(pipe, CFG(args.scale), adaptive=AdaptiveGuidance(t)),
            )
        )
    configs.append(
        (
            f"interval ({lo:.3g}, {hi:.3g}]",
            lambda: attach(pipe, CFG(Interval(args.scale, sigma_lo=lo, sigma_hi=hi))),
        )
    )
    configs.append(("cut-off ratio 0.5", lambda: attach(pipe, CFG(args.scale), adaptive=RatioCutoff(0.5))))
    if args.new_guiders:
        configs += reference_configs(args, pipe)
    if args.perturbed:
        configs += perturbed_configs(args, pipe)

    rows = [run_config(args, pipe, call, name, make) for name, make in tqdm(configs, desc="configurations", leave=False)]
    reference = rows[0].pop("latents")
    rows[0]["max_abs_diff_vs_plain"] = 0.0
    for row in rows[1:]:
        row["max_abs_diff_vs_plain"] = float((row.pop("latents") - reference).abs().max())
    # Timed round-robin (every configuration once per round) so that load from other processes
    # on a shared machine spreads evenly over the configurations instead of biasing some.
    clock = time.process_time if args.clock == "process" else time.perf_counter
    times: list[list[float]] = [[] for _ in configs]
    for _ in tqdm(range(args.repeats), desc="timed rounds", leave=False):
        for index, (_, make) in enumerate(configs):
            handle = make() if make is not None else None
            try:
                start = clock()
                call(pipe, args.batch, args.steps, args.scale, args.seed)
                times[index].append(clock() - start)
            finally:
                if handle is not None:
                    handle.detach()
    for row, seconds in zip(rows, times, strict=True):
        row["seconds_per_image"] = statistics.median(seconds) / args.batch
    base = rows[0]
    for row in rows:
        row["evaluations_vs_plain"] = row["evaluations_per_image"] / base["evaluations_per_image"]
        row["time_vs_plain"] = row["seconds_per_image"] / base["seconds_per_image"]
    return rows


def part2(args: argparse.Namespace, pipe: Any, call: Callable[..., Any]) -> list[dict[str, Any]]:
    """Each operator's cost for one step, relative to one denoiser call on the [uncond, cond] batch."""
    module = denoiser_of(pipe)
    captured: dict[str, Any] = {}
    original = module.forward

    def capture(*a: Any, **k: Any) -> Any:
        captured.setdefault("args", (a, k))
        return original(*a, **k)

    module.forward = capture
    try:
        call(pipe, args.batch, 2, max(args.scale, 1.5), args.seed)
    finally:
        del module.forward
    a, k = captured["args"]
    with torch.no_grad():
        denoiser_seconds, out = _median_time(lambda: module(*a, **k), args.op_repeats)
    pred = out[0] if isinstance(out, tuple) else out.sample
    sample = a[0] if a else next(iter(k.values()))
    half = pred.shape[0] // 2
    channels = sample.shape[1]
    uncond, cond = pred[:half, :channels].contiguous(), pred[half:, :channels].contiguous()
    x = sample[half:].contiguous()
    scheduler = pipe.scheduler
    level = noise_level_at(scheduler, scheduler.timesteps[0], 0)
    prediction_type = scheduler_prediction_type(scheduler)
    operators: list[tuple[str, Callable[[], Any]]] = [
        ("CFG", lambda: CFG(args.scale)),
        ("CFG + rescale 0.7", lambda: RescaledCFG(args.scale, 0.7)),
        ("APG paper (x0, momentum, threshold)", lambda: APG(args.scale, momentum=-0.5, norm_threshold=15.0)),
        ("APG diffusers form", lambda: APG(args.scale, eta=1.0, norm_threshold=15.0, convention="diffusers")),
        ("CFG-Zero*", lambda: CFGZeroStar(args.scale)),
        ("beta-CFG", lambda: BetaCFG(args.scale)),
    ]
    if args.new_guiders:
        operators += prediction_guiders(args.scale)
    rows = [
        {
            "operator": "one denoiser call ([uncond, cond])",
            "microseconds": denoiser_seconds * 1e6,
            "vs_denoiser": 1.0,
        }
    ]
    for name, make in tqdm(operators, desc="operators", leave=False):
        guider = make()

        def step(guider: Any = guider) -> Any:
            return guide(
                guider,
                cond,
                uncond,
                step=1,
                num_steps=3,
                sigma=schedule_sigma(level),
                sample=x,
                prediction_type=prediction_type,
                noise_level=level,
            )

        seconds, _ = _median_time(step, args.op_repeats)
        rows.append(
            {"operator": name, "microseconds": seconds * 1e6, "vs_denoiser": seconds / denoiser_seconds}
        )
    seconds, _ = _median_time(lambda: cosine_similarity(cond, uncond), args.op_repeats)
    rows.append(
        {
            "operator": "adaptive: cosine similarity",
            "microseconds": seconds * 1e6,
            "vs_denoiser": seconds / denoiser_seconds,
        }
    )
    rows.append(
        {
            "operator": f"(predictions {tuple(cond.shape)}, {args.threads} thread(s))",
            "microseconds": None,
            "vs_denoiser": None,
        }
    )
    return rows


def sweep_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adaptive = [r for r in rows if r["config"].startswith("adaptive ")]
    thresholds = [float(r["config"].split()[1]) for r in adaptive]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(thresholds, [r["evaluations_vs_plain"] for r in adaptive], "o-", label="evaluations vs plain CFG")
    ax.set_xlabel("adaptive guidance threshold")
    ax.set_ylabel("network evaluations (x plain CFG)")
    ax2 = ax.twinx()
    ax2.plot(thresholds, [r["max_abs_diff_vs_plain"] for r in adaptive], "s--", color="tab:red")
    ax2.set_ylabel("max |latents - plain CFG|", color="tab:red")
    ax.set_title("Adaptive guidance: evaluations saved vs deviation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        if value is None:
            return ""
        return format(value, spec) if spec else str(value)

    cells = [[title for _, title, _ in columns]]
    cells += [[fmt(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", default="sd", choices=["sd", "sdxl", "sd3", "dit", "digits"])
    parser.add_argument("--batch", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--size", type=int, default=64, help="image size for sd/sdxl (latents size/2; sd3 size/2)"
    )
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.999, 0.9999])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--op-repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--new-guiders", action=argparse.BooleanOptionalAction, default=True,
        help="also time TCFG, FDG, MAMBO-G, APG-mix, CFGNorm, Mahiro, FreSca, CFG-Renorm, ICG and TSG",
    )
    parser.add_argument(
        "--perturbed", action=argparse.BooleanOptionalAction, default=True,
        help="also time the perturbation guiders (PAG, SEG, SLG, TPG, S2G; AutoGuidance on digits)",
    )
    parser.add_argument(
        "--clock", choices=["wall", "process"], default="wall",
        help="time per image as wall time, or as this process's CPU time (steadier on a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--json", type=Path, default=None, help="write both tables as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="save the adaptive-threshold sweep as a PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe, call = build(args.pipeline, args.size)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    rows1 = part1(args, pipe, call)
    print(
        f"\n{args.pipeline}: {args.batch} images, {args.steps} steps, scale {args.scale}, size {args.size}\n"
    )
    print(
        table(
            rows1,
            [
                ("config", "configuration", ""),
                ("evaluations_per_image", "evals/image", ".1f"),
                ("evaluations_vs_plain", "x plain", ".2f"),
                ("seconds_per_image", "s/image", ".4f"),
                ("time_vs_plain", "x plain", ".2f"),
                ("max_abs_diff_vs_plain", "max|diff|", ".3g"),
                ("samples_stopped", "stopped", ""),
            ],
        )
    )
    rows2 = part2(args, pipe, call)
    print()
    print(
        table(
            rows2,
            [
                ("operator", "operator (one step)", ""),
                ("microseconds", "us", ".1f"),
                ("vs_denoiser", "x denoiser call", ".4f"),
            ],
        )
    )
    if args.plot is not None:
        sweep_plot(rows1, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "settings": vars(args) | {"json": str(args.json), "plot": str(args.plot)},
                    "evaluations": rows1,
                    "operators": rows2,
                },
                indent=2,
            )
        )
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
