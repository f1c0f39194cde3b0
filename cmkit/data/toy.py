"""2-D toy distributions, drawn once from a seeded generator and standardised."""

from __future__ import annotations

import math

import torch


def _gen(cfg) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed)


def eight_gaussians(cfg):
    from cmkit.data import standardise

    g = _gen(cfg)
    k = torch.randint(0, 8, (cfg.n,), generator=g)
    angle = k.double() * (2 * math.pi / 8)
    centres = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    x = centres + 0.1 * torch.randn(cfg.n, 2, generator=g, dtype=torch.float64)
    return standardise("eight_gaussians", x, k, 8)


def two_moons(cfg):
    from cmkit.data import standardise

    g = _gen(cfg)
    k = torch.randint(0, 2, (cfg.n,), generator=g)
    a = torch.rand(cfg.n, generator=g, dtype=torch.float64) * math.pi
    x = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
    x = torch.where(k[:, None] == 1, lower, x) + 0.05 * torch.randn(cfg.n, 2, generator=g, dtype=torch.float64)
    return standardise("two_moons", x, k, 2)


def swiss_roll(cfg):
    from cmkit.data import standardise

    g = _gen(cfg)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(cfg.n, generator=g, dtype=torch.float64))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5
    x = x + 0.05 * torch.randn(cfg.n, 2, generator=g, dtype=torch.float64)
    return standardise("swiss_roll", x, None, 0)


def checkerboard(cfg):
    from cmkit.data import standardise

    g = _gen(cfg)
    x1 = torch.rand(cfg.n, generator=g, dtype=torch.float64) * 4 - 2
    x2 = torch.rand(cfg.n, generator=g, dtype=torch.float64) - torch.randint(0, 2, (cfg.n,), generator=g) * 2
    x2 = x2 + torch.floor(x1) % 2
    return standardise("checkerboard", torch.stack([x1, x2], 1) * 2, None, 0)


GAUSSIAN_MEAN = (1.0, -0.5)
GAUSSIAN_STD = 0.5


def gaussian(cfg):
    """N(m, s²I) with m = (1, -0.5), s = 0.5, kept in raw units (closed-form tests need them)."""
    from cmkit.data import Dataset

    g = _gen(cfg)
    x = torch.tensor(GAUSSIAN_MEAN) + GAUSSIAN_STD * torch.randn(cfg.n, 2, generator=g)
    return Dataset("gaussian", x.float().contiguous(), None, "vector", 0)


TOY_SETS = {"eight_gaussians": eight_gaussians, "two_moons": two_moons, "swiss_roll": swiss_roll,
            "checkerboard": checkerboard, "gaussian": gaussian}
