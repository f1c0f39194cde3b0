"""NCSN++ backbone F(x, c_noise[, class_labels, guidance]) (Song et al. 2021, Score SDE): iCT's and sCM's CIFAR-10 network.

iCT App. B (papers/003): "we use the NCSN++ architecture (Song et al., 2021) on CIFAR-10", 4 residual blocks
per resolution (8 for iCT-deep), dropout 0.3, Fourier scale 0.02 (Sec. 3.1). sCM Sec. 5 (papers/004): "we follow
the settings of Score SDE on CIFAR-10" with the Sec. 4.1 changes, positional time embedding and adaptive double
normalisation (net.embedding=positional, net.modulation=double_norm).

The papers give no layer list, so the layout follows the authors' code, yang-song/score_sde_pytorch
(models/ncsnpp.py, layerspp.py, up_or_down_sampling.py; configs/ve/cifar10_ncsnpp_continuous.py): BigGAN-style
residual blocks that resample with the FIR kernel [1, 3, 3, 1] (StyleGAN2's upfirdn2d), every residual sum scaled
by 1/√2, progressive input 'residual' (the image pyramid enters each lower level through a FIR-downsampling conv),
progressive output 'none' (their config; 'output_skip' is the option), attention at 16x16, GroupNorm with
min(C/4, 32) groups, DDPM's initialisation. Their data rescaling and `scale_by_sigma` are preconditioning and live
in cmkit.model, not here (STYLE 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.nets.layers import MODULATIONS, Attention, NoiseEmbedding, make_norm, modulated_norm, zero_init

SKIP_SCALE = 1 / math.sqrt(2)  # Score SDE skip_rescale=True: every residual sum is divided by √2
PROGRESSIVE = ("none", "output_skip")  # output side (Score SDE model.progressive)
PROGRESSIVE_INPUT = ("none", "residual")  # input side (Score SDE model.progressive_input)


# ----------------------------------------------------------------------------
# FIR resampling (StyleGAN2 upfirdn2d with factor 2; Score SDE up_or_down_sampling.py), as grouped convolutions,
# which have forward-mode AD (MACHINE-NOTES 1).


class FIR(nn.Module):
    """The separable FIR filter k kᵀ / (Σk)² applied per channel: blur, 2x down- or 2x upsampling."""

    def __init__(self, kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        taps = [float(v) for v in kernel]
        if len(taps) < 2 or sum(taps) <= 0:
            raise ValueError(f"net.fir_kernel must be a list of >= 2 taps with a positive sum, got {list(kernel)}")
        k = torch.tensor(taps)
        # Stored flipped: F.conv2d correlates, upfirdn2d convolves (no difference for symmetric kernels).
        self.register_buffer("kernel", torch.outer(k, k).flip(0, 1) / k.sum() ** 2, persistent=False)

    def _weight(self, x: Tensor, gain: float = 1.0) -> Tensor:
        return (gain * self.kernel).to(x.dtype).expand(x.shape[1], 1, *self.kernel.shape)

    def blur(self, x: Tensor, pad: tuple[int, int], down: int = 1) -> Tensor:
        """upfirdn2d(x, k, down=down, pad=pad): zero padding (before, after) on both axes, filter, every down-th pixel."""
        return F.conv2d(F.pad(x, (pad[0], pad[1], pad[0], pad[1])), self._weight(x), stride=down, groups=x.shape[1])

    def down(self, x: Tensor) -> Tensor:
        """downsample_2d: filter, keep every second pixel; H -> H/2 (p = taps - 2)."""
        p = self.kernel.shape[-1] - 2
        return self.blur(x, ((p + 1) // 2, p // 2), down=2)

    def up(self, x: Tensor) -> Tensor:
        """upsample_2d: zeros between pixels, filter with gain 4 (constant images stay constant); H -> 2H."""
        p = self.kernel.shape[-1] - 2
        w = self._weight(x, gain=4.0).flip(-2, -1)  # conv_transpose2d correlates with the flipped kernel
        y = F.conv_transpose2d(x, w, stride=2, groups=x.shape[1])  # (H-1)·2 + taps rows, zero-stuffed and filtered
        # upfirdn2d pads ((p+1)//2 + 1, p//2) around the 2H zero-stuffed rows: crop the full result to that window.
        lo = self.kernel.shape[-1] - 1 - ((p + 1) // 2 + 1)
        return y[:, :, lo:lo + 2 * x.shape[2], lo:lo + 2 * x.shape[3]]


class FIRDownConv(nn.Module):
    """Score SDE's Conv2d(down=True) (StyleGAN2 conv_downsample_2d): FIR blur padded by taps - 2 + 2, then a 3x3 conv
    with stride 2; the progressive-input ('residual') path from the image pyramid to each lower level."""

    def __init__(self, in_ch: int, out_ch: int, fir_kernel: Sequence[int]):
        super().__init__()
        self.fir = FIR(fir_kernel)
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        p = self.fir.kernel.shape[-1] - 2 + 2  # (taps - factor) + (conv size - 1)
        return self.conv(self.fir.blur(x, ((p + 1) // 2, p // 2)))


# ----------------------------------------------------------------------------
# Blocks.


def score_sde_norm(kind: str, channels: int, num_groups: int) -> nn.Module:
    """NORMS[kind] as Score SDE builds its GroupNorm: min(C // 4, 32) groups (net.num_groups in place of 32), ε = 1e-6."""
    norm = make_norm(kind, channels, max(1, min(channels // 4, num_groups)))
    norm.eps = 1e-6
    return norm


class BigGANBlock(nn.Module):
    """Score SDE ResnetBlockBigGANpp: (skip(x) + conv(drop(act(norm_mod(conv(act(norm(x)))))))) / √2, where the
    first activation and the skip are FIR-resampled when resample is 'up' or 'down'."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, resample: str | None = None, dropout: float = 0.0,
                 norm: str = "group", num_groups: int = 32, modulation: str = "add",
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f"unknown net.modulation '{modulation}'. Valid: {', '.join(MODULATIONS)}")
        self.resample, self.modulation = resample, modulation
        self.fir = FIR(fir_kernel) if resample else None
        self.norm1 = score_sde_norm(norm, in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # Score SDE: Dense_0(act(temb)) is added to the features (= modulation 'add'); film / double_norm take 2C.
        self.emb = nn.Linear(emb_dim, (1 if modulation == "add" else 2) * out_ch)
        self.norm2 = score_sde_norm(norm, out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)  # global RNG: objectives replay masks by restoring its state
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))  # Score SDE init_scale=0.
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch or resample else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        if self.resample == "up":
            h, x = self.fir.up(h), self.fir.up(x)
        elif self.resample == "down":
            h, x = self.fir.down(h), self.fir.down(x)
        h = modulated_norm(self.norm2, self.conv1(h), self.emb(F.silu(emb))[:, :, None, None], self.modulation)
        h = self.conv2(self.dropout(F.silu(h)))
        return ((self.skip(x) if self.skip is not None else x) + h) * SKIP_SCALE


class AttnBlock(Attention):
    """Score SDE AttnBlockpp: (x + proj(attention(norm(x)))) / √2, through cmkit.nets.attention."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * SKIP_SCALE


# ----------------------------------------------------------------------------
# The network.


class NCSNpp(nn.Module):
    """NCSN++ over images of shape data_shape = (C, H, W); output has the shape of the input."""

    def __init__(
        self,
        data_shape: Sequence[int],
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.1,
        embedding: str = "fourier",
        fourier_scale: float = 16.0,
        emb_dim: int = 0,
        norm: str = "group",
        num_groups: int = 32,
        num_classes: int = 0,
        guidance_cond: bool = False,
        modulation: str = "add",
        dropout_max_res: int = 0,
        progressive: str = "none",
        progressive_input: str = "residual",
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
    ):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(f"net.name=ncsnpp needs image data of shape (C, H, W), got {data_shape}")
        if not channel_mult or num_blocks < 1 or channels < 1:
            raise ValueError("net.channel_mult must be non-empty, net.num_blocks >= 1 and net.channels >= 1")
        if progressive not in PROGRESSIVE:
            raise ValueError(f"unknown net.progressive '{progressive}'. Valid: {', '.join(PROGRESSIVE)}")
        if progressive_input not in PROGRESSIVE_INPUT:
            raise ValueError(f"unknown net.progressive_input '{progressive_input}'. Valid: {', '.join(PROGRESSIVE_INPUT)}")
        in_ch, H, W = data_shape
        factor = 2 ** (len(channel_mult) - 1)
        if H % factor or W % factor:
            raise ValueError(f"image size {H}x{W} is not divisible by 2**(len(net.channel_mult)-1) = {factor}; "
                             f"use fewer levels in net.channel_mult or pad the images (data.pad_to)")
        res = [H // 2**i for i in range(len(channel_mult))]
        unused = sorted(set(attn_resolutions) - set(res))
        if unused:
            raise ValueError(f"net.attn_resolutions {unused} match none of this network's resolutions {res}")
        if dropout_max_res < 0:
            raise ValueError(f"net.dropout_max_res must be >= 0 (0 = dropout at every resolution), got {dropout_max_res}")
        self.progressive, self.progressive_input = progressive, progressive_input
        emb_dim = emb_dim or 4 * channels  # Score SDE: temb width nf * 4

        def block(cin: int, cout: int, r: int, resample: str | None = None) -> BigGANBlock:
            drop = dropout if dropout_max_res == 0 or r <= dropout_max_res else 0.0
            return BigGANBlock(cin, cout, emb_dim, resample, drop, norm, num_groups, modulation, fir_kernel)

        def attn(c: int) -> AttnBlock:
            layer = AttnBlock(c, num_heads, norm, num_groups)
            layer.norm = score_sde_norm(norm, c, num_groups)
            return layer

        def head(c: int, out: int) -> nn.Sequential:  # GroupNorm, SiLU, zero-initialised 3x3 conv (init_scale=0.)
            return nn.Sequential(score_sde_norm(norm, c, num_groups), nn.SiLU(),
                                 zero_init(nn.Conv2d(c, out, 3, padding=1)))

        # Noise embedding: Gaussian Fourier projection with `channels` frequencies (2·channels features) or the
        # positional embedding of width `channels`, then Dense-SiLU-Dense to 4·channels (Score SDE NCSNpp).
        feat_dim = 2 * channels if embedding == "fourier" else channels
        self.embed = NoiseEmbedding(embedding, feat_dim, emb_dim, fourier_scale, num_classes, guidance_cond)
        self.conv_in = nn.Conv2d(in_ch, channels, 3, padding=1)

        # Encoder: num_blocks blocks per level (attention after each at attn_resolutions), then a downsampling
        # block; with progressive_input='residual' the image pyramid joins as (pyramid_down(p) + h) / √2.
        self.enc, self.pyramid_down = nn.ModuleList(), nn.ModuleList()
        skip_ch, cur, pyr_ch = [channels], channels, in_ch
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.enc.append(block(cur, channels * mult, res[level]))
                cur = channels * mult
                if res[level] in attn_resolutions:
                    self.enc.append(attn(cur))
                skip_ch.append(cur)
            if level < len(channel_mult) - 1:
                self.enc.append(block(cur, cur, res[level], "down"))
                if progressive_input == "residual":
                    self.pyramid_down.append(FIRDownConv(pyr_ch, cur, fir_kernel))
                    pyr_ch = cur
                skip_ch.append(cur)

        # Middle: block, attention, block.
        self.mid = nn.ModuleList([block(cur, cur, res[-1]), attn(cur), block(cur, cur, res[-1])])

        # Decoder: num_blocks + 1 blocks per level on [h, skip], attention once at attn_resolutions, an output
        # head per level for progressive='output_skip', then an upsampling block.
        self.dec, self.heads = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_blocks + 1):
                self.dec.append(block(cur + skip_ch.pop(), channels * channel_mult[level], res[level]))
                cur = channels * channel_mult[level]
            if res[level] in attn_resolutions:
                self.dec.append(attn(cur))
            if progressive == "output_skip":
                self.heads.append(head(cur, in_ch))
            if level > 0:
                self.dec.append(block(cur, cur, res[level], "up"))
        self.fir_up = FIR(fir_kernel)  # output_skip: the pyramid is upsampled with the FIR filter, no conv
        self.head_out = head(cur, in_ch) if progressive == "none" else None
        ddpm_init(self)

    @classmethod
    def from_config(cls, cfg, data_shape: Sequence[int], num_classes: int = 0) -> "NCSNpp":
        """Build from a NetConfig (cmkit.config)."""
        return cls(data_shape, channels=cfg.channels, channel_mult=cfg.channel_mult, num_blocks=cfg.num_blocks,
                   attn_resolutions=cfg.attn_resolutions, num_heads=cfg.num_heads, dropout=cfg.dropout,
                   embedding=cfg.embedding, fourier_scale=cfg.fourier_scale, emb_dim=cfg.emb_dim, norm=cfg.norm,
                   num_groups=cfg.num_groups, num_classes=num_classes, guidance_cond=cfg.guidance_cond,
                   modulation=cfg.modulation, dropout_max_res=cfg.dropout_max_res, progressive=cfg.progressive,
                   progressive_input=cfg.progressive_input, fir_kernel=cfg.fir_kernel)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, guidance=None) -> Tensor:
        emb = self.embed(c_noise, class_labels, x.shape[0], guidance)
        pyramid_down = iter(self.pyramid_down)
        pyramid, h = x, self.conv_in(x)
        skips = [h]
        for layer in self.enc:
            if isinstance(layer, AttnBlock):
                skips[-1] = h = layer(h)  # attention refines the block output that is kept as the skip
                continue
            h = layer(h, emb)
            if layer.resample == "down" and self.progressive_input == "residual":
                pyramid = h = (next(pyramid_down)(pyramid) + h) * SKIP_SCALE
            skips.append(h)
        for layer in self.mid:
            h = layer(h) if isinstance(layer, AttnBlock) else layer(h, emb)

        heads, out = iter(self.heads), None
        for layer in self.dec:
            if isinstance(layer, AttnBlock):
                h = layer(h)
                continue
            if layer.resample == "up" and self.progressive == "output_skip":
                out = next(heads)(h) if out is None else self.fir_up.up(out) + next(heads)(h)
            h = layer(h, emb) if layer.resample == "up" else layer(torch.cat([h, skips.pop()], dim=1), emb)
        if self.progressive == "output_skip":
            return self.fir_up.up(out) + next(heads)(h) if out is not None else next(heads)(h)
        return self.head_out(h)


def ddpm_init(net: nn.Module) -> None:
    """Score SDE's initialisation: DDPM default_init (variance scaling, fan_avg, uniform = Xavier uniform) for every
    conv and dense weight, biases zero; layers already at zero stay zero; attention q, k, v at scale 0.1 (NIN)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.is_meta and torch.count_nonzero(m.weight):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for m in net.modules():
        if isinstance(m, AttnBlock) and not m.qkv.weight.is_meta:
            # One fused (3C, C) conv for Score SDE's three (C, C) NINs: fan_avg = C each, variance 0.1 / C.
            bound = math.sqrt(3 * 0.1 / m.qkv.in_channels)
            nn.init.uniform_(m.qkv.weight, -bound, bound)
