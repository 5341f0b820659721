"""CFG-parallel sampling (``attach(..., parallel="cfg")``) on 2 and 3 CPU ranks over gloo.

The ranks are real processes started the way torchrun starts them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), running tests/cfg_parallel_worker.py, which never touches
``torch.distributed`` itself. Every scenario's images must be identical on every rank,
bit-identical to the single-process run that evaluates each branch in a call of its own
(``evaluator="separate"``, what one branch per rank computes), and within 1e-5 (relative to the
largest value) of the default batched run. Errors must come before the first step or on every
rank at once; a rank that dies or stalls must make the others fail within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import guidance

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cfg_parallel_scenarios as scenarios  # noqa: E402

from guidance.diffusion import attach  # noqa: E402
from guidance.diffusion.parallel import (  # noqa: E402
    DistributedEvaluator,
    SimulatedEvaluator,
    max_branches,
    plan,
)
from guidance.guiders import APG, CFG, PerpNeg  # noqa: E402

WORKER = Path(__file__).resolve().parent / "cfg_parallel_worker.py"
ROOT = Path(guidance.__file__).resolve().parent.parent
RELATIVE = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(job: str, world_size: int, out: Path) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "PYTHONFAULTHANDLER": "1",
        }
        log = open(out / f"log{rank}", "w")  # noqa: SIM115 - closed when the process is reaped
        processes.append(
            subprocess.Popen([sys.executable, str(WORKER), str(out), job], env=env, stdout=log, stderr=log)
        )
        log.close()
    return processes


def _wait(processes: list[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise


def _log(out: Path, rank: int) -> str:
    return (out / f"log{rank}").read_text()


def _results(out: Path, world_size: int):
    from safetensors.torch import load_file

    return [
        (load_file(str(out / f"rank{r}.safetensors")), json.loads((out / f"rank{r}.json").read_text()))
        for r in range(world_size)
    ]


class Ranks(list):
    """Every rank's ``(latents by scenario, JSON report)``, and the folder they came from."""

    def __init__(self, results, out: Path):
        super().__init__(results)
        self.out = out


def _finished(out: Path, rank: int) -> bool:
    """Whether ``rank`` wrote its final report (the worker's last act before exiting)."""
    report = out / f"rank{rank}.json"
    return report.exists() and "failed_at" in json.loads(report.read_text())["info"]


def _job(job: str, world_size: int, out: Path, killed: tuple[int, ...] = (), seconds: float = 600) -> Ranks:
    """Run ``job`` on ``world_size`` ranks; every rank must exit 0, except those in ``killed``.

    One tolerance: a rank whose peer died may be aborted while the process exits
    (``terminate called without an active exception``, from gloo; torch 2.13, 2 runs of about
    70 on CPU, one of them in CI, not reproduced with bare ``torch.distributed`` calls). It is
    accepted only after the rank wrote its final report, when nothing of ours is left to run,
    and it warns. The workers run with ``PYTHONFAULTHANDLER=1``, so the log shows where it happened.
    """
    processes = _start(job, world_size, out)
    _wait(processes, seconds)
    for rank, process in enumerate(processes):
        code, log = process.returncode, _log(out, rank)
        if rank in killed:
            assert code == -signal.SIGKILL, f"rank {rank} exited {code}:\n{log[-4000:]}"
        elif code == -signal.SIGABRT and _finished(out, rank) and "terminate called" in log:
            warnings.warn(f"{job}: rank {rank} finished, then gloo aborted its exit: {log[-300:]}", stacklevel=1)
        else:
            assert code == 0, f"rank {rank} exited {code}:\n{log[-4000:]}"
    return Ranks(_results(out, world_size), out)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# ------------------------------------------------------------------------------ single process
def test_plan_gives_every_row_to_exactly_one_rank():
    for sizes in ([2, 2], [4], [4, 3], [1, 1, 1], [3, 2, 3], [5, 1, 2, 2]):
        for world in (1, 2, 3, 4):
            for balance in ("branches", "rows"):
                layout = plan(sizes, world, balance)
                assert len(layout) == world
                seen = sorted(
                    (c.request, row) for rank in layout for c in rank for row in range(c.start, c.stop)
                )
                assert seen == [(i, row) for i, n in enumerate(sizes) for row in range(n)]
                loads = [sum(c.rows for c in rank) for rank in layout]
                if balance == "rows":
                    assert max(loads) - min(loads) <= 1
                else:
                    assert all(c.rows == sizes[c.request] for rank in layout for c in rank)
                    assert [[c.request for c in rank] for rank in layout] == [
                        list(range(r, len(sizes), world)) for r in range(world)
                    ]
    # Hooked requests stay whole on their home rank; the others' rows even out the loads.
    layout = plan([4, 4, 4], 2, "rows", homes=[0, 1, 0], whole=[False, False, True])
    assert [[(c.request, c.start, c.stop) for c in rank] for rank in layout] == [
        [(0, 0, 2), (2, 0, 4)],
        [(0, 2, 4), (1, 0, 4)],
    ]
    layout = plan([1, 1, 5], 3, "rows", homes=[0, 1, 2], whole=[False, False, True])
    assert [sum(c.rows for c in rank) for rank in layout] == [1, 1, 5]
    layout = plan([3, 3, 3], 2, "branches", homes=[1, 0, 1])
    assert [[c.request for c in rank] for rank in layout] == [[1], [0, 2]]
    with pytest.raises(ValueError, match="homes"):
        plan([2, 2], 2, homes=[0, 2])
    with pytest.raises(ValueError, match="balance"):
        plan([2], 2, "even")
    with pytest.raises(ValueError, match="world_size"):
        plan([2], 0)
    with pytest.raises(ValueError, match=r"`sizes\[0\]` must be an integer in \[1, inf\]"):
        plan([0], 2)
    with pytest.raises(TypeError, match="`world_size` must be an integer"):
        plan([2], 2.0)
    with pytest.raises(TypeError, match=r"`sizes\[1\]` must be an integer"):
        plan([2, True], 2)


def test_a_branch_keeps_its_home_rank_when_others_come_and_go():
    # TPG reseeds its permutation from a per-hook call counter, kept by each rank's own copy of the
    # hook. At step 0 (CFG off) the branches are [cond, perturbed], afterwards [uncond, cond,
    # perturbed]: by position modulo 2 the perturbed branch would move from rank 1 to rank 0 and
    # use rank 0's stale counter (the distributed scenario digits_tpg checks the images).
    evaluator = SimulatedEvaluator(2)
    separate = scenarios.run("digits_tpg", evaluator="separate")
    assert torch.equal(scenarios.run("digits_tpg", evaluator=evaluator), separate)
    assert evaluator._homes.ranks == {"cond": 0, "perturbed": 1, "uncond": 0}


def test_simulated_two_ranks_are_the_separate_evaluator_bit_for_bit():
    separate = scenarios.run("digits_perp_neg", evaluator="separate")
    assert torch.equal(scenarios.run("digits_perp_neg", evaluator=SimulatedEvaluator(2)), separate)
    rows = scenarios.run("digits_interval", evaluator=SimulatedEvaluator(2, "rows"))
    assert _close(rows, scenarios.run("digits_interval")) < RELATIVE


def test_a_hook_that_cannot_run_split_is_rejected():
    with pytest.raises(ValueError, match="splittable = False"):
        scenarios.run(
            "digits_skip_layer", evaluator=SimulatedEvaluator(2), guider=scenarios.SkipLayerCFG(3.0, False)
        )


def test_parallel_arguments_are_checked_before_any_process_group():
    pipe = scenarios.pipe_of("digits")
    with pytest.raises(ValueError, match="`parallel` must be one of"):
        attach(pipe, CFG(3.0), parallel="tensor")
    with pytest.raises(TypeError, match="`parallel` must be 'cfg' or a DistributedEvaluator"):
        attach(pipe, CFG(3.0), parallel=2)
    with pytest.raises(ValueError, match="balance"):
        DistributedEvaluator(balance="columns")
    with pytest.raises(ValueError, match=r"`timeout` must be a number in \(0.0, inf\]"):
        DistributedEvaluator(timeout=0)
    with pytest.raises(TypeError, match="`timeout` must be a real number"):
        DistributedEvaluator(timeout="60")
    assert getattr(pipe, "_guidance_handle", None) is None


def test_without_torchrun_attach_explains_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        attach(scenarios.pipe_of("digits"), APG(5.0), parallel="cfg")
    assert not dist.is_initialized()


def test_a_group_of_one_is_rejected_and_the_evaluator_exchanges_through_it():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pipe = scenarios.pipe_of("digits")
        with pytest.raises(ValueError, match="at least 2 processes"):
            attach(pipe, CFG(3.0), parallel=DistributedEvaluator(group=dist.group.WORLD))
        # The whole exchange protocol on one rank: the same result as one call per branch.
        evaluator = DistributedEvaluator(group=dist.group.WORLD, balance="rows")
        evaluator.connect(torch.device("cpu"))
        assert (evaluator.rank, evaluator.world_size, evaluator.is_main_process) == (0, 1, True)
        separate = scenarios.run("digits_adaptive", evaluator="separate")
        assert torch.equal(scenarios.run("digits_adaptive", evaluator=evaluator), separate)
        assert evaluator.timings.calls == scenarios.DIGIT_STEPS
        assert evaluator.timings.bytes > 0
    finally:
        dist.destroy_process_group()


def test_the_largest_group_follows_the_guider():
    assert max_branches(CFG(3.0), "guide") == 2
    assert max_branches(PerpNeg(3.0), "guide") == 3
    assert max_branches(PerpNeg(3.0), "cfgpp") == 2


# ------------------------------------------------------------------------------ two ranks
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _job("main", 2, tmp_path_factory.mktemp("cfg-parallel-main"))


@pytest.mark.distributed
def test_two_ranks_return_identical_images(two_ranks):
    (first, _), (second, _) = two_ranks
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_one_branch_per_rank_is_bit_identical_to_separate_calls(two_ranks, name):
    parallel = two_ranks[0][0][name]
    assert torch.equal(parallel, scenarios.run(name, evaluator="separate"))
    assert _close(parallel, scenarios.run(name)) < RELATIVE


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["digits_interval", "digits_adaptive", "digits_perp_neg", "digits_tpg", "sd_zero_star"]
)
def test_rows_split_equals_its_single_process_simulation(two_ranks, name):
    parallel = two_ranks[0][0][f"{name}@rows"]
    assert torch.equal(parallel, scenarios.run(name, evaluator=SimulatedEvaluator(2, "rows")))
    assert _close(parallel, scenarios.run(name)) < RELATIVE


@pytest.mark.distributed
def test_an_evaluator_attached_twice_gives_the_same_images(two_ranks):
    (results, _), (other, _) = two_ranks
    assert torch.equal(results["digits_zero_star@reused"], results["digits_zero_star"])
    assert torch.equal(other["digits_zero_star@reused"], results["digits_zero_star"])


@pytest.mark.distributed
def test_the_group_comes_from_the_torchrun_environment(two_ranks):
    (_, info0), (_, info1) = two_ranks
    assert info0["info"]["group"] == info1["info"]["group"] == "torchrun"
    assert (info0["info"]["is_main_process"], info1["info"]["is_main_process"]) == (True, False)
    timings = info0["info"]["timings"]
    assert timings["calls"] == scenarios.DIGIT_STEPS
    rows = len(scenarios.DIGIT_LABELS)
    assert timings["bytes"] == scenarios.DIGIT_STEPS * rows * 64 * 4  # one branch of 8x8 float32 per step
    assert info0["info"]["stats"] == {
        "uncond": rows * scenarios.DIGIT_STEPS,
        "cond": rows * scenarios.DIGIT_STEPS,
    }


@pytest.mark.distributed
def test_errors_are_raised_on_every_rank_and_leave_the_group_usable(two_ranks):
    (results, info0), (_, info1) = two_ranks
    errors0, errors1 = info0["errors"], info1["errors"]
    for name in ("unguided", "both_arguments", "not_splittable"):
        assert errors0[name] == errors1[name] and errors0[name][0] == "ValueError", name
    assert "not doing classifier-free guidance" in errors0["unguided"][1]
    assert "splittable = False" in errors0["not_splittable"][1]
    assert errors0["seed_mismatch"][0] == errors1["seed_mismatch"][0] == "ParallelError"
    assert "the same seed" in errors0["seed_mismatch"][1]
    assert errors0["rank_error"] == ["ParallelError", errors0["rank_error"][1]]
    assert "rank 1 raised an exception" in errors0["rank_error"][1]
    assert errors1["rank_error"] == ["RuntimeError", "injected failure on rank 1"]
    assert torch.equal(results["digits_cfg_after_errors"], results["digits_cfg"])


# ------------------------------------------------------------------------------ three ranks
@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _job("three", 3, tmp_path_factory.mktemp("cfg-parallel-three"), killed=(2,))


@pytest.mark.distributed
def test_three_ranks_perp_neg_and_rows(three_ranks):
    outputs = [results for results, _ in three_ranks]  # rank 2 wrote them before it was killed
    for name in outputs[0]:
        assert all(torch.equal(outputs[0][name], other[name]) for other in outputs[1:]), name
    assert torch.equal(outputs[0]["digits_perp_neg"], scenarios.run("digits_perp_neg", evaluator="separate"))
    expected = scenarios.run("digits_interval", evaluator=SimulatedEvaluator(3, "rows"))
    assert torch.equal(outputs[0]["digits_interval@rows"], expected)
    kind, message = three_ranks[0][1]["errors"]["wrong_size"]
    assert kind == "ValueError" and "at most 2 branches" in message and "balance='rows'" in message


# ------------------------------------------------------------------------------ failures
def _failure(out: Path, victim: int, info: dict) -> float:
    """Seconds between the victim rank's death or stall and this rank giving up."""
    return info["info"]["failed_at"] - float((out / f"rank{victim}.failed").read_text())


@pytest.mark.distributed
def test_a_killed_rank_makes_the_others_fail_fast(three_ranks):
    out = three_ranks.out
    for rank in (0, 1):
        kind, message = three_ranks[rank][1]["errors"]["failure"]
        assert kind == "ParallelError", message
        assert f"exchanging the headers of call 3 failed on rank {rank} of 3" in message
        assert "exited or stalled" in message
        assert 0 <= _failure(out, 2, three_ranks[rank][1]) < 10


@pytest.mark.distributed
def test_a_stalled_rank_times_out(two_ranks):
    kind, message = two_ranks[0][1]["errors"]["failure"]
    assert kind == "ParallelError" and "timeout (3 s)" in message, message
    assert 2.5 < _failure(two_ranks.out, 1, two_ranks[0][1]) < 15
    kind, message = two_ranks[1][1]["errors"]["failure"]  # the stalled rank finds its peer gone
    assert kind == "ParallelError", message
