"""The one prepared check for a lent GPU (issue 18): one command, < 8 minutes, one JSON + one Markdown table.

    python benchmarks/gpu_check.py --out runs/gpu_check            # on a CUDA machine after `make install`
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check  # on CPU: every stage at toy size

Stages (each one row group in the table; a stage that cannot run is recorded as FAILED with the reason, never
left out, and any failure makes the exit status 1):

1. ``env``        torch / CUDA / triton / jvp-flash-attention versions; on CUDA the Triton kernel must import.
2. ``methods``    ct, ict, sct, scd, act, cmgan through the real Trainer at a CIFAR-size config (3×32×32,
                  U-Net ch 128, mult 1-2-2, 2 blocks, attention at 16²): images/s, step time ÷ one
                  forward+backward of the backbone, backbone passes per step, peak memory; fp32 and bf16
                  (sCD also fp16 with loss scaling, the paper's precision).
3. ``attention``  JVP attention kernels (math, blockwise, flash_jvp) at 16×16 and 32×32 tokens: output and
                  tangent error against float64 math, time, peak memory.
4. ``tf32``       the sCT tangent's error against float64 with TF32 on and off (why TF32 is off there).
5. ``variants``   sCT step with train.channels_last and with train.compile (student pass compiled).
6. ``sample``     a 2-step sample of the sCT model (finite, time).

Written from scratch for cmkit; the scheduling/ratio definitions are cmkit's own (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from cmkit.config import load_config
from cmkit.nets import attention as att
from cmkit.train import Trainer, resolve_device, train
from cmkit import distributed

METHODS = ("ct", "ict", "sct", "scd", "act", "cmgan")
FULL = dict(res=32, channels=128, mult="[1,2,2]", blocks=2, attn="[16]", heads=2, batch=128, steps=6, warm=2,
            tokens=(16, 32), att_batch=16, att_heads=4, head_dim=64)
TOY = dict(res=8, channels=16, mult="[1,2]", blocks=1, attn="[4]", heads=1, batch=4, steps=2, warm=1,
           tokens=(4, 8), att_batch=1, att_heads=2, head_dim=32)
METHOD_ARGS = {
    "ct": ["method.name=ct"], "ict": ["method.name=ict"],
    "sct": ["method.name=sct", "net.modulation=double_norm", "net.embedding=positional"],
    "scd": ["method.name=scd", "net.modulation=double_norm", "net.embedding=positional"],
    "act": ["method.name=act", "method.gp_interval=4", "method.augment=false"],
    "cmgan": ["method.name=cmgan"],
}


class Clock:
    """Seconds left of the budget; stages check it and record 'not run: budget' (never silently)."""

    def __init__(self, budget: float):
        self.end = time.perf_counter() + budget

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device):
    """Peak allocated CUDA memory since reset_peak (MiB); None on CPU (see benchmarks/scm_attention_memory.py)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def timed(fn, device, reps: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def base_args(size: dict, data_path: str, device: torch.device, run_dir: str) -> list[str]:
    return ["data.name=array", f"data.path={data_path}", "net.name=unet", f"net.channels={size['channels']}",
            f"net.channel_mult={size['mult']}", f"net.num_blocks={size['blocks']}",
            f"net.attn_resolutions={size['attn']}", f"net.num_heads={size['heads']}", "net.num_groups=8",
            f"train.batch_size={size['batch']}", "train.steps=1000", f"train.device={device}", "train.ema=[0.999]",
            "run.progress=false", "run.tensorboard=false", f"run.dir={run_dir}", "run.sample_n=4",
            "run.sample_steps=[1]"]


# ----------------------------------------------------------------------------
# Stages.


def stage_env(device, dry: bool) -> list[dict]:
    rows = [{"what": "torch", "value": torch.__version__}, {"what": "python", "value": platform.python_version()}]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rows.append({"what": "device", "value": f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"})
        rows.append({"what": "cuda", "value": torch.version.cuda})
    else:
        rows.append({"what": "device", "value": "cpu (dry run)" if dry else "cpu"})
    try:
        import triton
        rows.append({"what": "triton", "value": triton.__version__})
    except Exception as e:
        rows.append({"what": "triton", "value": f"missing ({type(e).__name__})",
                     "status": "FAILED" if device.type == "cuda" else "n/a on CPU"})
    ok = att.flash_jvp_available()
    rows.append({"what": "jvp-flash-attention", "value": "imports" if ok else "missing: " + att.FLASH_HELP,
                 "status": "ok" if ok else ("FAILED" if device.type == "cuda" else "n/a on CPU")})
    return rows


def _count_passes(net):
    """A forward-hook counter of backbone calls (each objective pass: student, target, teacher, JVP)."""
    count = [0]
    handle = net.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    return count, handle


def stage_methods(size, device, tmp: Path, clock: Clock, precisions, extra=(), methods=METHODS) -> list[dict]:
    rows = []
    data_path = str(tmp / "images.npy")
    teacher_dir = tmp / "teacher"
    for method in methods:
        for prec in precisions:
            if prec == "fp16" and method != "scd":
                continue
            if prec == "fp16" and device.type != "cuda":
                rows.append({"method": method, "precision": prec, "status": "n/a on CPU (fp16 loss scaling is CUDA-only)"})
                continue
            row = {"method": method, "precision": prec, "variant": " ".join(extra) or "-"}
            if clock.left() < 20:
                rows.append({**row, "status": "FAILED: not run, --budget exhausted"})
                continue
            try:
                args = base_args(size, data_path, device, str(tmp / f"run_{method}_{prec}")) + METHOD_ARGS[method]
                if method == "scd":
                    if not (teacher_dir / "summary.json").exists():
                        targs = base_args(size, data_path, device, str(teacher_dir)) + METHOD_ARGS["scd"][1:]
                        train(load_config(None, [*targs, "method.name=trigflow", "train.steps=0"]))
                    args.append(f"method.teacher={teacher_dir}")
                eager_compile = "train.compile=true" in extra and device.type != "cuda"
                cfg = load_config(None, [*args, f"train.precision={prec}",
                                         *(e for e in extra if not (eager_compile and e == "train.compile=true"))])
                torch.manual_seed(0)
                reset_peak(device)
                trainer = Trainer(cfg, distributed.DistInfo(), device)
                if eager_compile:  # CPU dry run: dynamo traces the student pass, no inductor (minutes on CPU)
                    trainer.objective.compile_student(backend="eager")
                    row["variant"] += " (dynamo backend=eager on CPU)"
                streams = trainer.streams()
                net = trainer.objective.model.net
                count, handle = _count_passes(net)
                step = timed(lambda: trainer.train_step(streams), device, size["steps"], size["warm"])
                handle.remove()
                passes = count[0] / (size["steps"] + size["warm"])
                x = torch.randn(size["batch"], 3, size["res"], size["res"], device=device)
                c = torch.rand(size["batch"], device=device)

                def fwd_bwd():
                    with trainer.autocast():
                        out = net(x, c)
                    out.float().square().mean().backward()

                fb = timed(fwd_bwd, device, size["steps"], 1)
                net.zero_grad(set_to_none=True)
                logs = trainer.train_step(streams)
                rows.append({**row, "status": "ok", "images_per_s": size["batch"] / step, "step_s": step,
                             "fwd_bwd_s": fb, "step_over_fwd_bwd": step / fb, "passes_per_step": passes,
                             "peak_mib": peak_mib(device), "loss": float(logs["loss"]),
                             "params_M": sum(p.numel() for p in net.parameters()) / 1e6})
                del trainer
            except Exception as e:
                rows.append({**row, "status": f"FAILED: {type(e).__name__}: {str(e)[:300]}"})
                traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def stage_attention(size, device, clock: Clock) -> list[dict]:
    rows = []
    B, H, d = size["att_batch"], size["att_heads"], size["head_dim"]
    kernels = ["math", "blockwise", "flash_jvp"]
    for side in size["tokens"]:
        N = side * side
        g = torch.Generator(device="cpu").manual_seed(side)
        q, k, v, tq, tk, tv = (torch.randn(B, H, N, d, generator=g).to(device) for _ in range(6))
        ref = torch.func.jvp(att.math_attention, tuple(x.double() for x in (q, k, v)),
                             tuple(x.double() for x in (tq, tk, tv)))
        for kernel in kernels:
            row = {"tokens": f"{side}x{side}", "N": N, "kernel": kernel}
            if clock.left() < 10:
                rows.append({**row, "status": "FAILED: not run, --budget exhausted"})
                continue
            if kernel == "flash_jvp" and not att.flash_jvp_available():
                rows.append({**row, "status": ("FAILED: " if device.type == "cuda" else "n/a on CPU: ") + "missing, "
                             + att.FLASH_HELP})
                continue
            if kernel == "flash_jvp" and device.type != "cuda" and not att._triton_interpreter():
                rows.append({**row, "status": "n/a on CPU: Triton needs CUDA (or TRITON_INTERPRET=1)"})
                continue
            fn = {"math": att.math_attention, "blockwise": att.blockwise_attention,
                  "flash_jvp": att.flash_jvp_attention}[kernel]
            try:
                def run():
                    with torch.no_grad():
                        return torch.func.jvp(fn, (q, k, v), (tq, tk, tv))

                reset_peak(device)
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                o, t = run()
                peak = peak_mib(device)
                sec = timed(run, device, 3 if device.type == "cuda" else 1, 1)
                rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
                rows.append({**row, "status": "ok", "out_rel_err": rel(o, ref[0]), "tangent_rel_err": rel(t, ref[1]),
                             "ms": sec * 1e3, "peak_mib_above_inputs": None if peak is None else peak - base / 2**20})
            except Exception as e:
                rows.append({**row, "status": f"FAILED: {type(e).__name__}: {str(e)[:300]}"})
    return rows


def _sct_objective(size, device, extra=()):
    from cmkit.objectives import build_objective

    cfg = load_config(None, ["method.name=sct", "net.name=unet", f"net.channels={size['channels']}",
                             f"net.channel_mult={size['mult']}", f"net.num_blocks={size['blocks']}",
                             f"net.attn_resolutions={size['attn']}", "net.num_groups=8",
                             "net.modulation=double_norm", "net.embedding=positional", *extra])
    torch.manual_seed(0)
    obj = build_objective(cfg, (3, size["res"], size["res"])).to(device)
    for p in obj.model.net.parameters():  # non-zero everywhere, so the tangent is not trivially exact
        torch.nn.init.normal_(p, std=0.05)
    return obj


def stage_tf32(size, device) -> list[dict]:
    rows = []
    try:
        obj = _sct_objective(size, device)
        B = min(size["batch"], 16)
        g = torch.Generator(device="cpu").manual_seed(0)
        x0, z = (torch.randn(B, 3, size["res"], size["res"], generator=g).to(device) for _ in range(2))
        t = torch.full((B,), 0.9, device=device)
        x_t, dxdt = obj.process.add_noise(x0, z, t), obj.process.velocity_target(x0, z, t)
        obj64 = _sct_objective(size, device).double()
        _, ref = obj64.tangent(x_t.double(), t.double(), dxdt.double())
        for allow in (False, True):
            obj.cfg.jvp_tf32 = allow
            _, gt = obj.tangent(x_t, t, dxdt)
            rows.append({"tangent_pass": f"TF32 {'on' if allow else 'off'}", "status": "ok",
                         "tangent_rel_err_vs_fp64": ((gt.double() - ref).norm() / ref.norm()).item(),
                         "note": "" if device.type == "cuda" else "CPU: TF32 does not exist, both rows are fp32"})
    except Exception as e:
        rows.append({"tangent_pass": "TF32", "status": f"FAILED: {type(e).__name__}: {str(e)[:300]}"})
    return rows


def stage_sample(size, device) -> list[dict]:
    from cmkit.sampling import sample_batched

    try:
        obj = _sct_objective(size, device).eval()
        t0 = time.perf_counter()
        x = sample_batched(obj.model, 16, (3, size["res"], size["res"]), obj.sample_times(2), sampler=obj.sampler,
                           seed=0, device=device)
        sync(device)
        return [{"sample": "sCT 2-step, 16 images", "status": "ok" if torch.isfinite(x).all() else "FAILED: non-finite",
                 "s": time.perf_counter() - t0, "shape": list(x.shape)}]
    except Exception as e:
        return [{"sample": "sCT 2-step", "status": f"FAILED: {type(e).__name__}: {str(e)[:300]}"}]


# ----------------------------------------------------------------------------
# Report.


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown(report: dict) -> str:
    lines = [f"# gpu_check ({'dry run, ' if report['dry_run'] else ''}{report['device']}, {report['date']})", ""]
    for name, rows in report["stages"].items():
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += [f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
        lines.append("")
    if report.get("ratios"):
        lines += ["## ratios", ""] + [f"- {k}: {_fmt(v)}" for k, v in report["ratios"].items()] + [""]
    lines += [f"failures: {len(report['failures'])}"] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: every stage runs and the table is written")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; stages past it are recorded as not run")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = torch.device("cpu") if args.dry_run else resolve_device(args.device)
    if not args.dry_run and device.type != "cuda":
        print("gpu_check: no CUDA device is visible; run with --dry-run on CPU (toy sizes) or on a GPU machine",
              file=sys.stderr)
        return 2
    size = TOY if args.dry_run else FULL
    clock = Clock(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report = {"dry_run": args.dry_run, "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "size": size, "stages": {}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        rng = np.random.default_rng(0)
        np.save(tmp / "images.npy", rng.integers(0, 256, (max(4 * size["batch"], 64), size["res"], size["res"], 3),
                                                  dtype=np.uint8))
        stages = report["stages"]

        def run(name, fn):
            t0 = time.perf_counter()
            stages[name] = fn()
            print(f"gpu_check: stage '{name}' took {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

        run("env", lambda: stage_env(device, args.dry_run))
        run("methods", lambda: stage_methods(size, device, tmp, clock, ("fp32", "bf16", "fp16")))
        run("attention (JVP, float32; errors against float64 math)", lambda: stage_attention(size, device, clock))
        run("tf32 in the sCT tangent pass", lambda: stage_tf32(size, device))
        run("variants (sCT, bf16)", lambda: [
            r for extra in (["train.channels_last=true"], ["train.compile=true"])
            for r in stage_methods(size, device, tmp, clock, ("bf16",), extra, methods=("sct",))])
        run("sample", lambda: stage_sample(size, device))
    report["wall_s"] = time.perf_counter() - t_start
    step = {(r["method"], r["precision"]): r.get("step_s") for r in report["stages"]["methods"]}
    ratios = {}
    for prec in ("fp32", "bf16"):
        if step.get(("sct", prec)) and step.get(("ict", prec)):
            ratios[f"sCT step ÷ iCT step ({prec})"] = step[("sct", prec)] / step[("ict", prec)]
        if step.get(("scd", prec)) and step.get(("ict", prec)):
            ratios[f"sCD step ÷ iCT step ({prec}; the paper: sCD ≈ 2× a teacher step)"] = step[("scd", prec)] / step[("ict", prec)]
        if step.get(("sct", "bf16")) and step.get(("sct", "fp32")) and prec == "bf16":
            ratios["sCT fp32 step ÷ bf16 step"] = step[("sct", "fp32")] / step[("sct", "bf16")]
    report["ratios"] = ratios
    report["failures"] = [f"{name}: {r}" for name, rows in report["stages"].items() for r in rows
                          if str(r.get("status", "ok")).startswith("FAILED")]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['wall_s']:.0f} s")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
