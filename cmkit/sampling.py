"""Samplers as plain functions with one signature (STYLE 7).

``sampler(model, noise, times, *, generator=None, class_labels=None) -> x``: ``noise`` is standard
normal with the output's shape, ``times`` the descending list of times the model is evaluated at.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.config import ConfigError
from cmkit.schedules import karras_sigmas


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


# ----------------------------------------------------------------------------
# Diffusion ODE solvers in σ (VE/EDM) time: PF-ODE dx/dσ = (x - D(x, σ)) / σ (EDM Eq. 3 with
# σ(t) = t; iCT Eq. 1 with ∇ log p_σ(x) = (D(x, σ) - x) / σ²). ``model`` is a denoiser
# D(x, σ, class_labels), e.g. Parameterized(net, process, kind="diffusion") or a CD teacher.


def _sigma_bcast(t, x: Tensor) -> tuple[Tensor, Tensor]:
    """σ as (B,) for the denoiser and broadcast (B, 1, ...) for the update; t scalar or (B,)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    return t, t.reshape(-1, *([1] * (x.ndim - 1)))


def euler_step(denoiser, x: Tensor, t, t_next, class_labels=None) -> Tensor:
    """One Euler step of the PF-ODE from σ = t to t_next (scalars or per-sample (B,) tensors).

    x' = x + (t_next - t)·(x - D(x, t))/t: Song et al. 2023's x̂_{σ_i} = x_{σ_{i+1}} -
    (σ_i - σ_{i+1}) σ_{i+1} s_φ(x_{σ_{i+1}}, σ_{i+1}) (text below iCT Eq. 3) with s_φ = (D - x)/σ².
    """
    t, tb = _sigma_bcast(t, x)
    _, nb = _sigma_bcast(t_next, x)
    d = (x - denoiser(x, t, class_labels)) / tb
    return x + (nb - tb) * d


def heun_step(denoiser, x: Tensor, t, t_next, class_labels=None) -> Tensor:
    """One Heun step from σ = t to t_next > 0 (EDM Algorithm 1, lines 4-8, deterministic).

    x̃ = x + h·d(x, t); x' = x + h·(d(x, t) + d(x̃, t_next))/2, d(x, σ) = (x - D(x, σ))/σ, h = t_next - t.
    """
    t, tb = _sigma_bcast(t, x)
    t_next, nb = _sigma_bcast(t_next, x)
    d = (x - denoiser(x, t, class_labels)) / tb
    x_euler = x + (nb - tb) * d
    d_next = (x_euler - denoiser(x_euler, t_next, class_labels)) / nb
    return x + (nb - tb) * (0.5 * d + 0.5 * d_next)


def _check_ode_times(times) -> None:
    if len(times) < 2:
        raise ValueError("an ODE sampler needs at least two times (start and end), e.g. [80.0, 0.0]")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"sampling times must decrease strictly, got {times}")
    if times[-1] < 0:
        raise ValueError(f"sampling times must be >= 0, got {times}")


@torch.no_grad()
def euler_sample(model, noise: Tensor, times: list[float], *, generator=None, class_labels=None) -> Tensor:
    """Euler PF-ODE sampler over σ_0 > ... > σ_N (σ_N may be 0) from x = σ_0·noise; N evaluations."""
    _check_ode_times(times)
    x = noise * float(times[0])
    for t, t_next in zip(times, times[1:]):
        x = euler_step(model, x, float(t), float(t_next), class_labels)
    return x


@torch.no_grad()
def heun_sample(model, noise: Tensor, times: list[float], *, generator=None, class_labels=None) -> Tensor:
    """Heun PF-ODE sampler (EDM Algorithm 1, deterministic) over σ_0 > ... > σ_N from x = σ_0·noise.

    Heun steps to every σ_{i+1} > 0 and an Euler step to σ_{i+1} = 0: 2N evaluations, 2N-1 if σ_N = 0.
    """
    _check_ode_times(times)
    x = noise * float(times[0])
    for t, t_next in zip(times, times[1:]):
        step = heun_step if t_next > 0 else euler_step
        x = step(model, x, float(t), float(t_next), class_labels)
    return x


def ode_times(nfe: int, sigma_min: float, sigma_max: float, rho: float, solver: str = "heun") -> list[float]:
    """Karras σ grid (EDM Eq. 5) on which ``euler_sample``/``heun_sample`` use exactly ``nfe`` evaluations.

    Euler: nfe Karras points, then 0. Heun, odd nfe = 2n-1: n Karras points, then 0 (EDM Alg. 1;
    35 NFE = 18 points). Heun, even nfe = 2n: n+1 Karras points ending at σ_min, where sampling
    stops (residual noise σ_min = 0.002). A single point means [σ_max, 0].
    """
    if nfe < 1:
        raise ValueError(f"sampling needs at least one network evaluation, got {nfe}")
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown ODE solver '{solver}' (euler | heun)")

    def grid(n: int) -> list[float]:
        if n == 1:
            return [float(sigma_max)]
        return [float(s) for s in karras_sigmas(n, sigma_min, sigma_max, rho).flip(0)]

    if solver == "euler":
        return grid(nfe) + [0.0]
    if nfe % 2:
        return grid((nfe + 1) // 2) + [0.0]
    return grid(nfe // 2 + 1)


SAMPLERS = {"consistency": consistency_sample, "trigflow_ode": trigflow_ode_sample, "trigflow_ddim": trigflow_ddim_sample, "euler": euler_sample, "heun": heun_sample}


class WithGuidance(nn.Module):
    """``model(x, t, class_labels)`` that passes a fixed CFG scale w to a guidance-conditional model (sCM Sec. 5.2)."""

    def __init__(self, model: nn.Module, guidance: float):
        super().__init__()
        self.model, self.guidance, self.process = model, float(guidance), model.process

    def forward(self, x: Tensor, t, class_labels=None) -> Tensor:
        return self.model(x, t, class_labels, guidance=self.guidance)


class WithCFG(nn.Module):
    """``model(x, t, class_labels)`` with classifier-free guidance on the model's output:
    out = f(x, t, ∅) + w·(f(x, t, c) − f(x, t, ∅)), ∅ the zero label vector (cmkit.nets.layers).

    For a model trained with label dropout (method.label_dropout > 0). Ho & Salimans 2021's rule applied to
    the model's output: for a TrigFlow diffusion model's velocity it is CFG itself; for a consistency model it
    extrapolates the two one-step maps, a heuristic the five papers do not write down (sCM's Fig. 6 evaluates
    sCT "under optimal guidance scales" without stating the rule). w = 1 is no guidance. Both halves run as one
    batch of 2B, so a step costs two network evaluations per sample (metrics.json's nfe counts both). Measured
    on the demo model in docs/results.md ("Classifier-free guidance of the demo model").
    """

    def __init__(self, model: nn.Module, scale: float, num_classes: int):
        super().__init__()
        self.model, self.scale, self.num_classes, self.process = model, float(scale), num_classes, model.process

    def forward(self, x: Tensor, t, class_labels=None) -> Tensor:
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        b = x.shape[0]
        cond = (class_labels if class_labels.is_floating_point()
                else F.one_hot(class_labels.long(), self.num_classes)).to(torch.float32)
        t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t
        out = self.model(torch.cat([x, x]), t2, torch.cat([cond, torch.zeros_like(cond)]))
        c, u = out[:b], out[b:]
        return u + self.scale * (c - u)


def check_guidance(scale: float, name: str = "guidance") -> None:
    """A ConfigError unless the CFG scale w is a finite number >= 0 (1 = no guidance, 0 = the unconditional model)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"{name} {scale} must be a finite number >= 0: the classifier-free guidance scale w "
                          f"(1 = no guidance, above 1 stronger class features, 0 = the unconditional model)")


def guidance_scale(cfg, sample_guidance: float | None, guidance: float | None = None) -> float | None:
    """The CFG scale w a run samples with: ``guidance`` if given, else its default; None = no guidance.

    A guidance-conditional sCD student (net.guidance_cond) takes w as an input, default its method.guidance
    (``sample_guidance``, the objective's). A class-conditional model trained with method.label_dropout > 0 is
    guided on its output (WithCFG), default its method.guidance; w = 1 there is the plain conditional model.
    A scale for any other model is a ConfigError.
    """
    if guidance is not None:
        check_guidance(guidance)
    if cfg.net.guidance_cond:
        return sample_guidance if guidance is None else float(guidance)
    if not getattr(cfg.method, "label_dropout", 0) > 0:
        if guidance is not None:
            raise ConfigError("a guidance scale needs a student trained with net.guidance_cond=true (sCD with CFG) "
                              "or a class-conditional model trained with method.label_dropout > 0 (classifier-free "
                              "guidance of its output)")
        return None
    w = float(getattr(cfg.method, "guidance", 1.0) if guidance is None else guidance)
    return None if w == 1 else w


def guided_model(model: nn.Module, cfg, sample_guidance: float | None, num_classes: int,
                 guidance: float | None = None) -> nn.Module:
    """``model`` with the scale of ``guidance_scale`` applied: WithGuidance (an input), WithCFG (on the output),
    or the model itself when there is none."""
    w = guidance_scale(cfg, sample_guidance, guidance)
    if w is None:
        return model
    return WithGuidance(model, w) if cfg.net.guidance_cond else WithCFG(model, w, num_classes)


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """A ConfigError unless the noise temperature is a finite number > 0 (0 would draw one image per class)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"{name} {temperature} must be a finite number > 0: the factor on the starting noise "
                          f"(1 = the model's own distribution, below 1 fewer but cleaner modes)")


def cycled_labels(n: int, num_classes: int) -> Tensor:
    """The labels a class-conditional model is sampled and evaluated with unless told: 0, 1, ..., K-1, 0, 1, ...

    Each class gets n/K of the n samples (to within one), and a grid of K columns shows one class per column.
    """
    return torch.arange(n) % num_classes


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
    guidance: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Draw n samples in batches from a seeded generator; the same seed gives the same samples.

    ``guidance`` is the CFG scale w given to a guidance-conditional student (net.guidance_cond); None: no input.
    (cmkit.run.Run.sample picks a run's guidance itself, guided_model: an input or WithCFG.)
    ``temperature`` τ scales the starting noise (x_T = τ·σ_max·z for VE samplers), the truncation / temperature
    trick of GANs and flows; not in the five papers. τ < 1 trades recall for precision. Only the start is scaled:
    the fresh noise of a multistep sampler's later steps keeps its std. Measured on the demo model in
    docs/results.md ("The demo model's sampling knobs").
    """
    check_temperature(temperature)
    if guidance is not None:
        model = WithGuidance(model, guidance)
    device = device or next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = temperature * torch.randn((b, *shape), generator=generator, device=device)  # exact at τ = 1
        labels = None if class_labels is None else class_labels[start : start + b].to(device)
        out.append(sampler(model, noise, times, generator=generator, class_labels=labels).cpu())
    return torch.cat(out) if out else torch.empty((0, *shape))
