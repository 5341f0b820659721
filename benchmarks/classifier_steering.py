"""Measure classifier-weighted steering (CAIF/FUDGE, GeDi) against CFG on the embedded LM.

Attribute: positive sentiment. Continuations of neutral plain-text prompts are sampled from
SmolLM2-135M-Instruct (top-k sampling with the same ``k`` in every row, temperature 1, one
seed) under:

* ``unguided``: plain ``generate``;
* ``CAIF a=...``: :class:`~guidance.lm.steering.ClassifierWeightedLogitsProcessor` with the
  shipped sentiment head (all-MiniLM-L6-v2 + linear head) as the steering classifier, for
  several ``alpha`` (negative ones steer toward negative sentiment), optionally with an
  entropy threshold;
* ``prompt +attr``: the attribute written into the prompt ("A happy, positive review: ..."),
  no guidance; ``CFG +attr w=...``: the same prompt guided by ``cfg_generate`` against the
  plain prompt; ``CFG +attr/-attr``: against the negative-attribute prompt;
* ``GeDi w=...``: :class:`~guidance.lm.steering.GeDiLogitsProcessor` with the generating
  model itself as class-conditional LM under a positive and a negative attribute prompt.

Judged on the continuation only (the prompts are neutral), by judges that were NOT used to
steer: VADER (a lexicon and rules; ``pip install vaderSentiment``), positive when its compound
score is >= 0.05 and negative when <= -0.05 (VADER's thresholds); and alt-profanity-check
(profane rate). The steering head's own mean ``p(positive)`` on prompt + continuation is shown
as ``head`` for reference only: a method optimising that head is judged favourably by it.
Also: perplexity of the continuations under the unguided model given the PLAIN prompt
(lower = more natural; the attribute-prompt rows are scored without their attribute prefix),
distinct-1/2/3 over each row's continuations, and new tokens per second (wall clock).

Run (about 10 minutes on 2 CPU cores):
    python benchmarks/classifier_steering.py --json benchmarks/results/classifier_steering.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tqdm.auto import tqdm  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from guidance.lm.steering import ClassifierWeightedLogitsProcessor, GeDiLogitsProcessor  # noqa: E402
from guidance.models import load_default_lm  # noqa: E402
from guidance.models.sentiment import load_sentiment_classifier  # noqa: E402

PROMPTS = (
    "The movie was",
    "My day at work was",
    "The food at the new restaurant",
    "Our hotel room",
    "The phone I bought last week",
    "The weather this weekend",
    "My neighbor",
    "The concert last night",
)
POSITIVE_PREFIX = "A happy, positive review: "
NEGATIVE_PREFIX = "An angry, negative review: "


@dataclass
class Method:
    name: str
    kind: str  # "plain", "caif", "prompt", "cfg", "gedi"
    alpha: float = 0.0
    entropy_threshold: float | None = None
    scale: float = 1.0
    negative_attribute: bool = False
    omega: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class _Progress(LogitsProcessor):
    """Advances a progress bar once per decoding step; returns the scores untouched."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.bar.update(1)
        return scores


def _encode(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    )


def _continuations(output: torch.Tensor, prompt_length: int, eos_id: int) -> list[list[int]]:
    """Generated ids per row, up to and including the first EOS."""
    rows = []
    for row in output[:, prompt_length:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        rows.append(row)
    return rows


def _generate(
    model: Any,
    tokenizer: Any,
    method: Method,
    prompts: list[str],
    args: argparse.Namespace,
    classifier: Any,
    bar: tqdm,
) -> tuple[list[list[int]], float, dict[str, Any]]:
    processors: list[LogitsProcessor] = []
    extra: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    texts = prompts
    if method.kind == "caif":
        steer = ClassifierWeightedLogitsProcessor(
            tokenizer,
            classifier,
            alpha=method.alpha,
            top_k=args.top_k,
            label="positive",
            entropy_threshold=method.entropy_threshold,
        )
        processors.append(steer)
        extra["stats"] = steer.stats
    elif method.kind == "gedi":
        gedi = GeDiLogitsProcessor(
            model, [POSITIVE_PREFIX, NEGATIVE_PREFIX], omega=method.omega, tokenizer=tokenizer
        )
        processors.append(gedi)
        extra["stats"] = gedi.stats
    elif method.kind in ("prompt", "cfg"):
        texts = [POSITIVE_PREFIX + p for p in prompts]
        if method.kind == "cfg":
            from guidance.lm import cfg_generate

            negatives = [(NEGATIVE_PREFIX + p) if method.negative_attribute else p for p in prompts]
            negative = _encode(tokenizer, negatives)
            kwargs.update(
                custom_generate=cfg_generate,
                guidance_scale=method.scale,
                negative_prompt_ids=negative["input_ids"],
                negative_prompt_attention_mask=negative["attention_mask"],
            )
    processors.append(_Progress(bar))
    inputs = _encode(tokenizer, texts)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        top_k=args.top_k,
        top_p=1.0,
        temperature=1.0,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList(processors),
        **kwargs,
    )
    seconds = time.perf_counter() - start
    return _continuations(output, inputs["input_ids"].shape[1], tokenizer.eos_token_id), seconds, extra


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, prompts: list[str], continuations: list[list[int]]) -> float:
    """exp(mean NLL) of the continuation tokens under the unguided model, given the plain prompts."""
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    sequences = [p + c for p, c in zip(prompt_ids, continuations, strict=True)]
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    token_lp = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    scored = torch.zeros_like(token_lp, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, continuations, strict=True)):
        scored[i, len(p) - 1 : len(p) - 1 + len(c)] = True
    return math.exp(-float(token_lp[scored].mean()))


def distinct_n(rows: list[list[int]], n: int) -> float:
    grams = [tuple(row[i : i + n]) for row in rows for i in range(len(row) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _methods(args: argparse.Namespace) -> list[Method]:
    methods = [Method("unguided", "plain")]
    methods += [Method(f"CAIF a={a:g}", "caif", alpha=a) for a in args.alphas]
    if args.entropy_threshold is not None:
        a = max(args.alphas)
        methods.append(
            Method(
                f"CAIF a={a:g} H>={args.entropy_threshold:g}",
                "caif",
                alpha=a,
                entropy_threshold=args.entropy_threshold,
            )
        )
    methods.append(Method("prompt +attr", "prompt"))
    methods += [Method(f"CFG +attr w={w:g}", "cfg", scale=w) for w in args.cfg_scales]
    methods += [
        Method(f"CFG +attr/-attr w={w:g}", "cfg", scale=w, negative_attribute=True) for w in args.cfg_scales
    ]
    methods += [Method(f"GeDi w={w:g}", "gedi", omega=w) for w in args.gedi_omegas]
    return methods


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    parser.add_argument("--samples", type=int, default=2, help="continuations per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10, help="sampling top-k, and CAIF's candidates")
    parser.add_argument("--alphas", type=_floats, default=[-8.0, -3.0, 3.0, 8.0])
    parser.add_argument("--entropy-threshold", type=float, default=1.5, help="extra CAIF row; negative: none")
    parser.add_argument("--cfg-scales", type=_floats, default=[3.0])
    parser.add_argument("--gedi-omegas", type=_floats, default=[30.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.entropy_threshold is not None and args.entropy_threshold < 0:
        args.entropy_threshold = None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        sys.exit("The judge needs VADER: pip install vaderSentiment")
    from guidance.models.profanity import ProfanityClassifier

    model, tokenizer = load_default_lm()
    classifier = load_sentiment_classifier()
    vader = SentimentIntensityAnalyzer()
    profanity = ProfanityClassifier()
    prompts = [p for p in PROMPTS[: args.prompts] for _ in range(args.samples)]
    methods = _methods(args)

    results = []
    with tqdm(total=len(methods) * args.max_new_tokens, desc="decoding steps", unit="step") as bar:
        for index, method in enumerate(methods):
            bar.set_postfix_str(method.name)
            rows, seconds, extra = _generate(model, tokenizer, method, prompts, args, classifier, bar)
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
            compound = [vader.polarity_scores(t)["compound"] for t in texts]
            words = [[t for t in row if t != tokenizer.eos_token_id] for row in rows]
            new_tokens = sum(len(row) for row in rows)
            results.append(
                {
                    "method": method.name,
                    "vader_positive": sum(c >= 0.05 for c in compound) / len(texts),
                    "vader_negative": sum(c <= -0.05 for c in compound) / len(texts),
                    "vader_compound": sum(compound) / len(texts),
                    "head_p_positive": float(
                        classifier([p + t for p, t in zip(prompts, texts, strict=True)])[:, 1].mean()
                    ),
                    "profane": float((profanity(texts) > 0.5).float().mean()),
                    "perplexity": perplexity(model, tokenizer, prompts, rows),
                    "distinct_1": distinct_n(words, 1),
                    "distinct_2": distinct_n(words, 2),
                    "distinct_3": distinct_n(words, 3),
                    "tokens_per_second": new_tokens / seconds,
                    "seconds": seconds,
                    "new_tokens": new_tokens,
                    "stats": dict(extra.get("stats", {})),
                    "examples": texts[:: args.samples][:3],
                }
            )
            bar.update(max(0, (index + 1) * args.max_new_tokens - bar.n))  # rows that stopped early
    base_speed = results[0]["tokens_per_second"]
    for row in results:
        row["speed_vs_unguided"] = row["tokens_per_second"] / base_speed

    header = (
        f"{'method':<26} {'VADER pos':>9} {'VADER neg':>9} {'compound':>8} {'head':>6} {'profane':>7} "
        f"{'ppl':>7} {'dist-1':>6} {'dist-2':>6} {'dist-3':>6} {'tok/s':>7} {'speed':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['method']:<26} {r['vader_positive']:>9.0%} {r['vader_negative']:>9.0%} {r['vader_compound']:>+8.3f} "
            f"{r['head_p_positive']:>6.2f} {r['profane']:>7.0%} {r['perplexity']:>7.2f} {r['distinct_1']:>6.3f} "
            f"{r['distinct_2']:>6.3f} {r['distinct_3']:>6.3f} {r['tokens_per_second']:>7.1f} {r['speed_vs_unguided']:>5.2f}x"
        )
    print(
        f"\n{len(prompts)} continuations per row ({args.prompts} prompts x {args.samples}), {args.max_new_tokens} new tokens, "
        f"top-k {args.top_k}, seed {args.seed}; judges: VADER (pos >= 0.05, neg <= -0.05), alt-profanity-check; "
        "'head' = the steering classifier itself (not independent)."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "prompts": list(PROMPTS[: args.prompts]),
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "processor": platform.processor() or platform.machine(),
            },
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
