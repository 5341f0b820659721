"""The main job: python -m guidance."""

from __future__ import annotations

import math

import pytest
import torch

import guidance.cli as cli
from guidance.cli import build_parser, main, side_by_side

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)] + list("abcdefghijklmnopqrstuvwxyz")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A local causal-LM folder (tiny random Llama + word-level tokenizer), as --model takes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI loads a model."""
    import guidance.models

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI loaded a model although the input was invalid")

    monkeypatch.setattr(guidance.models, "load_default_lm", refuse)
    monkeypatch.setattr(guidance.models, "load_causal_lm", refuse)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert lines and "error:" in lines[-1]
    return lines[-1]


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
    ("argv", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be in [1, 4096], got 0"),
        (["--typical-p", "1.5"], "--typical-p must be in (0, 1], got 1.5"),
        (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
        (["--prompt", "   "], "--prompt must not be empty"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number, got inf"),
        (["--schedule", "linear", "--schedule-start=-inf"], "--schedule-start must be a finite number"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--model", "/nonexistent/folder"], "--model must be a local folder"),
    ],
)
def test_bad_flags_fail_in_one_line_before_loading_a_model(argv, message, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in _one_error_line(capsys)


def test_a_folder_without_a_config_is_refused_before_loading(tmp_path, capsys, no_model_load):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config.json" in _one_error_line(capsys)


def test_a_model_whose_tokenizer_cannot_load_exits_2_in_one_line(tiny_folder, tmp_path, capsys):
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    for path in tiny_folder.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "tokenizer.json").write_text("{ not json")
    assert main(["--model", str(broken), "--max-new-tokens", "2"]) == 2
    assert "does not load as a causal LM with its tokenizer" in _one_error_line(capsys)


def test_unexpected_failures_print_one_line_and_exit_1(tiny_folder, capsys, monkeypatch):
    import guidance.lm.text

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(guidance.lm.text, "generate_text", boom)
    assert main(["--model", str(tiny_folder), "--max-new-tokens", "2"]) == 1
    assert _one_error_line(capsys).endswith("error: RuntimeError: boom")


@pytest.mark.parametrize("scale", ["25", "-21"])
def test_extreme_scales_warn(scale, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_run", lambda args: 0)
    assert main(["--guidance-scale", scale]) == 0
    err = capsys.readouterr().err
    assert f"warning: --guidance-scale {float(scale):g} is outside [-20, 20]" in err


def test_sampling_flags_turn_sampling_on():
    parser = build_parser()
    assert cli._sampling(parser.parse_args([])) == {"do_sample": False}
    for flag, value in [("--top-p", "0.9"), ("--typical-p", "0.8"), ("--temperature", "0.7"), ("--top-k", "5"),
                        ("--min-p", "0.1")]:
        settings = cli._sampling(parser.parse_args([flag, value]))
        assert settings["do_sample"] is True
        assert math.isclose(float(settings[flag[2:].replace("-", "_")]), float(value))


def test_side_by_side_columns():
    text = side_by_side("Left", "a " * 40, "Right", "b", 60)
    lines = text.splitlines()
    assert all(" | " in line for line in lines)
    assert lines[0].startswith("Left") and lines[0].endswith("Right")
    column = (60 - 3) // 2
    assert all(len(line.split(" | ")[0]) == column for line in lines)
    assert "".join(line.split(" | ")[0] for line in lines[2:]).split() == ["a"] * 40


def _columns(out: str) -> tuple[str, str]:
    rows = [line for line in out.splitlines() if " | " in line][2:]
    left = " ".join(line.split(" | ")[0].strip() for line in rows).split()
    right = " ".join(line.split(" | ")[1].strip() for line in rows).split()
    return " ".join(left), " ".join(right)


def test_main_job_prints_the_unguided_and_guided_continuations(tiny_folder, capsys):
    from guidance.lm.text import generate_text
    from guidance.models import load_causal_lm

    argv = ["--model", str(tiny_folder), "--prompt", "a b c", "--max-new-tokens", "6", "--guidance-scale", "3",
            "--no-chat-template", "--width", "120", "--threads", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no warnings, progress bars or tracebacks
    lines = captured.out.splitlines()
    assert lines[0] == f"model: {tiny_folder}"
    assert lines[3] == "guidance: scale 3, log_probs form"
    assert lines[4] == "decoding: greedy, max_new_tokens=6, seed=0"
    model, tokenizer = load_causal_lm(tiny_folder)
    expected_plain = generate_text(model, tokenizer, "a b c", guidance_scale=1.0, chat=False, max_new_tokens=6)
    expected_guided = generate_text(model, tokenizer, "a b c", guidance_scale=3.0, chat=False, max_new_tokens=6)
    assert expected_plain.texts != expected_guided.texts  # the test would not see a swapped column otherwise
    assert _columns(captured.out) == (" ".join(expected_plain.texts[0].split()), " ".join(expected_guided.texts[0].split()))


def test_schedule_that_ends_guidance_early_runs(tiny_folder, capsys):
    """Regression: a schedule reaching scale 1 before the last token dropped rows from a cache the model no longer read."""
    argv = ["--model", str(tiny_folder), "--prompt", "a b c", "--max-new-tokens", "6", "--schedule", "linear",
            "--schedule-start", "3", "--guidance-scale", "1", "--no-chat-template", "--top-p", "0.9"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "guidance: scale linear 3 -> 1" in captured.out
    assert "decoding: do_sample=True, top_p=0.9" in captured.out


@pytest.mark.slow
def test_main_job_on_the_embedded_model(capsys):
    from guidance.models.smollm2 import default_model_path

    default_model_path()  # on a fresh cache, the one-time conversion reports its progress on stderr
    capsys.readouterr()
    argv = ["--prompt", "Name a colour.", "--max-new-tokens", "6", "--schedule", "linear", "--schedule-start", "3",
            "--guidance-scale", "1", "--width", "100"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    assert "Unguided (scale 1)" in out and "Guided (scale linear 3 -> 1)" in out and "SmolLM2-135M-Instruct" in out
    left, right = _columns(out)
    assert left and right
