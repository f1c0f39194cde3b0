"""ACT and ACT-Aug: consistency training plus a time-conditioned discriminator (ACT Algorithms 1-2).

The consistency loss L_CT is cmkit's CT/iCT objective, composed (``self.ct``), so ACT runs on CT
(the paper) or iCT by configuration. Two phases, each on its own batch and its own n:
"model" minimises L_f = (1 - λ_N(n+1))·L_CT + λ_N(n+1)·L_G, "discriminator" minimises
L_d = λ_N(n+1)·L_D + λ_N(n+1)·L_gp. The discriminator, its optimiser (made by the loop), p_aug
and the penalty EMA all live in this objective's state, so checkpoints carry them.

The gradient penalty is R1-style (Mescheder et al. 2018): ‖∇_x l(x, t)‖² of D's logit l, not of its
probability sigmoid(l) (ACT Eq. 4 and Alg. 1 line 14 write D without saying which). Where the paper is
silent, the defaults follow the authors' released code (github.com/kong13661/ACT, train_cifar10.py):
the non-saturating generator loss softplus(-l) = -log D(fake) (Eq. 8's literal log(1 - D(fake)) is
``method.gan_loss=saturating``), the penalty weight γ/2 = 5 (their r1_gamma = 10 times 0.5, the value
ACT-Aug's τ is compared with), and RAdam with β = (0, 0.99·16/17) for D (``method.disc_*``).

Deviation from Alg. 1 line 11: the loop hands each phase one batch per micro-batch, so the fakes x_g
are this micro-batch's own images rolled by half a batch, not a second independent draw: every fake
comes from a different data point than the real it is paired with, and x_g has the data's marginal,
so the expected L_D is the same. A per-rank micro-batch of 1 image would pair a real with itself
and is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cmkit.augment import AUG_OPS, DiffAugment
from cmkit.config import ConfigError
from cmkit.distributed import mean_across_ranks
from cmkit.nets import build_discriminator
from cmkit.nets.discriminator import ACTIVATIONS
from cmkit.objectives.base import Objective, Phase
from cmkit.objectives.consistency import ConsistencyConfig, ConsistencyTraining
from cmkit.objectives.gan import (
    GAN_LOSSES,
    disc_optim,
    frozen_call,
    gradient_penalty,
    lazy_due,
    update_aug_probability,
    validate_disc_optim,
)
from cmkit.schedules import Progress, act_adversarial_weight


@dataclass
class ACTConfig(ConsistencyConfig):
    """CT/iCT options (inherited) plus ACT's (ACT Table 6, CIFAR-10 column as defaults).

    aug_target τ = 0.55 is compared with the EMA of L_gp = w_gp·‖∇_x l‖², the penalty on D's logit l
    (R1 style) times w_gp: what τ means depends on both. The paper states neither; the authors' code
    (kong13661/ACT, r1_panelty) penalises the logit with w_gp = r1_gamma/2 = 5 and compares its
    threshold with that scaled penalty, so cmkit does the same.
    """

    name: str = "act"
    w: float = 0.3  # λ_N at n = N-1 (Eq. 10)
    w_mid: float = 0.3  # λ_N at n = (N-1)/2 (Eq. 10)
    # Generator loss: non_saturating -log D(fake) = softplus(-l) (the authors' code, loss_func_g) |
    # saturating log(1 - D(fake)) = -softplus(l) (Eq. 8 as printed; its gradient vanishes where D wins) | hinge.
    gan_loss: str = "non_saturating"
    w_gp: float = 5.0  # w_gp = γ/2 with the authors' r1_gamma = 10 (kong13661/ACT); the paper does not state it
    gp_interval: int = 16  # I_gp: lazy penalty every I_gp iterations
    augment: bool = False  # ACT-Aug (Algorithm 2), images only
    aug_ops: list[str] = field(default_factory=lambda: ["flip", "translate", "cutout"])
    aug_interval: int = 16  # I_p: p_aug update interval (a multiple of gp_interval)
    aug_target: float = 0.55  # τ
    aug_rate: float = 0.05  # p_r
    aug_ema: float = 0.93  # μ_p
    disc_blocks: int = 0  # ResBlocks per level; 0 = ceil(1.5 * net.num_blocks) (ACT App. A)
    disc_time_emb: bool = True  # Table 4 't-emb'
    disc_activation: str = "silu"  # silu | leaky_relu (Table 4)
    disc_hidden: int = 0  # MLP discriminator width; 0 = net.hidden
    disc_depth: int = 0  # MLP discriminator depth; 0 = net.depth
    # D's own optimiser (cmkit.optim per-phase overrides); the authors' code: RAdam, β = (0, 0.99·16/17), lr = G's.
    disc_optimizer: str = "radam"  # radam | adam | "" = train.optimizer
    disc_lr: float = 0.0  # 0 = train.lr
    disc_betas: list[float] = field(default_factory=lambda: [0.0, 0.99 * 16 / 17])  # [] = train.betas

    def validate(self) -> None:
        super().validate()
        validate_disc_optim(self)
        if self.gan_loss not in GAN_LOSSES:
            raise ValueError(f"method.gan_loss='{self.gan_loss}' is not valid. Choose one of: {', '.join(GAN_LOSSES)}")
        if self.disc_activation not in ACTIVATIONS:
            raise ValueError(f"method.disc_activation='{self.disc_activation}'. Choose one of: {', '.join(ACTIVATIONS)}")
        if not (0 <= self.w <= 1 and 0 <= self.w_mid <= 1):
            raise ValueError(f"method.w and method.w_mid must lie in [0, 1], got {self.w}, {self.w_mid}")
        if self.w_gp < 0 or self.gp_interval < 1:
            raise ValueError("method.w_gp must be >= 0 and method.gp_interval >= 1")
        if self.aug_interval < 1 or (self.augment and self.aug_interval % self.gp_interval):
            raise ValueError(
                f"method.aug_interval={self.aug_interval} must be a positive multiple of method.gp_interval="
                f"{self.gp_interval}: p_aug follows the EMA of penalties, which exist only every I_gp steps"
            )
        unknown = sorted(set(self.aug_ops) - set(AUG_OPS))
        if unknown or not self.aug_ops:
            raise ValueError(f"method.aug_ops {unknown or '[]'} not valid. Choose from: {', '.join(AUG_OPS)}")
        if not (0 <= self.aug_rate <= 1 and 0 <= self.aug_ema < 1):
            raise ValueError("method.aug_rate must lie in [0, 1] and method.aug_ema in [0, 1)")


class AdversarialConsistencyTraining(Objective):
    """ACT / ACT-Aug: phases "model" (consistency model) and "discriminator"."""

    def __init__(self, cfg, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.ct = ConsistencyTraining(cfg, shape, num_classes)
        self.discriminator = build_discriminator(
            cfg.net, shape, num_classes, blocks=m.disc_blocks, time_emb=m.disc_time_emb,
            activation=m.disc_activation, hidden=m.disc_hidden, depth=m.disc_depth)
        if m.augment and len(shape) != 3:
            raise ConfigError(f"method.augment=true needs image data (C, H, W); this dataset has shape {shape}")
        self.augment = DiffAugment(m.aug_ops) if m.augment else None
        self.gan = GAN_LOSSES[m.gan_loss]
        # ACT Alg. 2 line 2: p_aug ← 0 and L̄_gp ← τ.
        self.p_aug = 0.0
        self.gp_ema = m.aug_target
        # This iteration's penalties (w_gp·‖∇l‖², batch means): iteration k, their sum over the rank's
        # micro-batches and their count; averaged over micro-batches and ranks in after_phase.
        self._gp_k, self._gp_sum, self._gp_count = -1, None, 0
        self._gp_last: Tensor | None = None
        if cfg.train.batch_size // cfg.train.accumulate < 2:  # ranks split it further: checked per batch too
            raise ConfigError(_small_batch_message(cfg.train.batch_size // cfg.train.accumulate))

    @property
    def model(self):
        return self.ct.model

    @property
    def process(self):
        return self.ct.process

    @property
    def phases(self) -> list[Phase]:
        return [Phase("model", self.model, self.generator_loss),
                Phase("discriminator", self.discriminator, self.discriminator_loss, optim=disc_optim(self.cfg))]

    # -- pieces --------------------------------------------------------------
    def critic(self, x: Tensor, t: Tensor, labels: Tensor | None = None, *, train: bool = True) -> Tensor:
        """D_aug(x, t) logits (ACT Sec. 3.4); with train=False D's parameters get no gradient."""
        if self.augment is not None:
            x = self.augment(x, self.p_aug)
        c_noise = self.process.c_noise(t.to(torch.float32))
        if train:
            return self.discriminator(x, c_noise, labels)
        return frozen_call(self.discriminator, x, c_noise, labels)

    def record_penalty(self, gp: Tensor, k: int) -> None:
        """Add one micro-batch's mean penalty to iteration k's sum (a new k starts a new sum)."""
        if k != self._gp_k:
            self._gp_k, self._gp_sum, self._gp_count = k, torch.zeros((), dtype=torch.float64, device=gp.device), 0
        self._gp_sum = self._gp_sum + gp.detach().to(torch.float64)
        self._gp_count += 1

    def adversarial_weight(self, sigma_next: Tensor, n: int) -> Tensor:
        """λ_N(n+1) per sample (Eq. 10), from σ_{n+1}'s index on the current N-point grid."""
        sigmas, _ = self.ct.grid(n, sigma_next.device)
        grid = sigmas.to(sigma_next.dtype)
        index = torch.searchsorted(grid, sigma_next.contiguous())
        if not torch.equal(grid[index], sigma_next):
            raise RuntimeError("σ_{n+1} is not on the consistency objective's grid")
        return act_adversarial_weight(index, n, self.cfg.w, self.cfg.w_mid).to(torch.float32)

    # -- phases --------------------------------------------------------------
    def generator_loss(self, batch, progress: Progress) -> dict:
        # L_CT from the composed CT/iCT objective (Alg. 1 line 6) and its student output
        # f_θ(x + t_{n+1} z, t_{n+1}, θ_g), which is L_G's input (line 7): both terms share x, z and n.
        out, student, t_next = self.ct.loss_with_output(batch, progress)
        lam = self.adversarial_weight(t_next, int(out["N"]))
        # Alg. 1 lines 7-8: L_G on D(f_θ(x + t_{n+1} z, t_{n+1}), t_{n+1}) (Eq. 8; ACTConfig.gan_loss says which form);
        # L_f = (1 - λ_N(n+1))·L_CT + λ_N(n+1)·L_G. D is only read here, so its parameters get no gradient.
        l_g = self.gan.generator(self.critic(student, t_next, batch.get("labels"), train=False))
        loss = (1 - lam) * out["loss"] + lam * l_g
        return {"loss": loss, "N": out["N"], "ct_loss": out["loss"].detach().mean(),
                "g_loss": l_g.detach().mean(), "lambda": lam.mean()}

    def discriminator_loss(self, batch, progress: Progress) -> dict:
        # Alg. 1 lines 11-12: own real batch and own n; fakes from other images of the batch
        # (x_g, rolled by half a batch) so real and fake come from different data points (module docstring).
        x_r, labels = batch["x"], batch.get("labels")
        if x_r.shape[0] < 2:
            raise ConfigError(_small_batch_message(x_r.shape[0]))
        half = x_r.shape[0] // 2
        x_g = x_r.roll(half, 0)
        labels_g = labels.roll(half, 0) if labels is not None else None
        _, sigma_next, n = self.ct.sample_pairs(x_r, progress)
        lam = self.adversarial_weight(sigma_next, n)
        t = sigma_next.to(x_r.dtype)
        with torch.no_grad():
            fake = self.model(self.process.add_noise(x_g, torch.randn_like(x_g), t), t, labels_g)

        due = self.cfg.w_gp > 0 and lazy_due(progress.k, self.cfg.gp_interval)
        x_r = x_r.detach().requires_grad_(due)
        real_logits = self.critic(x_r, t, labels)
        fake_logits = self.critic(fake, t, labels_g)
        # Alg. 1 line 13 / Eq. 9.
        l_d = self.gan.discriminator(real_logits, fake_logits)
        logs = {"d_loss": l_d.detach().mean(), "real_logit": real_logits.detach().mean(),
                "fake_logit": fake_logits.detach().mean()}
        loss = lam * l_d
        if due:
            # Alg. 1 line 14: L_gp = w_gp·‖∇_{x_r} D(x_r, t_{n+1})‖²·[k mod I_gp = 0] (through A(·) in ACT-Aug).
            gp = self.cfg.w_gp * gradient_penalty(real_logits, x_r)
            self._gp_last = gp.detach().mean()
            self.record_penalty(self._gp_last, progress.k)
            logs["gp"] = self._gp_last
            loss = loss + lam * gp  # line 15
        if self._gp_last is not None:
            logs["gp_last"] = self._gp_last  # the latest lazy penalty, logged at every step
        if self.augment is not None:
            logs["p_aug"] = self.p_aug
        return {"loss": loss, **logs}

    def after_phase(self, phase: str, progress: Progress) -> None:
        if phase == "model":
            self.ct.after_phase(phase, progress)  # CT's EMA teacher (Alg. 1 line 10); nothing for iCT
            return
        if self._gp_count == 0 or self._gp_k != progress.k or not lazy_due(progress.k, self.cfg.gp_interval):
            return
        # L_gp of this iteration: the mean over every micro-batch of every rank (one all-reduce; the same
        # number as one process accumulating them), so p_aug and L̄_gp agree on all ranks and with 1 process.
        if not lazy_due(progress.k, self.cfg.aug_interval):
            self._gp_count = 0  # the EMA only takes penalties of update iterations: no all-reduce, no host sync
            return
        count = torch.tensor(float(self._gp_count), dtype=torch.float64, device=self._gp_sum.device)
        total, count = mean_across_ranks(torch.stack([self._gp_sum, count])).tolist()
        gp, self._gp_count = total / count, 0
        # Alg. 2 lines 17-19: p_aug from the EMA before this update, then the EMA itself.
        if self.augment is not None:
            self.p_aug = update_aug_probability(self.p_aug, self.gp_ema, self.cfg.aug_target, self.cfg.aug_rate)
        self.gp_ema = self.cfg.aug_ema * self.gp_ema + (1 - self.cfg.aug_ema) * gp

    def extra_state(self) -> dict:
        return {"p_aug": self.p_aug, "gp_ema": self.gp_ema, **self.ct.extra_state()}

    def load_extra_state(self, state: dict) -> None:
        self.p_aug = float(state.get("p_aug", 0.0))
        self.gp_ema = float(state.get("gp_ema", self.cfg.aug_target))
        self.ct.load_extra_state(state)


def _small_batch_message(per_rank: int) -> str:
    return (f"ACT's discriminator step needs at least 2 images per rank and micro-batch (its fakes are the "
            f"batch's other images, rolled by half), got {per_rank} = train.batch_size / (ranks x "
            f"train.accumulate). Raise train.batch_size or lower train.accumulate")
