"""A deliberately weaker digits model, the "bad version" that :class:`~guidance.guiders.AutoGuidance` steers away from.

AutoGuidance (Karras et al. 2024) guides a model with a smaller and less trained version of
itself, given the same condition. This module trains and loads such a model for the shipped
digits UNet (:mod:`guidance.models.digits`): the same architecture family and noise schedule,
a quarter of the channels (16/32/32 instead of 32/64/64) and a short run (``--steps 600``,
batch 64, no condition dropout needed but kept at 0.15 so it can also serve as an
unconditional model). Train it with ``python -m guidance.models.digits_weak`` (seeded; a few
minutes on one CPU core); the weights ship as ``weights/digits_weak_unet.safetensors``.

Example:
    >>> from guidance.models.digits_weak import load_digits_weak_unet
    >>> weak = load_digits_weak_unet()
    >>> sum(p.numel() for p in weak.parameters()) < 300_000
    True
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from guidance.models.digits import WEIGHTS_DIR, digits_unet_config, load_unet
from guidance.validation import check_int

__all__ = ["digits_weak_unet_config", "build_digits_weak_unet", "load_digits_weak_unet", "train_weak", "main"]

WEAK_WEIGHTS = "digits_weak_unet.safetensors"
WEAK_CONFIG = "digits_weak_unet_config.json"
WEAK_LOG = "digits_weak_unet_train_log.json"


def digits_weak_unet_config() -> dict[str, Any]:
    """The shipped UNet's configuration with a quarter of the channels."""
    config = digits_unet_config()
    config.update(block_out_channels=[16, 32, 32], norm_num_groups=8, attention_head_dim=16)
    return config


def build_digits_weak_unet(seed: int | None = None) -> UNet2DModel:
    """A randomly initialised weak UNet (``seed`` makes the init reproducible)."""
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DModel(**digits_weak_unet_config())


def load_digits_weak_unet(weights_dir: str | Path | None = None) -> UNet2DModel:
    """The trained weak UNet from safetensors (no pickle), float32, eval mode."""
    return load_unet(weights_dir, WEAK_WEIGHTS, WEAK_CONFIG, digits_weak_unet_config(), "guidance.models.digits_weak")


def train_weak(
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    cond_dropout: float = 0.15,
    ema_decay: float = 0.99,
    seed: int = 0,
    out: Path = WEIGHTS_DIR,
) -> dict:
    """Train the weak UNet (same recipe as :mod:`guidance.models.digits_train`, shorter) and write it to ``out``."""
    from safetensors.torch import save_file

    from guidance.models.digits import load_digits_split
    from guidance.models.digits_train import DigitsTrainer, heldout_loss

    check_int(steps, "steps", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    torch.manual_seed(seed)
    images, labels = load_digits_split("train")
    heldout_images, heldout_labels = load_digits_split("heldout")
    trainer = DigitsTrainer(
        build_digits_weak_unet,
        seed=seed,
        lr=lr,
        warmup=min(50, steps),
        steps=steps,
        cond_dropout=cond_dropout,
        ema_decay=ema_decay,
    )
    start = time.perf_counter()
    losses = [trainer.step(step, images, labels, batch_size) for step in range(steps)]
    ema, noise_scheduler = trainer.ema, trainer.noise_scheduler
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out / WEAK_WEIGHTS))
    (out / WEAK_CONFIG).write_text(json.dumps(digits_weak_unet_config(), indent=2) + "\n")
    log = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "cond_dropout": cond_dropout,
        "ema_decay": ema_decay,
        "seed": seed,
        "torch": torch.__version__,
        "num_params": sum(p.numel() for p in ema.parameters()),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "final_train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_loss_ema": heldout_loss(ema, noise_scheduler, heldout_images, heldout_labels),
    }
    (out / WEAK_LOG).write_text(json.dumps(log, indent=2) + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the weak digits UNet for AutoGuidance.")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(train_weak(steps=args.steps, batch_size=args.batch_size, seed=args.seed, out=args.out), indent=2))


if __name__ == "__main__":
    main()
