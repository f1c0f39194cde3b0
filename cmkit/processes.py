"""Noise processes: the few numbers each owns and the maths that depends on them.

A process knows how to corrupt data (``add_noise``), its boundary time, its prior, and the
coefficients of the consistency and diffusion parameterisations (``scalings``). Nothing else in
cmkit branches on which process is in use (STYLE 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cmkit.schedules import karras_sigmas


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample (B,) tensor to broadcast against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class VEProcess:
    """Variance-exploding process x_σ = x0 + σ z of Karras et al. (2022) / Song et al. (2023).

    Time is the noise level σ ∈ [σ_min, σ_max]. Consistency scalings carry the σ_min offset so that
    f_θ(x, σ_min) = x exactly (papers/README.md); diffusion scalings are EDM's (Karras et al. 2022,
    Table 1).
    """

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    c_noise_scale: float = 250.0  # c_noise = 1000·0.25·ln σ, as in Song et al. (2023)'s code

    name = "ve"

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def karras_sigmas(self, n: int) -> Tensor:
        """The Karras grid σ_1 < ... < σ_N of this process (float64)."""
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)

    def add_noise(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """x_σ = x0 + σ z with z ~ N(0, I) (iCT Eq. 5)."""
        return x0 + _bcast(t, x0).to(x0.dtype) * z

    def prior(self, shape, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        """x_T ~ N(0, σ_max² I)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype) * self.sigma_max

    def from_noise(self, noise: Tensor) -> Tensor:
        """Map standard normal noise to a sample of the prior at t_max: σ_max·z."""
        return noise * self.sigma_max

    def sampling_times(self, steps: int) -> list[float]:
        """Default times of K-step sampling, from σ_max down.

        Two steps use σ = 0.821, iCT's intermediate level on CIFAR-10 (iCT App. B); otherwise the
        Karras grid with K+1 points, without σ_min.
        """
        if steps < 1:
            raise ValueError(f"sampling needs at least one step, got {steps}")
        if steps == 2:
            return [self.sigma_max, 0.821]
        grid = self.karras_sigmas(steps + 1).flip(0)[:-1] if steps > 1 else None
        return [self.sigma_max] if grid is None else [float(s) for s in grid]

    def renoise(self, x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Multistep re-noising x ← x0 + sqrt(τ² - σ_min²) z (iCT Sec. 2; Song et al. 2023 Alg. 1)."""
        s = torch.sqrt(torch.clamp(_bcast(t, x0).double() ** 2 - self.sigma_min**2, min=0.0))
        return x0 + s.to(x0.dtype) * z

    def c_noise(self, t: Tensor) -> Tensor:
        return self.c_noise_scale * torch.log(t.clamp_min(1e-44))

    def scalings(self, t: Tensor, kind: str = "consistency") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at noise level t=σ, per sample, in float32 or wider.

        consistency: c_skip = σ_d²/((σ-σ_min)² + σ_d²), c_out = σ_d(σ-σ_min)/sqrt(σ_d² + σ²),
        c_in = 1/sqrt(σ² + σ_d²) (papers/README.md; Song et al. 2023 App. C).
        diffusion (EDM Table 1): c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/sqrt(σ² + σ_d²), same c_in.
        """
        sd = self.sigma_data
        c_in = 1 / torch.sqrt(t**2 + sd**2)
        if kind == "consistency":
            c_skip = sd**2 / ((t - self.sigma_min) ** 2 + sd**2)
            c_out = sd * (t - self.sigma_min) / torch.sqrt(sd**2 + t**2)
        elif kind == "diffusion":
            c_skip = sd**2 / (t**2 + sd**2)
            c_out = t * sd / torch.sqrt(t**2 + sd**2)
        else:
            raise ValueError(f"unknown parameterisation '{kind}' (consistency | diffusion)")
        return c_skip, c_out, c_in, self.c_noise(t)


PROCESSES = {"ve": VEProcess}


def make_process(name: str, sigma_data: float, **kwargs) -> VEProcess:
    """Build the process named by the method config."""
    if name not in PROCESSES:
        raise ValueError(f"unknown process '{name}'. Valid processes: {', '.join(PROCESSES)}")
    return PROCESSES[name](sigma_data=sigma_data, **kwargs)

