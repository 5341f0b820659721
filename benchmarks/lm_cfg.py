"""Tokens per second of CFG decoding: plain generate vs transformers' CFG vs ours, in one run.

    python benchmarks/lm_cfg.py                      # embedded SmolLM2-135M-Instruct on the CPU
    python benchmarks/lm_cfg.py --device cuda --random-weights --json out.json

Every mode generates exactly ``--new-tokens`` tokens (EOS is ignored) for batch 1 and batch 8,
greedy, float32 unless ``--dtype`` says otherwise. Each figure is the median of ``--repeats``
timed runs after one warm-up; "x plain" is the time relative to plain ``generate`` at the same
batch size (plain = 1.00). ``--random-weights`` builds the SmolLM2-135M architecture with random
weights, for machines where the embedded weights are not installed (timing is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from guidance import cfg_generate  # noqa: E402

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain photosynthesis to a ten-year-old.",
    "What are three tips for staying focused while studying?",
    "Describe the city of Paris in spring.",
    "Give me a recipe for a quick vegetarian dinner.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "Summarise the plot of a detective novel you invent.",
]
NEGATIVE = "Write something boring and generic."


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        from transformers import LlamaForCausalLM

        from guidance.models.smollm2 import smollm2_config

        torch.manual_seed(0)
        model = LlamaForCausalLM(smollm2_config()).to(dtype=dtype, device=args.device).eval()
        return model, None
    from guidance.models import load_default_lm

    return load_default_lm(dtype=dtype, device=args.device)


def _inputs(tokenizer: Any, batch: int, device: str, vocab: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if tokenizer is None:  # random weights: random prompts of unequal lengths, left-padded
        generator = torch.Generator().manual_seed(batch)
        lengths = [24 + 5 * (i % 4) for i in range(batch)]
        width = max(lengths)
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, length in enumerate(lengths):
            ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=generator)
            mask[row, width - length :] = 1
        negative = torch.randint(3, vocab, (1, 9), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, {
            "negative_prompt_ids": negative.to(device),
            "negative_prompt_attention_mask": torch.ones_like(negative).to(device),
        }
    from guidance.lm import encode_prompts

    encoded = encode_prompts(tokenizer, [PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    negative = encode_prompts(tokenizer, [NEGATIVE])
    return {k: v.to(device) for k, v in encoded.items()}, {
        "negative_prompt_ids": negative["input_ids"].to(device),
        "negative_prompt_attention_mask": negative["attention_mask"].to(device),
    }


def _timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, tokenizer = _load(args)
    pad = 0 if tokenizer is None else tokenizer.pad_token_id
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=pad, do_sample=False)
    modes: dict[str, dict[str, Any]] = {
        "plain generate": {},
        "transformers CFG": {"guidance_scale": args.scale},
        "ours (batched CFG)": {"guidance_scale": args.scale, "custom_generate": cfg_generate},
        "transformers CFG + negative prompt": {"guidance_scale": args.scale, "negative": True},
        "ours + negative prompt": {"guidance_scale": args.scale, "negative": True, "custom_generate": cfg_generate},
    }
    if args.typical:
        modes["transformers CFG + typical_p"] = {"guidance_scale": args.scale, "typical": True}
        modes["ours + typical_p"] = {"guidance_scale": args.scale, "typical": True, "custom_generate": cfg_generate}
    rows: list[dict[str, Any]] = []
    progress = tqdm(total=len(args.batches) * len(modes) * (args.repeats + 1), desc="lm_cfg", file=sys.stderr)
    for batch in args.batches:
        inputs, negative = _inputs(tokenizer, batch, args.device, model.config.vocab_size)
        plain_seconds = None
        for name, spec in modes.items():
            spec = dict(spec)
            kwargs: dict[str, Any] = dict(common)
            if spec.pop("negative", False):
                if "custom_generate" in spec:
                    kwargs.update(negative)  # one row, broadcast to the batch by cfg_generate
                else:  # transformers' CFG needs one negative prompt per row
                    kwargs.update({k: v.expand(batch, -1) for k, v in negative.items()})
            if spec.pop("typical", False):
                kwargs.update(do_sample=True, typical_p=0.9)
            kwargs.update(spec)
            times = []
            for repeat in range(args.repeats + 1):
                torch.manual_seed(repeat)
                seconds, out = _timed(lambda kwargs=kwargs, inputs=inputs: model.generate(**inputs, **kwargs), args.device)
                progress.update()
                if repeat > 0:
                    times.append(seconds)
            generated = out.shape[1] - inputs["input_ids"].shape[1]
            assert generated == args.new_tokens, (name, generated)
            median = statistics.median(times)
            if name == "plain generate":
                plain_seconds = median
            rows.append(
                {
                    "mode": name,
                    "batch": batch,
                    "new_tokens": args.new_tokens,
                    "seconds": median,
                    "tokens_per_second": batch * args.new_tokens / median,
                    "time_vs_plain": median / plain_seconds if plain_seconds else None,
                }
            )
    progress.close()
    return rows


def table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| mode | batch | tokens/s | time x plain |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['batch']} | {row['tokens_per_second']:.1f} | {row['time_vs_plain']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--typical", action="store_true", help="also time CFG + typical_p=0.9 sampling")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = run(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    header = (
        f"CFG decoding, SmolLM2-135M ({'random weights' if args.random_weights else 'embedded'}), {args.dtype}, "
        f"{device}, {args.new_tokens} new tokens, scale {args.scale}, median of {args.repeats}"
    )
    print(table(rows, header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
