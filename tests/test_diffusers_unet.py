"""diffusers UNet2DModel backbone (ACT App. A): published sizes, JVP against finite differences and the VJP,
dropout replay, configs and their errors, a short sCT run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import jvp, vjp

pytest.importorskip("diffusers")

from cmkit.config import ConfigError, NetConfig, load_config  # noqa: E402
from cmkit.nets import build_network  # noqa: E402
from cmkit.nets.diffusers_unet import (  # noqa: E402
    DIFFUSERS_PRESETS,
    DiffusersUNet,
    WideTimesteps,
    generic_unet_config,
)
from cmkit.nets.discriminator import build_discriminator  # noqa: E402
from nethelpers import perturbed_double, rel_err


def tiny(**kw) -> NetConfig:
    """Two levels of 8 and 16 channels, attention at 4x4 (for 8x8 inputs), 2 heads of dim 8."""
    base = dict(name="diffusers_unet", channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                num_groups=4, head_dim=8)
    return NetConfig(**{**base, **kw})


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------
# Published sizes: ACT Sec. 4.2 states 27.5M (CIFAR-10) and 107M (ImageNet 64) for the Table 5 configs, and
# 41.6M / 161M with the discriminator (so D = 14.1M / 54M). Counted on the meta device (no memory, no init).


@pytest.mark.parametrize("preset,shape,classes,generator,with_disc", [
    ("act_cifar10", (3, 32, 32), 0, 27.5e6, 41.6e6),
    ("act_imagenet64", (3, 64, 64), 1000, 107e6, 161e6),  # class-conditional, as configs/act_imagenet64.yaml
])
def test_table5_configs_have_the_published_parameter_counts(preset, shape, classes, generator, with_disc):
    cfg = NetConfig(name="diffusers_unet", diffusers_config=preset, class_cond=classes > 0)
    with torch.device("meta"):
        net = build_network(cfg, shape, classes)
        disc = build_discriminator(cfg, shape, classes)  # layers_per_block 3 = 150% of 2 (ACT App. A)
    assert abs(count(net) / generator - 1) < 0.01, count(net)
    assert abs((count(net) + count(disc)) / with_disc - 1) < 0.01, count(disc)
    assert disc.unet_config["layers_per_block"] == 3


@pytest.mark.parametrize("name,preset,shape", [("act_cifar10", "act_cifar10", (3, 32, 32)),
                                               ("act_imagenet64", "act_imagenet64", (3, 64, 64))])
def test_act_configs_build_exactly_the_table5_unet(name, preset, shape):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.net.name == "diffusers_unet" and not cfg.net.diffusers_config
    built = generic_unet_config(cfg.net, shape)
    # Table 5 lists these; dropout 0 and 32 groups are the diffusers defaults ("the default settings").
    assert {k: built[k] for k in DIFFUSERS_PRESETS[preset]} == DIFFUSERS_PRESETS[preset]
    assert built["dropout"] == 0.0 and built["norm_num_groups"] == 32


# ----------------------------------------------------------------------------
# Forward-mode AD.


def test_jvp_matches_float64_finite_difference_and_the_vjp():
    net = perturbed_double(build_network(tiny(), (3, 8, 8))).eval()
    x, c = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64) * 2
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    primal, tangent = jvp(net, (x, c), (tx, tc))
    torch.testing.assert_close(primal, net(x, c))
    eps = 1e-6
    fd = (net(x + eps * tx, c + eps * tc) - net(x - eps * tx, c - eps * tc)) / (2 * eps)
    assert rel_err(tangent, fd) < 1e-4
    # t on its own (the wide time projection keeps float64 through the embedding) and x on its own.
    t_only = jvp(net, (x, c), (torch.zeros_like(x), tc))[1]
    fd_t = (net(x, c + eps * tc) - net(x, c - eps * tc)) / (2 * eps)
    assert t_only.abs().max() > 0 and rel_err(t_only, fd_t) < 1e-4
    # Dot-product test: <u, J v> = <Jᵀ u, v>.
    u = torch.randn_like(primal)
    _, pullback = vjp(net, x, c)
    gx, gc = pullback(u)
    lhs, rhs = (u * tangent).sum(), (gx * tx).sum() + (gc * tc).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_plain_unet2dmodel_fails_under_jvp_so_the_fixes_are_needed():
    from diffusers import UNet2DModel

    unet = UNet2DModel(**DiffusersUNet(generic_unet_config(tiny(), (3, 8, 8)), (3, 8, 8)).unet_config)
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    with pytest.raises(Exception):
        jvp(lambda x_: unet(x_, c).sample, (x,), (torch.randn_like(x),))


def test_wide_time_projection_equals_diffusers_in_float32():
    from diffusers.models.embeddings import Timesteps

    t = torch.randn(16) * 5
    for flip, shift, dim in [(True, 0, 8), (False, 1, 7)]:
        original = Timesteps(dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(WideTimesteps(original)(t), original(t), rtol=1e-6, atol=1e-6)
    assert WideTimesteps(original)(t.double()).dtype == torch.float64


def test_dropout_masks_replay_between_the_jvp_pass_and_a_plain_forward():
    net = perturbed_double(build_network(tiny(dropout=0.3), (3, 8, 8))).train()
    x, c = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    tx, tc = torch.randn_like(x), torch.randn_like(c)

    def seeded(*args):
        torch.manual_seed(7)
        return net(*args)

    primal, tangent = jvp(seeded, (x, c), (tx, tc))
    # Same RNG state -> the same masks: the primal differs from a plain forward only by rounding (~1e-15, the
    # jvp-transformed kernels sum in another order), where one different mask would move it by O(1).
    assert (primal - seeded(x, c)).abs().max() < 1e-12
    assert (seeded(x, c) - net(x, c)).abs().max() > 0.1  # dropout is active
    eps = 1e-6  # the tangent uses the primal's masks: it is the derivative of the seeded (fixed-mask) network
    fd = (seeded(x + eps * tx, c + eps * tc) - seeded(x - eps * tx, c - eps * tc)) / (2 * eps)
    assert rel_err(tangent, fd) < 1e-4


# ----------------------------------------------------------------------------
# Interface, configs, errors.


def test_class_labels_change_the_output_and_are_required():
    net = build_network(tiny(class_cond=True), (3, 8, 8), num_classes=5).eval()
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    a, b = net(x, c, torch.tensor([0, 0])), net(x, c, torch.tensor([3, 3]))
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert net.unet.class_embedding.num_embeddings == 5
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c)
    # Float labels weight the table: one-hot equals the integer label, zeros are the null label (no class term).
    torch.testing.assert_close(net(x, c, torch.nn.functional.one_hot(torch.tensor([3, 3]), 5).float()), b)
    null = net(x, c, torch.zeros(2, 5))
    assert not torch.allclose(null, a) and torch.isfinite(null).all()
    with pytest.raises(ValueError, match="class_cond"):
        build_network(tiny(), (3, 8, 8))(x, c, torch.tensor([0, 1]))


def test_any_unet2dmodel_config_json_works(tmp_path):
    from diffusers import UNet2DModel

    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                  down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"],
                  norm_num_groups=4, attention_head_dim=4)
    UNet2DModel(**config).save_config(tmp_path)  # writes config.json with diffusers' _class_name etc.
    net = build_network(NetConfig(name="diffusers_unet", diffusers_config=str(tmp_path / "config.json")), (1, 8, 8))
    assert net(torch.randn(3, 1, 8, 8), torch.randn(3)).shape == (3, 1, 8, 8)
    assert list(net.unet.config.block_out_channels) == [8, 16]


@pytest.mark.parametrize("cfg,shape,classes,match", [
    (tiny(diffusers_config="no_such_preset"), (3, 8, 8), 0, "neither a preset"),
    (tiny(attn_resolutions=[3]), (3, 8, 8), 0, "attn_resolutions"),
    (tiny(head_dim=0), (3, 8, 8), 0, "head_dim"),
    (tiny(), (3, 9, 9), 0, "divisible"),
    (tiny(), (8,), 0, "image data"),
    (tiny(guidance_cond=True), (3, 8, 8), 0, "guidance"),
])
def test_bad_configs_raise_value_errors_naming_the_key(cfg, shape, classes, match):
    with pytest.raises(ValueError, match=match):
        build_network(cfg, shape, classes)


def test_generic_keys_cap_groups_and_head_dim_to_divide_the_widths():
    # As cmkit's U-Net caps its GroupNorm groups: widths 8 and 16 -> 32 groups become 8; attention at 8x8
    # (width 8) and in the middle (16) -> head dim 16 becomes 8.
    config = generic_unet_config(tiny(channels=8, num_groups=32, head_dim=16, attn_resolutions=[8]), (3, 8, 8))
    assert (config["norm_num_groups"], config["attention_head_dim"]) == (8, 8)
    config = generic_unet_config(tiny(channels=12, num_groups=32, head_dim=16), (3, 8, 8))
    assert (config["norm_num_groups"], config["attention_head_dim"]) == (12, 12)  # widths 12, 24; attention at 24


@pytest.mark.parametrize("extra,match", [
    ({"time_embedding_type": "fourier"}, "positional"),
    ({"in_channels": 1}, "in_channels"),
    ({"not_an_argument": 1}, "unknown UNet2DModel argument"),
    ({"num_class_embeds": 10}, "class_cond"),
    ({"down_block_types": ["SkipDownBlock2D", "DownBlock2D"]}, "not supported"),
    ({"attention_head_dim": 3}, "attention_head_dim"),
    ({"norm_num_groups": 3}, "norm_num_groups"),
])
def test_bad_json_configs_are_refused(tmp_path, extra, match):
    config = {**generic_unet_config(tiny(), (3, 8, 8)), **extra}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        build_network(NetConfig(name="diffusers_unet", diffusers_config=str(tmp_path / "c.json")), (3, 8, 8))


def test_missing_config_file_is_a_config_error_at_train_time(tmp_path):
    from cmkit.train import train

    cfg = load_config(None, ["method.name=ict", "net.name=diffusers_unet", "net.diffusers_config=/nowhere/c.json",
                             "data.name=digits", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="/nowhere/c.json"):
        train(cfg)


@pytest.mark.slow
def test_short_sct_run_is_finite_and_decreases_the_loss(tmp_path):
    from cmkit.train import train

    over = ["method.name=sct", "method.tangent_warmup=0", "data.name=digits", "train.steps=40", "train.batch_size=32",
            "train.lr=2e-3", "train.optimizer=adam", "train.threads=1", "run.log_every=1", "run.progress=false",
            "run.tensorboard=false", "run.sample_n=4", "run.sample_steps=[1]", f"run.dir={tmp_path}",
            "net.name=diffusers_unet", "net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=1",
            "net.attn_resolutions=[4]", "net.num_groups=4", "net.head_dim=8", "net.dropout=0.1"]
    train(load_config(None, over))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    # The checkpoint reloads into a fresh network (hooks and processors hold no state) and samples.
    from cmkit.run import load

    samples = load(tmp_path).sample(3, steps=1)
    assert samples.shape == (3, 1, 8, 8) and torch.isfinite(samples).all()


@pytest.mark.parametrize("name", ["act_cifar10", "act_imagenet64"])
def test_act_presets_train_at_small_size_with_the_diffusers_discriminator(tmp_path, name):
    from cmkit.train import train

    small = ["data.name=digits", "data.path=", "data.labels=true", "net.channels=8", "net.channel_mult=[1,2]",
             "net.attn_resolutions=[4]", "net.num_groups=4", "net.head_dim=8", "train.steps=2", "train.batch_size=8",
             "method.gp_interval=1", "method.aug_interval=1", "train.precision=fp32", "train.device=cpu",
             "run.progress=false", "run.tensorboard=false", "run.sample_n=4", "run.log_every=1", f"run.dir={tmp_path}"]
    train(load_config(f"configs/{name}.yaml", small))
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    gp = [v["discriminator/gp"] for v in logs if "discriminator/gp" in v]
    assert gp and all(math.isfinite(v) and v > 0 for v in gp)  # the R1 penalty's double backward runs through D
