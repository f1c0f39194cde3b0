"""Noise processes: the few numbers each owns and the maths that depends on them.

A process knows how to corrupt data (``add_noise``), its boundary time, its prior, and the
coefficients of the consistency and diffusion parameterisations (``scalings``). Nothing else in
cmkit branches on which process is in use (STYLE 2).
"""

from __future__ import annotations

import math
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
    # c_noise = scale·ln σ. 1 feeds ln σ to the Fourier layer as NCSN++ does (Song et al. 2023's
    # CIFAR-10 models; iCT Sec. 3.1 Fourier scale 0.02); ADM's positional embedding takes 1000·¼·ln σ
    # (scale 250). Measured on eight Gaussians, 1000 iCT steps: SWD 0.106 with 1 vs 0.377 with 250.
    c_noise_scale: float = 1.0
    # Intermediate σ's of few-step sampling (iCT App. B, iCT two-step σ_{i_2}: 0.821 CIFAR-10, 1.526 ImageNet 64).
    mid_sigmas: tuple[float, ...] = (0.821,)

    name = "ve"

    def __post_init__(self):
        mids = [float(s) for s in self.mid_sigmas]
        if any(not self.sigma_min < s < self.sigma_max for s in mids) or any(b >= a for a, b in zip(mids, mids[1:])):
            raise ValueError(f"method.mid_sigmas must decrease strictly inside (sigma_min, sigma_max) = "
                             f"({self.sigma_min}, {self.sigma_max}), got {mids}")
        object.__setattr__(self, "mid_sigmas", tuple(mids))

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
        """[σ_max] + the first K-1 of mid_sigmas (two steps: [80, 0.821] by default, iCT App. B).

        With more steps than mid_sigmas provides, the Karras grid with K+1 points, without σ_min.
        """
        if steps < 1:
            raise ValueError(f"sampling needs at least one step, got {steps}")
        if steps - 1 <= len(self.mid_sigmas):
            return [self.sigma_max, *self.mid_sigmas[: steps - 1]]
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


# ----------------------------------------------------------------------------
# TrigFlow (sCM, 004_225d7b9daa3d4cfe.txt Sec. 3).


def _c_noise_identity(t: Tensor, sigma_data: float) -> Tensor:
    """c_noise(t) = t, sCM's default (Sec. 4.1 'Identity Time Transformation')."""
    return t


# Smallest cos t the EDM transform divides by: below cos of the last float32 under π/2 (7.5e-8), so
# c_noise keeps increasing up to float32(π/2) (cos -4.4e-8); in float64 only t within 5e-8 of π/2 is capped.
_COS_MIN = 5e-8


def _c_noise_edm(t: Tensor, sigma_data: float) -> Tensor:
    """EDM's c_noise(σ) = ¼·ln σ at σ = σ_d·tan t (sCM Sec. 4.1, App. B.2), for ablation.

    sin(t)·∂_t c_noise = 1/(4 cos t) blows up as t → π/2, which is why sCM does not use it.
    σ is σ_d·sin t/max(cos t, _COS_MIN), not σ_d·tan t: float32(π/2), where the samplers start, lies
    4.4e-8 beyond π/2, so tan t there is -2.3e7 and ln σ would land at the clamp (the embedding of t ≈ 0).
    """
    sigma = sigma_data * torch.sin(t) / torch.cos(t).clamp_min(_COS_MIN)
    return 0.25 * torch.log(sigma.clamp_min(1e-20))


TIME_TRANSFORMS = {"identity": _c_noise_identity, "edm": _c_noise_edm}


@dataclass(frozen=True)
class TrigFlow:
    """TrigFlow x_t = cos(t)·x0 + sin(t)·z, z ~ N(0, σ_d² I), t ∈ [0, π/2] (sCM Sec. 3).

    ``scalings(t, "consistency")`` gives sCM Eq. 5, f = cos t·x - sin t·σ_d·F(x/σ_d, c_noise(t)), so
    f(x, 0) = x exactly. ``scalings(t, "diffusion")`` gives the PF-ODE velocity of Eq. 3,
    dx_t/dt = σ_d·F(x/σ_d, c_noise(t)) (c_skip = 0, c_out = σ_d): a TrigFlow diffusion model's
    output *is* its velocity (v-prediction), trained towards v_t = cos t·z - sin t·x0 (Eq. 4).
    c_noise(t) = time_scale·transform(t), transform in TIME_TRANSFORMS (default identity, Sec. 4.1).
    """

    sigma_data: float = 0.5
    time_transform: str = "identity"
    time_scale: float = 1.0
    mid_times: tuple[float, ...] = (1.1,)  # sCM Sec. 5.2: two-step sampling with t_mid = 1.1
    sigma_min: float = 0.002  # only for the default >2-step and ODE time grids (EDM's grid mapped to t)
    sigma_max: float = 80.0
    rho: float = 7.0

    name = "trigflow"
    t_min = 0.0
    t_max = math.pi / 2

    def __post_init__(self):
        if self.time_transform not in TIME_TRANSFORMS:
            raise ValueError(
                f"unknown time transform '{self.time_transform}'. Valid: {', '.join(TIME_TRANSFORMS)}"
            )
        if any(not 0 < t < math.pi / 2 for t in self.mid_times):
            raise ValueError(f"intermediate sampling times must lie in (0, π/2), got {list(self.mid_times)}")

    def add_noise(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """x_t = cos(t)·x0 + sin(t)·σ_d·z for standard normal z (sCM Sec. 3, 'Diffusion Process')."""
        t = _bcast(t, x0)
        return (torch.cos(t) * x0 + torch.sin(t) * self.sigma_data * z).to(x0.dtype)

    def velocity_target(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """v_t = dx_t/dt = cos(t)·σ_d z - sin(t)·x0 for standard normal z (sCM Eq. 4)."""
        t = _bcast(t, x0)
        return (torch.cos(t) * self.sigma_data * z - torch.sin(t) * x0).to(x0.dtype)

    def prior(self, shape, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        """x_{π/2} ~ N(0, σ_d² I)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype) * self.sigma_data

    def from_noise(self, noise: Tensor) -> Tensor:
        """Map standard normal noise to the prior at t = π/2: σ_d·z."""
        return noise * self.sigma_data

    def renoise(self, x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Multistep re-noising x ← cos(τ)·x0 + sin(τ)·σ_d·z (Song et al. 2023 Alg. 1 in TrigFlow)."""
        return self.add_noise(x0, z, t)

    def ode_times(self, steps: int) -> list[float]:
        """π/2 then EDM's Karras σ grid mapped by t = arctan(σ/σ_d), ``steps`` points, 0 excluded."""
        if steps < 1:
            raise ValueError(f"sampling needs at least one step, got {steps}")
        if steps == 1:
            return [self.t_max]
        sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho).flip(0)[1:]
        return [self.t_max] + [float(t) for t in torch.atan(sigmas / self.sigma_data)]

    def sampling_times(self, steps: int) -> list[float]:
        """[π/2] + the first steps-1 of mid_times ([π/2, 1.1] for two steps, sCM Sec. 5.2).

        With more steps than mid_times provides, the ODE grid of ``ode_times`` is used.
        """
        if steps < 1:
            raise ValueError(f"sampling needs at least one step, got {steps}")
        if steps - 1 <= len(self.mid_times):
            return [self.t_max, *self.mid_times[: steps - 1]]
        return self.ode_times(steps)

    def c_noise(self, t: Tensor) -> Tensor:
        return self.time_scale * TIME_TRANSFORMS[self.time_transform](t, self.sigma_data)

    def scalings(self, t: Tensor, kind: str = "consistency") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise): consistency cos t, -σ_d sin t, 1/σ_d (Eq. 5); diffusion 0, σ_d, 1/σ_d (Eq. 3)."""
        sd = self.sigma_data
        c_in = torch.full_like(t, 1.0 / sd)
        if kind == "consistency":
            c_skip, c_out = torch.cos(t), -sd * torch.sin(t)
        elif kind == "diffusion":
            c_skip, c_out = torch.zeros_like(t), torch.full_like(t, sd)
        else:
            raise ValueError(f"unknown parameterisation '{kind}' (consistency | diffusion)")
        return c_skip, c_out, c_in, self.c_noise(t)


PROCESSES = {"ve": VEProcess, "trigflow": TrigFlow}


def make_process(name: str, sigma_data: float, **kwargs):
    """Build the process named by the method config."""
    if name not in PROCESSES:
        raise ValueError(f"unknown process '{name}'. Valid processes: {', '.join(PROCESSES)}")
    return PROCESSES[name](sigma_data=sigma_data, **kwargs)

