"""Offline evaluation: FD, precision/recall (k-NN manifolds), SWD and MMD of a run's samples
against the reference split, at several sampling-step counts, with a protocol that states itself;
for MNIST and digits also the share of samples the committed classifier is confident about.
``evaluate_samples(file, cfg)`` applies the same protocol to any generator's samples.

``evaluate_run(run_dir, steps=[1, 2], n=1000)`` writes ``RUN/metrics.json``; the training loop calls
``evaluate_during_training`` every ``eval.every_nimg`` images (train.periodic_eval logs the result).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmkit.config import ConfigError
from cmkit.evaluation.classifier import CLASSIFIERS
from cmkit.evaluation.features import (
    CONFIDENCE_THRESHOLD, FEATURES, Extractor, base_name, build_extractor, class_match, classifier_probabilities,
    confident_share, reference_dataset, reference_features,
)
from cmkit.evaluation.metrics import (
    feature_statistics, frechet_distance, knn_radii, median_distance, mmd, precision_recall, sliced_wasserstein,
)
from cmkit.sampling import cycled_labels

__all__ = ["Evaluator", "evaluate_run", "evaluate_samples", "evaluate_during_training", "training_evaluator", "format_table", "FEATURES"]

SWD_PROJECTIONS = 256
CLASS_MATCH = "fraction of samples the committed classifier assigns to the class label they were generated for"
MAX_MMD_POINTS = 5000  # MMD is O(n²): larger sets use a seeded subset of this size


@contextmanager
def count_evaluations(model: torch.nn.Module):
    """Count the samples passing through model.forward; NFE per sample = count / n."""
    counter = {"samples": 0}

    def hook(module, args, output):
        counter["samples"] += int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 0

    handle = model.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def _subset(x: np.ndarray, m: int, seed: int) -> np.ndarray:
    if len(x) <= m:
        return x
    return x[np.random.default_rng(seed).permutation(len(x))[:m]]


class Evaluator:
    """The extractor and reference features of one data config, and the metrics of sample sets against them."""

    def __init__(self, cfg, *, features: str | None = None, k: int | None = None, seed: int | None = None,
                 autoencoder=None):
        """``autoencoder``: the run's loaded data.vae autoencoder (else loaded from cfg.data.vae for the protocol)."""
        ec = cfg.eval
        self.cfg = cfg
        self.k = ec.k if k is None else k
        self.seed = ec.seed if seed is None else seed
        ref = reference_dataset(cfg.data, ec.reference)
        self.kind = ref.kind
        self.ref_shape = ref.shape  # what a --samples file must match (cmkit.evaluation.samples)
        # ref.name, not cfg.data.name: a prepared copy of the bundled MNIST is named mnist (its classifier applies)
        self.extractor: Extractor = build_extractor(features or ec.features, ref.name, ref.kind,
                                                    ec.inception_weights)
        feats, cache = reference_features(ref, self.extractor, cfg.data.cache_dir, ec.n_ref, self.seed)
        if len(feats) <= self.k:
            raise ConfigError(f"the reference set (data.split={ec.reference}) has {len(feats)} samples; "
                              f"precision/recall with k={self.k} needs more than k. Use eval.reference=all")
        self.ref_feats = feats
        self.ref_mu, self.ref_sigma = feature_statistics(feats)
        self.ref_radii = knn_radii(feats, self.k)
        self.low_dim = self.extractor.name == "raw"
        self.bandwidth = median_distance(feats, seed=self.seed) if self.low_dim else None
        vae = getattr(cfg.data, "vae", "")
        if ref.kind != "image":
            space = "data units"
        elif vae:  # latent run: real pixels as reference, generated latents decoded to pixels
            space = "pixels in [0, 1]; generated latents decoded by the autoencoder (data.vae)"
        else:
            space = "pixels in [0, 1] (no autoencoder)"
        self.protocol = {
            "features": self.extractor.name,
            "features_weights_sha256": self.extractor.weights_sha256,
            "feature_dim": int(feats.shape[1]),
            "reference": {
                "data": cfg.data.name, "split": ec.reference, "n": int(len(feats)), "space": space,
                "data_sha256": cache["data_sha256"], "cache": cache["cache"],
            },
            "k": self.k,
            "seed": self.seed,
            "metrics": ["fd", "precision", "recall"] + (["swd", "mmd"] if self.low_dim else []),
        }
        if vae:
            if autoencoder is None:
                from cmkit.latent import load_autoencoder

                autoencoder = load_autoencoder(vae)
            # Samples of two latent runs are comparable only through the same decoder.
            self.protocol["autoencoder"] = {"path": vae, "type": type(autoencoder).__name__,
                                            "weights_sha256": autoencoder.identity()}
        if self.extractor.info:
            self.protocol["features_info"] = self.extractor.info
        self.probabilities = None  # bundled digit sets: the committed classifier's softmax, whatever the features
        # A class-conditional run on a bundled digit set is sampled for cycled_labels(n, K) (as run.sample and the
        # trainer do, K = its 10 digits = the classifier's classes); the classifier then also says how many
        # samples show the digit they were drawn for.
        self.num_classes = 0
        if ref.kind == "image" and base_name(cfg.data.name) in CLASSIFIERS:
            self.probabilities, sha = classifier_probabilities(base_name(cfg.data.name))
            self.protocol["confident"] = (f"fraction of samples whose committed {base_name(cfg.data.name)} classifier "
                                          f"gives max softmax >= {CONFIDENCE_THRESHOLD}")
            self.protocol["confidence_weights_sha256"] = sha
            self.protocol["metrics"].append("confident")
            if getattr(cfg.net, "class_cond", False):
                self.num_classes = self.probabilities.num_classes
                self.protocol["class_match"] = CLASS_MATCH + " (labels 0, 1, ..., K-1, 0, 1, ...)"
                self.protocol["metrics"].append("class_match")
        if self.low_dim:
            self.protocol["swd_projections"] = SWD_PROJECTIONS
            self.protocol["mmd_kernel"] = f"gaussian, bandwidth = median reference distance = {self.bandwidth:.6g}"

    def metrics(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics of data-space samples against the reference set.

        ``labels``: the class labels the samples were generated for (adds class_match where a classifier exists).
        """
        if labels is not None and len(labels) != len(samples):
            raise ConfigError(f"{len(labels)} class labels for {len(samples)} samples: give one label per sample")
        if not torch.isfinite(samples).all():
            return {"fd": math.inf, "precision": 0.0, "recall": 0.0, "nonfinite": 1.0}
        feats = self.extractor(samples).numpy()
        mu, sigma = feature_statistics(feats)
        out = {"fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)}
        out["precision"], out["recall"] = precision_recall(self.ref_feats, feats, self.k, real_radii=self.ref_radii)
        if self.probabilities is not None:
            p = self.probabilities(samples)
            out["confident"] = confident_share(p)
            if labels is not None:
                out["class_match"] = class_match(p, labels)
        if self.low_dim:
            out["swd"] = sliced_wasserstein(feats, self.ref_feats, SWD_PROJECTIONS, self.seed)
            out["mmd"] = mmd(_subset(feats, MAX_MMD_POINTS, self.seed), _subset(self.ref_feats, MAX_MMD_POINTS, self.seed),
                             self.bandwidth)
        return out

    def evaluate(self, sample: Callable[[int, int, int], torch.Tensor], model: torch.nn.Module,
                 steps: list[int], n: int) -> dict[str, dict]:
        """For each K in steps: draw n samples with ``sample(K, n, seed)``, time them, count NFE, score them."""
        if n <= self.k:
            raise ConfigError(f"--n {n} generated samples are too few for precision/recall with k={self.k}")
        results = {}
        for k_steps in steps:
            with count_evaluations(model) as counter:
                start = time.perf_counter()
                x = sample(k_steps, n, self.seed)
                seconds = time.perf_counter() - start
            row = self.metrics(x, cycled_labels(n, self.num_classes) if self.num_classes else None)
            row["nfe"] = counter["samples"] / n
            if float(row["nfe"]).is_integer():
                row["nfe"] = int(row["nfe"])
            row["sec_per_sample"] = seconds / n
            results[str(k_steps)] = row
        return results


def evaluate_samples(path, cfg, **kw) -> dict:
    """A file's samples (any generator) with cfg's protocol; see cmkit.evaluation.samples."""
    from cmkit.evaluation.samples import evaluate_samples as run

    return run(path, cfg, **kw)


def _check_steps(steps: list[int]) -> None:
    if not steps or any(s < 1 for s in steps):
        raise ConfigError(f"sampling steps must be positive integers, got {steps}")


def evaluate_run(run_dir: str | Path, steps: list[int] | None = None, n: int | None = None, *,
                 features: str | None = None, k: int | None = None, seed: int | None = None,
                 inception_weights: str | None = None, reference: str | None = None,
                 checkpoint: str | Path | None = None, device: str = "cpu", ema: bool = True,
                 batch_size: int = 256, out: str | Path | None = None, temperature: float = 1.0,
                 guidance: float | None = None) -> dict:
    """Evaluate a trained run's EMA weights at each step count; write and return metrics.json's content.

    Unset options come from the run's ``eval`` config section. ``temperature`` != 1 scales the starting noise
    (cmkit.sampling.sample_batched) and is recorded as protocol["noise_temperature"]; ``guidance`` is the CFG
    scale w (cmkit.run.Run.sample; default the run's own), recorded as protocol["guidance"] when there is one.
    """
    from dataclasses import replace

    from cmkit import __version__
    from cmkit.run import load

    run = load(run_dir, checkpoint, device=device)
    cfg = run.cfg
    overrides = {"features": features, "k": k, "seed": seed, "inception_weights": inception_weights,
                 "reference": reference, "n": n, "steps": steps}
    cfg.eval = replace(cfg.eval, **{key: v for key, v in overrides.items() if v is not None})
    _check_steps(cfg.eval.steps)
    evaluator = Evaluator(cfg, autoencoder=getattr(run.dataset, "autoencoder", None))
    model = run.model(ema)
    results = evaluator.evaluate(
        lambda s, m, sd: run.sample(m, s, seed=sd, ema=ema, batch_size=batch_size, temperature=temperature,
                                   guidance=guidance),
        model, cfg.eval.steps, cfg.eval.n)
    protocol = {**evaluator.protocol, "n_generated": cfg.eval.n, "sampler_steps": cfg.eval.steps,
                **({"noise_temperature": temperature} if temperature != 1.0 else {}),
                **({"guidance": w} if (w := run.guidance_scale(guidance)) is not None else {}),
                "weights": _weights_label(run, ema),
                "nimg": run.nimg, "method": cfg.method.name, "cmkit_version": __version__, "device": device}
    report = json_safe({"protocol": protocol, "steps": {key: _mark_diverged(row) for key, row in results.items()}})
    path = Path(out) if out is not None else Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")  # strict JSON: no Infinity/NaN
    return report


def _weights_label(run, ema: bool) -> str:
    if not ema:
        return "student (no EMA)"
    label = run.ema.labels[run.cfg.train.ema_sample]
    return label + (" (post-hoc reconstruction, cmkit ema-reconstruct)" if getattr(run, "posthoc", None) else "")


def _is_nonfinite(v) -> bool:
    return isinstance(v, (float, np.floating)) and not math.isfinite(float(v))


def _mark_diverged(row: dict) -> dict:
    """A row with a non-finite metric (non-finite samples, or FD of degenerate features) gets diverged: true."""
    return {**row, "diverged": True} if any(_is_nonfinite(v) for v in row.values()) else row


def json_safe(obj):
    """A copy that strict JSON can hold: numpy scalars to Python numbers, inf/NaN to None (null)."""
    if isinstance(obj, dict):
        return {key: json_safe(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def training_evaluator(trainer) -> Evaluator:
    """The Evaluator of eval.every_nimg, built once before step 1 (fails fast, e.g. on missing Inception weights)."""
    _check_steps(trainer.cfg.eval.steps)
    return Evaluator(trainer.cfg, autoencoder=getattr(trainer.dataset, "autoencoder", None))


def evaluate_during_training(trainer, evaluator: Evaluator) -> dict[str, float]:
    """Metrics of the trainer's EMA model per eval.steps, flattened as {"fd_1step": ..., ...} for the log."""
    ec = trainer.cfg.eval
    model = trainer.ema.modules[trainer.cfg.train.ema_sample]
    results = evaluator.evaluate(lambda s, m, sd: trainer.samples(s, m, sd), model, ec.steps, ec.n)
    return {f"{name}_{k}step": float(v) for k, row in results.items() for name, v in row.items()
            if name not in ("nfe",)}


def format_table(report: dict) -> str:
    """The metrics of a report as a plain-text table, one row per step count."""
    rows = report["steps"] if "steps" in report else {"file": report["samples"]}
    names = []
    for row in rows.values():
        names += [k for k in row if k not in names]
    header = ["steps"] + names
    lines = [header] + [[k] + [_fmt(row.get(name)) for name in names] for k, row in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"
