"""Helpers shared by the network tests (test_nets, test_ncsnpp, test_diffusers_unet, test_dit)."""

from __future__ import annotations

import torch


def perturb(net: torch.nn.Module, std: float = 0.1, seed: int | None = None) -> torch.nn.Module:
    """Noise on every parameter, so that zero-initialised layers (output convs, attention proj) take part."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))
    return net


def perturbed_double(net: torch.nn.Module) -> torch.nn.Module:
    """perturb(std 0.05, seed 1), in float64 for finite-difference checks."""
    return perturb(net, 0.05, seed=1).double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
