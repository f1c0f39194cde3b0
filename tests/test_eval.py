"""Evaluation: metrics against independent computations, extractors, reference cache, eval/plot commands."""

import json
import socket
import sys
from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from cmkit.config import ConfigError, DataConfig, load_config
from cmkit.evaluation import Evaluator, evaluate_run
from cmkit.evaluation import features as feat
from cmkit.evaluation.classifier import CLASSIFIERS, WEIGHTS_DIR, centre_crop, load_classifier
from cmkit.evaluation.metrics import (
    feature_statistics, frechet_distance, knn_radii, mmd, precision_recall, sliced_wasserstein, wasserstein_1d,
)


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------
# Fréchet distance.


def test_fd_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_fd_closed_forms():
    rng = np.random.default_rng(1)
    mu, s = rng.standard_normal(16), random_spd(16, rng)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    # 1-D Gaussians: (μ1 - μ2)² + (σ1 - σ2)².
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9.0 + 1.5**2)
    # Isotropic: ||Δμ||² + d (σ1 - σ2)².
    d = 7
    assert frechet_distance(np.zeros(d), 9 * np.eye(d), np.ones(d), np.eye(d)) == pytest.approx(d + d * 4.0)


def test_feature_statistics_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])  # by hand, n - 1 = 2


# ----------------------------------------------------------------------------
# Precision and recall.


def test_precision_recall_hand_values():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    # k=1: every real radius is 1; fake 0.5 lies inside, 10 does not -> precision 1/2.
    # Fake radii (k=1) are |10 - 0.5| = 9.5, so every real point is covered -> recall 1.
    assert knn_radii(real, 1).tolist() == [1.0, 1.0, 1.0, 1.0]
    p, r = precision_recall(real, torch.tensor([[0.5], [10.0]]), k=1)
    assert (p, r) == (0.5, 1.0)
    # k=2 on real: radii [2, 1, 1, 2]. Fake {-1.5, 5.5, 5.6}: -1.5 is 1.5 from 0 (radius 2) -> in;
    # 5.5 is 2.5 from 3 (radius 2) -> out; 5.6 out -> precision 1/3. Fake radii (k=2): 7.1, 7.0, 7.1;
    # every real point is within 7 of -1.5 -> recall 1.
    p, r = precision_recall(real, torch.tensor([[-1.5], [5.5], [5.6]]), k=2)
    assert p == pytest.approx(1 / 3) and r == 1.0


def test_precision_recall_self_and_far_cluster():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    y = torch.randn(600, 8, generator=g)  # a fresh draw of the same distribution
    p, r = precision_recall(x, y, k=3)
    assert p > 0.7 and r > 0.7
    far = torch.randn(600, 8, generator=g) + 50.0
    assert precision_recall(x, far, k=3) == (0.0, 0.0)


# ----------------------------------------------------------------------------
# SWD and MMD.


def test_wasserstein_1d_matches_scipy_for_unequal_sizes():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(137), rng.exponential(size=59)
    got = wasserstein_1d(torch.tensor(a)[:, None], torch.tensor(b)[:, None]).item()
    assert got == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-10)
    # In one dimension every direction is ±1, so SWD is W1.
    assert sliced_wasserstein(a[:, None], b[:, None], n_proj=8) == pytest.approx(got, rel=1e-10)


def test_swd_of_a_shift_and_identical_sets():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    m = torch.tensor([3.0, 4.0], dtype=torch.float64)
    # A shift moves every projection by θ·m: SW1 = E|θ·m| = |m|·E|cos φ| = 5·2/π in 2-D.
    assert sliced_wasserstein(x, x + m, n_proj=4096) == pytest.approx(5 * 2 / np.pi, rel=0.03)
    assert sliced_wasserstein(x, 2 * x) > 0.1


def test_mmd_gaussian_closed_form_and_identity():
    # Population MMD² of N(0, s²I) vs N(δ, s²I), kernel exp(-|x-y|²/2h²), in d dims:
    # 2 c (1 - exp(-|δ|² / 2(h² + 2s²))), c = (h² / (h² + 2 s²))^(d/2).
    g = torch.Generator().manual_seed(4)
    d, s, h, n = 2, 1.0, 1.5, 3000
    delta = torch.tensor([1.0, 0.5], dtype=torch.float64)
    a = s * torch.randn(n, d, generator=g, dtype=torch.float64)
    b = s * torch.randn(n, d, generator=g, dtype=torch.float64) + delta
    c = (h**2 / (h**2 + 2 * s**2)) ** (d / 2)
    expected = 2 * c * (1 - np.exp(-delta.square().sum().item() / (2 * (h**2 + 2 * s**2))))
    assert mmd(a, b, h) == pytest.approx(expected, rel=0.1)
    assert abs(mmd(a, a, h)) < 1e-3
    assert abs(mmd(a, s * torch.randn(n, d, generator=g, dtype=torch.float64), h)) < 0.01 * expected


def test_mmd_matches_double_loop():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(7, 3, generator=g).double(), torch.randn(5, 3, generator=g).double() + 1
    h = 0.8

    def k(x, y):
        return float(np.exp(-np.sum((x - y) ** 2) / (2 * h * h)))

    A, B = a.numpy(), b.numpy()
    kaa = sum(k(A[i], A[j]) for i in range(7) for j in range(7) if i != j) / 42
    kbb = sum(k(B[i], B[j]) for i in range(5) for j in range(5) if i != j) / 20
    kab = sum(k(A[i], B[j]) for i in range(7) for j in range(5)) / 35
    assert mmd(a, b, h) == pytest.approx(kaa + kbb - 2 * kab, rel=1e-10)


# ----------------------------------------------------------------------------
# Committed classifiers.


@pytest.mark.parametrize("name,min_acc", [("mnist", 0.97), ("digits", 0.97)])
def test_committed_classifier_reaches_stated_accuracy(name, min_acc):
    from cmkit.data import load_dataset

    path = WEIGHTS_DIR / CLASSIFIERS[name][0]
    assert path.stat().st_size < 2_000_000
    net, info = load_classifier(path)
    ds = load_dataset(DataConfig(name=name, split="test", labels=True, seed=0))
    x = centre_crop(ds.to_data_space(ds.x), CLASSIFIERS[name][1])
    with torch.no_grad():
        acc = (net(x).argmax(1) == ds.labels).double().mean().item()
    assert acc >= min_acc
    assert acc == pytest.approx(info["heldout_accuracy"], abs=1e-4)  # the number stated in the file and docs
    assert info["n_heldout"] == len(ds)


def test_classifier_crops_padded_mnist_identically():
    ex = feat.classifier_extractor("mnist")
    x = torch.rand(4, 1, 28, 28)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))  # data.pad_to=32 adds a black (0) border
    torch.testing.assert_close(ex(padded), ex(x))


def fd_of(evaluator, x):
    return evaluator.metrics(x)["fd"]


def test_fd_grows_with_noise_and_shift_on_digits(tmp_path):
    from cmkit.data import load_dataset

    cfg = load_config(None, ["data.name=digits", f"data.cache_dir={tmp_path}"])
    ev = Evaluator(cfg)
    assert ev.extractor.name == "digits-cnn"
    train = load_dataset(replace(cfg.data, split="train"))
    x = train.to_data_space(train.x)[:800]  # a copy of the data (train split) vs the test split
    g = torch.Generator().manual_seed(0)
    z = torch.randn(x.shape, generator=g)
    noisy = [fd_of(ev, (x + s * z).clamp(0, 1)) for s in (0.0, 0.15, 0.4, 0.8)]
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy
    shifted = [fd_of(ev, torch.roll(x, s, dims=-1)) for s in (0, 1, 2)]
    assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted


def test_fd_grows_with_shift_on_vectors(tmp_path):
    cfg = load_config(None, ["data.name=two_moons", "data.n=4000", f"data.cache_dir={tmp_path}"])
    ev = Evaluator(cfg)
    assert ev.extractor.name == "raw" and ev.low_dim
    ref = torch.as_tensor(ev.ref_feats)
    values = [ev.metrics(ref + torch.tensor([s, 0.0])) for s in (0.0, 0.25, 0.5, 1.0)]
    fds = [v["fd"] for v in values]
    assert fds[0] == pytest.approx(0.0, abs=1e-9)
    # A pure mean shift by s changes FD by exactly s² (the covariances are equal).
    np.testing.assert_allclose(fds, [0.0, 0.0625, 0.25, 1.0], atol=1e-9)
    assert values[0]["precision"] == 1.0 and values[0]["recall"] == 1.0
    assert all(a["swd"] < b["swd"] and a["mmd"] < b["mmd"] for a, b in zip(values, values[1:]))


# ----------------------------------------------------------------------------
# Reference cache.


def test_reference_cache_hit_and_invalidated_when_data_change(tmp_path):
    from cmkit.data import load_dataset

    path = tmp_path / "points.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((200, 3)))
    data_cfg = DataConfig(name="array", path=str(path), split="test", cache_dir=str(tmp_path / "cache"))
    calls = []
    raw = feat.raw_extractor()
    counting = feat.Extractor("raw", "", lambda x: (calls.append(len(x)), x.reshape(len(x), -1))[1])

    f1, c1 = feat.reference_features(load_dataset(data_cfg), counting, data_cfg.cache_dir)
    f2, c2 = feat.reference_features(load_dataset(data_cfg), counting, data_cfg.cache_dir)
    assert (c1["cache_hit"], c2["cache_hit"]) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(f1, f2)

    points = np.load(path)
    np.save(path, points + 5.0)  # same normalised values, different data: the cache must still miss
    f3, c3 = feat.reference_features(load_dataset(data_cfg), counting, data_cfg.cache_dir)
    assert not c3["cache_hit"] and c3["key"] != c1["key"] and len(calls) == 2
    np.testing.assert_allclose(f3, f1 + 5.0, rtol=1e-5)
    points[0, 0] += 1.0  # one value changes
    np.save(path, points)
    _, c4 = feat.reference_features(load_dataset(data_cfg), counting, data_cfg.cache_dir)
    assert not c4["cache_hit"] and c4["key"] not in (c1["key"], c3["key"])
    # A different extractor (weights hash) does not share the entry either.
    assert feat.reference_key(c3["data_sha256"], replace(raw, weights_sha256="x"), 0, 0) != c3["key"]


# ----------------------------------------------------------------------------
# Inception: clear errors, never a download.


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("evaluation attempted a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_inception_errors_are_clear_and_offline(tmp_path, monkeypatch, no_network):
    with pytest.raises(ConfigError, match=r"eval.inception_weights=PATH.*never downloads"):
        feat.build_extractor("inception", "folder", "image", "")
    with pytest.raises(ConfigError, match=r"is not a file.*cmkit\[fid\]"):
        feat.build_extractor("inception", "folder", "image", str(tmp_path / "missing.pth"))
    weights = tmp_path / feat.INCEPTION_FILE
    weights.write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # not installed
    with pytest.raises(ConfigError, match=r"torch-fidelity is not installed.*cmkit\[fid\].*--inception-weights"):
        feat.build_extractor("auto", "folder", "image", str(weights))


def test_inception_loads_local_path_when_torchvision_is_broken(tmp_path, monkeypatch, no_network):
    # A stand-in torch_fidelity whose package __init__ fails like it does without a working torchvision;
    # its Inception module records the weights path it is given.
    pkg = tmp_path / "site" / "torch_fidelity"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    (pkg / "feature_extractor_inceptionv3.py").write_text(
        "import torch\n"
        "class FeatureExtractorInceptionV3(torch.nn.Module):\n"
        "    seen = {}\n"
        "    def __init__(self, name, features_list, feature_extractor_weights_path=None):\n"
        "        super().__init__()\n"
        "        assert feature_extractor_weights_path is not None, 'would download'\n"
        "        type(self).seen['path'] = feature_extractor_weights_path\n"
        "    def forward(self, x):\n"
        "        assert x.dtype == torch.uint8 and x.shape[1] == 3\n"
        "        return (x.float().mean(dim=(2, 3)).repeat(1, 10),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torch_fidelity", raising=False)
    monkeypatch.delitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", raising=False)
    weights = tmp_path / feat.INCEPTION_FILE
    weights.write_bytes(b"weights")
    ex = feat.build_extractor("inception", "folder", "image", str(weights))
    cls = sys.modules["torch_fidelity.feature_extractor_inceptionv3"].FeatureExtractorInceptionV3
    assert cls.seen["path"] == str(weights)
    assert ex.name == "inception-v3" and len(ex.weights_sha256) == 64
    out = ex(torch.full((2, 1, 8, 8), 0.5))  # greyscale is repeated to RGB, scaled to uint8 0..255
    assert out.shape == (2, 30) and torch.all(out == 128.0)


def test_unknown_features_and_bad_config_fail_early():
    with pytest.raises(ConfigError, match="auto, classifier, inception, raw"):
        feat.build_extractor("clip", "mnist", "image")
    with pytest.raises(ConfigError, match="no bundled classifier"):
        feat.build_extractor("classifier", "folder", "image")


# ----------------------------------------------------------------------------
# End to end: train a tiny toy run with periodic evaluation, then eval and plot it.


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from cmkit.train import train

    root = tmp_path_factory.mktemp("evalrun")
    return train(load_config("configs/ict_toy.yaml", toy_overrides(root / "run", root / "cache", 2560)))


def toy_overrides(run_dir, cache_dir, every_nimg):
    return [
        "net.hidden=32", "net.depth=2", "train.steps=40", "train.batch_size=128", "train.ema=0.9",
        "data.n=2000", f"data.cache_dir={cache_dir}", f"run.dir={run_dir}", "run.progress=false",
        "run.tensorboard=false", "run.log_every=20", "run.sample_n=16", f"eval.every_nimg={every_nimg}", "eval.n=200",
        "train.threads=1",
    ]


def test_periodic_eval_does_not_change_training(toy_run, tmp_path):
    from cmkit.checkpoint import latest_checkpoint
    from cmkit.train import train

    plain = train(load_config("configs/ict_toy.yaml", toy_overrides(tmp_path / "run", toy_run.parent / "cache", 0)))
    a, b = latest_checkpoint(toy_run / "checkpoints")[1], latest_checkpoint(plain / "checkpoints")[1]
    for key, value in a["ema"]["0"].items():
        torch.testing.assert_close(b["ema"]["0"][key], value, rtol=0, atol=0)


def test_periodic_eval_is_logged(toy_run):
    records = [json.loads(line) for line in (toy_run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fd_1step" in r]
    assert [r["nimg"] for r in evals] == [2560, 5120]
    assert {"eval/precision_2step", "eval/recall_1step", "eval/swd_1step", "eval/mmd_2step"} <= set(evals[0])


def test_evaluate_run_writes_protocol_and_metrics(toy_run):
    report = evaluate_run(toy_run, steps=[1, 2], n=300)
    saved = json.loads((toy_run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    p = saved["protocol"]
    assert p["features"] == "raw" and p["k"] == 3 and p["seed"] == 0 and p["n_generated"] == 300
    assert p["reference"]["split"] == "test" and p["reference"]["n"] == 200 and len(p["reference"]["data_sha256"]) == 64
    for k in ("1", "2"):
        row = saved["steps"][k]
        assert row["nfe"] == int(k)  # counted at the model, not assumed
        assert {"fd", "precision", "recall", "swd", "mmd", "sec_per_sample"} <= set(row)
        assert 0 <= row["precision"] <= 1 and row["fd"] >= 0
    # Same seed, same numbers.
    again = evaluate_run(toy_run, steps=[1], n=300, out=toy_run / "again.json")
    assert again["steps"]["1"]["fd"] == saved["steps"]["1"]["fd"]


def test_cli_eval_and_plot(toy_run, tmp_path, capsys):
    from cmkit.cli import main

    assert main(["eval", str(toy_run), "--steps", "1", "--n", "200", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "swd" in out and (tmp_path / "m.json").is_file()
    png = tmp_path / "curves.png"
    assert main(["plot", str(toy_run), str(toy_run), "--labels", "a", "b", "--steps", "1", "2", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(toy_run), "--metric", "nonsense", "--out", str(png)]) == 2
    assert "logged: eval/fd_1step" in capsys.readouterr().err
    assert main(["eval", str(toy_run), "--features", "inception"]) == 2
    assert "cmkit[fid]" in capsys.readouterr().err


def test_evaluate_run_maps_non_finite_metrics_to_null(toy_run, tmp_path, monkeypatch):
    from cmkit.run import Run

    plain = Run.sample

    def diverging(self, n, steps=1, **kw):  # the 2-step samples blow up
        x = plain(self, n, steps, **kw)
        return torch.full_like(x, float("nan")) if steps == 2 else x

    monkeypatch.setattr(Run, "sample", diverging)
    out = tmp_path / "m.json"
    report = evaluate_run(toy_run, steps=[1, 2], n=200, out=out)

    def no_constants(name):  # Infinity / NaN are not JSON
        raise AssertionError(f"metrics.json holds {name}")

    saved = json.loads(out.read_text(), parse_constant=no_constants)
    assert saved == report
    bad, good = saved["steps"]["2"], saved["steps"]["1"]
    assert bad["fd"] is None and bad["diverged"] is True
    assert "diverged" not in good and isinstance(good["fd"], float) and good["fd"] >= 0


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    from cmkit.data import load_dataset
    from cmkit.latent.autoencoder import AEConfig, save_autoencoder, train_autoencoder
    from cmkit.train import train

    root = tmp_path_factory.mktemp("latentrun")
    digits = load_dataset(DataConfig(name="digits", cache_dir=str(root / "cache")))
    model, info = train_autoencoder(digits.x, AEConfig(in_channels=1, latent_channels=2, channels=8, levels=1),
                                    steps=5, batch_size=64, lr=3e-3, seed=0)
    ae_dir = save_autoencoder(model, root / "ae", info)
    run = train(load_config("configs/ict_digits.yaml", [
        "net.name=mlp", "net.hidden=32", "net.depth=1", "train.steps=2", "train.batch_size=16",
        f"data.vae={ae_dir}", f"data.cache_dir={root / 'cache'}", f"run.dir={root / 'run'}", "run.progress=false",
        "run.tensorboard=false", "run.sample_n=4", "run.sample_steps=[1]", "eval.every_nimg=0", "train.threads=1"]))
    return run, ae_dir


def test_evaluate_latent_run_protocol_names_the_autoencoder(latent_run):
    import json as _json

    from safetensors import safe_open

    from cmkit.latent import weights_hash
    from cmkit.latent.autoencoder import load_autoencoder_dir

    run, ae_dir = latent_run
    report = evaluate_run(run, steps=[1], n=50)
    p = report["protocol"]
    # Samples are decoded to 8x8 pixels and scored by the digits classifier: its hidden width, not the latent size.
    with safe_open(str(WEIGHTS_DIR / CLASSIFIERS["digits"][0]), framework="pt") as f:
        hidden = f.get_slice("hidden.weight").get_shape()[0]
    assert p["features"] == "digits-cnn" and p["feature_dim"] == hidden != 2 * 4 * 4
    assert "decoded by the autoencoder" in p["reference"]["space"] and "no autoencoder" not in p["reference"]["space"]
    ae = load_autoencoder_dir(ae_dir)
    expected = weights_hash(ae, _json.dumps(ae.cfg.__dict__, sort_keys=True))
    assert p["autoencoder"] == {"path": str(ae_dir), "type": "OwnAutoencoder", "weights_sha256": expected}
    assert 0 <= report["steps"]["1"]["precision"] <= 1


# ----------------------------------------------------------------------------
# cmkit eval --samples: any generator's samples under a run's protocol; the classifier-confidence figure.

_SCORES = ("fd", "precision", "recall", "swd", "mmd", "confident", "class_match")


def _scores(row):
    return {k: row[k] for k in _SCORES if k in row}


def test_eval_samples_equals_eval_run_on_its_own_samples(toy_run, tmp_path):
    from cmkit.cli import main

    npz = tmp_path / "s.npz"
    assert main(["sample", str(toy_run), "--n", "300", "--steps", "1", "--out", str(npz)]) == 0
    assert main(["eval", str(toy_run), "--n", "300", "--steps", "1", "--out", str(tmp_path / "run.json")]) == 0
    assert main(["eval", "--samples", str(npz), "--config", str(toy_run / "config.yaml"),
                 "--out", str(tmp_path / "file.json")]) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    file = json.loads((tmp_path / "file.json").read_text())
    assert _scores(file["samples"]) == _scores(run["steps"]["1"]) and "swd" in file["samples"]
    assert file["protocol"]["reference"] == run["protocol"]["reference"]
    assert file["protocol"]["features_weights_sha256"] == run["protocol"]["features_weights_sha256"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from cmkit.train import train

    root = tmp_path_factory.mktemp("digitsrun")
    return train(load_config("configs/ict_digits.yaml", [
        "net.name=mlp", "net.hidden=32", "net.depth=1", "train.steps=3", "train.batch_size=16",
        f"data.cache_dir={root / 'cache'}", f"run.dir={root / 'run'}", "run.progress=false", "run.tensorboard=false",
        "run.sample_n=4", "run.sample_steps=[1]", "eval.every_nimg=0", "train.threads=1"]))


def test_eval_samples_on_images_in_either_range_and_layout(digits_run, tmp_path):
    from cmkit.cli import main

    npz = tmp_path / "s.npz"
    assert main(["sample", str(digits_run), "--n", "200", "--out", str(npz)]) == 0
    report = evaluate_run(digits_run, steps=[1], n=200, out=tmp_path / "run.json")
    expected = _scores(report["steps"]["1"])
    assert "confident" in expected and "classifier" in report["protocol"]["confident"]
    x = np.load(npz)["samples"]
    variants = {"01": x, "11": 2 * x - 1, "nhwc": x.transpose(0, 2, 3, 1), "arr_0": x}
    for name, arr in variants.items():
        f = tmp_path / f"{name}.npz"
        np.savez(f, **({"arr_0": arr} if name == "arr_0" else {"samples": arr}))
        assert main(["eval", "--samples", str(f), "--data", "digits", "--out", str(tmp_path / f"{name}.json")]) == 0
        assert _scores(json.loads((tmp_path / f"{name}.json").read_text())["samples"]) == pytest.approx(expected), name


def test_classifier_confidence_against_direct_softmax():
    from cmkit.data import load_dataset
    from cmkit.evaluation.features import classifier_confidence

    ds = load_dataset(DataConfig(name="digits", split="test"))
    x = ds.to_data_space(ds.x)
    fn, sha = classifier_confidence("digits")
    net, _ = load_classifier(WEIGHTS_DIR / CLASSIFIERS["digits"][0])
    with torch.no_grad():
        p = torch.softmax(net.eval()(x), dim=1).max(dim=1).values
    assert fn(x) == pytest.approx(float((p >= 0.9).double().mean()), abs=0)
    assert fn(x) > 0.8  # real test digits: the classifier is sure of most
    noise = torch.rand(len(x), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert fn(noise) < 0.3 and len(sha) == 64


def test_eval_samples_bad_files_are_clear_errors(tmp_path, capsys):
    from cmkit.cli import main

    good = np.random.default_rng(0).random((50, 1, 8, 8)).astype(np.float32)
    nan = good.copy()
    nan[3, 0, 1, 1] = np.nan
    cases = {
        "shape": (good[:, :, :4], "must have shape"),
        "channels": (np.repeat(good, 3, axis=1), "must have shape"),
        "nan": (nan, "NaN"),
        "range": (good * 3 - 1, "outside"),
        "int": ((good * 300).astype(np.int32), "[0, 255]"),
    }
    for name, (arr, message) in cases.items():
        f = tmp_path / f"{name}.npz"
        np.savez(f, samples=arr)
        assert main(["eval", "--samples", str(f), "--data", "digits"]) == 2, name
        assert message in capsys.readouterr().err, name
    two = tmp_path / "two.npz"
    np.savez(two, a=good, b=good)
    assert main(["eval", "--samples", str(two), "--data", "digits"]) == 2
    assert "name the samples array" in capsys.readouterr().err
    assert main(["eval", "--samples", str(tmp_path / "missing.npz"), "--data", "digits"]) == 2
    assert main(["eval", "--samples", str(two)]) == 2
    assert "--data NAME" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["eval", "--samples", str(tmp_path / "junk.npz"), "--data", "digits"]) == 2
    assert "not a readable" in capsys.readouterr().err


def test_vector_samples_png_shows_the_data_with_axes(tmp_path):
    from PIL import Image

    from cmkit.images import save_samples

    g = torch.Generator().manual_seed(0)
    data, samples = torch.randn(500, 2, generator=g), torch.randn(200, 2, generator=g) + 3
    png = save_samples(samples, tmp_path / "s.png", "vector", reference=data)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (450, 450)  # matplotlib's 4.5 in at 100 dpi, not the 384-px PIL fallback
    grey = ((img == 191).all(axis=2)).sum()  # data points are drawn in 0.75 grey (191)
    blue = ((abs(img - [31, 119, 180]) <= 2).all(axis=2)).sum()  # tab:blue samples
    assert grey > 200 and blue > 200


def _benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_confidence_breakdown_benchmark_agrees_with_eval_and_cleans_as_stated(digits_run, tmp_path):
    # benchmarks/confidence_breakdown.py must report the very `confident` of cmkit eval (same seed, n, weights)
    # and of the classifier on the real images; its cleaned variants are what its docstring says.
    from cmkit.data import load_dataset
    from cmkit.evaluation.features import classifier_confidence

    module = _benchmark("confidence_breakdown")
    out = module.main([str(digits_run), "--n", "200", "--steps", "1"])
    report = evaluate_run(digits_run, steps=[1], n=200, out=tmp_path / "m.json")
    assert out["1"]["confident"] == pytest.approx(report["steps"]["1"]["confident"], abs=1e-12)
    assert sum(out["1"]["classes"]) == 200 and len(out["1"]["classes"]) == 10
    ds = load_dataset(DataConfig(name="digits", split="test"))
    x = ds.to_data_space(ds.x)
    fn, _ = classifier_confidence("digits")
    assert out["real"]["confident"] == pytest.approx(fn(x), abs=1e-12)
    # by hand, straight from the classifier: the class histogram, the median, and the binarised variant's share
    net, _ = load_classifier(WEIGHTS_DIR / CLASSIFIERS["digits"][0])
    with torch.no_grad():
        probs = torch.softmax(net.eval()(x), dim=1)
        p = torch.softmax(net((x > 0.5).float()), dim=1).max(dim=1).values
    assert out["real"]["classes"] == np.bincount(probs.argmax(dim=1).numpy(), minlength=10).tolist()
    assert out["real"]["median_max_softmax"] == pytest.approx(float(probs.max(dim=1).values.median()), abs=1e-6)
    assert out["real"]["cleaned"]["binarised at 0.5"] == pytest.approx(float((p >= 0.9).double().mean()), abs=1e-12)
    assert set(out["real"]["cleaned"]) == {"background < 0.1 zeroed", "background < 0.2 zeroed",
                                           "background < 0.3 zeroed", "binarised at 0.5"}
    # the real-image probes: noise and contrast recomputed by hand; the collapsed set's recall is 0 by construction
    probes = out["probes"]
    g = torch.Generator().manual_seed(0)  # eval.seed; the blurs draw nothing, the first noise is std 0.05's
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    with torch.no_grad():
        share = float((torch.softmax(net(noisy), dim=1).max(dim=1).values >= 0.9).double().mean())
        assert probes["perturbed"]["noise std 0.05"] == pytest.approx(share, abs=1e-12)
        share = float((torch.softmax(net(0.8 * x), dim=1).max(dim=1).values >= 0.9).double().mean())
        assert probes["perturbed"]["contrast x0.8"] == pytest.approx(share, abs=1e-12)
    assert len(probes["perturbed"]) == len(module.BLURS) + len(module.NOISES) + len(module.CONTRASTS)
    images, labels = module.collapsed(DataConfig(name="digits"), 200)
    assert torch.unique(images.reshape(200, -1), dim=0).shape[0] == 10
    assert labels.tolist() == [i % 10 for i in range(200)]
    assert probes["collapsed"]["recall"] == 0.0  # 10 distinct points, each its own duplicate: k-NN radii 0
    with torch.no_grad():
        by_hand = float((net(images).argmax(dim=1) == labels).double().mean())
    assert probes["collapsed"]["class_match"] == pytest.approx(by_hand, abs=1e-12)


def test_confidence_breakdown_by_label_counts_by_hand():
    # Per drawn label: the share with max softmax >= 0.9 and the share read as that label, on a hand-made table of
    # softmax rows (label 0: one sure and right, one sure and wrong, one unsure and right; label 1: one unsure, wrong).
    module = _benchmark("confidence_breakdown")
    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.8, 0.2]])
    x = torch.zeros(4, 1, 2, 2)
    b = module.breakdown(x, lambda _: probs, lambda _: 0.5, labels=torch.tensor([0, 0, 0, 1]))
    assert b["by_label"] == {0: {"confident": pytest.approx(2 / 3), "read_as_drawn": pytest.approx(2 / 3)},
                             1: {"confident": 0.0, "read_as_drawn": 0.0}}
    assert "by_label" not in module.breakdown(x, lambda _: probs, lambda _: 0.5)


def test_demo_sweep_variants_build_and_restore_what_they_were_scored_with():
    # Every variant of benchmarks/demo_sweep.py must build a valid config from today's demo config (a renamed key
    # would otherwise surface only when a sweep is rerun), and rounds 4-6 must restore the w = 1.5 they were scored at.
    module = _benchmark("demo_sweep")
    for name, overrides in module.VARIANTS.items():
        cfg = module.demo_config(overrides)
        if name.startswith(("r4_", "r5_", "r6_")):
            assert cfg.method.guidance == 1.5, name
    assert module.demo_config(module.VARIANTS["r6_n8"]).method.s1 == 7  # N = 8 throughout


def test_mid_sigma_benchmark_scores_as_eval_and_moves_with_sigma_mid(digits_run, tmp_path):
    # benchmarks/mid_sigma.py at the run's own two-step level (iCT's 0.821) must give cmkit eval's two-step figures
    # exactly (same seed, n, labels); another level must sample other images (the level is really applied).
    module = _benchmark("mid_sigma")
    scores = module.score_run(str(digits_run), [0.821, 2.0], n=200)
    report = evaluate_run(digits_run, steps=[2], n=200, out=tmp_path / "m.json")
    assert _scores(scores[0.821]) == pytest.approx(_scores(report["steps"]["2"]), abs=1e-12)
    assert scores[2.0]["fd"] != pytest.approx(scores[0.821]["fd"], abs=1e-9)


# ----------------------------------------------------------------------------
# Class-conditional runs: class_match, `cmkit sample --labels`, labelled sample files.


def test_class_match_is_the_classifiers_agreement_with_the_given_labels():
    from cmkit.data import load_dataset

    ds = load_dataset(DataConfig(name="digits", split="test", labels=True))
    x = ds.to_data_space(ds.x)
    net, _ = load_classifier(WEIGHTS_DIR / CLASSIFIERS["digits"][0])
    with torch.no_grad():
        predicted = net.eval()(x).argmax(dim=1)
    accuracy = float((predicted == ds.labels).double().mean())  # the classifier's held-out accuracy, by hand
    ev = Evaluator(load_config("configs/ict_digits.yaml", ["data.labels=true", "net.class_cond=true"]))
    assert ev.num_classes == 10 and "class_match" in ev.protocol["metrics"]
    assert ev.metrics(x, ds.labels)["class_match"] == pytest.approx(accuracy, abs=1e-12)
    assert accuracy > 0.95
    wrong = ev.metrics(x, (ds.labels + 1) % 10)["class_match"]
    assert wrong == pytest.approx(float((predicted == (ds.labels + 1) % 10).double().mean()), abs=1e-12)
    assert wrong < 0.05
    assert "class_match" not in ev.metrics(x)  # no labels given: no figure
    with pytest.raises(ConfigError, match="one label per sample"):
        ev.metrics(x, ds.labels[:10])


@pytest.fixture(scope="module")
def conditional_digits_run(tmp_path_factory):
    from cmkit.train import train

    root = tmp_path_factory.mktemp("conddigits")
    return train(load_config("configs/ict_digits.yaml", [
        "net.name=mlp", "net.hidden=32", "net.depth=1", "net.class_cond=true", "data.labels=true",
        "train.steps=3", "train.batch_size=16", f"data.cache_dir={root / 'cache'}", f"run.dir={root / 'run'}",
        "run.progress=false", "run.tensorboard=false", "run.sample_n=4", "run.sample_steps=[1]",
        "eval.every_nimg=0", "train.threads=1"]))


def test_conditional_run_eval_and_its_labelled_sample_file_agree(conditional_digits_run, tmp_path, capsys):
    from cmkit.cli import main
    from cmkit.run import load

    run_dir = conditional_digits_run
    report = evaluate_run(run_dir, steps=[1], n=200, out=tmp_path / "run.json")
    assert "class_match" in report["steps"]["1"] and "class_match" in report["protocol"]
    npz = tmp_path / "s.npz"
    assert main(["sample", str(run_dir), "--n", "200", "--out", str(npz)]) == 0
    with np.load(npz) as f:
        assert f["labels"].tolist() == [i % 10 for i in range(200)]  # the labels eval samples for
    assert main(["eval", "--samples", str(npz), "--data", "digits", "--out", str(tmp_path / "file.json")]) == 0
    file = json.loads((tmp_path / "file.json").read_text())
    assert _scores(file["samples"]) == pytest.approx(_scores(report["steps"]["1"]))
    assert "class_match" in file["protocol"]["metrics"]
    # class_match by hand: the classifier's argmax against the stored labels
    with np.load(npz) as f:
        x, y = torch.from_numpy(f["samples"]), torch.from_numpy(f["labels"])
    net, _ = load_classifier(WEIGHTS_DIR / CLASSIFIERS["digits"][0])
    with torch.no_grad():
        by_hand = float((net.eval()(x).argmax(dim=1) == y).double().mean())
    assert file["samples"]["class_match"] == pytest.approx(by_hand, abs=1e-12)
    # --labels picks the classes, cycled over --n; the samples are the model's for those labels
    three = tmp_path / "three.npz"
    assert main(["sample", str(run_dir), "--n", "6", "--labels", "3", "7", "--out", str(three)]) == 0
    with np.load(three) as f:
        assert f["labels"].tolist() == [3, 7, 3, 7, 3, 7]
        direct = load(run_dir).sample(6, 1, seed=0, class_labels=torch.tensor([3, 7, 3, 7, 3, 7]))
        assert np.array_equal(f["samples"], direct.numpy())
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--n", "6", "--labels", "10", "--out", str(three)]) == 2
    assert "--labels 10" in capsys.readouterr().err


def test_sample_labels_on_an_unconditional_run_and_bad_label_arrays_are_clear_errors(digits_run, tmp_path, capsys):
    from cmkit.cli import main

    out = tmp_path / "x.npz"
    assert main(["sample", str(digits_run), "--n", "4", "--labels", "1", "--out", str(out)]) == 2
    assert "net.class_cond=true" in capsys.readouterr().err and not out.exists()
    good = np.random.default_rng(0).random((50, 1, 8, 8)).astype(np.float32)
    cases = {"float": (np.zeros(50), "integers"), "short": (np.zeros(49, dtype=np.int64), "integers"),
             "range": (np.full(50, 10), "outside the 10 classes")}
    for name, (labels, message) in cases.items():
        f = tmp_path / f"{name}.npz"
        np.savez(f, samples=good, labels=labels)
        assert main(["eval", "--samples", str(f), "--data", "digits"]) == 2, name
        assert message in capsys.readouterr().err, name


# ----------------------------------------------------------------------------
# Noise temperature (the truncation trick): --temperature T scales the starting noise, and only that.


def test_temperature_scales_only_the_starting_noise():
    from cmkit.sampling import sample_batched

    seen = []

    def recording_sampler(model, noise, times, *, generator=None, class_labels=None):
        later = torch.randn(noise.shape, generator=generator)  # what a multistep sampler draws for its next step
        seen.append((noise.clone(), later))
        return noise

    model = torch.nn.Linear(1, 1)
    for tau in (1.0, 0.5, 1.7):
        sample_batched(model, 5, (3,), [80.0], sampler=recording_sampler, batch_size=2, seed=4, temperature=tau)
    plain, half, hot = seen[0:3], seen[3:6], seen[6:9]
    for (z1, l1), (zh, lh), (zt, lt) in zip(plain, half, hot):
        torch.testing.assert_close(zh, 0.5 * z1, rtol=0, atol=0)
        torch.testing.assert_close(zt, 1.7 * z1, rtol=0, atol=0)
        assert torch.equal(lh, l1) and torch.equal(lt, l1)  # the generator's stream is not consumed differently


def test_cli_temperature_in_sample_and_eval_and_bad_values(toy_run, tmp_path, capsys):
    from cmkit.cli import main
    from cmkit.run import load

    npz = tmp_path / "t.npz"
    assert main(["sample", str(toy_run), "--n", "20", "--temperature", "0.5", "--out", str(npz)]) == 0
    with np.load(npz) as f:
        direct = load(toy_run).sample(20, 1, seed=0, temperature=0.5)
        assert np.array_equal(f["samples"], direct.numpy())
        assert not np.array_equal(f["samples"], load(toy_run).sample(20, 1, seed=0).numpy())
    plain = evaluate_run(toy_run, steps=[1], n=300, out=tmp_path / "plain.json")
    assert main(["eval", str(toy_run), "--steps", "1", "--n", "300", "--temperature", "0.5",
                 "--out", str(tmp_path / "cold.json")]) == 0
    cold = json.loads((tmp_path / "cold.json").read_text())
    assert cold["protocol"]["noise_temperature"] == 0.5 and "noise_temperature" not in plain["protocol"]
    assert cold["steps"]["1"]["fd"] != plain["steps"]["1"]["fd"]
    capsys.readouterr()
    for bad in ("0", "-1", "nan", "inf"):
        out = tmp_path / f"bad{bad}.npz"
        assert main(["sample", str(toy_run), "--n", "4", "--temperature", bad, "--out", str(out)]) == 2, bad
        assert "--temperature" in capsys.readouterr().err and not out.exists(), bad
        assert main(["eval", str(toy_run), "--temperature", bad, "--out", str(tmp_path / "b.json")]) == 2, bad
        assert "--temperature" in capsys.readouterr().err and not (tmp_path / "b.json").exists(), bad
    assert main(["eval", "--samples", str(npz), "--config", str(toy_run / "config.yaml"), "--temperature", "0.5"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_classifier_free_guidance_is_the_guided_combination_of_the_two_outputs():
    """cmkit.sampling.WithCFG: f(x,t,∅) + w·(f(x,t,c) − f(x,t,∅)), recomputed from two separate passes;
    w = 1 is the conditional model, w = 0 the unconditional one (∅ = the zero label vector)."""
    from cmkit.objectives import build_objective
    from cmkit.sampling import WithCFG

    K = 10
    cfg = load_config(None, ["net.name=mlp", "net.hidden=32", "net.depth=2", "net.class_cond=true",
                             "method.label_dropout=0.1"])
    torch.manual_seed(0)
    model = build_objective(cfg, (2,), K).model.eval()
    with torch.no_grad():
        for p in model.parameters():  # the label table starts small; make both halves clearly differ
            p.add_(0.3 * torch.randn_like(p))
    x, t, labels = torch.randn(12, 2), torch.full((12,), 5.0), torch.arange(12) % K
    with torch.no_grad():
        c = model(x, t, torch.nn.functional.one_hot(labels, K).float())
        u = model(x, t, torch.zeros(12, K))
        assert (c - u).abs().max() > 1e-3  # the check below can fail
        for w in (0.0, 1.0, 2.5):
            torch.testing.assert_close(WithCFG(model, w, K)(x, t, labels), u + w * (c - u))
        torch.testing.assert_close(WithCFG(model, 1.0, K)(x, t, labels), model(x, t, labels))
        torch.testing.assert_close(WithCFG(model, 0.0, K)(x, t, labels), u)


@pytest.fixture(scope="module")
def cfg_digits_run(tmp_path_factory):
    from cmkit.train import train

    root = tmp_path_factory.mktemp("cfgdigits")
    return train(load_config("configs/ict_digits.yaml", [
        "net.name=mlp", "net.hidden=32", "net.depth=1", "net.class_cond=true", "data.labels=true",
        "method.label_dropout=0.2", "method.guidance=1.5", "train.steps=3", "train.batch_size=16", f"data.cache_dir={root / 'cache'}",
        f"run.dir={root / 'run'}", "run.progress=false", "run.tensorboard=false", "run.sample_n=4",
        "run.sample_steps=[1]", "eval.every_nimg=0", "train.threads=1"]))


def test_cli_guidance_of_a_label_dropout_run_and_bad_values(cfg_digits_run, conditional_digits_run, tmp_path,
                                                           capsys):
    from cmkit.cli import main
    from cmkit.run import load
    from cmkit.sampling import WithCFG, sample_batched

    run_dir = cfg_digits_run
    run = load(run_dir)
    labels = torch.arange(20) % 10

    def by_hand(model):  # the sampler fed the given model, the run's EMA weights, the same seed and labels
        x = sample_batched(model, 20, run.dataset.shape, run.objective.sample_times(2), seed=0, class_labels=labels)
        return run.dataset.to_data_space(x).numpy()

    unguided = by_hand(run.model())
    cases = {"2": by_hand(WithCFG(run.model(), 2.0, 10)), "1": unguided, None: by_hand(WithCFG(run.model(), 1.5, 10))}
    for w, expected in cases.items():  # None: the run's own method.guidance = 1.5
        npz = tmp_path / f"g{w}.npz"
        assert main(["sample", str(run_dir), "--n", "20", "--steps", "2", *(["--guidance", w] if w else []),
                     "--out", str(npz)]) == 0
        with np.load(npz) as f:
            assert np.allclose(f["samples"], expected, atol=1e-6), w
    assert not np.allclose(cases["2"], unguided, atol=1e-3) and not np.allclose(cases[None], unguided, atol=1e-3)
    assert run.guidance_scale() == 1.5 and run.guidance_scale(1.0) is None and run.guidance_scale(3) == 3.0
    plain = evaluate_run(run_dir, steps=[1], n=200)  # RUN/metrics.json, which make demo's summary reads
    from cmkit.demo_summary import summarize

    assert "classifier-free guidance w = 1.5" in summarize(run_dir)
    assert main(["eval", str(run_dir), "--steps", "1", "--n", "200", "--guidance", "3",
                 "--out", str(tmp_path / "w3.json")]) == 0
    w3 = json.loads((tmp_path / "w3.json").read_text())
    assert w3["protocol"]["guidance"] == 3.0 and plain["protocol"]["guidance"] == 1.5
    assert main(["eval", str(run_dir), "--steps", "1", "--n", "200", "--guidance", "1",
                 "--out", str(tmp_path / "w1.json")]) == 0
    assert "guidance" not in json.loads((tmp_path / "w1.json").read_text())["protocol"]
    assert w3["steps"]["1"]["fd"] != plain["steps"]["1"]["fd"]
    capsys.readouterr()
    for bad in ("-1", "nan", "inf"):
        out = tmp_path / f"bad{bad}.npz"
        assert main(["sample", str(run_dir), "--n", "4", "--guidance", bad, "--out", str(out)]) == 2, bad
        assert "--guidance" in capsys.readouterr().err and not out.exists(), bad
        assert main(["eval", str(run_dir), "--guidance", bad, "--out", str(tmp_path / "b.json")]) == 2, bad
        assert "--guidance" in capsys.readouterr().err and not (tmp_path / "b.json").exists(), bad
    edit = ["edit", str(run_dir), "--task", "interpolate", "--n", "3", "--label", "4"]
    for bad in ("-1", "nan"):
        out = tmp_path / f"edit{bad}.npz"
        assert main([*edit, "--guidance", bad, "--out", str(out)]) == 2 and not out.exists(), bad
        assert "--guidance" in capsys.readouterr().err
    # zero-shot editing guides like sampling: the path's ends are the guided samples of seeds 0 and 1
    four = torch.full((1,), 4)
    for w in (None, "2"):
        out = tmp_path / f"edit{w}.npz"
        assert main([*edit, *(["--guidance", w] if w else []), "--out", str(out)]) == 0
        scale = None if w is None else float(w)
        with np.load(out) as f:
            for i, seed in ((0, 0), (-1, 1)):
                expected = run.sample(1, seed=seed, class_labels=four, guidance=scale)[0].numpy()
                assert np.allclose(f["samples"][i], expected, atol=1e-5), (w, seed)
    # a class-conditional run trained without label dropout has no unconditional model to guide with
    out = tmp_path / "nodrop.npz"
    assert main(["sample", str(conditional_digits_run), "--n", "4", "--guidance", "2", "--out", str(out)]) == 2
    assert "method.label_dropout" in capsys.readouterr().err and not out.exists()
    assert main(["eval", "--samples", str(tmp_path / "g2.npz"), "--data", "digits", "--guidance", "2"]) == 2
    assert "--guidance" in capsys.readouterr().err
    # method.guidance without the unconditional model to guide with is refused at load
    with pytest.raises(ConfigError, match="method.label_dropout"):
        load_config(None, ["method.guidance=2"])
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="method.guidance"):
            load_config(None, ["method.label_dropout=0.1", f"method.guidance={bad}"])
