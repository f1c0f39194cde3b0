"""EDM2 U-Net cost: forward, forward+backward and JVP time, each ÷ forward, beside cmkit's ADM-style U-Net.

Usage: python benchmarks/edm2.py [--batch 8] [--reps 5] [--device cpu]. Prints a Markdown table.
Both nets at a small size on 3x32x32 (width 32, mult 1-2-2, one block per level, attention at 8x8, dropout
0.1, positional embedding, double normalisation), in training mode, timing what sCT runs: the no-grad JVP
of F in (x, c_noise) and the student's forward+backward.
"""

from __future__ import annotations

import argparse

import torch

from cmkit.config import load_config
from cmkit.nets import build_network
from passes import pass_times

COMMON = ["net.channels=32", "net.channel_mult=[1,2,2]", "net.num_blocks=1", "net.attn_resolutions=[8]",
          "net.dropout=0.1", "net.embedding=positional", "net.modulation=double_norm"]
NETS = {
    "edm2": ["net.name=edm2", "net.channels_per_head=32"],
    "unet": ["net.name=unet", "net.num_heads=1"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    shape = (3, 32, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *shape, generator=g).to(device)
    dx = torch.randn(args.batch, *shape, generator=g).to(device)
    c, dc = torch.full((args.batch,), 0.8, device=device), torch.ones(args.batch, device=device)
    print("| net | params | forward (no grad) | forward+backward | JVP (no grad) | fwd+bwd ÷ fwd | JVP ÷ fwd |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, over in NETS.items():
        torch.manual_seed(0)
        net = build_network(load_config(None, COMMON + over).net, shape).to(device).train()
        params = sum(p.numel() for p in net.parameters())
        t = pass_times(net, x, c, dx, dc, args.reps, sync)
        f, fb, j = t["forward"], t["fwd+bwd"], t["jvp"]
        print(f"| {name} | {params / 1e6:.2f}M | {f:.1f} ms | {fb:.1f} ms | {j:.1f} ms | {fb / f:.2f} | {j / f:.2f} |")


if __name__ == "__main__":
    main()
