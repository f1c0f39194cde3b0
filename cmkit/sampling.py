"""Samplers as plain functions with one signature (STYLE 7).

``sampler(model, noise, times, *, generator=None, class_labels=None) -> x``: ``noise`` is standard
normal with the output's shape, ``times`` the descending list of times the model is evaluated at.
"""

from __future__ import annotations

import math

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


@torch.no_grad()
def trigflow_ode_sample(
    model, noise: Tensor, times: list[float], *, generator: torch.Generator | None = None, class_labels=None
) -> Tensor:
    """Heun's 2nd-order solver (EDM Alg. 1) of the TrigFlow PF-ODE dx_t/dt = σ_d F(x_t/σ_d, t) (sCM Eq. 3).

    ``model`` is a TrigFlow diffusion model (its output is the velocity); it integrates from
    times[0] through each further time down to t = 0, with 2 evaluations per interval
    (NFE = 2·len(times)). TrigFlow's velocity is finite at t = 0, so the last interval keeps its
    correction too.
    """
    if len(times) < 1:
        raise ValueError("ODE sampling needs at least one time")
    grid = [float(t) for t in times] + [0.0]
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"sampling times must decrease strictly to above 0, got {times}")
    x = model.process.from_noise(noise)
    batch = noise.shape[0]
    for t_cur, t_next in zip(grid, grid[1:]):
        tc = torch.full((batch,), t_cur, device=noise.device)
        tn = torch.full((batch,), t_next, device=noise.device)
        h = t_next - t_cur
        v = model(x, tc, class_labels)
        x_euler = x + h * v
        x = x + h * 0.5 * (v + model(x_euler, tn, class_labels))
    return x


@torch.no_grad()
def trigflow_ddim_sample(
    model, noise: Tensor, times: list[float], *, generator: torch.Generator | None = None, class_labels=None
) -> Tensor:
    """First-order TrigFlow solver x_s = cos(t-s)·x_t - sin(t-s)·σ_d F(x_t/σ_d, t) (DDIM; sCM Eq. 5 with s = 0).

    Exact when the velocity is that of a single data point (derivation: x0 = cos t·x_t - sin t·v,
    σ_d z = sin t·x_t + cos t·v, x_s = cos s·x0 + sin s·σ_d z). NFE = len(times).
    """
    if len(times) < 1:
        raise ValueError("ODE sampling needs at least one time")
    grid = [float(t) for t in times] + [0.0]
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"sampling times must decrease strictly to above 0, got {times}")
    x = model.process.from_noise(noise)
    batch = noise.shape[0]
    for t_cur, t_next in zip(grid, grid[1:]):
        v = model(x, torch.full((batch,), t_cur, device=noise.device), class_labels)
        h = t_cur - t_next
        x = math.cos(h) * x - math.sin(h) * v
    return x


SAMPLERS = {"consistency": consistency_sample, "trigflow_ode": trigflow_ode_sample, "trigflow_ddim": trigflow_ddim_sample}


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
