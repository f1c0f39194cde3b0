"""Peak memory of attention's tangent pass on CPU: math vs blockwise at growing token counts (issue 18).

Each point runs in a fresh subprocess: the no-grad torch.func.jvp of one attention call over (B, H, N, d)
inputs and tangents, and reports the peak resident set size above the process's level after the inputs
were allocated (ru_maxrss). math stores the N×N weights and their tangent (quadratic); blockwise holds
block×block pieces (its extra memory stays flat; the O(N·d) inputs/outputs are outside the measure).

    OMP_NUM_THREADS=1 python benchmarks/scm_attention_memory.py --tokens 256 1024 2304 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from cmkit.nets import attention as att
kernel, N, B, H, d, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = [torch.randn(B, H, N, d, generator=g) for _ in range(6)]
out = torch.empty(B, H, N, d), torch.empty(B, H, N, d)  # the result's memory is touched before the baseline
out[0].fill_(0); out[1].fill_(0)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn = att.math_attention if kernel == "math" else (lambda q, k, v: att.blockwise_attention(q, k, v, None, block))
t0 = time.perf_counter()
with torch.no_grad():
    o, t = torch.func.jvp(fn, tuple(x[:3]), tuple(x[3:]))
sec = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kernel": kernel, "N": N, "extra_mib": (peak - base) / 1024, "s": sec}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2304, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for N in args.tokens:
        for kernel in ("math", "blockwise"):
            res = subprocess.run([sys.executable, "-c", CHILD, kernel, str(N), str(args.batch), str(args.heads),
                                  str(args.head_dim), str(args.block)], capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    nn_mib = {N: args.batch * args.heads * N * N * 4 / 2**20 for N in args.tokens}
    print(f"| tokens N | one N×N float32 matrix (MiB) | math: extra peak (MiB) | blockwise: extra peak (MiB) "
          f"| math s | blockwise s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for N in args.tokens:
        m = next(r for r in rows if r["N"] == N and r["kernel"] == "math")
        b = next(r for r in rows if r["N"] == N and r["kernel"] == "blockwise")
        print(f"| {N} | {nn_mib[N]:.0f} | {m['extra_mib']:.0f} | {b['extra_mib']:.0f} | {m['s']:.2f} | {b['s']:.2f} |")


if __name__ == "__main__":
    main()
