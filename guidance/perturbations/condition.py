"""Denoiser hooks that turn a conditional evaluation into ICG's or TSG's reference evaluation.

:class:`~guidance.guiders.IndependentCondition` (ICG) and :class:`~guidance.guiders.TimestepGuidance`
(TSG) combine the conditional prediction with a second one from the same network, evaluated on
the conditional rows with the condition (ICG) or the time-step embedding (TSG) perturbed. The
hooks here make that change on a diffusers denoiser while one branch runs; they follow the
branch-hook protocol of the adapters: ``hook.per_row`` (``True``: the hook acts on its own rows of
a shared batch) and ``hook.apply(module, rows)``, a context manager that installs PyTorch forward
hooks on the submodules involved and removes them on exit, also when the forward raises.

* :class:`RandomCondition` (ICG): class labels become uniform random labels at the class
  embedding (``class_embedding`` of UNets, ``LabelEmbedding`` of DiT); text embeddings become
  Gaussian noise with the real embeddings' standard deviation, at the ``context_embedder`` of
  transformers (SD3, Flux) or at every cross-attention of UNets. Redrawn at every forward.
* :class:`PerturbedTimestep` (TSG): noise added to the output of every ``TimestepEmbedding``
  (:func:`guidance.ops.perturb_time_embedding`), with ``t`` read from the ``Timesteps`` module
  before it. The paper feeds the noisy embedding to the first layers only; a UNet has one shared
  time embedding, so here every layer sees it.

Both draw from their own seeded generator (``reset()`` restarts it), never torch's global RNG.

Example:
    >>> import torch
    >>> from guidance.perturbations.condition import RandomCondition
    >>> from guidance.models import load_digits_pipeline
    >>> unet = load_digits_pipeline().unet
    >>> x, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    >>> with RandomCondition(num_classes=10).apply(unet, slice(0, 1)):  # row 0 gets a random digit
    ...     out = unet(x, 500, class_labels=labels).sample
    >>> plain = unet(x, 500, class_labels=labels).sample
    >>> torch.equal(out[1], plain[1])
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from guidance import ops
from guidance.validation import check_bool, check_choice, check_int, check_range

__all__ = ["RandomCondition", "PerturbedTimestep"]


def _rows_of(rows: slice | None, batch: int) -> slice:
    return slice(0, batch) if rows is None else rows


def _replace_rows(value: Tensor, rows: slice, new: Tensor) -> Tensor:
    out = value.clone()
    out[rows] = new
    return out


class _SeededHook:
    per_row = True

    def __init__(self, seed: int):
        self.seed = check_int(seed, "seed")
        self.generator = torch.Generator().manual_seed(self.seed)

    def reset(self) -> None:
        """Restart the random stream (the guiders call this at the start of every run)."""
        self.generator.manual_seed(self.seed)

    @contextlib.contextmanager
    def _installed(self, registrations: list[tuple[nn.Module, str, Any]]) -> Iterator[None]:
        handles = []
        try:
            for module, kind, fn in registrations:
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(fn))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _named(module: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in module.modules() if type(m).__name__ == class_name]


class RandomCondition(_SeededHook):
    """ICG's perturbation: the branch's rows see a condition drawn independently of the sample.

    Args:
        num_classes (int | None): classes to draw labels from, ``[0, num_classes)``. ``None``: the
            ``LabelEmbedding``'s own ``num_classes`` (DiT), or every row of a UNet's
            ``class_embedding`` (pass the number of real classes when it has a null row, e.g. 10
            for the digits model's 11).
        match_std (bool): scale random text embeddings to the real ones' standard deviation.
        seed (int): seed of the hook's own generator.
        kind (str): ``"auto"`` (class labels when the denoiser has a class embedding, else text),
            ``"class"`` or ``"text"``.
    """

    KINDS = ("auto", "class", "text")

    def __init__(self, num_classes: int | None = None, *, match_std: bool = True, seed: int = 0, kind: str = "auto"):
        super().__init__(seed)
        self.num_classes = None if num_classes is None else check_int(num_classes, "num_classes", minimum=1)
        self.match_std = check_bool(match_std, "match_std")
        self.kind = check_choice(kind, "kind", self.KINDS)

    def _class_modules(self, module: nn.Module) -> list[tuple[nn.Module, int]]:
        found = [(m, int(m.num_classes)) for m in _named(module, "LabelEmbedding")]
        embedding = getattr(module, "class_embedding", None)
        if isinstance(embedding, nn.Embedding):
            found.append((embedding, embedding.num_embeddings))
        return [(m, self.num_classes or n) for m, n in found]

    def _labels_hook(self, rows: slice | None, num_classes: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            labels = args[0] if args else kwargs["labels"]
            span = _rows_of(rows, labels.shape[0])
            drawn = ops.random_labels_like(labels[span], num_classes, generator=self.generator)
            new = _replace_rows(labels, span, drawn)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "labels": new})

        return hook

    def _text_hook(self, rows: slice | None, cache: dict, key: str | None):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            value = kwargs.get(key) if key else (args[0] if args else None)
            if value is None:
                return args, kwargs
            span = _rows_of(rows, value.shape[0])
            ident = (tuple(value.shape), value.dtype, value.device)
            if ident not in cache:  # one draw per forward, shared by every layer that reads the context
                cache[ident] = ops.random_embedding_like(value[span], generator=self.generator, match_std=self.match_std)
            new = _replace_rows(value, span, cache[ident])
            return ((new, *args[1:]), kwargs) if not key else (args, {**kwargs, key: new})

        return hook

    def apply(self, module: nn.Module, rows: slice | None) -> contextlib.AbstractContextManager[None]:
        """Install on ``module`` for the rows ``rows`` of each call (``None``: every row)."""
        classes = self._class_modules(module)
        kind = self.kind if self.kind != "auto" else ("class" if classes else "text")
        registrations: list[tuple[nn.Module, str, Any]] = []
        if kind == "class":
            if not classes:
                raise ValueError(f"{type(module).__name__} has no class embedding (`class_embedding` or LabelEmbedding).")
            registrations = [(m, "pre", self._labels_hook(rows, n)) for m, n in classes]
        else:
            cache: dict = {}
            context = getattr(module, "context_embedder", None)
            if isinstance(context, nn.Module):
                registrations = [(context, "pre", self._text_hook(rows, cache, None))]
            else:
                cross = [m for m in module.modules() if getattr(m, "is_cross_attention", False)]
                if not cross:
                    raise ValueError(
                        f"{type(module).__name__} has neither a `context_embedder` nor cross-attention layers to "
                        "receive a random text condition."
                    )
                registrations = [(m, "pre", self._text_hook(rows, cache, "encoder_hidden_states")) for m in cross]
        return self._installed(registrations)

    def __repr__(self) -> str:
        return f"RandomCondition(num_classes={self.num_classes}, match_std={self.match_std}, seed={self.seed}, kind={self.kind!r})"


class PerturbedTimestep(_SeededHook):
    """TSG's perturbation: noise on the branch rows' time-step embedding (see :func:`guidance.ops.perturb_time_embedding`)."""

    def __init__(
        self,
        noise_scale: float = 3.0,
        power: float = 0.25,
        time_scale: float = 1000.0,
        scale_by_std: bool = True,
        seed: int = 0,
    ):
        super().__init__(seed)
        self.noise_scale = check_range(noise_scale, "noise_scale", 0.0, math.inf, hi_open=True)
        self.power = check_range(power, "power", 0.0, math.inf, hi_open=True)
        self.time_scale = check_range(time_scale, "time_scale", 0.0, math.inf, lo_open=True, hi_open=True)
        self.scale_by_std = bool(scale_by_std)

    def apply(self, module: nn.Module, rows: slice | None) -> contextlib.AbstractContextManager[None]:
        """Install on ``module`` for the rows ``rows`` of each call (``None``: every row)."""
        embedders = _named(module, "TimestepEmbedding")
        projections = _named(module, "Timesteps")
        if not embedders or not projections:
            raise ValueError(f"{type(module).__name__} has no diffusers `Timesteps` / `TimestepEmbedding` modules.")
        seen: dict[str, Tensor] = {}

        def capture(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["t"] = (args[0] if args else kwargs["timesteps"]).detach()

        def perturb(mod: nn.Module, args: tuple, output: Tensor) -> Tensor:
            span = _rows_of(rows, output.shape[0])
            t = seen.get("t")
            t = t[span] if t is not None and t.ndim == 1 and t.shape[0] == output.shape[0] else t
            noisy = ops.perturb_time_embedding(
                output[span],
                1.0 if t is None else t,
                noise_scale=self.noise_scale,
                power=self.power,
                time_scale=self.time_scale,
                scale_by_std=self.scale_by_std,
                generator=self.generator,
            )
            return _replace_rows(output, span, noisy)

        registrations = [(m, "pre", capture) for m in projections] + [(m, "post", perturb) for m in embedders]
        return self._installed(registrations)

    def __repr__(self) -> str:
        return (
            f"PerturbedTimestep(noise_scale={self.noise_scale}, power={self.power}, time_scale={self.time_scale}, "
            f"scale_by_std={self.scale_by_std}, seed={self.seed})"
        )
