"""GAN pieces shared by ACT and CM-GAN: losses on logits, zero-centred gradient penalty, lazy
regularisation, ACT-Aug's augmentation-probability rule, and calling a discriminator without
training it.

Every loss takes discriminator logits l (D's probability is sigmoid(l)) and returns one value
per sample, so objectives can weight samples (ACT's λ_N(n+1)) before the loop averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


@dataclass(frozen=True)
class GANLoss:
    """A GAN variant: the generator's loss on fake logits and the discriminator's on (real, fake)."""

    generator: Callable[[Tensor], Tensor]
    discriminator: Callable[[Tensor, Tensor], Tensor]


def _saturating_g(fake: Tensor) -> Tensor:
    # ACT Eq. 8: L_G = log(1 - D(fake)) = -softplus(l).
    return -F.softplus(fake)


def _non_saturating_g(fake: Tensor) -> Tensor:
    # Goodfellow et al. (2014)'s -log D(fake) = softplus(-l): same fixed point, no vanishing gradient.
    return F.softplus(-fake)


def _logistic_d(real: Tensor, fake: Tensor) -> Tensor:
    # ACT Eq. 9: L_D = -log D(real) - log(1 - D(fake)) = softplus(-l_r) + softplus(l_f).
    return F.softplus(-real) + F.softplus(fake)


def _hinge_g(fake: Tensor) -> Tensor:
    # Hinge generator loss -D(fake) (Lim & Ye 2017, the loss CM-GAN Sec. 5.1 names); CM-GAN Alg. 1's
    # "-ψ2(D(fake), real_label)" is read as this target-'real' form.
    return -fake


def _hinge_d(real: Tensor, fake: Tensor) -> Tensor:
    # CM-GAN Sec. 5.1: ψ1(l) = -max(0, 1 - l), ψ2(l) = max(0, 1 + l); D maximises ψ1(real) - ψ2(fake) (Eq. 8),
    # i.e. minimises max(0, 1 - l_r) + max(0, 1 + l_f).
    return F.relu(1 - real) + F.relu(1 + fake)


GAN_LOSSES: dict[str, GANLoss] = {
    "saturating": GANLoss(_saturating_g, _logistic_d),  # ACT Eq. 8-9
    "non_saturating": GANLoss(_non_saturating_g, _logistic_d),
    "hinge": GANLoss(_hinge_g, _hinge_d),  # CM-GAN Sec. 5.1
}


def gradient_penalty(logits: Tensor, x: Tensor) -> Tensor:
    """Zero-centred penalty ‖∇_x D(x)‖² per sample (ACT Eq. 4; Mescheder et al. 2018's R1), on the logit.

    x must require grad and logits must come from x; the graph is kept so the penalty trains D.
    """
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.flatten(1).square().sum(1)


def lazy_due(k: int, interval: int) -> bool:
    """Lazy regularisation: apply the penalty at iterations with k mod I_gp = 0 (ACT Alg. 1 line 14)."""
    return interval > 0 and k % interval == 0


def update_aug_probability(p_aug: float, gp_ema: float, target: float, rate: float) -> float:
    """ACT Alg. 2 line 18: p_aug ← clip_[0,1](p_aug + 2([L̄_gp ≥ τ] - 0.5)·p_r)."""
    return min(max(p_aug + 2 * (float(gp_ema >= target) - 0.5) * rate, 0.0), 1.0)


def frozen_call(module: nn.Module, *args, **kwargs):
    """module(*args) with its parameters detached: gradients reach the inputs only (generator steps)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return functional_call(module, params, args, kwargs)


def validate_disc_optim(m) -> None:
    """Check a method config's discriminator optimiser keys (disc_optimizer, disc_lr, disc_betas)."""
    from cmkit.optim import OPTIMIZERS

    if m.disc_optimizer and m.disc_optimizer not in OPTIMIZERS:
        raise ValueError(f"method.disc_optimizer='{m.disc_optimizer}' is not valid. Choose one of: "
                         f"{', '.join(OPTIMIZERS)}, or '' for train.optimizer")
    if m.disc_lr < 0:
        raise ValueError(f"method.disc_lr must be >= 0 (0 = train.lr), got {m.disc_lr}")
    betas = list(m.disc_betas)
    if betas and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ValueError(f"method.disc_betas must be [] (= train.betas) or two numbers in [0, 1), got {betas}")


def disc_optim(m) -> dict:
    """The discriminator phase's optimiser overrides (cmkit.optim.phase_settings); unset keys follow train.*."""
    out = {}
    if m.disc_optimizer:
        out["optimizer"] = m.disc_optimizer
    if m.disc_lr > 0:
        out["lr"] = m.disc_lr
    if len(m.disc_betas):
        out["betas"] = tuple(m.disc_betas)
    return out
