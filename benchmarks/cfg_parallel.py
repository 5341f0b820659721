"""CFG-parallel: time per image on one process vs the two branches on two processes (gloo, CPU).

    python benchmarks/cfg_parallel.py                       # digits, batches 4 and 64, 25 steps
    python benchmarks/cfg_parallel.py --batches 8 --steps 10 --repeats 3 --json /tmp/quick.json

The script is its own launcher: it times the single-process runs (one thread: the pipeline's
batched CFG, and one call per branch; two threads: batched CFG), then starts two copies of
itself as torchrun would (one thread each, one core per rank) that run
``attach(pipe, CFG(scale), parallel="cfg")``. For each it reports the median wall time per
image over ``--repeats`` runs after one warm-up, the speed-up over the single-process
one-thread batched run, and on the ranks where a step's time goes: their own denoiser calls,
the exchange (two all-gathers and the wait for the slower rank inside them), and a bare
all-gather of the same payload timed alone (the communication cost without the waiting). The
images of every mode are compared with the single-process ``evaluator="separate"`` run
(``max |diff|``; 0 means bit-identical).

The machine this runs on may be shared: medians over repeats, and the spread (min..max) is
printed so that noisy numbers are visible. Writes a table and JSON (default
``benchmarks/results/cfg_parallel_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from guidance.diffusion import attach  # noqa: E402
from guidance.guiders import CFG  # noqa: E402

SCALE = 3.0


def _pipe():
    from guidance.models.digits import load_digits_pipeline

    return load_digits_pipeline("ddim")


def _sample(pipe, batch: int, steps: int) -> torch.Tensor:
    labels = [i % 10 for i in range(batch)]
    return pipe(
        labels,
        guidance_scale=2.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def _timed(fn, repeats: int) -> tuple[list[float], torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return times, out


def _summary(times: list[float], batch: int) -> dict:
    return {
        "ms_per_image": 1e3 * statistics.median(times) / batch,
        "ms_per_image_min": 1e3 * min(times) / batch,
        "ms_per_image_max": 1e3 * max(times) / batch,
    }


# ------------------------------------------------------------------------------ one rank
def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    pipe = _pipe()
    rank = int(os.environ["RANK"])
    report = {}
    for batch in args.batches:
        with attach(pipe, CFG(SCALE), parallel="cfg") as handle:
            evaluator = handle.evaluator
            times, out = _timed(lambda b=batch: _sample(pipe, b, args.steps), args.repeats)
            timings = evaluator.timings
            calls = timings.calls
            report[str(batch)] = {
                **_summary(times, batch),
                "evaluate_ms_per_step": 1e3 * timings.evaluate_s / calls,
                "exchange_ms_per_step": 1e3 * timings.exchange_s / calls,
                "step_ms": 1e3 * statistics.median(times) / args.steps,
                "bare_all_gather_ms": _bare_all_gather(evaluator, timings.bytes // calls),
                "latents": out.flatten().tolist() if rank == 0 else None,
            }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))


def _bare_all_gather(evaluator, nbytes: int, repeats: int = 200) -> float:
    """Milliseconds per all-gather of ``nbytes`` per rank on the evaluator's group, alone."""
    group = evaluator.group
    payload = torch.zeros(nbytes, dtype=torch.uint8)
    parts = [torch.empty_like(payload) for _ in range(group.world_size)]
    torch.distributed.barrier(group=group.group)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.distributed.all_gather(parts, payload, group=group.group)
    return 1e3 * (time.perf_counter() - started) / repeats


# ------------------------------------------------------------------------------ launcher
def single_process(args: argparse.Namespace) -> dict:
    pipe = _pipe()
    results: dict = {}
    for batch in args.batches:
        rows = {}
        for name, threads, evaluator in (
            ("1 process, 1 thread, batched", 1, "batched"),
            ("1 process, 1 thread, separate", 1, "separate"),
            ("1 process, 2 threads, batched", 2, "batched"),
        ):
            torch.set_num_threads(threads)
            with attach(pipe, CFG(SCALE), evaluator=evaluator):
                times, out = _timed(lambda b=batch: _sample(pipe, b, args.steps), args.repeats)
            rows[name] = {**_summary(times, batch), "latents": out}
        results[batch] = rows
    torch.set_num_threads(1)
    return results


def launch(args: argparse.Namespace, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, __file__, "--worker", "--out", str(out), "--steps", str(args.steps)]
    command += ["--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
        processes.append(subprocess.Popen(command, env=env))
    for process in processes:
        if process.wait(timeout=3600) != 0:
            raise SystemExit(f"a rank failed (exit {process.returncode})")
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)}


def table(args: argparse.Namespace, single: dict, ranks: dict) -> list[dict]:
    rows = []
    for batch in args.batches:
        reference = single[batch]["1 process, 1 thread, separate"]["latents"]
        base = single[batch]["1 process, 1 thread, batched"]["ms_per_image"]
        for name, row in single[batch].items():
            diff = float((row.pop("latents") - reference).abs().max())
            rows.append({"batch": batch, "mode": name, **row, "max_abs_diff_vs_separate": diff})
        r0, r1 = ranks[0][str(batch)], ranks[1][str(batch)]
        latents = torch.tensor(r0.pop("latents")).reshape(reference.shape)
        r1.pop("latents")
        exchange = statistics.mean([r0["exchange_ms_per_step"], r1["exchange_ms_per_step"]])
        evaluate = statistics.mean([r0["evaluate_ms_per_step"], r1["evaluate_ms_per_step"]])
        rows.append(
            {
                "batch": batch,
                "mode": "2 ranks (parallel='cfg'), 1 thread each",
                **{k: r0[k] for k in ("ms_per_image", "ms_per_image_min", "ms_per_image_max")},
                "max_abs_diff_vs_separate": float((latents - reference).abs().max()),
                "step_ms": r0["step_ms"],
                "evaluate_ms_per_step": evaluate,
                "exchange_ms_per_step": exchange,
                "exchange_share": exchange / (evaluate + exchange),
                "bare_all_gather_ms": statistics.mean([r0["bare_all_gather_ms"], r1["bare_all_gather_ms"]]),
            }
        )
        for row in rows[-4:]:
            row["speedup_vs_1_thread_batched"] = base / row["ms_per_image"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cfg_parallel_cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    single = single_process(args)
    with tempfile.TemporaryDirectory() as folder:
        ranks = launch(args, Path(folder))
    rows = table(args, single, ranks)
    print(f"\ndigits pipeline, DDIM {args.steps} steps, CFG({SCALE}), median of {args.repeats} runs")
    print(
        f"{'batch':>5} | {'mode':<40} | {'ms/image':>8} | {'min..max':>17} | {'speed-up':>8} | "
        f"{'exchange/step':>13} | {'share':>5} | {'bare gather':>11} | {'max|diff|':>9}"
    )
    for row in rows:
        exchange = f"{row['exchange_ms_per_step']:.3f} ms" if "exchange_ms_per_step" in row else "-"
        share = f"{100 * row['exchange_share']:.0f}%" if "exchange_share" in row else "-"
        bare = f"{row['bare_all_gather_ms']:.3f} ms" if "bare_all_gather_ms" in row else "-"
        print(
            f"{row['batch']:>5} | {row['mode']:<40} | {row['ms_per_image']:>8.2f} | "
            f"{row['ms_per_image_min']:>8.2f}..{row['ms_per_image_max']:<7.2f} | "
            f"{row['speedup_vs_1_thread_batched']:>7.2f}x | {exchange:>13} | {share:>5} | {bare:>11} | "
            f"{row['max_abs_diff_vs_separate']:>9.1e}"
        )
    meta = {
        "pipeline": "digits",
        "steps": args.steps,
        "repeats": args.repeats,
        "scale": SCALE,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
