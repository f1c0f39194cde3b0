"""Every curriculum and weighting of the papers, as pure functions of progress (STYLE 5).

``k`` is the training iteration and ``K`` the total; the loop derives both from images seen
(``Progress``), so schedules survive a change of batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Progress:
    """Where training stands, counted in images seen (STYLE 6)."""

    nimg: int
    total_nimg: int
    batch_size: int

    @property
    def k(self) -> int:
        return self.nimg // self.batch_size

    @property
    def K(self) -> int:
        return max(self.total_nimg // self.batch_size, 1)

    @property
    def fraction(self) -> float:
        return min(self.nimg / max(self.total_nimg, 1), 1.0)


# ----------------------------------------------------------------------------
# Discretisation curricula N(k).


def n_sqrt(k: int, K: int, s0: int, s1: int) -> int:
    """CT curriculum N(k) = ⌈sqrt(k/K·((s1+1)² - s0²) + s0²) - 1⌉ + 1 (iCT Table 1, left column).

    The extracted text leaves the sqrt's closing brace unreadable; the -1 stands outside the
    root, as in Song et al. (2023): that gives N(0) = s0 and N(K) = s1 + 1.
    """
    k = min(k, K)
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def n_exp(k: int, K: int, s0: int, s1: int) -> int:
    """iCT curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (iCT Eq. 9)."""
    k_prime = max(math.floor(K / (math.log2(max(s1 // s0, 1)) + 1)), 1)
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def n_const(k: int, K: int, s0: int, s1: int) -> int:
    """Constant N = s1 + 1 (the iCT Fig. 3b 'constant' shape)."""
    return s1 + 1


CURRICULA = {"exp": n_exp, "sqrt": n_sqrt, "const": n_const}


def ct_teacher_ema(n: int, s0: int, mu0: float) -> float:
    """CT teacher EMA decay μ(k) = exp(s0·log μ0 / N(k)) (iCT Table 1, left column); μ0 = 0 gives μ = 0.

    The limit of exp(s0·log μ0 / N) as μ0 → 0 is 0: the teacher is the student (iCT's choice).
    """
    if mu0 == 0:
        return 0.0
    return math.exp(s0 * math.log(mu0) / n)


# ----------------------------------------------------------------------------
# Noise levels and weighting over the discrete grid.


@lru_cache(maxsize=64)
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """σ_i = (σ_min^{1/ρ} + (i-1)/(N-1)·(σ_max^{1/ρ} - σ_min^{1/ρ}))^ρ, i = 1..N (iCT Sec. 2), float64.

    Cached: the curriculum changes N only a few times per run.
    """
    if n < 2:
        raise ValueError(f"the Karras grid needs N >= 2 points, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (n - 1) * (hi - lo)) ** rho


def lognormal_index_probs(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """p(σ_i) ∝ erf((log σ_{i+1} - P_mean)/(√2 P_std)) - erf((log σ_i - P_mean)/(√2 P_std)), i = 1..N-1 (iCT Eq. 10)."""
    e = torch.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2) * p_std))
    p = e[1:] - e[:-1]
    return p / p.sum()


def uniform_index_probs(sigmas: Tensor) -> Tensor:
    """i ~ U[1, N-1] (Song et al. 2023; iCT Table 1, left column)."""
    n = sigmas.numel() - 1
    return torch.full((n,), 1.0 / n, dtype=sigmas.dtype)


INDEX_DISTRIBUTIONS = {
    "lognormal": lambda sigmas, cfg: lognormal_index_probs(sigmas, cfg.p_mean, cfg.p_std),
    "uniform": lambda sigmas, cfg: uniform_index_probs(sigmas),
}


def reciprocal_weighting(sigma_i: Tensor, sigma_next: Tensor) -> Tensor:
    """λ(σ_i) = 1/(σ_{i+1} - σ_i) (iCT Sec. 3.1, Table 1)."""
    return 1.0 / (sigma_next - sigma_i)


def uniform_weighting(sigma_i: Tensor, sigma_next: Tensor) -> Tensor:
    """λ(σ_i) = 1 (Song et al. 2023)."""
    return torch.ones_like(sigma_i)


WEIGHTINGS = {"reciprocal": reciprocal_weighting, "uniform": uniform_weighting}


def pseudo_huber_c(dim: int) -> float:
    """Pseudo-Huber constant c = 0.00054·sqrt(d) for data of dimensionality d (iCT Sec. 3.3)."""
    return 0.00054 * math.sqrt(dim)


def adaptive_c(n: int) -> float:
    """iLCT adaptive robustness constant c = exp(-1.18·log(N(k) - 1) - 0.72) (iLCT Eq. 11).

    N(k) is the number of discretisation points of the curriculum (iLCT writes NFE(k)); c shrinks
    with N because the TD values shrink as the grid gets finer (iLCT Sec. 4.5, Fig. 4).
    """
    if n < 2:
        raise ValueError(f"adaptive c needs N >= 2 discretisation points, got {n}")
    return math.exp(-1.18 * math.log(n - 1) - 0.72)


# ----------------------------------------------------------------------------
# Optimisation.


def lr_warmup(nimg: int, warmup_nimg: int) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1 over warmup_nimg images, then 1."""
    if warmup_nimg <= 0:
        return 1.0
    return min(nimg / warmup_nimg, 1.0)


def lr_inv_sqrt(nimg: int, ref_nimg: int) -> float:
    """EDM2's decay (Karras et al. 2024, ``training_loop.learning_rate_schedule``): 1/√max(t/t_ref, 1); 0 = off."""
    if ref_nimg <= 0:
        return 1.0
    return 1.0 / math.sqrt(max(nimg / ref_nimg, 1.0))


def lr_anneal(nimg: int, start_nimg: int, end_nimg: int, kind: str, final: float = 0.0) -> float:
    """Learning-rate multiplier annealed from 1 at start_nimg to ``final`` at end_nimg, then held.

    cosine: final + (1 − final)·½(1 + cos(π·u)); linear: 1 − (1 − final)·u, with u = clip((nimg − start)/(end −
    start), 0, 1) (SGDR's cosine, Loshchilov & Hutter 2017, without restarts). kind "none" is 1 throughout.
    """
    if kind == "none" or end_nimg <= start_nimg:
        return 1.0
    u = min(max((nimg - start_nimg) / (end_nimg - start_nimg), 0.0), 1.0)
    if kind == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * u))
    if kind == "linear":
        return 1.0 - (1.0 - final) * u
    raise ValueError(f"lr decay kind '{kind}' is not valid. Choose one of: none, cosine, linear")


# ----------------------------------------------------------------------------
# Adversarial weights and blur (ACT, CM-GAN).


def act_adversarial_weight(n: Tensor, num_scales: int, w: float, w_mid: float) -> Tensor:
    """ACT Eq. 10: λ_N(n) = w·(n/(N-1))^{log_{1/2}(w_mid/w)}, clipped to [0, 1].

    The extracted Eq. 10 is garbled; this form is reconstructed from the text around it: it gives
    λ = w at n = N-1 and λ = w_mid at n = (N-1)/2. n is the 0-based index of the noisier level
    t_{n+1} on the N-point grid, so the noisiest level gets w. The clip keeps (1-λ)·L_CT + λ·L_G
    a convex mix when w_mid > w makes λ grow towards small n.
    """
    n = torch.as_tensor(n, dtype=torch.float64)
    if w <= 0:
        return torch.zeros_like(n)
    gamma = math.log(w_mid / w) / math.log(0.5) if w_mid > 0 else math.inf
    return (w * (n / (num_scales - 1)) ** gamma).clamp(0.0, 1.0)


def blur_sigma(nimg: int, sigma0: float, decay_nimg: int) -> float:
    """CM-GAN Algorithm 1: σ_blur decays linearly from σ0 to 0 over the first M images, then 0."""
    if decay_nimg <= 0:
        return 0.0
    return sigma0 * max(1.0 - nimg / decay_nimg, 0.0)


# ----------------------------------------------------------------------------
# Continuous-time consistency models (sCM).


def tangent_warmup(k: int, warmup_iters: int) -> float:
    """sCM Sec. 4.2 'Tangent Warmup': r rises linearly from 0 to 1 over the first H iterations; H = 0 means r = 1."""
    if warmup_iters <= 0:
        return 1.0
    return min(k / warmup_iters, 1.0)


def trigflow_lognormal_times(n: int, p_mean: float, p_std: float, sigma_data: float, *,
                             device=None, generator=None) -> Tensor:
    """t = arctan(σ/σ_d) with ln σ ~ N(P_mean, P_std²), i.e. σ_d·tan(t) ~ LogNormal (sCM Sec. 4.2).

    The extracted Eq. 8 text reads 'e^{σ_d tan t} ~ N(P_mean, P_std²)', which is garbled: EDM's
    log-normal proposal (Karras et al. 2022) puts ln σ = ln(σ_d tan t) on the normal.
    """
    tau = torch.randn(n, device=device, generator=generator) * p_std + p_mean
    return torch.atan(torch.exp(tau) / sigma_data)
