"""Closed-form TrigFlow quantities for Gaussian data N(m, s² I): ground truths for sCM tests.

x_t = cos t·x0 + sin t·z with z ~ N(0, σ_d² I) (sCM Sec. 3) has marginal N(cos t·m, v_t² I),
v_t² = cos²t·s² + sin²t·σ_d². A linear flow between Gaussians keeps the standardised coordinate
ξ = (x_t - cos t·m)/v_t fixed along each PF-ODE trajectory (derived here: the ODE velocity below
is the time derivative of cos t·m + v_t·ξ at fixed ξ, and it transports N(cos t m, v_t²) into
itself), so the consistency function maps x_t to the t = 0 point of its trajectory:
f(x_t, t) = m + s·ξ; and dx_t/dt = -sin t·m + (dv_t/dt)·ξ with dv_t/dt = sin t cos t (σ_d² - s²)/v_t.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cmkit.processes import TrigFlow, _bcast


def _std(t: Tensor, std: float, sigma_data: float) -> Tensor:
    return torch.sqrt(torch.cos(t) ** 2 * std**2 + torch.sin(t) ** 2 * sigma_data**2)


def gaussian_consistency(x: Tensor, t: Tensor, mean: float, std: float, sigma_data: float) -> Tensor:
    """f(x_t, t) = m + s·(x_t - cos t·m)/v_t, the exact TrigFlow consistency function of N(m, s²)."""
    t = _bcast(torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]), x)
    return mean + std * (x - torch.cos(t) * mean) / _std(t, std, sigma_data)


def gaussian_velocity(x: Tensor, t: Tensor, mean: float, std: float, sigma_data: float) -> Tensor:
    """dx_t/dt = -sin t·m + sin t cos t (σ_d² - s²)·(x_t - cos t·m)/v_t², the exact PF-ODE of N(m, s²)."""
    t = _bcast(torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]), x)
    v2 = _std(t, std, sigma_data) ** 2
    return -torch.sin(t) * mean + torch.sin(t) * torch.cos(t) * (sigma_data**2 - std**2) * (x - torch.cos(t) * mean) / v2


class GaussianTrigFlowTeacher(nn.Module):
    """A TrigFlow 'diffusion model' whose output is the exact velocity of N(m, s² I) data (sCD ground truth)."""

    def __init__(self, mean: float, std: float, sigma_data: float = 0.5):
        super().__init__()
        self.mean, self.std = mean, std
        self.process = TrigFlow(sigma_data=sigma_data)

    def forward(self, x: Tensor, t: Tensor, class_labels=None) -> Tensor:
        return gaussian_velocity(x, t, self.mean, self.std, self.process.sigma_data)
