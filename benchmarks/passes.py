"""The three network passes every backbone benchmark times: forward (no grad), forward+backward, JVP.

Shared by benchmarks/backbones.py, edm2.py and ncsnpp.py (run as scripts, so this file is importable as
``passes``). JVP is the no-grad ``torch.func.jvp`` of F(x, c_noise) in both inputs: sCM's tangent pass.
"""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, reps: int, sync=lambda: None) -> float:
    """Median milliseconds per call over reps calls after one warm-up (the median resists a shared machine)."""
    fn()  # warm-up (functorch traces its decompositions on the first JVP)
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def pass_times(net: torch.nn.Module, x, c, dx, dc, reps: int, sync=lambda: None) -> dict[str, float]:
    """Milliseconds of forward, forward+backward and JVP of net at (x, c) with tangents (dx, dc)."""

    def forward():
        with torch.no_grad():
            net(x, c)

    def forward_backward():
        net.zero_grad(set_to_none=True)
        net(x, c).square().mean().backward()

    def jvp():
        with torch.no_grad():
            torch.func.jvp(lambda a, b: net(a, b), (x, c), (dx, dc))

    return {"forward": timed(forward, reps, sync), "fwd+bwd": timed(forward_backward, reps, sync),
            "jvp": timed(jvp, reps, sync)}
