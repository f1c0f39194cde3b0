"""Command line: ``cmkit train / sample / ...`` (also ``python -m cmkit``).

Errors the user can fix are printed as one paragraph with exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _user_errors() -> tuple[type, ...]:
    from cmkit.checkpoint import CheckpointError
    from cmkit.config import ConfigError
    from cmkit.data import DataError
    from cmkit.train import DivergenceError

    return (ConfigError, DataError, CheckpointError, DivergenceError)


# ----------------------------------------------------------------------------
# Subcommands.


def _positive(value, flag: str, what: str, minimum: int = 1) -> None:
    """Refuse a numeric option below minimum, naming the option and its meaning."""
    from cmkit.config import ConfigError

    if value is not None and value < minimum:
        raise ConfigError(f"{flag} {value} must be >= {minimum} ({what})")


def _check_device(name: str, flag: str = "--device") -> str:
    """A device string that exists on this machine, or a ConfigError naming the option."""
    import re

    import torch

    from cmkit.config import ConfigError

    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{flag} {name} is not a device. Use cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        index = int(name.split(":")[1]) if ":" in name else 0
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {name} but no CUDA GPU is visible on this machine. Use {flag} cpu")
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name} but only {torch.cuda.device_count()} GPU(s) are visible")
    return name


def _check_times(times: list[float] | None, run, flag: str = "--times") -> None:
    """Explicit sampling times: positive (an EDM ODE grid may end at 0), strictly descending, none above t_max."""
    from cmkit.config import ConfigError

    if not times:
        return
    t_max = run.model().process.t_max
    final_zero = run.objective.sample_times(1)[-1] == 0  # EDM's Euler/Heun grids end at σ = 0
    positive = times[:-1] if final_zero and times[-1] == 0 else times
    if any(not (t > 0) for t in positive):  # also NaN
        raise ConfigError(f"{flag} {' '.join(f'{t:g}' for t in times)}: every time must be > 0"
                          + (" (the last may be 0)" if final_zero else ""))
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ConfigError(f"{flag} {' '.join(f'{t:g}' for t in times)} must decrease strictly (highest noise "
                          f"first), e.g. {flag} {t_max:g} {t_max / 100:.3g}")
    if times[0] > t_max * (1 + 1e-6):
        raise ConfigError(f"{flag} starts at {times[0]:g}, above the largest time the model was trained on "
                          f"({t_max:g}); start at or below it")


def config_summary(cfg) -> str:
    """One line for the terminal: method, network, data, budget, device and run directory."""
    net = cfg.net.name + (f" {cfg.net.channels}ch" if cfg.net.name != "mlp" else f" {cfg.net.hidden}x{cfg.net.depth}")
    data = cfg.data.name + (f" {cfg.data.path}" if cfg.data.path else "") + (" (latents)" if cfg.data.vae else "")
    import os

    env = os.environ.get("OMP_NUM_THREADS")
    threads = (f", threads OMP_NUM_THREADS={env} (train.threads={cfg.train.threads} not applied)"
               if env and cfg.train.threads > 0 else "")
    steps = (f"up to {cfg.train.steps} steps (as many as fit train.time_budget_s={cfg.train.time_budget_s:g})"
             if cfg.train.time_budget_s else f"{cfg.train.steps} steps")
    return (f"cmkit: method {cfg.method.name}, net {net}, data {data}, {steps} x batch "
            f"{cfg.train.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr:g}, device {cfg.train.device}{threads}; "
            f"full config in {Path(cfg.run.dir) / 'config.yaml'} (--verbose prints it)")


def cmd_train(args) -> int:
    from cmkit import distributed
    from cmkit.configure import load_config
    from cmkit.train import train

    _positive(args.stop_after, "--stop-after", "steps to run in this job before stopping with a checkpoint")
    cfg = load_config(args.config, args.overrides)
    main_rank = distributed.init(cfg.train.device).is_main  # under torchrun, only rank 0 prints
    if main_rank:
        print(cfg.to_yaml().rstrip("\n") if args.verbose else config_summary(cfg), flush=True)
    run_dir = train(cfg, force=args.force, stop_after=args.stop_after)
    if main_rank:
        print(f"cmkit: run written to {run_dir}")
    return 0


def cmd_sample(args) -> int:
    from cmkit.images import save_samples
    from cmkit.run import load
    from cmkit.sampling import check_guidance, check_temperature

    if Path(args.out).suffix not in (".png", ".npz"):
        from cmkit.config import ConfigError

        raise ConfigError(f"--out '{args.out}' must end in .png (image grid) or .npz (raw samples)")
    _positive(args.steps, "--steps", "sampling steps; 1 = one-step generation")
    _positive(args.n, "--n", "number of samples")
    check_temperature(args.temperature, "--temperature")
    if args.guidance is not None:
        check_guidance(args.guidance, "--guidance")
    _check_device(args.device)
    run = load(args.run, args.checkpoint, device=args.device)
    _check_times(args.times, run)
    labels = sample_labels(args.labels, args.n, run)
    x = run.sample(args.n, args.steps, times=args.times, seed=args.seed, ema=not args.no_ema, guidance=args.guidance,
                   class_labels=labels, temperature=args.temperature)
    save_samples(x, args.out, run.dataset.kind, reference=run.dataset, labels=labels)
    steps = len(args.times) if args.times else args.steps
    how = f"times {' '.join(f'{t:g}' for t in args.times)}" if args.times else f"{steps}-step"
    print(f"cmkit: {args.n} samples ({how}) written to {args.out}")
    return 0


def sample_labels(classes: list[int] | None, n: int, run):
    """The n class labels of `cmkit sample`: --labels cycled over n, else 0, 1, ..., K-1, ...; None if unconditional."""
    import torch

    from cmkit.config import ConfigError
    from cmkit.sampling import cycled_labels

    k = run.dataset.num_classes if run.cfg.net.class_cond else 0
    if not k:
        if classes:
            raise ConfigError("--labels needs a class-conditional run (net.class_cond=true); this one is unconditional")
        return None
    if not classes:
        return cycled_labels(n, k)
    bad = [c for c in classes if not 0 <= c < k]
    if bad:
        raise ConfigError(f"--labels {' '.join(map(str, bad))}: this run's classes are 0..{k - 1}")
    return torch.tensor(classes)[cycled_labels(n, len(classes))]


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config with key=value overrides")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/ict_toy.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 run.dir=runs/x")
    p.add_argument("--force", action="store_true", help="start over in a run directory that holds another run")
    p.add_argument("--stop-after", type=int, default=None, help="end this job after N steps (resume later)")
    p.add_argument("--verbose", action="store_true", help="print the whole resolved config (else one line)")
    p.set_defaults(func=cmd_train)


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--steps", type=int, default=1,
                   help="sampling steps (1 = one-step generation); for diffusion runs (method edm, trigflow) the "
                        "number of network evaluations (NFE) of the ODE solver")
    p.add_argument("--times", type=float, nargs="+", default=None, help="explicit descending times")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", required=True, help=".png grid or .npz (array 'samples', data space)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw student weights")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="class-conditional runs: the classes to draw, repeated over --n (default: 0, 1, ..., K-1, ...); "
                        "an .npz out stores them as array 'labels'")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale w (1 = none): of an sCD student trained with net.guidance_cond=true (default: "
                        "method.guidance), or of a class-conditional model trained with method.label_dropout > 0")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="factor T on the sampler's starting noise (default 1: the model's own distribution; below 1 "
                        "trades recall for precision, the truncation trick; not in the papers)")
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
    if args.task == "interpolate":
        _positive(args.n, "--n", "points along the interpolation path, both ends included", minimum=2)
    _positive(args.steps, "--steps", "noise levels of the edit")
    if args.sigma < 0 or args.sigma != args.sigma:
        raise ConfigError(f"--sigma {args.sigma} must be > 0: the input's noise std in [0, 1] pixel units (denoise)")
    if args.guidance is not None:
        from cmkit.sampling import check_guidance

        check_guidance(args.guidance, "--guidance")
    _check_device(args.device)
    run = load(args.run, args.checkpoint, device=args.device)
    _check_times(args.times, run)
    x = read_images(args.input) if args.input else None
    mask = read_mask(args.mask) if args.mask else None
    out, view = edit_run(run, args.task, x, mask=mask, steps=args.steps, times=args.times, sigma=args.sigma,
                         factor=args.factor, greyscale=args.greyscale, seed=args.seed, seeds=tuple(args.seeds),
                         n=args.n, label=args.label, ema=not args.no_ema, guidance=args.guidance)
    path = Path(args.out)
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, samples=out.numpy(), inputs=view.numpy())
    elif args.task == "interpolate" and run.dataset.kind == "image":  # one path, one row: A ... B
        save_samples(out, path, run.dataset.kind, nrow=len(out))
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
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale w (1 = none): of a guidance-conditional sCD student, or of a class-conditional "
                        "model trained with method.label_dropout > 0 (default: the run's method.guidance)")
    p.add_argument("--compare", action="store_true", help=".png shows the degraded input above each result")
    p.add_argument("--out", required=True, help=".png grid or .npz (arrays 'samples' and 'inputs', data space)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw student weights")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint file")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_edit)


def _data_config(config: str | None, overrides: list[str]):
    """The data section of a YAML config with data.key=value overrides (other sections are ignored)."""
    from cmkit.config import ConfigError
    from cmkit.configure import load_config

    if config is not None and "=" in config and not Path(config).is_file():  # no config file, only overrides
        config, overrides = None, [config, *overrides]
    bad = [o for o in overrides if not o.strip().startswith("data.")]
    if bad:
        raise ConfigError(f"only data.key=value overrides apply here, got {', '.join(bad)}")
    return load_config(config, overrides)


def cmd_train_ae(args) -> int:
    import dataclasses
    import json

    from cmkit.config import ConfigError
    from cmkit.data import load_dataset
    from cmkit.latent.autoencoder import AEConfig, save_autoencoder, train_autoencoder

    _check_device(args.device)
    data = dataclasses.replace(_data_config(args.config, args.overrides).data, vae="")
    ds = load_dataset(data)
    if ds.kind != "image":
        raise ConfigError(f"cmkit train-ae needs image data, but data.name={data.name} holds vectors")
    cfg = AEConfig(in_channels=ds.shape[0], latent_channels=args.latent_channels, channels=args.channels,
                   levels=args.levels, blocks=args.blocks, kl_weight=args.kl_weight)
    try:
        model, summary = train_autoencoder(ds.x, cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                           seed=args.seed, device=args.device, log_every=args.log_every)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    summary["data"] = dataclasses.asdict(data)
    summary["latent_shape"] = [cfg.latent_channels, ds.shape[1] // 2**cfg.levels, ds.shape[2] // 2**cfg.levels]
    out = save_autoencoder(model, args.out, summary)
    print(json.dumps({k: summary[k] for k in ("reconstruction_mse", "latent_shape", "train_seconds")}))
    print(f"cmkit: autoencoder written to {out}; train on its latents with data.vae={out}")
    return 0


def add_train_ae(sub) -> None:
    p = sub.add_parser("train-ae", help="train cmkit's small KL autoencoder on image data (for latent training)")
    p.add_argument("config", nargs="?", help="YAML config whose data section is used (optional)")
    p.add_argument("overrides", nargs="*", help="data.key=value, e.g. data.name=mnist data.pad_to=32")
    p.add_argument("--out", required=True, help="directory for cmkit_ae.json and weights.safetensors")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--channels", type=int, default=16, help="width of the first level")
    p.add_argument("--blocks", type=int, default=0, help="residual blocks per level")
    p.add_argument("--levels", type=int, default=2, help="downsamplings (latent side = side / 2**levels)")
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=500)
    p.set_defaults(func=cmd_train_ae)


def cmd_inspect_data(args) -> int:
    import dataclasses
    import json

    from cmkit.data import load_dataset
    from cmkit.latent.stats import format_stats, outlier_stats, run_td_values

    report: dict = {}
    if args.run is None or args.config is not None or args.overrides:
        data = _data_config(args.config, args.overrides).data
        pixels = load_dataset(dataclasses.replace(data, vae=""))
        report["pixel"] = outlier_stats(pixels.x)
        if data.vae:
            report["latent"] = outlier_stats(load_dataset(data).x)
    if args.run is not None:
        from cmkit.run import load

        run = load(args.run, device=args.device)
        td = run_td_values(run, args.n, num_scales=args.td_steps, seed=args.seed, ema=not args.no_ema)
        report[f"td_N{args.td_steps}"] = outlier_stats(td)
    for name, s in report.items():
        print(format_stats(name, s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"cmkit: statistics written to {args.json}")
    return 0


def add_inspect_data(sub) -> None:
    p = sub.add_parser("inspect-data", help="outlier statistics (iLCT Fig. 1) of pixel/latent data and TD values")
    p.add_argument("config", nargs="?", help="YAML config whose data section is inspected (with data.vae: also latents)")
    p.add_argument("overrides", nargs="*", help="data.key=value")
    p.add_argument("--run", default=None, help="run directory: also the TD values of its model on its training data")
    p.add_argument("--td-steps", type=int, default=21, help="N of the grid for TD values (iLCT Fig. 1: 21)")
    p.add_argument("--n", type=int, default=2000, help="data points for TD values")
    p.add_argument("--no-ema", action="store_true", help="TD of the raw student instead of the EMA model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the statistics to this JSON file")
    p.set_defaults(func=cmd_inspect_data)


def cmd_eval(args) -> int:
    from cmkit.config import ConfigError
    from cmkit.evaluation import evaluate_run, format_table
    from cmkit.sampling import check_guidance, check_temperature

    check_temperature(args.temperature, "--temperature")
    if args.guidance is not None:
        check_guidance(args.guidance, "--guidance")
    _check_device(args.device)
    if args.samples is not None:
        return _eval_samples(args)
    if args.run is None:
        raise ConfigError("cmkit eval needs a run directory, or --samples FILE.npz --data NAME for a file of samples")
    if args.data or args.config or args.range != "auto":
        raise ConfigError("--data, --config and --range apply to --samples only: a run brings its own data config")
    report = evaluate_run(args.run, args.steps, args.n, features=args.features, k=args.k, seed=args.seed,
                          inception_weights=args.inception_weights, reference=args.reference,
                          checkpoint=args.checkpoint, device=args.device, ema=not args.no_ema, out=args.out,
                          temperature=args.temperature, guidance=args.guidance)
    p = report["protocol"]
    print(f"cmkit eval: {args.run} at {p['nimg']} images, {p['n_generated']} samples vs {p['reference']['n']} "
          f"reference ({p['reference']['split']} split), features {p['features']}, k={p['k']}, seed {p['seed']}")
    print(format_table(report))
    print(f"cmkit: metrics written to {args.out or Path(args.run) / 'metrics.json'}")
    return 0


def _eval_samples(args) -> int:
    """cmkit eval --samples FILE: the data and eval sections come from --config (e.g. RUN/config.yaml) and --data."""
    from dataclasses import replace

    from cmkit.config import ConfigError, load_config
    from cmkit.evaluation import evaluate_samples, format_table

    if args.run is not None:
        raise ConfigError("give either a run directory or --samples, not both")
    if not args.data and not args.config:
        raise ConfigError("--samples needs the reference data: --data NAME (e.g. mnist) or --config RUN/config.yaml")
    ignored = [o for o, v in (("--steps", args.steps), ("--n", args.n), ("--checkpoint", args.checkpoint),
                              ("--temperature", args.temperature != 1.0), ("--guidance", args.guidance is not None)) if v]
    if ignored or args.no_ema:
        raise ConfigError(f"{', '.join(ignored + ['--no-ema'] * args.no_ema)} do not apply to --samples "
                          f"(the file's samples are scored as they are)")
    cfg = load_config(args.config, [f"data.name={args.data}"] if args.data else [])
    options = {"features": args.features, "k": args.k, "seed": args.seed, "inception_weights": args.inception_weights,
               "reference": args.reference}
    cfg.eval = replace(cfg.eval, **{key: v for key, v in options.items() if v is not None})
    report = evaluate_samples(args.samples, cfg, value_range=args.range, out=args.out)
    p = report["protocol"]
    print(f"cmkit eval: {args.samples} ({p['n_generated']} samples, read as {p['samples_range']}) vs "
          f"{p['reference']['n']} reference ({p['reference']['data']}, {p['reference']['split']} split), "
          f"features {p['features']}, k={p['k']}")
    print(format_table(report))
    out = args.out or Path(args.samples).with_name(Path(args.samples).stem + "_metrics.json")
    print(f"cmkit: metrics written to {out}")
    return 0


def add_eval(sub) -> None:
    from cmkit.evaluation import FEATURES

    p = sub.add_parser("eval", help="FD, precision/recall (SWD, MMD for vectors; classifier confidence for digits) "
                                    "of a run at several step counts, or of a file of samples")
    p.add_argument("run", nargs="?", default=None, help="run directory (or use --samples)")
    p.add_argument("--samples", default=None,
                   help="evaluate this .npz of any generator's samples instead of a run (array 'samples' or the "
                        "only array; images (n,C,H,W) or (n,H,W,C) in [0,1], [-1,1] or uint8)")
    p.add_argument("--data", default=None, help="--samples: the reference data set, e.g. mnist")
    p.add_argument("--config", default=None,
                   help="--samples: a YAML config whose data and eval sections set the protocol (e.g. RUN/config.yaml)")
    p.add_argument("--range", choices=["auto", "01", "11"], default="auto",
                   help="--samples: float images in [0,1] (01) or [-1,1] (11); auto: [-1,1] if any value < 0")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="sampling step counts (default: eval.steps)")
    p.add_argument("--n", type=int, default=None, help="generated samples per step count (default: eval.n)")
    p.add_argument("--features", choices=FEATURES, default=None,
                   help="auto: bundled classifier (mnist, digits), raw (vectors), else inception")
    p.add_argument("--inception-weights", default=None, help="local weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--reference", choices=["train", "test", "all"], default=None, help="reference split (default test)")
    p.add_argument("--k", type=int, default=None, help="nearest neighbours for precision/recall (default 3)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file (default RUN/metrics.json, or FILE_metrics.json for --samples)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw student weights")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="factor T on the sampler's starting noise, recorded in metrics.json (default 1: the model's "
                        "own distribution; below 1 trades recall for precision, the truncation trick)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale w, recorded in metrics.json: of a guidance-conditional sCD student, or of a "
                        "class-conditional model trained with method.label_dropout > 0 (1 = none)")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint file")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)


def cmd_ema_reconstruct(args) -> int:
    from cmkit.config import ConfigError
    from cmkit.ema import write_reconstruction

    try:
        paths = [write_reconstruction(args.run, s, args.nimg, args.out if len(args.sigma_rel) == 1 else None)
                 for s in args.sigma_rel]
    except ValueError as e:  # no snapshots, a bad σ_rel or nimg: the user's to fix
        raise ConfigError(str(e)) from None
    for path, info in paths:
        used = sum(1 for i in info["inputs"] if abs(i["coefficient"]) > 0)
        print(f"cmkit: sigma_rel={info['sigma_rel']:g} at {info['nimg']} images from {len(info['inputs'])} stored "
              f"averages ({used} with non-zero weight) written to {path}")
    print(f"cmkit: use it with: cmkit sample {args.run} --checkpoint {paths[-1][0]} ... "
          f"or cmkit eval {args.run} --checkpoint {paths[-1][0]}")
    return 0


def add_ema_reconstruct(sub) -> None:
    p = sub.add_parser("ema-reconstruct", help="post-hoc EMA (EDM2): any sigma_rel from the stored power-function EMAs")
    p.add_argument("run", help="run directory trained with train.ema_std=[...] and train.ema_snapshot_every > 0")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True,
                   help="relative EMA length(s) to reconstruct, e.g. 0.05 (EDM2: 0 < sigma_rel < 0.2887)")
    p.add_argument("--nimg", type=int, default=None, help="training time of the result: a snapshot's (default: the last)")
    p.add_argument("--out", default=None,
                   help="output checkpoint (one --sigma-rel only; default RUN/ema_posthoc/ema-<sigma>-<nimg>.safetensors)")
    p.set_defaults(func=cmd_ema_reconstruct)


def cmd_plot(args) -> int:
    from cmkit.evaluation.plot import plot_curves

    out = plot_curves(args.runs, args.out, metric=args.metric, steps=args.steps, labels=args.labels,
                      logy=args.logy, title=args.title)
    print(f"cmkit: {args.metric} curves of {len(args.runs)} run(s) written to {out}")
    return 0


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="FD (or another eval metric) vs images seen of several runs, one PNG")
    p.add_argument("runs", nargs="+", help="run directories trained with eval.every_nimg > 0")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--metric", default="fd", help="fd, precision, recall, swd, mmd (logged as eval/<metric>_<K>step)")
    p.add_argument("--steps", type=int, nargs="+", default=[1], help="step counts to draw")
    p.add_argument("--labels", nargs="+", default=None, help="legend names, one per run")
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)


def cmd_prepare_data(args) -> int:
    from cmkit.config import ConfigError
    from cmkit.data.latents import prepare_latents
    from cmkit.data.prepare import prepare_images
    from cmkit.data.prepared import is_prepared

    progress = not args.no_progress
    if args.vae and is_prepared(args.source) and not args.out:
        pixels = Path(args.source)
    else:
        if not args.out:
            raise ConfigError("cmkit prepare-data needs --out DIR (or a prepared directory as SOURCE with --vae)")
        index = prepare_images(args.source, args.out, resolution=args.resolution, transform=args.transform,
                               labels=not args.no_labels, max_images=args.max_images, workers=args.workers,
                               chunk=args.chunk, force=args.force, progress=progress, cache_dir=args.cache_dir)
        pixels = Path(args.out)
        print(f"cmkit: {index['x']['shape'][0]} images {index['x']['shape'][1:]} uint8 in {pixels} "
              f"(sha256 {index['sha256'][:12]}…); train on them with data.name=prepared data.path={pixels}")
    if args.vae:
        index = prepare_latents(pixels, args.vae, pad_to=args.pad_to, batch_size=args.batch_size, device=args.device,
                                chunk=args.chunk, force=args.force, progress=progress)
        print(f"cmkit: latents {index['x']['shape']} float16 of autoencoder {index['autoencoder'][:12]}… written; "
              f"train on them with data.name=prepared data.path={pixels} data.vae={args.vae}"
              + (f" data.pad_to={args.pad_to}" if args.pad_to else ""))
    return 0


def add_prepare_data(sub) -> None:
    p = sub.add_parser("prepare-data", help="images (folder, zip, .npy/.npz, mnist) -> uint8 memmap; --vae: latents")
    p.add_argument("source", help="image folder, EDM-style .zip of images, .npy/.npz (uint8), 'mnist' (bundled), "
                                  "or with --vae a prepared directory")
    p.add_argument("--out", default="", help="directory to write (images.npy, labels.npy, index.json)")
    p.add_argument("--resolution", type=int, default=0, help="resize to N x N (0 = keep; sizes must then agree)")
    p.add_argument("--transform", default="center-crop", help="center-crop (EDM dataset_tool) | scale (resize only)")
    p.add_argument("--no-labels", action="store_true", help="ignore dataset.json / y labels")
    p.add_argument("--max-images", type=int, default=0, help="keep only the first N images (0 = all)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding an image folder")
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk (hash and resume unit; 0 = about 64 MiB)")
    p.add_argument("--force", action="store_true", help="replace a prepared dataset made with other options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cache-dir", default="~/.cache/cmkit", help="where the bundled MNIST is cached")
    p.add_argument("--vae", default="", help="autoencoder directory: also encode the images to float16 latents")
    p.add_argument("--pad-to", type=int, default=0, help="--vae: pad images with -1 to this size before encoding "
                                                         "(train with the same data.pad_to)")
    p.add_argument("--batch-size", type=int, default=256, help="--vae: images encoded at a time")
    p.add_argument("--device", default="auto", help="--vae: where to encode (auto = cuda if present)")
    p.set_defaults(func=cmd_prepare_data)


# Explicit list of subcommand builders (STYLE 10).
COMMANDS = [add_train, add_sample, add_edit, add_train_ae, add_inspect_data, add_eval, add_plot, add_prepare_data,
            add_ema_reconstruct]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmkit", description="Consistency-model training toolkit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():  # `cmkit train ... --debug` works as well as `cmkit --debug train ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _show_warning(default):
    """A warnings.showwarning that prints CheckpointWarnings as ``cmkit: warning: ...`` and passes others on."""
    from cmkit.checkpoint import CheckpointWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointWarning):
            print("cmkit: warning: " + " ".join(str(message).split()), file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while torch and cmkit are still being imported, or during start-up
        print("cmkit: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # key=value overrides may also follow options (`cmkit train CFG --force train.steps=10`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error("unrecognized arguments: " + " ".join(extra))
    try:
        with warnings.catch_warnings():  # cmkit's own warnings: one line each on stderr, each message once
            from cmkit.checkpoint import CheckpointWarning

            warnings.simplefilter("once", CheckpointWarning)
            warnings.showwarning = _show_warning(warnings.showwarning)
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
        import errno

        what = f"{e.strerror or e}" + (f": '{e.filename}'" if e.filename else "")
        hint = (" Free disk space, then re-run the same command: it resumes from the last checkpoint."
                if e.errno in (errno.ENOSPC, errno.EDQUOT) else " Rerun with --debug for the traceback.")
        print(f"cmkit: error: {what}.{hint}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one paragraph by default, the traceback with --debug
        if args.debug:
            raise
        print(f"cmkit: internal error: {type(e).__name__}: {e}. Rerun with --debug for the traceback and "
              f"please report it.", file=sys.stderr)
        return 1
