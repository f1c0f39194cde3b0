"""Why a digit run's samples are not `confident`: background speckle or shape?

    PYTHONPATH=. python benchmarks/confidence_breakdown.py RUN [--n 1000] [--steps 1 2] [--guidance W]

For the run's EMA samples (``cmkit eval``'s seed) and for the real test images of the same data config it prints
the `confident` share (the committed classifier's max softmax >= 0.9, as in metrics.json), the median max softmax,
the predicted-class histogram, and the share again after zeroing the background (pixels below 0.1 / 0.2 / 0.3)
and after binarising at 0.5; for a class-conditional run, per drawn label the `confident` share and the share
read as that label. If cleaning the background does not raise the share, the unconfident samples are
ill-formed digits, not noisy ones.

It then probes what the two figures reward, on real images alone (no model): the `confident` share of the real
test images after a Gaussian blur, additive noise or a contrast cut (a brittle classifier is sure of some noise),
and the FD / precision / recall of a collapsed set, one training image per class repeated to n (an FD that such a
set scores well on is read together with recall).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch

from cmkit.augment import gaussian_blur
from cmkit.data import load_dataset
from cmkit.evaluation import Evaluator
from cmkit.evaluation.features import (CLASSIFIERS, base_name, classifier_confidence, classifier_probabilities,
                                     reference_dataset)
from cmkit.run import load

BLURS = (0.5, 0.7, 1.0)  # Gaussian blur σ in pixels
NOISES = (0.05, 0.1, 0.2)  # additive N(0, s²) in [0, 1] pixel units, clamped to [0, 1]
CONTRASTS = (0.8, 0.9)  # x -> c·x


def breakdown(x: torch.Tensor, probabilities, confidence, labels: torch.Tensor | None = None) -> dict:
    """The figures of images x in [0, 1]: confident share, median max softmax, class histogram, cleaned shares.

    ``probabilities`` / ``confidence``: cmkit.evaluation.features.classifier_probabilities / classifier_confidence.
    ``labels``: the classes x was drawn for (a class-conditional run); adds ``by_label``, per drawn class the
    `confident` share and the share the classifier reads as that class.
    """
    p = probabilities(x)
    cleaned = {f"background < {t} zeroed": torch.where(x < t, torch.zeros_like(x), x) for t in (0.1, 0.2, 0.3)}
    cleaned["binarised at 0.5"] = (x > 0.5).float()
    out = {"confident": confidence(x), "median_max_softmax": float(p.max(dim=1).values.median()),
           "classes": np.bincount(p.argmax(dim=1).numpy(), minlength=p.shape[1]).tolist(),
           "cleaned": {name: confidence(y) for name, y in cleaned.items()}}
    if labels is not None:
        sure, read = p.max(dim=1).values >= 0.9, p.argmax(dim=1) == labels
        out["by_label"] = {int(k): {"confident": float(sure[labels == k].double().mean()),
                                    "read_as_drawn": float(read[labels == k].double().mean())}
                           for k in torch.unique(labels)}
    return out


def report(label: str, x: torch.Tensor, probabilities, confidence, labels: torch.Tensor | None = None) -> dict:
    """Print the breakdown of x as one line, one line per cleaned variant and one by drawn label; return it."""
    b = breakdown(x, probabilities, confidence, labels)
    print(f"{label}: confident {b['confident']:.3f}, median max softmax {b['median_max_softmax']:.3f}, "
          f"predicted classes {b['classes']}")
    if "by_label" in b:
        print("    by drawn label (confident / read as drawn): "
              + ", ".join(f"{k} {v['confident']:.2f} / {v['read_as_drawn']:.2f}" for k, v in b["by_label"].items()))
    for name, value in b["cleaned"].items():
        print(f"    {name}: confident {value:.3f}")
    return b


def perturbed(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real images x in [0, 1] under each probe perturbation, by name."""
    g = torch.Generator().manual_seed(seed)
    out = {f"blur sigma {s}": gaussian_blur(x, s) for s in BLURS}
    out |= {f"noise std {s}": (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1) for s in NOISES}
    out |= {f"contrast x{c}": c * x for c in CONTRASTS}
    return out


def collapsed(data_cfg, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], labels 0, 1, ..., 9, 0, ...): the first training image of each class, repeated to n."""
    train = load_dataset(replace(data_cfg, split="train", labels=True))
    first = torch.tensor([int(torch.nonzero(train.labels == k)[0]) for k in range(train.num_classes)])
    labels = torch.arange(n) % train.num_classes
    return train.to_data_space(train.x[first[labels]]), labels


def probes(run, x: torch.Tensor, n: int, confidence) -> dict:
    """The `confident` share of the real reference images x (in [0, 1]) perturbed, and the metrics of a collapsed
    set (see above)."""
    out = {"perturbed": {name: confidence(y) for name, y in perturbed(x, run.cfg.eval.seed).items()}}
    for name, value in out["perturbed"].items():
        print(f"real {run.cfg.eval.reference} images, {name}: confident {value:.3f}")
    images, labels = collapsed(run.cfg.data, n)
    row = Evaluator(run.cfg).metrics(images, labels)
    out["collapsed"] = row
    print(f"collapsed set (one training image per class, repeated to n={n}): "
          + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return out


def main(argv: list[str] | None = None) -> dict:
    """Print the breakdown of the real reference images and of the run's samples; return {label: breakdown}."""
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (default: the run's method.guidance)")
    p.add_argument("--no-probes", action="store_true", help="skip the real-image probes")
    args = p.parse_args(argv)
    run = load(args.run, None, device="cpu")
    name = base_name(run.cfg.data.name)
    if name not in CLASSIFIERS:
        print(f"data.name={run.cfg.data.name}: no committed classifier; this benchmark needs a run on "
              f"{' or '.join(sorted(CLASSIFIERS))}", file=sys.stderr)
        raise SystemExit(2)
    probabilities, _ = classifier_probabilities(name)
    confidence, _ = classifier_confidence(name)
    ref = reference_dataset(run.cfg.data, run.cfg.eval.reference)
    real = ref.to_data_space(ref.x)
    out = {"real": report(f"real {run.cfg.eval.reference} images (n={len(real)})", real, probabilities, confidence)}
    labels = run.sample_labels(args.n)
    for steps in args.steps:
        x = run.sample(args.n, steps, seed=run.cfg.eval.seed, ema=True, guidance=args.guidance)
        out[str(steps)] = report(f"{steps}-step samples (n={args.n}, nimg {run.nimg})", x, probabilities, confidence,
                                 labels)
    if not args.no_probes:
        out["probes"] = probes(run, real, args.n, confidence)
    return out


if __name__ == "__main__":
    main()
