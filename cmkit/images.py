"""Writing samples: image grids and 2-D scatter plots as PNG (samples over the data with matplotlib, else PIL),
raw arrays as .npz."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

REFERENCE_POINTS = 2000  # data points drawn under the samples of a 2-D plot


def image_grid(images: torch.Tensor, nrow: int | None = None, min_size: int = 32) -> np.ndarray:
    """Tile (n, C, H, W) images in [0, 1] into one uint8 (H', W', C) array, upscaled if tiny; nrow images per row."""
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


def _ticks(lim: float) -> list[float]:
    """A few round tick values in [-lim, lim] (1, 2 or 5 times a power of ten apart)."""
    raw = lim / 2
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    k = math.floor(lim / step)
    return [i * step for i in range(-k, k + 1)]


def scatter_png(points: torch.Tensor, size: int = 384, lim: float | None = None,
                reference: torch.Tensor | None = None) -> Image.Image:
    """Plot the first two coordinates of (n, D) points over the data (grey) with axes, ticks and a legend."""
    p = points[:, :2].float().cpu().numpy()
    ref = reference[:, :2].float().cpu().numpy() if reference is not None and len(reference) else None
    if lim is None:
        spread = [np.abs(a).max() for a in (p, ref) if a is not None and len(a)]
        lim = float(max(max(spread) * 1.1, 1e-3)) if spread else 1.0
    margin = 40  # left and bottom: tick labels
    img = Image.new("RGB", (size + margin + 8, size + margin + 8), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, y0 = margin, 8  # top-left corner of the plot area

    def to_px(a: np.ndarray) -> np.ndarray:
        return np.stack([x0 + (a[:, 0] / lim * 0.5 + 0.5) * (size - 1),
                         y0 + (0.5 - a[:, 1] / lim * 0.5) * (size - 1)], 1)

    draw.rectangle([x0, y0, x0 + size - 1, y0 + size - 1], outline=(0, 0, 0))
    for t in _ticks(lim):
        u = x0 + (t / lim * 0.5 + 0.5) * (size - 1)
        v = y0 + (0.5 - t / lim * 0.5) * (size - 1)
        draw.line([u, y0 + size - 1, u, y0 + size + 3], fill=(0, 0, 0))
        draw.line([x0 - 4, v, x0, v], fill=(0, 0, 0))
        draw.line([u, y0, u, y0 + size - 1], fill=(235, 235, 235))
        draw.line([x0, v, x0 + size - 1, v], fill=(235, 235, 235))
        label = f"{t:g}"
        draw.text((u - 3 * len(label), y0 + size + 5), label, fill=(0, 0, 0), font=font)
        draw.text((x0 - 6 - 6 * len(label), v - 5), label, fill=(0, 0, 0), font=font)
    draw.rectangle([x0, y0, x0 + size - 1, y0 + size - 1], outline=(0, 0, 0))
    inside = lambda u, v: x0 <= u < x0 + size and y0 <= v < y0 + size  # noqa: E731
    if ref is not None:
        for u, v in to_px(ref):
            if inside(u, v):
                draw.ellipse([u - 1.2, v - 1.2, u + 1.2, v + 1.2], fill=(185, 185, 185))
    for u, v in to_px(p):
        if inside(u, v):
            draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill=(30, 60, 200))
    legend = [("samples", (30, 60, 200))] + ([("data", (185, 185, 185))] if ref is not None else [])
    for i, (name, colour) in enumerate(legend):
        ly = y0 + 6 + 14 * i
        draw.ellipse([x0 + 8, ly + 2, x0 + 14, ly + 8], fill=colour)
        draw.text((x0 + 18, ly), name, fill=(0, 0, 0), font=font)
    return img


def _reference_points(reference) -> torch.Tensor | None:
    """Data points in data space from a cmkit Dataset (or a tensor of points), at most REFERENCE_POINTS."""
    if reference is None:
        return None
    if torch.is_tensor(reference):
        return reference[:REFERENCE_POINTS].reshape(min(len(reference), REFERENCE_POINTS), -1)
    x = reference.x[:REFERENCE_POINTS]
    return reference.to_data_space(x).reshape(len(x), -1).cpu()


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


def save_samples(samples: torch.Tensor, path: str | Path, kind: str, *, reference=None,
                 nrow: int | None = None, labels: torch.Tensor | None = None) -> Path:
    """Save samples in data space: .png (grid, or scatter over the reference data) or .npz (array ``samples``).

    ``reference``: the run's Dataset (or data points) drawn under 2-D samples; ``nrow``: images per grid row;
    ``labels``: the classes a class-conditional model drew them for (array ``labels`` of an .npz).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        extra = {} if labels is None else {"labels": labels.cpu().numpy().astype(np.int64)}
        np.savez(path, samples=samples.cpu().numpy(), **extra)
    elif path.suffix == ".png":
        if kind == "image":
            grid = image_grid(samples.cpu(), nrow=nrow)
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
        else:
            flat = samples.cpu().reshape(len(samples), -1)
            ref = _reference_points(reference)
            if not scatter_over_data(flat, path, ref):  # matplotlib missing: cmkit's own PIL scatter
                scatter_png(flat, reference=ref).save(path)
    else:
        raise ValueError(f"output '{path}' must end in .png (grid) or .npz (raw samples)")
    return path
