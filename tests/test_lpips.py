"""LPIPS distance (cmkit.lpips) with random weights: an independent reference stack, metric properties,
gradients, file formats, errors, and a training step of CT with method.distance=lpips."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cmkit.lpips as lp
from cmkit.config import ConfigError, load_config
from cmkit.lpips import LPIPS

# torchvision's layer lists (vgg cfg "D", alexnet features), written out independently of cmkit.lpips.
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG_TAP_CONVS = (2, 4, 7, 10, 13)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: after these convs (1-based)


def reference_vgg() -> nn.Sequential:
    layers, cin = [], 3
    for v in VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


def reference_alexnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())


def random_weights(net: str = "vgg", seed: int = 0) -> tuple[dict, dict, nn.Sequential]:
    """A torchvision-style features state_dict, LPIPS v0.1-style heads, and the reference stack holding them."""
    torch.manual_seed(seed)
    ref = reference_vgg() if net == "vgg" else reference_alexnet()
    features = {f"features.{k}": v for k, v in ref.state_dict().items()}
    features["classifier.0.weight"] = torch.randn(3, 3)  # torchvision files carry the classifier too: ignored
    widths = [m.out_channels for m in ref if isinstance(m, nn.Conv2d)]
    taps = [widths[i - 1] for i in VGG_TAP_CONVS] if net == "vgg" else widths
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(taps)}
    return features, heads, ref


def reference_lpips(ref: nn.Sequential, heads: dict, x, y, net: str = "vgg", size: int = 224):
    """LPIPS recomputed from the paper's definition (Zhang et al. 2018 Eq. 1) on the reference stack."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(z):
        z = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
        h, out, convs = (z - shift) / scale, [], 0
        for i, m in enumerate(ref):
            h = m(h)
            convs += isinstance(m, nn.Conv2d)
            tap = convs in VGG_TAP_CONVS if net == "vgg" else True
            if isinstance(m, nn.ReLU) and tap:
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return out

    w = [heads[f"lin{k}.model.1.weight"] for k in range(5)]
    return sum(((a - b) ** 2 * wk).sum(1).mean(dim=(1, 2)) for a, b, wk in zip(feats(x), feats(y), w))


@pytest.fixture
def small_resize(monkeypatch):
    monkeypatch.setattr(lp, "RESIZE", 32)  # VGG at 224 px costs seconds per pair on one CPU thread


def images(n=2, c=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_equals_an_independent_reference(net, small_resize):
    features, heads, ref = random_weights(net)
    d = LPIPS({**features, **heads}, net)
    x, y = images(), images(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(d(x, y), reference_lpips(ref, heads, x, y, net, size=32), rtol=1e-5, atol=1e-6)


def test_shape_symmetry_identity_and_gradient_flow(small_resize):
    features, heads, _ = random_weights("vgg")
    d = LPIPS({**features, **heads})
    x, y = images(3), images(3, seed=2)
    x.requires_grad_(True)
    dxy = d(x, y)
    assert dxy.shape == (3,) and (dxy > 0).all()
    torch.testing.assert_close(dxy.detach(), d(y, x.detach()), rtol=1e-6, atol=0)
    assert torch.equal(d(x.detach(), x.detach()), torch.zeros(3))
    dxy.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    assert list(d.parameters()) == [] and d.state_dict() == {}  # frozen, never checkpointed


def test_small_images_are_upsampled_bilinearly_to_224():
    features, heads, _ = random_weights("alex")
    d = LPIPS({**features, **heads}, "alex")
    x, y = images(size=8), images(size=8, seed=2)
    up = lambda z: F.interpolate(z, size=(224, 224), mode="bilinear", align_corners=False)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(d(x, y), d(up(x), up(y)))
        # greyscale: the same image in each channel
        torch.testing.assert_close(d(x[:, :1], y[:, :1]), d(x[:, :1].expand(-1, 3, -1, -1), y[:, :1].expand(-1, 3, -1, -1)))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: finite, close to float32
            low = d(x, y)
        assert low.dtype == torch.float32 and torch.allclose(low, d(x, y), rtol=0.03)


def test_files_in_both_formats_and_the_lpips_package_layout(tmp_path, small_resize):
    from safetensors.torch import save_file

    features, heads, _ = random_weights("vgg")
    torch.save(features, tmp_path / "vgg16.pth")
    save_file(heads, str(tmp_path / "heads.safetensors"))
    a = LPIPS.from_files([str(tmp_path / "vgg16.pth"), str(tmp_path / "heads.safetensors")])
    # lpips.LPIPS(net='vgg').state_dict(): net.slice1.0.weight ... net.slice5.28.bias, lin0.model.1.weight ...
    bounds = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
    package = {f"net.slice{s + 1}.{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in features.items()
               if k.startswith("features.") for s, (lo, hi) in enumerate(bounds) if lo <= int(k.split(".")[1]) < hi}
    package |= heads | {"scaling_layer.shift": torch.zeros(1, 3, 1, 1)}
    torch.save(package, tmp_path / "lpips_full.pth")
    b = LPIPS.from_files([str(tmp_path / "lpips_full.pth")])
    x, y = images(), images(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(a(x, y), b(x, y))


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_errors_name_the_file_and_never_run_pickled_code(tmp_path, capsys):
    with pytest.raises(ConfigError, match="/no/such/lpips.pth"):
        LPIPS.from_files(["/no/such/lpips.pth"])
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"features.0.weight": _Evil()}))
    with pytest.raises(ConfigError, match="evil.pth"):
        LPIPS.from_files([str(evil)])
    assert "pickle code ran" not in capsys.readouterr().out
    features, _, _ = random_weights("alex")
    torch.save(features, tmp_path / "features_only.pth")
    with pytest.raises(ConfigError, match="lin.0.weight"):  # the heads are missing
        LPIPS.from_files([str(tmp_path / "features_only.pth")], "alex")
    features, heads, _ = random_weights("vgg")
    features["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ConfigError, match="wrong shapes"):
        LPIPS(features | heads, "vgg")


def test_config_checks_and_the_cli_exits_2_on_a_missing_file(tmp_path, capsys):
    from cmkit.cli import main

    with pytest.raises(ConfigError, match="lpips_weights"):
        load_config(None, ["method.name=ct", "method.distance=lpips"])
    with pytest.raises(ConfigError, match="lpips_net"):
        load_config(None, ["method.name=ct", "method.lpips_net=squeeze"])
    # sCM's JVP methods have no distance: LPIPS there is refused as an unknown key (no JVP through it).
    for name in ("sct", "scd", "ct_trigflow"):
        with pytest.raises(ConfigError, match="method.distance"):
            load_config(None, [f"method.name={name}", "method.distance=lpips"])
    code = main(["train", "configs/ct_mnist.yaml", "data.name=digits", "net.channels=8", "net.channel_mult=[1,2]",
                 "net.attn_resolutions=[]", "net.num_groups=4", "train.steps=1", "method.distance=lpips",
                 "method.lpips_weights=/no/such/vgg.pth", f"run.dir={tmp_path}"])
    assert code == 2 and "/no/such/vgg.pth" in capsys.readouterr().err


def test_lpips_refuses_latents_and_odd_channel_counts(tmp_path):
    from cmkit.lpips import build_lpips

    cfg = load_config(None, ["method.name=ct", "method.distance=lpips", "method.lpips_weights=x.pth"]).method
    for shape, latent in [((4, 8, 8), False), ((3, 8, 8), True), ((2,), False)]:
        with pytest.raises(ConfigError, match="images"):
            build_lpips(cfg, shape, latent)


def test_ct_and_cd_train_a_step_with_lpips(tmp_path):
    from cmkit.objectives import build_objective
    from cmkit.schedules import Progress

    features, heads, _ = random_weights("alex")
    torch.save({**features, **heads}, tmp_path / "alex_lpips.pth")
    lpips = ["method.distance=lpips", f"method.lpips_weights={tmp_path / 'alex_lpips.pth'}", "method.lpips_net=alex"]
    net = ["net.name=unet", "net.channels=8", "net.channel_mult=[1,2]", "net.attn_resolutions=[]", "net.num_groups=4"]
    for method in (["method.name=ct"], ["method.name=cd", "method.teacher=analytic"]):
        cfg = load_config(None, [*method, *lpips, *net, "data.name=digits"])
        objective = build_objective(cfg, (1, 8, 8))
        assert isinstance(objective.distance, LPIPS)
        assert not any(k.startswith("distance") for k in objective.state_dict())
        if method[0] == "method.name=cd":
            continue  # the analytic teacher needs Gaussian data; the distance is built, which is what is tested
        out = objective.phases[0].loss({"x": images(2, 1, 8)}, Progress(0, 100, 2))
        out["loss"].mean().backward()
        assert out["loss"].shape == (2,) and torch.isfinite(out["loss"]).all()
        grads = [p.grad for p in objective.model.parameters() if p.grad is not None]
        assert grads and any(g.abs().max() > 0 for g in grads)
