"""Replacing one method of one object, and restoring it exactly (the denoiser's ``forward``, CFG++'s ``step``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["InstancePatch"]


class InstancePatch:
    """Sets ``obj.<name>`` to a function calling ``target`` that looks like the original method.

    The replacement carries the original's name, docstring and signature (pipelines inspect
    ``forward``'s parameters). :meth:`restore` puts back exactly what was there: the instance
    attribute if there was one, else nothing (the class's method shows through again).
    """

    def __init__(self, obj: Any, name: str, target: Callable[..., Any]):
        self.obj, self.name = obj, name
        self.original = getattr(obj, name)
        self._had_instance_attribute = name in obj.__dict__

        @functools.wraps(self.original)
        def replacement(*args: Any, **kwargs: Any) -> Any:
            return target(*args, **kwargs)

        self.replacement = replacement
        setattr(obj, name, replacement)

    @property
    def intact(self) -> bool:
        """Whether the replacement is still in place (nothing else replaced the method since)."""
        return self.obj.__dict__.get(self.name) is self.replacement

    def restore(self) -> None:
        if self._had_instance_attribute:
            setattr(self.obj, self.name, self.original)
        else:
            self.obj.__dict__.pop(self.name, None)
