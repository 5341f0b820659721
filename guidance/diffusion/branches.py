"""Evaluating a guider's branches: requests, and the strategies that turn them into denoiser calls.

At every guided step the denoiser wrapper of :func:`~guidance.diffusion.attach` asks the guider
which branches it needs (:func:`guidance.branches.branches_of`), turns each into a
:class:`BranchRequest` (its rows of the pipeline's call, inputs replaced where the branch says,
the network to run and the hook to install), and hands the list to a :class:`BranchEvaluator`,
which returns one prediction per branch name. The guider then combines them.

Evaluators (``attach(..., evaluator=...)``; the whole mechanism: ``docs/diffusion_branches.md``):

* :class:`BatchedEvaluator` (``"batched"``, the default): one denoiser call for every request
  on the same network whose hook can act on its own rows (``hook.per_row``) or has none; a
  request with a whole-batch hook gets a call of its own. The pipeline's plain ``[uncond, cond]``
  batch is passed through unchanged, so plain CFG is bit-identical to the pipeline.
* :class:`SeparateEvaluator` (``"separate"``): one call per branch. This is what a run that puts
  each branch on its own device computes (CFG-parallel), bit for bit.
* Any object with ``evaluate(requests) -> dict[str, Tensor]`` (e.g. a distributed evaluator:
  rank ``r`` runs ``requests[r]`` and all-gathers); the guiders never see the difference.

Example:
    >>> import inspect, torch
    >>> from guidance.diffusion.batch import DenoiserCall
    >>> from guidance.diffusion.branches import BatchedEvaluator, BranchRequest, Denoiser, SeparateEvaluator
    >>> net = torch.nn.Linear(2, 2)
    >>> x = torch.randn(4, 2)  # the pipeline's [uncond, cond] batch of 2 samples
    >>> call = DenoiserCall(inspect.signature(net.forward), (x,), {}, batch=4)
    >>> own = Denoiser(net, net.forward)
    >>> requests = [BranchRequest("uncond", call.rows([0, 1]), own), BranchRequest("cond", call.rows([2, 3]), own)]
    >>> batched = BatchedEvaluator().evaluate(requests)
    >>> own.calls, torch.equal(batched["cond"], net(x)[2:])
    (1, True)
    >>> separate = SeparateEvaluator().evaluate(requests)
    >>> own.calls, torch.allclose(separate["uncond"], batched["uncond"])
    (3, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from guidance.diffusion.batch import BatchInputs, prediction_of

__all__ = [
    "BranchHook",
    "Denoiser",
    "BranchRequest",
    "BranchEvaluator",
    "BatchedEvaluator",
    "SeparateEvaluator",
    "EVALUATORS",
    "as_evaluator",
    "hooked",
]


@runtime_checkable
class BranchHook(Protocol):
    """A change to the denoiser while one branch runs (a perturbation: attention swap, skipped blocks).

    ``apply(module, rows)`` returns a context manager that installs the change on ``module`` (the
    network the branch runs on) on entry and removes it on exit, also when the forward raises.
    ``rows`` is the slice of the call's batch that belongs to the branch when several branches
    share one call (only for hooks with ``per_row = True``, which must leave the other rows
    untouched), or ``None`` when the whole call is the branch.
    """

    per_row: bool

    def apply(self, module: Any, rows: slice | None) -> contextlib.AbstractContextManager[Any]: ...


def hooked(
    hook: BranchHook | None, module: Any, rows: slice | None
) -> contextlib.AbstractContextManager[Any]:
    """``hook.apply(module, rows)``, or a no-op context without a hook."""
    return contextlib.nullcontext() if hook is None else hook.apply(module, rows)


class Denoiser:
    """A network the wrapper evaluates: the pipeline's own denoiser (through its original ``forward``) or another.

    Args:
        module: the ``torch.nn.Module`` (hooks are installed on it).
        forward (Callable): what to call with the denoiser's arguments.
        on_output (Callable | None): called with every raw output (the wrapper keeps one as the
            template of what it returns to the pipeline).
    """

    def __init__(
        self, module: Any, forward: Callable[..., Any], on_output: Callable[[Any], None] | None = None
    ):
        self.module, self.forward, self.on_output = module, forward, on_output
        self.calls = 0

    def __call__(self, inputs: BatchInputs) -> Tensor:
        """The prediction for ``inputs`` (one forward call)."""
        args, kwargs = inputs.materialize()
        out = self.forward(*args, **kwargs)
        self.calls += 1
        if self.on_output is not None:
            self.on_output(out)
        return prediction_of(out)

    def __repr__(self) -> str:
        return f"Denoiser({type(self.module).__name__})"


@dataclass(frozen=True)
class BranchRequest:
    """One branch to evaluate at this step.

    Args:
        name (str): the branch's name (the key of its prediction in the evaluator's result).
        inputs (BatchInputs): its rows of the pipeline's denoiser call, inputs replaced as the branch says.
        denoiser (Denoiser): the network to run.
        hook (BranchHook | None): installed on ``denoiser.module`` while the branch runs.
    """

    name: str
    inputs: BatchInputs
    denoiser: Denoiser
    hook: BranchHook | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def run(self) -> Tensor:
        """Evaluate this request alone, in one call (its hook, if any, on the whole call)."""
        with hooked(self.hook, self.denoiser.module, None):
            return self.denoiser(self.inputs)

    def take(self, positions: slice) -> BranchRequest:
        """The same request for a slice of its rows (to split one branch across devices)."""
        return replace(self, inputs=self.inputs.take(positions))


@runtime_checkable
class BranchEvaluator(Protocol):
    """Turns a step's requests into predictions: ``{request.name: prediction}`` (rows in request order).

    Every request must be evaluated; the order of ``requests`` is the same on every call site
    (and on every rank), so a distributed evaluator may assign requests to ranks by position.
    """

    def evaluate(self, requests: Sequence[BranchRequest]) -> dict[str, Tensor]: ...


class SeparateEvaluator:
    """One denoiser call per branch (the single-process equivalent of running each branch on its own device)."""

    def evaluate(self, requests: Sequence[BranchRequest]) -> dict[str, Tensor]:
        return {request.name: request.run() for request in requests}

    def __repr__(self) -> str:
        return "SeparateEvaluator()"


class BatchedEvaluator:
    """As few denoiser calls as possible: requests on the same network share one call.

    A request whose hook acts on the whole call (``per_row = False``) runs alone; every other
    request on the same network joins one batch, its per-row hook installed on its slice.
    """

    def evaluate(self, requests: Sequence[BranchRequest]) -> dict[str, Tensor]:
        predictions: dict[str, Tensor] = {}
        for group in _groups(requests):
            predictions.update(_run_together(group))
        return predictions

    def __repr__(self) -> str:
        return "BatchedEvaluator()"


def _groups(requests: Sequence[BranchRequest]) -> list[list[BranchRequest]]:
    """Requests grouped into calls, in order of first appearance."""
    groups: list[list[BranchRequest]] = []
    shared: dict[int, list[BranchRequest]] = {}
    for request in requests:
        if request.hook is not None and not request.hook.per_row:
            groups.append([request])
            continue
        key = id(request.denoiser)
        if key not in shared:
            shared[key] = []
            groups.append(shared[key])
        shared[key].append(request)
    return groups


def _run_together(group: list[BranchRequest]) -> dict[str, Tensor]:
    if len(group) == 1:
        return {group[0].name: group[0].run()}
    denoiser = group[0].denoiser
    with contextlib.ExitStack() as stack:
        offset = 0
        for request in group:
            if request.hook is not None:
                stack.enter_context(request.hook.apply(denoiser.module, slice(offset, offset + len(request))))
            offset += len(request)
        prediction = denoiser(BatchInputs.concat([request.inputs for request in group]))
    parts = prediction.split([len(request) for request in group])
    return {request.name: part for request, part in zip(group, parts, strict=True)}


EVALUATORS = {"batched": BatchedEvaluator, "separate": SeparateEvaluator}


def as_evaluator(value: str | BranchEvaluator) -> BranchEvaluator:
    """An evaluator from its name (``"batched"``, ``"separate"``) or an object with ``evaluate``."""
    if isinstance(value, str):
        if value not in EVALUATORS:
            raise ValueError(
                f"`evaluator` must be one of {tuple(EVALUATORS)} or an evaluator object, got {value!r}."
            )
        return EVALUATORS[value]()
    if not callable(getattr(value, "evaluate", None)):
        raise TypeError(
            f"`evaluator` must be one of {tuple(EVALUATORS)} or have `evaluate(requests) -> dict`, got {value!r}."
        )
    return value
