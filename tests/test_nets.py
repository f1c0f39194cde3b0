"""Backbones: shapes, conditioning, determinism, forward-mode AD against finite differences, config errors."""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp

from cmkit.config import NetConfig
from cmkit.nets import NETWORKS, build_network
from cmkit.nets.layers import (
    EMBEDDINGS,
    MODULATIONS,
    NORMS,
    Attention,
    FourierEmbedding,
    ResBlock,
    make_embedding,
    make_norm,
)
from cmkit.nets.unet import UNet
from nethelpers import perturb, rel_err


def unet_cfg(**kw) -> NetConfig:
    """A tiny U-Net: 8 channels, two levels, attention at 4x4 (for 8x8 inputs)."""
    base = dict(name="unet", channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], num_groups=4)
    return NetConfig(**{**base, **kw})


def mlp_cfg(**kw) -> NetConfig:
    return NetConfig(**{**dict(name="mlp", hidden=32, depth=2), **kw})


def central_fd(f, primals, tangents, eps: float = 1e-6):
    plus = f(*[p + eps * t for p, t in zip(primals, tangents)])
    minus = f(*[p - eps * t for p, t in zip(primals, tangents)])
    return (plus - minus) / (2 * eps)


# ----------------------------------------------------------------------------
# Shapes and conditioning.

SHAPE_CASES = [
    (unet_cfg(), (1, 8, 8)),
    (unet_cfg(channel_mult=[1, 2, 2], attn_resolutions=[7]), (1, 28, 28)),  # 28 -> 14 -> 7
    (unet_cfg(channel_mult=[1, 2, 2], attn_resolutions=[16]), (3, 32, 32)),
    (mlp_cfg(), (2,)),
    (mlp_cfg(), (1, 8, 8)),
]


@pytest.mark.parametrize("cfg,shape", SHAPE_CASES, ids=lambda v: str(v) if isinstance(v, tuple) else v.name)
def test_output_shape_equals_input_shape(cfg, shape):
    torch.manual_seed(0)
    net = perturb(build_network(cfg, shape))
    x = torch.randn(3, *shape)
    y = net(x, torch.randn(3))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert net(x, torch.tensor(0.5)).shape == x.shape  # a scalar c_noise broadcasts over the batch


@pytest.mark.parametrize("cfg,shape", [(unet_cfg(class_cond=True), (1, 8, 8)), (mlp_cfg(class_cond=True), (2,))])
def test_class_conditioning_changes_output(cfg, shape):
    torch.manual_seed(0)
    net = perturb(build_network(cfg, shape, num_classes=10))
    x, c = torch.randn(2, *shape), torch.randn(2)
    y0, y1 = net(x, c, torch.tensor([0, 0])), net(x, c, torch.tensor([1, 1]))
    assert not torch.allclose(y0, y1)
    one_hot = torch.nn.functional.one_hot(torch.tensor([1, 1]), 10).float()
    torch.testing.assert_close(net(x, c, one_hot), y1)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c)


@pytest.mark.parametrize("cfg,shape", [(unet_cfg(), (1, 8, 8)), (mlp_cfg(), (2,))])
def test_same_seed_builds_identical_networks(cfg, shape):
    torch.manual_seed(123)
    a = build_network(cfg, shape).state_dict()
    torch.manual_seed(123)
    b = build_network(cfg, shape).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(456)
    c = build_network(cfg, shape).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fourier_frequencies_do_not_depend_on_global_seed():
    torch.manual_seed(0)
    a = FourierEmbedding(16, scale=0.02)
    torch.manual_seed(1)
    b = FourierEmbedding(16, scale=0.02)
    after_build = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(a.freqs, b.freqs)
    assert torch.equal(after_build, torch.rand(3))  # a private generator: the global RNG is untouched
    assert 0.005 < a.freqs.std().item() < 0.05  # iCT Sec. 3.1: B ~ N(0, 0.02²)


def test_fresh_blocks_are_identities():
    # ADM zero-initialises the last conv of each ResBlock and the attention output projection.
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    torch.testing.assert_close(ResBlock(8, 8, emb_dim=16, num_groups=4)(x, emb), x)
    torch.testing.assert_close(Attention(8, num_heads=2, num_groups=4)(x), x)


# ----------------------------------------------------------------------------
# Forward-mode AD (sCM tangents) against central finite differences, float64.


@pytest.mark.parametrize("kind", sorted(EMBEDDINGS))
def test_embedding_jvp_matches_finite_difference(kind):
    emb = make_embedding(kind, 16, fourier_scale=0.5).double()
    c, v = torch.randn(4, dtype=torch.float64) * 3, torch.randn(4, dtype=torch.float64)
    _, tangent = jvp(emb, (c,), (v,))
    assert rel_err(tangent, central_fd(emb, (c,), (v,))) < 1e-5


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_norm_jvp_on_channels_last_input(kind):
    # MACHINE-NOTES 1: group_norm's forward AD fails on a non-contiguous primal unless made contiguous.
    norm = perturb(make_norm(kind, 8, 4)).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    v = torch.randn_like(x)
    _, tangent = jvp(norm, (x,), (v,))
    assert rel_err(tangent, central_fd(norm, (x,), (v,))) < 1e-5


@pytest.mark.parametrize(
    "cfg,shape",
    [(unet_cfg(num_heads=2), (1, 8, 8)), (mlp_cfg(), (2,)), (mlp_cfg(embedding="positional"), (1, 8, 8))],
    ids=["unet", "mlp", "mlp-positional"],
)
def test_network_jvp_matches_finite_difference(cfg, shape):
    torch.manual_seed(0)
    net = perturb(build_network(cfg, shape)).double().eval()
    x, c = torch.randn(2, *shape, dtype=torch.float64), torch.randn(2, dtype=torch.float64) * 2
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    primal, tangent = jvp(net, (x, c), (tx, tc))
    torch.testing.assert_close(primal, net(x, c))
    assert tangent.abs().max() > 0
    assert rel_err(tangent, central_fd(net, (x, c), (tx, tc))) < 1e-5
    # Each input on its own contributes (attention and the noise embedding are on the path).
    assert jvp(net, (x, c), (torch.zeros_like(x), tc))[1].abs().max() > 0
    assert jvp(net, (x, c), (tx, torch.zeros_like(c)))[1].abs().max() > 0


@pytest.mark.parametrize("cfg,shape", [(unet_cfg(dropout=0.3), (1, 8, 8)), (mlp_cfg(dropout=0.3), (2,))])
def test_jvp_with_dropout_reuses_the_forward_mask(cfg, shape):
    torch.manual_seed(0)
    net = perturb(build_network(cfg, shape)).double().train()
    x, c = torch.randn(2, *shape, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    tx, tc = torch.randn_like(x), torch.randn_like(c)

    def seeded(*args):
        torch.manual_seed(7)
        return net(*args)

    primal, tangent = jvp(seeded, (x, c), (tx, tc))
    assert torch.equal(primal, seeded(x, c))  # same RNG state -> bit-identical primal
    assert not torch.allclose(seeded(x, c), net(x, c))  # dropout is active
    assert rel_err(tangent, central_fd(seeded, (x, c), (tx, tc))) < 1e-5


# ----------------------------------------------------------------------------
# Conditioning variants and resolution-limited dropout (iCT App. B, ImageNet 64).


@pytest.mark.parametrize("modulation", sorted(MODULATIONS))
def test_modulated_unet_shape_and_jvp_match_finite_difference(modulation):
    torch.manual_seed(0)
    net = perturb(UNet((1, 8, 8), channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                       num_groups=4, modulation=modulation)).double().eval()
    assert all(b.modulation == modulation for b in net.enc if isinstance(b, ResBlock))
    x, c = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64) * 2
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    primal, tangent = jvp(net, (x, c), (tx, tc))
    assert primal.shape == x.shape and torch.isfinite(primal).all()
    assert rel_err(tangent, central_fd(net, (x, c), (tx, tc))) < 1e-5
    assert jvp(net, (x, c), (torch.zeros_like(x), tc))[1].abs().max() > 0  # c_noise reaches the output


def test_additive_modulation_is_adm_without_scale_shift_norm():
    # ADM ResBlock, use_scale_shift_norm=False: h = conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + Linear(SiLU(emb))))) + x.
    torch.manual_seed(0)
    block = perturb(ResBlock(8, 8, emb_dim=16, num_groups=4, modulation="add")).double()
    assert block.emb.out_features == 8  # one offset per channel, no (scale, shift) pair
    x, emb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    F = torch.nn.functional
    h = block.conv1(F.silu(block.norm1(x)))
    h = h + (F.silu(emb) @ block.emb.weight.T + block.emb.bias)[:, :, None, None]
    ref = x + block.conv2(F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, block.norm2.eps)))
    torch.testing.assert_close(block(x, emb), ref)
    with pytest.raises(ValueError, match="Valid: film, double_norm, add"):
        ResBlock(8, 8, emb_dim=16, num_groups=4, modulation="scale")


def _dropout_by_resolution(net: UNet, size: int) -> dict[int, set[float]]:
    """Dropout rates of the ResBlocks, keyed by the resolution each block runs at (hooks on a forward pass)."""
    seen: dict[int, set[float]] = {}
    hooks = [b.register_forward_hook(lambda m, a, out: seen.setdefault(out.shape[-1], set()).add(m.dropout.p))
             for b in net.modules() if isinstance(b, ResBlock)]
    net(torch.randn(1, 1, size, size), torch.zeros(1))
    for h in hooks:
        h.remove()
    return seen


def test_dropout_only_at_low_resolutions():
    # iCT App. B: on ImageNet 64 dropout 0.2 only where the feature map is <= 16x16. Here 32 -> 16 -> 8, max res 16.
    kw = dict(channels=8, channel_mult=(1, 1, 1), num_blocks=1, attn_resolutions=(), num_groups=4, dropout=0.2)
    limited = UNet((1, 32, 32), dropout_max_res=16, **kw)
    assert _dropout_by_resolution(limited, 32) == {32: {0.0}, 16: {0.2}, 8: {0.2}}
    assert _dropout_by_resolution(UNet((1, 32, 32), **kw), 32) == {32: {0.2}, 16: {0.2}, 8: {0.2}}  # 0 = everywhere
    # In train mode the full-resolution blocks are deterministic, the low-resolution ones are not.
    perturb(limited).train()
    x, c = torch.randn(2, 1, 32, 32), torch.zeros(2)
    first = limited.enc[0]
    emb = limited.embed(c, None, 2)
    torch.manual_seed(1)
    a = first(limited.conv_in(x), emb)
    b = first(limited.conv_in(x), emb)
    assert torch.equal(a, b)
    assert not torch.equal(limited(x, c), limited(x, c))
    with pytest.raises(ValueError, match="dropout_max_res"):
        UNet((1, 32, 32), dropout_max_res=-1, **kw)


# ----------------------------------------------------------------------------
# Configuration errors name the fix.


@pytest.mark.parametrize(
    "cfg,shape,num_classes,match",
    [
        (unet_cfg(), (2,), 0, "net.name=mlp"),
        (unet_cfg(channel_mult=[1, 2, 2]), (1, 30, 30), 0, "not divisible"),
        (unet_cfg(channel_mult=[1, 2, 2, 2], attn_resolutions=[]), (1, 28, 28), 0, "channel_mult"),
        (unet_cfg(attn_resolutions=[16]), (1, 8, 8), 0, "attn_resolutions"),
        (unet_cfg(num_heads=3), (1, 8, 8), 0, "num_heads"),
        (unet_cfg(class_cond=True), (1, 8, 8), 0, "data.labels"),
        (mlp_cfg(class_cond=True), (2,), 0, "data.labels"),
        (unet_cfg(name="transformer"), (1, 8, 8), 0, "Valid networks: .*mlp"),
        (mlp_cfg(embedding="learned"), (2,), 0, "Valid embeddings"),
        (unet_cfg(norm="batch"), (1, 8, 8), 0, "Valid norms"),
    ],
)
def test_bad_configs_raise_value_error(cfg, shape, num_classes, match):
    with pytest.raises(ValueError, match=match):
        build_network(cfg, shape, num_classes)


def test_registry_is_explicit():
    assert {"unet", "mlp", "ncsnpp", "diffusers_unet", "dit", "edm2"} <= set(NETWORKS) and set(EMBEDDINGS) == {"fourier", "positional"}
