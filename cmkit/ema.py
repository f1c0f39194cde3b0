"""Student EMA at one or several decay rates (iCT App. B: 0.9999 / 0.99993 / 0.99997)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps an eval-mode copy of a module per decay rate: θ_ema ← μ θ_ema + (1-μ) θ."""

    def __init__(self, module: nn.Module, rates: list[float]):
        for r in rates:
            if not 0 <= r < 1:
                raise ValueError(f"train.ema rates must lie in [0, 1), got {r}")
        self.rates = list(rates)
        self.modules = [copy.deepcopy(module).eval().requires_grad_(False) for _ in rates]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = list(module.parameters())
        buffers = list(module.buffers())
        for rate, ema in zip(self.rates, self.modules):
            torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - rate)
            for b_ema, b in zip(ema.buffers(), buffers):
                b_ema.copy_(b)

    def to(self, device) -> "EMA":
        self.modules = [m.to(device) for m in self.modules]
        return self

    def state_dict(self) -> dict:
        return {f"{i}": m.state_dict() for i, m in enumerate(self.modules)}

    def load_state_dict(self, state: dict) -> None:
        for i, m in enumerate(self.modules):
            m.load_state_dict(state[f"{i}"])
