"""Backbone networks F(x, c_noise, class_labels=None[, guidance=w]) -> tensor shaped like x (no noise, no loss)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from cmkit.nets.diffusers_unet import DiffusersUNet
from cmkit.nets.dit import DiT
from cmkit.nets.discriminator import DISCRIMINATORS, build_discriminator
from cmkit.nets.edm2 import EDM2UNet
from cmkit.nets.layers import EMBEDDINGS, NORMS
from cmkit.nets.mlp import MLP
from cmkit.nets.ncsnpp import NCSNpp
from cmkit.nets.unet import UNet

NETWORKS: dict[str, type] = {"unet": UNet, "mlp": MLP, "ncsnpp": NCSNpp, "diffusers_unet": DiffusersUNet, "dit": DiT, "edm2": EDM2UNet}

__all__ = ["DISCRIMINATORS", "build_discriminator", "DiT", "DiffusersUNet", "EDM2UNet", "EMBEDDINGS", "MLP", "NCSNpp", "NETWORKS", "NORMS", "UNet", "build_network"]


def build_network(cfg, data_shape: Sequence[int], num_classes: int = 0) -> nn.Module:
    """Build NETWORKS[cfg.name] from a NetConfig for data of shape data_shape ((C, H, W) or (D,))."""
    if cfg.name not in NETWORKS:
        raise ValueError(f"unknown net.name '{cfg.name}'. Valid networks: {', '.join(sorted(NETWORKS))}")
    if cfg.class_cond and num_classes <= 0:
        raise ValueError(
            "net.class_cond=true needs class labels: set data.labels=true on a dataset with classes, "
            "or net.class_cond=false"
        )
    return NETWORKS[cfg.name].from_config(cfg, tuple(data_shape), num_classes if cfg.class_cond else 0)
