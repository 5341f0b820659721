"""Branches: the network evaluations a guider combines at one denoising step.

Plain CFG combines two predictions per step, the conditional ``cond`` and the unconditional
``uncond``. Other methods need more: Perp-Neg a ``negative``-prompt prediction, perturbation
guidance (PAG, SEG, SLG, TPG) a conditional prediction with a perturbed network, AutoGuidance a
weaker model's prediction. A guider says which it needs, step by step, with :class:`Branch`
objects; an adapter (:func:`guidance.diffusion.attach`) evaluates them and calls the guider with
the predictions: ``guider(cond, uncond, step=..., **{branch.name: prediction for the others})``.

A guider declares its branches with an optional method::

    def branches(self, step, num_steps=None, sigma=None) -> tuple[Branch, ...]: ...

returning ``COND`` first, then only what the step needs (a schedule at 1, a guidance interval
or a zero-init step drops a branch, and the adapter does not evaluate it). Guiders without the
method get :func:`branches_of`'s default: ``cond``, plus ``uncond`` where ``needs_uncond`` is
true, plus ``negative`` for guiders with ``needs_negative`` (Perp-Neg).

The mechanism is described in ``docs/diffusion_branches.md``. A branch describes *what* to
evaluate, never *how* (no diffusers here):

* ``source``: whose rows of the pipeline's batch give its inputs, ``"cond"`` or ``"uncond"``;
* ``inputs``: denoiser inputs to replace (e.g. ``{"encoder_hidden_states": negative_embeds}``);
  an adapter argument may supply them by branch name (``attach(..., branch_inputs=...)``);
* ``hook``: an object the adapter installs on the denoiser while this branch runs
  (``hook.apply(module, rows)`` returns a context manager; see :mod:`guidance.diffusion.hooks`);
* ``model``: another network to evaluate instead of the pipeline's (a weaker model).

Example:
    >>> from guidance.branches import COND, UNCOND, Branch, branches_of
    >>> from guidance.guiders import CFG, PerpNeg
    >>> from guidance.schedules import Window
    >>> [b.name for b in branches_of(CFG(Window(5.0, start_step=1)), step=0, num_steps=4)]
    ['cond']
    >>> [b.name for b in branches_of(PerpNeg(5.0), step=0)]
    ['cond', 'uncond', 'negative']
    >>> Branch("perturbed", hook="my-hook").source
    'cond'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guidance.validation import check_choice

__all__ = ["Branch", "COND", "UNCOND", "NEGATIVE", "SOURCES", "branches_of"]

SOURCES = ("cond", "uncond")


@dataclass(frozen=True)
class Branch:
    """One prediction a guider needs at a step.

    Args:
        name (str): the keyword the guider receives the prediction under (``"cond"`` and
            ``"uncond"`` are its first two positional arguments).
        source (str): ``"cond"`` (default) or ``"uncond"``: the pipeline rows whose denoiser
            inputs this branch starts from.
        inputs (Mapping[str, Any] | None): denoiser inputs replaced for this branch, by argument
            name (nested mappings replace entries of dict arguments such as ``added_cond_kwargs``).
            Tensors hold one row (shared by all samples) or one row per sample.
        hook (Any): installed on the denoiser while the branch runs (adapter-specific; ``None``: none).
        model (Any): a network evaluated instead of the pipeline's denoiser (``None``: the pipeline's).
    """

    name: str
    source: str = "cond"
    inputs: Mapping[str, Any] | None = None
    hook: Any = None
    model: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"`name` must be a string, got {type(self.name).__name__}.")
        if not self.name.isidentifier():
            raise ValueError(
                f"`name` must be a Python identifier (a keyword for the guider), got {self.name!r}."
            )
        check_choice(self.source, "source", SOURCES)
        if self.inputs is not None and not isinstance(self.inputs, Mapping):
            raise TypeError(
                f"`inputs` must be a mapping of denoiser argument names, got {type(self.inputs).__name__}."
            )
        if self.name == "cond" and (self.source != "cond" or self.model is not None):
            raise ValueError("The `cond` branch is the pipeline's conditional rows through its own denoiser.")

    @property
    def is_plain(self) -> bool:
        """Whether this branch is just the pipeline's own rows of ``source`` (nothing replaced or hooked)."""
        return not self.inputs and self.hook is None and self.model is None


COND = Branch("cond")
UNCOND = Branch("uncond", source="uncond")
NEGATIVE = Branch("negative")


def branches_of(
    guider: Any, step: int, num_steps: int | None = None, sigma: float | None = None
) -> tuple[Branch, ...]:
    """The branches ``guider`` needs at ``step``: its own ``branches(...)``, or the default from ``needs_uncond``.

    The result always starts with the ``cond`` branch and has unique names.
    """
    declared = getattr(guider, "branches", None)
    if callable(declared):
        branches = tuple(declared(step, num_steps, sigma))
    elif guider.needs_uncond(step, num_steps, sigma):
        branches = (COND, UNCOND, NEGATIVE) if getattr(guider, "needs_negative", False) else (COND, UNCOND)
    else:
        branches = (COND,)
    if not branches or branches[0].name != "cond":
        raise ValueError(
            f"{type(guider).__name__}.branches() must start with the `cond` branch, got {branches!r}."
        )
    names = [b.name for b in branches]
    if len(set(names)) != len(names) or not all(isinstance(b, Branch) for b in branches):
        raise ValueError(
            f"{type(guider).__name__}.branches() must return Branch objects with unique names, got {names}."
        )
    return branches
