"""Time-conditioned discriminators D(x, t) for adversarial consistency objectives (ACT, CM-GAN).

ACT App. A: the down-sampling half of the DDPM U-Net, kept up to the middle block, then a linear
layer to R; layers per block 150% of the generator's; SiLU and a time embedding (ACT Table 4's
best row). The variants of the ablation (no time embedding, LeakyReLU) are options. The output is
a logit per sample; D's probability is its sigmoid. Backbones only: no loss lives here (STYLE 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.nets.diffusers_unet import DiffusersUNetDiscriminator
from cmkit.nets.layers import NoiseEmbedding, ResBlock, make_norm
from cmkit.nets.unet import Downsample

ACTIVATIONS = {
    "silu": F.silu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),  # the usual GAN discriminator slope
}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown discriminator activation '{name}'. Choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class DiscResBlock(ResBlock):
    """cmkit's ResBlock (same layers and parameters) with a selectable activation."""

    def __init__(self, *args, activation: str = "silu", **kwargs):
        super().__init__(*args, **kwargs)
        self.act = _activation(activation)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        scale, shift = self.emb(self.act(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(self.act(h)))
        h = self.skip(x) + h
        return self.attn(h) if self.attn is not None else h


class _Conditioning(nn.Module):
    """c_noise [and labels] -> embedding; without a time embedding a learned constant (ACT Table 4 't-emb False')."""

    def __init__(self, time_emb: bool, kind: str, feat_dim: int, emb_dim: int, fourier_scale: float, num_classes: int):
        super().__init__()
        self.time = NoiseEmbedding(kind, feat_dim, emb_dim, fourier_scale, num_classes) if time_emb else None
        if not time_emb:
            self.const = nn.Parameter(torch.zeros(emb_dim))
            self.label = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None

    def forward(self, c_noise: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        if self.time is not None:
            return self.time(c_noise, class_labels, batch)
        emb = self.const.expand(batch, -1)
        if self.label is not None:
            if class_labels is None:
                raise ValueError("this discriminator is class-conditional: pass class_labels")
            emb = emb + (class_labels.to(emb.dtype) @ self.label.weight if class_labels.is_floating_point()
                         else self.label(class_labels))
        return emb


class UNetDiscriminator(nn.Module):
    """The U-Net's encoder and middle block (ResBlocks, strided convs, attention) + a linear head to one logit."""

    def __init__(
        self,
        data_shape: Sequence[int],
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        embedding: str = "fourier",
        fourier_scale: float = 0.02,
        emb_dim: int = 0,
        norm: str = "group",
        num_groups: int = 32,
        num_classes: int = 0,
        time_emb: bool = True,
        activation: str = "silu",
    ):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(f"the U-Net discriminator needs images (C, H, W), got {data_shape}")
        in_ch, H, W = data_shape
        emb_dim = emb_dim or 4 * channels
        self.act = _activation(activation)
        block = dict(emb_dim=emb_dim, norm=norm, num_groups=num_groups, num_heads=num_heads, activation=activation)
        self.embed = _Conditioning(time_emb, embedding, channels, emb_dim, fourier_scale, num_classes)
        self.conv_in = nn.Conv2d(in_ch, channels, 3, padding=1)

        # Encoder as in cmkit's U-Net: num_blocks ResBlocks per level, strided conv between levels.
        self.enc = nn.ModuleList()
        cur, h, w = channels, H, W
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.enc.append(DiscResBlock(cur, channels * mult, attention=h in attn_resolutions, **block))
                cur = channels * mult
            if level < len(channel_mult) - 1:
                self.enc.append(Downsample(cur))
                h, w = (h + 1) // 2, (w + 1) // 2

        # Middle block (ResBlock, attention, ResBlock), then norm, activation and Linear to R (ACT App. A).
        self.mid = nn.ModuleList([DiscResBlock(cur, cur, attention=True, **block), DiscResBlock(cur, cur, **block)])
        self.norm_out = make_norm(norm, cur, num_groups)
        self.head = nn.Linear(cur * h * w, 1)

    @classmethod
    def from_config(cls, cfg, data_shape, num_classes=0, *, num_blocks: int, time_emb: bool = True,
                    activation: str = "silu", hidden: int = 0, depth: int = 0) -> "UNetDiscriminator":
        """Build from the generator's NetConfig with the discriminator's own block count."""
        return cls(data_shape, channels=cfg.channels, channel_mult=cfg.channel_mult, num_blocks=num_blocks,
                   attn_resolutions=cfg.attn_resolutions, num_heads=cfg.num_heads, embedding=cfg.embedding,
                   fourier_scale=cfg.fourier_scale, emb_dim=cfg.emb_dim, norm=cfg.norm, num_groups=cfg.num_groups,
                   num_classes=num_classes, time_emb=time_emb, activation=activation)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(c_noise, class_labels, x.shape[0])
        h = self.conv_in(x)
        for layer in self.enc:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.mid:
            h = layer(h, emb)
        return self.head(self.act(self.norm_out(h)).flatten(1)).squeeze(1)


class MLPDiscriminator(nn.Module):
    """Residual MLP D(x, t) for low-dimensional data: [x, emb] -> depth residual layers -> one logit."""

    def __init__(self, data_shape: Sequence[int], hidden: int = 256, depth: int = 4, embedding: str = "fourier",
                 fourier_scale: float = 0.02, emb_dim: int = 0, num_classes: int = 0, time_emb: bool = True,
                 activation: str = "silu"):
        super().__init__()
        dim = math.prod(tuple(data_shape))
        emb_dim = emb_dim or hidden
        self.act = _activation(activation)
        self.embed = _Conditioning(time_emb, embedding, emb_dim, emb_dim, fourier_scale, num_classes)
        self.inp = nn.Linear(dim + emb_dim, hidden)
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.head = nn.Linear(hidden, 1)

    @classmethod
    def from_config(cls, cfg, data_shape, num_classes=0, *, num_blocks: int = 0, time_emb: bool = True,
                    activation: str = "silu", hidden: int = 0, depth: int = 0) -> "MLPDiscriminator":
        """Build from the generator's NetConfig; hidden/depth 0 mean the generator's."""
        return cls(data_shape, hidden=hidden or cfg.hidden, depth=depth or cfg.depth, embedding=cfg.embedding,
                   fourier_scale=cfg.fourier_scale, emb_dim=cfg.emb_dim, num_classes=num_classes,
                   time_emb=time_emb, activation=activation)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(c_noise, class_labels, x.shape[0])
        h = self.inp(torch.cat([x.reshape(x.shape[0], -1), emb], dim=1))
        for layer in self.layers:
            h = h + layer(self.act(h))
        return self.head(self.act(h)).squeeze(1)


# Keyed by the generator's net.name: the discriminator follows the generator's family.
DISCRIMINATORS: dict[str, type] = {"unet": UNetDiscriminator, "mlp": MLPDiscriminator,
                                   "diffusers_unet": DiffusersUNetDiscriminator}


def build_discriminator(net_cfg, data_shape: Sequence[int], num_classes: int = 0, *, blocks: int = 0,
                        time_emb: bool = True, activation: str = "silu", hidden: int = 0, depth: int = 0) -> nn.Module:
    """D(x, c_noise[, labels]) -> (B,) logits matching the generator's NetConfig.

    ``blocks=0`` gives ⌈1.5·net.num_blocks⌉ ResBlocks per level (ACT App. A: 150% of the generator's).
    """
    if net_cfg.name not in DISCRIMINATORS:
        raise ValueError(f"no discriminator for net.name '{net_cfg.name}'. Valid: {', '.join(sorted(DISCRIMINATORS))}")
    cls = DISCRIMINATORS[net_cfg.name]
    generator_blocks = cls.generator_blocks(net_cfg) if hasattr(cls, "generator_blocks") else net_cfg.num_blocks
    blocks = blocks or math.ceil(1.5 * generator_blocks)
    return cls.from_config(
        net_cfg, tuple(data_shape), num_classes if net_cfg.class_cond else 0, num_blocks=blocks,
        time_emb=time_emb, activation=activation, hidden=hidden, depth=depth)
