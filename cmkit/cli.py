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

    return (ConfigError, DataError, CheckpointError)


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


# Explicit list of subcommand builders (STYLE 10).
COMMANDS = [add_train, add_sample]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmkit", description="Consistency-model training toolkit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
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
        print(f"cmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmkit: interrupted", file=sys.stderr)
        return 130
