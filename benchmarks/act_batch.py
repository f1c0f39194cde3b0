"""ACT's central claim (issue 7): CT at batch B, CT at B/6 and ACT at B/6, at equal images seen.

Two data settings, both bundled and CPU-sized:

- ``--data toy``: eight Gaussians, tiny MLPs (width 64, depth 2); metric: sliced-Wasserstein distance
  (SWD-1, 256 projections) of 1- and 2-step samples to the held-out split.
- ``--data digits``: scikit-learn's 8x8 digits, a small U-Net (ch 32, mult 1-2, one block, attention
  at 4x4); metrics from cmkit.evaluation: Fréchet distance (FD) in the committed digit classifier's
  64-d features, precision and recall, of 1- and 2-step samples against the reference split.

"Images seen" counts the consistency model's batches (train.steps x train.batch_size, the loop's
nimg); ACT's discriminator phase draws its own real batch of the same size on top (Algorithm 1
line 11). Every run uses the same learning rate; the student EMA decay is matched in images (the
B-run uses ema**6 per step when the B/6 runs use ema). Both EMA and raw-student samples are scored.
ACT's gradient-penalty curve (``discriminator/gp_last``: w_gp·‖∇_x D‖² on the real batch, the latest
lazy penalty) and the consistency loss are read from each run's log.jsonl.

Results are appended to OUT/results.json after every run, so a cut benchmark keeps what finished;
a re-run skips (name, seed) pairs already there. Numbers go into docs/results.md by hand.

    python benchmarks/act_batch.py --data toy --seeds 0 1 2 --out runs/act_toy          # nimg 96k, B = 192
    python benchmarks/act_batch.py --data digits --nimg 96000 --batch 96 --n 1000 --out runs/act_digits
    python benchmarks/act_batch.py --report --out runs/act_toy                          # Markdown tables
    python benchmarks/act_batch.py --plot docs/img/act_batch_gp.png runs/act_toy runs/act_digits
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

DIGITS_NET = ["data.name=digits", "net.name=unet", "net.channels=32", "net.channel_mult=[1,2]", "net.num_blocks=1",
              "net.attn_resolutions=[4]", "net.dropout=0.0"]
SETTINGS = {
    # data -> (CT config, ACT config, overrides of both, default lr, default EMA of the B/6 runs, ACT's I_gp)
    "toy": ("configs/ct_toy.yaml", "configs/act_toy.yaml", ["net.hidden=64", "net.depth=2", "data.split=train"],
            2e-3, 0.99, 4),
    "digits": ("configs/ct_mnist.yaml", "configs/act_mnist.yaml", [*DIGITS_NET, "data.split=train"],
               5e-4, 0.999, 16),
}


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """SWD-1 between equal-size point sets (same estimator as tests/conftest.py)."""
    g = torch.Generator().manual_seed(seed)
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    return (torch.sort(a @ dirs, 0)[0] - torch.sort(b @ dirs, 0)[0]).abs().mean().item()


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def curve(logs: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in logs if key in r]


class Scorer:
    """Metrics of a trained run's 1- and 2-step samples (EMA and raw student)."""

    def __init__(self, data: str, ct_config: str, overrides: list[str], n: int):
        self.data, self.n = data, n
        if data == "toy":
            test = load_dataset(load_config(ct_config, [*overrides, "data.split=test"]).data).x
            self.n = min(self.n, len(test))
            self.test = test[: self.n]
        else:
            from cmkit.evaluation import Evaluator

            cfg = load_config(ct_config, [*overrides, "eval.reference=all", f"eval.n={n}"])
            self.evaluator = Evaluator(cfg)
            self.protocol = self.evaluator.protocol

    def __call__(self, run) -> dict:
        out = {}
        for ema in (True, False):
            tag = "" if ema else "_raw"
            for k in (1, 2):
                if self.data == "toy":
                    x = run.sample(self.n, k, data_space=False, seed=1, ema=ema)
                    out[f"swd_{k}step{tag}"] = sliced_wasserstein(x, self.test)
                else:
                    row = self.evaluator.metrics(run.sample(self.n, k, seed=self.evaluator.seed, ema=ema))
                    out.update({f"{m}_{k}step{tag}": row[m] for m in ("fd", "precision", "recall")})
        return out

    def floor(self) -> dict:
        """The metric of real held-out/training data of the same size: what a perfect model would score."""
        if self.data == "toy":
            return {"swd_train_vs_test": sliced_wasserstein(
                load_dataset(load_config(SETTINGS["toy"][0], [*SETTINGS["toy"][2]]).data).x[: self.n], self.test)}
        ref = self.evaluator.cfg
        real = load_dataset(load_config(SETTINGS["digits"][0], [*SETTINGS["digits"][2]]).data)
        idx = torch.randperm(len(real.x), generator=torch.Generator().manual_seed(1))[: self.n]
        row = self.evaluator.metrics(real.to_data_space(real.x[idx]))
        return {f"{m}_train_images_vs_ref": row[m] for m in ("fd", "precision", "recall")} | {
            "n_ref": len(self.evaluator.ref_feats), "reference": ref.eval.reference}


def report(results: dict) -> str:
    """Markdown tables of a results.json: metrics per run (mean ± sd over seeds) and ACT's GP / CT-loss curves."""
    import statistics

    runs = {k: v for k, v in results.items() if isinstance(v, dict) and "method" in v}
    groups: dict[str, list[dict]] = {}
    for v in runs.values():
        groups.setdefault(f"{v['method'].upper()} B={v['batch']}", []).append(v)
    metrics = [k for k in next(iter(runs.values()), {}) if k.split("_")[0] in ("swd", "fd", "precision", "recall")]

    def cell(vals):
        if len(vals) == 1:
            return f"{vals[0]:.3f}"
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"

    lines = ["| run | steps | seeds | " + " | ".join(metrics) + " | train s/run |",
             "|---" * (len(metrics) + 4) + "|"]
    for name, vs in groups.items():
        row = " | ".join(cell([v[m] for v in vs]) for m in metrics)
        lines.append(f"| {name} | {vs[0]['steps']} | {len(vs)} | {row} | "
                     f"{statistics.mean(v['train_wall_s'] for v in vs):.0f} |")
    lines += ["", "Per seed (1-step, 2-step; EMA):", ""]
    for name, v in runs.items():
        lines.append(f"- {name}: " + ", ".join(f"{m}={v[m]:.3f}" for m in metrics if not m.endswith("_raw")))
    for name, v in runs.items():
        if not v.get("gp_curve"):
            continue
        gp, ct, dl = dict(v["gp_curve"]), dict(v["ct_loss_curve"]), dict(v.get("d_loss_curve", []))
        steps = sorted(gp)
        picks = sorted({steps[round(i * (len(steps) - 1) / 9)] for i in range(10)})
        lines += ["", f"{name}: gradient penalty (gp_last), consistency loss and D loss at logged steps", "",
                  "| step | " + " | ".join(str(s) for s in picks) + " |", "|---" * (len(picks) + 1) + "|",
                  "| GP | " + " | ".join(f"{gp[s]:.3g}" for s in picks) + " |",
                  "| L_CT | " + " | ".join(f"{ct.get(s, float('nan')):.3g}" for s in picks) + " |",
                  "| L_D | " + " | ".join(f"{dl.get(s, float('nan')):.3g}" for s in picks) + " |"]
    return "\n".join(lines)


def plot(dirs: list[str], png: str) -> None:
    """One column per results dir: ACT's gradient penalty (top) and the consistency loss of ACT and CT at the
    same (small) batch (bottom), against images seen; both logarithmic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(dirs), figsize=(3.6 * len(dirs), 4.6), squeeze=False, sharex="col")
    for j, d in enumerate(dirs):
        results = json.loads((Path(d) / "results.json").read_text())
        runs = {k: v for k, v in results.items() if isinstance(v, dict) and "method" in v}
        for name, v in runs.items():
            scale = v["nimg"] / max(v["steps"], 1) / 1000  # steps -> thousands of images seen
            if v.get("gp_curve"):
                xs, ys = zip(*v["gp_curve"])
                axes[0, j].plot([x * scale for x in xs], ys, lw=0.8, label=f"seed {v['seed']}")
            if v["batch"] == min(r["batch"] for r in runs.values()):
                xs, ys = zip(*v["ct_loss_curve"])
                color = "C3" if v["method"] == "act" else "C7"
                axes[1, j].plot([x * scale for x in xs], ys, lw=0.7, color=color,
                                label=f"{v['method'].upper()} B={v['batch']}" if v["seed"] == min(
                                    r["seed"] for r in runs.values()) else None)
        # ACT-Aug (Alg. 2) raises p_aug while the EMA of this penalty is >= τ = 0.55 (w_gp = 5, the authors' code)
        axes[0, j].axhline(0.55, color="k", lw=0.6, ls="--", label="ACT-Aug τ = 0.55")
        axes[0, j].set_title(f"{Path(d).name}: ACT gradient penalty", fontsize=8)
        axes[0, j].set_ylabel("w_gp·|grad_x D|^2 (log)", fontsize=7)
        axes[0, j].set_yscale("log")
        axes[1, j].set_yscale("log")
        axes[1, j].set_ylabel("L_CT", fontsize=7)
        axes[1, j].set_xlabel("thousand images seen", fontsize=7)
        for ax in axes[:, j]:
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=sorted(SETTINGS), default="toy")
    ap.add_argument("--nimg", type=int, default=96_000, help="images seen by every run (the model's batches)")
    ap.add_argument("--batch", type=int, default=192, help="B; the small runs use B/6")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each repetition")
    ap.add_argument("--lr", type=float, default=0.0, help="learning rate of every run; 0 = the data's default")
    ap.add_argument("--ema", type=float, default=0.0, help="student EMA of the B/6 runs (B run: ema**6); 0 = default")
    ap.add_argument("--gp-interval", type=int, default=0, help="ACT's I_gp; 0 = the data's default")
    ap.add_argument("--runs", nargs="+", default=["ct_big", "ct_small", "act_small"], help="subset to run")
    ap.add_argument("--n", type=int, default=2000, help="generated samples per metric (toy: held-out points too)")
    ap.add_argument("--log-every", type=int, default=0, help="0 = about 60 log lines per run")
    ap.add_argument("--out", default="runs/bench_act")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only print OUT/results.json as Markdown tables")
    ap.add_argument("--plot", nargs="+", metavar="PATH", help="only plot: PNG then results dirs (one column each)")
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot[1:], args.plot[0])
        return 0
    if args.report:
        print(report(json.loads((Path(args.out) / "results.json").read_text())))
        return 0
    torch.set_num_threads(args.threads)
    ct_config, act_config, data_overrides, lr, ema, gp_interval = SETTINGS[args.data]
    lr = args.lr or lr
    ema = args.ema or ema
    gp_interval = args.gp_interval or gp_interval
    small = args.batch // 6
    ratio = args.batch / small
    common = [*data_overrides, f"train.lr={lr}", "run.progress=false", "run.tensorboard=false", "run.sample_steps=[1]",
              f"train.threads={args.threads}", "run.checkpoint_every=0"]
    runs = {
        "ct_big": (ct_config, args.batch, [f"train.ema=[{ema ** ratio:.6f}]"]),
        "ct_small": (ct_config, small, [f"train.ema=[{ema}]"]),
        "act_small": (act_config, small, [f"train.ema=[{ema}]", f"method.gp_interval={gp_interval}"]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    scorer = Scorer(args.data, ct_config, data_overrides, args.n)
    if "floor" not in results:
        results["floor"] = scorer.floor()
        if args.data == "digits":
            results["protocol"] = scorer.protocol
        print(json.dumps({"floor": results["floor"]}), flush=True)
    for seed in args.seeds:
        for key in args.runs:
            config, batch, extra = runs[key]
            name = f"{key.split('_')[0]}_b{batch}_s{seed}"
            if name in results:
                continue
            steps = args.nimg // batch
            log_every = args.log_every or max(gp_interval, round(steps / 60 / gp_interval) * gp_interval)
            run_dir = out / name
            cfg = load_config(config, [*common, *extra, f"train.batch_size={batch}", f"train.steps={steps}",
                                       f"train.seed={seed}", f"run.log_every={log_every}", f"run.dir={run_dir}"])
            t0 = time.perf_counter()
            train(cfg, force=True)
            wall = time.perf_counter() - t0
            run = load(cfg.run.dir)
            t1 = time.perf_counter()
            scores = scorer(run)
            logs = read_log(run_dir)
            ct_key = "ct_loss" if cfg.method.name == "act" else "loss"
            results[name] = {
                "method": cfg.method.name, "batch": batch, "steps": steps, "nimg": run.nimg, "seed": seed, "lr": lr,
                "ema": cfg.train.ema[0], "gp_interval": gp_interval if cfg.method.name == "act" else None,
                **scores, "train_wall_s": wall, "eval_wall_s": time.perf_counter() - t1,
                "ct_loss_curve": curve(logs, ct_key), "gp_curve": curve(logs, "discriminator/gp_last"),
                "d_loss_curve": curve(logs, "discriminator/d_loss"),
                "real_logit_curve": curve(logs, "discriminator/real_logit"),
                "fake_logit_curve": curve(logs, "discriminator/fake_logit"),
                "skipped_steps": logs[-1].get("skipped_steps") if logs else None,
            }
            brief = {k: v for k, v in results[name].items() if not k.endswith("_curve")}
            print(json.dumps({name: brief}), flush=True)
            path.write_text(json.dumps(results, indent=1, default=float))
    path.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
