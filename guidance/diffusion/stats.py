"""Network evaluations of one sampling run, counted by the denoiser wrapper of :func:`~guidance.diffusion.attach`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GuidanceStats"]


@dataclass
class GuidanceStats:
    """Network evaluations of one sampling run (one pipeline call).

    One row is one network evaluation of one sample. ``branch_rows`` counts the rows evaluated
    per branch (``"cond"``, ``"uncond"``, ``"negative"``, ``"perturbed"``, ...), ``passthrough_rows``
    the rows of calls the wrapper left alone (the pipeline was not doing CFG, or an extra call
    such as SD3's own skip-layer guidance). ``uncond_skipped`` counts unconditional rows the
    pipeline asked for but the wrapper did not evaluate. ``forward_calls`` counts calls of a
    denoiser (a batched evaluation of several branches is one call). ``scales`` holds the
    guider's scale per guided step, ``passed_at`` the step at which adaptive guidance retired
    each sample (``None``: never).
    """

    batch_size: int = 0
    steps: int = 0
    forward_calls: int = 0
    branch_rows: dict[str, int] = field(default_factory=dict)
    passthrough_rows: int = 0
    uncond_skipped: int = 0
    scales: list[float] = field(default_factory=list)
    passed_at: list[int | None] = field(default_factory=list)

    def count(self, branch: str, rows: int) -> None:
        """Add ``rows`` evaluated rows to ``branch``."""
        self.branch_rows[branch] = self.branch_rows.get(branch, 0) + rows

    @property
    def cond_rows(self) -> int:
        """Conditional rows evaluated in guided calls."""
        return self.branch_rows.get("cond", 0)

    @property
    def uncond_rows(self) -> int:
        """Unconditional rows evaluated in guided calls."""
        return self.branch_rows.get("uncond", 0)

    @property
    def evaluations(self) -> int:
        """Sample rows evaluated by the denoiser (every branch, plus passed-through calls)."""
        return sum(self.branch_rows.values()) + self.passthrough_rows

    @property
    def evaluations_per_image(self) -> float:
        """:attr:`evaluations` per sample of the batch (``0.0`` before the first guided step)."""
        return self.evaluations / self.batch_size if self.batch_size else 0.0
