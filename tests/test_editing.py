"""Zero-shot editing: exact constraints, Algorithm 4 recomputed here, seeds, slerp, the CLI."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit import editing
from cmkit.data import DataError
from cmkit.model import Parameterized
from cmkit.nets.mlp import MLP
from cmkit.processes import TrigFlow, VEProcess
from cmkit.sampling import sample_batched

SHAPE = (3, 8, 8)


def _model(shape=SHAPE, process=None, seed=0):
    torch.manual_seed(seed)
    return Parameterized(MLP(shape, hidden=32, depth=1), process or VEProcess()).eval()


def _images(n=3, shape=SHAPE, seed=1):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class TrigFlowLike:
    """A TrigFlow process written here (sCM Sec. 3, Eq. 3-5): x_t = cos t·x0 + sin t·σ_d z, t ∈ [0, π/2]."""

    sigma_data = 0.5
    t_min, t_max = 0.0, math.pi / 2

    def add_noise(self, x0, z, t):
        t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return torch.cos(t) * x0 + torch.sin(t) * self.sigma_data * z

    renoise = lambda self, x0, t, z: self.add_noise(x0, z, t)  # noqa: E731

    def from_noise(self, z):
        return self.sigma_data * z

    def sampling_times(self, steps):
        return [self.t_max] if steps == 1 else torch.linspace(self.t_max, 0.3, steps).tolist()

    def scalings(self, t, kind="consistency"):
        # sCM Eq. 5: f(x, t) = cos t·x - sin t·σ_d F(x/σ_d, t)
        return torch.cos(t), -torch.sin(t) * self.sigma_data, torch.full_like(t, 1 / self.sigma_data), t


# ----------------------------------------------------------------------------
# The operators are what they claim: A⁺ is the Moore-Penrose pseudo-inverse of A.


def _dense(fn, shape):
    """The matrix of a linear map on tensors of shape (1, *shape), column by column."""
    d = math.prod(shape)
    eye = torch.eye(d, dtype=torch.float64).reshape(d, 1, *shape)
    return torch.stack([fn(e).flatten() for e in eye], dim=1)


@pytest.mark.parametrize("op, shape", [
    (editing.AvgPool(2), (1, 4, 4)),
    (editing.AvgPool(4), (3, 4, 8)),
    (editing.ChannelMix(editing.GREYSCALE["luminance"]), (3, 2, 3)),
    (editing.ChannelMix(editing.GREYSCALE["mean"]), (3, 2, 2)),
])
def test_pinv_is_moore_penrose(op, shape):
    A = _dense(op.forward, shape)
    out_shape = op.forward(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:]
    A_pinv = _dense(op.pinv, out_shape)
    torch.testing.assert_close(A_pinv, torch.linalg.pinv(A), atol=1e-12, rtol=0)


def test_luminance_weights_and_pooling_recomputed():
    x = _images(2, (3, 4, 4)).double()
    grey = editing.ChannelMix(editing.GREYSCALE["luminance"]).forward(x)
    torch.testing.assert_close(grey[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    low = editing.AvgPool(2).forward(x)
    torch.testing.assert_close(low, x.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5)))


# ----------------------------------------------------------------------------
# The known part is kept.


def test_inpainting_keeps_known_pixels_exactly():
    model, x = _model(), _images()
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:6, 1:7] = True  # to generate
    out = editing.inpaint(model, x, mask, [80.0, 5.0, 0.5], generator=_gen())
    known = ~mask.expand_as(x)
    assert torch.equal(out[known], x[known])
    assert (out[~known] - x[~known]).abs().max() > 1e-2  # the hole really is regenerated
    assert torch.isfinite(out).all()


def test_superres_output_downsamples_to_the_input():
    model, x = _model(), _images()
    low = x.reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 block means, computed here
    out = editing.superres(model, low, 2, [80.0, 2.0, 0.3], generator=_gen())
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5)), low, atol=1e-5, rtol=0)
    assert (out - editing.AvgPool(2).pinv(low)).abs().max() > 1e-2  # not just the blocky upsampling


@pytest.mark.parametrize("greyscale, w", [("luminance", (0.299, 0.587, 0.114)), ("mean", (1 / 3, 1 / 3, 1 / 3))])
def test_colorization_preserves_the_grey_level(greyscale, w):
    model, x = _model(), _images()
    grey = w[0] * x[:, 0] + w[1] * x[:, 1] + w[2] * x[:, 2]
    out = editing.colorize(model, x, [80.0, 1.0], greyscale=greyscale, generator=_gen())
    torch.testing.assert_close(w[0] * out[:, 0] + w[1] * out[:, 1] + w[2] * out[:, 2], grey, atol=1e-5, rtol=0)
    assert (out - x).abs().max() > 1e-2


def test_colorization_of_one_channel_data_is_refused():
    model = _model((1, 8, 8))
    with pytest.raises(DataError, match="only applicable to RGB"):
        editing.colorize(model, _images(2, (1, 8, 8)), [80.0])


# ----------------------------------------------------------------------------
# The loop is Algorithm 4, recomputed here for super-resolution.


def test_edit_loop_matches_algorithm_4_by_hand():
    model, x = _model(), _images()
    low = x.reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    up = low.repeat_interleave(2, -2).repeat_interleave(2, -1)
    sigmas, sigma_min = [80.0, 3.0, 0.4], 0.002
    out = editing.superres(model, low, 2, sigmas, generator=_gen(7))

    g = _gen(7)

    def f(v, s):
        return model(v, torch.full((3,), s))

    def project(v):  # A⁻¹[(Ay)⊙(1-Ω) + (Ax)⊙Ω]: replace each 2x2 block mean by the reference's
        return v - v.reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5)).repeat_interleave(2, -2).repeat_interleave(2, -1) + up

    v = up + sigmas[0] * torch.randn(x.shape, generator=g)  # x ~ N(y, t_1² I)
    v = project(f(v, sigmas[0]))
    for s in sigmas[1:]:
        v = v + math.sqrt(s**2 - sigma_min**2) * torch.randn(x.shape, generator=g)  # x ~ N(x, (t_n² - ε²) I)
        v = project(f(v, s))
    torch.testing.assert_close(out, v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("process", [TrigFlowLike(), TrigFlow()], ids=["written_here", "cmkit"])
def test_trigflow_process_through_the_interface(process):
    model, x = _model(process=process), _images()
    mask = torch.rand(1, 1, 8, 8, generator=_gen(3)) > 0.5
    out = editing.inpaint(model, x, mask, process.sampling_times(3), generator=_gen())
    known = ~mask.expand_as(x)
    assert torch.equal(out[known], x[known]) and torch.isfinite(out).all()
    # Denoising finds the TrigFlow time of a noise level: σ_d tan t = σ (derived from Eq. 3).
    t = editing.noise_level_time(process, 0.3)
    assert t == pytest.approx(math.atan(0.3 / 0.5), abs=1e-9)
    y = _images()
    torch.testing.assert_close(editing.denoise(model, y, 0.3),
                               model(math.cos(t) * y, torch.full((3,), t)), atol=1e-5, rtol=0)


def test_denoise_is_the_consistency_function_at_the_input_level():
    model, y = _model(), _images()
    assert editing.noise_level_time(VEProcess(), 0.7) == pytest.approx(0.7, abs=1e-9)
    torch.testing.assert_close(editing.denoise(model, y, 0.7), model(y, torch.full((3,), 0.7)), atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="outside"):
        editing.denoise(model, y, 500.0)
    with pytest.raises(ValueError, match="decrease"):
        editing.denoise(model, y, 0.7, [0.9])


# ----------------------------------------------------------------------------
# Seeds.


def test_editing_is_deterministic_under_a_seed():
    model, x = _model(), _images()
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :4, :] = True
    times = editing.default_times(model.process, "inpaint", 4)
    a = editing.inpaint(model, x, mask, times, generator=_gen(5))
    b = editing.inpaint(model, x, mask, times, generator=_gen(5))
    c = editing.inpaint(model, x, mask, times, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_slerp_closed_form():
    z0, z1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(editing.slerp(z0, z1, 0.5), torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    torch.testing.assert_close(editing.slerp(z0, z1, 1 / 3), torch.tensor([[math.cos(math.pi / 6), 0.5]]))
    assert torch.equal(editing.slerp(z0, z1, 0.0), z0) and torch.equal(editing.slerp(z0, z1, 1.0), z1)
    torch.testing.assert_close(editing.slerp(z0, 2 * z0, 0.5), 1.5 * z0)  # parallel: linear limit


@pytest.mark.parametrize("times", [[80.0], [80.0, 2.0, 0.5]])
def test_interpolation_endpoints_are_the_plain_samples(times):
    model = _model()
    path = editing.interpolate(model, SHAPE, 11, 12, [0.0, 0.3, 0.7, 1.0], times)
    s0 = sample_batched(model, 1, SHAPE, times, seed=11)
    s1 = sample_batched(model, 1, SHAPE, times, seed=12)
    torch.testing.assert_close(path[0], s0[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(path[-1], s1[0], atol=1e-6, rtol=0)
    assert (path[1] - s0[0]).abs().max() > 1e-3 and (path[1] - s1[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------
# The command line on a tiny trained run.


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from cmkit.config import load_config
    from cmkit.train import train

    run = tmp_path_factory.mktemp("edit") / "run"
    cfg = load_config("configs/ict_digits.yaml", [
        "net.name=mlp", "net.hidden=32", "net.depth=1", "train.steps=2", "train.batch_size=16",
        "run.progress=false", "run.tensorboard=false", "run.sample_every=0", "run.sample_n=4",
        f"run.dir={run}", "eval.every_nimg=0"])
    train(cfg)
    return run


def test_cli_edit_tasks(digits_run, tmp_path, capsys):
    from cmkit.cli import main
    from sklearn.datasets import load_digits

    x = (load_digits().images[:4] / 16.0).astype(np.float32)  # (4, 8, 8) in [0, 1]
    np.savez(tmp_path / "x.npz", x=x)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = str(digits_run)

    assert main(["edit", r, "--task", "inpaint", "--input", str(tmp_path / "x.npz"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "3", "--out", str(tmp_path / "inp.npz")]) == 0
    out = np.load(tmp_path / "inp.npz")["samples"]
    keep = np.ones((8, 8), bool)
    keep[2:6, 2:6] = False
    assert out.shape == (4, 1, 8, 8)
    np.testing.assert_allclose(out[:, 0][:, keep], x[:, keep], atol=1e-6)

    assert main(["edit", r, "--task", "superres", "--input", str(tmp_path / "x.npz"), "--factor", "2",
                 "--out", str(tmp_path / "sr.png"), "--compare"]) == 0
    assert Image.open(tmp_path / "sr.png").size[0] > 0
    low = x.reshape(4, 4, 2, 4, 2).mean(axis=(2, 4))
    np.savez(tmp_path / "low.npz", x=low)
    assert main(["edit", r, "--task", "superres", "--input", str(tmp_path / "low.npz"),
                 "--out", str(tmp_path / "sr.npz")]) == 0
    sr = np.load(tmp_path / "sr.npz")["samples"][:, 0]
    # The model's output may leave [0, 1] and is clamped there; compare where it is inside.
    inside = ((sr > 0) & (sr < 1)).reshape(4, 4, 2, 4, 2).all(axis=(2, 4))
    np.testing.assert_allclose(sr.reshape(4, 4, 2, 4, 2).mean(axis=(2, 4))[inside], low[inside], atol=1e-5)

    noisy = x + 0.1 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    np.savez(tmp_path / "noisy.npz", x=noisy)
    assert main(["edit", r, "--task", "denoise", "--input", str(tmp_path / "noisy.npz"), "--sigma", "0.1",
                 "--out", str(tmp_path / "dn.npz")]) == 0
    assert main(["edit", r, "--task", "interpolate", "--seeds", "3", "4", "--n", "5",
                 "--out", str(tmp_path / "it.npz")]) == 0
    assert np.load(tmp_path / "it.npz")["samples"].shape == (5, 1, 8, 8)

    capsys.readouterr()
    assert main(["edit", r, "--task", "colorize", "--input", str(tmp_path / "x.npz"), "--out",
                 str(tmp_path / "c.png")]) == 2
    assert "not applicable" in capsys.readouterr().err
    assert main(["edit", r, "--task", "inpaint", "--input", str(tmp_path / "x.npz"), "--out",
                 str(tmp_path / "c.png")]) == 2
    assert "--mask" in capsys.readouterr().err
    assert main(["edit", r, "--task", "denoise", "--input", str(tmp_path / "noisy.npz"), "--out",
                 str(tmp_path / "c.png")]) == 2
    assert "--sigma" in capsys.readouterr().err


def _train_tiny(run_dir, *overrides):
    from cmkit.config import load_config
    from cmkit.train import train

    return train(load_config("configs/ict_digits.yaml", [
        "net.name=mlp", "net.hidden=32", "net.depth=1", "train.steps=2", "train.batch_size=16",
        "run.progress=false", "run.tensorboard=false", "run.sample_every=0", "run.sample_n=4",
        "run.sample_steps=[1]", f"run.dir={run_dir}", "eval.every_nimg=0", "train.threads=1", *overrides]))


def _load_script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_inputs_follow_the_run_and_feed_the_cli(tmp_path):
    from cmkit.cli import main
    from cmkit.run import load

    # A run on padded digits (12x12): examples from the bundled 8x8 set would not fit its model.
    run_dir = _train_tiny(tmp_path / "run", "data.pad_to=12", f"data.cache_dir={tmp_path / 'cache'}")
    script = _load_script("make_edit_examples")
    cfg = script.inputs_config("mnist", load(run_dir))  # --data is ignored given a run
    assert (cfg.name, cfg.pad_to, cfg.split, cfg.vae) == ("digits", 12, "test", "")
    ex_dir = tmp_path / "ex"
    ex = script.make_inputs(cfg, 3, ex_dir, seed=0)
    clean = np.load(ex_dir / "clean.npz")["x"]
    assert clean.shape == (3, 1, 12, 12) and torch.equal(torch.from_numpy(clean), ex["clean"])
    assert (clean[..., :2, :] == 0).all()  # the run's padding (black border of 2 pixels)
    r = str(run_dir)
    assert main(["edit", r, "--task", "inpaint", "--input", str(ex_dir / "clean.npz"), "--mask",
                 str(ex_dir / "mask_center.png"), "--steps", "2", "--out", str(tmp_path / "inp.npz")]) == 0
    out = np.load(tmp_path / "inp.npz")["samples"]
    hole = np.asarray(Image.open(ex_dir / "mask_center.png")) > 127
    assert out.shape == (3, 1, 12, 12) and hole[6, 6] and not hole[0, 0]
    np.testing.assert_allclose(out[:, 0][:, ~hole], clean[:, 0][:, ~hole], atol=1e-6)
    assert main(["edit", r, "--task", "superres", "--input", str(ex_dir / "low_x2.npz"), "--steps", "2",
                 "--out", str(tmp_path / "sr.npz")]) == 0
    assert np.load(tmp_path / "sr.npz")["samples"].shape == (3, 1, 12, 12)
    assert main(["edit", r, "--task", "denoise", "--input", str(ex_dir / "noisy_0.2.npz"), "--sigma", "0.2",
                 "--out", str(tmp_path / "dn.npz")]) == 0
    assert np.load(tmp_path / "dn.npz")["samples"].shape == (3, 1, 12, 12)


def test_latent_runs_edit_by_interpolation_only(tmp_path):
    from cmkit.config import ConfigError, DataConfig
    from cmkit.data import load_dataset
    from cmkit.latent.autoencoder import AEConfig, save_autoencoder, train_autoencoder
    from cmkit.run import load

    digits = load_dataset(DataConfig(name="digits", cache_dir=str(tmp_path / "cache")))
    model, info = train_autoencoder(digits.x, AEConfig(in_channels=1, latent_channels=2, channels=8, levels=1),
                                    steps=3, batch_size=64, lr=3e-3, seed=0)
    ae_dir = save_autoencoder(model, tmp_path / "ae", info)
    run = load(_train_tiny(tmp_path / "run", f"data.vae={ae_dir}", f"data.cache_dir={tmp_path / 'cache'}"))
    assert run.dataset.shape == (2, 4, 4)
    x = torch.rand(2, 1, 8, 8)
    for task, kw in [("inpaint", {"mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)}), ("superres", {}),
                     ("denoise", {"sigma": 0.1}), ("colorize", {})]:
        with pytest.raises(ConfigError, match="interpolate only"):
            editing.edit_run(run, task, x, **kw)
    out, _ = editing.edit_run(run, "interpolate", n=3)  # decoded to pixels
    assert out.shape == (3, 1, 8, 8) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_class_conditional_run_edits_each_image_as_its_own_label(tmp_path):
    # A tensor of labels edits image i as label i: the same as editing each image alone with its int label.
    from cmkit.config import ConfigError
    from cmkit.editing import edit_run
    from cmkit.run import load

    run = load(_train_tiny(tmp_path / "run", "net.class_cond=true", "data.labels=true",
                           f"data.cache_dir={tmp_path / 'cache'}"))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    both, _ = edit_run(run, "denoise", x, sigma=0.2, label=torch.tensor([3, 7]))
    for i, label in enumerate((3, 7)):
        alone, _ = edit_run(run, "denoise", x[i:i + 1], sigma=0.2, label=label)
        torch.testing.assert_close(both[i:i + 1], alone, rtol=0, atol=1e-6)
    other, _ = edit_run(run, "denoise", x, sigma=0.2, label=torch.tensor([7, 3]))
    assert not torch.allclose(other, both)  # the label reaches the network
    with pytest.raises(ConfigError, match="one label per image"):
        edit_run(run, "denoise", x, sigma=0.2, label=torch.tensor([3]))
    with pytest.raises(ConfigError, match="class-conditional"):
        edit_run(run, "denoise", x, sigma=0.2)
