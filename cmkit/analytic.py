"""Closed-form ground truth for Gaussian data N(m, s²I) under the VE process x_σ = x0 + σz.

With Gaussian data every object of consistency modelling is known exactly (iCT App. A uses this
case to show that CT and CD coincide):

* marginal   p_σ = N(m, (s² + σ²) I)
* score      ∇ log p_σ(x) = -(x - m) / (s² + σ²)
* denoiser   D(x, σ) = E[x0 | x_σ = x] = m + (x - m)·s² / (s² + σ²)       (Tweedie: x + σ²·score)
* PF-ODE     dx/dσ = -σ·∇ log p_σ(x) = (x - D(x, σ)) / σ = σ (x - m) / (s² + σ²)  (iCT Eq. 1, VE form)
             solved by x(σ) = m + (x(σ0) - m)·sqrt(s² + σ²) / sqrt(s² + σ0²)
* consistency function f*(x, σ) = x(σ_min) along the trajectory through (x, σ)
             = m + (x - m)·sqrt(s² + σ_min²) / sqrt(s² + σ²)                  (iCT Eq. 2's boundary condition)

``s`` may be a scalar or a per-dimension tensor (diagonal covariance): every formula above holds
per dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _per_sample(sigma, x: Tensor) -> Tensor:
    """σ as a tensor broadcast against x (B, ...): scalars and (B,) tensors both work."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class GaussianVE:
    """Exact score, denoiser, PF-ODE trajectory and consistency function for N(m, s²I) data."""

    def __init__(self, mean, std, sigma_min: float = 0.002):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        self.sigma_min = sigma_min

    def _ms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)

    def score(self, x: Tensor, sigma) -> Tensor:
        """∇_x log p_σ(x) = -(x - m) / (s² + σ²)."""
        m, s = self._ms(x)
        sigma = _per_sample(sigma, x)
        return -(x - m) / (s**2 + sigma**2)

    def denoiser(self, x: Tensor, sigma) -> Tensor:
        """D(x, σ) = m + (x - m)·s² / (s² + σ²)."""
        m, s = self._ms(x)
        sigma = _per_sample(sigma, x)
        return m + (x - m) * s**2 / (s**2 + sigma**2)

    def velocity(self, x: Tensor, sigma) -> Tensor:
        """PF-ODE dx/dσ = (x - D(x, σ)) / σ = σ (x - m) / (s² + σ²)."""
        m, s = self._ms(x)
        sigma = _per_sample(sigma, x)
        return sigma * (x - m) / (s**2 + sigma**2)

    def trajectory(self, x: Tensor, sigma_from, sigma_to) -> Tensor:
        """x(σ_to) on the PF-ODE trajectory through x at σ_from: m + (x - m)·sqrt(s²+σ_to²)/sqrt(s²+σ_from²)."""
        m, s = self._ms(x)
        a, b = _per_sample(sigma_from, x), _per_sample(sigma_to, x)
        return m + (x - m) * torch.sqrt(s**2 + b**2) / torch.sqrt(s**2 + a**2)

    def consistency(self, x: Tensor, sigma) -> Tensor:
        """f*(x, σ) = m + (x - m)·sqrt(s² + σ_min²) / sqrt(s² + σ²); f*(x, σ_min) = x."""
        return self.trajectory(x, sigma, self.sigma_min)

    def log_density(self, x: Tensor, sigma) -> Tensor:
        """log p_σ(x) per sample (for finite-difference checks of the score)."""
        m, s = self._ms(x)
        var = (s**2 + _per_sample(sigma, x) ** 2).expand_as(x)
        return (-0.5 * (x - m) ** 2 / var - 0.5 * torch.log(2 * torch.pi * var)).flatten(1).sum(1)


class GaussianTeacher(nn.Module):
    """The exact denoiser of N(m, s²I) with a trained teacher's interface: ``teacher(x, σ, class_labels)``.

    Mean and std are buffers, so the teacher moves with ``.to(device)`` and is checkpointed with
    the objective that owns it.
    """

    kind = "diffusion"

    def __init__(self, mean, std, process=None):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        self.process = process

    @property
    def gaussian(self) -> GaussianVE:
        sigma_min = self.process.sigma_min if self.process is not None else 0.002
        return GaussianVE(self.mean.double(), self.std.double(), sigma_min)

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        m, s = self.mean.to(x.dtype), self.std.to(x.dtype)
        sigma = _per_sample(sigma, x)
        return m + (x - m) * s**2 / (s**2 + sigma**2)
