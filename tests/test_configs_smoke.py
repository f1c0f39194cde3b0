"""Every file in configs/ trains: the first 20 steps of its own schedules at a small size, finite loss that does not explode, a checkpoint that loads.

Parametrised over ``sorted(Path('configs').glob('*.yaml'))``, so a new config is covered the day it lands.
GPU presets are shrunk generically: the network's width and depth (``net.channels``, ``net.channel_mult``,
``net.num_blocks``; ``net.hidden``/``net.depth`` for MLPs), the data (a tiny synthetic .npz of 16x16
images, or the toy set with fewer points), the batch. A config that names another run (``method.teacher``,
``method.init_from``) gets that config's own smoke run, trained first. ``OVERRIDES`` holds the few
per-config extras a preset needs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cmkit.config import load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
STEPS = 20
BATCH = 4
RUN_KEYS = ("teacher", "init_from")  # method keys that name another run's directory
GREY = ("mnist", "digits")  # bundled greyscale sets; every other image preset gets 3 channels
SIDE = 16  # tiny images: 16x16 (latent runs: 8x8 latents of a one-level autoencoder)

COMMON = [
    f"train.batch_size={BATCH}", "train.accumulate=1", "train.device=cpu", "train.threads=0",
    "train.precision=fp32", "train.compile=false", "train.max_bad_steps=3",
    "run.log_every=1", "run.checkpoint_every=10", "run.sample_every=0", "run.milestone_every=0", "run.sample_n=4",
    "run.tensorboard=false", "run.progress=false", "eval.every_nimg=0",
]
IMAGE_NET = ["net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=1", "net.attn_resolutions=[8]",
             "net.num_heads=1", "net.emb_dim=0"]
VECTOR_NET = ["net.hidden=64", "net.depth=2"]
# Per-config extras (e.g. a schedule measured in images that would never start within 20 steps).
OVERRIDES: dict[str, list[str]] = {
    "sct_imagenet64": ["net.channels_per_head=8"],  # EDM2: heads = width / channels_per_head, and the smoke width is 8-16
}


def _images(path: Path, channels: int, n: int = 64) -> Path:
    """n smooth random uint8 images (blobs) with labels 0..9 under keys x, y."""
    if not path.exists():
        g = np.random.default_rng(0)
        yy, xx = np.mgrid[:SIDE, :SIDE] / (SIDE - 1)
        x = np.zeros((n, channels, SIDE, SIDE), np.float32)
        for i in range(n):
            for c in range(channels):
                cy, cx, w = g.uniform(0.2, 0.8), g.uniform(0.2, 0.8), g.uniform(0.1, 0.3)
                x[i, c] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w * w))
        np.savez(path, x=(x * 255).round().astype(np.uint8), y=np.arange(n) % 10)
    return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """smoke(config_path) -> run directory of its 20-step run (trained once per module, teachers first)."""
    root = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: a second thread only adds contention (restored below)
    done: dict[str, Path] = {}
    by_dir = {}
    for p in CONFIGS:
        by_dir[(yaml.safe_load(p.read_text()).get("run") or {}).get("dir", "runs/default")] = p
    autoencoders: dict[int, Path] = {}

    def autoencoder(channels: int) -> Path:
        if channels not in autoencoders:  # a one-level KL autoencoder, 5 steps: 16x16 images -> 4x8x8 latents
            from cmkit.latent.autoencoder import AEConfig, save_autoencoder, train_autoencoder

            x = torch.from_numpy(np.load(_images(root / f"img{channels}.npz", channels))["x"]).float() / 127.5 - 1
            model, summary = train_autoencoder(x, AEConfig(in_channels=channels, latent_channels=4, channels=8,
                                                           levels=1, blocks=0), steps=5, batch_size=8)
            autoencoders[channels] = save_autoencoder(model, root / f"ae{channels}", summary)
        return autoencoders[channels]

    def run(path: Path) -> Path:
        if path.stem in done:
            return done[path.stem]
        raw = yaml.safe_load(path.read_text()) or {}
        data, method = raw.get("data") or {}, raw.get("method") or {}
        args = [*COMMON, f"run.dir={root / path.stem}"]
        name = data.get("name", "eight_gaussians")
        if name in ("folder", "array", *GREY):  # images: the tiny synthetic set, same for teacher and student
            channels = 1 if name in GREY else 3
            args += ["data.name=array", f"data.path={_images(root / f'img{channels}.npz', channels)}",
                     "data.pad_to=0", "data.resolution=0", *IMAGE_NET]
            if data.get("vae"):
                args.append(f"data.vae={autoencoder(channels)}")
        else:
            args += ["data.n=512", *VECTOR_NET]
        for key in RUN_KEYS:  # a teacher / fine-tuning source: that config's own smoke run
            named = method.get(key)
            if named and named in by_dir:
                args.append(f"method.{key}={run(by_dir[named])}")
        cfg = load_config(path, args + OVERRIDES.get(path.stem, []))
        from cmkit.train import train

        done[path.stem] = train(cfg, stop_after=STEPS)  # the first steps of the preset's own schedules
        return done[path.stem]

    yield run
    torch.set_num_threads(threads)


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [float(r["loss"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_trains_at_small_size(path, smoke):
    from cmkit.run import load

    run_dir = smoke(path)
    losses = _losses(run_dir)
    assert len(losses) == STEPS, f"{path.stem}: {len(losses)} logged steps"
    assert all(math.isfinite(v) for v in losses), f"{path.stem}: non-finite loss {losses}"
    last_record = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    assert last_record["skipped_steps"] == 0, f"{path.stem}: {last_record['skipped_steps']} steps skipped"
    # Not exploding: the last five losses stay within 10x the first five (a diverging run grows 20x per step).
    first, last = np.mean(np.abs(losses[:5])), np.mean(np.abs(losses[-5:]))
    assert last <= 10 * first + 1e-3, f"{path.stem}: loss grew from {first:.4g} to {last:.4g}: {losses}"
    run = load(run_dir)
    assert run.nimg == STEPS * BATCH
    x = run.sample(2, steps=2)
    assert torch.isfinite(x).all()
    assert len(list((run_dir / "checkpoints").glob("ckpt-*.safetensors"))) == 2  # step 10 and the final one


# ----------------------------------------------------------------------------
# configs/edm_mnist.yaml diverged with RAdam (loss 1758 -> NaN by step 4): the cause and the fix.


@pytest.mark.parametrize("name, scales", [("radam", True), ("adam", False)])
def test_radam_first_steps_scale_with_the_loss_adam_steps_do_not(name, scales):
    # RAdam (Liu et al. 2020, Alg. 2): while the variance is not tractable (ρ_t ≤ 5 in PyTorch, the first 5 steps at
    # β2 = 0.999) the update is θ -= lr·m̂_t, plain momentum SGD: it grows with the loss's scale. Adam's first step
    # is lr·g/(|g| + ε) ≈ lr·sign(g), whatever the scale. A loss summed over 784 pixels is ~1000x a per-pixel mean.
    from cmkit.optim import OPTIMIZERS

    g = torch.tensor([3.0, -0.5, 0.01])
    moved = []
    for scale in (1.0, 1000.0):
        w = torch.zeros(3, requires_grad=True)
        opt = OPTIMIZERS[name]([w], lr=1e-3)
        (scale * (g * w).sum()).backward()
        opt.step()
        moved.append(-w.detach())
    if scales:  # hand-derived: m̂_1 = g·scale, so the step is lr·scale·g
        assert torch.allclose(moved[0], 1e-3 * g) and torch.allclose(moved[1], 1e-3 * 1000 * g)
    else:
        assert torch.allclose(moved[0], 1e-3 * g.sign(), rtol=1e-4) and torch.allclose(moved[1], moved[0], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [None, "radam"])
def test_edm_mnist_preset_first_steps_do_not_diverge(tmp_path, optimizer):
    # The preset at its real size (U-Net 32 channels, 28x28 MNIST, lr 5e-4) for its first 6 steps, batch 8:
    # with the preset's Adam the loss falls; forcing RAdam reproduces the divergence this preset had.
    from cmkit import distributed
    from cmkit.train import Trainer

    extra = [f"train.optimizer={optimizer}"] if optimizer else []
    cfg = load_config("configs/edm_mnist.yaml", ["train.batch_size=8", f"run.dir={tmp_path}", *extra])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        trainer = Trainer(cfg, distributed.DistInfo(), torch.device("cpu"))
        streams = trainer.streams()
        losses = [float(trainer.train_step(streams)["loss"]) for _ in range(6)]
    finally:
        torch.set_num_threads(threads)
    if optimizer is None:
        assert cfg.train.optimizer == "adam"
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    else:
        assert not (losses[-1] < 10 * losses[0]), losses  # the un-rectified RAdam steps blow up (or go NaN)
