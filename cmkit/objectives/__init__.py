"""Objectives: one file per method family, one signature, one explicit registry (STYLE 4, 10)."""

from __future__ import annotations

from cmkit.config import ConfigError
from cmkit.nets.attention import check_backend
from cmkit.objectives.act import ACTConfig, AdversarialConsistencyTraining
from cmkit.objectives.base import MethodSpec, Objective, Phase
from cmkit.objectives.cmgan import CMGAN, CMGANConfig
from cmkit.objectives.consistency import ConsistencyConfig, ConsistencyTraining
from cmkit.objectives.diffusion import EDMConfig, EDMDiffusion
from cmkit.objectives.distillation import ConsistencyDistillation, DistillationConfig
from cmkit.objectives.scm import ContinuousConsistency, SCMConfig
from cmkit.objectives.trigflow import TrigFlowConfig, TrigFlowDiffusion

# Presets: a method name is an objective plus the defaults of its paper; every option stays
# overridable (e.g. method.name=ict method.distance=l2).
CT_PRESET = dict(  # Song et al. 2023 as summarised in iCT Table 1 (left column), CIFAR-10
    curriculum="sqrt", s0=2, s1=150, noise_schedule="uniform", weighting="uniform",
    distance="l2", teacher_ema=True, mu0=0.9,
)
ICT_PRESET = dict(  # iCT Table 1 (right column)
    curriculum="exp", s0=10, s1=1280, noise_schedule="lognormal", p_mean=-1.1, p_std=2.0,
    weighting="reciprocal", distance="pseudo_huber", c=0.0, teacher_ema=False,
)
ILCT_PRESET = dict(  # iLCT (002_915a3e3a8597e2f0.txt): iCT + Cauchy (Eq. 6), diffusion loss r=0.25 (Eq. 9),
    # minibatch OT (Sec. 4.4), exp curriculum s1=640 with adaptive c (Eq. 11). NsLN is net.norm=nsln in the config.
    ICT_PRESET, s1=640, distance="cauchy", c_schedule="adaptive", diffusion_weight=1.0, diffusion_r=0.25,
    coupling="ot",
)

METHODS: dict[str, MethodSpec] = {
    "ct": MethodSpec(ConsistencyTraining, ConsistencyConfig, CT_PRESET),
    "ict": MethodSpec(ConsistencyTraining, ConsistencyConfig, ICT_PRESET),
    "ilct": MethodSpec(ConsistencyTraining, ConsistencyConfig, ILCT_PRESET),
    # ACT on CT with an EMA teacher (ACT Table 6: s0=2, s1=150, μ0=0.9) or on iCT.
    "act": MethodSpec(AdversarialConsistencyTraining, ACTConfig, CT_PRESET),
    "act_ict": MethodSpec(AdversarialConsistencyTraining, ACTConfig, ICT_PRESET),
    # EDM diffusion (Karras et al. 2022), the teachers of CD; CD of Song et al. 2023 (iCT Eq. 3): N = 18,
    # uniform i, λ = 1, squared ℓ2 (their LPIPS: method.distance=lpips with local weights), Heun step, target EMA μ = 0.95.
    "edm": MethodSpec(EDMDiffusion, EDMConfig, {}),
    "cd": MethodSpec(ConsistencyDistillation, DistillationConfig, {}),
    # sCM (004_225d7b9daa3d4cfe.txt): continuous-time CT/CD in TrigFlow, TrigFlow diffusion (sCD teacher),
    # and discrete-time CT in TrigFlow with the same techniques on an N-step grid (Fig. 5c).
    "sct": MethodSpec(ContinuousConsistency, SCMConfig, {}),
    "scd": MethodSpec(ContinuousConsistency, SCMConfig, {}),
    "ct_trigflow": MethodSpec(ContinuousConsistency, SCMConfig, dict(discrete_steps=256)),
    "trigflow": MethodSpec(TrigFlowDiffusion, TrigFlowConfig, {}),
    # CM-GAN (000_6636be86a063c832.txt): L_CM + λ·L_GAN with L_CM = iCT (cmgan), CT (cmgan_ct) or CD
    # (cmgan_cd: N = 18, uniform i, λ(σ) = 1, ℓ2 as the "cd" method; the paper's LPIPS is method.distance=lpips).
    "cmgan": MethodSpec(CMGAN, CMGANConfig, ICT_PRESET),
    "cmgan_ct": MethodSpec(CMGAN, CMGANConfig, CT_PRESET),
    "cmgan_cd": MethodSpec(CMGAN, CMGANConfig, dict(
        consistency="cd", curriculum="const", s1=17, noise_schedule="uniform", weighting="uniform", distance="l2")),
}


def check_combination(cfg) -> None:
    """Reject method/network/train combinations that cannot work, with the fix, before anything is built.

    Checked elsewhere already: a U-Net on vector data (nets.unet), CM-GAN's blur and ACT's augmentation
    on vector data, class conditioning without labels, each method's own options (its config's validate).
    An MLP on image data works (it flattens them), so it is not refused.
    """
    spec = METHODS[cfg.method.name]
    scm = issubclass(spec.objective, ContinuousConsistency)
    try:
        check_backend(getattr(cfg.net, "attention", "auto"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # sCM Eq. 6 takes df/dt by torch.func.jvp; MACHINE-NOTES §1: a compiled backbone fails under the JVP
    # (native GroupNorm: INTERNAL ASSERT ... _fw_primal; SDPA never compiles under a JVP). So with train.compile
    # sCM compiles the student pass only (ContinuousConsistency.compile_student) and the JVP stays eager; nothing
    # to refuse. The sdpa kernel has no forward-mode AD at all:
    if scm and cfg.method.discrete_steps == 0 and getattr(cfg.net, "attention", "auto") == "sdpa":
        raise ConfigError(
            f"net.attention=sdpa has no forward-mode AD, and method.name={cfg.method.name} takes the tangent df/dt by "
            f"torch.func.jvp (sCM Eq. 6): use net.attention=auto (SDPA outside the JVP, a JVP-capable kernel inside)")
    # Only sCM's objective feeds the guidance scale w to the student (sCM Sec. 5.2); any other method would
    # fail at its first forward pass with "this network takes a guidance scale".
    if cfg.net.guidance_cond and not scm:
        raise ConfigError(
            f"net.guidance_cond=true (a student that takes the guidance scale w) is only trained by sCD/sCT "
            f"(method.name=sct, scd, ct_trigflow); method.name={cfg.method.name} never passes w: set "
            f"net.guidance_cond=false")


def build_objective(cfg, shape: tuple[int, ...], num_classes: int = 0) -> Objective:
    """Instantiate the objective of cfg.method.name for data of the given per-sample shape."""
    check_combination(cfg)
    return METHODS[cfg.method.name].objective(cfg, shape, num_classes)


__all__ = ["METHODS", "MethodSpec", "Objective", "Phase", "build_objective", "check_combination"]
