"""Continuous-time consistency models in TrigFlow: sCT and sCD (Lu & Song, 004_225d7b9daa3d4cfe.txt).

One objective, Eq. 8: L(θ, φ) = E[e^{w_φ(t)}/D·‖F_θ - F_θ⁻ - g‖² - w_φ(t)] with g = cos(t)·df_θ⁻/dt
(the prior weighting 1/(σ_d tan t) folded in), the tangent df_θ⁻/dt of Eq. 6 taken by forward-mode
AD of the stop-gradient network in a separate no-grad pass, arranged as in Sec. 5.1. sCT estimates
the PF-ODE by dx_t/dt = cos t·σ_d z - sin t·x0; sCD asks a TrigFlow diffusion teacher (Eq. 3), with
classifier-free guidance at a scale w that the student takes as an extra input when the teacher is
class-conditional (Sec. 5.2).
With ``discrete_steps = N`` the tangent becomes the finite difference of f_θ⁻ over one step of an
N-step grid: discrete-time consistency training in TrigFlow with every other technique unchanged
(for the continuous/discrete comparison of Fig. 5c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cmkit.config import ConfigError
from cmkit.model import Parameterized
from cmkit.nets import build_network
from cmkit.nets.attention import attention_backend
from cmkit.nets.layers import PositionalEmbedding
from cmkit.objectives.base import Objective, Phase, SharedDropout
from cmkit.objectives.distillation import init_from_teacher, teacher_extra_state, teacher_or_saved
from cmkit.processes import TIME_TRANSFORMS, TrigFlow, _bcast
from cmkit.schedules import Progress, tangent_warmup, trigflow_lognormal_times

TANGENT_NORMS = ("normalize", "clip", "none")
TANGENT_NORM_KINDS = ("rms", "l2")
PRIOR_WEIGHTINGS = ("prior", "uniform")


def _choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"method.{name}='{value}' is not valid. Choose one of: {', '.join(valid)}")


@dataclass
class SCMConfig:
    """Options of sCT / sCD (sCM Sec. 4-5); presets in objectives/__init__.

    P_mean = -1.0, P_std = 1.4 and H = 10k are the paper's CIFAR-10 settings (its App. G; the
    appendix is not in the extracted text, so these values are quoted from the published paper).
    """

    name: str = "sct"
    sigma_data: float = 0.5
    time_transform: str = "identity"  # c_noise(t) = t (Sec. 4.1) | edm: ¼ ln(σ_d tan t) (App. B.2)
    time_scale: float = 1.0  # c_noise multiplier (1000 reproduces 'c_noise = 1000 t' style embeddings)
    t_mid: list[float] = field(default_factory=lambda: [1.1])  # intermediate sampling times (Sec. 5.2)
    p_mean: float = -1.0  # proposal: ln(σ_d tan t) ~ N(P_mean, P_std²)
    p_std: float = 1.4
    weighting: str = "prior"  # prior w(t) = 1/(σ_d tan t) (Eq. 8) | uniform w(t) = 1 (Eq. 2 as is)
    adaptive_weighting: bool = True  # learn w_φ(t) jointly (Eq. 8)
    weighting_dim: int = 128  # width of w_φ's positional time features
    tangent_norm: str = "normalize"  # normalize g/(‖g‖+c) | clip to [-1, 1] | none
    tangent_c: float = 0.1
    # The norm of tangent normalisation: l2 = ‖g‖₂ over all D dimensions (the paper's form; c = 0.1 is nearly inert
    # and w_φ drifts to ln D) | rms = ‖g‖₂/√D (c and w_φ stay O(1) at any D). Digits, 400 steps: an FD tie, so the
    # paper's l2 stays the default (docs/results.md, "tangent normalisation's norm").
    tangent_norm_kind: str = "l2"
    tangent_warmup: int = 10000  # H: r = min(k/H, 1) multiplies the sin(t) term of Eq. 6 (or its discrete analogue); 0 = off
    discrete_steps: int = 0  # N > 0: discrete-time CM in TrigFlow on an N-step grid (Fig. 5c)
    shared_dropout: bool = True  # identical dropout masks in the tangent pass and the student pass
    jvp_fp32: bool = True  # run the tangent pass with autocast disabled (Sec. 5.1 numerics)
    jvp_tf32: bool = False  # CUDA: allow TF32 matmuls/convolutions in the tangent pass (off: 10-bit mantissa, see below)
    teacher: str = ""  # sCD: run directory of a TrigFlow diffusion model (method.name=trigflow)
    init_from_teacher: bool = True  # sCD: start the student from the teacher's weights (Sec. 4.2)
    # sCD with classifier-free guidance (Sec. 5.2): the teacher velocity is F(·,∅) + w·(F(·,c) - F(·,∅)) and
    # the student takes w as an input (net.guidance_cond=true). w ~ U[guidance_range] per sample (the paper:
    # s ∈ [1, 2] on ImageNet 512²), or the fixed guidance when the range is empty; guidance is also the
    # default w for sampling. 1 = no guidance (the default).
    guidance: float = 1.0
    guidance_range: list[float] = field(default_factory=list)

    @property
    def guided(self) -> bool:
        """Whether the teacher runs with classifier-free guidance."""
        return self.guidance != 1 or bool(self.guidance_range)

    def validate(self) -> None:
        _choice("time_transform", self.time_transform, TIME_TRANSFORMS)
        _choice("tangent_norm", self.tangent_norm, TANGENT_NORMS)
        _choice("tangent_norm_kind", self.tangent_norm_kind, TANGENT_NORM_KINDS)
        _choice("weighting", self.weighting, PRIOR_WEIGHTINGS)
        if self.sigma_data <= 0 or self.p_std <= 0 or self.tangent_c < 0:
            raise ValueError("method.sigma_data and method.p_std must be > 0, method.tangent_c >= 0")
        if any(not 0 < t < math.pi / 2 for t in self.t_mid) or any(b >= a for a, b in zip(self.t_mid, self.t_mid[1:])):
            raise ValueError(f"method.t_mid must decrease strictly inside (0, π/2), got {self.t_mid}")
        if self.discrete_steps < 0 or self.tangent_warmup < 0:
            raise ValueError("method.discrete_steps and method.tangent_warmup must be >= 0")
        if self.name == "scd" and not self.teacher:
            raise ValueError("method.name=scd needs method.teacher=<run dir of a method.name=trigflow run>")
        if self.guidance < 0:
            raise ValueError(f"method.guidance must be >= 0 (1 = no guidance), got {self.guidance}")
        if self.guidance_range:
            if len(self.guidance_range) != 2 or not 0 <= self.guidance_range[0] <= self.guidance_range[1]:
                raise ValueError(f"method.guidance_range must be [] or [w_min, w_max] with 0 <= w_min <= w_max, "
                                 f"got {self.guidance_range}")
            if not self.guidance_range[0] <= self.guidance <= self.guidance_range[1]:
                raise ValueError(f"method.guidance={self.guidance} (the default sampling scale) must lie in "
                                 f"method.guidance_range={self.guidance_range}")
        if self.guided and not self.teacher:
            raise ValueError("method.guidance/method.guidance_range guide a class-conditional sCD teacher "
                             "(method.teacher); classifier-free guidance is incompatible with consistency training "
                             "(sCM Sec. 5.2)")


class AdaptiveWeight(nn.Module):
    """w_φ(t): a linear map of positional features of c_noise(t) (sCM Eq. 8; EDM2's learned log-variance)."""

    def __init__(self, process: TrigFlow, dim: int = 128):
        super().__init__()
        self.process = process
        self.features = PositionalEmbedding(dim)
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)  # start at w_φ = 0: e^{w_φ} = 1, the plain Eq. 8 weight
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear(self.features(self.process.c_noise(t.float()))).squeeze(1)


# -- hook for backbones with their own w_φ head (cmkit/nets/edm2.py) ----------------------------------------
class NetLogvar(nn.Module):
    """w_φ(t) = net.logvar(c_noise(t)): the backbone's own log-variance head (EDM2 Eq. 21, nets/edm2.py).

    The net is held in a list, not as a submodule: its head's parameters are the model's, so they are
    optimised, EMA'd and checkpointed once, with the model."""

    def __init__(self, net: nn.Module, process: TrigFlow):
        super().__init__()
        self._net = [net]
        self.process = process

    def forward(self, t: Tensor) -> Tensor:
        return self._net[0].logvar(self.process.c_noise(t.float()))


def normalize_tangent(g: Tensor, kind: str, c: float = 0.1, norm: str = "l2") -> Tensor:
    """sCM Sec. 4.2 'Tangent Normalization': g/(‖g‖ + c) per sample, or clip(g, -1, 1), or g.

    ‖g‖ is ``norm``: 'l2', the Euclidean norm over all D dimensions as the paper writes it, or 'rms',
    ‖g‖₂/√D (per-element root mean square). With l2 the normalised g has elements of size 1/√D, so c = 0.1
    (the paper's value) is negligible against ‖g‖ ~ √D and w_φ's optimum drifts to ln D; rms keeps both O(1)
    (issue 15's deviation; measured in docs/results.md, "tangent normalisation's norm").

    g is the weighted tangent of the loss (cos t·df⁻/dt under the prior weighting), as in the published
    paper's Algorithm 1 (App. A, not in the extracted text), which normalises g after forming it. The
    extracted Sec. 4.2 and Fig. 5a text normalise the raw tangent df⁻/dt instead. Algorithm 1's form equals
    df⁻/dt/(‖df⁻/dt‖ + c/cos t); the text's rule inside Eq. 8 would give cos t·df⁻/dt/(‖df⁻/dt‖ + c). Clipping
    likewise bounds cos t·df⁻/dt here, df⁻/dt in the text.
    """
    if kind == "normalize":
        n = g.flatten(1).norm(dim=1)
        if norm == "rms":
            n = n / math.sqrt(g[0].numel())
        elif norm != "l2":
            raise ValueError(f"tangent norm '{norm}' is not valid. Choose one of: {', '.join(TANGENT_NORM_KINDS)}")
        return g / (n.reshape(-1, *[1] * (g.ndim - 1)) + c)
    if kind == "clip":
        return g.clamp(-1.0, 1.0)
    return g


class ContinuousConsistency(Objective):
    """sCT / sCD: one phase stepping the student F_θ and the weighting network w_φ together."""

    def __init__(self, cfg, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.process = TrigFlow(m.sigma_data, m.time_transform, m.time_scale, tuple(m.t_mid))
        self.model = Parameterized(build_network(cfg.net, shape, num_classes), self.process, "consistency")
        self.weight_net = AdaptiveWeight(self.process, m.weighting_dim) if m.adaptive_weighting else None
        if m.adaptive_weighting and getattr(self.model.net, "has_logvar", False):  # hook: the net's own w_φ (edm2)
            self.weight_net = NetLogvar(self.model.net, self.process)
        self.teacher = None
        self.attention = getattr(cfg.net, "attention", "auto")  # net.attention (cmkit.nets.attention)
        self._compiled = None  # the torch.compile'd student pass (compile_student), not a registered submodule
        self.num_classes = num_classes if cfg.net.class_cond else 0
        self.guidance_input = cfg.net.guidance_cond
        self.sample_guidance = m.guidance if cfg.net.guidance_cond else None
        if m.guided and not cfg.net.guidance_cond:
            raise ConfigError("method.guidance/method.guidance_range need a student that takes the guidance scale "
                              "as an input: set net.guidance_cond=true (sCM Sec. 5.2)")
        if m.teacher:  # the loader CD uses; the teacher's output is its velocity σ_d F_teacher (Eq. 3)
            self.set_teacher(teacher_or_saved(cfg, self.process, tuple(shape)))
            if m.init_from_teacher:  # diffusion fine-tuning (Sec. 4.2): same backbone, its weights
                init_from_teacher(self.model, self.teacher)

    def compile_student(self, **kwargs) -> None:
        """torch.compile the student pass only; the tangent pass (torch.func.jvp) keeps the eager network.

        MACHINE-NOTES §1: a compiled network fails under the JVP (GroupNorm's forward-AD formula, SDPA), so the
        backbone is not compiled in place; the compiled wrapper shares its parameters and is not registered,
        so state_dict keys do not change.
        """
        self.__dict__["_compiled"] = torch.compile(self.model.net, **kwargs)

    def student(self, x_scaled: Tensor, c_noise: Tensor, labels=None, guidance: Tensor | None = None) -> Tensor:
        """The student pass F_θ(x_t/σ_d, c_noise(t)[, w]) with gradients: compiled if compile_student() ran."""
        net = self._compiled if self._compiled is not None else self.model.net
        return net(x_scaled, c_noise, labels, guidance=guidance)

    def set_teacher(self, teacher: nn.Module) -> None:
        """Use a TrigFlow diffusion model (output = velocity dx_t/dt, Eq. 3) as the sCD teacher."""
        for key in ("time_transform", "time_scale"):  # the teacher must see the c_noise(t) the student sees
            theirs, ours = getattr(teacher.process, key), getattr(self.process, key)
            if theirs != ours:
                raise ConfigError(f"method.{key}={ours} must equal the teacher's ({theirs}): the sCD student and its "
                                  f"TrigFlow teacher share c_noise(t) (init_from_teacher copies its weights); set "
                                  f"method.{key}={theirs}")
        class_cond = getattr(teacher, "class_cond", False)
        if self.cfg.guided and not class_cond:
            raise ConfigError("method.guidance/method.guidance_range need a class-conditional teacher (classifier-"
                              "free guidance, sCM Sec. 5.2); this teacher was trained with net.class_cond=false")
        if class_cond != bool(self.num_classes):
            raise ConfigError(f"the teacher has net.class_cond={class_cond} but this run net.class_cond="
                              f"{bool(self.num_classes)}; distil a class-conditional teacher into a class-conditional "
                              f"student")
        if teacher.process.sigma_data != self.cfg.sigma_data:
            raise ConfigError(f"method.sigma_data={self.cfg.sigma_data} must equal the teacher's "
                              f"({teacher.process.sigma_data})")
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        """The teacher stays in eval mode (no dropout) whatever the objective's mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def extra_state(self) -> dict:
        return teacher_extra_state(self.teacher) if self.teacher is not None else {}

    @property
    def phases(self) -> list[Phase]:
        # One optimiser steps F_θ and w_φ jointly (Eq. 8 minimises over both).
        modules = {"model": self.model}
        if self.weight_net is not None:
            modules["weight"] = self.weight_net
        return [Phase("model", nn.ModuleDict(modules), self.loss)]

    # -- pieces ----------------------------------------------------------------
    def sample_t(self, n: int, device) -> Tensor:
        return trigflow_lognormal_times(n, self.cfg.p_mean, self.cfg.p_std, self.cfg.sigma_data, device=device)

    def sample_guidance_scales(self, n: int, device, dtype) -> Tensor | None:
        """Per-sample CFG scales w for a guidance-conditional student: U[w_min, w_max] (sCM Sec. 5.2: s ∈ [1, 2])
        or the fixed method.guidance; None when the student takes no w."""
        if not self.guidance_input:
            return None
        if not self.cfg.guidance_range:
            return torch.full((n,), self.cfg.guidance, device=device, dtype=dtype)
        lo, hi = self.cfg.guidance_range
        return lo + (hi - lo) * torch.rand(n, device=device, dtype=dtype)

    def _F(self, x_scaled: Tensor, t: Tensor, labels, guidance: Tensor | None = None) -> Tensor:
        """F_θ(x_t/σ_d, c_noise(t)[, w]) with c_noise inside, so derivatives in t pass through it."""
        return self.model.net(x_scaled, self.process.c_noise(t), labels, guidance=guidance)

    @torch.no_grad()
    def tangent(self, x_t: Tensor, t: Tensor, dxdt: Tensor, labels=None, r: float = 1.0,
                guidance: Tensor | None = None, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(F_θ⁻, λ(t)·df_θ⁻/dt) at (x_t, t) along dx_t/dt, by one no-grad JVP (sCM Eq. 6, Sec. 5.1).

        λ = weight, cos t by default (the prior weighting folded into Eq. 8). The JVP of F⁻ at
        (x_t/σ_d, t) with tangents (λ sin t·dx_t/dt, λ sin t·σ_d) gives σ_d λ sin t·dF⁻/dt (for λ = cos t
        the arrangement of Sec. 5.1; the extracted equation drops the σ_d on its left, derived here from
        dF⁻/dt = ∇F⁻·(dx_t/dt)/σ_d + ∂_t F⁻). Then, from Eq. 6 times λ, with the tangent-warmup r on
        the sin t term (Sec. 4.2):
        λ·df⁻/dt = -λ cos t·(σ_d F⁻ - dx_t/dt) - r·(λ sin t·x_t + σ_d λ sin t·dF⁻/dt).
        The guidance scale w is fixed along the trajectory, so it is an input but not a primal of the JVP.
        """
        sd = self.cfg.sigma_data
        t = t.to(x_t.dtype)
        lam = torch.cos(t) if weight is None else weight.to(x_t.dtype)
        cs = lam * torch.sin(t)
        lc, csb = _bcast(lam * torch.cos(t), x_t), _bcast(cs, x_t)

        def F(x_scaled, tt):
            return self._F(x_scaled, tt, labels, guidance)

        autocast_off = torch.autocast(x_t.device.type, enabled=False) if self.cfg.jvp_fp32 else _null()
        # Sec. 5.1: the JVP through attention takes the JVP-capable kernel (cmkit.nets.attention); on CUDA, TF32
        # stays off here unless method.jvp_tf32: TF32 keeps 10 mantissa bits (~1e-3 relative), and the tangent
        # dF/dt is small next to F, is divided by its norm (Sec. 4.2) and enters the loss undamped.
        tf32 = _tf32(self.cfg.jvp_tf32) if x_t.is_cuda else _null()
        with autocast_off, tf32, attention_backend(self.attention, jvp=True):
            F_minus, jvp = torch.func.jvp(F, (x_t / sd, t), (csb * dxdt, cs * sd))
        g = -lc * (sd * F_minus - dxdt) - r * (csb * x_t + jvp)
        return F_minus, g

    @torch.no_grad()
    def finite_difference_tangent(self, x_t, t, x_s, s, labels, dropout: SharedDropout, guidance=None,
                                  r: float = 1.0, weight: Tensor | None = None):
        """(F_θ⁻(x_t), λ(t)·(C + r·S)/(t - s)): the discrete-time tangent (Fig. 5c), λ = weight or cos t.

        Fig. 5c trains discrete-time CMs 'using all techniques in Sec. 4', so the tangent warmup r scales
        the discrete sin term too. Eq. 5 and the discrete product rule split f⁻(x_t, t) - f⁻(x_s, s)
        exactly into C + S (derived here; the paper's App. E is not in the extracted text):
        C = cos t·(x_t - x_s) - σ_d (sin t - sin s)·F⁻_s → -cos t·(σ_d F⁻ - dx_t/dt)·Δt,
        S = (cos t - cos s)·x_s - σ_d sin t·(F⁻_t - F⁻_s) → -sin t·(x_t + σ_d dF⁻/dt)·Δt,
        Eq. 6's two terms as s → t. At r = 1 the tangent is the plain λ·(f⁻_t - f⁻_s)/(t - s).
        """
        sd = self.cfg.sigma_data
        with dropout.record():
            F_t = self._F(x_t / sd, t, labels, guidance)
        with dropout.replay():
            F_s = self._F(x_s / sd, s, labels, guidance)
        cos_t, sin_t, cos_s, sin_s = (_bcast(fn(a), x_t) for a in (t, s) for fn in (torch.cos, torch.sin))
        C = cos_t * (x_t - x_s) - sd * (sin_t - sin_s) * F_s
        S = (cos_t - cos_s) * x_s - sd * sin_t * (F_t - F_s)
        lam = torch.cos(t) if weight is None else weight
        return F_t, _bcast(lam / (t - s), x_t) * (C + r * S)

    def velocity(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, labels, guidance: Tensor | None = None) -> Tensor:
        """dx_t/dt: cos t·σ_d z - sin t·x0 (sCT) or the teacher's σ_d F_teacher(x_t/σ_d, t) (sCD, Eq. 3),
        classifier-free guided at the per-sample scales w when method.guidance/guidance_range ask for it."""
        if self.teacher is None:
            return self.process.velocity_target(x0, z, t)
        with torch.no_grad():
            if not self.cfg.guided:
                return self.teacher(x_t, t, labels)
            if guidance is None or labels is None:
                raise ValueError("a guided sCD teacher needs class labels and per-sample guidance scales w")
            # sCM Sec. 5.2 (CFG, Ho & Salimans 2021): F = F(x, t, ∅) + w·(F(x, t, c) - F(x, t, ∅)); the null
            # label ∅ is the zero label vector (cmkit.nets.layers.NoiseEmbedding, trigflow's label_dropout).
            # The velocity σ_d·F is linear in F, so the guided velocity combines the two velocities alike.
            cond = labels.to(x_t.dtype) if labels.is_floating_point() else nn.functional.one_hot(
                labels.long(), self.num_classes).to(x_t.dtype)
            v = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
            v_cond, v_null = v.chunk(2)
            return v_null + _bcast(guidance.to(v.dtype), v) * (v_cond - v_null)

    # -- the loss --------------------------------------------------------------
    def consistency_loss(self, x0: Tensor, z: Tensor, t: Tensor, labels=None, progress: Progress | None = None,
                         guidance: Tensor | None = None) -> dict:
        """Per-sample Eq. 8 at given data x0, standard normal z, times t [and CFG scales w, Sec. 5.2]."""
        m, sd = self.cfg, self.cfg.sigma_data
        x_t = self.process.add_noise(x0, z, t)
        dropout = SharedDropout(x0.device, m.shared_dropout)
        r = tangent_warmup(progress.k, m.tangent_warmup) if progress is not None else 1.0
        # g = λ(t)·df⁻/dt. Prior weighting 1/(σ_d tan t): λ = cos t (Eq. 8). Uniform w = 1 (Eq. 2 as is): the
        # θ-gradient of Eq. 2 is -σ_d sin t·df⁻/dt·∇F_θ, so λ = σ_d sin t, formed directly: σ_d tan t·(cos t·df/dt)
        # relies on two sign flips cancelling beyond π/2, where float32(π/2), the last grid point, lies.
        lam = torch.cos(t) if m.weighting == "prior" else sd * torch.sin(t)
        if m.discrete_steps > 0:
            step = (math.pi / 2) / m.discrete_steps
            s = t - step
            if self.teacher is None:  # CT: the same x0 and z one grid step earlier
                x_s = self.process.add_noise(x0, z, s)
            else:  # CD: one exact-for-one-point TrigFlow step with the teacher velocity (DDIM)
                x_s = math.cos(step) * x_t - math.sin(step) * self.velocity(x0, z, x_t, t, labels, guidance)
            F_minus, g = self.finite_difference_tangent(x_t, t, x_s, s, labels, dropout, guidance, r, lam)
        else:
            dxdt = self.velocity(x0, z, x_t, t, labels, guidance)
            with dropout.record():
                F_minus, g = self.tangent(x_t, t, dxdt, labels, r, guidance, lam)
        raw_norm = g.flatten(1).norm(dim=1)
        g = normalize_tangent(g, m.tangent_norm, m.tangent_c, m.tangent_norm_kind)
        with dropout.replay(), attention_backend(self.attention, jvp=False):
            F_theta = self.student(x_t / sd, self.process.c_noise(t), labels, guidance=guidance)
        # Eq. 8: e^{w_φ}/D·‖F_θ - F_θ⁻ - g‖² - w_φ, in float32 (issue 15 item 5). Sec. 4.2's identity
        # ∇E[F_θᵀg] = ½∇E‖F_θ - F_θ⁻ + g‖² holds because F_θ⁻ = sg(F_θ) in value; under autocast the bf16/fp16
        # student output and the fp32 tangent-pass output differ by the precision error, a spurious target.
        # So the residual entering the loss is F_θ - sg(F_θ): exactly zero, gradient ∇F_θ. The literal
        # difference F_θ - F_θ⁻ (precision error, or different dropout masks) is logged as 'residual_rms'.
        with torch.autocast(x_t.device.type, enabled=False):
            F32 = F_theta.float()
            residual = F32 - F32.detach()
            mse = (residual - g.float()).flatten(1).square().mean(1)
            out = {"mse": mse.detach().mean(), "tangent_norm": raw_norm.mean(), "r": r,
                   "residual_rms": (F32.detach() - F_minus.float()).square().mean().sqrt()}
            if self.weight_net is not None:
                w = self.weight_net(t.float())
                out["loss"] = torch.exp(w) * mse - w
                out["w_phi"] = w.detach().mean()
            else:
                out["loss"] = mse
        return out

    def loss(self, batch, progress: Progress) -> dict:
        x0, labels = batch["x"], batch.get("labels")
        t = self.sample_t(x0.shape[0], x0.device)
        if self.cfg.discrete_steps > 0:  # snap to the grid t_i = i·π/(2N), i = 1..N
            step = (math.pi / 2) / self.cfg.discrete_steps
            t = (torch.ceil(t / step).clamp(1, self.cfg.discrete_steps) * step).to(t.dtype)
        z = torch.randn_like(x0)
        w = self.sample_guidance_scales(x0.shape[0], x0.device, x0.dtype)
        return self.consistency_loss(x0, z, t.to(x0.dtype), labels, progress, w)


def _tf32(allow: bool):
    """Scope CUDA's TF32 switches (matmul and cuDNN convolutions) to ``allow``, restoring them after."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return scope()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

