"""Student EMAs: fixed rates (iCT App. B: 0.9999 / 0.99993 / 0.99997) with an optional warm-up, and EDM2's
power-function profiles with post-hoc reconstruction of any other profile after training.

Sources. Warm-up: TensorFlow's ``tf.train.ExponentialMovingAverage(decay, num_updates)``, which uses
``min(decay, (1 + num_updates) / (10 + num_updates))``. Power-function EMA and post-hoc reconstruction:
Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), Sec. 3 and
App. C; that paper is not in shared/papers, so the equations below were checked against the authors' code,
NVlabs/edm2 ``training/phema.py`` (its comments name the paper's equation numbers used here).

Every profile is a pure function of progress: the update after the step that brings the images seen from
``nimg`` to ``nimg + batch`` needs only those two numbers, so the EMA state is just the averaged weights and
a resumed run continues exactly (the weights are in the checkpoint under ``ema``).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIGMA_REL_MAX = math.sqrt(1 / 12)  # σ_rel of γ → 0 (a uniform average over all of training); larger is impossible


# ----------------------------------------------------------------------------
# Power-function profiles (EDM2 App. C).


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the power-function profile with exponent γ (EDM2 Eq. 123): √((γ+1) / ((γ+2)² (γ+3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ of σ_rel (EDM2 Eq. 126, Algorithm 2): the largest real root of
    γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, i.e. Eq. 123 solved for γ."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"σ_rel={sigma_rel} must lie in (0, {SIGMA_REL_MAX:.4f}) (EDM2 Eq. 123 with γ > 0)")
    s = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def power_beta(gamma: float, t: float, dt: float) -> float:
    """EMA rate β of the step that ends at time t (EDM2 Eq. 127): (1 − Δt/t)^(γ+1); with Δt = 1 the paper's
    β(t) = (1 − 1/t)^(γ+1). The average it keeps is the profile p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]."""
    return (1.0 - dt / t) ** (gamma + 1.0)


def power_inner_product(t_a, gamma_a, t_b, gamma_b):
    """∫ p_a(τ) p_b(τ) dτ of two power-function profiles ending at t_a, t_b (EDM2 Eq. 151, Algorithm 3):
    (γa+1)(γb+1) min(t_a, t_b)^(γa+γb+1) / ((γa+γb+1) t_a^(γa+1) t_b^(γb+1)), written without overflow."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio_exp = np.where(t_a < t_b, gamma_b, -gamma_a)  # (t_a/t_b)^γb / t_b  or  (t_b/t_a)^γa / t_a
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** ratio_exp / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def posthoc_coefficients(in_t, in_gamma, out_t: float, out_gamma: float) -> np.ndarray:
    """Weights x of the stored averages whose combination Σ x_i p_i is closest in L2 to the target profile
    (EDM2 App. C.2, Algorithm 3): the normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_out>,
    solved by least squares (A is near-singular with many snapshots), then scaled to sum to one."""
    in_t, in_gamma = (np.asarray(v, np.float64).reshape(-1) for v in (in_t, in_gamma))
    a = power_inner_product(in_t[:, None], in_gamma[:, None], in_t[None, :], in_gamma[None, :])
    b = power_inner_product(in_t, in_gamma, np.float64(out_t), np.float64(out_gamma))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


# ----------------------------------------------------------------------------
# The profiles the loop tracks.


def warmup_rate(rate: float, k: int) -> float:
    """min(μ, (1 + k)/(10 + k)) at update k = 0, 1, ... (tf.train.ExponentialMovingAverage's num_updates form).

    Without it a short run keeps μ^K of the random initial weights (0.999^1500 = 22%); with it the
    average over the first ~9/(1-μ) updates weighs update k by (k+2)(k+3)…(k+9), a power-function-like profile.
    """
    return min(rate, (1.0 + k) / (10.0 + k))


@dataclass(frozen=True)
class Profile:
    """One tracked average: a fixed rate μ (optionally warmed up) or a power function of σ_rel."""

    rate: float | None = None  # μ of θ_ema ← μ θ_ema + (1-μ) θ
    warmup: bool = False
    sigma_rel: float | None = None  # EDM2 power-function profile

    def beta(self, nimg: int, batch_size: int) -> float:
        """EMA rate of the update after the step that takes the images seen from nimg to nimg + batch_size."""
        if self.sigma_rel is not None:
            return power_beta(sigma_rel_to_gamma(self.sigma_rel), nimg + batch_size, batch_size)
        return warmup_rate(self.rate, nimg // batch_size) if self.warmup else self.rate

    @property
    def label(self) -> str:
        if self.sigma_rel is not None:
            return f"power-function EMA sigma_rel={self.sigma_rel:g}"
        return f"ema {self.rate:g}" + (" with warm-up min(mu, (1+k)/(10+k))" if self.warmup else "")


def profiles_of(rates: list[float], stds: list[float] = (), warmup: bool = False) -> list[Profile]:
    """The fixed rates first, then the power-function profiles: train.ema_sample indexes this list."""
    for r in rates:
        if not 0 <= r < 1:
            raise ValueError(f"train.ema rates must lie in [0, 1), got {r}")
    for s in stds:
        if not 0 < s < SIGMA_REL_MAX:
            raise ValueError(f"train.ema_std values (σ_rel) must lie in (0, {SIGMA_REL_MAX:.4f}), got {s}")
    return [Profile(rate=r, warmup=warmup) for r in rates] + [Profile(sigma_rel=s) for s in stds]


class EMA:
    """Keeps an eval-mode copy of a module per profile; ``modules[i]`` belongs to ``profiles[i]``."""

    def __init__(self, module: nn.Module, rates: list[float], *, stds: list[float] = (), warmup: bool = False):
        self.profiles = profiles_of(rates, stds, warmup)
        if not self.profiles:
            raise ValueError("no EMA profile: give train.ema rates and/or train.ema_std values")
        self.modules = [copy.deepcopy(module).eval().requires_grad_(False) for _ in self.profiles]

    @classmethod
    def from_config(cls, module: nn.Module, tc) -> "EMA":
        return cls(module, tc.ema, stds=tc.ema_std, warmup=tc.ema_warmup)

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.profiles]

    @torch.no_grad()
    def update(self, module: nn.Module, nimg: int, batch_size: int) -> None:
        """Average in the weights after the step that took the images seen from nimg to nimg + batch_size."""
        params = list(module.parameters())
        buffers = list(module.buffers())
        for profile, ema in zip(self.profiles, self.modules):
            torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - profile.beta(nimg, batch_size))
            for b_ema, b in zip(ema.buffers(), buffers):
                b_ema.copy_(b)

    def to(self, device) -> "EMA":
        self.modules = [m.to(device) for m in self.modules]
        return self

    def state_dict(self) -> dict:
        # The profiles themselves are config (train.ema*, in the checkpoint's meta): a profile is a function of
        # progress, so the averaged weights are all the state there is.
        return {f"{i}": m.state_dict() for i, m in enumerate(self.modules)}

    def load_state_dict(self, state: dict) -> None:
        for i, m in enumerate(self.modules):
            m.load_state_dict(state[f"{i}"])

    def power_modules(self) -> list[tuple[float, nn.Module]]:
        """(σ_rel, module) of each power-function profile: what snapshots store for post-hoc reconstruction."""
        return [(p.sigma_rel, m) for p, m in zip(self.profiles, self.modules) if p.sigma_rel is not None]


# ----------------------------------------------------------------------------
# Snapshots for post-hoc reconstruction: RUN/ema_snapshots/ema-<nimg>.safetensors, one per save, atomic.

SNAPSHOT_DIR = "ema_snapshots"
POSTHOC_DIR = "ema_posthoc"
SNAPSHOT_FORMAT = "cmkit-ema-snapshot-v1"
_SNAPSHOT = re.compile(r"^ema-(\d{12})\.safetensors$")


def save_snapshot(run_dir: Path, nimg: int, ema: EMA) -> Path:
    """Write the power-function averages at nimg (float32, safetensors, atomic: cmkit.checkpoint helpers)."""
    from safetensors.torch import save as st_save

    from cmkit.checkpoint import atomic_write_bytes

    stds = [s for s, _ in ema.power_modules()]
    tensors = {f"{i}/{k}": v.detach().float().cpu().contiguous()
               for i, (_, m) in enumerate(ema.power_modules()) for k, v in m.state_dict().items()
               if v.dtype.is_floating_point}
    header = {"format": SNAPSHOT_FORMAT, "nimg": int(nimg), "sigma_rel": stds}
    path = Path(run_dir) / SNAPSHOT_DIR / f"ema-{nimg:012d}.safetensors"
    atomic_write_bytes(path, st_save(tensors, metadata={"cmkit": json.dumps(header)}))
    return path


def list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(nimg, path) of a run's snapshots, oldest first."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT.match(p.name)))


def read_snapshot(path: Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(header, one state dict per σ_rel) of a snapshot; ValueError names a file that is not one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("cmkit", "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"'{path}' is not a readable EMA snapshot ({e}); delete it") from None
    if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"'{path}' is not a cmkit EMA snapshot ({SNAPSHOT_FORMAT}); delete it")
    states: list[dict[str, torch.Tensor]] = [{} for _ in header["sigma_rel"]]
    for key, v in tensors.items():
        i, name = key.split("/", 1)
        states[int(i)][name] = v
    return header, states


def reconstruct(run_dir: Path, sigma_rel: float, nimg: int | None = None) -> tuple[dict, dict]:
    """The weights of the σ_rel power-function EMA at nimg (default: the last snapshot), combined from every
    snapshot at or before it (EDM2 App. C.2). Returns (state dict, provenance: inputs and coefficients)."""
    found = list_snapshots(run_dir)
    if not found:
        raise ValueError(f"'{run_dir}' has no EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR}. Train with "
                         f"train.ema_std=[0.05,0.1] and train.ema_snapshot_every=N (steps) to store them")
    out_nimg = found[-1][0] if nimg is None else int(nimg)
    if out_nimg not in {n for n, _ in found}:
        raise ValueError(f"--nimg {out_nimg} is not a snapshot time; snapshots: {', '.join(str(n) for n, _ in found)}")
    inputs = []  # (nimg, σ_rel, path, index within the file)
    for n, path in found:
        if 0 < n <= out_nimg:
            header, _ = read_snapshot(path)
            inputs += [(n, s, path, i) for i, s in enumerate(header["sigma_rel"])]
    coef = posthoc_coefficients([n for n, *_ in inputs], [sigma_rel_to_gamma(s) for _, s, *_ in inputs],
                                out_nimg, sigma_rel_to_gamma(sigma_rel))
    out: dict[str, torch.Tensor] = {}
    cache: dict[Path, list] = {}
    for c, (n, s, path, i) in zip(coef, inputs):
        if path not in cache:
            cache = {path: read_snapshot(path)[1]}  # one file in memory at a time
        for k, v in cache[path][i].items():
            acc = out.setdefault(k, torch.zeros_like(v, dtype=torch.float64))
            acc.add_(v.double(), alpha=float(c))
    info = {"sigma_rel": sigma_rel, "nimg": out_nimg,
            "inputs": [{"nimg": n, "sigma_rel": s, "coefficient": float(c)} for c, (n, s, *_) in zip(coef, inputs)]}
    return {k: v.float() for k, v in out.items()}, info


def write_reconstruction(run_dir: Path, sigma_rel: float, nimg: int | None = None,
                         out: Path | None = None) -> tuple[Path, dict]:
    """Reconstruct the σ_rel EMA and write it as a cmkit checkpoint that ``cmkit sample/eval --checkpoint``
    load: the run's config with that one profile (train.ema=[], train.ema_std=[σ_rel]), the reconstructed
    weights as its EMA, and the student/teacher state of the checkpoint at that nimg (else the latest)."""
    from safetensors.torch import save as st_save

    from cmkit.checkpoint import FORMAT, atomic_write_bytes, checkpoint_path, flatten, latest_checkpoint, read_checkpoint

    run_dir = Path(run_dir)
    weights, info = reconstruct(run_dir, sigma_rel, nimg)
    same = checkpoint_path(run_dir / "checkpoints", info["nimg"])
    if same.is_file():
        state, meta = read_checkpoint(same)
    elif (found := latest_checkpoint(run_dir / "checkpoints")) is not None:
        _, state, meta = found
    else:
        raise ValueError(f"'{run_dir}' has EMA snapshots but no checkpoint in {run_dir / 'checkpoints'}")
    config = copy.deepcopy(meta["config"])
    config["train"].update(ema=[], ema_std=[float(sigma_rel)], ema_warmup=False, ema_sample=0, ema_snapshot_every=0)
    base = state["ema"]["0"]  # the model's non-float buffers come from here
    missing = sorted(set(k for k, v in base.items() if torch.is_tensor(v) and v.dtype.is_floating_point) - set(weights))
    if missing:
        raise ValueError(f"the snapshots lack tensors the checkpoint's model has (e.g. {missing[0]}): "
                         f"they were written by another network")
    ema_state = {"0": {**base, **weights}}
    progress = {**state["progress"], "nimg": info["nimg"]}
    new_state = {"objective": state["objective"], "ema": ema_state, "progress": progress}
    new_meta = {**meta, "config": config, "nimg": info["nimg"], "posthoc": info}
    tensors: dict[str, torch.Tensor] = {}
    header = {"format": FORMAT, "meta": new_meta, "state": flatten(new_state, tensors)}
    path = Path(out) if out is not None else run_dir / POSTHOC_DIR / f"ema-{sigma_rel:.3f}-{info['nimg']:012d}.safetensors"
    atomic_write_bytes(path, st_save(tensors, metadata={"cmkit": json.dumps(header)}))
    return path, info
