"""ADM/DDPM++-style U-Net backbone F(x, c_noise[, class_labels, guidance]) for images (C, H, W).

Layout follows Dhariwal & Nichol (2021) ADM as used by iCT/sCM: ResBlocks with FiLM (or additive,
net.modulation) noise conditioning, attention at chosen resolutions and in the middle, num_blocks + 1
decoder blocks per level with skip concatenation. No noise, preconditioning or loss lives here (STYLE 1).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.nets.layers import NoiseEmbedding, ResBlock, make_norm


class Downsample(nn.Module):
    """Strided 3x3 convolution; odd sizes round up (7 -> 4)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to the size of the matching skip, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNet(nn.Module):
    """U-Net over images of shape data_shape = (C, H, W); output has the shape of the input."""

    def __init__(
        self,
        data_shape: Sequence[int],
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.0,
        embedding: str = "fourier",
        fourier_scale: float = 0.02,
        emb_dim: int = 0,
        norm: str = "group",
        num_groups: int = 32,
        num_classes: int = 0,
        guidance_cond: bool = False,
        modulation: str = "film",
        dropout_max_res: int = 0,
    ):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(
                f"net.name=unet needs image data of shape (C, H, W), got {data_shape}; use net.name=mlp for vectors"
            )
        if not channel_mult or num_blocks < 1 or channels < 1:
            raise ValueError("net.channel_mult must be non-empty, net.num_blocks >= 1 and net.channels >= 1")
        in_ch, H, W = data_shape
        factor = 2 ** (len(channel_mult) - 1)
        if H % factor or W % factor:
            raise ValueError(
                f"image size {H}x{W} is not divisible by 2**(len(net.channel_mult)-1) = {factor}; "
                f"use fewer levels in net.channel_mult (e.g. {list(channel_mult)[:-1] or [1]}) "
                f"or pad the images (data.pad_to)"
            )
        resolutions = [H // 2**i for i in range(len(channel_mult))]
        unused = sorted(set(attn_resolutions) - set(resolutions))
        if unused:
            raise ValueError(
                f"net.attn_resolutions {unused} match none of this U-Net's resolutions {resolutions}; "
                f"pick from those (or [] for attention in the middle only)"
            )
        if dropout_max_res < 0:
            raise ValueError(f"net.dropout_max_res must be >= 0 (0 = dropout at every resolution), got {dropout_max_res}")
        emb_dim = emb_dim or 4 * channels  # ADM: time_embed_dim = 4 * model_channels
        block = dict(emb_dim=emb_dim, norm=norm, num_groups=num_groups, num_heads=num_heads, modulation=modulation)

        def drop(res: int) -> float:
            """iCT App. B (ImageNet 64): dropout only in blocks at resolution <= dropout_max_res (0 = all)."""
            return dropout if dropout_max_res == 0 or res <= dropout_max_res else 0.0

        # Noise-level (and class) embedding: sinusoidal features of width `channels`, then Linear-SiLU-Linear.
        self.embed = NoiseEmbedding(embedding, channels, emb_dim, fourier_scale, num_classes, guidance_cond)
        self.conv_in = nn.Conv2d(in_ch, channels, 3, padding=1)

        # Encoder: num_blocks ResBlocks per level, then a strided conv (not after the last level).
        self.enc = nn.ModuleList()
        skip_ch, cur = [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.enc.append(ResBlock(cur, channels * mult, attention=resolutions[level] in attn_resolutions,
                                         dropout=drop(resolutions[level]), **block))
                cur = channels * mult
                skip_ch.append(cur)
            if level < len(channel_mult) - 1:
                self.enc.append(Downsample(cur))
                skip_ch.append(cur)

        # Middle: ResBlock, Attention, ResBlock.
        low = drop(resolutions[-1])
        self.mid = nn.ModuleList([ResBlock(cur, cur, attention=True, dropout=low, **block),
                                  ResBlock(cur, cur, dropout=low, **block)])

        # Decoder, mirrored: num_blocks + 1 ResBlocks per level on [h, skip] (ADM), then upsample.
        self.dec = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_blocks + 1):
                out = channels * channel_mult[level]
                attn = resolutions[level] in attn_resolutions
                self.dec.append(ResBlock(cur + skip_ch.pop(), out, attention=attn, dropout=drop(resolutions[level]),
                                         **block))
                cur = out
            if level > 0:
                self.dec.append(Upsample(cur))

        self.norm_out = make_norm(norm, cur, num_groups)
        self.conv_out = nn.Conv2d(cur, in_ch, 3, padding=1)

    @classmethod
    def from_config(cls, cfg, data_shape: Sequence[int], num_classes: int = 0) -> "UNet":
        """Build from a NetConfig (cmkit.config)."""
        return cls(
            data_shape,
            channels=cfg.channels,
            channel_mult=cfg.channel_mult,
            num_blocks=cfg.num_blocks,
            attn_resolutions=cfg.attn_resolutions,
            num_heads=cfg.num_heads,
            dropout=cfg.dropout,
            embedding=cfg.embedding,
            fourier_scale=cfg.fourier_scale,
            emb_dim=cfg.emb_dim,
            norm=cfg.norm,
            num_groups=cfg.num_groups,
            num_classes=num_classes,
            guidance_cond=cfg.guidance_cond,
            modulation=getattr(cfg, "modulation", "film"),
            dropout_max_res=getattr(cfg, "dropout_max_res", 0),
        )

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, guidance=None) -> Tensor:
        emb = self.embed(c_noise, class_labels, x.shape[0], guidance)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.enc:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.dec:
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])  # odd sizes: upsample to the skip's size (7 -> 14)
            else:
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
