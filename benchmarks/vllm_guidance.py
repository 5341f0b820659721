"""Throughput of guidance in vLLM against plain vLLM and the transformers path, on the embedded LM.

Output tokens per second of SmolLM2-135M-Instruct (float32) with 1, 16 and 64 requests in
flight (offline ``LLM.generate`` on all of them at once; at 1, the requests one after
another), every request a distinct prompt and exactly ``--max-tokens`` new tokens:

* ``plain vLLM``: a stock engine, greedy;
* ``plain vLLM + companion rows``: the same, each request sharing the engine with its
  one-token companion (its last prompt token) as a plain request; only the requests' tokens
  count. CFG's floor: any CFG that decodes a second row per request costs at least this;
* ``plain, CFG engine``: the same requests on the engine built with
  :func:`guidance.vllm.engine_kwargs` (pair scheduler, processors, prefix caching off), to
  show what installing it costs requests that do not use it;
* ``vLLM + CFG``: ``guidance_scale=1.5`` (default unconditional context), greedy;
* ``vLLM + CFG + negative``: with a 9-token negative prompt;
* ``vLLM + typical_p``: ``typical_p=0.9``, temperature 1, seeded;
* ``transformers cfg_generate``: :func:`guidance.lm.cfg_generate`, one left-padded batch.

``cost`` is plain vLLM's tokens/s divided by the row's (how many times slower; CFG's floor is
about the cost of a decode with twice the rows). With ``--repeats N`` every measurement is
taken N times in a row and the median time is used (all times are in the JSON). Threads: ``OMP_NUM_THREADS`` (default 1)
for vLLM (``VLLM_CPU_OMP_THREADS_BIND=nobind``) and torch alike.

Run (a vLLM environment, see ``.ci/vllm.sh``; about 15 minutes on 2 busy CPU cores):
    python benchmarks/vllm_guidance.py --json benchmarks/results/vllm_guidance_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TOPICS = (
    "a lighthouse keeper", "a lost umbrella", "the first snow", "a robot learning to paint", "an old bridge",
    "a midnight train", "a bakery at dawn", "a forgotten letter", "the last bookstore", "a city garden",
    "a chess tournament", "a desert well", "a kite festival", "a violin maker", "the northern lights",
    "a small island", "a clock tower", "a river ferry", "a mountain hut", "a quiet library",
)
STYLES = ("Write a short story about", "Describe", "Tell me a fact about", "Write a poem about")
NEGATIVE = "Write something dull and repetitive."
FLOOR = "plain vLLM + companion rows"


def make_prompts(count: int) -> list[str]:
    return [f"{STYLES[i % len(STYLES)]} {TOPICS[(i // len(STYLES)) % len(TOPICS)]} (#{i})." for i in range(count)]


def engine(model: str, max_seqs: int, **kwargs: Any) -> Any:
    from vllm import LLM

    return LLM(
        model=model, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, max_num_seqs=max_seqs,
        distributed_executor_backend="uni", **kwargs,
    )


def run_vllm(llm: Any, prompts: list[str], params: Any, concurrency: int) -> tuple[int, float]:
    """Output tokens and seconds for ``prompts`` with ``concurrency`` requests in flight."""
    start = time.perf_counter()
    if concurrency == 1:
        outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs), seconds


def companion_prompts(llm: Any, prompts: list[str]) -> list[str]:
    """Each prompt's default unconditional context, its last token, as text."""
    tokenizer = llm.get_tokenizer()
    return [tokenizer.decode(tokenizer(p).input_ids[-1:]) for p in prompts]


def run_vllm_with_companions(
    llm: Any, prompts: list[str], companions: list[str], params: Any, concurrency: int
) -> tuple[int, float]:
    """Like :func:`run_vllm`, each prompt sharing its steps with its companion as a plain request.

    Only the prompts' tokens count: this is what any CFG that decodes a second row per request
    costs at least (the floor), without pairing or guidance.
    """
    start = time.perf_counter()
    if concurrency == 1:
        outputs = [llm.generate([p, c], params, use_tqdm=False)[0] for p, c in zip(prompts, companions, strict=True)]
    else:
        outputs = llm.generate(prompts + companions, params, use_tqdm=False)[: len(prompts)]
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs), seconds


def run_transformers(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[int, float]:
    import torch

    from guidance.lm import cfg_generate

    total, seconds = 0, 0.0
    step = 1 if concurrency == 1 else concurrency
    for start in range(0, len(prompts), step):
        batch = tokenizer(prompts[start : start + step], return_tensors="pt", padding=True, padding_side="left")
        begin = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                guidance_scale=1.5, custom_generate=cfg_generate, pad_token_id=tokenizer.eos_token_id,
            )
        seconds += time.perf_counter() - begin
        total += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return total, seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    import guidance.vllm as gv

    folder = str(gv.default_model_folder())
    concurrencies = args.concurrency
    prompt_sets = {c: make_prompts(args.single_requests if c == 1 else c) for c in concurrencies}
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    cfg = greedy.clone()
    cfg.extra_args = {"guidance_scale": 1.5}
    negative = greedy.clone()
    negative.extra_args = {"guidance_scale": 1.5, "negative_prompt": NEGATIVE}
    typical = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0, ignore_eos=True,
                             extra_args={"typical_p": 0.9})
    results: dict[str, dict[int, dict[str, float]]] = {}

    def record(name: str, c: int, run: Callable[..., tuple[int, float]], *run_args: Any) -> None:
        runs = [run(*run_args) for _ in range(args.repeats)]
        tokens, seconds = runs[0][0], statistics.median(s for _, s in runs)
        results.setdefault(name, {})[c] = {
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "all_seconds": [s for _, s in runs],
        }
        print(f"{name:28s} c={c:3d}  {tokens / seconds:8.1f} tok/s  ({tokens} tokens, {seconds:.1f} s)", flush=True)

    max_seqs = 2 * max(concurrencies)
    llm = engine(folder, max_seqs)
    run_vllm(llm, make_prompts(2), greedy, 2)  # warm-up
    for c in concurrencies:
        record("plain vLLM", c, run_vllm, llm, prompt_sets[c], greedy, c)
        companions = companion_prompts(llm, prompt_sets[c])
        record(FLOOR, c, run_vllm_with_companions, llm, prompt_sets[c], companions, greedy, c)
    del llm
    gc.collect()

    llm = engine(folder, max_seqs, **gv.engine_kwargs())
    run_vllm(llm, make_prompts(2), cfg, 2)
    for c in concurrencies:
        record("plain, CFG engine", c, run_vllm, llm, prompt_sets[c], greedy, c)
        record("vLLM + CFG", c, run_vllm, llm, prompt_sets[c], cfg, c)
        record("vLLM + CFG + negative", c, run_vllm, llm, prompt_sets[c], negative, c)
        record("vLLM + typical_p", c, run_vllm, llm, prompt_sets[c], typical, c)
    del llm
    gc.collect()

    import torch

    from guidance.models import load_causal_lm

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, tokenizer = load_causal_lm(folder)
    for c in concurrencies:
        record("transformers cfg_generate", c, run_transformers, model, tokenizer, prompt_sets[c], args.max_tokens, c)
    return results


def table(results: dict[str, dict[int, dict[str, float]]], concurrencies: list[int]) -> str:
    plain = results["plain vLLM"]
    head = "| method | " + " | ".join(f"tok/s @{c} | cost @{c}" for c in concurrencies) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(concurrencies))]
    for name, by_c in results.items():
        cells = []
        for c in concurrencies:
            tps = by_c[c]["tokens_per_s"]
            cells += [f"{tps:.1f}", f"{plain[c]['tokens_per_s'] / tps:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-requests", type=int, default=8, help="requests run one by one at concurrency 1")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; the median time counts")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = measure(args)
    text = table(results, args.concurrency)
    print(text)
    if args.json is not None:
        import torch
        import vllm

        payload = {
            "benchmark": "vllm_guidance",
            "model": "SmolLM2-135M-Instruct float32",
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "threads": int(os.environ["OMP_NUM_THREADS"]),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "results": {name: {str(c): v for c, v in by_c.items()} for name, by_c in results.items()},
            "cost_vs_plain_vllm": {
                name: {str(c): results["plain vLLM"][c]["tokens_per_s"] / v["tokens_per_s"] for c, v in by_c.items()}
                for name, by_c in results.items()
            },
            "cost_vs_floor": {
                name: {str(c): results[FLOOR][c]["tokens_per_s"] / v["tokens_per_s"] for c, v in by_c.items()}
                for name, by_c in results.items()
                if name.startswith("vLLM + CFG")
            },
            "cost_vs_plain_on_the_cfg_engine": {
                name: {
                    str(c): results["plain, CFG engine"][c]["tokens_per_s"] / v["tokens_per_s"] for c, v in by_c.items()
                }
                for name, by_c in results.items()
                if name.startswith("vLLM +")
            },
            "table": text,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
