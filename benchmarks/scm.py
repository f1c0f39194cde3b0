"""sCM cost benchmark: JVP time ÷ forward time, and sCT step ÷ iCT step, on the same U-Net and batch.

Usage: python benchmarks/scm.py [--batch 16] [--reps 5] [--device cpu]. Prints a Markdown table.
The learning-quality comparisons of the issue (normalisation/adaptive weighting ablation, FD vs the
TrigFlow diffusion model) need far more compute than the shared CPU gives and are not run here.
"""

from __future__ import annotations

import argparse
import time

import torch

from cmkit.config import load_config
from cmkit.objectives import build_objective
from cmkit.schedules import Progress

UNET = ["net.name=unet", "net.channels=32", "net.channel_mult=[1,2,2]", "net.num_blocks=1",
        "net.attn_resolutions=[7]", "net.dropout=0.1", "net.embedding=positional"]


def timed(fn, reps: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    shape = (1, 28, 28)
    x = torch.randn(args.batch, *shape, device=device)
    prog = Progress(10**9, 10**9, args.batch)  # past the warm-up
    rows = []
    torch.manual_seed(0)
    sct = build_objective(load_config(None, UNET + ["method.name=sct", "net.modulation=double_norm"]), shape).to(device)
    torch.manual_seed(0)
    ict = build_objective(load_config(None, UNET + ["method.name=ict"]), shape).to(device)
    t = torch.full((args.batch,), 0.8, device=device)
    net = sct.model.net

    def forward():
        with torch.no_grad():
            net(x, t)

    def jvp():
        sct.tangent(x, t, x, r=1.0)

    def step(obj):
        def run():
            obj.zero_grad(set_to_none=True)
            obj.phases[0].loss({"x": x}, prog)["loss"].mean().backward()
        return run

    f_ms, j_ms = timed(forward, args.reps, sync), timed(jvp, args.reps, sync)
    s_ms, i_ms = timed(step(sct), args.reps, sync), timed(step(ict), args.reps, sync)
    rows.append(f"| forward (no grad) | {f_ms:.1f} ms | 1.00 |")
    rows.append(f"| JVP tangent pass (no grad, Sec. 5.1) | {j_ms:.1f} ms | {j_ms / f_ms:.2f} |")
    rows.append(f"| iCT step (2 fwd + bwd) | {i_ms:.1f} ms | {i_ms / f_ms:.2f} |")
    rows.append(f"| sCT step (JVP + fwd + bwd) | {s_ms:.1f} ms | {s_ms / f_ms:.2f} |")
    params = sum(p.numel() for p in net.parameters())
    print(f"U-Net {params / 1e6:.2f}M params, batch {args.batch} x {shape}, device {device}, "
          f"threads {args.threads}; sCT step / iCT step = {s_ms / i_ms:.2f}")
    print("| what | time | ÷ forward |\n| --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
