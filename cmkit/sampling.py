"""Samplers as plain functions with one signature (STYLE 7).

``sampler(model, noise, times, *, generator=None, class_labels=None) -> x``: ``noise`` is standard
normal with the output's shape, ``times`` the descending list of times the model is evaluated at.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def consistency_sample(
    model, noise: Tensor, times: list[float], *, generator: torch.Generator | None = None, class_labels=None
) -> Tensor:
    """One-step (one time) or multistep consistency sampling (Song et al. 2023 Alg. 1; iCT Sec. 2).

    x ← f_θ(x_T, τ_1); then for each further τ_k: x ← f_θ(renoise(x, τ_k), τ_k), where the VE
    process renoises with sqrt(τ_k² - σ_min²)·z.
    """
    if len(times) < 1:
        raise ValueError("consistency sampling needs at least one time")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"sampling times must decrease strictly, got {times}")
    process = model.process
    x = process.from_noise(noise)
    batch = noise.shape[0]
    t = torch.full((batch,), float(times[0]), device=noise.device)
    x = model(x, t, class_labels)
    for tau in times[1:]:
        z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        t = torch.full((batch,), float(tau), device=noise.device)
        x = model(process.renoise(x, t, z), t, class_labels)
    return x


SAMPLERS = {"consistency": consistency_sample}


@torch.no_grad()
def sample_batched(
    model,
    n: int,
    shape: tuple[int, ...],
    times: list[float],
    *,
    sampler=consistency_sample,
    batch_size: int = 256,
    seed: int = 0,
    device=None,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Draw n samples in batches from a seeded generator; the same seed gives the same samples."""
    device = device or next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = torch.randn((b, *shape), generator=generator, device=device)
        labels = None if class_labels is None else class_labels[start : start + b].to(device)
        out.append(sampler(model, noise, times, generator=generator, class_labels=labels).cpu())
    return torch.cat(out) if out else torch.empty((0, *shape))
