"""Choose an EMA after training: one run that tracks several EMAs and stores power-function snapshots, then
one-step quality of each tracked EMA, of the raw student and of post-hoc reconstructions at several σ_rel.

    PYTHONPATH=. python benchmarks/ema_posthoc.py configs/ict_toy.yaml --out runs/ema_ict_toy \
        --sigma-rel 0.01 0.02 0.05 0.1 0.2 [key=value ...]

The run gets train.ema_std=[0.05,0.1] and train.ema_snapshot_every=steps/20 unless the overrides set them.
Scores: `cmkit eval`'s protocol (--n samples, one and two steps); SWD for vectors, FD (and the classifier
confidence) for MNIST/digits.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from cmkit.config import load_config
from cmkit.ema import write_reconstruction
from cmkit.evaluation import Evaluator
from cmkit.run import load
from cmkit.train import train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--sigma-rel", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = load_config(args.config, [o for o in args.overrides if not o.startswith("train.ema_snapshot_every=")])
    extra = []
    if not any(o.startswith("train.ema_std=") for o in args.overrides):
        extra.append("train.ema_std=[0.05,0.1]")
    if not any(o.startswith("train.ema_snapshot_every=") for o in args.overrides):
        extra.append(f"train.ema_snapshot_every={max(base.train.steps // 20, 1)}")
    cfg = load_config(args.config, args.overrides + extra + [f"run.dir={args.out}", "run.progress=false",
                                                            "run.tensorboard=false"])
    start = time.perf_counter()
    if not args.skip_train:
        train(cfg, force=True)
    print(json.dumps({"train_sec": round(time.perf_counter() - start, 1), "overrides": args.overrides + extra}),
          flush=True)
    run = load(args.out)
    ev = Evaluator(replace(run.cfg, eval=replace(run.cfg.eval, n=args.n)))
    key = "swd" if ev.low_dim else "fd"

    def score(r, name, model_fn):
        res = ev.evaluate(model_fn, r.model(True), args.steps, args.n)
        row = {"weights": name, **{f"{m}_{k}step": res[str(k)][m] for k in args.steps
                                   for m in (key, "confident") if m in res[str(k)]}}
        print(json.dumps(row), flush=True)

    score(run, "student (no EMA)", lambda s, m, sd: run.sample(m, s, seed=sd, ema=False))
    for i, label in enumerate(run.ema.labels):
        score(run, f"tracked: {label}", lambda s, m, sd, i=i: run.sample(m, s, seed=sd, ema_index=i))
    for sigma in args.sigma_rel:
        path, _ = write_reconstruction(Path(args.out), sigma)
        r = load(args.out, checkpoint=path)
        score(r, f"post-hoc sigma_rel={sigma:g}", lambda s, m, sd, r=r: r.sample(m, s, seed=sd))


if __name__ == "__main__":
    main()
