"""The two-step sampler's intermediate noise level σ_mid (``method.mid_sigmas``), chosen per dataset as in iCT App. B.

iCT samples two steps at times [σ_max, σ_mid] and picks σ_mid per dataset by a search on FID (0.821 on
CIFAR-10, 1.526 on ImageNet 64). This scores trained consistency runs at each σ_mid of a grid with `cmkit
eval`'s protocol (the run's EMA, guidance and seed; class-conditional runs sampled for the cycled labels), so
the value a config ships is the one its own models prefer:

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/mid_sigma.py RUN [RUN ...] [--mids 0.821 1.2 1.6 2 2.5]
        [--n 1000] [--json OUT.json]

It prints one row per σ_mid: FD / confident of each run, then the means of FD, confident and recall.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

from cmkit.evaluation import Evaluator
from cmkit.run import load

MIDS = (0.821, 1.2, 1.6, 2.0, 2.5, 3.0, 4.0, 6.0)


def score_run(run_dir: str, mids: list[float], n: int) -> dict[float, dict[str, float]]:
    """``cmkit eval``'s two-step metrics of one run at each σ_mid (one sample set per σ_mid, the eval seed)."""
    run = load(run_dir)
    ev = Evaluator(replace(run.cfg, eval=replace(run.cfg.eval, n=n)))
    labels = run.sample_labels(n)
    t_max = run.objective.sample_times(1)[0]
    out = {}
    for mid in mids:
        x = run.sample(n, times=[t_max, mid], seed=ev.seed, class_labels=labels)
        out[mid] = ev.metrics(x, labels)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--mids", type=float, nargs="+", default=list(MIDS))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--json", default=None, help="write every score here")
    args = p.parse_args()
    scores = {r: score_run(r, args.mids, args.n) for r in args.runs}
    header = " | ".join(f"{r}: FD / confident" for r in args.runs)
    print(f"| σ_mid | {header} | mean FD | mean confident | mean recall |")
    print("| --- " * (len(args.runs) + 4) + "|")
    for mid in args.mids:
        rows = [scores[r][mid] for r in args.runs]
        cells = [f"{m['fd']:.2f} / {m.get('confident', float('nan')):.3f}" for m in rows]
        means = [statistics.mean(m[k] for m in rows) if all(k in m for m in rows) else float("nan")
                 for k in ("fd", "confident", "recall")]
        print(f"| {mid:g} | " + " | ".join(cells) + f" | {means[0]:.3f} | {means[1]:.3f} | {means[2]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({r: {str(k): v for k, v in s.items()} for r, s in scores.items()}, f, indent=1)


if __name__ == "__main__":
    main()
