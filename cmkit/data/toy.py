"""2-D toy distributions, drawn once (cfg.n points) from a generator seeded by cfg.seed, then standardised."""

from __future__ import annotations

import math

import torch

from cmkit.data import Dataset, DataError, standardise

f64 = torch.float64


def _generator(cfg, name: str) -> torch.Generator:
    if cfg.n < 1:
        raise DataError(f"data.n={cfg.n} points requested for '{name}'; set data.n >= 1")
    return torch.Generator().manual_seed(cfg.seed)


# 8 modes on a circle of radius 2 with std 0.1: neighbouring centres are 2·2·sin(π/8) ≈ 1.53 = 15 std apart.
EIGHT_GAUSSIANS_RADIUS = 2.0
EIGHT_GAUSSIANS_STD = 0.1


def eight_gaussians(cfg) -> Dataset:
    """Mixture of 8 equal Gaussians on a circle; the label is the mode index k (centre at angle 2πk/8)."""
    g = _generator(cfg, "eight_gaussians")
    k = torch.randint(0, 8, (cfg.n,), generator=g)
    angle = k.to(f64) * (2 * math.pi / 8)
    centres = EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    x = centres + EIGHT_GAUSSIANS_STD * torch.randn(cfg.n, 2, generator=g, dtype=f64)
    return standardise("eight_gaussians", x, k, 8)


def two_moons(cfg) -> Dataset:
    """Two interleaved half circles (as scikit-learn's make_moons), noise std 0.05; the label is the moon."""
    g = _generator(cfg, "two_moons")
    k = torch.randint(0, 2, (cfg.n,), generator=g)
    a = torch.rand(cfg.n, generator=g, dtype=f64) * math.pi
    upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
    x = torch.where(k[:, None] == 1, lower, upper) + 0.05 * torch.randn(cfg.n, 2, generator=g, dtype=f64)
    return standardise("two_moons", x, k, 2)


def swiss_roll(cfg) -> Dataset:
    """2-D swiss roll: the spiral t(cos t, sin t) for t in [1.5π, 4.5π], noise std 0.05 after scaling by 1/5."""
    g = _generator(cfg, "swiss_roll")
    t = 1.5 * math.pi * (1 + 2 * torch.rand(cfg.n, generator=g, dtype=f64))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5
    x = x + 0.05 * torch.randn(cfg.n, 2, generator=g, dtype=f64)
    return standardise("swiss_roll", x, None, 0)


def checkerboard(cfg) -> Dataset:
    """Uniform on the 8 dark squares of a 4×4 checkerboard over [-4, 4]² (FFJORD's toy set)."""
    g = _generator(cfg, "checkerboard")
    x1 = torch.rand(cfg.n, generator=g, dtype=f64) * 4 - 2
    x2 = torch.rand(cfg.n, generator=g, dtype=f64) - torch.randint(0, 2, (cfg.n,), generator=g).to(f64) * 2
    x2 = x2 + torch.floor(x1) % 2  # shift every other column up by one square
    return standardise("checkerboard", torch.stack([x1, x2], 1) * 2, None, 0)


# Closed-form reference distribution N(m, s²I): tests compare against these exact numbers.
GAUSSIAN_MEAN = (1.0, -0.5)
GAUSSIAN_STD = 0.5


def gaussian(cfg) -> Dataset:
    """N(m, s²I) with m = (1, -0.5), s = 0.5, deliberately NOT standardised (raw units for closed-form tests)."""
    g = _generator(cfg, "gaussian")
    x = torch.tensor(GAUSSIAN_MEAN, dtype=f64) + GAUSSIAN_STD * torch.randn(cfg.n, 2, generator=g, dtype=f64)
    return Dataset("gaussian", x.float().contiguous(), None, "vector", 0)
