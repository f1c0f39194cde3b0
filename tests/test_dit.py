"""DiT backbone (Peebles & Xie 2023): published sizes, fixed sin-cos positions, adaLN-Zero identity at init,
JVP against finite differences and the VJP, dropout replay, labels, errors, a short sCT run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.func import jvp, vjp

from cmkit.config import NetConfig, load_config
from cmkit.nets import build_network
from cmkit.nets.dit import DiT, sincos_2d, timestep_features
from nethelpers import perturbed_double, rel_err


def tiny(**kw) -> NetConfig:
    return NetConfig(**{**dict(name="dit", hidden=32, depth=2, num_heads=2, patch_size=2), **kw})


@pytest.mark.parametrize("preset,published", [("DiT-S/2", 33e6), ("DiT-B/2", 130e6), ("DiT-L/2", 458e6),
                                              ("DiT-XL/2", 675e6)])
def test_presets_have_the_published_parameter_counts(preset, published):
    # The DiT paper's sizes at 256² images = 32x32x4 latents, class-conditional on ImageNet's 1000 classes;
    # counted on the meta device (the fixed positional embedding is a buffer, not a parameter).
    with torch.device("meta"):
        net = build_network(NetConfig(name="dit", dit=preset, class_cond=True), (4, 32, 32), 1000)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / published - 1) < 0.01, n


def test_positional_embedding_is_mae_2d_sincos():
    # Recomputed from MAE's get_2d_sincos_pos_embed as DiT uses it (meshgrid with w first), in numpy.
    dim, h, w = 16, 3, 5
    gw, gh = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    np.testing.assert_allclose(sincos_2d(dim, h, w).numpy(), ref, rtol=1e-6, atol=1e-7)


def test_timestep_features_are_cos_then_sin_with_glide_frequencies():
    t = torch.tensor([0.0, 1.5, -3.0], dtype=torch.float64)
    f = timestep_features(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(f, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))


def test_adaln_zero_makes_a_fresh_dit_output_zero():
    net = build_network(tiny(), (3, 8, 8))
    assert torch.equal(net(torch.randn(2, 3, 8, 8), torch.randn(2)), torch.zeros(2, 3, 8, 8))
    x = torch.randn(2, 16, 32)
    assert torch.equal(net.blocks[0](x, torch.randn(2, 32)), x)  # each block is the identity at init


def test_patchify_and_unpatchify_are_inverse():
    # A DiT whose blocks are identities and whose output layer copies the patch embedding returns its input.
    net = build_network(tiny(hidden=12, num_heads=2), (3, 4, 4)).double()  # 2·2·3 = 12 = hidden
    with torch.no_grad():
        net.patch.weight.copy_(torch.eye(12, dtype=torch.float64).reshape(12, 2, 2, 3).permute(0, 3, 1, 2))
        net.patch.bias.zero_()
        net.pos.zero_()
        net.norm_out = torch.nn.Identity()
        net.out.weight.copy_(torch.eye(12, dtype=torch.float64))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(net(x, torch.zeros(2, dtype=torch.float64)), x)


def test_jvp_matches_float64_finite_difference_and_the_vjp():
    net = perturbed_double(build_network(tiny(class_cond=True), (3, 8, 8), 4)).eval()
    x, c = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64) * 2
    y = torch.tensor([1, 3])
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    f = lambda x_, c_: net(x_, c_, y)  # noqa: E731
    primal, tangent = jvp(f, (x, c), (tx, tc))
    torch.testing.assert_close(primal, f(x, c))
    eps = 1e-6
    fd = (f(x + eps * tx, c + eps * tc) - f(x - eps * tx, c - eps * tc)) / (2 * eps)
    assert rel_err(tangent, fd) < 1e-4
    t_only = jvp(f, (x, c), (torch.zeros_like(x), tc))[1]
    assert t_only.abs().max() > 0
    u = torch.randn_like(primal)
    gx, gc = vjp(f, x, c)[1](u)
    lhs, rhs = (u * tangent).sum(), (gx * tx).sum() + (gc * tc).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_dropout_masks_replay_between_the_jvp_pass_and_a_plain_forward():
    net = perturbed_double(build_network(tiny(dropout=0.3), (3, 8, 8))).train()
    x, c = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    tx, tc = torch.randn_like(x), torch.randn_like(c)

    def seeded(*args):
        torch.manual_seed(7)
        return net(*args)

    primal, tangent = jvp(seeded, (x, c), (tx, tc))
    assert (primal - seeded(x, c)).abs().max() < 1e-12  # same masks (rounding-level differences only)
    assert (seeded(x, c) - net(x, c)).abs().max() > 0.01  # dropout is active
    eps = 1e-6
    fd = (seeded(x + eps * tx, c + eps * tc) - seeded(x - eps * tx, c - eps * tc)) / (2 * eps)
    assert rel_err(tangent, fd) < 1e-4


def test_labels_int_float_and_null():
    net = perturbed_double(build_network(tiny(class_cond=True), (3, 8, 8), 5)).float().eval()
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    a, b = net(x, c, torch.tensor([0, 0])), net(x, c, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(net(x, c, torch.nn.functional.one_hot(torch.tensor([3, 3]), 5).float()), b)
    assert torch.isfinite(net(x, c, torch.zeros(2, 5))).all()
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c)
    with pytest.raises(ValueError, match="class_cond"):
        build_network(tiny(), (3, 8, 8))(x, c, torch.tensor([0, 1]))


@pytest.mark.parametrize("cfg,shape,match", [
    (tiny(patch_size=3), (3, 8, 8), "patch_size"),
    (tiny(num_heads=3), (3, 8, 8), "num_heads"),
    (tiny(hidden=30, num_heads=2), (3, 8, 8), "divisible by 4"),
    (tiny(dit="DiT-XXL/2"), (3, 8, 8), "preset"),
    (tiny(), (8,), "net.name=mlp"),
    (tiny(guidance_cond=True), (3, 8, 8), "guidance"),
])
def test_bad_configs_raise_value_errors(cfg, shape, match):
    with pytest.raises(ValueError, match=match):
        build_network(cfg, shape)


def test_registered_and_is_a_dit():
    assert isinstance(build_network(tiny(), (1, 8, 8)), DiT)


@pytest.mark.slow
def test_short_sct_run_is_finite_and_decreases_the_loss(tmp_path):
    from cmkit.run import load
    from cmkit.train import train

    over = ["method.name=sct", "method.tangent_warmup=0", "data.name=digits", "train.steps=40", "train.batch_size=32",
            "train.lr=2e-3", "train.optimizer=adam", "train.threads=1", "run.log_every=1", "run.progress=false",
            "run.tensorboard=false", "run.sample_n=4", "run.sample_steps=[1]", f"run.dir={tmp_path}",
            "net.name=dit", "net.hidden=32", "net.depth=2", "net.num_heads=2", "net.patch_size=2", "net.dropout=0.1"]
    train(load_config(None, over))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert torch.isfinite(load(tmp_path).sample(3, steps=1)).all()
