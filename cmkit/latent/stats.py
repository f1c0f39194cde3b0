"""Outlier statistics of iLCT Fig. 1: box-and-whisker numbers for data values and TD values.

Tukey's fences: with quartiles Q1, Q3 and IQR = Q3 - Q1, the inner fences are Q1 - 1.5·IQR and
Q3 + 1.5·IQR, the outer fences Q1 - 3·IQR and Q3 + 3·IQR. Values beyond the outer fences are the
"impulsive outliers" (iLCT Sec. 4.1: rare but very large, like salt-and-pepper noise).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cmkit.config import ConfigError
from cmkit.processes import VEProcess
from cmkit.schedules import INDEX_DISTRIBUTIONS, karras_sigmas


def outlier_stats(values: Tensor | np.ndarray, max_values: int = 4_000_000, seed: int = 0) -> dict:
    """Quartiles, fences, outlier shares and extremes of all elements of values (subsampled above max_values)."""
    v = values.detach().double().cpu().numpy().ravel() if torch.is_tensor(values) else np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("no values to describe")
    n_total = v.size
    if v.size > max_values:
        v = np.random.default_rng(seed).choice(v, max_values, replace=False)
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    iqr = q3 - q1
    inner = (q1 - 1.5 * iqr, q3 + 1.5 * iqr)
    outer = (q1 - 3.0 * iqr, q3 + 3.0 * iqr)
    beyond_inner = (v < inner[0]) | (v > inner[1])
    beyond_outer = (v < outer[0]) | (v > outer[1])
    return {
        "n": int(n_total), "mean": float(v.mean()), "std": float(v.std()),
        "min": float(v.min()), "q1": float(q1), "median": float(median), "q3": float(q3), "max": float(v.max()),
        "iqr": float(iqr), "inner_fences": [float(inner[0]), float(inner[1])],
        "outer_fences": [float(outer[0]), float(outer[1])],
        "outlier_share": float(beyond_inner.mean()),  # beyond the inner fences (mild and impulsive)
        "impulsive_share": float(beyond_outer.mean()),  # beyond the outer fences
        "max_abs_over_iqr": float(np.abs(v - median).max() / iqr) if iqr > 0 else float("inf"),
    }


@torch.no_grad()
def td_values(model, x0: Tensor, *, labels: Tensor | None = None, num_scales: int = 21, sigma_min: float = 0.002,
              sigma_max: float = 80.0, rho: float = 7.0, schedule: str = "lognormal", p_mean: float = -1.1,
              p_std: float = 2.0, seed: int = 0, batch_size: int = 256) -> Tensor:
    """TD = f_θ(x_{t_{i+1}}, t_{i+1}) - f_θ(x_{t_i}, t_i) with shared z (iLCT Sec. 4.1, Fig. 1: N = 21).

    i is drawn from the training index distribution over the N-point Karras grid; ``labels`` (n,)
    are the class labels of x0 for a class-conditional model.
    """
    if labels is not None and labels.shape[:1] != x0.shape[:1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match {x0.shape[0]} data points")

    class _Cfg:  # INDEX_DISTRIBUTIONS reads p_mean and p_std from a method config
        pass

    cfg = _Cfg()
    cfg.p_mean, cfg.p_std = p_mean, p_std
    sigmas = karras_sigmas(num_scales, sigma_min, sigma_max, rho)
    probs = INDEX_DISTRIBUTIONS[schedule](sigmas, cfg)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for s in range(0, x0.shape[0], batch_size):
        xb = x0[s:s + batch_size]
        i = torch.multinomial(probs, xb.shape[0], replacement=True, generator=g)
        z = torch.randn(xb.shape, generator=g)
        t_i, t_next = sigmas[i].float(), sigmas[i + 1].float()
        shape = (-1,) + (1,) * (xb.ndim - 1)
        yb = labels[s:s + batch_size].to(device) if labels is not None else None
        a = model((xb + t_next.reshape(shape) * z).to(device), t_next.to(device), yb)
        b = model((xb + t_i.reshape(shape) * z).to(device), t_i.to(device), yb)
        out.append((a - b).float().cpu())
    return torch.cat(out)


def run_td_values(run, n: int = 2000, *, num_scales: int = 21, seed: int = 0, ema: bool = True) -> Tensor:
    """TD values (``td_values``) of a loaded run's model on n seeded training points, with its grid and labels.

    TD is defined on the discrete VE grid σ_1 < ... < σ_N (iLCT Sec. 4.1); continuous-time TrigFlow
    runs (sCT/sCD, TrigFlow diffusion) have no such grid and are refused with a ConfigError.
    """
    model, m = run.model(ema), run.cfg.method
    process = getattr(model, "process", None)
    if not isinstance(process, VEProcess):
        raise ConfigError(
            f"TD statistics need a discrete-time VE model (ct, ict, ilct, cd, act, cmgan, edm); run '{run.dir}' "
            f"uses method '{m.name}' with the {getattr(process, 'name', type(process).__name__)} process, which "
            f"has no σ grid. Inspect its data without --run")
    if num_scales < 2:
        raise ConfigError(f"--td-steps {num_scales}: the TD grid needs at least 2 points (iLCT Fig. 1: 21)")
    ds = run.dataset
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    labels = None
    if run.cfg.net.class_cond:
        if ds.labels is None:
            raise ConfigError("the run's model is class-conditional but its data have no labels; set data.labels=true")
        labels = ds.labels[idx]
    return td_values(model, ds.x[idx], labels=labels, num_scales=num_scales, sigma_min=process.sigma_min,
                     sigma_max=process.sigma_max, rho=process.rho, schedule=getattr(m, "noise_schedule", "lognormal"),
                     p_mean=getattr(m, "p_mean", -1.1), p_std=getattr(m, "p_std", 2.0), seed=seed)


def format_stats(title: str, s: dict) -> str:
    """One block of text for the terminal."""
    return (
        f"{title}: n={s['n']}  mean={s['mean']:.4g}  std={s['std']:.4g}\n"
        f"  min={s['min']:.4g}  Q1={s['q1']:.4g}  median={s['median']:.4g}  Q3={s['q3']:.4g}  max={s['max']:.4g}\n"
        f"  inner fences=[{s['inner_fences'][0]:.4g}, {s['inner_fences'][1]:.4g}]  "
        f"outer fences=[{s['outer_fences'][0]:.4g}, {s['outer_fences'][1]:.4g}]\n"
        f"  beyond inner fences={100 * s['outlier_share']:.3f}%  "
        f"impulsive (beyond outer fences)={100 * s['impulsive_share']:.3f}%  "
        f"max|x-median|/IQR={s['max_abs_over_iqr']:.3g}"
    )
