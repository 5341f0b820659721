"""Rows of a denoiser call: select samples, replace inputs, concatenate branches into one batch.

A diffusers pipeline calls its denoiser with a stacked batch (``[uncond, cond]`` rows) and many
per-sample inputs besides the latents: ``encoder_hidden_states``, ``class_labels``,
``added_cond_kwargs`` entries, ``pooled_projections``, a batched ``timestep``, ControlNet
residuals, ... :class:`DenoiserCall` records one such call and which of its tensors are
per-sample (first dimension = the batch; in dicts, lists and tuples too). :class:`BatchInputs`
is a view of some of its rows with some inputs replaced (a branch's inputs), and
:meth:`BatchInputs.concat` puts several views into one batch for one forward call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DenoiserCall", "BatchInputs", "prediction_of", "with_prediction", "flatten_inputs"]

Path = tuple[str, ...]
# Inputs whose first dimension is not the batch even when it happens to have the same size.
NOT_BATCHED = frozenset({"txt_ids", "img_ids", "return_dict"})


def _map_leaves(value: Any, fn: Callable[[Path, Any], Any], path: Path = ()) -> Any:
    """``value`` with ``fn(path, leaf)`` applied to every leaf of its dicts, lists and (non-named) tuples."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, fn, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not (isinstance(value, tuple) and hasattr(value, "_fields")):
        return type(value)(_map_leaves(v, fn, (*path, str(i))) for i, v in enumerate(value))
    return fn(path, value)


def flatten_inputs(inputs: Mapping[str, Any], path: Path = ()) -> dict[Path, Any]:
    """``{"a": {"b": x}}`` -> ``{("a", "b"): x}``: the leaves of nested mappings by path."""
    flat: dict[Path, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, Mapping):
            flat.update(flatten_inputs(value, (*path, str(key))))
        else:
            flat[(*path, str(key))] = value
    return flat


class DenoiserCall:
    """One call of a denoiser: its arguments and which of its tensors hold one row per sample.

    Inputs are named by path: the parameter name (positional arguments get theirs from the
    signature), then keys inside dict arguments, e.g. ``("added_cond_kwargs", "text_embeds")``.
    Rebuilt calls keep the original's positional / keyword structure.

    Args:
        signature (inspect.Signature): the denoiser's ``forward`` signature.
        args (tuple), kwargs (dict): the call's arguments.
        batch (int): the number of rows (the first argument's first dimension).
    """

    def __init__(self, signature: inspect.Signature, args: tuple, kwargs: dict, batch: int):
        self.args, self.kwargs, self.batch = args, kwargs, batch
        names = list(signature.parameters)
        self._arg_names = [names[i] if i < len(names) else f"*{i}" for i in range(len(args))]
        self.batched: dict[Path, Tensor] = {}
        self.build({})  # records the per-sample tensors

    def argument(self, name: str, default: Any = None) -> Any:
        """The value passed for parameter ``name`` (positionally or by keyword)."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[self._arg_names.index(name)] if name in self._arg_names else default

    def _leaf(self, values: Mapping[Path, Tensor]) -> Callable[[Path, Any], Any]:
        def leaf(path: Path, value: Any) -> Any:
            if path in values:
                return values[path]
            if (
                isinstance(value, Tensor)
                and value.ndim >= 1
                and value.shape[0] == self.batch
                and not NOT_BATCHED.intersection(path)
            ):
                self.batched.setdefault(path, value)
            return value

        return leaf

    def resolve(self, path: Path) -> Path | None:
        """``path`` if it names a per-sample input of this call, else ``None``."""
        return path if path in self.batched else None

    def rows(self, indices: Sequence[int] | Tensor) -> BatchInputs:
        """The view of rows ``indices`` (positions in this call's batch)."""
        return BatchInputs(self, torch.as_tensor(indices, dtype=torch.long), {})

    def build(self, values: Mapping[Path, Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of this call with its per-sample tensors replaced by ``values``."""
        leaf = self._leaf(values)
        args = tuple(
            _map_leaves(a, leaf, (name,)) for name, a in zip(self._arg_names, self.args, strict=True)
        )
        kwargs = {k: _map_leaves(v, leaf, (k,)) for k, v in self.kwargs.items()}
        return args, kwargs


class BatchInputs:
    """Rows of a :class:`DenoiserCall` with some per-sample inputs replaced.

    ``rows`` are positions in the call's batch; ``overrides`` maps an input's path (e.g.
    ``("encoder_hidden_states",)`` or ``("added_cond_kwargs", "text_embeds")``) to a tensor of
    ``len(rows)`` rows used instead of the call's.
    """

    def __init__(self, call: DenoiserCall, rows: Tensor, overrides: Mapping[Path, Tensor]):
        self.call, self.rows, self.overrides = call, rows, dict(overrides)

    def __len__(self) -> int:
        return int(self.rows.numel())

    def replace(
        self, inputs: Mapping[str, Any], samples: Tensor, num_samples: int, label: str
    ) -> BatchInputs:
        """These rows with ``inputs`` (nested by argument name) replaced; see :meth:`_fit`."""
        overrides = dict(self.overrides)
        for name, value in flatten_inputs(inputs).items():
            path = self.call.resolve(name)
            label_of = f"{label}[{'.'.join(name)!r}]"
            if path is None:
                known = sorted(".".join(p) for p in self.call.batched)
                raise ValueError(
                    f"{label_of}: the denoiser has no per-sample input of that name; it has {known}."
                )
            overrides[path] = self._fit(self.call.batched[path], value, samples, num_samples, label_of)
        return BatchInputs(self.call, self.rows, overrides)

    def _fit(self, like: Tensor, value: Any, samples: Tensor, num_samples: int, label: str) -> Tensor:
        """``value`` (1 row, or one per sample) as ``len(self)`` rows for ``samples`` (sample indices of the rows)."""
        if not isinstance(value, Tensor) or value.ndim != like.ndim or value.shape[1:] != like.shape[1:]:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{label} must be a tensor shaped (1 or {num_samples}, {', '.join(map(str, like.shape[1:]))}) like "
                f"the pipeline's own, got {shape}."
            )
        if value.shape[0] not in (1, num_samples):
            raise ValueError(
                f"{label} must have 1 row or one per sample ({num_samples}), got {value.shape[0]}."
            )
        value = value.to(device=like.device, dtype=like.dtype)
        if value.shape[0] == 1:
            return value.expand(len(self), *value.shape[1:]).contiguous()
        return value.index_select(0, samples.to(value.device))

    def take(self, positions: slice) -> BatchInputs:
        """A sub-view: the rows at ``positions`` of this view (to split one branch across devices)."""
        return BatchInputs(
            self.call, self.rows[positions], {p: v[positions] for p, v in self.overrides.items()}
        )

    def is_whole_call(self) -> bool:
        """Whether this view is the call's batch unchanged (all rows, in order, nothing replaced)."""
        return (
            not self.overrides
            and len(self) == self.call.batch
            and bool(torch.equal(self.rows, torch.arange(self.call.batch)))
        )

    def materialize(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the denoiser: the call's own arguments where this view is the whole call."""
        if self.is_whole_call():
            return self.call.args, self.call.kwargs
        values = {path: self._value(path, leaf) for path, leaf in self.call.batched.items()}
        return self.call.build(values)

    def _value(self, path: Path, leaf: Tensor) -> Tensor:
        if path in self.overrides:
            return self.overrides[path]
        return leaf.index_select(0, self.rows.to(leaf.device))

    @staticmethod
    def concat(parts: Sequence[BatchInputs]) -> BatchInputs:
        """One view holding ``parts`` one after the other (all views of the same call)."""
        call = parts[0].call
        if any(part.call is not call for part in parts):
            raise ValueError("Only views of the same denoiser call can be batched together.")
        if len(parts) == 1:
            return parts[0]
        rows = torch.cat([part.rows for part in parts])
        paths = {path for part in parts for path in part.overrides}
        overrides = {
            path: torch.cat([part._value(path, call.batched[path]) for part in parts]) for path in paths
        }
        return BatchInputs(call, rows, overrides)


def prediction_of(out: Any) -> Tensor:
    """The prediction in a denoiser's output: a tensor, the first element of a tuple, or ``.sample``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    raise ValueError(f"Cannot find the prediction in the denoiser's output of type {type(out).__name__}.")


def with_prediction(out: Any, pred: Tensor) -> Any:
    """``out`` (a denoiser's output, as a template) holding ``pred`` instead of its prediction."""
    if isinstance(out, Tensor):
        return pred
    if isinstance(out, tuple):
        return (pred, *out[1:])
    fields = dict(out)
    key = "sample" if "sample" in fields else next(iter(fields))
    fields[key] = pred
    return type(out)(**fields)
