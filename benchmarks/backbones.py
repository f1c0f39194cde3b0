"""Backbone cost: forward, forward+backward and JVP time per network, as ratios to the forward.

Usage: python benchmarks/backbones.py [--nets unet diffusers_unet] [--batch 8] [--size 32] [--reps 3]
       [--preset small|act_cifar10] [--device cpu]. Prints a Markdown table.
``small`` is the same layout for both U-Nets (channels 32, mult 1-2-2, one block per level, attention at
16x16 with head dim 8, i.e. 4 heads at 32 channels) and a DiT of similar size (width 128, 4 blocks, 4 heads,
patch 2: 256 tokens); ``act_cifar10`` is ACT Table 5 (for a GPU).
JVP: torch.func.jvp of F(x, c_noise) in both inputs with no grad (sCM's tangent pass, Sec. 5.1).
"""

from __future__ import annotations

import argparse

import torch

from cmkit.config import NetConfig
from cmkit.nets import build_network
from passes import pass_times

SMALL = dict(channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16], num_heads=4, head_dim=8,
             num_groups=8, dropout=0.0, hidden=128, depth=4, patch_size=2)  # dit: width 128, 4 blocks, 4 heads
ACT_CIFAR10 = dict(channels=128, channel_mult=[1, 1, 2, 2], num_blocks=2, attn_resolutions=[16], num_heads=16,
                   head_dim=8, num_groups=32, dropout=0.0, dit="DiT-S/2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", nargs="+", default=["unet", "diffusers_unet", "dit"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--preset", default="small", choices=["small", "act_cifar10"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    shape = (3, args.size, args.size)
    layout = SMALL if args.preset == "small" else ACT_CIFAR10
    print(f"| network | params | forward (no grad) | fwd+bwd | ÷ fwd | JVP (no grad) | ÷ fwd |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.nets:
        torch.manual_seed(0)
        net = build_network(NetConfig(name=name, **layout), shape).to(device)
        x = torch.randn(args.batch, *shape, device=device)
        c = torch.randn(args.batch, device=device)
        tx, tc = torch.randn_like(x), torch.randn_like(c)
        t = pass_times(net, x, c, tx, tc, args.reps, sync)
        f, fb, j = t["forward"], t["fwd+bwd"], t["jvp"]
        n = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"| {name} | {n:.2f}M | {f:.1f} ms | {fb:.1f} ms | {fb / f:.2f} | {j:.1f} ms | {j / f:.2f} |")


if __name__ == "__main__":
    main()
