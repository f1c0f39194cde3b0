"""iCT Table 1 ladder on bundled MNIST, at a small stated CPU budget (issue 20).

Rungs (each adds one iCT change, 003_6d8662bce74608b9.txt Table 1, to the rung above):
CT of Song et al. 2023 (method.name=ct: EMA teacher μ0 = 0.9, squared ℓ2 — Table 1's CT uses LPIPS, which
iCT drops; cmkit ships no LPIPS weights — sqrt curriculum s0 = 2, s1 = 150, uniform i, λ = 1, independent
dropout masks) → no teacher EMA (μ = 0, Sec. 3.2) → Pseudo-Huber, c = 0.00054·sqrt(d) (Sec. 3.3) → lognormal
noise schedule (Eq. 10) → λ = 1/(σ_{i+1} − σ_i) (Sec. 3.1) → exponential curriculum s0 = 10, s1 = 1280 (Eq. 9)
→ shared dropout masks in student and teacher (Sec. 3.1) = iCT (method.name=ict). Dropout is the same,
> 0, in every rung (--dropout), so that the last rung changes only the masks.

Every rung: the same seed, the same data, the same network and budget; FD / precision / recall at 1 and
2 steps in the committed MNIST classifier's feature space against the test split (cmkit.evaluation), on
the same generated noise (eval.seed). The two end points (CT, iCT) are also trained with --extra-seeds,
which gives the seed noise. ladder.json is rewritten after every run.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/ict_ladder.py --data digits --channels 16 \
        --out /tmp/bench_ict --steps 4000 --batch 32 --n-eval 1000 --extra-seeds 1   # docs/results.md (issue 20)

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/ict_ladder.py --data mnist --channels 16 \
        --out /tmp/bench_ict_mnist --steps 2000 --batch 32 --n-eval 1000 --extra-seeds 1   # 28x28, ~7 min a rung

At 500 steps of batch 32 a rung on 28x28 MNIST is still noise; 2,000 steps (64k images) separate the rungs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ladder_common import format_row, train_and_score, write_json

# Each entry: (name, method.* overrides). Every rung spells out the fields it differs from CT in, so
# the one-field (one-technique) step between neighbours is visible; rung 6 is the ict preset itself.
_CT = ["method.name=ct", "method.shared_dropout=false"]
RUNGS = [
    ("CT (Song et al. 2023)", _CT),
    ("- teacher EMA", [*_CT, "method.teacher_ema=false"]),
    ("+ Pseudo-Huber", [*_CT, "method.teacher_ema=false", "method.distance=pseudo_huber", "method.c=0.0"]),
    ("+ lognormal schedule", [*_CT, "method.teacher_ema=false", "method.distance=pseudo_huber", "method.c=0.0",
                              "method.noise_schedule=lognormal", "method.p_mean=-1.1", "method.p_std=2.0"]),
    ("+ 1/dsigma weighting", [*_CT, "method.teacher_ema=false", "method.distance=pseudo_huber", "method.c=0.0",
                              "method.noise_schedule=lognormal", "method.p_mean=-1.1", "method.p_std=2.0",
                              "method.weighting=reciprocal"]),
    ("+ exp curriculum", [*_CT, "method.teacher_ema=false", "method.distance=pseudo_huber", "method.c=0.0",
                          "method.noise_schedule=lognormal", "method.p_mean=-1.1", "method.p_std=2.0",
                          "method.weighting=reciprocal", "method.curriculum=exp", "method.s0=10", "method.s1=1280"]),
    ("+ shared dropout = iCT", ["method.name=ict"]),
]
END_POINTS = (0, len(RUNGS) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_ict")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist",
                   help="mnist: configs/ict_mnist_demo.yaml's U-Net; digits (8x8): configs/ict_digits.yaml's")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1, help="net.dropout of every rung (> 0: rung 6 shares masks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra-seeds", type=int, default=1, help="more seeds for the two end points (CT, iCT)")
    p.add_argument("--rungs", type=int, nargs="*", default=None, help="indices of the rungs to run")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[1, 2], help="sampler step counts to score")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from cmkit.config import load_config

    # configs/ict_mnist_demo.yaml's (ict_digits.yaml's) network, with dropout; no config file, so that each
    # rung's method.* is its preset plus the listed overrides (a file's method keys would override the CT preset too).
    mult, attn = ("[1,2,2]", "[7]") if args.data == "mnist" else ("[1,2]", "[4]")
    common = [
        f"data.name={args.data}", "net.name=unet", f"net.channels={args.channels}", f"net.channel_mult={mult}",
        "net.num_blocks=1", f"net.attn_resolutions={attn}", f"net.dropout={args.dropout}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.lr={args.lr}",
        f"train.warmup_nimg={min(6400, args.steps * args.batch // 5)}", "train.ema=[0.995]",
        f"train.threads={args.threads}", "train.device=cpu", "run.progress=false", "run.tensorboard=false",
        "run.sample_n=64", "run.sample_steps=[1]", f"run.log_every={max(args.steps // 5, 1)}",
        "run.checkpoint_every=0", f"eval.n={args.n_eval}", f"eval.steps={list(args.eval_steps)}".replace(" ", ""),
    ]
    jobs = [(i, args.seed) for i in range(len(RUNGS)) if args.rungs is None or i in args.rungs]
    jobs += [(i, args.seed + s) for s in range(1, args.extra_seeds + 1) for i in END_POINTS
             if args.rungs is None or i in args.rungs]
    results, seeds, protocol = {}, {}, None
    for idx, seed in jobs:
        name, over = RUNGS[idx]
        run_dir = out / f"rung{idx}_seed{seed}"
        overrides = [*over, *common, f"train.seed={seed}", f"run.dir={run_dir}"]
        entry, report = train_and_score(load_config(None, overrides), run_dir, args.eval_steps, args.n_eval, over)
        protocol = report["protocol"]
        entry["seed"] = seed
        (results if seed == args.seed else seeds.setdefault(name, {}))[name if seed == args.seed else str(seed)] = entry
        write_json(out / "ladder.json", {"budget": vars(args), "protocol": protocol, "ladder": results,
                                              "other_seeds": seeds})
        print(format_row(f"{name} (seed {seed})", entry, args.eval_steps, 32), flush=True)
    print(f"written {out / 'ladder.json'}")


if __name__ == "__main__":
    main()
