"""One rank of a CFG-parallel test run, launched by tests/test_cfg_parallel.py as torchrun would.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/cfg_parallel_worker.py OUT JOB

The process group is never initialised here: ``attach(..., parallel="cfg")`` does it from the
torchrun variables, as in a user's unchanged script. Results go to ``OUT/rank{r}.safetensors``
(latents by scenario) and ``OUT/rank{r}.json`` (errors by scenario, group, timings, failures).

Jobs:

* ``main`` (2 ranks): every scenario, the row split, errors that must leave the group usable;
  last, rank 1 stalls at its third denoiser call of a run whose timeout is 3 s.
* ``three`` (3 ranks): Perp-Neg with one branch per rank, rows on 3 ranks, a group too large for
  CFG; last, rank 2 kills itself at its third denoiser call.

Each rank writes its results before the failure part, and its JSON again after it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import cfg_parallel_scenarios as scenarios  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from guidance.diffusion import attach  # noqa: E402
from guidance.diffusion.parallel import DistributedEvaluator  # noqa: E402
from guidance.guiders import CFG  # noqa: E402

RANK = int(os.environ["RANK"])
ROWS_SCENARIOS = ("digits_interval", "digits_adaptive", "digits_perp_neg", "digits_tpg", "sd_zero_star")
STALL_SECONDS = 6.0


class Unsplittable(CFG):
    splittable = False


def at_call(module: torch.nn.Module, number: int, action) -> object:
    """Run ``action()`` before the ``number``-th forward call of ``module`` (1-based).

    Hook a submodule of the denoiser (``unet.conv_in``), not the denoiser itself: the
    denoiser's own pre-hooks run before the guidance wrapper, outside the branch evaluation.
    """
    calls = {"n": 0}

    def pre_hook(*_):
        calls["n"] += 1
        if calls["n"] == number:
            action()

    return module.register_forward_pre_hook(pre_hook)


def expect_error(errors: dict, name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the test to check
        errors[name] = [type(exc).__name__, str(exc)]
    else:
        errors[name] = None


def inject_failure() -> None:
    raise RuntimeError("injected failure on rank 1")


def unsplittable() -> None:
    with attach(scenarios.pipe_of("digits"), Unsplittable(3.0), parallel="cfg"):
        pass


def main_job(results: dict, errors: dict, info: dict) -> None:
    for name in scenarios.SCENARIOS:
        results[name] = scenarios.run(name, parallel="cfg")
        if name == "digits_cfg":
            handle = scenarios.run.last_handle
            info["group"] = handle.evaluator.group.source
            info["is_main_process"] = handle.evaluator.is_main_process
            info["timings"] = vars(handle.evaluator.timings)
            info["stats"] = handle.stats.branch_rows
    for name in ROWS_SCENARIOS:
        results[f"{name}@rows"] = scenarios.run(name, parallel=DistributedEvaluator(balance="rows"))
    reused = DistributedEvaluator()  # attached twice; rank 1 idles at step 0 both times
    for _ in range(2):
        results["digits_zero_star@reused"] = scenarios.run("digits_zero_star", parallel=reused)
    expect_error(errors, "unguided", lambda: scenarios.run_unguided_digits(parallel="cfg"))
    expect_error(errors, "seed_mismatch", lambda: scenarios.run("digits_cfg", seed=RANK, parallel="cfg"))
    expect_error(
        errors, "both_arguments", lambda: scenarios.run("digits_cfg", parallel="cfg", evaluator="separate")
    )
    expect_error(errors, "not_splittable", unsplittable)
    unet = scenarios.pipe_of("digits").unet
    hook = at_call(unet.conv_in, 2, inject_failure) if RANK == 1 else None
    expect_error(errors, "rank_error", lambda: scenarios.run("digits_cfg", parallel="cfg"))
    if hook is not None:
        hook.remove()
    results["digits_cfg_after_errors"] = scenarios.run("digits_cfg", parallel="cfg")


def three_job(results: dict, errors: dict, info: dict) -> None:
    results["digits_perp_neg"] = scenarios.run("digits_perp_neg", parallel="cfg")
    results["digits_interval@rows"] = scenarios.run(
        "digits_interval", parallel=DistributedEvaluator(balance="rows")
    )
    expect_error(errors, "wrong_size", lambda: scenarios.run("digits_cfg", parallel="cfg"))


def failure(job: str, out: Path, errors: dict, info: dict) -> None:
    """``main``: rank 1 stalls (the others' 3 s timeout fires); ``three``: rank 2 is killed."""
    victim = 1 if job == "main" else 2
    if RANK == victim:

        def act():
            (out / f"rank{RANK}.failed").write_text(repr(time.time()))
            if job == "main":
                time.sleep(STALL_SECONDS)
            else:
                os.kill(os.getpid(), signal.SIGKILL)

        at_call(scenarios.pipe_of("digits").unet.conv_in, 3, act)
    name, timeout = ("digits_cfg", 3.0) if job == "main" else ("digits_perp_neg", 300.0)
    expect_error(
        errors, "failure", lambda: scenarios.run(name, parallel=DistributedEvaluator(timeout=timeout))
    )
    info["failed_at"] = time.time()


def main() -> None:
    out, job = Path(sys.argv[1]), sys.argv[2]
    results: dict[str, torch.Tensor] = {}
    errors: dict[str, list[str] | None] = {}
    info: dict = {"rank": RANK, "world_size": int(os.environ["WORLD_SIZE"])}
    {"main": main_job, "three": three_job}[job](results, errors, info)
    save_file({k: v.contiguous() for k, v in results.items()}, str(out / f"rank{RANK}.safetensors"))
    report = out / f"rank{RANK}.json"
    report.write_text(json.dumps({"errors": errors, "info": info}))
    failure(job, out, errors, info)
    report.write_text(json.dumps({"errors": errors, "info": info}))


if __name__ == "__main__":
    main()
