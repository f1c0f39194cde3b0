"""Distances d(x, y) between batches, one per sample (reduced over every non-batch dimension).

One family with the robustness constant c as an argument; ℓ2 ignores it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sq_norm(x: Tensor, y: Tensor) -> Tensor:
    """‖x - y‖₂² per sample, accumulated in float32 or wider."""
    d = (x - y).flatten(1)
    if d.dtype in (torch.float16, torch.bfloat16):
        d = d.float()
    return d.square().sum(1)


def l2(x: Tensor, y: Tensor, c: float = 0.0) -> Tensor:
    """Squared ℓ2 metric d(x, y) = ‖x - y‖₂² (iCT Sec. 2)."""
    return _sq_norm(x, y)


def l1(x: Tensor, y: Tensor, c: float = 0.0) -> Tensor:
    """ℓ1 metric d(x, y) = ‖x - y‖₁ (Song et al. 2023, *Consistency Models*, Sec. 3, one of its three metric choices
    beside squared ℓ2 and LPIPS; openai/consistency_models `loss_norm="l1"`). Not in the bundled papers' text:
    iCT Sec. 2 cites it from there."""
    d = (x - y).flatten(1)
    if d.dtype in (torch.float16, torch.bfloat16):
        d = d.float()
    return d.abs().sum(1)


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Pseudo-Huber metric d(x, y) = sqrt(‖x - y‖₂² + c²) - c (iCT Eq. 8)."""
    return torch.sqrt(_sq_norm(x, y) + c * c) - c


def cauchy(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Cauchy metric d(x, y) = log(1 + ‖x - y‖₂²/(2c²)) (iLCT Eq. 6): grows only logarithmically."""
    return torch.log1p(_sq_norm(x, y) / (2 * c * c))


def geman_mcclure(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Geman-McClure metric d(x, y) = 2‖x - y‖₂²/(‖x - y‖₂² + 4c²) (iLCT Eq. 8): saturates at 2."""
    r2 = _sq_norm(x, y)
    return 2 * r2 / (r2 + 4 * c * c)


DISTANCES = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber, "cauchy": cauchy, "geman_mcclure": geman_mcclure}
# Distances with a feature network of their own (weights from local files): built by make_distance.
NETWORK_DISTANCES = ("lpips",)  # cmkit.lpips (Zhang et al. 2018), the metric of CT/CD, ACT and CM-GAN
DISTANCE_NAMES = (*DISTANCES, *NETWORK_DISTANCES)


def make_distance(method_cfg, shape, latent: bool = False):
    """The callable d(x, y, c) -> (B,) of method_cfg.distance: a function of DISTANCES, or an LPIPS module
    (an nn.Module with no parameters; assign it to the objective so that .to(device) moves it)."""
    if method_cfg.distance == "lpips":
        from cmkit.lpips import build_lpips

        return build_lpips(method_cfg, shape, latent)
    return get_distance(method_cfg.distance)


def get_distance(name: str):
    if name not in DISTANCES:
        raise ValueError(f"unknown distance '{name}'. Valid distances: {', '.join(DISTANCES)}")
    return DISTANCES[name]
