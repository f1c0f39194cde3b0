"""Writing samples: image grids and 2-D scatter plots as PNG (samples over the data with matplotlib, else PIL),
raw arrays as .npz."""

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


def scatter_over_data(points: torch.Tensor, path: Path, reference: torch.Tensor | None = None) -> bool:
    """Samples (blue) over the data (grey) with axes and a legend, via matplotlib; False if it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    p = points[:, :2].float().numpy()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    if reference is not None:
        r = reference[:, :2].float().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.75", label=f"data ({len(r)})", rasterized=True)
    ax.scatter(p[:, 0], p[:, 1], s=2, c="tab:blue", label=f"samples ({len(p)})", rasterized=True)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x$_1$")
    ax.set_ylabel("x$_2$")
    ax.legend(loc="upper right", fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def save_samples(samples: torch.Tensor, path: str | Path, kind: str, reference: torch.Tensor | None = None) -> Path:
    """Save samples in data space: .png (grid, or for vectors a scatter over ``reference`` data points with
    axes when matplotlib is installed) or .npz (array ``samples``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, samples=samples.cpu().numpy())
    elif path.suffix == ".png":
        if kind == "image":
            grid = image_grid(samples.cpu())
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
        else:
            flat = samples.cpu().reshape(len(samples), -1)
            ref = None if reference is None else reference.cpu().reshape(len(reference), -1)
            if not scatter_over_data(flat, path, ref):
                scatter_png(flat).save(path)
    else:
        raise ValueError(f"output '{path}' must end in .png (grid) or .npz (raw samples)")
    return path
