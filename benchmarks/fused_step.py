"""One guided sampling step: combine + warpers + ``torch.multinomial`` vs the fused call, in one run.

    python benchmarks/fused_step.py                      # CPU, SmolLM2's vocabulary (49,152 tokens)
    python benchmarks/fused_step.py --device cuda --json benchmarks/results/fused_step_gpu.json

The unfused step is what ``cfg_generate``'s sampling loop did before the fused path:
``cfg_log_softmax`` (the CFG combine), the warpers (transformers' ``TemperatureLogitsWarper``,
then the sort-free :class:`samplers.typical.LocallyTypicalWarper`, as the loop uses while
guiding), softmax and ``torch.multinomial``. The fused step is
:meth:`samplers.kernels.FusedSampling.sample` with the same settings. Each figure is the median
of ``--repeats`` timings (each ``--inner`` steps) after a warm-up; "fused x" is fused time over
unfused time (below 1: the fused step is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402
from transformers.generation.logits_process import TemperatureLogitsWarper  # noqa: E402

from samplers.kernels import cfg_log_softmax, fused_warpers_supported  # noqa: E402
from samplers.typical import LocallyTypicalWarper  # noqa: E402

SETTINGS = {
    "plain": [],
    "temperature 0.8": [TemperatureLogitsWarper(0.8)],
    "temperature 0.8 + typical 0.9": [TemperatureLogitsWarper(0.8), LocallyTypicalWarper(0.9)],
}


def _time(fn, inner: int, repeats: int, device: str) -> float:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _step_row(batch: int, name: str, warpers: list, args: argparse.Namespace) -> dict:
    gen = torch.Generator(device=args.device).manual_seed(0)
    cond = torch.randn(batch, args.vocab, device=args.device, generator=gen) * 3
    uncond = torch.randn(batch, args.vocab, device=args.device, generator=gen) * 3
    ids = torch.zeros(batch, 1, dtype=torch.long, device=args.device)
    processors = LogitsProcessorList(warpers)
    fused = fused_warpers_supported(processors)

    def unfused() -> torch.Tensor:
        scores = processors(ids, cfg_log_softmax(cond, uncond, 1.5))
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen)

    t_unfused = _time(unfused, args.inner, args.repeats, args.device)
    t_fused = _time(lambda: fused.sample(cond, uncond, 1.5, generator=gen), args.inner, args.repeats, args.device)
    return dict(batch=batch, what=f"step, {name}", unfused_ms=t_unfused * 1e3, fused_ms=t_fused * 1e3)


def _generate_row(batch: int, args: argparse.Namespace) -> dict:
    """``cfg_generate`` end to end (SmolLM2-135M architecture, random weights): per-token time."""
    from transformers import LlamaForCausalLM

    from guidance import cfg_generate
    from guidance.models.smollm2 import smollm2_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config()).to(args.device).eval()
    ids = torch.randint(100, 1000, (batch, 16), device=args.device)
    model.generation_config.eos_token_id = None  # exactly --new-tokens tokens (min_new_tokens would block fusing)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                  do_sample=True, top_k=0, temperature=0.8, typical_p=0.9, guidance_scale=1.5,
                  custom_generate=cfg_generate, generator=torch.Generator(device=args.device).manual_seed(0))
    times = {}
    for fused in (False, True):
        times[fused] = _time(lambda fused=fused: model.generate(ids, cfg_fused_sampling=fused, **kwargs), 1,
                             args.repeats, args.device) / args.new_tokens
    what = f"cfg_generate, temperature 0.8 + typical 0.9, {args.new_tokens} tokens"
    return dict(batch=batch, what=what, unfused_ms=times[False] * 1e3, fused_ms=times[True] * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--generate", action="store_true", help="also time cfg_generate end to end")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [_step_row(batch, name, warpers, args) for batch in args.batches for name, warpers in SETTINGS.items()]
    if args.generate:
        rows += [_generate_row(batch, args) for batch in args.batches]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'what':<64} {'unfused ms':>10} {'fused ms':>9} {'fused x':>8}")
    for r in rows:
        r["ratio"] = r["fused_ms"] / r["unfused_ms"]
        print(f"{r['batch']:>5} {r['what']:<64} {r['unfused_ms']:>10.3f} {r['fused_ms']:>9.3f} {r['ratio']:>8.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(dict(device=args.device, threads=torch.get_num_threads(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
