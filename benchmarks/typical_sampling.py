"""Time per call of sort-free typical sampling against transformers' sort-based warpers (and FlashInfer).

For every vocabulary size V and batch B, in one run and on the same logits:

* ``hf_typical``: transformers' ``TypicalLogitsWarper`` (full sort of the vocabulary), the reference;
* ``hf_top_p``: transformers' ``TopPLogitsWarper`` (also a sort), for scale;
* ``ours_torch``: our PyTorch sort-free typical filter (``samplers.kernels.typical_filter`` on CPU,
  its PyTorch path ``samplers.kernels.reference`` on CUDA);
* ``ours_triton``: our Triton typical filter as dispatched (CUDA only), and its two kernels forced:
  ``ours_triton_row`` (one program per row) and ``ours_triton_split`` (rows split across
  programs, ``samplers.kernels.triton_split``; ``--chunks`` sets the chunks per row, default
  ``samplers.kernels.split_chunks`` or at least 2);
* ``hf_cfg_sample``: the unfused pipeline ``cfg_log_probs`` + temperature + ``TypicalLogitsWarper``
  + softmax + ``multinomial`` (what transformers' ``guidance_scale`` + ``typical_p`` does per token);
* ``ours_cfg_sample``: ``samplers.kernels.cfg_typical_sample`` (fused Triton on CUDA, the PyTorch
  path on CPU), with ``_row`` / ``_split`` variants on CUDA; ``ours_sample``: the same without
  guidance (one input, as FlashInfer);
* ``cfg_log_softmax`` / ``ops_cfg_log_probs``: the fused CFG + log-softmax kernel against
  ``guidance.ops.cfg_log_probs`` (CUDA only);
* ``flashinfer_top_p``: FlashInfer's sort-free top-p sampling from probabilities (with the
  softmax), where ``flashinfer`` imports (CUDA only; the JSON says why when it does not).

Prints a table of milliseconds per call and the ratios ``hf_typical / ours_*`` (> 1: ours is
faster) and ``flashinfer_top_p / ours_sample``; ``--json PATH`` writes every number. The default
grid is B in {1, 4, 16, 64, 256} x V in {32000, 128256, 256000} (``--quick``: B in {1, 32},
V in {32000, 128256}). The GPU columns run only on CUDA. Run
``python benchmarks/typical_sampling.py [--device cuda] [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers.generation.logits_process import TopPLogitsWarper, TypicalLogitsWarper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guidance.ops import cfg_log_probs  # noqa: E402
from samplers import kernels  # noqa: E402
from samplers.kernels import reference  # noqa: E402

MASS = 0.9
TOP_P = 0.9
SCALE = 1.5
TEMPERATURE = 0.8


def _timer(
    device: torch.device, budget_s: float, max_repeats: int
) -> Callable[[Callable[[], object]], float]:
    """Median seconds per call: a first call (plus an untimed one on CUDA), then repeats until ``budget_s``."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn: Callable[[], object]) -> float:
        if device.type == "cuda":  # compiles Triton kernels, warms the allocator
            fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - start
        times: list[float] = []
        if first > budget_s:  # too slow to repeat (CPU): this call is the measurement
            return first
        spent = first
        while len(times) < max_repeats and (spent < budget_s or len(times) < 3):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            spent += elapsed
        return statistics.median(times)

    return measure


def _flashinfer_top_p() -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str | None]:
    """FlashInfer's top-p sampler (softmax + ``top_p_sampling_from_probs``), or None and why not."""
    try:
        import flashinfer  # type: ignore[import-not-found]
        import flashinfer.sampling  # type: ignore[import-not-found]  # noqa: F401
    except Exception as error:  # not installed, or no CUDA build
        return None, f"flashinfer not importable: {type(error).__name__}: {error}"[:300]

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        return flashinfer.sampling.top_p_sampling_from_probs(probs, TOP_P)

    return sample, None


def _forced_split(batch: int, vocab: int, device: torch.device, chunks: int | None) -> int:
    """Chunks per row for the forced split kernels: ``--chunks``, else the dispatcher's, at least 2."""
    if chunks:
        return chunks
    return max(2, kernels.split_chunks(batch, vocab, device))


def _time_cell(
    vocab: int,
    batch: int,
    device: torch.device,
    measure: Callable[[Callable[[], object]], float],
    triton_on: bool,
    flashinfer_top_p: Callable[[torch.Tensor], torch.Tensor] | None,
    chunks: int | None,
) -> dict[str, float]:
    generator = torch.Generator(device=device).manual_seed(vocab + batch)
    cond = 2.0 * torch.randn(batch, vocab, device=device, generator=generator)
    uncond = 2.0 * torch.randn(batch, vocab, device=device, generator=generator)
    hf_typical = TypicalLogitsWarper(MASS)
    hf_top_p = TopPLogitsWarper(TOP_P)

    def unfused_cfg_sample() -> torch.Tensor:
        scores = hf_typical(None, cfg_log_probs(cond, uncond, SCALE) / TEMPERATURE)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]

    def ours_cfg_sample() -> torch.Tensor:
        return kernels.cfg_typical_sample(cond, uncond, SCALE, MASS, temperature=TEMPERATURE, seed=0)

    # the public CPU path (with its NaN check); on CUDA the PyTorch path itself
    ours_torch = reference.typical_filter_torch if device.type == "cuda" else kernels.typical_filter
    timings = {
        "hf_typical": measure(lambda: hf_typical(None, cond)),
        "hf_top_p": measure(lambda: hf_top_p(None, cond)),
        "ours_torch": measure(lambda: ours_torch(cond, MASS)),
        "hf_cfg_sample": measure(unfused_cfg_sample),
        "ours_cfg_sample": measure(ours_cfg_sample),
        "ours_sample": measure(lambda: kernels.cfg_typical_sample(cond, None, 1.0, MASS, seed=0)),
    }
    if triton_on:
        timings.update(_time_triton(cond, uncond, measure, _forced_split(batch, vocab, device, chunks)))
    if flashinfer_top_p is not None:
        timings["flashinfer_top_p"] = measure(lambda: flashinfer_top_p(cond))
    return timings


def _time_triton(
    cond: torch.Tensor, uncond: torch.Tensor, measure: Callable[[Callable[[], object]], float], split: int
) -> dict[str, float]:
    """The Triton kernels as dispatched and forced to one program per row / ``split`` per row."""
    from samplers.kernels import triton_kernels

    uniforms = reference.row_uniforms(cond.shape[0], cond.device, seed=0)

    def sample(chunks: int) -> torch.Tensor:
        return triton_kernels.cfg_typical_sample_triton(
            cond, uncond, SCALE, MASS, temperature=TEMPERATURE, min_tokens_to_keep=1, uniforms=uniforms,
            chunks=chunks,
        )  # fmt: skip

    return {
        "ours_triton": measure(lambda: kernels.typical_filter(cond, MASS)),
        "ours_triton_row": measure(lambda: triton_kernels.typical_filter_triton(cond, MASS, chunks=1)),
        "ours_triton_split": measure(lambda: triton_kernels.typical_filter_triton(cond, MASS, chunks=split)),
        "ours_cfg_sample_row": measure(lambda: sample(1)),
        "ours_cfg_sample_split": measure(lambda: sample(split)),
        "cfg_log_softmax": measure(lambda: kernels.cfg_log_softmax(cond, uncond, SCALE)),
        "ops_cfg_log_probs": measure(lambda: cfg_log_probs(cond, uncond, SCALE)),
        "split_chunks": float(split),
    }


def _ratios(timings: dict[str, float]) -> dict[str, float]:
    ratios = {
        "hf_typical/ours_torch": timings["hf_typical"] / timings["ours_torch"],
        "hf_cfg_sample/ours_cfg_sample": timings["hf_cfg_sample"] / timings["ours_cfg_sample"],
    }
    for name in ("ours_triton", "ours_triton_row", "ours_triton_split"):
        if name in timings:
            ratios[f"hf_typical/{name}"] = timings["hf_typical"] / timings[name]
    if "ours_triton" in timings:
        ratios["hf_top_p/ours_triton"] = timings["hf_top_p"] / timings["ours_triton"]
        ratios["ops/cfg_log_softmax"] = timings["ops_cfg_log_probs"] / timings["cfg_log_softmax"]
    if "flashinfer_top_p" in timings:
        ratios["flashinfer_top_p/ours_sample"] = timings["flashinfer_top_p"] / timings["ours_sample"]
        ratios["flashinfer_top_p/ours_cfg_sample"] = timings["flashinfer_top_p"] / timings["ours_cfg_sample"]
    return ratios


def run(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device)
    use_cuda = device.type == "cuda"
    vocab_sizes = [32_000, 128_256] if args.quick else [32_000, 128_256, 256_000]
    batches = [1, 32] if args.quick else [1, 4, 16, 64, 256]
    if args.vocab:
        vocab_sizes = args.vocab
    if args.batch:
        batches = args.batch
    measure = _timer(device, budget_s=args.budget, max_repeats=args.repeats)
    flashinfer_top_p, flashinfer_note = _flashinfer_top_p() if use_cuda else (None, "CPU run: not timed")
    triton_on = use_cuda and kernels.uses_triton(torch.zeros(1, 1, device=device))
    results = []
    cells = [(v, b) for v in vocab_sizes for b in batches]
    for vocab, batch in tqdm(cells, desc="typical sampling benchmark", disable=args.no_progress):
        timings = _time_cell(vocab, batch, device, measure, triton_on, flashinfer_top_p, args.chunks)
        split = timings.pop("split_chunks", None)
        ms = {name: 1e3 * seconds for name, seconds in timings.items()}
        results.append(
            {"vocab": vocab, "batch": batch, "split_chunks": split, "ms": ms, "ratios": _ratios(timings)}
        )
    meta = {
        "device": torch.cuda.get_device_name(device)
        if use_cuda
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "flashinfer": _version("flashinfer") if use_cuda else None,
        "flashinfer_note": flashinfer_note,
        "torch_threads": torch.get_num_threads(),
        "kernel_config": _kernel_config() if triton_on else None,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "mass": MASS,
        "top_p": TOP_P,
        "guidance_scale": SCALE,
        "temperature": TEMPERATURE,
        "logits": "2 * N(0, 1), float32",
        "timing": f"median of up to {args.repeats} calls or {args.budget} s after a first call (untimed warm-up on CUDA)",
    }
    return {"meta": meta, "results": results}


def _kernel_config() -> dict[str, dict[str, int]]:
    from samplers.kernels import triton_kernels, triton_split

    row = ("BLOCK", "SEARCH_BLOCK", "PIVOTS", "NUM_WARPS")
    split = ("TILE", "SEARCH_TILE", "K", "NPASS", "NUM_WARPS")
    return {
        "row": {name: getattr(triton_kernels, name) for name in row},
        "split": {name: getattr(triton_split, name) for name in split},
    }


def _version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:
        return None
    return getattr(module, "__version__", "?")


def format_table(report: dict[str, object]) -> str:
    results = report["results"]
    methods = [
        m
        for m in (
            "hf_typical", "hf_top_p", "ours_torch", "ours_triton", "ours_triton_row", "ours_triton_split",
            "hf_cfg_sample", "ours_cfg_sample", "ours_cfg_sample_row", "ours_cfg_sample_split", "ours_sample",
            "ops_cfg_log_probs", "cfg_log_softmax", "flashinfer_top_p",
        )
        if any(m in r["ms"] for r in results)
    ]  # fmt: skip
    ratio_names = sorted(
        {name for r in results for name in r["ratios"]}, key=lambda n: (not n.startswith("hf_typ"), n)
    )
    header = ["V", "B"] + [f"{m} ms" for m in methods] + ratio_names
    rows = [header]
    for r in results:
        rows.append(
            [str(r["vocab"]), str(r["batch"])]
            + [f"{r['ms'][m]:.3f}" if m in r["ms"] else "-" for m in methods]
            + [f"{r['ratios'][n]:.2f}x" if n in r["ratios"] else "-" for n in ratio_names]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    meta = report["meta"]
    title = (
        f"device: {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"triton {meta['triton']}, {meta['torch_threads']} torch threads; typical_p={meta['mass']}, top_p={meta['top_p']}"
    )
    note = f"\nflashinfer: {meta['flashinfer_note']}" if meta.get("flashinfer_note") else ""
    return title + "\n" + "\n".join(lines) + note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="V in {32000, 128256}, B in {1, 32}")
    parser.add_argument("--chunks", type=int, help="chunks per row of the forced split kernels (CUDA)")
    parser.add_argument("--vocab", type=int, nargs="*", help="override the vocabulary sizes")
    parser.add_argument("--batch", type=int, nargs="*", help="override the batch sizes")
    parser.add_argument("--repeats", type=int, default=20, help="at most this many timed calls per cell")
    parser.add_argument(
        "--budget", type=float, default=1.0, help="seconds of timed calls per method and cell"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
