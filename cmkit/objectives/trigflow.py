"""TrigFlow diffusion training (sCM 004_225d7b9daa3d4cfe.txt Sec. 3, Eq. 4): the teacher for sCD.

L = E[‖σ_d F_θ(x_t/σ_d, c_noise(t)) - v_t‖²]/D with v_t = cos t·σ_d z - sin t·x0 and x_t from
TrigFlow; ln(σ_d tan t) ~ N(P_mean, P_std²) as for sCM. The model's output is the PF-ODE velocity
(Eq. 3), sampled with the Heun solver in cmkit.sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmkit.config import ConfigError
from cmkit.model import Parameterized
from cmkit.nets import build_network
from cmkit.objectives.base import Objective, Phase, drop_labels
from cmkit.processes import TIME_TRANSFORMS, TrigFlow
from cmkit.schedules import Progress, trigflow_lognormal_times


@dataclass
class TrigFlowConfig:
    """Options of TrigFlow diffusion training; defaults follow the sCM CIFAR-10 proposal."""

    name: str = "trigflow"
    sigma_data: float = 0.5
    time_transform: str = "identity"  # must match the sCD student's (the teacher sees the same c_noise)
    time_scale: float = 1.0
    p_mean: float = -1.0
    p_std: float = 1.4
    label_dropout: float = 0.0  # replace a label by the null label (zeros) with this probability, so the
    # model also learns the unconditional velocity that classifier-free guidance needs (Ho & Salimans 2021)

    def validate(self) -> None:
        if self.time_transform not in TIME_TRANSFORMS:
            raise ValueError(f"method.time_transform='{self.time_transform}' is not valid. "
                             f"Choose one of: {', '.join(TIME_TRANSFORMS)}")
        if self.sigma_data <= 0 or self.p_std <= 0:
            raise ValueError("method.sigma_data and method.p_std must be > 0")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"method.label_dropout must lie in [0, 1), got {self.label_dropout}")


class TrigFlowDiffusion(Objective):
    """v-prediction diffusion in TrigFlow; ``model(x, t)`` returns dx_t/dt."""

    def __init__(self, cfg, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.process = TrigFlow(m.sigma_data, m.time_transform, m.time_scale)
        self.model = Parameterized(build_network(cfg.net, shape, num_classes), self.process, "diffusion")
        self.num_classes = num_classes if cfg.net.class_cond else 0
        if m.label_dropout > 0 and not self.num_classes:
            raise ConfigError("method.label_dropout needs a class-conditional model: net.class_cond=true, data.labels=true")

    @property
    def phases(self) -> list[Phase]:
        return [Phase("model", self.model, self.loss)]

    @property
    def sampler(self):
        from cmkit.sampling import trigflow_ode_sample

        return trigflow_ode_sample

    def sample_times(self, steps: int) -> list[float]:
        """``steps`` is the NFE budget: ⌊steps/2⌋ Heun intervals (at least one, NFE = 2 per interval)."""
        return self.process.ode_times(max(steps // 2, 1))

    def loss(self, batch, progress: Progress) -> dict:
        x0, labels = batch["x"], batch.get("labels")
        if labels is not None and self.cfg.label_dropout > 0:
            labels = drop_labels(labels, self.num_classes, self.cfg.label_dropout)
        t = trigflow_lognormal_times(x0.shape[0], self.cfg.p_mean, self.cfg.p_std, self.cfg.sigma_data,
                                     device=x0.device).to(x0.dtype)
        z = torch.randn_like(x0)
        v = self.model(self.process.add_noise(x0, z, t), t, labels)
        # sCM Eq. 4, divided by D so the scale does not depend on the data size.
        loss = (v.float() - self.process.velocity_target(x0, z, t).float()).flatten(1).square().mean(1)
        return {"loss": loss}
