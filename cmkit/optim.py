"""Optimisers and learning-rate schedules: per-phase settings over the ``train`` defaults (DESIGN.md, optim.py).

A phase (``objectives.base.Phase``) may override any of ``optimizer``, ``lr``, ``betas``, ``eps`` and
``weight_decay`` for its own module (e.g. a discriminator's ``method.disc_lr``); everything else comes
from the ``train`` section. The schedule multiplier is a pure function of images seen (STYLE 5, 6) and
scales every phase's base learning rate alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cmkit.config import ConfigError
from cmkit.schedules import lr_anneal, lr_inv_sqrt, lr_warmup

OPTIMIZERS = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class OptimSettings:
    """One phase's optimiser: its class name, base learning rate, betas, Adam ε and weight decay."""

    optimizer: str
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def phase_settings(tcfg, overrides: dict | None = None) -> OptimSettings:
    """The train section's settings with a phase's overrides applied (keys of OptimSettings)."""
    base = OptimSettings(tcfg.optimizer, tcfg.lr, tuple(tcfg.betas), tcfg.eps, tcfg.weight_decay)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(OptimSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown optimiser setting(s) {sorted(unknown)}")
    if "betas" in overrides:
        overrides["betas"] = tuple(overrides["betas"])
    return replace(base, **overrides)


def make_optimizer(params, settings: OptimSettings) -> torch.optim.Optimizer:
    """RAdam (iCT App. B) or Adam over params with the given settings."""
    if settings.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer='{settings.optimizer}' is not valid. Choose one of: {', '.join(OPTIMIZERS)}")
    # foreach: one fused call per op instead of a Python loop over tensors (CPU defaults to the loop).
    return OPTIMIZERS[settings.optimizer](params, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                          weight_decay=settings.weight_decay, foreach=True)


def lr_multiplier(nimg: int, tcfg) -> float:
    """The schedule's factor on every phase's base lr: warm-up × inverse-square-root decay × annealing.

    The annealing (``train.lr_decay``) runs from the end of the warm-up to the run's last image,
    train.steps × train.batch_size, where it reaches ``train.lr_final`` × lr.
    """
    total = tcfg.steps * tcfg.batch_size
    return (lr_warmup(nimg, tcfg.warmup_nimg) * lr_inv_sqrt(nimg, tcfg.lr_ref_nimg)
            * lr_anneal(nimg, tcfg.warmup_nimg, total, tcfg.lr_decay, tcfg.lr_final))
