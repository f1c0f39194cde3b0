"""Benchmark (issue 4): EDM teacher FD at 1/2/10/35 NFE (Heun) and its CD student at 1/2 steps.

Trains an EDM teacher with configs/edm_mnist.yaml (or the same U-Net shrunk for 8x8 digits), then
distils it with configs/cd_mnist.yaml (init from the teacher), and evaluates both with
cmkit.evaluation (FD in the bundled digit classifier's feature space, eval.features=auto). Optionally
(``--ct-steps -1``) trains iCT (configs/ict_digits.yaml / ict_mnist.yaml) from scratch for as many
steps as the CD student got, as a sanity reference. A "data" row scores the training split itself
against the reference (the FD floor at this reference size).

Budgets are arguments. ``--teacher-minutes`` / ``--cd-minutes`` / ``--ct-minutes`` cap a stage's
wall time: the loop is sent SIGTERM, finishes its step, checkpoints and returns, and the report
records the steps actually done (EDM and CD have constant learning rates and no curriculum, so an
early stop is a shorter run, not a truncated schedule; iCT's curriculum spans --ct-steps). Each stage
is evaluated as soon as it ends and report.json is rewritten, so a cut run still leaves results.
The run in docs/results.md:

    OMP_NUM_THREADS=1 python benchmarks/cd_mnist.py --data digits --teacher-steps 100000 --teacher-minutes 44 \\
        --cd-steps 100000 --cd-minutes 22 --ct-steps -1 --ct-minutes 11 --n 2000 --eval-every-nimg 128000 \\
        --out /tmp/bench_cd/run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from cmkit.config import load_config
from cmkit.evaluation import Evaluator, evaluate_run, format_table
from cmkit.train import train

DIGITS_NET = ["data.name=digits", "net.channel_mult=[1,2]", "net.attn_resolutions=[4]"]


def timed_train(cfg, minutes: float) -> tuple[Path, float]:
    """train(cfg), sent SIGTERM after ``minutes`` (0 = no limit); returns (run dir, seconds)."""
    timer = None
    if minutes > 0:
        timer = threading.Timer(minutes * 60, lambda: os.kill(os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
    t0 = time.perf_counter()
    try:
        run_dir = train(cfg)
    finally:
        if timer is not None:
            timer.cancel()
    return run_dir, time.perf_counter() - t0


def data_floor(cfg) -> dict:
    """Metrics of the training split itself against the reference split (what a perfect model scores)."""
    from dataclasses import replace

    from cmkit.data import load_dataset

    ds = load_dataset(replace(cfg.data, split="train", labels=False))
    row = Evaluator(cfg).metrics(ds.to_data_space(ds.x))
    return {"protocol": {"n_generated": len(ds.x), "what": "training split images"}, "steps": {"data": row}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--teacher", default="", help="reuse a trained EDM run directory instead of training one")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--teacher-minutes", type=float, default=0, help="wall-time cap of teacher training (0 = none)")
    p.add_argument("--teacher-ema", type=float, default=0.999)
    p.add_argument("--cd-steps", type=int, default=1500)
    p.add_argument("--cd-minutes", type=float, default=0)
    p.add_argument("--cd-ema", type=float, default=0.998)
    p.add_argument("--ct-steps", type=int, default=0, help="iCT reference steps; -1 = as many as CD got; 0 = skip")
    p.add_argument("--ct-minutes", type=float, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n", type=int, default=1000, help="generated samples per evaluation")
    p.add_argument("--eval-every-nimg", type=int, default=0, help="FD during training (eval.n=500); 0 = off")
    p.add_argument("--out", default="runs/bench_cd")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = DIGITS_NET if args.data == "digits" else []
    common = [f"train.batch_size={args.batch}", f"train.threads={args.threads}", "run.progress=false",
              "run.tensorboard=false", "run.sample_every=0", "run.checkpoint_every=500", "run.log_every=50",
              f"eval.every_nimg={args.eval_every_nimg}", "eval.n=500"]
    report: dict = {"args": vars(args), "seconds": {}, "steps": {}}

    def save() -> None:
        (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")

    def evaluate(name: str, run_dir: Path, steps: list[int]) -> None:
        t = time.perf_counter()
        report[name] = evaluate_run(run_dir, steps=steps, n=args.n)
        report["seconds"][f"{name}_eval"] = time.perf_counter() - t
        report["steps"][name] = report[name]["protocol"]["nimg"] // args.batch
        save()
        print(f"{name} ({report['steps'][name]} steps)\n" + format_table(report[name]), flush=True)

    teacher_cfg = load_config("configs/edm_mnist.yaml", [
        *data, *common, f"train.steps={args.teacher_steps}", f"train.ema=[{args.teacher_ema}]",
        f"run.dir={args.teacher or out / 'edm'}", "run.sample_steps=[35]", "eval.steps=[1,2,10,35]"])
    report["floor"] = data_floor(teacher_cfg)
    save()
    print("data floor\n" + format_table(report["floor"]), flush=True)

    if args.teacher:
        teacher_dir = Path(args.teacher)
    else:
        teacher_dir, report["seconds"]["teacher_train"] = timed_train(teacher_cfg, args.teacher_minutes)
    evaluate("teacher", teacher_dir, [1, 2, 10, 35])

    cd_cfg = load_config("configs/cd_mnist.yaml", [
        *data, *common, f"train.steps={args.cd_steps}", f"train.ema=[{args.cd_ema}]", f"run.dir={out / 'cd'}",
        f"method.teacher={teacher_dir}", "run.sample_steps=[1,2]", "eval.steps=[1,2]"])
    cd_dir, report["seconds"]["cd_train"] = timed_train(cd_cfg, args.cd_minutes)
    evaluate("student", cd_dir, [1, 2])

    if args.ct_steps:
        ct_steps = report["steps"]["student"] if args.ct_steps < 0 else args.ct_steps
        ct_config = "configs/ict_digits.yaml" if args.data == "digits" else "configs/ict_mnist.yaml"
        ct_cfg = load_config(ct_config, [
            *common, f"train.steps={ct_steps}", f"train.ema=[{args.cd_ema}]", f"run.dir={out / 'ict'}",
            "run.sample_steps=[1,2]", "eval.steps=[1,2]"])
        ct_dir, report["seconds"]["ct_train"] = timed_train(ct_cfg, args.ct_minutes)
        evaluate("ict", ct_dir, [1, 2])
    print(json.dumps({"seconds": report["seconds"], "steps": report["steps"]}))


if __name__ == "__main__":
    main()
