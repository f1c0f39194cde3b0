"""Building blocks shared by the backbones: noise-level embeddings, normalisation, attention, ResBlock.

Every layer here supports forward-mode AD (``torch.func.jvp``), which sCM's tangents need: attention
is a hand-written softmax (CPU SDPA has no forward AD) and GroupNorm sees a contiguous input
(MACHINE-NOTES 1).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.nets.attention import attention


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of module to zero and return it (ADM's ``zero_module``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ----------------------------------------------------------------------------
# Noise-level embeddings: c_noise (B,) -> (B, dim).


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π B c), sin(2π B c)] with fixed B ~ N(0, scale²), the same in every build."""

    def __init__(self, dim: int, scale: float = 0.02, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierEmbedding needs an even dim, got {dim}")
        # iCT Sec. 3.1: Fourier scale 0.02 (instead of NCSN++'s 16) for stable training.
        # A private generator keeps B identical across builds and leaves the global RNG untouched.
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=generator) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        x = torch.outer(c_noise.to(self.freqs.dtype), 2 * math.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding [cos(c ω_i), sin(c ω_i)], ω_i = max_positions^(-i/(dim/2))."""

    def __init__(self, dim: int, max_positions: int = 10000):
        super().__init__()
        if dim % 2:
            raise ValueError(f"PositionalEmbedding needs an even dim, got {dim}")
        # Vaswani et al. (2017) Sec. 3.5; EDM's PositionalEmbedding (endpoint=False).
        freqs = (1 / max_positions) ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        x = torch.outer(c_noise.to(self.freqs.dtype), self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


EMBEDDINGS: dict[str, type[nn.Module]] = {
    "fourier": FourierEmbedding,
    "positional": PositionalEmbedding,
}


def make_embedding(kind: str, dim: int, fourier_scale: float = 0.02) -> nn.Module:
    """Build EMBEDDINGS[kind](dim); the Fourier embedding also takes its frequency scale."""
    if kind not in EMBEDDINGS:
        raise ValueError(f"unknown net.embedding '{kind}'. Valid embeddings: {', '.join(sorted(EMBEDDINGS))}")
    if EMBEDDINGS[kind] is FourierEmbedding:
        return FourierEmbedding(dim, scale=fourier_scale)
    return EMBEDDINGS[kind](dim)


# ----------------------------------------------------------------------------
# Normalisation: NORMS[kind](channels, num_groups) -> module over (B, C, H, W).


def _num_groups(channels: int, num_groups: int) -> int:
    """The largest divisor of channels that is at most num_groups."""
    return max(g for g in range(1, min(channels, num_groups) + 1) if channels % g == 0)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with the group count capped to divide channels; makes its input contiguous."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__(_num_groups(channels, num_groups), channels)

    def forward(self, x: Tensor) -> Tensor:
        # MACHINE-NOTES 1: group_norm's forward AD fails on a non-contiguous primal.
        return super().forward(x.contiguous())


class LayerNorm(nn.Module):
    """LayerNorm over (C, H, W) of each sample with a per-channel scale γ and shift β (iLCT Eq. 12, LN)."""

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # One group = every feature of the sample; contiguous for forward AD (MACHINE-NOTES 1).
        return F.group_norm(x.contiguous(), 1, self.weight, self.bias, self.eps)


class NonScalingLayerNorm(nn.Module):
    """NsLN_β(x) = (x - u(x))/sqrt(σ²(x) + ε) + β (iLCT Eq. 12): LayerNorm with γ fixed at 1.

    iLCT Sec. 4.6 sets the scale to 1 and stops its gradient; here there is no scale at all, so
    no optimiser or weight decay can touch it. β is per channel.
    """

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # β added outside: group_norm's backward fails with weight=None and a bias (torch 2.13).
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return F.group_norm(x.contiguous(), 1, None, None, self.eps) + self.bias.reshape(shape)


class InstanceNorm(nn.Module):
    """InstanceNorm: each channel of each sample normalised over (H, W), per-channel γ and β."""

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # GroupNorm with one group per channel is InstanceNorm with affine, and has forward AD.
        return F.group_norm(x.contiguous(), x.shape[1], self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm x / sqrt(mean(x²) + ε)·γ over (C, H, W) of each sample (Zhang & Sennrich 2019), per-channel γ."""

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        ms = x.to(torch.promote_types(x.dtype, torch.float32)).square().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        w = self.weight.reshape(1, -1, *([1] * (x.ndim - 2)))
        return (x * torch.rsqrt(ms + self.eps)).to(x.dtype) * w


NORMS: dict[str, Callable[[int, int], nn.Module]] = {
    "group": GroupNorm,
    # iLCT Table 2d ablation: LN, NsLN (Eq. 12), IN, RMS.
    "layer": LayerNorm,
    "nsln": NonScalingLayerNorm,
    "instance": InstanceNorm,
    "rms": RMSNorm,
}


def make_norm(kind: str, channels: int, num_groups: int = 32) -> nn.Module:
    """Build NORMS[kind](channels, num_groups), or say which kinds exist."""
    if kind not in NORMS:
        raise ValueError(f"unknown net.norm '{kind}'. Valid norms: {', '.join(sorted(NORMS))}")
    return NORMS[kind](channels, num_groups)


# ----------------------------------------------------------------------------
# Attention and residual blocks.


class Attention(nn.Module):
    """Multi-head self-attention over pixels: x + proj(softmax(q·k/√d) v), with a norm in front."""

    def __init__(self, channels: int, num_heads: int = 1, norm: str = "group", num_groups: int = 32):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"net.num_heads={num_heads} must divide the attention width {channels}")
        self.num_heads = num_heads
        self.norm = make_norm(norm, channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))  # ADM: zero-initialised proj_out

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        d = C // self.num_heads
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, d, H * W).transpose(-1, -2).unbind(1)
        h = attention(q, k, v)  # (B, heads, HW, d); the kernel is chosen in cmkit.nets.attention (JVP-safe)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Pixel normalisation x / sqrt(mean_c x² + ε) over channels, dim 1 (Karras et al. 2017, Eq. 2)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


# ResBlock noise conditioning: ADM's AdaGN 'film', sCM's adaptive double normalisation, or ADM's plain
# addition of the projected embedding (use_scale_shift_norm=False; iCT App. B removes AdaGN on ImageNet 64).
MODULATIONS = ("film", "double_norm", "add")


def modulated_norm(norm: nn.Module, h: Tensor, e: Tensor, modulation: str) -> Tensor:
    """norm(h) conditioned on the projected embedding e (B, C or 2C, 1, 1) as MODULATIONS[modulation] says."""
    if modulation == "add":
        # ADM use_scale_shift_norm=False and NCSN++ (Score SDE): h + Dense(emb), then the norm.
        return norm(h + e)
    scale, shift = e.chunk(2, dim=1)
    if modulation == "double_norm":
        # sCM Sec. 4.1 adaptive double normalisation: y = norm(x)⊙pnorm(s(t)) + pnorm(b(t)).
        return norm(h) * pixel_norm(scale) + pixel_norm(shift)
    return norm(h) * (1 + scale) + shift  # ADM AdaGN


class ResBlock(nn.Module):
    """ADM residual block with noise conditioning (MODULATIONS; film: norm(h)·(1 + scale) + shift) and optional attention."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float = 0.0,
        norm: str = "group",
        num_groups: int = 32,
        attention: bool = False,
        num_heads: int = 1,
        modulation: str = "film",
    ):
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f"unknown net.modulation '{modulation}'. Valid: {', '.join(MODULATIONS)}")
        self.modulation = modulation
        self.norm1 = make_norm(norm, in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # ADM use_scale_shift_norm: emb -> (scale, shift); without it (add): emb -> one per-channel offset.
        self.emb = nn.Linear(emb_dim, (1 if modulation == "add" else 2) * out_ch)
        self.norm2 = make_norm(norm, out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)  # global RNG: objectives replay masks by restoring its state
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))  # ADM: block starts as its skip
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = Attention(out_ch, num_heads, norm, num_groups) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = modulated_norm(self.norm2, h, self.emb(F.silu(emb))[:, :, None, None], self.modulation)
        h = self.skip(x) + self.conv2(self.dropout(F.silu(h)))
        return self.attn(h) if self.attn is not None else h


class NoiseEmbedding(nn.Module):
    """c_noise (B,) [, class labels, guidance scale w] -> (B, emb_dim): sinusoidal features, Linear-SiLU-Linear,
    + class embedding [+ guidance embedding]."""

    def __init__(self, kind: str, feat_dim: int, emb_dim: int, fourier_scale: float = 0.02, num_classes: int = 0,
                 guidance: bool = False):
        super().__init__()
        self.features = make_embedding(kind, feat_dim, fourier_scale)
        self.mlp = nn.Sequential(nn.Linear(feat_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        # The CFG scale w as an extra input (sCM Sec. 5.2, after Meng et al. 2023): sinusoidal features of w
        # through its own Linear-SiLU-Linear, added to the time embedding. The last layer starts at zero, so a
        # student initialised from its teacher's weights starts as the teacher for every w.
        self.guidance = None
        if guidance:
            self.guidance = nn.Sequential(nn.Linear(feat_dim, emb_dim), nn.SiLU(), zero_init(nn.Linear(emb_dim, emb_dim)))

    def forward(self, c_noise: Tensor, class_labels: Tensor | None, batch: int, guidance=None) -> Tensor:
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        emb = self.mlp(self.features(c_noise))
        if self.guidance is not None:
            if guidance is None:
                raise ValueError("this network takes a guidance scale (net.guidance_cond=true): pass guidance")
            w = torch.as_tensor(guidance, device=c_noise.device, dtype=c_noise.dtype)
            emb = emb + self.guidance(self.features(w.expand(batch) if w.ndim == 0 else w))
        elif guidance is not None:
            raise ValueError("guidance given to a network built without it; set net.guidance_cond=true")
        if self.label is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a network built without them; set net.class_cond=true")
            return emb
        if class_labels is None:
            raise ValueError("this network is class-conditional (net.class_cond=true): pass class_labels")
        # ADM: emb = emb + label_emb(y). Float (B, K) labels (one-hot, or zeros for 'no class') use the same table;
        # the zero vector is the null label of classifier-free guidance (trigflow's method.label_dropout).
        if class_labels.is_floating_point():
            return emb + class_labels.to(emb.dtype) @ self.label.weight
        return emb + self.label(class_labels)
