"""Per-row state of a V1 logits processor, kept in step with vLLM's persistent batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

State = TypeVar("State")

__all__ = ["RowTable", "admission_check"]


def admission_check(check: Callable[[Any], Any], params: Any) -> None:
    """Run ``check(params)`` for ``validate_params``, raising every refusal as ``ValueError``.

    vLLM turns a ``ValueError`` from ``validate_params`` into its validation error (HTTP 400
    when served); a ``TypeError`` would surface as a server error instead.
    """
    try:
        check(params)
    except TypeError as error:
        raise ValueError(str(error)) from error


class RowTable(Generic[State]):
    """``batch index -> state`` for the rows a processor acts on.

    ``update(batch_update, make_state)`` applies vLLM's ``BatchUpdate`` in its documented
    order (removed, then added, then moved). ``make_state(params, prompt_ids, output_ids)``
    returns the state of an added request, or None when the processor ignores it. An added
    or moved row may overwrite an occupied index.
    """

    def __init__(self) -> None:
        self.rows: dict[int, State] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def update(self, batch_update: Any, make_state: Callable[[Any, Any, Any], State | None]) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            state = make_state(params, prompt_ids, output_ids)
            if state is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = state
        for source, target, direction in batch_update.moved:
            moving = self.rows.pop(source, None)
            if direction.name == "SWAP":
                staying = self.rows.pop(target, None)
                if staying is not None:
                    self.rows[source] = staying
            else:
                self.rows.pop(target, None)
            if moving is not None:
                self.rows[target] = moving
