"""Example inputs and masks for ``cmkit edit`` from bundled data, and (given a run) the README grid.

    python scripts/make_edit_examples.py --out runs/edit_examples            # inputs and masks
    python scripts/make_edit_examples.py --run runs/mnist --grid docs/img/editing.png --sweep

Writes, from the test split of the bundled data (images in [0, 1]): clean.npz, mask_center.png,
mask_left.png, mask_random.png (white = pixels to generate), low_x2.npz and low_x4.npz (block
means), noisy_0.2.npz (Gaussian noise of std 0.2, unclipped), and for RGB data grey.npz.
With --run it edits them with the run's model and writes a before/after grid; --sweep prints the
error of each task against the clean images for several step counts (the per-task defaults).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmkit.config import DataConfig
from cmkit.data import load_dataset

NOISE = 0.2  # denoising example: std in [0, 1] pixel units


def inputs_config(data: str, run=None) -> DataConfig:
    """The test split of the run's own data config (its padding, path, seed), in pixels; else bundled ``data``."""
    if run is not None:
        return replace(run.cfg.data, split="test", vae="", labels=True)
    return DataConfig(name=data, split="test", labels=True)


def make_inputs(data: str | DataConfig, n: int, out: Path, seed: int) -> dict:
    """Write the example files (from a bundled dataset name or a DataConfig); return them as tensors (data space)."""
    ds = load_dataset(data if isinstance(data, DataConfig) else inputs_config(data))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n]
    x = ds.to_data_space(ds.x[idx])  # (n, C, H, W) in [0, 1]
    _, c, h, w = x.shape
    out.mkdir(parents=True, exist_ok=True)
    masks = {"center": torch.zeros(h, w, dtype=torch.bool), "left": torch.zeros(h, w, dtype=torch.bool)}
    masks["center"][h // 4: h - h // 4, w // 4: w - w // 4] = True
    masks["left"][:, : w // 2] = True
    masks["random"] = torch.rand(h, w, generator=g) < 0.7
    for name, m in masks.items():
        Image.fromarray(m.numpy().astype(np.uint8) * 255).save(out / f"mask_{name}.png")
    files = {"clean": x, "noisy_0.2": x + NOISE * torch.randn(x.shape, generator=g)}
    for f in (2, 4):
        if h % f == 0 and w % f == 0:
            files[f"low_x{f}"] = torch.nn.functional.avg_pool2d(x, f)
    if c == 3:
        files["grey"] = (x * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    for name, arr in files.items():
        np.savez(out / f"{name}.npz", x=arr.numpy())
    print(f"wrote {', '.join(files)} (.npz) and {len(masks)} masks to {out}")
    return {"masks": masks, "labels": ds.labels[idx] if ds.labels is not None else None, **files}


def edit_all(run, ex: dict, steps: dict | None = None, seed: int = 0) -> dict:
    """Run every applicable task on the examples; results in data space."""
    from cmkit.editing import edit_run

    steps = steps or {}
    x, res = ex["clean"], {}
    label = ex["labels"] if run.cfg.net.class_cond else None  # a class-conditional model edits each image as its digit
    res["inpaint"] = edit_run(run, "inpaint", x, mask=ex["masks"]["center"][None, None], seed=seed,
                              steps=steps.get("inpaint"), label=label)
    if "low_x4" in ex:
        res["superres"] = edit_run(run, "superres", ex["low_x4"], seed=seed, steps=steps.get("superres"), label=label)
    if "grey" in ex and run.dataset.shape[0] == 3:
        res["colorize"] = edit_run(run, "colorize", ex["grey"], seed=seed, steps=steps.get("colorize"), label=label)
    res["denoise"] = edit_run(run, "denoise", ex["noisy_0.2"], sigma=NOISE, seed=seed, label=label)
    return res


def sweep(run, ex: dict, step_counts=(1, 2, 4, 10, 20, 40, 80)) -> None:
    """Per task and step count: mean squared error against the clean images (on the generated part)
    and the committed digit classifier's accuracy on the results (does the edit keep the digit?)."""
    from cmkit.editing import AvgPool
    from cmkit.evaluation.classifier import CLASSIFIERS, WEIGHTS_DIR, centre_crop, load_classifier

    name = run.cfg.data.name
    net, _ = load_classifier(WEIGHTS_DIR / CLASSIFIERS[name][0])

    def acc(y):
        with torch.no_grad():
            return (net(centre_crop(y.clamp(0, 1), CLASSIFIERS[name][1])).argmax(1) == ex["labels"]).double().mean()

    x, hole = ex["clean"], ex["masks"]["center"]
    print("task      steps  mse     classifier accuracy")
    print(f"clean                   {acc(x):.3f}")
    fill = torch.where(hole, x.mean(), x)
    print(f"inpaint   (hole filled with the mean pixel value)  {((fill - x) ** 2)[..., hole].mean():.4f}  {acc(fill):.3f}")
    if "low_x4" in ex:
        up = AvgPool(4).pinv(ex["low_x4"])
        print(f"superres  (nearest upsampling)  {((up - x) ** 2).mean():.4f}  {acc(up):.3f}")
    for k in step_counts:
        res = edit_all(run, ex, {"inpaint": k, "superres": k, "colorize": k})
        y = res["inpaint"][0]
        print(f"inpaint   {k:5d}  {((y - x) ** 2)[..., hole].mean():.4f}  {acc(y):.3f}")
        if "superres" in res:
            print(f"superres  {k:5d}  {((res['superres'][0] - x) ** 2).mean():.4f}  {acc(res['superres'][0]):.3f}")
        if "colorize" in res:
            print(f"colorize  {k:5d}  {((res['colorize'][0] - x) ** 2).mean():.4f}")
    res = edit_all(run, ex)
    noisy = ex["noisy_0.2"].clamp(0, 1)
    print(f"denoise       1  {((res['denoise'][0] - x) ** 2).mean():.4f}  {acc(res['denoise'][0]):.3f}  "
          f"(noisy input: {((noisy - x) ** 2).mean():.4f}  {acc(noisy):.3f})")


def write_grid(run, ex: dict, path: Path, seed: int = 0) -> None:
    """Rows: original; then (input, result) for each task; then a slerp interpolation."""
    from cmkit.editing import edit_run
    from cmkit.images import image_grid

    res = edit_all(run, ex, seed=seed)
    n = ex["clean"].shape[0]
    rows = [ex["clean"]]
    for task in ("inpaint", "superres", "colorize", "denoise"):
        if task in res:
            out, view = res[task]
            rows += [view.expand_as(out), out]
    label = int(ex["labels"][0]) if run.cfg.net.class_cond else None
    rows.append(edit_run(run, "interpolate", seeds=(seed, seed + 1), n=n, label=label)[0])
    grid = image_grid(torch.cat([r.float() for r in rows]), nrow=n, min_size=28)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img.save(path, optimize=True)
    print(f"grid ({len(rows)} rows: original, " + ", ".join(f"{t} in/out" for t in res) +
          f", interpolation) written to {path}, {path.stat().st_size // 1024} KB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mnist", help="bundled dataset: mnist or digits (ignored with --run)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--out", default="runs/edit_examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default=None, help="a trained run to edit the examples with")
    p.add_argument("--grid", default=None, help="write the before/after grid here (.png)")
    p.add_argument("--sweep", action="store_true", help="print errors for several step counts")
    p.add_argument("--sweep-n", type=int, default=256, help="test images scored by --sweep")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = None
    if args.run:
        from cmkit.run import load

        run = load(args.run)
    data = inputs_config(args.data, run)  # with --run: the run's data (e.g. MNIST padded to 32), not --data
    ex = make_inputs(data, args.n, Path(args.out), args.seed)
    if run is not None:
        if args.grid:
            write_grid(run, ex, Path(args.grid), args.seed)
        if args.sweep:
            sweep(run, make_inputs(data, args.sweep_n, Path(args.out) / "sweep", args.seed + 1))


if __name__ == "__main__":
    main()
