"""DiT backbone F(x, c_noise, class_labels) (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify (a p×p strided convolution) plus fixed 2-D sin-cos positional embeddings, N transformer blocks with
adaLN-Zero conditioning on c = emb(c_noise) + emb(label) (their Fig. 3: LayerNorm without affine, then
x·(1 + γ) + β from a Linear of SiLU(c), and a residual gate α initialised to zero), a final adaLN layer and
a zero-initialised linear that unpatchifies to the input shape. Widths and depths of their Table 1 are
presets (``net.dit=DiT-XL/2``); the learned-σ output half of DiT is not built (cmkit's objectives take one
output of the input's shape). Written from the paper and checked against facebookresearch/DiT models.py.
Forward-mode AD works through all of it: attention is :func:`cmkit.nets.attention.attention`, the time
features are computed in c_noise's dtype (at least float32).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.nets.attention import attention

# Peebles & Xie Table 1: (depth N, hidden size d, heads); the patch size p is the suffix of the name.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS = {f"DiT-{k}/{p}": (*v, p) for k, v in DIT_SIZES.items() for p in (2, 4, 8)}


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[sin(pos·ω), cos(pos·ω)] with ω_i = 10000^(-i/(dim/2)) (MAE / DiT), shape (len(pos), dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2-D positional embedding of an h×w token grid, row-major: the first dim/2 features encode the
    column, the last dim/2 the row (DiT's get_2d_sincos_pos_embed, whose meshgrid puts w first)."""
    if dim % 4:
        raise ValueError(f"the DiT width net.hidden={dim} must be divisible by 4 (2-D sin-cos embedding)")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1).float()


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """DiT's TimestepEmbedder features [cos(t·f), sin(t·f)], f_i = max_period^(-i/half), in t's dtype (≥ float32)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1, 1).to(dtype) * freqs.to(dtype)[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero: x += α₁·Attn(mod(LN(x))), x += α₂·MLP(mod(LN(x)))."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
        self.dropout = nn.Dropout(dropout)
        self.ada = nn.Linear(hidden, 6 * hidden)  # applied to SiLU(c)

    def attn(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        h = F.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)), approximate="tanh")
        return x + gate2[:, None] * self.fc2(self.dropout(h))


class DiT(nn.Module):
    """DiT over inputs of shape data_shape = (C, H, W), H and W divisible by the patch size."""

    def __init__(self, data_shape: Sequence[int], hidden: int = 384, depth: int = 12, heads: int = 6,
                 patch_size: int = 2, num_classes: int = 0, dropout: float = 0.0, mlp_ratio: float = 4.0,
                 freq_dim: int = 256):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(f"net.name=dit needs image or latent data (C, H, W), got {data_shape}; "
                             f"use net.name=mlp for vectors")
        C, H, W = data_shape
        if patch_size < 1 or H % patch_size or W % patch_size:
            raise ValueError(f"net.patch_size={patch_size} must divide the input size {H}x{W}")
        if depth < 1 or heads < 1 or hidden % heads:
            raise ValueError(f"net.num_heads={heads} must divide net.hidden={hidden} (and net.depth >= 1)")
        self.p, self.grid = patch_size, (H // patch_size, W // patch_size)
        self.freq_dim = freq_dim
        self.patch = nn.Conv2d(C, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(hidden, *self.grid)[None], persistent=False)  # fixed, not learned
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes, hidden) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, patch_size * patch_size * C)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        if self.label is not None:
            nn.init.normal_(self.label.weight, std=0.02)
        for layer in [b.ada for b in self.blocks] + [self.ada_out, self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg, data_shape: Sequence[int], num_classes: int = 0) -> "DiT":
        """From a NetConfig: net.dit (a Table 1 preset such as DiT-XL/2) or net.hidden/depth/num_heads/patch_size."""
        if cfg.guidance_cond:
            raise ValueError("net.name=dit takes no guidance-scale input: set net.guidance_cond=false")
        if cfg.dit:
            if cfg.dit not in DIT_PRESETS:
                raise ValueError(f"net.dit='{cfg.dit}' is not a DiT preset. Choose one of: {', '.join(DIT_PRESETS)}")
            depth, hidden, heads, patch = DIT_PRESETS[cfg.dit]
        else:
            depth, hidden, heads, patch = cfg.depth, cfg.hidden, cfg.num_heads, cfg.patch_size
        return cls(data_shape, hidden, depth, heads, patch, num_classes, cfg.dropout)

    def embed(self, c_noise: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        """c = t_mlp(timestep features of c_noise) + label embedding; float labels weight the table (zeros = null)."""
        t = c_noise.reshape(-1).expand(batch) if c_noise.numel() == 1 else c_noise.reshape(-1)
        feats = timestep_features(t, self.freq_dim)
        c = self.t_mlp(feats.to(self.t_mlp[0].weight.dtype))
        if self.label is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a network built without them; set net.class_cond=true")
            return c
        if class_labels is None:
            raise ValueError("this network is class-conditional (net.class_cond=true): pass class_labels")
        if class_labels.is_floating_point():
            return c + class_labels.to(c.dtype) @ self.label.weight.to(c.dtype)
        return c + self.label(class_labels).to(c.dtype)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, guidance=None) -> Tensor:
        if guidance is not None:
            raise ValueError("net.name=dit takes no guidance scale")
        B, C, H, W = x.shape
        c = self.embed(c_noise, class_labels, B).to(x.dtype)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (B, T, D), row-major tokens
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=1)
        h = self.out(modulate(self.norm_out(h), shift, scale))  # (B, T, p·p·C)
        gh, gw = self.grid
        h = h.reshape(B, gh, gw, self.p, self.p, C).permute(0, 5, 1, 3, 2, 4)  # unpatchify: (B, C, gh, p, gw, p)
        return h.reshape(B, C, H, W)
