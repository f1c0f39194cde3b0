"""Benchmark (issue 5): sCT learning comparisons against the TrigFlow diffusion model (sCM, 004_...).

Runs, all with the same U-Net, seed, batch and number of steps (so the same images, noise and times):

* ``trigflow``   TrigFlow diffusion (configs/trigflow_mnist.yaml), evaluated with the Heun ODE sampler
                 at several NFE (``--steps K`` of a trigflow run is its NFE, cmkit/objectives/trigflow.py);
* ``sct``        sCT with the paper's stabilisers: tangent normalisation + adaptive weighting
                 (configs/sct_mnist.yaml);
* ``sct_nonorm`` the same with method.tangent_norm=none (Fig. 5a: the paper reports spikes/divergence);
* ``sct_noaw``   the same with method.adaptive_weighting=false (Fig. 5b);
* ``ct_N``       optional (``--discrete N``): discrete-time CT in TrigFlow, method.name=ct_trigflow
                 method.discrete_steps=N (Fig. 5c).

Every step is logged (run.log_every=1), and the per-step loss and gradient norm are summarised:
spikes are steps whose value exceeds ``--spike-x`` times the median of the previous ``--window``
steps; non-finite steps are skipped by the trainer and counted; a run that stops with a
DivergenceError (train.max_bad_steps consecutive non-finite steps) is recorded as diverged.
FD is in the committed digit classifier's feature space (eval.features=auto, docs/evaluation.md),
against the test split; the "data" row scores the training split itself against the same reference.

    python benchmarks/scm_learning.py --data digits --steps 1500 --batch 64 --n 1000 --out /tmp/bench_scm

A run directory with a summary.json is not retrained (re-running the command resumes the benchmark);
an interrupted run stops the script (re-run to resume it). The results in docs/results.md ("sCM
learning comparisons") came from two invocations into one --out: ``--steps 2000 --runs trigflow``
(its 96k-image checkpoint also evaluated with cmkit.evaluation.evaluate_run(checkpoint=...)), then
``--steps 1500 --runs sct sct_nonorm sct_noaw``; the --discrete runs were not made.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from cmkit.config import load_config
from cmkit.train import DivergenceError, train

DIGITS_NET = ["data.name=digits", "net.channel_mult=[1,2]", "net.attn_resolutions=[4]"]

SCT_VARIANTS = {
    "sct": [],
    "sct_nonorm": ["method.tangent_norm=none"],
    "sct_noaw": ["method.adaptive_weighting=false"],
    # issue 15: the norm of tangent normalisation, per-sample L2 over all D dimensions vs per-element RMS
    "sct_l2": ["method.tangent_norm_kind=l2"],
    "sct_rms": ["method.tangent_norm_kind=rms"],
}


def curve_stats(log_path: Path, window: int, factor: float) -> dict:
    """Spike counts and ranges of the per-step loss and gradient norm of one run's log.jsonl."""
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    out: dict = {"logged_steps": len(recs), "last_step": recs[-1]["step"] if recs else 0,
                 "skipped_steps": recs[-1].get("skipped_steps", 0) if recs else 0}
    for key in ("grad_norm", "loss", "mse"):
        vals = [r.get(key) for r in recs]
        if not vals or vals[0] is None:
            continue
        finite = [v for v in vals if v is not None and math.isfinite(v)]
        spikes = []
        for i in range(window, len(vals)):
            v = vals[i]
            prev = [u for u in vals[i - window:i] if u is not None and math.isfinite(u)]
            if not prev:
                continue
            med = statistics.median(prev)
            if v is None or not math.isfinite(v) or (med > 0 and v > factor * med):
                spikes.append(recs[i]["step"])
        tenth = max(len(finite) // 10, 1)
        out[key] = {
            "nonfinite": len(vals) - len(finite),
            "spikes": len(spikes),
            "spike_steps": spikes[:20],
            "max": max(finite) if finite else None,
            "median_first_10pct": statistics.median(finite[:tenth]) if finite else None,
            "median_last_10pct": statistics.median(finite[-tenth:]) if finite else None,
        }
    return out


def data_floor(cfg, n: int) -> dict:
    """FD etc. of real training images against the evaluation reference (the floor at this reference)."""
    from cmkit.data import load_dataset
    from cmkit.evaluation import Evaluator

    ev = Evaluator(cfg)
    ds = load_dataset(cfg.data)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds), generator=g)[: min(n, len(ds))]
    return {"n": len(idx), **ev.metrics(ds.to_data_space(ds.x[idx]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps of every run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="sCT lr (default: configs/sct_mnist.yaml's)")
    p.add_argument("--diffusion-lr", type=float, default=None, help="default: configs/trigflow_mnist.yaml's")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--tangent-warmup", type=int, default=None, help="H in steps (default: a tenth of --steps, as configs/sct_mnist.yaml)")
    p.add_argument("--runs", nargs="*", default=["trigflow", *SCT_VARIANTS], help="subset and order of runs")
    p.add_argument("--discrete", type=int, nargs="*", default=[], help="also ct_trigflow with these N")
    p.add_argument("--nfe", type=int, nargs="*", default=[2, 4, 8, 16, 32], help="diffusion NFE to evaluate")
    p.add_argument("--n", type=int, default=1000, help="generated samples per evaluation")
    p.add_argument("--spike-x", type=float, default=10.0)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_scm_learning")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-eval", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = DIGITS_NET if args.data == "digits" else []
    warm = args.tangent_warmup if args.tangent_warmup is not None else args.steps // 10
    common = [*data, f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.threads={args.threads}",
              f"train.seed={args.seed}", f"train.ema=[{args.ema}]", "run.progress=false", "run.tensorboard=false",
              "run.log_every=1", "run.sample_every=0", f"run.checkpoint_every={max(args.steps // 4, 1)}"]
    specs = {}
    for name in args.runs:
        if name == "trigflow":
            extra = [f"train.lr={args.diffusion_lr}"] if args.diffusion_lr else []
            specs[name] = ("configs/trigflow_mnist.yaml", [*common, *extra, "run.sample_steps=[8]"])
        else:
            extra = [f"train.lr={args.lr}"] if args.lr else []
            specs[name] = ("configs/sct_mnist.yaml", [*common, *extra, f"method.tangent_warmup={warm}",
                                                      *SCT_VARIANTS[name]])
    for n_disc in args.discrete:
        extra = [f"train.lr={args.lr}"] if args.lr else []
        specs[f"ct_{n_disc}"] = ("configs/sct_mnist.yaml", [*common, *extra, "method.name=ct_trigflow",
                                                             f"method.discrete_steps={n_disc}",
                                                             f"method.tangent_warmup={warm}"])

    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["args"] = vars(args)
    report.setdefault("runs", {})
    from cmkit.evaluation import evaluate_run, format_table

    for name, (config, overrides) in specs.items():
        run_dir = out / name
        cfg = load_config(config, [*overrides, f"run.dir={run_dir}"])
        entry = report["runs"].setdefault(name, {})
        entry.update(config=config, overrides=overrides, lr=cfg.train.lr, optimizer=cfg.train.optimizer,
                     betas=cfg.train.betas)
        if not (run_dir / "summary.json").exists():
            t0 = time.perf_counter()
            try:
                train(cfg)
                entry["diverged"] = None
            except DivergenceError as e:
                entry["diverged"] = str(e)
            entry["train_sec"] = time.perf_counter() - t0
            if entry["diverged"] is None and not (run_dir / "summary.json").exists():
                report_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
                raise SystemExit(f"{name} was interrupted (SIGINT/SIGTERM) before train.steps; re-run to resume")
        if (run_dir / "summary.json").exists():
            entry["summary"] = json.loads((run_dir / "summary.json").read_text())
        entry["curves"] = curve_stats(run_dir / "log.jsonl", args.window, args.spike_x)
        report_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(name, json.dumps({k: entry.get(k) for k in ("train_sec", "diverged")}), flush=True)
        if args.skip_eval or entry.get("diverged") or "summary" not in entry or "eval" in entry:
            continue
        steps = args.nfe if name == "trigflow" else [1, 2]
        t0 = time.perf_counter()
        entry["eval"] = evaluate_run(out / name, steps=steps, n=args.n)
        entry["eval_sec"] = time.perf_counter() - t0
        report_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(f"{name} ({'Heun ODE; steps = NFE' if name == 'trigflow' else 'consistency steps'})\n"
              + format_table(entry["eval"]), flush=True)
    if specs and not args.skip_eval:
        name = next(iter(specs))
        cfg = load_config(specs[name][0], [*specs[name][1], f"run.dir={out / name}"])
        report["data_floor"] = data_floor(cfg, args.n)
        report_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
        print("data (train split vs reference):", json.dumps(report["data_floor"], default=float))


if __name__ == "__main__":
    main()
