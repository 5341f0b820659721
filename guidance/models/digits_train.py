"""Train the shipped digits diffusion model: ``python -m guidance.models.digits_train``.

Seeded and reproducible (same weights for the same seed, torch version and thread count),
about 12 minutes on 2 CPU cores. It writes, into ``guidance/models/weights/`` unless
``--out`` says otherwise:

* ``digits_unet.safetensors``: the exponential moving average of the UNet's weights;
* ``digits_unet_config.json`` and ``digits_scheduler_config.json``;
* ``digits_unet_train_log.json``: settings, wall time, the loss curve and the held-out loss.

Recipe: noise prediction (``epsilon``) with the plain MSE loss, timesteps uniform over the
1,000 training steps of the cosine schedule, the label replaced by the null class with
probability ``--cond-dropout`` (0.15) so the model also learns the unconditional score,
AdamW (lr 1e-3, 200 warm-up steps, cosine decay), batch 128, EMA 0.999.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from guidance.models.digits import (
    NULL_CLASS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    UNET_WEIGHTS,
    WEIGHTS_DIR,
    build_digits_unet,
    digits_scheduler_config,
    digits_unet_config,
    load_digits_split,
)
from guidance.validation import check_int, check_range

__all__ = ["DigitsTrainer", "train", "heldout_loss", "main"]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def heldout_loss(
    unet, scheduler: DDPMScheduler, images: torch.Tensor, labels: torch.Tensor, seed: int = 1234
) -> dict[str, float]:
    """Mean noise-prediction MSE on ``images`` at fixed noise and timesteps, conditional and unconditional."""
    gen = torch.Generator().manual_seed(seed)
    repeats = 4
    x0 = images.repeat(repeats, 1, 1, 1)
    y = labels.repeat(repeats)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    noisy = scheduler.add_noise(x0, noise, t)
    result = {}
    for name, lab in (("cond", y), ("uncond", torch.full_like(y, NULL_CLASS))):
        losses = []
        for start in range(0, x0.shape[0], 512):
            sl = slice(start, start + 512)
            pred = unet(noisy[sl], t[sl], class_labels=lab[sl]).sample
            losses.append(F.mse_loss(pred, noise[sl], reduction="sum"))
        result[name] = float(torch.stack(losses).sum() / noise.numel())
    return result


class DigitsTrainer:
    """The recipe both digits UNets share (the shipped one and AutoGuidance's weak one).

    Per step: a batch drawn with replacement, each label replaced by the null class with
    probability ``cond_dropout``, a uniform timestep, the epsilon MSE loss, AdamW with linear
    warm-up and cosine decay, gradient norm clipped at 1, and an EMA of the weights with the
    warm-up ``min(ema_decay, (1 + step) / (10 + step))``. All draws come from one generator
    seeded with ``seed``.

    Args:
        build (Callable[[int], UNet2DModel]): builds the initial UNet from a seed (called twice:
            the trained copy and its EMA).
        seed (int): seeds the initialisation and every draw.
        lr (float): AdamW's peak learning rate.
        warmup (int): warm-up steps of the learning rate.
        steps (int): total steps (the cosine decay ends there), ``>= 1``.
        cond_dropout (float): probability of the null class, in ``(0, 1)``.
        ema_decay (float): the EMA's decay once warmed up.
    """

    def __init__(
        self,
        build: Callable[[int], UNet2DModel],
        *,
        seed: int,
        lr: float,
        warmup: int,
        steps: int,
        cond_dropout: float,
        ema_decay: float,
    ):
        self.noise_scheduler = DDPMScheduler.from_config(digits_scheduler_config())
        self.unet = build(seed).train()
        self.ema = build(seed).eval().requires_grad_(False)
        self.ema.load_state_dict(self.unet.state_dict())
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=lr, weight_decay=0.0)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(s, warmup, steps))
        self.gen = torch.Generator().manual_seed(seed)
        self.cond_dropout, self.ema_decay = cond_dropout, ema_decay

    def _batch(self, images: Tensor, labels: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        gen = self.gen
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < self.cond_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        return x0, y, noise, t

    def step(self, step: int, images: Tensor, labels: Tensor, batch_size: int) -> float:
        """One optimisation step on a batch drawn from ``images``/``labels``; returns the loss."""
        x0, y, noise, t = self._batch(images, labels, batch_size)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(self.unet(noisy, t, class_labels=y).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.lr_schedule.step()
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - decay)
        return float(loss)


def _mean_last(values: list[float], n: int) -> float:
    return sum(values[-n:]) / len(values[-n:])


def train(
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup: int = 200,
    cond_dropout: float = 0.15,
    ema_decay: float = 0.999,
    seed: int = 0,
    threads: int = 1,
    out: Path = WEIGHTS_DIR,
) -> dict:
    """Train the UNet and write its EMA weights, configs and log to ``out``; returns the log."""
    check_range(cond_dropout, "cond_dropout", 0.0, 1.0, lo_open=True, hi_open=True)
    check_int(steps, "steps", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, labels = load_digits_split("train")
    heldout_images, heldout_labels = load_digits_split("heldout")
    trainer = DigitsTrainer(
        build_digits_unet, seed=seed, lr=lr, warmup=warmup, steps=steps, cond_dropout=cond_dropout, ema_decay=ema_decay
    )
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train digits UNet", unit="step")
    for step in bar:
        losses.append(trainer.step(step, images, labels, batch_size))
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{_mean_last(losses, 200):.4f}")
    wall = time.perf_counter() - start
    ema, noise_scheduler = trainer.ema, trainer.noise_scheduler
    # Buffers (none today) would be copied as is.
    for b_ema, b in zip(ema.buffers(), trainer.unet.buffers(), strict=True):
        b_ema.copy_(b)
    _save(Path(out), ema)
    log = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "cond_dropout": cond_dropout,
        "ema_decay": ema_decay,
        "seed": seed,
        "threads": threads,
        "torch": torch.__version__,
        "num_params": sum(p.numel() for p in trainer.unet.parameters()),
        "train_images": int(images.shape[0]),
        "heldout_images": int(heldout_images.shape[0]),
        "wall_seconds": round(wall, 1),
        "final_train_loss_last200": _mean_last(losses, 200),
        "heldout_loss_ema": heldout_loss(ema, noise_scheduler, heldout_images, heldout_labels),
        "train_loss_ema": heldout_loss(ema, noise_scheduler, images[:359], labels[:359]),
        "loss_curve_every_100": [sum(losses[i : i + 100]) / len(losses[i : i + 100]) for i in range(0, steps, 100)],
    }
    (Path(out) / "digits_unet_train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def _save(out: Path, ema: UNet2DModel) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out / UNET_WEIGHTS))
    (out / UNET_CONFIG).write_text(json.dumps(digits_unet_config(), indent=2) + "\n")
    (out / SCHEDULER_CONFIG).write_text(json.dumps(digits_scheduler_config(), indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cond-dropout", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    log = train(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        cond_dropout=args.cond_dropout,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
    )
    summary = {k: v for k, v in log.items() if k != "loss_curve_every_100"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
