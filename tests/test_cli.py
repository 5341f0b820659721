"""The main job: python -m guidance."""

from __future__ import annotations

import pytest

from guidance.cli import build_parser, main, side_by_side


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-new-tokens", "0"],
        ["--typical-p", "1.5"],
        ["--temperature", "0"],
        ["--prompt", "   "],
        ["--model", "/nonexistent/folder"],
    ],
)
def test_bad_flags_fail_before_loading_a_model(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "must" in capsys.readouterr().err


def test_side_by_side_columns():
    text = side_by_side("Left", "a " * 40, "Right", "b", 60)
    lines = text.splitlines()
    assert all(" | " in line for line in lines)
    assert lines[0].startswith("Left") and lines[0].endswith("Right")


@pytest.mark.slow
def test_main_job_on_the_embedded_model(capsys):
    assert main(["--prompt", "Name a colour.", "--max-new-tokens", "6", "--guidance-scale", "2", "--width", "100"]) == 0
    out = capsys.readouterr().out
    assert "Unguided (scale 1)" in out and "Guided (scale 2)" in out and "SmolLM2-135M-Instruct" in out
