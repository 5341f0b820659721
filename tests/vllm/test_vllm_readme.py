"""The README's vLLM examples run as printed, as scripts (vLLM spawns engine processes: ``__main__``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM (tests/vllm itself can look like a namespace package "vllm")

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
VLLM_BLOCKS = [
    block
    for block in re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    if re.search(r"^(from|import) vllm\b", block, flags=re.M)
]


def test_the_readme_has_a_vllm_example():
    assert VLLM_BLOCKS


@pytest.mark.parametrize("index", range(len(VLLM_BLOCKS)))
def test_readme_vllm_block_runs_as_a_script(index, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(VLLM_BLOCKS[index])
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # as a user runs it: engine in its own process
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.strip()]
    assert printed, "the example printed nothing"
