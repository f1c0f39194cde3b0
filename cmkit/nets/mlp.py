"""Residual MLP backbone F(x, c_noise[, class_labels, guidance]) for low-dimensional data; images are flattened."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.config import ConfigError
from cmkit.nets.layers import NoiseEmbedding


class MLP(nn.Module):
    """Linear(D + emb) -> depth pre-activation residual layers of width hidden -> Linear(D); output shaped like x."""

    def __init__(
        self,
        data_shape: Sequence[int],
        hidden: int = 256,
        depth: int = 4,
        dropout: float = 0.0,
        embedding: str = "fourier",
        fourier_scale: float = 0.02,
        emb_dim: int = 0,
        num_classes: int = 0,
        guidance_cond: bool = False,
    ):
        super().__init__()
        self.data_shape = tuple(data_shape)
        if not self.data_shape or hidden < 1 or depth < 0:
            raise ValueError(f"net.name=mlp needs a data shape, net.hidden >= 1, net.depth >= 0; got {self.data_shape}")
        dim = math.prod(self.data_shape)
        emb_dim = emb_dim or hidden
        if emb_dim % 2:
            raise ValueError(f"net.emb_dim={emb_dim} must be even (cos and sin halves)")

        # Noise-level (and class) embedding: sinusoidal features, Linear-SiLU-Linear.
        self.embed = NoiseEmbedding(embedding, emb_dim, emb_dim, fourier_scale, num_classes, guidance_cond)
        # The embedding enters by concatenation; residual layers keep deep stacks trainable.
        self.inp = nn.Linear(dim + emb_dim, hidden)
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.dropout = nn.Dropout(dropout)  # global RNG: objectives replay masks by restoring its state
        self.out = nn.Linear(hidden, dim)

    @classmethod
    def from_config(cls, cfg, data_shape: Sequence[int], num_classes: int = 0) -> "MLP":
        """Build from a NetConfig (cmkit.config)."""
        modulation = getattr(cfg, "modulation", "film")
        if modulation != "film":  # the default, which the MLP ignores like every U-Net-only option's default
            raise ConfigError(f"net.modulation={modulation} is a U-Net ResBlock option (sCM Sec. 4.1); the MLP takes "
                              f"its noise embedding by concatenation and has no modulation. Use net.name=unet or "
                              f"leave net.modulation=film")
        return cls(
            data_shape,
            hidden=cfg.hidden,
            depth=cfg.depth,
            dropout=cfg.dropout,
            embedding=cfg.embedding,
            fourier_scale=cfg.fourier_scale,
            emb_dim=cfg.emb_dim,
            num_classes=num_classes,
            guidance_cond=cfg.guidance_cond,
        )

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, guidance=None) -> Tensor:
        emb = self.embed(c_noise, class_labels, x.shape[0], guidance)
        h = self.inp(torch.cat([x.reshape(x.shape[0], -1), emb], dim=1))
        for layer in self.layers:
            h = h + self.dropout(layer(F.silu(h)))
        return self.out(F.silu(h)).reshape(x.shape)
