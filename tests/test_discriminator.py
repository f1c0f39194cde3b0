"""Discriminators D(x, t) (ACT App. A, Table 4): the U-Net's down path with ⌈1.5·num_blocks⌉ ResBlocks
per level and no decoder, one logit per sample, and the ablation's variants (no time embedding, LeakyReLU)."""

import math

import pytest
import torch
from torch import nn

from cmkit.config import load_config
from cmkit.nets import build_discriminator
from cmkit.nets.layers import ResBlock
from cmkit.nets.unet import Downsample, Upsample
from cmkit.objectives import build_objective

SHAPE = (1, 8, 8)


def _unet_cfg(*overrides):
    return load_config(None, ["net.name=unet", "net.channels=8", "net.channel_mult=[1,2,2]", "net.num_blocks=1",
                              "net.attn_resolutions=[4]", "net.num_groups=4", *overrides]).net


def _blocks_per_level(disc) -> list[int]:
    """ResBlocks of each encoder level (levels are separated by the strided-conv Downsamples)."""
    counts = [0]
    for layer in disc.enc:
        if isinstance(layer, Downsample):
            counts.append(0)
        elif isinstance(layer, ResBlock):
            counts[-1] += 1
    return counts


@pytest.mark.parametrize("num_blocks,want", [(1, 2), (2, 3), (3, 5), (4, 6)])  # ⌈1.5·b⌉ by hand
def test_default_blocks_are_150_percent_of_the_generator(num_blocks, want):
    disc = build_discriminator(_unet_cfg(f"net.num_blocks={num_blocks}"), SHAPE)
    assert _blocks_per_level(disc) == [want] * 3
    assert len(disc.mid) == 2  # the middle block (ResBlock, attention, ResBlock) is kept


def test_act_method_disc_blocks_overrides_the_default():
    args = ["net.name=unet", "net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=2", "net.attn_resolutions=[]",
            "net.num_groups=4", "method.name=act"]
    assert _blocks_per_level(build_objective(load_config(None, args), SHAPE).discriminator) == [3, 3]
    obj = build_objective(load_config(None, [*args, "method.disc_blocks=1"]), SHAPE)
    assert _blocks_per_level(obj.discriminator) == [1, 1]


def test_no_decoder_and_one_logit_per_sample():
    disc = build_discriminator(_unet_cfg(), SHAPE)
    assert not any(isinstance(m, (Upsample, nn.ConvTranspose2d)) for m in disc.modules())
    # the head reads the middle block's map: 8x8 halved twice (3 levels) = 2x2, channels 8·mult[-1] = 16
    assert disc.head.in_features == 16 * 2 * 2 and disc.head.out_features == 1
    x, c = torch.randn(5, *SHAPE), torch.randn(5)
    assert disc(x, c).shape == (5,)
    mlp = build_discriminator(load_config(None, ["net.name=mlp", "net.hidden=16", "net.depth=2"]).net, (2,))
    assert mlp(torch.randn(7, 2), torch.randn(7)).shape == (7,)


def _perturbed(disc, seed=0):
    # Residual branches and heads start at zero (ADM's zero_module), which makes D independent of t at
    # init; random weights everywhere make any dependence visible.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in disc.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return disc


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_time_embedding_on_depends_on_t_and_off_ignores_it(kind):
    if kind == "unet":
        net, shape = _unet_cfg(), SHAPE
    else:
        net, shape = load_config(None, ["net.name=mlp", "net.hidden=16", "net.depth=2"]).net, (2,)
    torch.manual_seed(0)
    x = torch.randn(4, *shape)
    c1, c2 = torch.full((4,), -2.0), torch.full((4,), 3.0)
    with_t = _perturbed(build_discriminator(net, shape))
    without = _perturbed(build_discriminator(net, shape, time_emb=False))
    assert without.embed.time is None
    diff = (with_t(x, c1) - with_t(x, c2)).abs().max().item()
    assert diff > 1e-3, diff
    assert torch.equal(without(x, c1), without(x, c2))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_leaky_relu_option_changes_the_output(kind):
    if kind == "unet":
        net, shape = _unet_cfg(), SHAPE
    else:
        net, shape = load_config(None, ["net.name=mlp", "net.hidden=16", "net.depth=2"]).net, (2,)
    silu = _perturbed(build_discriminator(net, shape))
    leaky = build_discriminator(net, shape, activation="leaky_relu")
    leaky.load_state_dict(silu.state_dict())  # same parameters, only the activation differs
    x, c = torch.randn(4, *shape), torch.randn(4)
    assert (silu(x, c) - leaky(x, c)).abs().max().item() > 1e-3
    # the head's input activation is LeakyReLU(0.2) by hand
    h = torch.tensor([-1.0, 0.5])
    assert torch.equal(leaky.act(h), torch.tensor([-0.2, 0.5]))
    assert math.isclose(silu.act(torch.tensor(1.0)).item(), 1 / (1 + math.exp(-1)), rel_tol=1e-6)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="leaky_relu"):
        build_discriminator(_unet_cfg(), SHAPE, activation="tanh")
