"""Repository-root pytest hooks for doctest runs over the packages (``pytest --doctest-modules samplers``).

The Triton kernel modules import ``triton`` at import time; where it is not installed they are
left out of doctest collection (their examples need a CUDA GPU and are marked ``+SKIP`` anyway).
"""

from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("triton") is None:
    collect_ignore += ["samplers/kernels/triton_kernels.py", "samplers/kernels/triton_split.py"]
