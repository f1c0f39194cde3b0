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


def test_diffusers_autoencoder_from_local_directory(tmp_path, digits):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    ae = load_autoencoder(tmp_path / "vae")
    assert type(ae).__name__ == "DiffusersAutoencoder"
    ds = load_dataset(_latent_cfg(tmp_path / "vae", tmp_path / "cache", "data.split=test"))
    assert ds.shape == (4, 4, 4)  # one downsampling per extra block: 8 -> 4
    # Greyscale data goes in as RGB and comes back as the channel mean.
    x = ds.pixels.x[:5]
    with torch.no_grad():
        ref = vae.decode(vae.encode(x.expand(-1, 3, -1, -1)).latent_dist.mean).sample.mean(1, keepdim=True)
    assert torch.allclose(ds.decode(ds.x[:5]), ref, atol=1e-4)


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
