"""Typed configuration: dataclasses, YAML files and ``key=value`` overrides.

A config has six sections. ``data``, ``net``, ``train``, ``run`` and ``eval`` have fixed
dataclasses; ``method`` is the dataclass that the chosen objective declares
(``cmkit.objectives.METHODS[name].config``), so each method validates its own options.
Unknown keys and wrong types fail early with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # train.device values (resolve_device checks that CUDA is there)


# ----------------------------------------------------------------------------
# Fixed sections.


@dataclass
class DataConfig:
    name: str = "eight_gaussians"  # see cmkit.data.DATASETS
    path: str = ""  # image folder or .npy/.npz file for name=folder / name=array
    n: int = 20000  # number of points drawn for the 2-D toy sets
    pad_to: int = 0  # pad square images with -1 to this size (e.g. 32 for MNIST); 0 = keep
    resolution: int = 0  # resize image folders to this size; 0 = require equal sizes
    workers: int = 0  # processes decoding an image folder once at start; 0 = one per CPU core (max 8), 1 = none
    split: str = "train"  # train | test | all
    labels: bool = False  # keep class labels (class-conditional training)
    cache_dir: str = "~/.cache/cmkit"  # parsed bundled data is cached here
    seed: int = 0  # seed of the toy sets and of the train/test split
    vae: str = ""  # autoencoder directory (cmkit train-ae or diffusers AutoencoderKL): train on its latents
    loader_workers: int = 0  # data.name=prepared: DataLoader worker processes reading batches (0 = in the training process)
    verify: str = "auto"  # data.name=prepared: full (sha256 of every chunk at start) | size (sizes only) | auto (full up to 4 GiB)

    def validate(self) -> None:
        for key in ("pad_to", "resolution", "workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key}={getattr(self, key)} must be >= 0 (0 = off / default)")
        if self.n < 1:
            raise ValueError(f"data.n={self.n} must be >= 1 (points drawn for the toy sets)")


@dataclass
class NetConfig:
    name: str = "mlp"  # see cmkit.nets.NETWORKS
    channels: int = 64  # U-Net base width
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_blocks: int = 2  # residual blocks per resolution
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    num_heads: int = 1
    dropout: float = 0.0
    dropout_max_res: int = 0  # U-Net: dropout only at resolutions <= this (iCT App. B, ImageNet 64: 16); 0 = all
    embedding: str = "fourier"  # fourier | positional
    fourier_scale: float = 0.02  # iCT Sec. 3.1: 0.02 instead of 16
    emb_dim: int = 0  # time-embedding width; 0 = 4 * channels (U-Net) or hidden (MLP)
    norm: str = "group"  # normalisation layer of the U-Net, see cmkit.nets.layers.NORMS
    num_groups: int = 32  # GroupNorm groups (capped by the channel count)
    hidden: int = 256  # MLP width
    depth: int = 4  # MLP hidden layers
    class_cond: bool = False  # condition on class labels (needs data.labels=true)
    guidance_cond: bool = False  # take the CFG scale w as an input (sCD with a guided teacher, sCM Sec. 5.2)
    modulation: str = "film"  # U-Net ResBlock conditioning: film (ADM AdaGN) | double_norm (sCM Sec. 4.1)
    progressive: str = "none"  # NCSN++ output pyramid: none | output_skip (Score SDE model.progressive)
    progressive_input: str = "residual"  # NCSN++ input pyramid: residual | none (Score SDE model.progressive_input)
    fir_kernel: list[int] = field(default_factory=lambda: [1, 3, 3, 1])  # NCSN++ FIR resampling filter (Score SDE)
    head_dim: int = 8  # diffusers_unet: UNet2DModel attention_head_dim (ACT Table 5: 8 CIFAR-10, 16 ImageNet 64)
    diffusers_config: str = ""  # diffusers_unet: preset (act_cifar10 | act_imagenet64) or UNet2DModel config.json; "" = the net.* keys
    patch_size: int = 2  # dit: patch size p (width net.hidden, blocks net.depth, heads net.num_heads)
    dit: str = ""  # dit: a Peebles & Xie Table 1 preset (DiT-S/2 ... DiT-XL/8); "" = the net.* keys above
    channels_per_head: int = 64  # edm2: attention heads per block = block width / channels_per_head (EDM2)
    logvar_channels: int = 0  # edm2: width of EDM2's log-variance head (EDM2: 128), sCT/sCD's w_φ; 0 = none
    attention: str = "auto"  # attention kernel: auto | math | sdpa | blockwise | flash_jvp (cmkit.nets.attention)


@dataclass
class TrainConfig:
    steps: int = 2000  # optimiser steps; total images = steps * batch_size
    batch_size: int = 256  # global batch (split across ranks under torchrun)
    optimizer: str = "radam"  # radam | adam
    lr: float = 1e-4  # iCT App. B: RAdam, lr 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8  # Adam/RAdam ε (PyTorch's default; EDM2 uses 1e-8 too, training_loop.py)
    weight_decay: float = 0.0
    warmup_nimg: int = 0  # linear learning-rate warm-up over this many images
    lr_ref_nimg: int = 0  # EDM2 inverse-sqrt decay: lr / √max(nimg / lr_ref_nimg, 1) (Karras et al. 2024); 0 = constant
    lr_decay: str = "none"  # none | cosine | linear: anneal from the end of warm-up to lr_final × lr at the last step
    lr_final: float = 0.0  # lr_decay's end point, as a fraction of the base lr
    grad_clip: float = 0.0  # clip the global gradient norm; 0 = off
    ema: list[float] = field(default_factory=lambda: [0.9999])  # student EMA decay rates
    ema_sample: int = 0  # which EMA rate (index) sampling and evaluation use
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = leave PyTorch's default
    accumulate: int = 1  # micro-batches per rank per step (gradient accumulation); batch_size stays global
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling, CUDA only) | auto (bf16 where native)
    compile: bool = False  # torch.compile the backbone (no gain measured on CPU; sCM: the student pass only, JVP eager)
    max_bad_steps: int = 10  # stop after this many consecutive steps skipped for non-finite loss/grad; 0 = never
    spike_factor: float = 0.0  # stop if the loss exceeds this × |running median| of recent losses; 0 = off
    tf32: bool = False  # CUDA: TF32 matmuls/convolutions (EDM/EDM2 keep them off); sCM's tangent pass: method.jvp_tf32
    channels_last: bool = False  # CUDA: channels-last memory format for the image backbone's convolutions
    ema_warmup: bool = False  # train.ema rates ramp as min(μ, (1+k)/(10+k)) over updates k (cmkit.ema; TF's EMA form)
    ema_std: list[float] = field(default_factory=list)  # EDM2 power-function EMAs by σ_rel, e.g. [0.05, 0.1]; indexed after train.ema
    ema_snapshot_every: int = 0  # steps between snapshots of the ema_std EMAs (post-hoc reconstruction); 0 = off
    # Fit the run to this many seconds of training steps on this machine: a fresh run first times a few probe steps,
    # then trains min(train.steps, budget / step time) steps, with every schedule spanning those (recorded in
    # config.yaml; a resume keeps them). Checkpoints, samples and periodic evaluation are not counted. 0 = off.
    time_budget_s: float = 0.0

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.accumulate < 1:
            raise ValueError("train.steps must be >= 0, train.batch_size and train.accumulate >= 1")
        if not self.lr > 0 or self.grad_clip < 0 or self.warmup_nimg < 0 or self.weight_decay < 0:
            raise ValueError("train.lr must be > 0; train.grad_clip, train.warmup_nimg, train.weight_decay >= 0")
        if not self.eps > 0 or self.lr_ref_nimg < 0:
            raise ValueError("train.eps must be > 0 and train.lr_ref_nimg >= 0 (0 = no inverse-sqrt decay)")
        if self.lr_decay not in ("none", "cosine", "linear"):
            raise ValueError(f"train.lr_decay='{self.lr_decay}' is not valid. Choose one of: none, cosine, linear")
        if not 0 <= self.lr_final <= 1:
            raise ValueError(f"train.lr_final={self.lr_final} must be in [0, 1] (a fraction of train.lr)")
        if self.max_bad_steps < 0 or self.spike_factor < 0:
            raise ValueError("train.max_bad_steps and train.spike_factor must be >= 0")
        from cmkit.ema import profiles_of

        profiles = profiles_of(self.ema, self.ema_std, self.ema_warmup)  # ValueError names the bad rate or σ_rel
        if not profiles:
            raise ValueError("train.ema and train.ema_std are both empty: give at least one EMA (e.g. train.ema=[0.999])")
        if not 0 <= self.ema_sample < len(profiles):
            raise ValueError(f"train.ema_sample={self.ema_sample} must index train.ema followed by train.ema_std "
                             f"(0..{len(profiles) - 1})")
        if self.ema_snapshot_every < 0 or (self.ema_snapshot_every and not self.ema_std):
            raise ValueError("train.ema_snapshot_every must be >= 0, and > 0 only with power-function EMAs "
                             "(train.ema_std=[0.05,0.1]): snapshots store those for cmkit ema-reconstruct")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"train.device='{self.device}' is not a device. Use auto, cpu, cuda or cuda:N")
        if not self.time_budget_s >= 0 or self.time_budget_s == float("inf"):
            raise ValueError(f"train.time_budget_s={self.time_budget_s} must be a finite number of seconds >= 0 "
                             f"(0 = train exactly train.steps)")
        if self.threads < 0:
            raise ValueError(f"train.threads={self.threads} must be >= 0 (0 = PyTorch's default or OMP_NUM_THREADS)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas={self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    log_every: int = 50  # steps
    sample_every: int = 0  # steps between sample grids; 0 = only at the end
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3  # the last K checkpoints are kept
    milestone_every: int = 0  # steps between milestone checkpoints, kept forever in checkpoints/milestones/
    sample_steps: list[int] = field(default_factory=lambda: [1, 2])  # grids at these step counts
    sample_n: int = 64
    tensorboard: bool = True
    progress: bool = True  # progress bar on the terminal

    def validate(self) -> None:
        if not self.dir.strip():
            raise ValueError("run.dir is empty. Name the run directory, e.g. run.dir=runs/my_run")
        if self.log_every < 1:
            raise ValueError(f"run.log_every={self.log_every} must be >= 1 (steps between log records)")
        for key in ("sample_every", "checkpoint_every", "milestone_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"run.{key}={getattr(self, key)} must be >= 0 (0 = only at the end / never)")
        if self.keep_checkpoints < 0:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints} must be >= 0 (0 keeps every checkpoint)")
        if any(k < 1 for k in self.sample_steps):
            raise ValueError(f"run.sample_steps={self.sample_steps}: step counts must be >= 1, e.g. [1, 2]")
        if self.sample_n < 1:
            raise ValueError(f"run.sample_n={self.sample_n} must be >= 1 (samples per grid)")


@dataclass
class EvalConfig:
    every_nimg: int = 0  # evaluate during training every this many images; 0 = off
    n: int = 1000  # generated samples per evaluation
    steps: list[int] = field(default_factory=lambda: [1, 2])
    features: str = "auto"  # auto | classifier | inception | raw (see cmkit.evaluation.features)
    reference: str = "test"  # data split the samples are compared with (train | test | all)
    n_ref: int = 0  # reference samples (a seeded subset); 0 = the whole split
    k: int = 3  # nearest neighbours of the precision/recall manifolds (Kynkäänniemi et al. 2019)
    seed: int = 0  # seed of the generated samples and of the random projections
    inception_weights: str = ""  # local weights-inception-2015-12-05-6726825d.pth for features=inception

    def validate(self) -> None:
        if self.reference not in ("train", "test", "all"):
            raise ValueError(f"eval.reference='{self.reference}' is not valid. Choose one of: train, test, all")
        if self.k < 1 or self.n <= self.k:
            raise ValueError(f"eval.k={self.k} must be >= 1 and eval.n={self.n} larger than it (precision/recall)")
        if self.every_nimg < 0 or self.n_ref < 0:
            raise ValueError("eval.every_nimg and eval.n_ref must be >= 0")


FIXED_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "net": NetConfig,
    "train": TrainConfig,
    "run": RunConfig,
    "eval": EvalConfig,
}
SECTIONS = ("data", "net", "method", "train", "run", "eval")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    method: Any = None  # the objective's own dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------
# Type checking of values.


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `key=5` for a list-valued key means [5]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 2e6 in YAML is a float
        if isinstance(value, str):
            try:
                f = float(value)  # "2e6", "2M" below
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
            suffix = {"k": 1_000, "K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
            if value[-1:] in suffix:
                try:
                    return int(float(value[:-1]) * suffix[value[-1]])
                except ValueError:
                    pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_section(cls: type, values: dict, section: str, base: Any = None) -> Any:
    """Make a dataclass instance of cls from a dict, starting from base (or the defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {values!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(section + '.' + k for k in unknown)}. "
            f"Valid keys of '{section}': {', '.join(sorted(types_))}"
        )
    kwargs = dataclasses.asdict(base) if base is not None else {}
    for k, v in values.items():
        kwargs[k] = _check_type(v, types_[k], f"{section}.{k}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return obj


# ----------------------------------------------------------------------------
# Loading.


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``section.key=value`` strings; values are read as YAML scalars or lists."""
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in SECTIONS or not parts[1]:
            raise ConfigError(
                f"override key '{key}' must be section.key with section one of {', '.join(SECTIONS)}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def build_config(raw: dict | None, methods: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (a parsed YAML file).

    ``methods`` maps method names to specs with ``config`` (the method's dataclass) and ``preset``
    (cmkit.objectives.METHODS); it is passed in so that the config types never import the objectives.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping with sections " + ", ".join(SECTIONS))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}. Valid sections: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in FIXED_SECTIONS.items():
        sections[name] = build_section(cls, raw.get(name) or {}, name)
    method_raw = raw.get("method") or {}
    if not isinstance(method_raw, dict):
        raise ConfigError("section 'method' must be a mapping with at least 'name', e.g. method: {name: ict}")
    method_raw = dict(method_raw)
    name = method_raw.setdefault("name", "ict")
    if not isinstance(name, str) or name not in methods:
        raise ConfigError(f"unknown method.name '{name}'. Valid methods: {', '.join(sorted(methods))}")
    spec = methods[name]
    base = spec.config(**{**spec.preset, "name": name})
    sections["method"] = build_section(spec.config, method_raw, "method", base=base)
    return Config(**sections)


def read_config_file(path: str | Path) -> dict:
    """The sections of a YAML config file; a missing, empty or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        hint = " (it is a directory)" if p.is_dir() else ""
        raise ConfigError(f"config file '{p}' does not exist{hint}. Pass a YAML file, e.g. configs/ict_toy.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' cannot be read ({e}). Pass a YAML text file") from None
    if raw is None:  # an empty file would silently train the defaults
        raise ConfigError(f"config file '{p}' is empty. Fill in its sections (see configs/ict_toy.yaml), or run "
                          f"without a file to train the defaults on purpose: cmkit train section.key=value ...")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def merge_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """raw with ``section.key=value`` overrides applied."""
    return _merge(raw, parse_overrides(overrides or []))


def __getattr__(name: str):
    """``from cmkit.config import load_config, from_dict`` (README, user code): they live in cmkit.configure,
    which sits above the config types and the method registry, so importing this module never imports objectives."""
    if name in ("load_config", "from_dict"):
        from cmkit import configure

        return getattr(configure, name)
    raise AttributeError(f"module 'cmkit.config' has no attribute '{name}'")
