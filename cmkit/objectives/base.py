"""What every objective shares: phases, the method registry entry, and reproducible dropout.

An objective is an ``nn.Module`` that owns every stateful piece of its method (the student
consistency model, a teacher copy, a discriminator, ...), so one ``state_dict`` checkpoints it
all. It declares ``phases``; the loop runs them without knowing the method (STYLE 4).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from cmkit.schedules import Progress

Batch = dict[str, Tensor]  # "x": data (B, ...), optional "labels": (B,)
LossFn = Callable[[Batch, Progress], dict[str, Tensor]]


@dataclass
class Phase:
    """One optimisation phase: its loss, the module whose parameters it steps, how often per step.

    ``loss(batch, progress)`` returns a dict with ``"loss"`` (per-sample or scalar; the loop
    averages and back-propagates it) plus logging scalars; ``repeats`` fresh batches per step.
    """

    name: str
    module: nn.Module
    loss: LossFn
    repeats: int = 1
    optim: dict = field(default_factory=dict)  # overrides of the train section's optimiser (cmkit.optim.OptimSettings)


@dataclass
class MethodSpec:
    """A registry entry: the objective class, its config dataclass and the preset of defaults."""

    objective: type
    config: type
    preset: dict = field(default_factory=dict)


class Objective(nn.Module):
    """Base class; subclasses set ``self.model`` (the student) and define ``phases``."""

    model: nn.Module
    sample_guidance: float | None = None  # default CFG scale w for a guidance-conditional student; None: no input

    @property
    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def after_phase(self, phase: str, progress: Progress) -> None:
        """Called after each phase's optimiser step (target/teacher updates, adaptive state)."""

    def sample_times(self, steps: int) -> list[float]:
        """Default times of a K-step sampler (for diffusion objectives K is the NFE budget)."""
        return self.model.process.sampling_times(steps)

    @property
    def sampler(self):
        """The sampling function for this method's model (STYLE 7 signature)."""
        from cmkit.sampling import consistency_sample

        return consistency_sample

    def extra_state(self) -> dict:
        """Non-tensor state (floats, ints) the checkpoint must carry."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def drop_labels(labels: Tensor, num_classes: int, p: float) -> Tensor:
    """One-hot float labels (B, K) with each row zeroed, the null label ∅ of classifier-free guidance
    (cmkit.nets.layers.NoiseEmbedding), with probability p (Ho & Salimans 2021: p_uncond 0.1-0.2), so one
    network learns both the conditional and the unconditional model. p = 0 gives plain one-hot labels."""
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float32)
    keep = torch.rand(labels.shape[0], 1, device=labels.device) >= p
    return onehot * keep


def _rng_state(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class SharedDropout:
    """Replays the RNG state so that two passes draw identical dropout masks (iCT Sec. 3.1).

    ``with shared.record(): teacher(...)`` then ``with shared.replay(): student(...)`` (either order); after
    the replay the RNG continues from where the recorded pass left it, as if one pass had run.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self._start = None

    @contextlib.contextmanager
    def record(self):
        self._start = _rng_state(self.device) if self.enabled else None
        yield

    @contextlib.contextmanager
    def replay(self):
        if self._start is None:
            yield
            return
        after = _rng_state(self.device)
        _set_rng_state(self.device, self._start)
        try:
            yield
        finally:
            _set_rng_state(self.device, after)
