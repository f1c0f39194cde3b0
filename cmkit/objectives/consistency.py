"""Discrete-time consistency training: CT (Song et al. 2023) and iCT (Song & Dhariwal 2023).

Both are one objective, L = E[λ(σ_i)·d(f_θ(x + σ_{i+1} z, σ_{i+1}), f_θ⁻(x + σ_i z, σ_i))]
(iCT Eq. 5); every row of iCT Table 1 is a separate option, so any mix can be configured.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from cmkit.losses import DISTANCES
from cmkit.model import Parameterized
from cmkit.nets import build_network
from cmkit.objectives.base import Objective, Phase, SharedDropout
from cmkit.processes import VEProcess
from cmkit.schedules import (
    CURRICULA,
    INDEX_DISTRIBUTIONS,
    WEIGHTINGS,
    Progress,
    ct_teacher_ema,
    pseudo_huber_c,
)


def _choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"method.{name}='{value}' is not valid. Choose one of: {', '.join(valid)}")


@dataclass
class ConsistencyConfig:
    """Options of discrete-time consistency training (iCT Table 1); presets in objectives/__init__."""

    name: str = "ict"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    curriculum: str = "exp"  # exp (iCT Eq. 9) | sqrt (CT) | const
    s0: int = 10
    s1: int = 1280
    noise_schedule: str = "lognormal"  # lognormal (iCT Eq. 10) | uniform (CT)
    p_mean: float = -1.1
    p_std: float = 2.0
    weighting: str = "reciprocal"  # reciprocal 1/(σ_{i+1}-σ_i) (iCT) | uniform (CT)
    distance: str = "pseudo_huber"  # see cmkit.losses.DISTANCES
    c: float = 0.0  # robust-distance constant; 0 = 0.00054·sqrt(d) (iCT Sec. 3.3)
    teacher_ema: bool = False  # CT: θ⁻ ← μ(k)θ⁻ + (1-μ(k))θ; iCT: μ = 0, the teacher is the student
    mu0: float = 0.9  # CT's μ0 in μ(k) = exp(s0 log μ0 / N(k))
    shared_dropout: bool = True  # same dropout masks in student and teacher (iCT Sec. 3.1)

    def validate(self) -> None:
        _choice("curriculum", self.curriculum, CURRICULA)
        _choice("noise_schedule", self.noise_schedule, INDEX_DISTRIBUTIONS)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("distance", self.distance, DISTANCES)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("method.sigma_min and method.sigma_max need 0 < sigma_min < sigma_max")
        if not 1 <= self.s0 <= self.s1:
            raise ValueError(f"method.s0 and method.s1 need 1 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")
        if not 0 <= self.mu0 < 1:
            raise ValueError(f"method.mu0 must lie in [0, 1), got {self.mu0}")
        if self.c < 0 or self.p_std <= 0 or self.sigma_data <= 0:
            raise ValueError("method.c must be >= 0, method.p_std and method.sigma_data > 0")


class ConsistencyTraining(Objective):
    """CT / iCT: one phase that trains the student consistency model."""

    def __init__(self, cfg, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.process = VEProcess(m.sigma_data, m.sigma_min, m.sigma_max, m.rho)
        self.model = Parameterized(build_network(cfg.net, shape, num_classes), self.process)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False) if m.teacher_ema else None
        self.c = m.c if m.c > 0 else pseudo_huber_c(math.prod(shape))
        self.distance = DISTANCES[m.distance]
        self.weighting = WEIGHTINGS[m.weighting]
        self._grids: dict = {}

    @property
    def phases(self) -> list[Phase]:
        return [Phase("model", self.model, self.loss)]

    def num_scales(self, progress: Progress) -> int:
        """N(k) of the configured curriculum."""
        return CURRICULA[self.cfg.curriculum](progress.k, progress.K, self.cfg.s0, self.cfg.s1)

    def grid(self, n: int, device: torch.device):
        """σ_1..σ_N and the index distribution p(i), cached per N (they change a few times a run)."""
        key = (n, device)
        if key not in self._grids:
            sigmas = self.process.karras_sigmas(n)
            probs = INDEX_DISTRIBUTIONS[self.cfg.noise_schedule](sigmas, self.cfg)
            self._grids = {key: (sigmas.to(device), probs.to(device))}
        return self._grids[key]

    def sample_pairs(self, x0: torch.Tensor, progress: Progress):
        """Draw i ~ p(i) and return (σ_i, σ_{i+1}) per sample in float64, and N."""
        n = self.num_scales(progress)
        sigmas, probs = self.grid(n, x0.device)
        i = torch.multinomial(probs, x0.shape[0], replacement=True)
        return sigmas[i], sigmas[i + 1], n

    def loss(self, batch, progress: Progress) -> dict:
        x0, labels = batch["x"], batch.get("labels")
        sigma_i, sigma_next, n = self.sample_pairs(x0, progress)
        z = torch.randn_like(x0)
        t_next, t_i = sigma_next.to(x0.dtype), sigma_i.to(x0.dtype)
        dropout = SharedDropout(x0.device, self.cfg.shared_dropout)
        with dropout.record():
            student = self.model(self.process.add_noise(x0, z, t_next), t_next, labels)
        teacher = self.teacher if self.teacher is not None else self.model
        with torch.no_grad(), dropout.replay():
            target = teacher(self.process.add_noise(x0, z, t_i), t_i, labels)
        # iCT Eq. 5 with λ(σ_i) (Table 1) and d of Eq. 8 or ℓ2.
        weight = self.weighting(sigma_i, sigma_next).to(torch.float32)
        loss = weight * self.distance(student, target, self.c)
        return {"loss": loss, "N": float(n)}

    @torch.no_grad()
    def after_phase(self, phase: str, progress: Progress) -> None:
        if self.teacher is None:
            return
        # iCT Eq. 4 with CT's μ(k) (Table 1, left column).
        mu = ct_teacher_ema(self.num_scales(progress), self.cfg.s0, self.cfg.mu0)
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.model.parameters()), 1 - mu)
        for bt, bm in zip(self.teacher.buffers(), self.model.buffers()):
            bt.copy_(bm)

