"""NCSN++ cost: forward, forward+backward and JVP time at a small size, as ratios to the forward (issue 16).

Usage: python benchmarks/ncsnpp.py [--batch 8] [--reps 5] [--channels 32] [--threads 1]. Prints a Markdown table.
The JVP is sCM's tangent pass: torch.func.jvp in (x, c_noise) under no_grad, parameters fixed (MACHINE-NOTES 1).
cmkit's U-Net at the same width and depth is timed beside it.
"""

from __future__ import annotations

import argparse

import torch

from cmkit.nets.ncsnpp import NCSNpp
from cmkit.nets.unet import UNet
from passes import pass_times


def measure(net: torch.nn.Module, batch: int, reps: int) -> dict[str, float]:
    x, c = torch.randn(batch, 3, 32, 32), torch.randn(batch)
    return pass_times(net, x, c, torch.randn_like(x), torch.randn_like(c), reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ch = args.channels
    nets = {
        "NCSN++ (Score SDE layout)": NCSNpp((3, 32, 32), channels=ch, channel_mult=(1, 2, 2, 2), num_blocks=2,
                                            dropout=0.1),
        "NCSN++ positional + double_norm (sCM)": NCSNpp((3, 32, 32), channels=ch, channel_mult=(1, 2, 2, 2),
                                                        num_blocks=2, dropout=0.1, embedding="positional",
                                                        modulation="double_norm"),
        "U-Net (cmkit, same width/depth)": UNet((3, 32, 32), channels=ch, channel_mult=(1, 2, 2, 2), num_blocks=2,
                                                dropout=0.1),
    }
    print(f"batch {args.batch}, 3x32x32, channels {ch}, channel_mult [1,2,2,2], 2 blocks/level, attention at 16, "
          f"{args.threads} thread(s), median of {args.reps}\n")
    print("| network | params | forward ms | fwd+bwd ms (×fwd) | jvp ms (×fwd) |")
    print("| --- | --- | --- | --- | --- |")
    for name, net in nets.items():
        net.train()  # dropout on, as in training
        t = measure(net, args.batch, args.reps)
        n = sum(p.numel() for p in net.parameters())
        print(f"| {name} | {n / 1e6:.2f}M | {t['forward']:.0f} | {t['fwd+bwd']:.0f} ({t['fwd+bwd'] / t['forward']:.2f}×) "
              f"| {t['jvp']:.0f} ({t['jvp'] / t['forward']:.2f}×) |")


if __name__ == "__main__":
    main()
