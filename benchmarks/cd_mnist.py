"""Benchmark (issue 4): EDM teacher FD at 1/2/10/35 NFE (Heun) and its CD student at 1/2 steps.

Trains an EDM teacher with configs/edm_mnist.yaml (or the same U-Net shrunk for 8x8 digits), then
distils it with configs/cd_mnist.yaml (init from the teacher), and evaluates both with
cmkit.evaluation (FD in the bundled digit classifier's feature space, eval.features=auto).
Budgets are arguments. The defaults are a suggested small budget that has NOT been run yet; the
only run so far is the smoke budget in docs/results.md:

    python benchmarks/cd_mnist.py --data digits --teacher-steps 20 --cd-steps 10 --n 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cmkit.config import load_config
from cmkit.evaluation import evaluate_run, format_table
from cmkit.train import train

DIGITS_NET = ["data.name=digits", "net.channel_mult=[1,2]", "net.attn_resolutions=[4]"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--cd-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n", type=int, default=1000, help="generated samples per evaluation")
    p.add_argument("--out", default="runs/bench_cd")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = DIGITS_NET if args.data == "digits" else []
    common = [f"train.batch_size={args.batch}", f"train.threads={args.threads}", "run.progress=false",
              "run.tensorboard=false", "run.sample_every=0", "run.checkpoint_every=0"]

    t0 = time.perf_counter()
    teacher_cfg = load_config("configs/edm_mnist.yaml", [*data, *common, f"train.steps={args.teacher_steps}",
                                                         f"run.dir={out / 'edm'}", "run.sample_steps=[35]"])
    teacher_dir = train(teacher_cfg)
    t1 = time.perf_counter()
    cd_cfg = load_config("configs/cd_mnist.yaml", [*data, *common, f"train.steps={args.cd_steps}",
                                                   f"run.dir={out / 'cd'}", f"method.teacher={teacher_dir}",
                                                   "run.sample_steps=[1,2]"])
    cd_dir = train(cd_cfg)
    t2 = time.perf_counter()

    teacher = evaluate_run(teacher_dir, steps=[1, 2, 10, 35], n=args.n)
    student = evaluate_run(cd_dir, steps=[1, 2], n=args.n)
    t3 = time.perf_counter()
    report = {"args": vars(args), "teacher": teacher, "student": student,
              "seconds": {"teacher_train": t1 - t0, "cd_train": t2 - t1, "eval": t3 - t2}}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print("EDM teacher (Heun; steps = NFE)\n" + format_table(teacher))
    print("CD student (consistency sampling; steps)\n" + format_table(student))
    print(json.dumps(report["seconds"]))


if __name__ == "__main__":
    main()
