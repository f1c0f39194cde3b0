"""ACT's central claim at toy scale: CT at batch B, CT at B/6 and ACT at B/6, at equal images seen.

Eight Gaussians (bundled 2-D data), tiny MLPs, CPU. Prints sliced-Wasserstein distances (SWD) of 1-
and 2-step samples to held-out data and ACT's gradient-penalty curve; numbers go into
docs/results.md by hand. Usage: python benchmarks/act_batch.py [--nimg 96000] [--batch 192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cmkit.config import load_config
from cmkit.data import load_dataset
from cmkit.run import load
from cmkit.train import train


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """SWD-1 between equal-size point sets (same estimator as tests/conftest.py)."""
    g = torch.Generator().manual_seed(seed)
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    return (torch.sort(a @ dirs, 0)[0] - torch.sort(b @ dirs, 0)[0]).abs().mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nimg", type=int, default=96_000, help="images seen by every run")
    ap.add_argument("--batch", type=int, default=192, help="B; the small runs use B/6")
    ap.add_argument("--out", default="runs/bench_act")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    small = args.batch // 6
    common = ["net.hidden=64", "net.depth=2", "train.lr=2e-3", "train.ema=[0.99]", "run.progress=false",
              "run.tensorboard=false", "run.sample_steps=[1]", "run.log_every=100", f"train.threads={args.threads}",
              "data.split=train"]
    runs = {
        f"ct_b{args.batch}": ("configs/ct_toy.yaml", args.batch, []),
        f"ct_b{small}": ("configs/ct_toy.yaml", small, []),
        f"act_b{small}": ("configs/act_toy.yaml", small, ["method.gp_interval=4"]),
    }
    test = load_dataset(load_config("configs/ct_toy.yaml", ["data.split=test"]).data).x
    results = {}
    for name, (config, batch, extra) in runs.items():
        steps = args.nimg // batch
        cfg = load_config(config, [*common, *extra, f"train.batch_size={batch}", f"train.steps={steps}",
                                   f"run.dir={args.out}/{name}"])
        t0 = time.perf_counter()
        train(cfg, force=True)
        run = load(cfg.run.dir)
        n = min(len(test), 2000)
        swd = {k: sliced_wasserstein(run.sample(n, k, data_space=False, seed=1), test[:n]) for k in (1, 2)}
        logs = [json.loads(line) for line in (Path(cfg.run.dir) / "log.jsonl").read_text().splitlines()]
        gp = [(r["step"], r["discriminator/gp_last"]) for r in logs if "discriminator/gp_last" in r]
        results[name] = {"batch": batch, "steps": steps, "swd_1step": swd[1], "swd_2step": swd[2],
                         "wall_s": time.perf_counter() - t0, "gp_curve": gp}
        print(json.dumps({name: results[name]}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
