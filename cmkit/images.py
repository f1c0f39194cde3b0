"""Writing samples: image grids and 2-D scatter plots as PNG, raw arrays as .npz (PIL only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, nrow: int | None = None, min_size: int = 32) -> np.ndarray:
    """Tile (n, C, H, W) images in [0, 1] into one uint8 (H', W', C) array, upscaled if tiny."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    scale = max(1, math.ceil(min_size / max(h, w)))
    pad = 1
    grid = np.zeros((ncol * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad, c), np.uint8)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        grid[y : y + h * scale, x : x + w * scale] = arr[i]
    return grid


def scatter_png(points: torch.Tensor, size: int = 384, lim: float | None = None) -> Image.Image:
    """Draw the first two coordinates of (n, D) points on a white square."""
    p = points[:, :2].float().numpy()
    lim = lim or float(max(np.abs(p).max() * 1.1, 1e-3)) if len(p) else 1.0
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    xy = (p / lim * 0.5 + 0.5) * (size - 1)
    for x, y in xy:
        if 0 <= x < size and 0 <= y < size:
            draw.ellipse([x - 1.5, size - 1 - y - 1.5, x + 1.5, size - 1 - y + 1.5], fill=(30, 60, 200))
    return img


def save_samples(samples: torch.Tensor, path: str | Path, kind: str) -> Path:
    """Save samples in data space: .png (grid or scatter) or .npz (array ``samples``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, samples=samples.cpu().numpy())
    elif path.suffix == ".png":
        if kind == "image":
            grid = image_grid(samples.cpu())
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
        else:
            scatter_png(samples.cpu().reshape(len(samples), -1)).save(path)
    else:
        raise ValueError(f"output '{path}' must end in .png (grid) or .npz (raw samples)")
    return path
