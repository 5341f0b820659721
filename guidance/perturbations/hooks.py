"""Hooks that change the denoiser while one branch runs (perturbation guidance builds on these).

A hook is an object with ``per_row`` and ``apply(module, rows)`` returning a context manager
(:class:`~guidance.diffusion.branches.BranchHook`). Entering installs the change, leaving
removes it, also when the forward raises, so the model is exactly what it was after every
evaluation. Two generic hooks:

* :class:`AttentionProcessors`: swaps the attention processors of the chosen attention modules
  (diffusers ``Attention.get_processor`` / ``set_processor``, which every diffusers model has, also
  those without ``set_attn_processor`` such as ``UNet2DModel``). PAG, SEG and STG-A are processors.
* :class:`ForwardHooks`: ``torch`` forward hooks on the chosen sub-modules (``register_forward_hook``),
  whose return value replaces the module's output: skipped blocks (SLG, STG-R), token shuffles.

Modules are chosen by name with ``fnmatch`` patterns over ``module.named_modules()`` (e.g.
``"mid_block.*"``, ``"transformer_blocks.7"``) or a predicate ``(name, module) -> bool``.

Example:
    >>> import torch
    >>> from guidance.perturbations.hooks import ForwardHooks
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> skip = ForwardHooks(lambda name, module, args, output, rows: args[0], modules="0")
    >>> x = torch.ones(1, 2)
    >>> with skip.apply(net, None):
    ...     torch.equal(net(x), x.relu())  # the Linear layer is skipped
    True
    >>> len(net[0]._forward_hooks)  # removed on exit
    0
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["select_modules", "AttentionProcessors", "ForwardHooks"]

Selector = str | Sequence[str] | Callable[[str, Any], bool]


def select_modules(
    module: Any, which: Selector, *, kind: Callable[[Any], bool] | None = None
) -> list[tuple[str, Any]]:
    """The ``(name, sub-module)`` pairs of ``module`` chosen by ``which`` (and of the right ``kind``).

    Raises ``ValueError`` when nothing matches, naming a few candidates.
    """
    if isinstance(which, str):
        which = (which,)
    if callable(which):
        matches = which
    else:
        patterns = tuple(which)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"Module patterns must be strings, got {which!r}.")

        def matches(name: str, sub: Any) -> bool:
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    candidates = [(name, sub) for name, sub in module.named_modules() if name and (kind is None or kind(sub))]
    chosen = [(name, sub) for name, sub in candidates if matches(name, sub)]
    if not chosen:
        names = [name for name, _ in candidates[:8]]
        raise ValueError(
            f"No module of {type(module).__name__} matches {which!r}; candidates include {names}."
        )
    return chosen


def _is_attention(sub: Any) -> bool:
    return callable(getattr(sub, "get_processor", None)) and callable(getattr(sub, "set_processor", None))


class AttentionProcessors:
    """Replace the processors of some attention modules while a branch runs.

    Args:
        make (Callable): ``make(name, original_processor, rows) -> processor`` builds the
            replacement for attention module ``name`` (``rows``: see ``per_row``).
        layers (str | Sequence[str] | Callable): which attention modules (``fnmatch`` patterns
            over module names, or a predicate ``(name, module) -> bool``).
        per_row (bool): ``True`` when the processors ``make`` builds act only on ``rows`` of the
            batch (then the branch can share a call with others); ``False`` (default): they act on
            the whole call, which then holds this branch alone.
    """

    def __init__(
        self, make: Callable[[str, Any, slice | None], Any], layers: Selector, *, per_row: bool = False
    ):
        if not callable(make):
            raise TypeError(f"`make` must be callable (name, processor, rows) -> processor, got {make!r}.")
        self.make, self.layers, self.per_row = make, layers, bool(per_row)

    @contextlib.contextmanager
    def apply(self, module: Any, rows: slice | None) -> Iterator[None]:
        chosen = select_modules(module, self.layers, kind=_is_attention)
        originals = [(attention, attention.get_processor()) for _, attention in chosen]
        try:
            for (name, attention), (_, original) in zip(chosen, originals, strict=True):
                attention.set_processor(self.make(name, original, rows))
            yield
        finally:
            for attention, original in originals:
                attention.set_processor(original)

    def __repr__(self) -> str:
        return f"AttentionProcessors(layers={self.layers!r}, per_row={self.per_row})"


class ForwardHooks:
    """Forward hooks on some sub-modules while a branch runs.

    Args:
        hook (Callable): ``hook(name, module, args, output, rows)``; a non-``None`` return value
            replaces the module's output (``args[0]`` skips a block that maps hidden states to
            hidden states).
        modules (str | Sequence[str] | Callable): which sub-modules (patterns or predicate).
        per_row (bool): ``True`` when ``hook`` changes only ``rows`` of the output.
    """

    def __init__(self, hook: Callable[..., Any], modules: Selector, *, per_row: bool = False):
        if not callable(hook):
            raise TypeError(f"`hook` must be callable, got {hook!r}.")
        self.hook, self.modules, self.per_row = hook, modules, bool(per_row)

    @contextlib.contextmanager
    def apply(self, module: Any, rows: slice | None) -> Iterator[None]:
        handles = []
        try:
            for name, sub in select_modules(module, self.modules):
                handles.append(sub.register_forward_hook(self._bind(name, rows)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _bind(self, name: str, rows: slice | None) -> Callable[..., Any]:
        def forward_hook(sub: Any, args: tuple, output: Any) -> Any:
            return self.hook(name, sub, args, output, rows)

        return forward_hook

    def __repr__(self) -> str:
        return f"ForwardHooks(modules={self.modules!r}, per_row={self.per_row})"
