"""Toy presets at their defaults: one-step SWD of the trained EMA model against the untrained one (issue 20).

    PYTHONPATH=. python benchmarks/toy_presets.py [--presets ict_toy ct_toy ...] [--out DIR] [key=value ...]

For each preset: the same config with train.steps=0 (the EMA equals the initial weights) and at its default
steps, each scored by `cmkit eval`'s protocol (SWD on the test split, --n 2000 samples, one step). The extra
key=value overrides apply to every preset (e.g. train.ema_warmup=false to measure without the warm-up).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cmkit.config import load_config
from cmkit.evaluation import evaluate_run
from cmkit.train import train

PRESETS = ["ict_toy", "ct_toy", "act_toy", "sct_toy"]


def score(preset: str, run_dir: Path, overrides: list[str], n: int) -> tuple[float, float]:
    cfg = load_config(f"configs/{preset}.yaml", overrides + [f"run.dir={run_dir}", "run.progress=false",
                                                           "run.tensorboard=false"])
    start = time.perf_counter()
    train(cfg, force=True)
    seconds = time.perf_counter() - start
    report = evaluate_run(run_dir, steps=[1, 2], n=n, out=run_dir / "metrics.json")
    return report["steps"], seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--out", default="runs/toy_presets")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rows = []
    for preset in args.presets:
        untrained, _ = score(preset, Path(args.out) / f"{preset}_untrained", args.overrides + ["train.steps=0"], args.n)
        trained, sec = score(preset, Path(args.out) / preset, args.overrides, args.n)
        row = {"preset": preset, "overrides": args.overrides, "train_sec": round(sec, 1),
               "swd_untrained_1step": untrained["1"]["swd"], "swd_1step": trained["1"]["swd"],
               "swd_2step": trained["2"]["swd"], "ratio_1step": untrained["1"]["swd"] / trained["1"]["swd"]}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
