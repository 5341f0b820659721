"""CFG-parallel sampling: a guider's branches on separate processes, one per device.

With guidance on, every step evaluates the denoiser on two branches (three for Perp-Neg). Under
``torchrun --nproc-per-node 2 script.py``, ``attach(pipe, guider, parallel="cfg")`` gives each
rank of the process group its share of every step's branches: rank ``r`` evaluates its part,
an all-gather brings every prediction to every rank, and each rank combines them with the
guider and steps the scheduler itself. All ranks hold the same latents at every step, so every
rank returns the same images.

:class:`DistributedEvaluator` is that strategy, a
:class:`~guidance.diffusion.branches.BranchEvaluator`: the guiders, schedules, adaptive
guidance and the denoiser wrapper are the same as in a single process. Who evaluates what is
:func:`plan`, a pure function of the step's requests (the same on every rank). Each branch has
a home rank for as long as it is attached: branch names in the order they first appear
(``uncond``, ``cond``, then the extra ones), modulo the group size. A branch never moves, so a
hook that keeps state from call to call (TPG's permutations, S^2-Guidance's random blocks)
advances exactly as in one process.

* ``balance="branches"`` (default): every branch whole on its home rank, each in a call of its
  own. The images are bit-identical to the single-process run with
  ``attach(..., evaluator="separate")``. Where a step needs fewer branches than there are ranks
  (a guidance interval, CFG-Zero*'s zero-init steps, a schedule at scale 1, or adaptive
  guidance retiring every sample) the ranks left without a branch idle for that step.
* ``balance="rows"``: hooked branches stay whole on their home rank; the rows of the other
  branches are spread so that the ranks' loads differ by as little as possible, so a step with
  only the conditional branch is split by batch rows, and more ranks than branches are useful.
  Equal to the single-process run within float32 noise (kernels differ in their last bits
  between batch sizes), and bit-identical to :class:`SimulatedEvaluator` with the same
  ``world_size``.

Every step the ranks also exchange a small header: the call's index, a digest of the plan and
an exact digest of the denoiser's inputs (latents, embeddings, labels, timestep). Ranks that
disagree (a different seed, prompt or batch size on one rank) stop with a :class:`ParallelError`
at the first step where they differ instead of producing mixed images; a rank whose evaluation
raises makes every rank raise. A rank that exits makes the others' exchange fail with
:class:`ParallelError`; one that stalls does so after ``timeout`` seconds.

Example (single process: the plan, and the one-process equivalent of two ranks):
    >>> from guidance.diffusion.parallel import plan
    >>> [[(c.request, c.start, c.stop) for c in rank] for rank in plan([2, 2, 2], 2)]
    [[(0, 0, 2), (2, 0, 2)], [(1, 0, 2)]]
    >>> [[(c.request, c.start, c.stop) for c in rank] for rank in plan([4], 2, "rows")]
    [[(0, 0, 2)], [(0, 2, 4)]]
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from guidance.diffusion.branches import BranchRequest
from guidance.diffusion.distributed import Exchange, Group, ParallelError, connect, is_main_process
from guidance.validation import check_choice, check_int, check_range, is_real_number

__all__ = [
    "BALANCES",
    "Chunk",
    "plan",
    "DistributedEvaluator",
    "SimulatedEvaluator",
    "ParallelTimings",
    "ParallelError",
    "is_main_process",
    "parallel_evaluator",
]

BALANCES = ("branches", "rows")
PARALLEL_MODES = ("cfg",)
DEFAULT_TIMEOUT = 300.0
_MAGIC = 0x43464750  # "CFGP"
_MAX_DIMS = 7
_HEADER = 9 + _MAX_DIMS
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64)


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of request number ``request``, evaluated by one rank in one call."""

    request: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan(
    sizes: Sequence[int],
    world_size: int,
    balance: str = "branches",
    homes: Sequence[int] | None = None,
    whole: Sequence[bool] | None = None,
) -> list[list[Chunk]]:
    """Who evaluates what: for every rank, the chunks of the step's requests it runs (in request order).

    Args:
        sizes (Sequence[int]): rows of each request, in request order (each >= 1).
        world_size (int): the number of ranks (>= 1).
        balance (str): ``"branches"``: request ``i`` whole on rank ``homes[i]``. ``"rows"``: the
            requests marked ``whole`` on their home rank, and the rows of the others (one after the
            other) cut into consecutive pieces that even out the ranks' loads (at most one row
            apart where the whole requests allow it; lower ranks first).
        homes (Sequence[int] | None): each request's rank in ``[0, world_size)``; default ``i % world_size``.
        whole (Sequence[bool] | None): requests that must not be split (hooked branches, whose hooks
            may keep state per call); default none.
    """
    check_choice(balance, "balance", BALANCES)
    world_size = check_int(world_size, "world_size", minimum=1)
    sizes = [check_int(n, f"sizes[{i}]", minimum=1) for i, n in enumerate(sizes)]
    homes = [i % world_size for i in range(len(sizes))] if homes is None else list(homes)
    whole = [False] * len(sizes) if whole is None else list(whole)
    if len(homes) != len(sizes) or any(not 0 <= h < world_size for h in homes) or len(whole) != len(sizes):
        raise ValueError(f"`homes` must give each of the {len(sizes)} requests a rank in [0, {world_size}).")
    layout: list[list[Chunk]] = [[] for _ in range(world_size)]
    fixed = range(len(sizes)) if balance == "branches" else [i for i in range(len(sizes)) if whole[i]]
    for i in fixed:
        layout[homes[i]].append(Chunk(i, 0, sizes[i]))
    if balance == "rows":
        _spread_rows(sizes, [i for i in range(len(sizes)) if not whole[i]], layout)
    return [sorted(chunks, key=lambda c: (c.request, c.start)) for chunks in layout]


def _spread_rows(sizes: Sequence[int], free: list[int], layout: list[list[Chunk]]) -> None:
    """Add the rows of the ``free`` requests to ``layout``, one row at a time to the least loaded rank."""
    loads = [sum(c.rows for c in chunks) for chunks in layout]
    shares = [0] * len(layout)
    for _ in range(sum(sizes[i] for i in free)):
        rank = min(range(len(layout)), key=lambda r: (loads[r] + shares[r], r))
        shares[rank] += 1
    pieces = iter([(i, row) for i in free for row in range(sizes[i])])
    for rank, share in enumerate(shares):
        rows = [next(pieces) for _ in range(share)]
        for i in dict.fromkeys(i for i, _ in rows):
            own = [row for j, row in rows if j == i]
            layout[rank].append(Chunk(i, own[0], own[-1] + 1))


class _Homes:
    """Each branch's rank for the whole attach: the order in which branch names first appear, modulo the
    group size. A branch never moves, so a hook that keeps state per call (TPG's permutations, S^2's
    random block choice) advances exactly as in one process."""

    def __init__(self) -> None:
        self.ranks: dict[str, int] = {}

    def __call__(self, requests: Sequence[BranchRequest], world_size: int) -> list[int]:
        for request in requests:
            self.ranks.setdefault(request.name, len(self.ranks) % world_size)
        return [self.ranks[request.name] for request in requests]


def _layout(
    requests: Sequence[BranchRequest], world_size: int, balance: str, homes: _Homes
) -> list[list[Chunk]]:
    whole = [request.hook is not None for request in requests]
    return plan([len(r) for r in requests], world_size, balance, homes(requests, world_size), whole)


def _run_chunk(request: BranchRequest, chunk: Chunk) -> Tensor:
    if chunk.start == 0 and chunk.stop == len(request):
        return request.run()
    return request.take(slice(chunk.start, chunk.stop)).run()


def _assemble(
    requests: Sequence[BranchRequest], layout: list[list[Chunk]], outputs: list[list[Tensor]]
) -> dict[str, Tensor]:
    """Every request's prediction from the chunks' outputs (``outputs[rank][k]`` for ``layout[rank][k]``)."""
    parts: dict[int, list[tuple[int, Tensor]]] = {i: [] for i in range(len(requests))}
    for chunks, results in zip(layout, outputs, strict=True):
        for chunk, result in zip(chunks, results, strict=True):
            parts[chunk.request].append((chunk.start, result))
    predictions = {}
    for i, request in enumerate(requests):
        pieces = [tensor for _, tensor in sorted(parts[i], key=lambda item: item[0])]
        predictions[request.name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return predictions


def _check_hooks(requests: Sequence[BranchRequest]) -> None:
    for request in requests:
        if getattr(request.hook, "splittable", True) is False:
            raise ValueError(
                f"The hook of branch {request.name!r} ({request.hook!r}) declares `splittable = False`: it "
                "needs the other branches' rows in the same call, so it cannot run under parallel='cfg'."
            )


class SimulatedEvaluator:
    """What a CFG-parallel run on ``world_size`` ranks computes, in one process (for tests and debugging).

    Every rank's chunks of :func:`plan` run one after the other, one call each. With
    ``balance="branches"`` this is :class:`~guidance.diffusion.branches.SeparateEvaluator`.

    Args:
        world_size (int): the number of ranks to simulate (>= 1).
        balance (str): ``"branches"`` or ``"rows"`` (see :func:`plan`).
    """

    def __init__(self, world_size: int = 2, balance: str = "branches"):
        plan([1], world_size, balance)  # validates both
        self.world_size, self.balance = world_size, balance
        self._homes = _Homes()

    def evaluate(self, requests: Sequence[BranchRequest]) -> dict[str, Tensor]:
        _check_hooks(requests)
        layout = _layout(requests, self.world_size, self.balance, self._homes)
        outputs = [[_run_chunk(requests[c.request], c) for c in chunks] for chunks in layout]
        return _assemble(requests, layout, outputs)

    def __repr__(self) -> str:
        return f"SimulatedEvaluator(world_size={self.world_size}, balance={self.balance!r})"


# ------------------------------------------------------------------------------ the distributed evaluator
@dataclass
class ParallelTimings:
    """Where a rank's time went, summed over the evaluate calls since the last ``attach``.

    ``evaluate_s``: its own denoiser calls; ``exchange_s``: digests, the two all-gathers (header
    and predictions) and the waiting for slower ranks inside them; ``bytes``: predictions sent.
    On CUDA, kernels run asynchronously, so waiting for them lands in ``exchange_s``.
    """

    calls: int = 0
    evaluate_s: float = 0.0
    exchange_s: float = 0.0
    bytes: int = 0

    @property
    def exchange_share(self) -> float:
        """``exchange_s / (evaluate_s + exchange_s)`` (0 before the first call)."""
        total = self.evaluate_s + self.exchange_s
        return self.exchange_s / total if total else 0.0


class DistributedEvaluator:
    """Evaluates a step's branches across the ranks of a process group and all-gathers the predictions.

    ``attach(pipe, guider, parallel="cfg")`` builds one with the defaults; pass
    ``parallel=DistributedEvaluator(...)`` to choose. Every rank of the group must attach the
    same guider to the same pipeline and call it with the same inputs (seed included).

    Args:
        group: a ``torch.distributed`` process group, or ``None`` (default) to find or create
            one (see :mod:`guidance.diffusion.distributed`: xfuser's CFG group, a subgroup of the
            script's default group, or the default group initialised from torchrun's environment).
        balance (str): ``"branches"`` (default: one branch per rank, bit-identical to
            ``evaluator="separate"``) or ``"rows"`` (rows split evenly; see the module docstring).
        timeout (float): seconds a collective waits for the other ranks before failing (> 0;
            applies to groups created here; a ``group`` you pass keeps its own).

    Example:
        >>> from guidance.diffusion.parallel import DistributedEvaluator
        >>> DistributedEvaluator(balance="rows", timeout=60)
        DistributedEvaluator(balance='rows', timeout=60.0, not connected)
    """

    def __init__(self, group: Any = None, *, balance: str = "branches", timeout: float = DEFAULT_TIMEOUT):
        check_choice(balance, "balance", BALANCES)
        timeout = check_range(timeout, "timeout", 0.0, math.inf, lo_open=True)  # seconds
        self.requested_group, self.balance, self.timeout = group, balance, timeout
        self.group: Group | None = None
        self.timings = ParallelTimings()
        self._exchange: Exchange | None = None
        self._calls = 0
        self._ran = False
        self._homes = _Homes()

    # -- group ------------------------------------------------------------------------------------
    def connect(self, model_device: torch.device) -> None:
        """Find or create the process group (see :func:`guidance.diffusion.distributed.connect`)."""
        if self.group is None or self.group.closed:
            self.group = connect(self.requested_group, self.timeout, torch.device(model_device))
            self._exchange = Exchange(self.group, self.timeout)
        self._ran = False  # a new attach has a new wrapper, which has not seen the denoiser's output yet
        self.timings = ParallelTimings()

    def close(self) -> None:
        """Stop using the group, destroying it if it was created for this evaluator (``detach`` calls this).

        :attr:`rank`, :attr:`world_size` and :attr:`is_main_process` still answer afterwards.
        """
        if self.group is not None:
            self.group.close()

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._connected().rank

    @property
    def world_size(self) -> int:
        """The number of ranks sharing the branches."""
        return self._connected().world_size

    @property
    def is_main_process(self) -> bool:
        """Whether this is the group's rank 0 (the one that should save and print)."""
        return self._connected().rank == 0

    def _connected(self) -> Group:
        if self.group is None:
            raise ValueError(
                "This DistributedEvaluator is not connected: pass it to `attach(..., parallel=...)`."
            )
        return self.group

    # -- per step -----------------------------------------------------------------------------------
    def evaluate(self, requests: Sequence[BranchRequest]) -> dict[str, Tensor]:
        group = self._connected()
        if group.closed:
            raise ValueError("This DistributedEvaluator was closed (detached); attach it again to sample.")
        _check_hooks(requests)
        self._calls += 1
        layout = _layout(requests, group.world_size, self.balance, self._homes)
        mine = layout[group.rank]
        started = time.perf_counter()
        outputs, error = self._run_mine(requests, mine)
        evaluated = time.perf_counter()
        headers = self._exchange_headers(self._header(requests, layout, outputs, error))
        dtype, row_shape = self._check(headers, error)
        predictions = self._gather(requests, layout, outputs, headers, dtype, row_shape)
        timings = self.timings
        timings.calls += 1
        timings.evaluate_s += evaluated - started
        timings.exchange_s += time.perf_counter() - evaluated
        return predictions

    def _run_mine(
        self, requests: Sequence[BranchRequest], mine: list[Chunk]
    ) -> tuple[list[Tensor], BaseException | None]:
        try:
            outputs = [_run_chunk(requests[c.request], c) for c in mine]
            if not mine and not self._ran:
                # The wrapper returns the denoiser's own output type, which it learns from one call;
                # a rank idle at the first step evaluates one row of a hook-free branch once, and discards it.
                plain = [r for r in requests if r.hook is None] or list(requests)
                _run_chunk(plain[0], Chunk(0, 0, 1))
            self._ran = True
            return outputs, None
        except Exception as exc:  # noqa: BLE001 - re-raised after telling the other ranks
            return [], exc

    def _exchange_headers(self, header: Tensor) -> list[list[int]]:
        """Every rank's header. Every control exchange (at attach and per step) has this one size, so
        ranks that fell out of step (one raised outside the evaluator) disagree in the checks instead
        of mismatching in the backend."""
        what = "the headers at attach" if self._calls == 0 else f"the headers of call {self._calls}"
        return [h.cpu().tolist() for h in self._exchange.all_gather(header, what)]

    def _header(
        self, requests: Sequence[BranchRequest], layout: list[list[Chunk]], outputs: list[Tensor], error: Any
    ) -> Tensor:
        header = _blank_header(self._calls, _plan_digest(requests, layout))
        header[3:5] = _input_digest(requests)
        header[5] = int(error is not None)
        header[6] = sum(o.numel() * o.element_size() for o in outputs)
        kinds = {(o.dtype, tuple(o.shape[1:])) for o in outputs}
        if len(kinds) == 1 and error is None:
            ((dtype, row_shape),) = kinds
            if dtype in _DTYPES and len(row_shape) <= _MAX_DIMS:
                header[7], header[8] = _DTYPES.index(dtype), len(row_shape)
                header[9 : 9 + len(row_shape)] = torch.tensor(row_shape, dtype=torch.int64)
        elif len(kinds) > 1:
            header[5] = 2
        return header

    def _agree_on(self, rows: list[list[int]], where: str) -> None:
        for index, what, advice in _AGREEMENT:
            values = [h[index] for h in rows]
            if any(v != values[0] for v in values):
                raise ParallelError(
                    f"CFG-parallel: the ranks disagree about {what} ({where}): {values}. {advice}"
                )

    def _check(
        self, rows: list[list[int]], error: BaseException | None
    ) -> tuple[torch.dtype, tuple[int, ...]]:
        """Raise the same error on every rank where any rank failed or the ranks disagree."""
        where = f"call {self._calls} of rank {self.rank}"
        failed = [r for r, h in enumerate(rows) if h[5] == 1]
        if failed:
            if error is not None:
                raise error
            raise ParallelError(
                f"CFG-parallel: rank {failed[0]} raised an exception while evaluating its branches ({where}); "
                "see that rank's output."
            )
        self._agree_on(rows, where)
        if any(h[5] == 2 for h in rows) or any(h[7] == -1 and h[6] > 0 for h in rows):
            raise ParallelError(
                "CFG-parallel needs every branch's prediction to have one dtype "
                f"({', '.join(map(str, _DTYPES))}) and the same shape per sample ({where})."
            )
        kinds = {(h[7], tuple(h[9 : 9 + h[8]])) for h in rows if h[8] >= 0}
        if len(kinds) != 1:
            raise ParallelError(
                f"CFG-parallel: the ranks' predictions differ in dtype or shape ({where}): {kinds}."
            )
        ((code, row_shape),) = kinds
        return _DTYPES[code], row_shape

    def _gather(
        self,
        requests: Sequence[BranchRequest],
        layout: list[list[Chunk]],
        outputs: list[Tensor],
        headers: list[list[int]],
        dtype: torch.dtype,
        row_shape: tuple[int, ...],
    ) -> dict[str, Tensor]:
        row_bytes = dtype.itemsize * int(torch.Size(row_shape).numel())
        sizes = [sum(c.rows for c in chunks) * row_bytes for chunks in layout]
        reported = [int(h[6]) for h in headers]
        if sizes != reported:
            raise ParallelError(f"CFG-parallel: predictions of {reported} bytes per rank, expected {sizes}.")
        group = self._connected()
        payload = torch.zeros(max(sizes), dtype=torch.uint8, device=group.device)
        if outputs:
            local = torch.cat([o.detach().contiguous().reshape(-1).view(torch.uint8) for o in outputs])
            payload[: local.numel()] = local.to(group.device)
        self.timings.bytes += sizes[group.rank]
        buffers = self._exchange.all_gather(payload, f"the predictions of call {self._calls}")
        device = _prediction_device(requests, outputs)
        gathered = []
        for chunks, buffer in zip(layout, buffers, strict=True):
            offset, results = 0, []
            for chunk in chunks:
                n = chunk.rows * row_bytes
                tensor = buffer[offset : offset + n].view(dtype).reshape(chunk.rows, *row_shape)
                results.append(tensor.to(device))
                offset += n
            gathered.append(results)
        return _assemble(requests, layout, gathered)

    # -- called by the denoiser wrapper ---------------------------------------------------------------
    def require_cfg_batch(self, pipe: Any) -> None:
        """Raise: the pipeline called its denoiser without a stacked ``[uncond, cond]`` batch to split."""
        raise ValueError(
            f"parallel='cfg' splits the stacked [uncond, cond] batch of a guided step across processes, but "
            f"{type(pipe).__name__} called its denoiser with a batch that is not one: either it is not doing "
            f"classifier-free guidance in this run (guidance_scale={getattr(pipe, 'guidance_scale', None)!r}; "
            "pass any guidance_scale > 1, the attached guider sets the scale) or it evaluates its branches in "
            "separate calls, which parallel='cfg' does not support."
        )

    def __repr__(self) -> str:
        group = self.group
        where = "not connected" if group is None else f"rank {group.rank} of {group.world_size}"
        where += ", closed" if group is not None and group.closed else ""
        return f"DistributedEvaluator(balance={self.balance!r}, timeout={self.timeout}, {where})"


_AGREEMENT = (
    (0, "the protocol", "Another collective ran on the same group while sampling."),
    (
        1,
        "how many guided denoiser calls they made since attaching (0: attaching)",
        "Every rank must make the same attach and pipeline calls; one that raised outside the sampler, or "
        "skipped a call, is out of step.",
    ),
    (
        2,
        "the configuration or the branches and batch sizes of this step",
        "Every rank must attach the same guider and call the pipeline with the same batch.",
    ),
    (
        3,
        "the denoiser inputs",
        "Every rank must use the same prompts and the same seed, e.g. "
        "`generator=torch.Generator(device).manual_seed(0)`; an unseeded pipeline draws different noise per rank.",
    ),
    (4, "the denoiser inputs", "Every rank must use the same prompts and the same seed."),
)


def _blank_header(call: int, digest: int) -> Tensor:
    header = torch.full((_HEADER,), -1, dtype=torch.int64)
    header[:3] = torch.tensor([_MAGIC, call, digest])
    header[3:7] = 0
    return header


def _plan_digest(requests: Sequence[BranchRequest], layout: list[list[Chunk]]) -> int:
    described = [(r.name, len(r), r.hook is not None) for r in requests]
    chunks = [[(c.request, c.start, c.stop) for c in rank] for rank in layout]
    return zlib.crc32(repr((described, chunks)).encode())


def _input_digest(requests: Sequence[BranchRequest]) -> Tensor:
    """Two exact (integer) digests of the call's per-sample inputs and timestep, independent of thread counts."""
    call = requests[0].inputs.call
    tensors = [call.batched[path] for path in sorted(call.batched)]
    timestep = call.argument("timestep")
    if is_real_number(timestep) and not isinstance(timestep, Tensor):
        timestep = torch.tensor(timestep, dtype=torch.float64)
    if isinstance(timestep, Tensor) and all(timestep is not t for t in tensors):
        tensors.append(timestep)
    digest = torch.zeros(2, dtype=torch.int64)
    for tensor in tensors:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
        weights = torch.arange(data.numel(), device=data.device).remainder_(1009).add_(1)
        digest += torch.stack([data.sum(), (data * weights).sum()]).cpu()
    return digest


def _prediction_device(requests: Sequence[BranchRequest], outputs: list[Tensor]) -> torch.device:
    if outputs:
        return outputs[0].device
    batched = requests[0].inputs.call.batched
    return next(iter(batched.values())).device if batched else torch.device("cpu")


# ------------------------------------------------------------------------------ attach(..., parallel=...)
def max_branches(guider: Any, mode: str) -> int | None:
    """The most branches ``guider`` evaluates per step (``None``: it declares its own, step by step)."""
    if mode == "cfgpp":
        return 2
    if callable(getattr(guider, "branches", None)):
        return None
    return 3 if getattr(guider, "needs_negative", False) else 2


def parallel_evaluator(
    parallel: Any, evaluator: Any, *, module: Any, guider: Any, mode: str, branch_inputs: Mapping[str, Any]
) -> DistributedEvaluator:
    """The evaluator for ``attach(..., parallel=...)``: validated, connected, and agreed on by every rank."""
    if isinstance(parallel, str):
        if parallel not in PARALLEL_MODES:
            raise ValueError(
                f"`parallel` must be one of {PARALLEL_MODES} or a DistributedEvaluator, got {parallel!r}."
            )
        chosen = DistributedEvaluator()
    elif isinstance(parallel, DistributedEvaluator):
        chosen = parallel
    else:
        raise TypeError(f"`parallel` must be 'cfg' or a DistributedEvaluator, got {type(parallel).__name__}.")
    if not (isinstance(evaluator, str) and evaluator == "batched"):
        raise ValueError(
            f"Pass either `parallel` or `evaluator`, not both (got evaluator={evaluator!r}): parallel='cfg' "
            "evaluates each rank's branches in calls of their own."
        )
    if getattr(guider, "splittable", True) is False:
        raise ValueError(
            f"{type(guider).__name__} declares `splittable = False`: its branches cannot be evaluated on "
            "separate processes, so it cannot run with parallel='cfg'."
        )
    chosen.connect(_device_of(module))
    try:
        _check_world_size(chosen, guider, mode)
        _agree(chosen, guider, mode, branch_inputs)
    except BaseException:
        chosen.close()
        raise
    return chosen


def _device_of(module: Any) -> torch.device:
    parameter = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_world_size(evaluator: DistributedEvaluator, guider: Any, mode: str) -> None:
    world, name = evaluator.world_size, type(guider).__name__
    if world < 2:
        raise ValueError(
            "parallel='cfg' needs at least 2 processes, one per branch, but the process group has 1: launch with "
            "`torchrun --nproc-per-node 2 script.py` (evaluator='separate' computes the same in one process)."
        )
    most = max_branches(guider, mode)
    if evaluator.balance == "branches" and most is not None and world > most:
        raise ValueError(
            f"parallel='cfg' with {name} evaluates at most {most} branches per step, so a process group of "
            f"{world} would leave {world - most} rank(s) idle: launch {most} processes (`torchrun "
            f"--nproc-per-node {most}`), or pass parallel=DistributedEvaluator(balance='rows') to split the "
            "batch rows across all of them."
        )


def _agree(evaluator: DistributedEvaluator, guider: Any, mode: str, branch_inputs: Mapping[str, Any]) -> None:
    """Before the first step: every rank is alive and attached the same kind of configuration."""
    described = (type(guider).__name__, mode, evaluator.balance, evaluator.world_size, sorted(branch_inputs))
    header = _blank_header(0, zlib.crc32(repr(described).encode()))
    evaluator._agree_on(
        evaluator._exchange_headers(header), f"attaching {described} on rank {evaluator.rank}"
    )
