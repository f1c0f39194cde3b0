"""Discrete-time consistency training: CT (Song et al. 2023) and iCT (Song & Dhariwal 2023).

Both are one objective, L = E[λ(σ_i)·d(f_θ(x + σ_{i+1} z, σ_{i+1}), f_θ⁻(x + σ_i z, σ_i))]
(iCT Eq. 5); every row of iCT Table 1 is a separate option, so any mix can be configured.
iLCT's additions (robust distances, early diffusion loss, OT coupling, adaptive c) are options too.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from cmkit.config import ConfigError
from cmkit.coupling import COUPLINGS, ot_pair
from cmkit.losses import DISTANCE_NAMES, l2, make_distance
from cmkit.lpips import check_lpips_options
from cmkit.model import Parameterized
from cmkit.nets import build_network
from cmkit.objectives.base import Objective, Phase, SharedDropout, drop_labels
from cmkit.processes import VEProcess
from cmkit.schedules import (
    CURRICULA,
    INDEX_DISTRIBUTIONS,
    WEIGHTINGS,
    Progress,
    adaptive_c,
    ct_teacher_ema,
    pseudo_huber_c,
)

C_SCHEDULES = ("fixed", "adaptive")  # fixed: method.c (or iCT's 0.00054·sqrt(d)); adaptive: iLCT Eq. 11
DIFFUSION_AT = ("current", "next")  # where iLCT Eq. 9's diffusion loss reads f_θ: at t_i (the paper) or at t_{i+1}
C_REFERENCE_DIM = 4096  # iLCT's latents (32x32x4) for which Eq. 11's constants were fitted


def diffusion_mask(sigma_i: torch.Tensor, sigmas: torch.Tensor, r: float) -> torch.Tensor:
    """1.0 where iLCT Eq. 9's diffusion loss applies, else 0.0: σ_i = t_i with 1-based i ≤ int(N·r).

    ``sigmas`` is the increasing N-point grid t_1..t_N; since it increases, i ≤ m ⇔ σ_i ≤ t_m.
    """
    m = int(sigmas.numel() * r)
    if m < 1:
        return torch.zeros(sigma_i.shape, dtype=torch.float32, device=sigma_i.device)
    return (sigma_i <= sigmas[m - 1].to(sigma_i.dtype)).to(torch.float32)


def _choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"method.{name}='{value}' is not valid. Choose one of: {', '.join(valid)}")


@dataclass
class ConsistencyConfig:
    """Options of discrete-time consistency training (iCT Table 1); presets in objectives/__init__."""

    name: str = "ict"
    sigma_data: float | str = 0.5  # σ_data of the EDM scalings; "auto" = the training data's measured std (resolve_sigma_data)
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
    distance: str = "pseudo_huber"  # see cmkit.losses.DISTANCE_NAMES (lpips: method.lpips_weights)
    c: float = 0.0  # robust-distance constant; 0 = 0.00054·sqrt(d) (iCT Sec. 3.3)
    teacher_ema: bool = False  # CT: θ⁻ ← μ(k)θ⁻ + (1-μ(k))θ; iCT: μ = 0, the teacher is the student
    mu0: float = 0.9  # CT's μ0 in μ(k) = exp(s0 log μ0 / N(k))
    shared_dropout: bool = True  # same dropout masks in student and teacher (iCT Sec. 3.1)
    c_noise_scale: float = 1.0  # c_noise = scale·ln σ: 1 feeds NCSN++'s Fourier layer ln σ; 250 = ADM's 1000·¼·ln σ
    mid_sigmas: list[float] = field(default_factory=lambda: [0.821])  # few-step sampling σ's (iCT App. B: 0.821 CIFAR-10, 1.526 ImageNet 64)
    # iLCT (002_915a3e3a8597e2f0.txt): each technique is a separate switch (Table 2a ladder).
    c_schedule: str = "fixed"  # fixed | adaptive: c = exp(-1.18·log(N(k)-1) - 0.72) (iLCT Eq. 11)
    diffusion_weight: float = 0.0  # weight of the diffusion loss (iLCT Eq. 9); 0 = off
    diffusion_r: float = 0.25  # diffusion loss on pairs with i ≤ int(N·r) (iLCT Eq. 9, Table 2b)
    coupling: str = "none"  # none | ot (exact, scipy) | ot_pot (POT's ot.emd): minibatch OT (iLCT Sec. 4.4)
    # LPIPS (method.distance=lpips, cmkit.lpips): local weight files only, nothing downloads.
    lpips_weights: list[str] = field(default_factory=list)  # VGG16/AlexNet features + LPIPS v0.1 heads (.safetensors/.pth)
    lpips_net: str = "vgg"  # vgg | alex
    lpips_pooling: str = "max"  # max (LPIPS) | avg (openai/consistency_models: piq LPIPS(replace_pooling=True))
    # Eq. 9's f_θ: current = f_θ(x_{t_i}, t_i) as written (iCT: the target pass, run with a graph; an EMA teacher:
    # one more student pass) | next = the student's f_θ(x_{t_{i+1}}, t_{i+1}): no extra pass, one grid step higher.
    diffusion_at: str = "current"
    c_dim_scale: bool = False  # adaptive c times sqrt(d/4096): Eq. 11 was fitted on d = 4096 latents
    # Not in the five papers: replace a label by the null label ∅ with this probability (Ho & Salimans 2021), so
    # a class-conditional student also learns f(x, σ, ∅) and can be sampled with classifier-free guidance
    # (cmkit.sampling.WithCFG). 0 = off, the papers' setting.
    label_dropout: float = 0.0
    guidance: float = 1.0  # the CFG scale w that sampling and eval use by default (label_dropout > 0); 1 = none

    def validate(self) -> None:
        _choice("curriculum", self.curriculum, CURRICULA)
        _choice("noise_schedule", self.noise_schedule, INDEX_DISTRIBUTIONS)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("distance", self.distance, DISTANCE_NAMES)
        check_lpips_options(self)
        _choice("c_schedule", self.c_schedule, C_SCHEDULES)
        _choice("coupling", self.coupling, COUPLINGS)
        _choice("diffusion_at", self.diffusion_at, DIFFUSION_AT)
        if self.diffusion_weight < 0 or not 0 <= self.diffusion_r <= 1:
            raise ValueError("method.diffusion_weight must be >= 0 and method.diffusion_r in [0, 1]")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("method.sigma_min and method.sigma_max need 0 < sigma_min < sigma_max")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"method.label_dropout must lie in [0, 1), got {self.label_dropout}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"method.guidance must be a finite number >= 0 (1 = no guidance), got {self.guidance}")
        if self.guidance != 1 and self.label_dropout == 0:
            raise ValueError(f"method.guidance={self.guidance} samples with classifier-free guidance, which needs "
                             f"the unconditional model: set method.label_dropout > 0 (e.g. 0.1), or method.guidance=1")
        if not 1 <= self.s0 <= self.s1:
            raise ValueError(f"method.s0 and method.s1 need 1 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")
        if not 0 <= self.mu0 < 1:
            raise ValueError(f"method.mu0 must lie in [0, 1), got {self.mu0}")
        if isinstance(self.sigma_data, str) and self.sigma_data != "auto":
            raise ValueError(f"method.sigma_data='{self.sigma_data}' is not valid: give a number > 0 or auto")
        if self.c < 0 or self.p_std <= 0 or (self.sigma_data != "auto" and self.sigma_data <= 0):
            raise ValueError("method.c must be >= 0, method.p_std and method.sigma_data > 0")
        if self.sigma_data != "auto":
            ve_process(self)  # method.mid_sigmas inside (sigma_min, sigma_max), decreasing


def resolve_sigma_data(cfg, x):
    """cfg with method.sigma_data=auto replaced by the std of the (normalised) training data x over all elements,
    as EDM sets σ_data from the data; the resolved number is what the run's config.yaml records. Else cfg itself."""
    if getattr(cfg.method, "sigma_data", None) != "auto":
        return cfg
    # Streamed in row chunks (float64 sums), so a memory-mapped prepared dataset is never decoded whole.
    n, total, total_sq, count = len(x), 0.0, 0.0, 0
    for start in range(0, n, 4096):
        rows = x[torch.arange(start, min(start + 4096, n))].double()
        total, total_sq, count = total + float(rows.sum()), total_sq + float(rows.square().sum()), count + rows.numel()
    std = math.sqrt(max(total_sq - total * total / count, 0.0) / max(count - 1, 1))  # unbiased, as Tensor.std
    if not std > 0:
        raise ConfigError(f"method.sigma_data=auto: the training data's std is {std}; give method.sigma_data=<number>")
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, sigma_data=round(std, 6)))


def ve_process(m) -> VEProcess:
    """The VE process of a method config with the fields sigma_data, sigma_min, sigma_max, rho, c_noise_scale, mid_sigmas."""
    if m.sigma_data == "auto":
        raise ConfigError("method.sigma_data=auto is measured from the training data by cmkit.train "
                          "(objectives.consistency.resolve_sigma_data); elsewhere give a number")
    return VEProcess(m.sigma_data, m.sigma_min, m.sigma_max, m.rho, m.c_noise_scale, tuple(m.mid_sigmas))


class ConsistencyTraining(Objective):
    """CT / iCT: one phase that trains the student consistency model."""

    def __init__(self, cfg, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.process = ve_process(m)
        self.model = Parameterized(build_network(cfg.net, shape, num_classes), self.process)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False) if m.teacher_ema else None
        self.c = m.c if m.c > 0 else pseudo_huber_c(math.prod(shape))
        self.c_dim_factor = math.sqrt(math.prod(shape) / C_REFERENCE_DIM) if m.c_dim_scale else 1.0
        self.distance = make_distance(m, shape, latent=bool(cfg.data.vae))  # an LPIPS module is a submodule
        self.weighting = WEIGHTINGS[m.weighting]
        self._grids: dict = {}
        self.num_classes = num_classes if cfg.net.class_cond else 0
        if m.label_dropout > 0 and not self.num_classes:
            raise ConfigError("method.label_dropout needs a class-conditional model: net.class_cond=true, data.labels=true")

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

    def robust_c(self, n: int) -> float:
        """The distance's constant c at N discretisation points: fixed, or iLCT's adaptive c (Eq. 11), optionally
        scaled by sqrt(d/4096) to the data's dimension d (method.c_dim_scale), as iCT's c0 = 0.00054·sqrt(d) scales."""
        return adaptive_c(n) * self.c_dim_factor if self.cfg.c_schedule == "adaptive" else self.c

    def loss(self, batch, progress: Progress) -> dict:
        return self.loss_with_output(batch, progress)[0]

    def loss_with_output(self, batch, progress: Progress) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """``loss``'s dict plus the student's output f_θ(x + σ_{i+1} z, σ_{i+1}) and σ_{i+1}, for
        objectives that add terms on that output (CM-GAN's generator loss)."""
        x0, labels = batch["x"], batch.get("labels")
        if labels is not None and self.cfg.label_dropout > 0:  # the same (dropped) label in student and target
            labels = drop_labels(labels, self.num_classes, self.cfg.label_dropout)
        sigma_i, sigma_next, n = self.sample_pairs(x0, progress)
        z = torch.randn_like(x0)
        if self.cfg.coupling != "none":
            z = ot_pair(x0, z, self.cfg.coupling)  # iLCT Sec. 4.4: re-pair noise and data in this rank's batch
        t_next, t_i = sigma_next.to(x0.dtype), sigma_i.to(x0.dtype)
        # The stop-grad target first: its activations are freed before the student's are built, which
        # measured 3% faster per step on CPU (docs/benchmarks.md); the shared dropout mask is the same either way.
        dropout = SharedDropout(x0.device, self.cfg.shared_dropout)
        teacher = self.teacher if self.teacher is not None else self.model
        x_i = self.process.add_noise(x0, z, t_i)
        diffusion = self.cfg.diffusion_weight > 0
        at_t_i = None  # f_θ(x_{t_i}, t_i) with a graph, for iLCT Eq. 9 as written
        if diffusion and self.cfg.diffusion_at == "current" and self.teacher is None:
            with dropout.record():  # iCT: θ⁻ = sg(θ), so the target is this pass, detached
                at_t_i = self.model(x_i, t_i, labels)
            target = at_t_i.detach()
        else:
            with torch.no_grad(), dropout.record():
                target = teacher(x_i, t_i, labels)
        with dropout.replay():
            student = self.model(self.process.add_noise(x0, z, t_next), t_next, labels)
        # iCT Eq. 5 with λ(σ_i) (Table 1) and d: ℓ2, Pseudo-Huber (iCT Eq. 8), Cauchy or Geman-McClure (iLCT Eq. 6, 8).
        weight = self.weighting(sigma_i, sigma_next).to(torch.float32)
        c = self.robust_c(n)
        loss = weight * self.distance(student, target, c)
        logs = {"N": float(n)}
        if self.cfg.c_schedule == "adaptive":
            logs["c"] = c
        if diffusion:
            # iLCT Eq. 9: ‖f_θ(x_{t_i}, t_i) - x0‖² for i ≤ int(N·r). diffusion_at=current reads f_θ at t_i as written
            # (an EMA teacher needs one more student pass, same dropout mask); next reads the student at t_{i+1}.
            if self.cfg.diffusion_at == "current" and at_t_i is None:
                with dropout.replay():
                    at_t_i = self.model(x_i, t_i, labels)
            output = at_t_i if self.cfg.diffusion_at == "current" else student
            mask = diffusion_mask(sigma_i, self.grid(n, x0.device)[0], self.cfg.diffusion_r)
            diff = mask * l2(output, x0)
            loss = loss + self.cfg.diffusion_weight * diff
            logs["diffusion_loss"] = diff.detach().sum() / mask.sum().clamp_min(1)
        return {"loss": loss, **logs}, student, t_next

    @torch.no_grad()
    def after_phase(self, phase: str, progress: Progress) -> None:
        if self.teacher is None:
            return
        # iCT Eq. 4 with CT's μ(k) (Table 1, left column).
        mu = ct_teacher_ema(self.num_scales(progress), self.cfg.s0, self.cfg.mu0)
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.model.parameters()), 1 - mu)
        for bt, bm in zip(self.teacher.buffers(), self.model.buffers()):
            bt.copy_(bm)

