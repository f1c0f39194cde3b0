"""iLCT Table 2a ladder on the latents of bundled MNIST, at a small stated CPU budget.

Rungs (each adds one technique to the previous): iCT baseline (Pseudo-Huber, fixed c, GroupNorm) →
Cauchy (Eq. 6) → + diffusion loss (Eq. 9, r = 0.25) → + OT coupling (Sec. 4.4) → + adaptive c
(Eq. 11) → + NsLN (Eq. 12). Every rung trains from the same seed on the same cached latents of a
cmkit KL autoencoder; FD is measured at 1 step after decoding, in the committed MNIST classifier's
feature space, against the test split (cmkit.evaluation). Also prints the Fig. 1 outlier statistics
of the pixel and latent data.

    .venv/bin/python benchmarks/ilct_ladder.py --ae-steps 400 --steps 600 --batch 64 --n-eval 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RUNGS = [
    ("iCT (Pseudo-Huber)", ["method.name=ict"]),
    ("Cauchy", ["method.name=ict", "method.distance=cauchy"]),
    ("+ diffusion loss", ["method.name=ict", "method.distance=cauchy", "method.diffusion_weight=1.0"]),
    ("+ OT", ["method.name=ict", "method.distance=cauchy", "method.diffusion_weight=1.0", "method.coupling=ot"]),
    ("+ adaptive c", ["method.name=ilct", "net.norm=group"]),
    ("+ NsLN (iLCT)", ["method.name=ilct", "net.norm=nsln"]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_ilct")
    p.add_argument("--ae-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rungs", type=int, nargs="*", default=None, help="indices of the rungs to run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from cmkit.config import load_config
    from cmkit.data import load_dataset
    from cmkit.evaluation import evaluate_run
    from cmkit.latent.autoencoder import AEConfig, save_autoencoder, train_autoencoder
    from cmkit.latent.stats import format_stats, outlier_stats
    from cmkit.train import train

    # 1. The autoencoder (reused when it exists).
    ae_dir = out / "ae"
    data_over = ["data.name=mnist", "data.pad_to=32"]
    if not (ae_dir / "cmkit_ae.json").is_file():
        pixels = load_dataset(load_config(None, data_over).data)
        model, info = train_autoencoder(pixels.x, AEConfig(in_channels=1, latent_channels=4, channels=16, levels=2),
                                        steps=args.ae_steps, batch_size=64, lr=2e-3, log_every=100)
        save_autoencoder(model, ae_dir, info)
    ae_info = json.loads((ae_dir / "cmkit_ae.json").read_text())
    print(f"autoencoder: reconstruction MSE {ae_info['reconstruction_mse']:.4f} ([-1, 1] units), "
          f"{ae_info['steps']} steps, {ae_info['train_seconds']} s")

    # 2. Fig. 1 statistics of pixel and latent data.
    pixel = load_dataset(load_config(None, data_over).data)
    latent = load_dataset(load_config(None, [*data_over, f"data.vae={ae_dir}", f"data.cache_dir={out}/cache"]).data)
    stats = {"pixel": outlier_stats(pixel.x), "latent": outlier_stats(latent.x)}
    for k, s in stats.items():
        print(format_stats(k, s))

    # 3. The ladder.
    base = ["--", "configs/ict_latent_mnist.yaml"]
    results = {}
    for idx, (name, over) in enumerate(RUNGS):
        if args.rungs is not None and idx not in args.rungs:
            continue
        run_dir = out / f"rung{idx}"
        cfg = load_config(base[1], [
            *over, f"data.vae={ae_dir}", f"data.cache_dir={out}/cache", f"net.channels={args.channels}",
            "net.num_blocks=1", "net.attn_resolutions=[]", "net.dropout=0.0", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", f"train.threads={args.threads}", "train.ema=[0.99]", "train.device=cpu",
            f"run.dir={run_dir}", "run.progress=false", "run.tensorboard=false", "run.sample_n=64",
            "run.sample_steps=[1]", f"run.log_every={max(args.steps // 5, 1)}", "run.checkpoint_every=0",
            f"eval.n={args.n_eval}", "eval.steps=[1]",
        ])
        start = time.perf_counter()
        train(cfg, force=True)
        seconds = time.perf_counter() - start
        report = evaluate_run(run_dir, steps=[1], n=args.n_eval)
        row = report["steps"]["1"]
        results[name] = {"fd_1step": row["fd"], "precision": row["precision"], "recall": row["recall"],
                         "train_seconds": round(seconds, 1), "overrides": over}
        print(f"{name:22s} FD(1 step) {row['fd']:8.2f}  precision {row['precision']:.3f}  "
              f"recall {row['recall']:.3f}  ({seconds:.0f} s)", flush=True)

    summary = {"budget": vars(args), "autoencoder": {k: ae_info[k] for k in ("reconstruction_mse", "steps")},
               "stats": stats, "ladder": results,
               "features": report["protocol"].get("features") if results else None}
    (out / "ladder.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"written {out / 'ladder.json'}")


if __name__ == "__main__":
    main()
