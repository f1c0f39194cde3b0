"""Latent pipeline (iLCT): own KL autoencoder, diffusers AutoencoderKL, latent cache, Fig. 1 statistics."""

import json

import numpy as np
import pytest
import torch

from cmkit.cli import main
from cmkit.config import load_config
from cmkit.data import DataError, load_dataset
from cmkit.latent import LatentDataset, load_autoencoder
from cmkit.latent.autoencoder import AEConfig, load_autoencoder_dir, save_autoencoder, train_autoencoder
from cmkit.latent.stats import outlier_stats

AE_CFG = AEConfig(in_channels=1, latent_channels=2, channels=8, levels=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(load_config(None, ["data.name=digits"]).data)


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory, digits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster on a shared machine
    try:
        model, info = train_autoencoder(digits.x, AE_CFG, steps=150, batch_size=64, lr=3e-3, seed=0)
    finally:
        torch.set_num_threads(threads)
    return save_autoencoder(model, tmp_path_factory.mktemp("ae"), info)


def _latent_cfg(ae_dir, cache, *extra):
    return load_config(None, ["data.name=digits", f"data.vae={ae_dir}", f"data.cache_dir={cache}", *extra]).data


def _count_encodes(monkeypatch):
    import cmkit.latent as latent

    calls = {"n": 0}
    original = latent.OwnAutoencoder.encode

    def counting(self, x):
        calls["n"] += 1
        return original(self, x)

    monkeypatch.setattr(latent.OwnAutoencoder, "encode", counting)
    return calls


def test_round_trip_beats_stated_reconstruction_error(ae_dir, digits, tmp_path):
    # Stated bar: per-pixel MSE of decode(encode(x)) below 60% of the MSE of predicting each pixel's
    # mean (the data's per-pixel variance), on the bundled 8x8 digits with a 2x4x4 latent (half the pixels).
    baseline = float(digits.x.var(dim=0, correction=0).mean())
    ae = load_autoencoder_dir(ae_dir)
    with torch.no_grad():
        mse = float((ae.decode(ae.encode(digits.x)) - digits.x).square().mean())
    assert mse < 0.6 * baseline, (mse, baseline)
    # Through the latent dataset: normalised latents decode to the same images, in [0, 1].
    ds = load_dataset(_latent_cfg(ae_dir, tmp_path, "data.split=all"))
    assert isinstance(ds, LatentDataset) and ds.shape == (2, 4, 4)
    img = ds.to_data_space(ds.x[:50])
    with torch.no_grad():
        ref = ((ae.decode(ae.encode(ds.pixels.x[:50])) + 1) / 2).clamp(0, 1)
    assert img.shape == (50, 1, 8, 8) and torch.allclose(img, ref, atol=1e-5)


def test_latents_are_normalised_per_channel(ae_dir, tmp_path):
    ds = load_dataset(_latent_cfg(ae_dir, tmp_path, "data.split=all"))
    z = ds.x.double()
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), correction=0), torch.ones(2, dtype=torch.float64), atol=1e-5)
    raw = load_autoencoder_dir(ae_dir).encode(ds.pixels.x).detach()
    assert torch.allclose(ds.denormalise(ds.x), raw, atol=1e-4)


def test_latent_cache_reuse_and_invalidation(ae_dir, digits, tmp_path, monkeypatch):
    calls = _count_encodes(monkeypatch)
    cache = tmp_path / "cache"
    a = load_dataset(_latent_cfg(ae_dir, cache))
    first = calls["n"]
    assert first > 0 and len(list((cache / "latents").glob("*.npz"))) == 1
    b = load_dataset(_latent_cfg(ae_dir, cache))  # same data, same weights: read from the cache
    assert calls["n"] == first and torch.equal(a.x, b.x)
    load_dataset(_latent_cfg(ae_dir, cache, "data.split=test"))  # other data: encoded anew
    assert calls["n"] > first and len(list((cache / "latents").glob("*.npz"))) == 2
    # New weights in the same directory: the key changes, so the latents are re-encoded.
    model = load_autoencoder_dir(ae_dir)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    other = save_autoencoder(model, tmp_path / "ae2")
    before = calls["n"]
    c = load_dataset(_latent_cfg(other, cache))
    assert calls["n"] > before and len(list((cache / "latents").glob("*.npz"))) == 3
    assert not torch.equal(c.x, a.x)
    # A damaged cache file is re-encoded rather than trusted.
    for p in (cache / "latents").glob("*.npz"):
        p.write_bytes(b"garbage")
    before = calls["n"]
    d = load_dataset(_latent_cfg(ae_dir, cache))
    assert calls["n"] > before and torch.equal(d.x, a.x)


def test_bad_vae_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="train-ae"):
        load_dataset(_latent_cfg(tmp_path / "missing", tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither"):
        load_autoencoder(tmp_path / "empty")


def _tiny_autoencoder_kl(diffusers):
    """A random-weight AutoencoderKL small enough for CPU tests (MACHINE-NOTES 7: 658k parameters)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
                                   layers_per_block=1).eval()


def test_diffusers_autoencoder_from_local_directory(tmp_path, digits):
    diffusers = pytest.importorskip("diffusers", reason="the diffusers path needs the extra: pip install 'cmkit[latent]'")
    from cmkit.latent import DiffusersAutoencoder

    vae = _tiny_autoencoder_kl(diffusers)
    vae.save_pretrained(tmp_path / "vae")  # safetensors by default
    ae = load_autoencoder(tmp_path / "vae")
    assert type(ae) is DiffusersAutoencoder and ae.in_channels == 3
    # The wrapper's documented contract: encode = latent_dist.mean (not a posterior draw), decode = .sample.
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = ae.encode(x)
        assert z.shape == (2, 4, 4, 4)  # 2 blocks: one downsampling, 8 -> 4; 4 latent channels
        assert torch.allclose(z, dist.mean, atol=1e-6)
        assert not torch.allclose(z, dist.sample(torch.Generator().manual_seed(0)), atol=1e-3)
        y = ae.decode(z)
        assert y.shape == (2, 3, 8, 8) and torch.allclose(y, vae.decode(dist.mean).sample, atol=1e-6)
    # Through data.vae: greyscale data go in as RGB and come back as the channel mean.
    ds = load_dataset(_latent_cfg(tmp_path / "vae", tmp_path / "cache", "data.split=test"))
    assert isinstance(ds, LatentDataset) and ds.shape == (4, 4, 4) and len(ds) == 179
    xp = ds.pixels.x[:5]
    with torch.no_grad():
        ref = vae.decode(vae.encode(xp.expand(-1, 3, -1, -1)).latent_dist.mean).sample.mean(1, keepdim=True)
    assert torch.allclose(ds.decode(ds.x[:5]), ref, atol=1e-4)
    # The weights hash names the content, not the folder: a copy elsewhere keys the same latent cache.
    import shutil

    shutil.copytree(tmp_path / "vae", tmp_path / "elsewhere")
    assert load_autoencoder(tmp_path / "elsewhere").identity() == ae.identity()


def test_diffusers_pickle_weights_are_refused(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the diffusers path needs the extra: pip install 'cmkit[latent]'")
    _tiny_autoencoder_kl(diffusers).save_pretrained(tmp_path / "vae", safe_serialization=False)  # a pickled .bin
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(DataError, match="safetensors"):
        load_autoencoder(tmp_path / "vae")


def test_weights_hash_of_a_zero_dim_buffer():
    import hashlib

    from cmkit.latent import weights_hash

    m = torch.nn.Module()
    m.register_buffer("count", torch.tensor(5, dtype=torch.int64))  # 0-dim, like BatchNorm's num_batches_tracked
    # Computed here: sha256 of "name:shape:dtype" then the 8 little-endian bytes of 5.
    expected = hashlib.sha256(b"count:():torch.int64" + (5).to_bytes(8, "little")).hexdigest()
    assert weights_hash(m) == expected
    m.count.fill_(6)
    assert weights_hash(m) != expected
    bn = torch.nn.BatchNorm2d(2)
    assert len(weights_hash(bn)) == 64


def test_encoding_device_is_passed_through(ae_dir, tmp_path, monkeypatch):
    import cmkit.latent.dataset as latent_dataset

    seen = []
    original = latent_dataset.encode_images

    def recording(ae, x, batch_size=256, device="cpu"):
        seen.append(str(device))
        return original(ae, x, batch_size, device)

    monkeypatch.setattr(latent_dataset, "encode_images", recording)
    load_dataset(_latent_cfg(ae_dir, tmp_path / "a"))
    load_dataset(_latent_cfg(ae_dir, tmp_path / "b"), device="cpu:0")
    assert seen == ["cpu", "cpu:0"]


def test_outlier_stats_hand_values():
    v = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100.0])
    s = outlier_stats(v)
    # numpy's linear percentiles over 9 points: Q1 = 3rd value = 3, Q3 = 7th value = 7, IQR = 4.
    assert (s["q1"], s["median"], s["q3"], s["iqr"]) == (3.0, 5.0, 7.0, 4.0)
    assert s["inner_fences"] == [-3.0, 13.0] and s["outer_fences"] == [-9.0, 19.0]
    assert s["impulsive_share"] == pytest.approx(1 / 9) and s["outlier_share"] == pytest.approx(1 / 9)
    s = outlier_stats(np.array([1, 2, 3, 4, 5, 6, 7, 8, 16.0]))  # 16 > 13 (inner) but < 19 (outer)
    assert s["outlier_share"] == pytest.approx(1 / 9) and s["impulsive_share"] == 0.0
    g = outlier_stats(torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    # N(0, 1): Q3 = 0.6745, share beyond the outer fences 2·Φ(-4.72) ≈ 2.3e-6.
    assert g["q3"] == pytest.approx(0.6745, abs=0.01) and g["impulsive_share"] < 5e-5


def test_cli_train_ae_and_inspect_data(tmp_path, capsys):
    out = tmp_path / "ae"
    assert main(["train-ae", "data.name=digits", "--out", str(out), "--steps", "10", "--channels", "8",
                 "--levels", "1", "--latent-channels", "2", "--log-every", "0"]) == 0
    meta = json.loads((out / "cmkit_ae.json").read_text())
    assert meta["latent_shape"] == [2, 4, 4] and meta["steps"] == 10
    report = tmp_path / "stats.json"
    assert main(["inspect-data", "data.name=digits", f"data.vae={out}", f"data.cache_dir={tmp_path}",
                 "--json", str(report)]) == 0
    stats = json.loads(report.read_text())
    assert set(stats) == {"pixel", "latent"} and stats["pixel"]["n"] == (1797 - 179) * 64
    assert "impulsive" in capsys.readouterr().out
    assert main(["train-ae", "data.name=eight_gaussians", "--out", str(tmp_path / "x"), "--steps", "1"]) == 2


@pytest.mark.slow
def test_ilct_on_latents_end_to_end(ae_dir, tmp_path):
    from cmkit.run import load
    from cmkit.train import train

    cfg = load_config(None, [
        "method.name=ilct", "net.name=unet", "net.channels=16", "net.channel_mult=[1]", "net.num_blocks=1",
        "net.attn_resolutions=[]", "net.norm=nsln", "data.name=digits", f"data.vae={ae_dir}",
        f"data.cache_dir={tmp_path}", "train.steps=3", "train.batch_size=16", f"run.dir={tmp_path / 'run'}",
        "run.tensorboard=false", "run.progress=false", "run.sample_n=4", "run.sample_steps=[1]", "train.device=cpu"])
    train(cfg)
    run = load(tmp_path / "run")
    x = run.sample(6, steps=1)
    assert x.shape == (6, 1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert (tmp_path / "run" / "samples_1step.png").is_file()
    assert main(["inspect-data", "--run", str(tmp_path / "run"), "--n", "64", "--td-steps", "11"]) == 0


class _TimeModel(torch.nn.Module):
    """f(x, t, y) = (1 + y)·t everywhere: TD = (1 + y)(σ_{i+1} - σ_i) exactly, whatever the noise."""

    def __init__(self, process=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))  # td_values reads the device from a parameter
        self.process = process

    def forward(self, x, t, class_labels=None):
        scale = 1.0 if class_labels is None else 1.0 + class_labels.to(x.dtype)
        return (scale * t.to(x.dtype)).reshape(-1, *([1] * (x.ndim - 1))).expand_as(x) + 0 * self.w


def _karras_gaps(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """σ_{i+1} - σ_i of Karras et al. (2022) Eq. 5, written out here."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = [(lo + i / (n - 1) * (hi - lo)) ** rho for i in range(n)]
    return torch.tensor([b - a for a, b in zip(s, s[1:])], dtype=torch.float64)


def test_td_values_closed_form_with_labels():
    from cmkit.latent.stats import td_values

    n, N = 400, 11
    x0 = torch.randn(n, 2, 3)
    labels = torch.arange(n) % 3
    td = td_values(_TimeModel(), x0, labels=labels, num_scales=N, schedule="uniform", seed=1, batch_size=64)
    assert td.shape == x0.shape
    per_sample = td.reshape(n, -1)
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))  # one TD value per sample
    gap = per_sample[:, 0].double() / (1 + labels.double())  # the labels reached the model, in order
    gaps = _karras_gaps(N)
    nearest = (gap[:, None] - gaps[None]).abs().argmin(1)
    torch.testing.assert_close(gap, gaps[nearest], rtol=1e-5, atol=1e-6)  # every TD is (1+y)·(σ_{i+1} - σ_i)
    # uniform index distribution over the N-1 pairs: each gap drawn about n/(N-1) = 40 times
    counts = torch.bincount(nearest, minlength=N - 1)
    assert counts.min() > 15 and counts.max() < 70, counts
    with pytest.raises(ValueError, match="labels"):
        td_values(_TimeModel(), x0, labels=labels[:5], num_scales=N)


def test_run_td_values_labels_and_trigflow_refused():
    from types import SimpleNamespace

    from cmkit.config import ConfigError
    from cmkit.data import Dataset
    from cmkit.latent.stats import run_td_values
    from cmkit.processes import TrigFlow, VEProcess

    x = torch.randn(50, 4)
    labels = torch.arange(50) % 5
    ds = Dataset("toy", x, labels, "vector", 5)

    def fake_run(process, class_cond, method):
        cfg = SimpleNamespace(method=method, net=SimpleNamespace(class_cond=class_cond))
        model = _TimeModel(process)
        return SimpleNamespace(cfg=cfg, dataset=ds, dir="runs/x", model=lambda ema=True: model)

    ict = SimpleNamespace(name="ict", noise_schedule="uniform", p_mean=-1.1, p_std=2.0)
    process = VEProcess(sigma_min=0.01, sigma_max=10.0, rho=3.0)
    td = run_td_values(fake_run(process, True, ict), n=30, num_scales=5, seed=2)
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(2))[:30]  # the seeded subset
    gap = td[:, 0].double() / (1 + labels[idx].double())
    gaps = _karras_gaps(5, 0.01, 10.0, 3.0)  # the run's own grid, from its process
    torch.testing.assert_close(gap, gaps[(gap[:, None] - gaps).abs().argmin(1)], rtol=1e-5, atol=1e-6)
    unconditional = run_td_values(fake_run(process, False, ict), n=30, num_scales=5, seed=2)
    torch.testing.assert_close(unconditional[:, 0].double(), gap, rtol=1e-5, atol=1e-6)
    scm = SimpleNamespace(name="sct")  # no sigma_min: TrigFlow time has no σ grid
    with pytest.raises(ConfigError, match="discrete-time VE"):
        run_td_values(fake_run(TrigFlow(), False, scm), n=30)


def test_a_run_refuses_a_changed_autoencoder(ae_dir, digits, tmp_path):
    # Checkpoints record the autoencoder's weights hash: after data.vae is retrained in place, loading
    # (sample/eval) and resuming fail with a CheckpointError instead of decoding with the wrong decoder.
    import shutil

    from cmkit.checkpoint import CheckpointError
    from cmkit.run import load
    from cmkit.train import train

    vae = tmp_path / "ae"
    shutil.copytree(ae_dir, vae)
    cfg = load_config(None, [
        "method.name=ict", "net.name=mlp", "net.hidden=32", "net.depth=1", "data.name=digits", f"data.vae={vae}",
        f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.batch_size=16", f"run.dir={tmp_path / 'run'}",
        "run.tensorboard=false", "run.progress=false", "run.sample_every=0", "run.sample_steps=[]"])
    train(cfg)
    load(tmp_path / "run")  # the same autoencoder: fine
    other, info = train_autoencoder(digits.x, AE_CFG, steps=2, batch_size=16, lr=3e-3, seed=1)
    shutil.rmtree(vae)
    save_autoencoder(other, vae, info)
    with pytest.raises(CheckpointError, match="another autoencoder"):
        load(tmp_path / "run")
    with pytest.raises(CheckpointError, match="another autoencoder"):
        train(cfg)  # resume
