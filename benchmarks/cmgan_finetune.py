"""CM-GAN fine-tuning at toy scale (000_6636be86a063c832.txt Fig. 2 / Sec. 5.2): a cmkit iCT model on
bundled 8x8 digits is fine-tuned with λ at several values (λ = 0 is the consistency loss alone at the
same extra images), then FD at 1 and 2 steps and the diversity statistic are compared with the
source model. CPU, tiny MLPs; numbers go into docs/results.md by hand.

Usage: python benchmarks/cmgan_finetune.py [--source-steps 1500] [--steps 400] [--lams 0 1e-3 1e-1 10]
       [--disc-lr 1e-3] [--disc-warmup 0] [--gan-noise uniform]

The discriminator starts from random weights (the paper's starts pretrained, Sec. 5.1), so it gets its own
learning rate (--disc-lr, method.disc_lr) and optionally a warm-up with λ = 0 (--disc-warmup images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cmkit.config import load_config
from cmkit.evaluation import Evaluator
from cmkit.objectives.cmgan import mean_pairwise_distance
from cmkit.run import load
from cmkit.train import train

NET = ["data.name=digits", "net.name=mlp", "net.hidden=256", "net.depth=3", "run.progress=false",
       "run.tensorboard=false", "run.sample_steps=[1]", "run.sample_n=16"]


def evaluate(run_dir: Path, evaluator: Evaluator, n: int, noise: torch.Tensor) -> dict:
    """FD (evaluator's features) at 1 and 2 steps of the run's sampling EMA, and its diversity on noise."""
    run = load(run_dir)
    out = {f"fd_{k}": evaluator.metrics(run.sample(n, k, seed=1))["fd"] for k in (1, 2)}
    model = run.model(ema=True)
    with torch.no_grad():
        sigma_max = model.process.sigma_max
        x = model(sigma_max * noise, torch.full((len(noise),), sigma_max))
    feats = evaluator.extractor(run.dataset.to_data_space(x))
    out["diversity"] = mean_pairwise_distance(feats)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-steps", type=int, default=1500, help="iCT steps of the source model (batch 128)")
    ap.add_argument("--steps", type=int, default=400, help="fine-tuning steps of every run")
    ap.add_argument("--batch", type=int, default=64, help="fine-tuning batch")
    ap.add_argument("--lams", type=float, nargs="+", default=[0.0, 1e-3, 1e-1, 10.0], help="λ values (Eq. 7)")
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tuning lr (the source uses 1e-3)")
    ap.add_argument("--disc-lr", type=float, default=1e-3, help="method.disc_lr (0 = the fine-tuning lr)")
    ap.add_argument("--disc-warmup", type=int, default=0, help="method.disc_warmup_nimg: images with λ = 0")
    ap.add_argument("--gan-noise", default="uniform", help="method.gan_noise: uniform (Eq. 8) | schedule")
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--out", default="runs/bench_cmgan")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    source = out / "source"
    t0 = time.perf_counter()
    # Source: iCT on digits, exp curriculum s0=10, s1=80 (ends at N = 81), EMA 0.999.
    src_cfg = load_config(None, [*NET, "method.name=ict", "method.s1=80", f"train.steps={args.source_steps}",
                                 "train.batch_size=128", "train.lr=1e-3", "train.ema=[0.999]", "run.log_every=100",
                                 f"train.threads={args.threads}", f"run.dir={source}"])
    if not (source / "summary.json").is_file():
        train(src_cfg, force=True)
    t_source = time.perf_counter() - t0
    evaluator = Evaluator(src_cfg)
    noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    path = out / "results.json"
    previous = json.loads(path.read_text())["results"] if path.is_file() else {}
    results = {"source": {**evaluate(source, evaluator, args.n_eval, noise), "sec": t_source}}
    print("source", results["source"], flush=True)
    blur_nimg = args.steps * args.batch // 2  # σ 10 -> 0 over the first half of the fine-tuning images
    for lam in args.lams:
        name = f"lam_{lam:g}"
        if name in previous:  # a re-run with more λ values keeps the finished ones
            results[name] = previous[name]
            continue
        cfg = load_config(None, [
            *NET, "method.name=cmgan", f"method.init_from={source}", "method.curriculum=const", "method.s1=80",
            f"method.gan_weight={lam}", "method.gan_loss=hinge", f"method.blur_nimg={blur_nimg}",
            f"method.disc_lr={args.disc_lr}", f"method.disc_warmup_nimg={args.disc_warmup}",
            f"method.gan_noise={args.gan_noise}",
            "method.diversity_every=50", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            "train.optimizer=radam", f"train.lr={args.lr}", "train.ema=[0.99,0.999]", "train.ema_sample=0",
            "run.log_every=50", f"train.threads={args.threads}", f"run.dir={out / name}"])
        t = time.perf_counter()
        train(cfg, force=True)
        row = evaluate(out / name, evaluator, args.n_eval, noise)
        row["sec"] = time.perf_counter() - t
        logs = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
        row["logged_diversity"] = [r["diversity"] for r in logs if "diversity" in r]
        row["d_loss_last"] = next((r["discriminator/d_loss"] for r in reversed(logs) if "discriminator/d_loss" in r), None)
        row["d_loss_curve"] = [r["discriminator/d_loss"] for r in logs if "discriminator/d_loss" in r]
        results[name] = row
        print(name, row, flush=True)
        path.write_text(json.dumps({"results": {**previous, **results}}, indent=2, default=float) + "\n")
    summary = {"protocol": {"features": evaluator.protocol["features"], "n_eval": args.n_eval,
                            "source_steps": args.source_steps, "steps": args.steps, "batch": args.batch,
                            "lr": args.lr, "blur_nimg": blur_nimg, "ema_sample": 0.99, "disc_lr": args.disc_lr,
                            "disc_warmup_nimg": args.disc_warmup, "gan_noise": args.gan_noise}, "results": {**previous, **results}}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print("| run | FD 1-step | FD 2-step | diversity | wall s |")
    for name, r in summary["results"].items():
        print(f"| {name} | {r['fd_1']:.3f} | {r['fd_2']:.3f} | {r['diversity']:.3f} | {r['sec']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
