"""Consistency distillation (CD) of a diffusion teacher (Song et al. 2023, restated in iCT Sec. 2).

L = E[λ(σ_i)·d(f_θ(x_{σ_{i+1}}, σ_{i+1}), f_θ⁻(x̂_{σ_i}, σ_i))] (iCT Eq. 3) with x_{σ_{i+1}} = x0 + σ_{i+1}z
and x̂_{σ_i} one Euler (iCT, text below Eq. 3) or Heun (Song et al. 2023's CD) step of the teacher's
PF-ODE from σ_{i+1} down to σ_i. θ⁻ is an EMA of θ with a fixed rate μ (Song et al. 2023: 0.95 on
CIFAR-10) or, with μ = 0, the student itself under stop-gradient (as iCT's CT).

The teacher is a trained EDM run (``method.teacher=RUN_DIR`` or a checkpoint file) or, for tests and
sanity checks, the exact denoiser of a Gaussian (``method.teacher=analytic``; cmkit.analytic).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cmkit.analytic import GaussianTeacher
from cmkit.checkpoint import CheckpointError
from cmkit.config import ConfigError
from cmkit.losses import DISTANCE_NAMES, make_distance
from cmkit.lpips import check_lpips_options
from cmkit.model import Parameterized
from cmkit.nets import build_network
from cmkit.objectives.base import Objective, Phase, SharedDropout
from cmkit.objectives.consistency import _choice, ve_process
from cmkit.sampling import euler_step, heun_step
from cmkit.schedules import CURRICULA, INDEX_DISTRIBUTIONS, WEIGHTINGS, Progress, pseudo_huber_c

ODE_STEPS = {"euler": euler_step, "heun": heun_step}


@dataclass
class DistillationConfig:
    """Options of consistency distillation; the discretisation fields are those of ConsistencyConfig."""

    name: str = "cd"
    teacher: str = ""  # run directory or checkpoint of an EDM run (method.name=edm), or "analytic"
    solver: str = "heun"  # one step of the teacher's PF-ODE: heun (Song et al. 2023) | euler (iCT Eq. 3)
    init_from_teacher: bool = False  # copy the teacher's backbone weights into the student (Song et al. 2023)
    target_ema: float = 0.95  # μ of θ⁻ ← μθ⁻ + (1-μ)θ; 0 = θ⁻ is the student under stop-gradient
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    c_noise_scale: float = 1.0  # c_noise = scale·ln σ, as ConsistencyConfig (EDM itself uses ¼·ln σ)
    mid_sigmas: list[float] = field(default_factory=lambda: [0.821])  # few-step sampling σ's, as ConsistencyConfig
    curriculum: str = "const"  # const: N = s1 + 1 (Song et al. 2023 CIFAR-10: N = 18) | exp | sqrt
    s0: int = 10
    s1: int = 17
    noise_schedule: str = "uniform"  # uniform i (Song et al. 2023) | lognormal (iCT Eq. 10)
    p_mean: float = -1.1
    p_std: float = 2.0
    weighting: str = "uniform"  # uniform λ = 1 (Song et al. 2023) | reciprocal 1/(σ_{i+1}-σ_i)
    distance: str = "l2"  # see cmkit.losses.DISTANCE_NAMES (lpips: method.lpips_weights)
    c: float = 0.0  # robust-distance constant; 0 = 0.00054·sqrt(d) (iCT Sec. 3.3)
    shared_dropout: bool = True  # same dropout masks in student and target (iCT Sec. 3.1)
    # LPIPS (method.distance=lpips, cmkit.lpips): local weight files only, nothing downloads.
    lpips_weights: list[str] = field(default_factory=list)  # VGG16/AlexNet features + LPIPS v0.1 heads (.safetensors/.pth)
    lpips_net: str = "vgg"  # vgg | alex
    lpips_pooling: str = "max"  # max (LPIPS) | avg (openai/consistency_models: piq LPIPS(replace_pooling=True))

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError(
                "method.teacher is required for consistency distillation: a run directory or checkpoint of "
                "an EDM run (train one with configs/edm_toy.yaml), or method.teacher=analytic for Gaussian data"
            )
        _choice("solver", self.solver, ODE_STEPS)
        _choice("curriculum", self.curriculum, CURRICULA)
        _choice("noise_schedule", self.noise_schedule, INDEX_DISTRIBUTIONS)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("distance", self.distance, DISTANCE_NAMES)
        check_lpips_options(self)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("method.sigma_min and method.sigma_max need 0 < sigma_min < sigma_max")
        if not 1 <= self.s0 <= self.s1:
            raise ValueError(f"method.s0 and method.s1 need 1 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")
        if not 0 <= self.target_ema < 1:
            raise ValueError(f"method.target_ema must lie in [0, 1), got {self.target_ema}")
        if self.teacher == "analytic" and self.init_from_teacher:
            raise ValueError("method.init_from_teacher=true needs a trained teacher; the analytic teacher has no weights")
        if self.c < 0 or self.p_std <= 0 or self.sigma_data <= 0:
            raise ValueError("method.c must be >= 0, method.p_std and method.sigma_data > 0")
        ve_process(self)  # method.mid_sigmas inside (sigma_min, sigma_max), decreasing


# ----------------------------------------------------------------------------
# Teachers.


def analytic_teacher(process, shape: tuple[int, ...], data_cfg=None) -> GaussianTeacher:
    """Exact denoiser of the data's Gaussian: the ``gaussian`` toy set's N(m, s²I) exactly, otherwise
    a Gaussian with the training data's per-dimension mean and std (a crude but exact-maths teacher)."""
    from cmkit.data import load_dataset
    from cmkit.data.toy import GAUSSIAN_MEAN, GAUSSIAN_STD

    if data_cfg is None or data_cfg.name == "gaussian":
        mean = torch.tensor(GAUSSIAN_MEAN).reshape(shape) if math.prod(shape) == len(GAUSSIAN_MEAN) else None
        if mean is None:
            raise ConfigError(f"the analytic teacher of data 'gaussian' needs shape (2,), got {shape}")
        return GaussianTeacher(mean, GAUSSIAN_STD, process)
    x = load_dataset(data_cfg).x
    if not isinstance(x, torch.Tensor):  # a prepared (memory-mapped) dataset is read per batch, never whole
        raise ConfigError(f"method.teacher=analytic fits a Gaussian to the whole dataset in memory; data.name="
                          f"{data_cfg.name} is read per batch. Use the in-memory source (data.name=array or folder)")
    return GaussianTeacher(x.mean(0), x.std(0).clamp_min(1e-6), process)


# The diffusion method that trains a teacher for each noise process (process.name).
TEACHER_METHODS = {"ve": ("edm", "configs/edm_toy.yaml"), "trigflow": ("trigflow", "configs/trigflow_mnist.yaml")}


def load_teacher(spec: str, process, shape: tuple[int, ...], data_cfg=None, kind: str = "diffusion") -> nn.Module:
    """A frozen, eval-mode teacher ``teacher(x, t, class_labels)`` with a ``.process`` and ``.class_cond``.

    Used by CD (VE: the output is the denoiser D(x, σ)) and sCD (TrigFlow: the output is the
    velocity dx_t/dt, sCM Eq. 3). ``spec`` is "analytic" (cmkit.analytic, VE only; ``process`` gives
    it σ_min), a run directory (its latest checkpoint) or a checkpoint file; trained teachers are
    the run's EMA model (train.ema_sample). The run must be of ``kind`` (its model's
    parameterisation) on the noise process of ``process`` and, when ``data_cfg`` is given, trained
    on the same data of the same ``shape``; ConfigError/CheckpointError say what does not fit.
    """
    from cmkit.run import load

    method, example = TEACHER_METHODS.get(process.name, ("edm", "configs/edm_toy.yaml"))
    if spec == "analytic":
        if process.name != "ve":
            raise ConfigError(f"method.teacher=analytic is the VE Gaussian denoiser of CD; a {process.name} "
                              f"objective needs a run directory of a method.name={method} run")
        teacher = analytic_teacher(process, tuple(shape), data_cfg)
        teacher.class_cond = False
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            run = load(path.parent.parent if path.parent.name == "checkpoints" else path.parent, checkpoint=path)
        elif path.is_dir():
            run = load(path)
        else:
            analytic = " or use method.teacher=analytic" if process.name == "ve" else ""
            raise CheckpointError(
                f"method.teacher='{spec}' is neither a run directory nor a checkpoint file. Train a teacher "
                f"first (cmkit train {example} run.dir=runs/{Path(example).stem}){analytic}"
            )
        teacher = run.model(ema=True)
        if getattr(teacher, "kind", None) != kind or teacher.process.name != process.name:
            raise ConfigError(
                f"method.teacher='{spec}' is a '{run.cfg.method.name}' run whose model is a "
                f"{getattr(teacher, 'kind', 'unknown')} model in {teacher.process.name}; this distillation needs a "
                f"{kind} model in {process.name} (train one with method.name={method})"
            )
        if tuple(run.dataset.shape) != tuple(shape):
            raise ConfigError(f"the teacher was trained on data of shape {run.dataset.shape}, this run's data has {tuple(shape)}")
        if data_cfg is not None and (run.cfg.data.name, run.cfg.data.pad_to) != (data_cfg.name, data_cfg.pad_to):
            raise ConfigError(
                f"the teacher was trained on data.name={run.cfg.data.name} data.pad_to={run.cfg.data.pad_to}; "
                f"distil on the same data (this run has data.name={data_cfg.name} data.pad_to={data_cfg.pad_to})"
            )
        teacher.class_cond = run.cfg.net.class_cond
        # What rebuilds this teacher from a distillation run's own checkpoint (teacher_from_checkpoint).
        teacher.source = {"spec": spec, "config": run.cfg.to_dict(),
                          "num_classes": run.dataset.num_classes if run.cfg.net.class_cond else 0}
    return teacher.eval().requires_grad_(False)


def teacher_from_checkpoint(cfg, spec: str, shape: tuple[int, ...]) -> nn.Module | None:
    """The frozen teacher saved in this run's latest checkpoint (in cfg.run.dir), or None if it holds none for spec.

    A distillation checkpoint carries the teacher's weights (the objective's state) and its run's
    config (``extra_state``), so resuming or loading a run does not need the teacher run any more.
    """
    from cmkit.checkpoint import latest_checkpoint
    from cmkit.config import from_dict
    from cmkit.objectives import build_objective

    found = latest_checkpoint(Path(cfg.run.dir) / "checkpoints")
    if found is None:
        return None
    state = found[1]
    source = (state.get("extra") or {}).get("teacher")
    if not isinstance(source, dict) or source.get("spec") != spec:
        return None
    tcfg = from_dict(source["config"])
    teacher = build_objective(tcfg, tuple(shape), int(source["num_classes"])).model
    names = list(teacher.state_dict())
    saved = state["objective"]
    # The teacher's entries are "<prefix>teacher.<name>" (CD: "teacher.", CM-GAN's CD: "cm.teacher.").
    prefixes = [k[: -len(names[0])] for k in saved if k.endswith("teacher." + names[0])]
    if len(prefixes) != 1:
        return None
    try:
        teacher.load_state_dict({n: saved[prefixes[0] + n] for n in names})
    except (KeyError, RuntimeError):
        return None
    teacher.class_cond = tcfg.net.class_cond
    teacher.source = source
    return teacher.eval().requires_grad_(False)


def teacher_or_saved(cfg, process, shape: tuple[int, ...], kind: str = "diffusion") -> nn.Module:
    """method.teacher; if it cannot be loaded (moved, deleted) the copy in this run's own checkpoint."""
    spec = cfg.method.teacher
    try:
        return load_teacher(spec, process, tuple(shape), cfg.data, kind)
    except (CheckpointError, ConfigError) as e:
        saved = teacher_from_checkpoint(cfg, spec, tuple(shape)) if spec != "analytic" else None
        if saved is None:
            raise
        warnings.warn(f"method.teacher='{spec}' could not be loaded ({e}); using the teacher saved in "
                      f"this run's checkpoint")
        return saved


def teacher_extra_state(teacher: nn.Module) -> dict:
    """What a distillation checkpoint records of its teacher's run, so teacher_from_checkpoint can rebuild it."""
    source = getattr(teacher, "source", None)
    return {"teacher": source} if source is not None else {}


def init_from_teacher(student: Parameterized, teacher: nn.Module) -> None:
    """Copy the teacher's backbone weights into the student's (Song et al. 2023 initialise CD so; sCM
    Sec. 4.2 sCD). A student's guidance embedding (net.guidance_cond), which a teacher has not, keeps
    its initialisation."""
    net = getattr(teacher, "net", None)
    if net is None:
        raise ConfigError("method.init_from_teacher=true needs a trained teacher with a backbone network")
    state = net.state_dict()
    own = {k: v for k, v in student.net.state_dict().items() if k.startswith("embed.guidance.") and k not in state}
    try:
        student.net.load_state_dict({**state, **own})
    except RuntimeError as e:
        raise ConfigError(
            f"method.init_from_teacher=true but the student's net.* differs from the teacher's; use the teacher "
            f"run's net settings ({str(e).splitlines()[0]})"
        ) from None


# ----------------------------------------------------------------------------
# The objective.


class ConsistencyDistillation(Objective):
    """CD: one phase training the student consistency model against a frozen diffusion teacher."""

    def __init__(self, cfg, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.process = ve_process(m)
        self.model = Parameterized(build_network(cfg.net, shape, num_classes), self.process)
        self.teacher = teacher_or_saved(cfg, self.process, tuple(shape))
        if self.teacher.class_cond != cfg.net.class_cond:
            raise ConfigError(
                f"the teacher has net.class_cond={self.teacher.class_cond} but this run net.class_cond="
                f"{cfg.net.class_cond}; distil a class-conditional teacher into a class-conditional student"
            )
        if m.init_from_teacher:
            init_from_teacher(self.model, self.teacher)
        self.target = copy.deepcopy(self.model).requires_grad_(False) if m.target_ema > 0 else None
        self.ode_step = ODE_STEPS[m.solver]
        self.c = m.c if m.c > 0 else pseudo_huber_c(math.prod(shape))
        self.distance = make_distance(m, shape, latent=bool(cfg.data.vae))  # an LPIPS module is a submodule
        self.weighting = WEIGHTINGS[m.weighting]
        self._grids: dict = {}

    def extra_state(self) -> dict:
        return teacher_extra_state(self.teacher)

    def train(self, mode: bool = True):
        """The teacher stays in eval mode (no dropout) whatever the objective's mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def phases(self) -> list[Phase]:
        return [Phase("model", self.model, self.loss)]

    def num_scales(self, progress: Progress) -> int:
        """N(k) of the configured curriculum."""
        return CURRICULA[self.cfg.curriculum](progress.k, progress.K, self.cfg.s0, self.cfg.s1)

    def sample_pairs(self, x0: torch.Tensor, progress: Progress):
        """Draw i ~ p(i) on the Karras grid; return (σ_i, σ_{i+1}) per sample in float64, and N."""
        n = self.num_scales(progress)
        key = (n, x0.device)
        if key not in self._grids:
            sigmas = self.process.karras_sigmas(n)
            probs = INDEX_DISTRIBUTIONS[self.cfg.noise_schedule](sigmas, self.cfg)
            self._grids = {key: (sigmas.to(x0.device), probs.to(x0.device))}
        sigmas, probs = self._grids[key]
        i = torch.multinomial(probs, x0.shape[0], replacement=True)
        return sigmas[i], sigmas[i + 1], n

    @torch.no_grad()
    def neighbour(self, x_next: torch.Tensor, sigma_next, sigma_i, labels=None) -> torch.Tensor:
        """x̂_{σ_i}: one teacher PF-ODE step from (x_{σ_{i+1}}, σ_{i+1}) to σ_i (iCT Eq. 3)."""
        return self.ode_step(self.teacher, x_next, sigma_next, sigma_i, labels)

    def loss(self, batch, progress: Progress) -> dict:
        return self.loss_with_output(batch, progress)[0]

    def loss_with_output(self, batch, progress: Progress) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """``loss``'s dict plus the student's output f_θ(x_{σ_{i+1}}, σ_{i+1}) and σ_{i+1}, for
        objectives that add terms on that output (CM-GAN's generator loss)."""
        x0, labels = batch["x"], batch.get("labels")
        sigma_i, sigma_next, n = self.sample_pairs(x0, progress)
        t_i, t_next = sigma_i.to(x0.dtype), sigma_next.to(x0.dtype)
        x_next = self.process.add_noise(x0, torch.randn_like(x0), t_next)
        x_hat = self.neighbour(x_next, t_next, t_i, labels)
        dropout = SharedDropout(x0.device, self.cfg.shared_dropout)
        target_net = self.target if self.target is not None else self.model
        with torch.no_grad(), dropout.record():  # stop-grad target first, as in consistency.py
            target = target_net(x_hat, t_i, labels)
        with dropout.replay():
            student = self.model(x_next, t_next, labels)
        # iCT Eq. 3: λ(σ_i)·d(f_θ(x_{σ_{i+1}}, σ_{i+1}), f_θ⁻(x̂_{σ_i}, σ_i)).
        weight = self.weighting(sigma_i, sigma_next).to(torch.float32)
        return {"loss": weight * self.distance(student, target, self.c), "N": float(n)}, student, t_next

    @torch.no_grad()
    def after_phase(self, phase: str, progress: Progress) -> None:
        if self.target is None:
            return
        # iCT Eq. 4 with a fixed μ (Song et al. 2023, CD): θ⁻ ← μθ⁻ + (1-μ)θ.
        mu = self.cfg.target_ema
        torch._foreach_lerp_(list(self.target.parameters()), list(self.model.parameters()), 1 - mu)
        for bt, bm in zip(self.target.buffers(), self.model.buffers()):
            bt.copy_(bm)
