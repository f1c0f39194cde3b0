"""EDM diffusion training (Karras et al. 2022): the teachers of consistency distillation.

The denoiser is D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) with EDM's coefficients
(``Parameterized(net, VEProcess, kind="diffusion")``; EDM Eq. 7 and Table 1). Training minimises
E_{σ, x0, z}[λ(σ)·‖D(x0 + σz, σ) - x0‖²] (EDM Eq. 2 and 8) with ln σ ~ N(P_mean, P_std²) and
λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out(σ)² (EDM Table 1, "Training" rows). The EDM paper is not
among papers/; its constants are restated in papers/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmkit.losses import l2
from cmkit.model import Parameterized
from cmkit.nets import build_network
from cmkit.objectives.base import Objective, Phase
from cmkit.processes import VEProcess
from cmkit.schedules import Progress

ODE_SOLVERS = ("heun", "euler")


@dataclass
class EDMConfig:
    """Options of EDM diffusion training and its default sampler.

    c_noise_scale defaults to 1 (c_noise = ln σ), not EDM's ¼·ln σ (Karras et al. 2022, Table 1): the
    teacher then reads time as cmkit's consistency models do, so CD's method.init_from_teacher copies
    weights that see the same input. With Fourier features the factor only rescales the frequencies
    (net.fourier_scale); ADM-style positional presets set 250 = 1000·¼·ln σ (Song et al. 2023's ADM code).
    """

    name: str = "edm"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    c_noise_scale: float = 1.0  # c_noise = scale·ln σ; 1 as ConsistencyConfig, not EDM's ¼ (see the docstring)
    p_mean: float = -1.2  # EDM Table 1: ln σ ~ N(P_mean, P_std²)
    p_std: float = 1.2
    sampler: str = "heun"  # heun (EDM Alg. 1) | euler; `cmkit sample --steps K` then means K network evaluations

    def validate(self) -> None:
        if self.sampler not in ODE_SOLVERS:
            raise ValueError(f"method.sampler='{self.sampler}' is not valid. Choose one of: {', '.join(ODE_SOLVERS)}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("method.sigma_min and method.sigma_max need 0 < sigma_min < sigma_max")
        if self.p_std <= 0 or self.sigma_data <= 0 or self.rho <= 0:
            raise ValueError("method.p_std, method.sigma_data and method.rho must be > 0")


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)² (EDM Table 1), which makes the effective weight of F uniform."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMDiffusion(Objective):
    """EDM denoiser training: one phase; samples with the Heun (or Euler) PF-ODE solver."""

    def __init__(self, cfg, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.process = VEProcess(m.sigma_data, m.sigma_min, m.sigma_max, m.rho, m.c_noise_scale, mid_sigmas=())
        self.model = Parameterized(build_network(cfg.net, shape, num_classes), self.process, kind="diffusion")

    @property
    def phases(self) -> list[Phase]:
        return [Phase("model", self.model, self.loss)]

    def sample_sigmas(self, n: int, device) -> torch.Tensor:
        """σ = exp(P_mean + P_std·n), n ~ N(0, 1) (EDM Table 1), one per sample."""
        return torch.exp(self.cfg.p_mean + self.cfg.p_std * torch.randn(n, device=device))

    def loss(self, batch, progress: Progress) -> dict:
        x0, labels = batch["x"], batch.get("labels")
        sigma = self.sample_sigmas(x0.shape[0], x0.device)
        z = torch.randn_like(x0)
        denoised = self.model(self.process.add_noise(x0, z, sigma), sigma, labels)
        # EDM Eq. 2 / 8: λ(σ)·‖D(x0 + σz, σ) - x0‖², summed over dimensions per sample.
        loss = edm_weight(sigma, self.cfg.sigma_data) * l2(denoised, x0)
        return {"loss": loss}

    def sample_times(self, steps: int) -> list[float]:
        """Karras σ grid on which the sampler spends exactly ``steps`` network evaluations (NFE)."""
        from cmkit.sampling import ode_times

        return ode_times(steps, self.cfg.sigma_min, self.cfg.sigma_max, self.cfg.rho, self.cfg.sampler)

    @property
    def sampler(self):
        from cmkit.sampling import SAMPLERS

        return SAMPLERS[self.cfg.sampler]
