"""Writing generated images: a PNG grid (one row per class) and the raw tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_image_grid(images: torch.Tensor, rows: int, path: Path, min_cell: int = 64) -> None:
    """images: (N, C, H, W) in [-1, 1], N = rows * columns; small images are upscaled (nearest).

    One channel is shown grey; otherwise the first three channels as RGB (model-space samples such
    as undecoded latents get a preview, zero-padded when they have two channels).
    """
    n, channels, height, width = images.shape
    cols = -(-n // rows)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if channels == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    elif channels == 2:
        pixels = torch.cat([pixels, torch.zeros_like(pixels[:, :1])], dim=1)
    pad = 2
    grid = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top : top + height, left : left + width] = pixels[i, :3].permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    scale = max(1, min_cell // max(height, width))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    image.save(path)


def save_loss_curve(steps: list[int], losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    if len(losses) >= 20:
        window = max(10, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
