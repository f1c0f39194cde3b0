"""Command line: ``cmkit train / sample / ...`` (also ``python -m cmkit``).

Errors the user can fix are printed as one paragraph with exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _user_errors() -> tuple[type, ...]:
    from cmkit.checkpoint import CheckpointError
    from cmkit.config import ConfigError
    from cmkit.data import DataError
    from cmkit.train import DivergenceError

    return (ConfigError, DataError, CheckpointError, DivergenceError)


# ----------------------------------------------------------------------------
# Subcommands.


def cmd_train(args) -> int:
    from cmkit.config import load_config
    from cmkit.train import train

    cfg = load_config(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    run_dir = train(cfg, force=args.force, stop_after=args.stop_after)
    print(f"cmkit: run written to {run_dir}")
    return 0


def cmd_sample(args) -> int:
    from cmkit.images import save_samples
    from cmkit.run import load

    if Path(args.out).suffix not in (".png", ".npz"):
        from cmkit.config import ConfigError

        raise ConfigError(f"--out '{args.out}' must end in .png (image grid) or .npz (raw samples)")
    run = load(args.run, args.checkpoint, device=args.device)
    x = run.sample(args.n, args.steps, times=args.times, seed=args.seed, ema=not args.no_ema)
    save_samples(x, args.out, run.dataset.kind)
    print(f"cmkit: {args.n} samples ({args.steps}-step) written to {args.out}")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config with key=value overrides")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/ict_toy.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 run.dir=runs/x")
    p.add_argument("--force", action="store_true", help="start over in a run directory that holds another run")
    p.add_argument("--stop-after", type=int, default=None, help="end this job after N steps (resume later)")
    p.set_defaults(func=cmd_train)


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--steps", type=int, default=1, help="sampling steps (1 = one-step generation)")
    p.add_argument("--times", type=float, nargs="+", default=None, help="explicit descending times")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", required=True, help=".png grid or .npz (array 'samples', data space)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw student weights")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint file")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)


def cmd_edit(args) -> int:
    import numpy as np
    import torch

    from cmkit.config import ConfigError
    from cmkit.editing import edit_run, read_images, read_mask
    from cmkit.images import image_grid, save_samples
    from cmkit.run import load

    if Path(args.out).suffix not in (".png", ".npz"):
        raise ConfigError(f"--out '{args.out}' must end in .png (image grid) or .npz (arrays 'samples', 'inputs')")
    if args.task == "interpolate" and args.input:
        raise ConfigError("--task interpolate takes no --input: it interpolates between --seeds A B")
    run = load(args.run, args.checkpoint, device=args.device)
    x = read_images(args.input) if args.input else None
    mask = read_mask(args.mask) if args.mask else None
    out, view = edit_run(run, args.task, x, mask=mask, steps=args.steps, times=args.times, sigma=args.sigma,
                         factor=args.factor, greyscale=args.greyscale, seed=args.seed, seeds=tuple(args.seeds),
                         n=args.n, label=args.label, ema=not args.no_ema)
    path = Path(args.out)
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, samples=out.numpy(), inputs=view.numpy())
    elif args.task == "interpolate" or not args.compare:
        save_samples(out, path, run.dataset.kind)
    else:  # rows: degraded input, result
        from PIL import Image

        view = view.expand(-1, out.shape[1], -1, -1) if view.shape[1] != out.shape[1] else view
        pairs = torch.cat([view.float().cpu(), out])
        grid = image_grid(pairs, nrow=len(out))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    print(f"cmkit: {args.task}: {len(out)} images written to {path}")
    return 0


def add_edit(sub) -> None:
    from cmkit.editing import GREYSCALE, TASKS

    p = sub.add_parser("edit", help="zero-shot editing: inpaint, colorize, superres, denoise, interpolate")
    p.add_argument("run", help="run directory")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--input", default=None, help="image file or .npz/.npy of images in [0, 1]")
    p.add_argument("--mask", default=None, help="inpaint: image or array, white (1) = pixels to generate")
    p.add_argument("--steps", type=int, default=None, help="number of noise levels (default per task)")
    p.add_argument("--times", type=float, nargs="+", default=None, help="explicit descending noise levels")
    p.add_argument("--sigma", type=float, default=0.0, help="denoise: noise std of the input in [0, 1] units")
    p.add_argument("--factor", type=int, default=0, help="superres: downsampling factor (default from sizes, or 2)")
    p.add_argument("--greyscale", default="luminance", choices=sorted(GREYSCALE), help="colorize: grey operator")
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="interpolate: the two seeds")
    p.add_argument("--n", type=int, default=8, help="interpolate: number of points")
    p.add_argument("--label", type=int, default=None, help="class label for class-conditional runs")
    p.add_argument("--compare", action="store_true", help=".png shows the degraded input above each result")
    p.add_argument("--out", required=True, help=".png grid or .npz (arrays 'samples' and 'inputs', data space)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw student weights")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint file")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_edit)


# Explicit list of subcommand builders (STYLE 10).
COMMANDS = [add_train, add_sample, add_edit]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmkit", description="Consistency-model training toolkit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():  # `cmkit train ... --debug` works as well as `cmkit --debug train ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        if args.debug:
            raise
        print("cmkit: error: " + " ".join(str(e).split()), file=sys.stderr)  # one paragraph, even for YAML errors
        return 2
    except KeyboardInterrupt:
        print("cmkit: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, missing files outside the checks above
        if args.debug:
            raise
        print(f"cmkit: error: {e}. Rerun with --debug for the traceback.", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one paragraph by default, the traceback with --debug
        if args.debug:
            raise
        print(f"cmkit: internal error: {type(e).__name__}: {e}. Rerun with --debug for the traceback and "
              f"please report it.", file=sys.stderr)
        return 1
