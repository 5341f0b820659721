"""An independent judge for the digits model: a small CNN digit classifier.

Trained on the training split of :func:`guidance.models.digits.load_digits_split` only
(the diffusion model's training data; the held-out split is never seen), used only to
evaluate samples: the accuracy of the requested class, and a 64-dimensional feature
space (:meth:`DigitsJudge.features`) for within-class diversity and a Frechet distance.
Inputs are images in ``[0, 1]`` of shape ``(B, 1, 8, 8)`` (what the pipeline returns with
``output_type="pt"``).

Train it (seconds) with ``python -m guidance.models.digits_judge``; the weights ship as
``guidance/models/weights/digits_judge.safetensors``.

Example:
    >>> from guidance.models.digits import load_digits_split, to_unit_range
    >>> from guidance.models.digits_judge import load_digits_judge
    >>> judge = load_digits_judge()
    >>> images, labels = load_digits_split("heldout")
    >>> accuracy = (judge.predict(to_unit_range(images)) == labels).float().mean().item()
    >>> accuracy > 0.95
    True
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guidance.models.digits import NUM_CLASSES, WEIGHTS_DIR, load_digits_split, to_unit_range

__all__ = ["DigitsJudge", "load_digits_judge", "train_judge", "frechet_distance", "mean_pairwise_distance"]

JUDGE_WEIGHTS = "digits_judge.safetensors"
FEATURE_DIM = 64


class DigitsJudge(nn.Module):
    """Conv(32)-Conv(32)-pool-Conv(64)-Conv(64)-pool-Linear(64)-Linear(10) on 8x8 images in ``[0, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, FEATURE_DIM),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    @staticmethod
    def _check(images: Tensor) -> Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"`images` must have shape (B, 1, 8, 8), got {tuple(images.shape)}.")
        return images.float()

    def features(self, images: Tensor) -> Tensor:
        """The 64-d penultimate activations, the space of the Frechet distance and diversity."""
        return self.body(self._check(images))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, 10)``."""
        return self.head(self.dropout(self.features(images)))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """The most likely digit per image (eval mode, no gradients)."""
        was_training = self.training
        self.eval()
        try:
            return self(images).argmax(dim=-1)
        finally:
            self.train(was_training)


def load_digits_judge(weights_dir: str | Path | None = None) -> DigitsJudge:
    """The shipped judge from safetensors, in eval mode without gradients."""
    from safetensors.torch import load_file

    path = (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / JUDGE_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; train it with `python -m guidance.models.digits_judge`.")
    judge = DigitsJudge()
    judge.load_state_dict(load_file(str(path)), strict=True)
    return judge.eval().requires_grad_(False)


def _shift(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random translation by up to one pixel in each direction (zero padding = background)."""
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dx, dy) in enumerate(offsets)])


def train_judge(
    epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, out: Path | None = WEIGHTS_DIR
) -> dict:
    """Train on the training split (with one-pixel shifts), report held-out accuracy, save to ``out``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = load_digits_split("train")
    test_x, test_y = load_digits_split("heldout")
    train_x, test_x = to_unit_range(train_x), to_unit_range(test_x)
    judge = DigitsJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * ((len(train_y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    start = time.perf_counter()
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = _shift(train_x[idx], gen)
            loss = F.cross_entropy(judge(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    judge.eval()
    log = {
        "epochs": epochs,
        "seed": seed,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_accuracy": float((judge.predict(train_x) == train_y).float().mean()),
        "heldout_accuracy": float((judge.predict(test_x) == test_y).float().mean()),
        "heldout_images": len(test_y),
    }
    if out is not None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out / JUDGE_WEIGHTS))
        (out / "digits_judge_train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, D)`` (the FID formula).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, in float64.
    """
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"`features_a` and `features_b` must be (N, D) with the same D, got {tuple(features_a.shape)} and {tuple(features_b.shape)}."
        )
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError("Each feature set needs at least 2 rows.")
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(value.clamp_min(0))


def mean_pairwise_distance(features: Tensor) -> float:
    """Mean Euclidean distance over all distinct pairs of rows (a diversity measure)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"`features` must be (N, D) with N >= 2, got {tuple(features.shape)}.")
    dist = torch.cdist(features.double(), features.double())
    n = features.shape[0]
    return float(dist.sum() / (n * (n - 1)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits judge (a small CNN classifier).")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(train_judge(epochs=args.epochs, seed=args.seed, out=args.out), indent=2))


if __name__ == "__main__":
    main()
