"""CM-GAN: a consistency loss plus λ times a GAN loss, for fine-tuning consistency models
(000_6636be86a063c832.txt, Eq. 7-8 and Algorithm 1).

    min_f max_D  L_CM(θ) + λ·L_GAN(f_θ, D_φ),   L_GAN = E[ψ1(D(x))] - E[ψ2(D(f_θ(x_{t_n}, t_n)))]   (Eq. 7-8)

L_CM is any consistency loss cmkit has, composed (``self.cm``): CT or iCT (``ConsistencyTraining``)
or CD with a teacher (``ConsistencyDistillation``), chosen by ``method.consistency``. L_GAN is the
hinge loss of Sec. 5.1 by default. Algorithm 1 runs k discriminator steps (each on a fresh real batch
and fresh t), then one generator step; every image D sees, real or generated, is blurred with a
Gaussian whose σ decays linearly from σ0 to 0 over the first M images. Fine-tuning starts the
generator (and so its EMAs) from a trained cmkit run (``method.init_from``) and optionally D from a
checkpoint (``method.disc_init``). A diversity statistic of one-step samples from a fixed noise batch
watches for the mode collapse the paper reports at large λ (Sec. 5.2, Fig. 4).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from cmkit.augment import gaussian_blur
from cmkit.config import ConfigError
from cmkit.nets import build_discriminator
from cmkit.nets.discriminator import ACTIVATIONS
from cmkit.objectives.base import Objective, Phase
from cmkit.objectives.consistency import ConsistencyConfig, ConsistencyTraining
from cmkit.objectives.distillation import ConsistencyDistillation, DistillationConfig
from cmkit.objectives.gan import GAN_LOSSES, disc_optim, frozen_call, gradient_penalty, lazy_due, validate_disc_optim
from cmkit.sampling import cycled_labels
from cmkit.schedules import INDEX_DISTRIBUTIONS, Progress, blur_sigma

# method.consistency -> (objective, its config dataclass): the L_CM of Eq. 7.
CONSISTENCY_LOSSES = {
    "ct": (ConsistencyTraining, ConsistencyConfig),  # CT or iCT, by the ConsistencyConfig options
    "cd": (ConsistencyDistillation, DistillationConfig),  # CD of a trained EDM teacher (the paper's L_CD, Eq. 6)
}
INIT_WEIGHTS = ("ema", "student")
DIVERSITY_FEATURES = ("auto", "pixel")
GAN_NOISE = ("uniform", "schedule")


@dataclass
class CMGANConfig(ConsistencyConfig, DistillationConfig):
    """The options of the chosen consistency loss (inherited: CT/iCT and CD) plus CM-GAN's own.

    Defaults follow CM-GAN Sec. 5.1 where it states them: hinge loss, λ = 1e-5, k = 1, blur σ0 = 10
    decaying to 0 over the first 300K images, no gradient penalty.
    """

    name: str = "cmgan"
    consistency: str = "ct"  # L_CM: ct (CT/iCT) | cd (CD with method.teacher)
    gan_weight: float = 1e-5  # λ of Eq. 7 (Sec. 5.1: 1e-5 with the paper's LPIPS CD loss; its scale is loss-specific)
    gan_loss: str = "hinge"  # hinge (Sec. 5.1) | non_saturating | saturating (cmkit.objectives.gan)
    disc_steps: int = 1  # k: discriminator steps per generator step (Algorithm 1; Sec. 5.1 uses k = 1)
    blur_sigma0: float = 10.0  # σ of the Gaussian blur at the start, in pixels (Sec. 5.1)
    blur_nimg: int = 300_000  # M: σ reaches 0 after this many images (Sec. 5.1: 300K)
    init_from: str = ""  # fine-tune: a cmkit consistency run (directory or checkpoint) giving the generator
    init_weights: str = "ema"  # which of the source's weights: ema (its train.ema_sample EMA) | student
    disc_init: str = ""  # a CM-GAN run (directory or checkpoint) whose discriminator starts D
    w_gp: float = 0.0  # optional R1 penalty on real images (Mescheder et al. 2018); the paper uses none
    gp_interval: int = 16  # lazy R1: every gp_interval steps
    disc_blocks: int = 0  # U-Net discriminator ResBlocks per level; 0 = ceil(1.5 * net.num_blocks)
    disc_time_emb: bool = False  # the paper's D(x) sees no t (Eq. 8, Algorithm 1)
    disc_activation: str = "leaky_relu"  # silu | leaky_relu
    disc_hidden: int = 0  # MLP discriminator width; 0 = net.hidden
    disc_depth: int = 0  # MLP discriminator depth; 0 = net.depth
    diversity_every: int = 100  # steps between diversity measurements; 0 = off
    diversity_n: int = 64  # size of the fixed noise batch
    diversity_features: str = "auto"  # auto: the bundled digit classifier's features where one exists, else pixels
    # D's own optimiser (cmkit.optim per-phase overrides). The paper's D starts pretrained (Sec. 5.1); a D from
    # random weights needs a far larger lr than the generator's fine-tuning lr.
    disc_optimizer: str = ""  # radam | adam | "" = train.optimizer
    disc_lr: float = 0.0  # 0 = train.lr
    disc_betas: list[float] = field(default_factory=list)  # [] = train.betas
    disc_warmup_nimg: int = 0  # D trains alone (λ = 0 in the generator step) for the first this many images
    # The GAN term's fakes: uniform f_θ(x + σ_{n+1} z, σ_{n+1}) with n ~ U[1, N-1] (Eq. 8; the CM loss's own
    # student output when its index draw is already uniform, else one extra student pass) | schedule: the CM
    # loss's student output at its own index draw (iCT's lognormal puts most fakes at σ <= 1).
    gan_noise: str = "uniform"

    def consistency_config(self):
        """The chosen consistency loss's own config, built from the shared fields."""
        _, cls = CONSISTENCY_LOSSES[self.consistency]
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "name": "cd" if self.consistency == "cd" else "ict"})

    def validate(self) -> None:
        if self.consistency not in CONSISTENCY_LOSSES:
            raise ValueError(f"method.consistency='{self.consistency}' is not valid. Choose one of: "
                             f"{', '.join(CONSISTENCY_LOSSES)}")
        if self.consistency == "cd" and self.sigma_data == "auto":
            raise ValueError("method.sigma_data=auto measures σ_data for consistency training; with method.consistency=cd "
                             "the teacher fixes it: give the teacher run's method.sigma_data")
        self.consistency_config().validate()
        for key, value, valid in (("gan_loss", self.gan_loss, GAN_LOSSES), ("init_weights", self.init_weights, INIT_WEIGHTS),
                                  ("disc_activation", self.disc_activation, ACTIVATIONS),
                                  ("diversity_features", self.diversity_features, DIVERSITY_FEATURES),
                                  ("gan_noise", self.gan_noise, GAN_NOISE)):
            if value not in valid:
                raise ValueError(f"method.{key}='{value}' is not valid. Choose one of: {', '.join(valid)}")
        if self.gan_weight < 0 or self.disc_steps < 1:
            raise ValueError(f"method.gan_weight must be >= 0 and method.disc_steps >= 1, got {self.gan_weight}, "
                             f"{self.disc_steps}")
        if self.blur_sigma0 < 0 or self.blur_nimg < 0:
            raise ValueError("method.blur_sigma0 and method.blur_nimg must be >= 0")
        if self.w_gp < 0 or self.gp_interval < 1:
            raise ValueError("method.w_gp must be >= 0 and method.gp_interval >= 1")
        validate_disc_optim(self)
        if self.disc_warmup_nimg < 0:
            raise ValueError(f"method.disc_warmup_nimg must be >= 0, got {self.disc_warmup_nimg}")
        if self.diversity_every < 0 or (self.diversity_every and self.diversity_n < 2):
            raise ValueError("method.diversity_every must be >= 0 and method.diversity_n >= 2")


def mean_pairwise_distance(features: Tensor) -> float:
    """(1/(n(n-1)))·Σ_{i≠j} ‖f_i - f_j‖₂ over the rows of an (n, d) matrix: 0 for collapsed samples."""
    f = features.reshape(features.shape[0], -1).double()
    n = f.shape[0]
    return float(torch.cdist(f, f).sum() / (n * (n - 1)))


def _resolve_run(spec: str, key: str) -> tuple[Path, Path | None]:
    """(run directory, checkpoint file or None for its latest) of a directory or checkpoint path."""
    from cmkit.checkpoint import CheckpointError

    path = Path(spec).expanduser()
    if path.is_file():
        return (path.parent.parent if path.parent.name == "checkpoints" else path.parent), path
    if path.is_dir():
        return path, None
    raise CheckpointError(f"method.{key}='{spec}' is neither a run directory nor a checkpoint file")


class CMGAN(Objective):
    """CM-GAN: phases "discriminator" (k repeats) then "model" (the generator), as in Algorithm 1."""

    def __init__(self, cfg, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        m = cfg.method
        self.cfg = m
        image = len(shape) == 3
        if m.blur_sigma0 > 0 and m.blur_nimg > 0 and not image:
            raise ConfigError(f"the Gaussian blur of CM-GAN needs image data (C, H, W); this dataset has shape "
                              f"{tuple(shape)}. Set method.blur_sigma0=0 for vector data")
        objective, _ = CONSISTENCY_LOSSES[m.consistency]
        self.cm = objective(dataclasses.replace(cfg, method=m.consistency_config()), shape, num_classes)
        self.discriminator = build_discriminator(
            cfg.net, shape, num_classes, blocks=m.disc_blocks, time_emb=m.disc_time_emb,
            activation=m.disc_activation, hidden=m.disc_hidden, depth=m.disc_depth)
        self.gan = GAN_LOSSES[m.gan_loss]
        self._pending_init: list[str] = []  # initialisations skipped for a checkpoint that has not been loaded yet
        if m.init_from:
            self._init_or_defer(lambda: self.init_generator(m.init_from, m.init_weights, cfg, shape), cfg,
                                f"method.init_from='{m.init_from}'")
        if m.disc_init:
            self._init_or_defer(lambda: self.init_discriminator(m.disc_init), cfg, f"method.disc_init='{m.disc_init}'")
        # Diversity monitor: a fixed noise batch (from train.seed) and labels cycling through the classes.
        g = torch.Generator().manual_seed(cfg.train.seed + 7919)
        self.register_buffer("diversity_noise", torch.randn((m.diversity_n, *shape), generator=g), persistent=False)
        self.diversity_labels = cycled_labels(m.diversity_n, num_classes) if num_classes > 0 else None
        self.diversity_extractor, self.diversity_space = self._diversity_extractor(cfg, image)
        self.diversity: float | None = None
        self._gp_last: Tensor | None = None

    @property
    def model(self):
        return self.cm.model

    @property
    def process(self):
        return self.cm.process

    @property
    def phases(self) -> list[Phase]:
        # Algorithm 1: k discriminator steps first, then one generator step.
        return [Phase("discriminator", self.discriminator, self.discriminator_loss, repeats=self.cfg.disc_steps,
                      optim=disc_optim(self.cfg)),
                Phase("model", self.model, self.generator_loss)]

    # -- fine-tuning ---------------------------------------------------------
    def _init_or_defer(self, init, cfg, what: str) -> None:
        """Run a fine-tuning initialisation. If it fails (source moved) while this run has checkpoints of its
        own (resume, cmkit.load), skip it: loading the checkpoint sets every weight it would have set."""
        from cmkit.checkpoint import CheckpointError, list_checkpoints

        try:
            init()
        except (ConfigError, CheckpointError) as e:
            if not list_checkpoints(Path(cfg.run.dir) / "checkpoints"):
                raise
            self._pending_init.append(f"{what} ({e})")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._pending_init = []  # the checkpoint replaced what the skipped initialisations would have set
        return out

    def _check_initialised(self) -> None:
        if self._pending_init:
            raise ConfigError(f"{'; '.join(self._pending_init)} could not initialise this run, and no checkpoint of it "
                              f"was restored (was it started over with --force?). Make the source run available "
                              f"again or leave the option empty")

    def init_generator(self, spec: str, which: str, cfg, shape) -> None:
        """Copy a trained cmkit consistency run's weights (its EMA or raw student) into the generator,
        and into CT's EMA teacher / CD's target where there is one (Sec. 5.1: generator and EMA from
        a trained CM). The loop's EMAs copy the generator when it is built, so they start equal to it."""
        from cmkit.run import load

        run_dir, checkpoint = _resolve_run(spec, "init_from")
        run = load(run_dir, checkpoint)
        source = run.model(ema=which == "ema")
        if getattr(source, "kind", None) != "consistency" or type(source.process) is not type(self.process):
            raise ConfigError(f"method.init_from='{spec}' is a '{run.cfg.method.name}' run; CM-GAN fine-tunes a "
                              f"consistency model of the same noise process (ct, ict, cd, act, cmgan runs)")
        if tuple(run.dataset.shape) != tuple(shape) or run.cfg.data.name != cfg.data.name:
            raise ConfigError(f"method.init_from='{spec}' was trained on data.name={run.cfg.data.name} of shape "
                              f"{tuple(run.dataset.shape)}; this run has data.name={cfg.data.name}, shape {tuple(shape)}")
        # Every number of the process shapes f_θ (scalings, c_noise, grid), so all must agree; mid_sigmas
        # only picks sampling times.
        differ = [f"method.{f.name}: {getattr(source.process, f.name)!r} there, {getattr(self.process, f.name)!r} here"
                  for f in dataclasses.fields(self.process)
                  if f.name != "mid_sigmas" and getattr(source.process, f.name) != getattr(self.process, f.name)]
        if differ:
            raise ConfigError(f"method.init_from='{spec}' was trained with another noise process ({'; '.join(differ)}); "
                              f"set this run's values to the source run's")
        try:
            self.model.load_state_dict(source.state_dict())
        except RuntimeError as e:
            raise ConfigError(f"method.init_from='{spec}': its network differs from this run's net.* settings; copy "
                              f"the source run's net section ({str(e).splitlines()[0]})") from None
        ema_copy = self.cm.teacher if isinstance(self.cm, ConsistencyTraining) else self.cm.target
        if ema_copy is not None:
            ema_copy.load_state_dict(self.model.state_dict())

    def init_discriminator(self, spec: str) -> None:
        """Load D from another CM-GAN run's checkpoint (Sec. 5.1 starts D from a pretrained one)."""
        from cmkit.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint

        run_dir, checkpoint = _resolve_run(spec, "disc_init")
        if checkpoint is not None:
            state, _ = read_checkpoint(checkpoint)
        else:
            found = latest_checkpoint(run_dir / "checkpoints")
            if found is None:
                raise CheckpointError(f"method.disc_init='{spec}' has no checkpoint in {run_dir / 'checkpoints'}")
            state = found[1]
        prefix = "discriminator."
        disc = {k[len(prefix):]: v for k, v in state["objective"].items() if k.startswith(prefix)}
        if not disc:
            raise CheckpointError(f"method.disc_init='{spec}' holds no discriminator (it is not a CM-GAN or ACT run)")
        try:
            self.discriminator.load_state_dict(disc)
        except RuntimeError as e:
            raise ConfigError(f"method.disc_init='{spec}': its discriminator differs from this run's (net.*, "
                              f"method.disc_*): {str(e).splitlines()[0]}") from None

    # -- pieces --------------------------------------------------------------
    def blur(self, x: Tensor, progress: Progress) -> Tensor:
        """Algorithm 1's gauss_blur(·, σ) with σ = blur_sigma(nimg) (σ0 → 0 linearly over M images)."""
        return gaussian_blur(x, blur_sigma(progress.nimg, self.cfg.blur_sigma0, self.cfg.blur_nimg))

    def critic(self, x: Tensor, t: Tensor, labels: Tensor | None, progress: Progress, *, train: bool = True) -> Tensor:
        """D_φ(gauss_blur(x, σ)) logits; with train=False D's parameters get no gradient (generator step)."""
        x = self.blur(x, progress)
        c_noise = self.process.c_noise(t.to(torch.float32))  # ignored unless method.disc_time_emb
        if train:
            return self.discriminator(x, c_noise, labels)
        return frozen_call(self.discriminator, x, c_noise, labels)

    def uniform_fakes(self) -> bool:
        """True when the GAN term needs its own uniform-n draw (gan_noise=uniform and a non-uniform CM draw)."""
        return self.cfg.gan_noise == "uniform" and self.cm.cfg.noise_schedule != "uniform"

    def gan_sigmas(self, x0: Tensor, progress: Progress) -> Tensor:
        """σ_{n+1} of the GAN term's fakes, per sample, in x0's dtype: n ~ U[1, N-1] (Eq. 8) on the CM loss's
        current N-point grid, or the CM loss's own index draw (gan_noise=schedule)."""
        if not self.uniform_fakes():
            return self.cm.sample_pairs(x0, progress)[1].to(x0.dtype)
        sigmas = self.process.karras_sigmas(self.cm.num_scales(progress)).to(x0.device)
        n = torch.multinomial(INDEX_DISTRIBUTIONS["uniform"](sigmas, self.cm.cfg), x0.shape[0], replacement=True)
        return sigmas[n + 1].to(x0.dtype)

    def gan_weight(self, progress: Progress) -> float:
        """λ of Eq. 7, 0 during the discriminator warm-up (method.disc_warmup_nimg)."""
        return 0.0 if progress.nimg < self.cfg.disc_warmup_nimg else self.cfg.gan_weight

    # -- phases --------------------------------------------------------------
    def discriminator_loss(self, batch, progress: Progress) -> dict:
        # Algorithm 1, inner loop: a fresh real batch and fresh t; fake = f_θ(x + t z, t). Alg. 1 noises a
        # second real batch for the fakes; here they come from this batch's images rolled by half (same
        # marginal distribution, so the same expected loss, one batch per repeat).
        self._check_initialised()
        x_r, labels = batch["x"], batch.get("labels")
        half = x_r.shape[0] // 2
        x_g = x_r.roll(half, 0)
        labels_g = labels.roll(half, 0) if labels is not None else None
        t = self.gan_sigmas(x_r, progress)  # the same σ distribution as the generator step's fakes
        with torch.no_grad():
            fake = self.model(self.process.add_noise(x_g, torch.randn_like(x_g), t), t, labels_g)
        due = self.cfg.w_gp > 0 and lazy_due(progress.k, self.cfg.gp_interval)
        x_r = x_r.detach().requires_grad_(due)
        real_logits = self.critic(x_r, t, labels, progress)
        fake_logits = self.critic(fake, t, labels_g, progress)
        # Alg. 1: D_loss = -(ψ1(D(blur(real))) - ψ2(D(blur(fake)))), i.e. -L_GAN of Eq. 8 per sample.
        loss = self.gan.discriminator(real_logits, fake_logits)
        logs = {"d_loss": loss.detach().mean(), "real_logit": real_logits.detach().mean(),
                "fake_logit": fake_logits.detach().mean(),
                "blur_sigma": blur_sigma(progress.nimg, self.cfg.blur_sigma0, self.cfg.blur_nimg)}
        if due:
            gp = self.cfg.w_gp * gradient_penalty(real_logits, x_r)  # R1 on the blurred real input's source
            self._gp_last = gp.detach().mean()
            loss = loss + gp
        if self._gp_last is not None:
            logs["gp_last"] = self._gp_last
        return {"loss": loss, **logs}

    def generator_loss(self, batch, progress: Progress) -> dict:
        # Algorithm 1, generator step: CM_loss and its student output f_θ(x_{t_{n+1}}, t_{n+1}) ("fake_img"),
        # G_loss = CM_loss + λ·G_loss_disc with G_loss_disc = -ψ2(D(blur(fake)), real_label) (gan.py: -D for hinge).
        # The blur touches only D's input; the consistency loss sees the unblurred output.
        self._check_initialised()
        out, student, t_next = self.cm.loss_with_output(batch, progress)
        lam = self.gan_weight(progress)
        labels = batch.get("labels")
        if self.uniform_fakes() and lam > 0:
            # Eq. 8's fakes f_θ(x_{t_n}, t_n) with n uniform: one more student pass on the same images and a fresh z.
            x0 = batch["x"]
            t_next = self.gan_sigmas(x0, progress)
            student = self.model(self.process.add_noise(x0, torch.randn_like(x0), t_next), t_next, labels)
        if lam == 0:
            with torch.no_grad():  # λ = 0 is exactly the CM update (Sec. 4); G_loss_disc is still logged
                l_g = self.gan.generator(self.critic(student, t_next, labels, progress, train=False))
            loss = out["loss"]
        else:
            l_g = self.gan.generator(self.critic(student, t_next, labels, progress, train=False))
            loss = out["loss"] + lam * l_g  # Eq. 7
        logs = {k: v for k, v in out.items() if k != "loss"}
        logs.update(cm_loss=out["loss"].detach().mean(), g_loss=l_g.detach().mean(), gan_weight=lam)
        every = self.cfg.diversity_every
        if every and progress.k % every == 0:
            self.diversity = self.measure_diversity()
        if self.diversity is not None:
            logs["diversity"] = self.diversity
        return {"loss": loss, **logs}

    def after_phase(self, phase: str, progress: Progress) -> None:
        if phase == "model":
            self.cm.after_phase(phase, progress)  # CT's EMA teacher / CD's target; nothing for iCT

    # -- mode-collapse monitor ----------------------------------------------
    def _diversity_extractor(self, cfg, image: bool):
        """The bundled classifier's features for mnist/digits images (cmkit.evaluation), else None (pixels)."""
        if self.cfg.diversity_features == "pixel" or not image or getattr(cfg.data, "vae", ""):
            return None, "pixel"
        try:
            from cmkit.evaluation.classifier import CLASSIFIERS
            from cmkit.evaluation.features import classifier_extractor

            if cfg.data.name not in CLASSIFIERS:
                return None, "pixel"
            extractor = classifier_extractor(cfg.data.name)
        except Exception:  # no classifier weights or no evaluation module: fall back to pixel space
            return None, "pixel"
        return extractor, extractor.name

    @torch.no_grad()
    def measure_diversity(self) -> float:
        """Mean pairwise distance of one-step samples f_θ(σ_max z, σ_max) from the fixed noise batch.

        In the digit classifier's feature space where one exists, else in pixel space; eval mode, so
        no dropout and no draw from the training RNG.
        """
        model, was_training = self.model, self.model.training
        model.eval()
        try:
            z = self.diversity_noise
            t = torch.full((z.shape[0],), self.process.sigma_max, device=z.device, dtype=z.dtype)
            labels = self.diversity_labels.to(z.device) if self.diversity_labels is not None else None
            x = model(self.process.add_noise(torch.zeros_like(z), z, t), t, labels)
        finally:
            model.train(was_training)
        if self.diversity_extractor is not None:
            x = self.diversity_extractor(((x.float().cpu() + 1) / 2).clamp(0, 1))  # data space [0, 1]
        return mean_pairwise_distance(x)

    # -- state ---------------------------------------------------------------
    def extra_state(self) -> dict:
        state = dict(self.cm.extra_state())
        if self.diversity is not None and math.isfinite(self.diversity):
            state["diversity"] = self.diversity
        return state

    def load_extra_state(self, state: dict) -> None:
        self.diversity = float(state["diversity"]) if "diversity" in state else None
        self.cm.load_extra_state(state)
