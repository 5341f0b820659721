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
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file
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

__all__ = ["train", "heldout_loss", "main"]


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
    noise_scheduler = DDPMScheduler.from_config(digits_scheduler_config())
    unet = build_digits_unet(seed).train()
    ema = build_digits_unet(seed).eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, steps))
    gen = torch.Generator().manual_seed(seed)
    num_params = sum(p.numel() for p in unet.parameters())

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train digits UNet", unit="step")
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < cond_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(noisy, t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - decay)
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    wall = time.perf_counter() - start
    # Buffers (none today) would be copied as is.
    for b_ema, b in zip(ema.buffers(), unet.buffers(), strict=True):
        b_ema.copy_(b)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out / UNET_WEIGHTS))
    (out / UNET_CONFIG).write_text(json.dumps(digits_unet_config(), indent=2) + "\n")
    (out / SCHEDULER_CONFIG).write_text(json.dumps(digits_scheduler_config(), indent=2) + "\n")
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
        "num_params": num_params,
        "train_images": int(images.shape[0]),
        "heldout_images": int(heldout_images.shape[0]),
        "wall_seconds": round(wall, 1),
        "final_train_loss_last200": sum(losses[-200:]) / len(losses[-200:]),
        "heldout_loss_ema": heldout_loss(ema, noise_scheduler, heldout_images, heldout_labels),
        "train_loss_ema": heldout_loss(ema, noise_scheduler, images[:359], labels[:359]),
        "loss_curve_every_100": [
            sum(losses[i : i + 100]) / len(losses[i : i + 100]) for i in range(0, steps, 100)
        ],
    }
    (out / "digits_unet_train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


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
