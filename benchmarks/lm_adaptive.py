"""Adaptive CFG decoding on the embedded model: accuracy, unconditional positions and time, in one run.

    python benchmarks/lm_adaptive.py --quick          # ~3 minutes on a quiet 2-core CPU
    python benchmarks/lm_adaptive.py                  # writes benchmarks/results/lm_adaptive_cpu.json
    python benchmarks/lm_adaptive.py --parts time long --update   # re-time, keep the accuracy table

Three measurements, greedy, float32, ``--threads`` CPU threads (default 1):

1. **Last-word task** (``benchmarks/data/last_word.tsv``, our own LAMBADA-style passages):
   each passage without its last word is continued until the first word is complete; the
   item is right when that word equals the target. Plain decoding, full CFG (``--scale``) and
   adaptive CFG at each ``--thresholds`` value (plus ``inf``: exact rules only) run on the
   same prompts, batch ``--task-batch``. "uncond positions" is the share of the positions
   full CFG computes for the live rows (the unconditional context plus each token fed back
   before the row finished); "of batched" the share of what batched CFG computes, finished
   rows included.
2. **Task time** at batch 1 and 8: the same decoding on the first ``--time-items`` items, relative
   to plain ``generate`` at the same batch size (median of ``--repeats`` runs after a warm-up).
3. **Long generation** at batch 1 and 8: ``--new-tokens`` tokens (EOS ignored) after chat
   prompts, as ``benchmarks/lm_cfg.py`` does, relative to plain ``generate``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from guidance import cfg_generate  # noqa: E402
from guidance.lm.adaptive import AdaptiveLMGuidance  # noqa: E402

try:
    from tqdm import tqdm  # noqa: E402
except ImportError:  # a plain counter on stderr
    def tqdm(iterable: Any, desc: str = "", total: int | None = None, **_: Any) -> Any:
        total = total or len(iterable)
        for index, value in enumerate(iterable):
            print(f"{desc}: {index + 1}/{total}", file=sys.stderr, flush=True)
            yield value

DATA = Path(__file__).with_name("data") / "last_word.tsv"
RESULTS = Path(__file__).with_name("results") / "lm_adaptive_cpu.json"
WORD = re.compile(r"\s*([A-Za-z]+)")
CHAT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain photosynthesis to a ten-year-old.",
    "What are three tips for staying focused while studying?",
    "Describe the city of Paris in spring.",
    "Give me a recipe for a quick vegetarian dinner.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "Summarise the plot of a detective novel you invent.",
]


class FirstWordDone(StoppingCriteria):
    """Stops a row once its continuation holds a complete first word (letters followed by anything else)."""

    eos_token_id = None  # counts as an end-of-sequence criterion: finished rows receive padding

    def __init__(self, tokenizer: Any, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [bool(re.match(r"\s*[A-Za-z]+[^A-Za-z]", text)) or bool(re.match(r"\s*[^\sA-Za-z]", text)) for text in texts]
        return torch.tensor(done, device=input_ids.device)


def first_word(text: str) -> str:
    match = WORD.match(text)
    return match.group(1).lower() if match else ""


def load_items(quick: bool, limit: int | None) -> list[dict[str, str]]:
    with DATA.open(encoding="utf-8") as handle:
        items = list(csv.DictReader(handle, delimiter="\t"))
    if quick:
        items = items[::7]
    return items[:limit] if limit else items


def _encode(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def run_batch(model: Any, tokenizer: Any, contexts: list[str], mode: dict[str, Any], max_new_tokens: int) -> Any:
    inputs = _encode(tokenizer, contexts)
    length = inputs["input_ids"].shape[1]
    stop = StoppingCriteriaList([FirstWordDone(tokenizer, length)])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=stop, return_dict_in_generate=True,
                  pad_token_id=tokenizer.pad_token_id)
    kwargs.update(mode)
    return model.generate(**inputs, **kwargs), length


def modes(scale: float, thresholds: list[float]) -> dict[str, dict[str, Any]]:
    guided = {"guidance_scale": scale, "custom_generate": cfg_generate}
    out: dict[str, dict[str, Any]] = {"plain generate": {}, f"full CFG (w={scale:g})": guided}
    for threshold in thresholds:
        name = "adaptive, exact rules only" if math.isinf(threshold) else f"adaptive, threshold {threshold:g}"
        out[name] = {**guided, "guidance_adaptive": AdaptiveLMGuidance(threshold=threshold)}
    return out


def task_accuracy(model: Any, tokenizer: Any, items: list[dict[str, str]], args: argparse.Namespace) -> list[dict]:
    order = sorted(range(len(items)), key=lambda i: len(tokenizer(items[i]["context"])["input_ids"]))
    rows = []
    for name, mode in modes(args.scale, args.thresholds).items():
        right, computed, live, batched, decisions = 0, 0, 0, 0, torch.zeros(3, dtype=torch.long)
        start = time.perf_counter()
        for first in tqdm(range(0, len(order), args.task_batch), desc=f"accuracy, {name}", leave=False):
            batch = [items[i] for i in order[first : first + args.task_batch]]
            out, length = run_batch(model, tokenizer, [b["context"] for b in batch], mode, args.max_new_tokens)
            texts = tokenizer.batch_decode(out.sequences[:, length:], skip_special_tokens=True)
            right += sum(first_word(t) == b["target"].lower() for t, b in zip(texts, batch, strict=True))
            stats = getattr(out, "adaptive_stats", None)
            if stats is not None:
                computed += int(stats.unconditional_positions.sum())
                batched += int(stats.full_cfg_positions.sum())
                live += int(stats.live_cfg_positions.sum())
                decisions += torch.stack([(stats.decisions == code).sum() for code in (0, 1, 2)])
        rows.append({
            "mode": name,
            "items": len(items),
            "accuracy": right / len(items),
            "uncond_fraction_live": computed / live if live else None,
            "uncond_fraction_batched": computed / batched if batched else None,
            "guided_steps": int(decisions[0]) if batched else None,
            "exact_skips": int(decisions[1]) if batched else None,
            "heuristic_skips": int(decisions[2]) if batched else None,
            "seconds": time.perf_counter() - start,
        })
        print(f"  {name}: accuracy {rows[-1]['accuracy']:.3f}", file=sys.stderr)
    return rows


def _interleaved_medians(calls: dict[str, list[Any]], repeats: int, desc: str) -> tuple[dict[str, float], dict]:
    """Median over rounds of each mode's total seconds, and each mode's outputs of the last round.

    ``calls[mode]`` is one call per chunk of work. Within a round the modes take turns on every
    chunk (the order rotating from chunk to chunk), so load drifts of a shared machine hit all
    modes alike; one warm-up round comes first.
    """
    names = list(calls)
    chunks = len(next(iter(calls.values())))
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[Any]] = {}
    for round_ in tqdm(range(repeats + 1), desc=desc, leave=False):
        total = dict.fromkeys(names, 0.0)
        outputs = {name: [] for name in names}
        for chunk in range(chunks):
            shift = (chunk + round_) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                outputs[name].append(calls[name][chunk]())
                total[name] += time.perf_counter() - start
        if round_:
            for name in names:
                times[name].append(total[name])
    return {name: statistics.median(values) for name, values in times.items()}, outputs


def _stats_fields(outputs: list[Any]) -> dict[str, float | None]:
    """Unconditional positions computed (share of what CFG needs) and tokens guided, over one round's outputs."""
    stats = [out.adaptive_stats for out in outputs if getattr(out, "adaptive_stats", None) is not None]
    if not stats:
        return {"uncond_fraction": None, "guided_fraction": None}
    computed = sum(int(s.unconditional_positions.sum()) for s in stats)
    live = sum(int(s.live_cfg_positions.sum()) for s in stats)
    guided = sum(int((s.decisions == 0).sum()) for s in stats)
    decided = sum(int((s.decisions != 3).sum()) for s in stats)  # finished rows' padding steps not counted
    return {"uncond_fraction": computed / live if live else None, "guided_fraction": guided / decided if decided else None}


def _timed_modes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return modes(args.scale, args.time_thresholds or args.thresholds[:1])


def task_timing(model: Any, tokenizer: Any, items: list[dict[str, str]], args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch in args.batches:
        contexts = [item["context"] for item in items[: max(batch, args.time_items)]]
        chunks = [contexts[i : i + batch] for i in range(0, len(contexts), batch)]
        calls = {
            name: [lambda mode=mode, chunk=chunk: run_batch(model, tokenizer, chunk, mode, args.max_new_tokens)[0]
                   for chunk in chunks]
            for name, mode in _timed_modes(args).items()
        }
        medians, outputs = _interleaved_medians(calls, args.repeats, f"task time, batch {batch}")
        plain = medians["plain generate"]
        for name, seconds in medians.items():
            rows.append({"part": "task", "mode": name, "batch": batch, "items": len(contexts), "seconds": seconds,
                         "time_vs_plain": seconds / plain, **_stats_fields(outputs[name])})
            print(f"  task, batch {batch}, {name}: {seconds / plain:.2f} x plain", file=sys.stderr)
    return rows


def long_timing(model: Any, tokenizer: Any, args: argparse.Namespace) -> list[dict]:
    rows = []
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
    for batch in args.batches:
        prompts = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(batch)]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        inputs = _encode(tokenizer, texts)
        calls = {name: [lambda mode=mode, inputs=inputs: model.generate(**inputs, **common, **mode)]
                 for name, mode in _timed_modes(args).items()}
        medians, outputs = _interleaved_medians(calls, args.repeats, f"long time, batch {batch}")
        plain = medians["plain generate"]
        for name, seconds in medians.items():
            rows.append({
                "part": "long", "mode": name, "batch": batch, "new_tokens": args.new_tokens, "seconds": seconds,
                "tokens_per_second": batch * args.new_tokens / seconds, "time_vs_plain": seconds / plain,
                **_stats_fields(outputs[name]),
            })
            print(f"  long, batch {batch}, {name}: {seconds / plain:.2f} x plain", file=sys.stderr)
    return rows


def tables(accuracy: list[dict], timing: list[dict], header: str) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [header]
    if accuracy:
        lines += ["", "| mode | accuracy | uncond positions (live) | of batched CFG | guided / exact / heuristic steps |",
                  "|---|---:|---:|---:|---|"]
    for row in accuracy:
        steps = "-" if row["guided_steps"] is None else (
            f"{row['guided_steps']} / {row['exact_skips']} / {row['heuristic_skips']}")
        lines.append(f"| {row['mode']} | {pct(row['accuracy'])} | {pct(row['uncond_fraction_live'])} | "
                     f"{pct(row['uncond_fraction_batched'])} | {steps} |")
    if timing:
        lines += ["", "| part | mode | batch | seconds | time x plain | uncond positions | guided tokens |",
                  "|---|---|---:|---:|---:|---:|---:|"]
    for row in timing:
        lines.append(f"| {row['part']} | {row['mode']} | {row['batch']} | {row['seconds']:.2f} | "
                     f"{row['time_vs_plain']:.2f} | {pct(row.get('uncond_fraction'))} | {pct(row.get('guided_fraction'))} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/7 of the items, 2 repeats, 32 long tokens")
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="adaptive thresholds for the accuracy table; default 4 (quick) or 4 2 3 6 inf")
    parser.add_argument("--time-thresholds", type=float, nargs="+", default=None,
                        help="adaptive thresholds timed (default: the first of --thresholds)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N items")
    parser.add_argument("--task-batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--time-items", type=int, default=None, help="items timed per batch size (at least one batch)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None, help="long generation length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", nargs="+", choices=("accuracy", "time", "long"), default=["accuracy", "time", "long"],
                        help="which measurements to run")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"results file (default: {RESULTS.relative_to(RESULTS.parents[2])}; none with --quick)")
    parser.add_argument("--no-json", action="store_true", help="print the tables only")
    parser.add_argument("--update", action="store_true",
                        help="keep the parts of an existing --json file that this run does not measure")
    args = parser.parse_args(argv)
    args.thresholds = args.thresholds or ([4.0] if args.quick else [4.0, 2.0, 3.0, 6.0, math.inf])
    args.time_items = args.time_items or (8 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    if args.json is None and not args.quick:
        args.json = RESULTS
    if args.no_json:
        args.json = None
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from guidance.models import load_default_lm

    hf_logging.set_verbosity_error()
    model, tokenizer = load_default_lm()
    items = load_items(args.quick, args.limit)
    print(f"task: {len(items)} items", file=sys.stderr)
    load_before = os.getloadavg()
    accuracy = task_accuracy(model, tokenizer, items, args) if "accuracy" in args.parts else []
    timing = task_timing(model, tokenizer, items, args) if "time" in args.parts else []
    if "long" in args.parts:
        timing += long_timing(model, tokenizer, args)
    load = f"load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    header = (
        f"Adaptive CFG, SmolLM2-135M-Instruct (embedded), float32, CPU ({os.cpu_count()} cores, {args.threads} thread, "
        f"{load}), greedy, w={args.scale:g}, last-word task: {len(items)} items, batch {args.task_batch}; "
        f"time: median of {args.repeats}, variants interleaved; long: {args.new_tokens} tokens"
    )
    result = {"header": header, "task": accuracy, "timing": timing, "argv": sys.argv[1:] if argv is None else argv}
    if args.update and args.json and args.json.exists():
        result = _merged(json.loads(args.json.read_text()), result, args.parts)
    print(tables(result["task"], result["timing"], header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


def _merged(old: dict[str, Any], new: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """``new`` with the rows of ``old`` for the parts this run did not measure (their header kept apart)."""
    part_of = {"task": "time", "long": "long"}  # timing row part -> the --parts name that measures it
    kept_timing = [row for row in old.get("timing", []) if part_of[row["part"]] not in parts]
    merged = dict(new)
    if "accuracy" not in parts:
        merged["task"] = old.get("task", [])
        merged["task_header"] = old.get("task_header", old.get("header"))
    merged["timing"] = kept_timing + new["timing"]
    return merged


if __name__ == "__main__":
    main()
