"""The floor of CFG's cost in vLLM: a request's rows plus its companions' rows, with no pairing.

Runs 16 prompts alone, then the same 16 prompts together with 16 one-token companion prompts
(the default unconditional context: each prompt's last token) as plain greedy requests, on a
stock engine, interleaved, median of ``--repeats``. The ratio is what any CFG that decodes a
second row per request costs at least on this machine; ``benchmarks/vllm_guidance.py`` gives
what ours costs.

Run (a vLLM environment, see ``.ci/vllm.sh``; about 2 minutes on 2 CPU cores):
    python benchmarks/vllm_cfg_floor.py --json benchmarks/results/vllm_cfg_floor_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vllm_guidance import companion_prompts, engine, make_prompts, run_vllm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from vllm import SamplingParams

    import guidance.vllm as gv

    llm = engine(str(gv.default_model_folder()), 4 * args.requests)
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompts = make_prompts(args.requests)
    companions = companion_prompts(llm, prompts)
    run_vllm(llm, make_prompts(2), greedy, 2)  # warm-up
    alone, paired = [], []
    for _ in range(args.repeats):
        alone.append(run_vllm(llm, prompts, greedy, args.requests)[1])
        paired.append(run_vllm(llm, prompts + companions, greedy, 2 * args.requests)[1])
    result = {
        "requests": args.requests, "max_tokens": args.max_tokens,
        "seconds_alone": alone, "seconds_with_companion_rows": paired,
        "floor": statistics.median(paired) / statistics.median(alone),
    }
    print("| rows | seconds (median) | x alone |\n|---|---:|---:|")
    print(f"| {args.requests} requests | {statistics.median(alone):.2f} | 1.00 |")
    print(f"| + {args.requests} companion rows | {statistics.median(paired):.2f} | {result['floor']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
