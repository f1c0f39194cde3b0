"""Evaluating any generator's samples from a file with a run's protocol: ``cmkit eval --samples FILE.npz``.

The file holds one array (``samples``, or a file's only array such as numpy's default ``arr_0``): images
as (n, C, H, W) or (n, H, W, C), float in [0, 1] or [-1, 1] or uint8 in [0, 255]; vectors as (n, D) in
data units. The images are mapped to [0, 1], and from there on the numbers are computed exactly as for a
run (``Evaluator.metrics``), so a cmkit run and another codebase's samples compare on equal terms.

A class-conditional generator's file may add ``labels``, the integer class each sample was generated for
(``np.savez(path, samples=x, labels=y)``); on the bundled digit sets the report then adds ``class_match``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cmkit.config import ConfigError
from cmkit.evaluation.classifier import file_sha256

RANGE_TOLERANCE = 1e-4  # float rounding at the ends of [0, 1] / [-1, 1]
RANGES = ("auto", "01", "11")


def read_sample_array(path: str | Path) -> np.ndarray:
    """The samples array of an .npz (key ``samples``, else its only array) or .npy file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--samples '{path}' does not exist")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "samples" in keys:
                return f["samples"]
            if len(keys) == 1:
                return f[keys[0]]
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"--samples '{path}' is not a readable .npz/.npy file ({e})") from None
    raise ConfigError(f"--samples '{path}' holds arrays {', '.join(keys) or '(none)'}: name the samples array "
                      f"'samples' (np.savez(path, samples=x)) or store only one array")


def read_sample_labels(path: str | Path, n: int, num_classes: int) -> torch.Tensor | None:
    """The optional ``labels`` array of an .npz of n samples: integers in [0, num_classes), one per sample."""
    path = Path(path)
    if path.suffix == ".npy":
        return None
    with np.load(path, allow_pickle=False) as f:
        if "labels" not in f.keys() or "samples" not in f.keys():
            return None
        y = f["labels"]
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise ConfigError(f"--samples '{path}': 'labels' must be {n} integers (one class per sample), got "
                          f"dtype {y.dtype}, shape {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"--samples '{path}': 'labels' span [{y.min()}, {y.max()}], outside the "
                          f"{num_classes} classes [0, {num_classes - 1}] of this data")
    return torch.from_numpy(y.astype(np.int64))


def to_data_space(x: np.ndarray, kind: str, shape: tuple[int, ...], value_range: str = "auto",
                  name: str = "--samples") -> tuple[torch.Tensor, str]:
    """Check shape, finiteness and range; return float32 data-space samples and the range they were read as."""
    if x.dtype.kind not in "fiu" or x.dtype.kind == "c":
        raise ConfigError(f"{name}: samples of dtype {x.dtype} are not numbers")
    if kind == "vector":
        if x.ndim != 2 or tuple(x.shape[1:]) != tuple(shape):
            raise ConfigError(f"{name}: vector samples must have shape (n, {shape[0]}) for this data, got {x.shape}")
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not torch.isfinite(t).all():
            raise ConfigError(f"{name}: {int((~torch.isfinite(t)).sum())} values are NaN or infinite")
        return t, "data units"
    c, h, w = shape
    if x.ndim == 4 and x.shape[1:] != (c, h, w) and x.shape[1:] == (h, w, c):
        x = x.transpose(0, 3, 1, 2)  # channels-last (n, H, W, C), the layout most codebases save
    if x.ndim != 4 or x.shape[1:] != (c, h, w):
        raise ConfigError(f"{name}: image samples must have shape (n, {c}, {h}, {w}) or (n, {h}, {w}, {c}) for this "
                          f"data, got {x.shape} (a padded reference needs data.pad_to in the --config file)")
    if x.dtype.kind in "iu":
        if x.min() < 0 or x.max() > 255:
            raise ConfigError(f"{name}: integer samples must lie in [0, 255], got [{x.min()}, {x.max()}]")
        return torch.from_numpy(x.astype(np.float32) / 255), "uint8 [0, 255]"
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name}: {int((~torch.isfinite(t)).sum())} values are NaN or infinite")
    lo, hi = float(t.min()), float(t.max())
    if value_range not in RANGES:
        raise ConfigError(f"--range '{value_range}' is not valid. Choose one of: {', '.join(RANGES)}")
    if value_range == "auto":
        value_range = "11" if lo < 0 else "01"
    a, b = (0.0, 1.0) if value_range == "01" else (-1.0, 1.0)
    if lo < a - RANGE_TOLERANCE or hi > b + RANGE_TOLERANCE:
        raise ConfigError(f"{name}: image values span [{lo:.4g}, {hi:.4g}], outside [{a:g}, {b:g}]: give images in "
                          f"[0, 1] or [-1, 1] (clip them as a sampler does) or uint8 in [0, 255]")
    if value_range == "11":
        t = (t + 1) / 2
    return t.clamp(0, 1), f"[{a:g}, {b:g}]"


def evaluate_samples(path: str | Path, cfg, *, value_range: str = "auto", out: str | Path | None = None) -> dict:
    """Metrics of a file's samples against cfg's reference (cfg.data, cfg.eval); write and return the report."""
    from cmkit import __version__
    from cmkit.evaluation import CLASS_MATCH, Evaluator, _mark_diverged, json_safe

    evaluator = Evaluator(cfg)
    shape = tuple(evaluator.ref_shape)
    x, read_as = to_data_space(read_sample_array(path), evaluator.kind, shape, value_range)
    if len(x) <= evaluator.k:
        raise ConfigError(f"--samples holds {len(x)} samples: precision/recall with k={evaluator.k} needs more")
    labels = None
    if evaluator.probabilities is not None:
        labels = read_sample_labels(path, len(x), evaluator.probabilities.num_classes)
    row = evaluator.metrics(x, labels)
    protocol = {**evaluator.protocol, "n_generated": int(len(x)), "samples_file": str(path),
                "samples_sha256": file_sha256(path), "samples_range": read_as, "cmkit_version": __version__}
    if labels is not None:
        protocol["class_match"] = CLASS_MATCH + " (the file's 'labels')"
        if "class_match" not in protocol["metrics"]:
            protocol["metrics"] = [*protocol["metrics"], "class_match"]
    report = json_safe({"protocol": protocol, "samples": _mark_diverged(row)})
    target = Path(out) if out is not None else Path(path).with_name(Path(path).stem + "_metrics.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report
