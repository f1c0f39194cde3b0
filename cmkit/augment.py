"""Differentiable image augmentation with an adjustable probability, and Gaussian blur (kornia).

Both are applied to everything a discriminator sees, real and generated, so gradients flow back
through them into the generator (ACT-Aug, ACT Sec. 3.4; CM-GAN Algorithm 1). MACHINE-NOTES 5:
kornia's blur and AugmentationSequential are differentiable here.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn

# Geometric ops only: kornia's colour ops clamp to [0, 1], which would clip cmkit's [-1, 1] images
# and cut their gradients. Translation and cutout are DiffAugment's (Zhao et al. 2020, ACT ref. [51]).
AUG_OPS = {
    "flip": lambda: K.RandomHorizontalFlip(),
    "translate": lambda: K.RandomAffine(degrees=0.0, translate=(0.125, 0.125), padding_mode="reflection"),
    "cutout": lambda: K.RandomErasing(scale=(0.0625, 0.25), ratio=(0.5, 2.0), value=0.0),
}


class DiffAugment(nn.Module):
    """A(x, p): each op applied independently per sample with probability p (ACT Sec. 3.4's D_aug)."""

    def __init__(self, ops: list[str]):
        super().__init__()
        unknown = sorted(set(ops) - set(AUG_OPS))
        if unknown or not ops:
            raise ValueError(f"unknown or empty augmentation ops {unknown or ops}. Choose from: {', '.join(AUG_OPS)}")
        self.ops = nn.ModuleList([AUG_OPS[name]() for name in ops])

    def forward(self, x: Tensor, p: float) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"augmentation needs images (B, C, H, W), got shape {tuple(x.shape)}")
        if p <= 0:
            return x
        for op in self.ops:
            op.p = float(min(p, 1.0))  # kornia draws its per-sample Bernoulli(p) from op.p on each call
            x = op(x)
        return x


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Blur images with a Gaussian of std sigma (pixels); sigma <= 0 returns x unchanged (CM-GAN Alg. 1).

    The kernel spans ±3σ, capped at what reflect padding allows (2·min(H, W) - 1).
    """
    if sigma <= 0:
        return x
    if x.ndim != 4:
        raise ValueError(f"blur needs images (B, C, H, W), got shape {tuple(x.shape)}")
    cap = 2 * min(x.shape[-2:]) - 1
    k = min(2 * math.ceil(3 * sigma) + 1, cap)
    s = torch.full((x.shape[0], 2), float(sigma), device=x.device, dtype=x.dtype)
    return gaussian_blur2d(x, (k, k), s, border_type="reflect")
