"""Why a digit run's samples are not `confident`: background speckle or shape?

    PYTHONPATH=. python benchmarks/confidence_breakdown.py RUN [--n 1000] [--steps 1 2]

For the run's EMA samples (``cmkit eval``'s seed) and for the real test images of the same data config it prints
the `confident` share (the committed classifier's max softmax >= 0.9, as in metrics.json), the median max softmax,
the predicted-class histogram, and the share again after zeroing the background (pixels below 0.1 / 0.2 / 0.3)
and after binarising at 0.5. If cleaning the background does not raise the share, the unconfident samples are
ill-formed digits, not noisy ones.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from cmkit.evaluation.features import (CLASSIFIERS, base_name, classifier_confidence, classifier_probabilities,
                                     reference_dataset)
from cmkit.run import load


def breakdown(x: torch.Tensor, probabilities, confidence) -> dict:
    """The figures of images x in [0, 1]: confident share, median max softmax, class histogram, cleaned shares.

    ``probabilities`` / ``confidence``: cmkit.evaluation.features.classifier_probabilities / classifier_confidence.
    """
    p = probabilities(x)
    cleaned = {f"background < {t} zeroed": torch.where(x < t, torch.zeros_like(x), x) for t in (0.1, 0.2, 0.3)}
    cleaned["binarised at 0.5"] = (x > 0.5).float()
    return {"confident": confidence(x), "median_max_softmax": float(p.max(dim=1).values.median()),
            "classes": np.bincount(p.argmax(dim=1).numpy(), minlength=p.shape[1]).tolist(),
            "cleaned": {name: confidence(y) for name, y in cleaned.items()}}


def report(label: str, x: torch.Tensor, probabilities, confidence) -> dict:
    """Print the breakdown of x as one line and one line per cleaned variant; return it."""
    b = breakdown(x, probabilities, confidence)
    print(f"{label}: confident {b['confident']:.3f}, median max softmax {b['median_max_softmax']:.3f}, "
          f"predicted classes {b['classes']}")
    for name, value in b["cleaned"].items():
        print(f"    {name}: confident {value:.3f}")
    return b


def main(argv: list[str] | None = None) -> dict:
    """Print the breakdown of the real reference images and of the run's samples; return {label: breakdown}."""
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2])
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
    out = {"real": report(f"real {run.cfg.eval.reference} images (n={len(ref.x)})", ref.to_data_space(ref.x),
                          probabilities, confidence)}
    for steps in args.steps:
        x = run.sample(args.n, steps, seed=run.cfg.eval.seed, ema=True)
        out[str(steps)] = report(f"{steps}-step samples (n={args.n}, nimg {run.nimg})", x, probabilities, confidence)
    return out


if __name__ == "__main__":
    main()
