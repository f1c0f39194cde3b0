"""diffusers' ``UNet2DModel`` as a cmkit backbone F(x, c_noise, class_labels), JVP-safe (ACT App. A).

ACT (001_50c85d49266a3cba.txt, App. A) trains "a structure similar to that of DDPM ... using the Python
library diffusers": Table 5 lists the ``UNet2DModel`` arguments (B = 128; unlisted arguments are the library's
defaults), Sec. 4.2 the resulting sizes, 27.5M (CIFAR-10) and 107M (ImageNet 64). The architecture comes from
cmkit's generic ``net.*`` keys (net.channels = B, net.channel_mult, net.num_blocks = layers_per_block,
net.attn_resolutions = where Attn blocks go, net.head_dim = attention_head_dim), from a named preset
(``net.diffusers_config=act_cifar10``) or from any ``UNet2DModel`` config.json (``net.diffusers_config=PATH``).

Three changes make forward-mode AD work through it (MACHINE-NOTES §7) without changing a weight:
a ``.contiguous()`` forward pre-hook on every GroupNorm (group_norm's JVP fails on a transposed input),
an attention processor that calls :func:`cmkit.nets.attention.attention` (CPU SDPA has no JVP), and the
parameter-free sinusoidal time projection evaluated in the timestep's dtype (diffusers casts t to float32,
which would make a float64 JVP in t only float32-accurate). timestep = c_noise; class labels go through
``num_class_embeds`` (an embedding added to the time embedding).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from cmkit.config import ConfigError
from cmkit.nets.attention import attention

# ACT App. A Table 5 with B = 128: the UNet2DModel arguments; everything else is the diffusers default.
DIFFUSERS_PRESETS: dict[str, dict] = {
    "act_cifar10": dict(
        sample_size=32, layers_per_block=2, block_out_channels=[128, 128, 256, 256],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],  # DADD
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],  # UUAU
        attention_head_dim=8,
    ),
    "act_imagenet64": dict(
        sample_size=64, layers_per_block=2, block_out_channels=[128, 256, 256, 512, 512],
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],  # DDADD
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],  # UUAUU
        attention_head_dim=16,
    ),
}

# Block types whose forward has no skip path (SkipDownBlock2D's in-place sample += skip is not supported).
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


def _import_unet2d():
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ConfigError(
            f"net.name=diffusers_unet needs the diffusers package ({e}): pip install -c constraints.txt 'cmkit[latent]'"
        ) from None
    return UNet2DModel


def generic_unet_config(cfg, data_shape: Sequence[int]) -> dict:
    """UNet2DModel arguments from cmkit's net.* keys: block_out_channels = channels·channel_mult, Attn blocks
    at net.attn_resolutions, layers_per_block = net.num_blocks, attention_head_dim = net.head_dim."""
    _, H, _ = data_shape
    resolutions = [H // 2**i for i in range(len(cfg.channel_mult))]
    unused = sorted(set(cfg.attn_resolutions) - set(resolutions))
    if unused:
        raise ValueError(f"net.attn_resolutions {unused} match none of this U-Net's resolutions {resolutions}; "
                         f"pick from those (or [] for attention in the middle block only)")
    attn = [r in cfg.attn_resolutions for r in resolutions]
    widths = [cfg.channels * m for m in cfg.channel_mult]
    attn_widths = [w for w, a in zip(widths, attn) if a] + [widths[-1]]  # the middle block attends too
    if cfg.channels < 1 or cfg.num_groups < 1 or cfg.head_dim < 1:
        raise ValueError("net.channels, net.num_groups and net.head_dim must be >= 1")
    return dict(
        sample_size=H, layers_per_block=cfg.num_blocks, block_out_channels=widths,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        # Capped to divide every width, as cmkit's U-Net caps its group count (nets.layers.GroupNorm), so that
        # small overrides (net.channels=8) build; the paper configs are unchanged (32 and 8/16 divide them).
        attention_head_dim=_largest_divisor(attn_widths, cfg.head_dim), dropout=cfg.dropout,
        norm_num_groups=_largest_divisor(widths, cfg.num_groups),
    )


def _largest_divisor(values: Sequence[int], at_most: int) -> int:
    """The largest g <= at_most that divides every value."""
    g = math.gcd(*values)
    return max(d for d in range(1, min(g, at_most) + 1) if g % d == 0)


def read_unet_config(spec: str) -> dict:
    """A named preset (DIFFUSERS_PRESETS) or a UNet2DModel config.json (diffusers' ``_*`` keys are dropped)."""
    if spec in DIFFUSERS_PRESETS:
        return dict(DIFFUSERS_PRESETS[spec])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"net.diffusers_config='{spec}' is neither a preset ({', '.join(DIFFUSERS_PRESETS)}) "
                         f"nor a file; pass a UNet2DModel config.json (UNet2DModel.save_config writes one)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"net.diffusers_config='{spec}' is not a readable JSON file: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"net.diffusers_config='{spec}' must hold a JSON object of UNet2DModel arguments")
    if raw.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"net.diffusers_config='{spec}' describes a {raw['_class_name']}, not a UNet2DModel")
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def check_unet_config(config: dict, data_shape: Sequence[int], num_classes: int) -> dict:
    """Validate a UNet2DModel config against the data and cmkit's interface; return it completed."""
    UNet2DModel = _import_unet2d()
    params = inspect.signature(UNet2DModel.__init__).parameters
    valid = set(params) - {"self"}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise ValueError(f"net.diffusers_config: unknown UNet2DModel argument(s) {', '.join(unknown)}. "
                         f"Valid: {', '.join(sorted(valid))}")
    C, H, W = data_shape
    config = dict(config)
    for key in ("in_channels", "out_channels"):
        if config.setdefault(key, C) != C:
            raise ValueError(f"net.diffusers_config: {key}={config[key]} but the data have {C} channels; set it to {C}")
    if config.get("sample_size") not in (None, H, [H, W], (H, W)):
        raise ValueError(f"net.diffusers_config: sample_size={config['sample_size']} but the data are {H}x{W}")
    config["sample_size"] = H if H == W else [H, W]
    if config.get("time_embedding_type", "positional") != "positional":
        # fourier: diffusers takes log(timestep) (NaN for c_noise = ln σ < 0) and divides the output by it;
        # learned: an embedding table of integer timesteps. Neither is a backbone of a continuous c_noise.
        raise ValueError("net.diffusers_config: only time_embedding_type='positional' is supported (c_noise is a "
                         "continuous, possibly negative number; 'fourier' takes its log and divides the output by it)")
    if config.get("center_input_sample", False):
        raise ValueError("net.diffusers_config: center_input_sample=true maps x to 2x-1; cmkit scales inputs itself "
                         "(c_in): set it to false")

    def get(key):  # the value the UNet2DModel will use: the config's or the library default
        return config[key] if key in config else params[key].default

    widths, down, up = get("block_out_channels"), get("down_block_types"), get("up_block_types")
    levels = len(widths)
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"net.diffusers_config: down_block_types ({len(down)}) and up_block_types ({len(up)}) need "
                         f"one entry per block_out_channels entry ({levels})")
    bad = sorted({t for t in down if t not in DOWN_TYPES} | {t for t in up if t not in UP_TYPES})
    if bad:
        raise ValueError(f"net.diffusers_config: block type(s) {', '.join(bad)} are not supported; use "
                         f"{', '.join(DOWN_TYPES)} (down) and {', '.join(UP_TYPES)} (up)")
    factor = 2 ** (levels - 1)
    if H % factor or W % factor:
        raise ValueError(f"image size {H}x{W} is not divisible by 2**(levels-1) = {factor}; use fewer levels "
                         f"(net.channel_mult / block_out_channels) or pad the images (data.pad_to)")
    groups = get("norm_num_groups")
    if groups and any(w % groups for w in widths):
        raise ValueError(f"net.num_groups / norm_num_groups={groups} must divide every width {list(widths)}")
    head_dim = get("attention_head_dim")
    attn_widths = [w for w, t in zip(widths, down) if t.startswith("Attn")] + [widths[-1]]
    if head_dim and any(w % head_dim for w in attn_widths):
        raise ValueError(f"net.head_dim / attention_head_dim={head_dim} must divide the width of every attention "
                         f"block {attn_widths}; pick a divisor")
    # Class conditioning: integer labels through an embedding table added to the time embedding.
    embed_type = config.get("class_embed_type")
    if embed_type not in (None, "timestep"):
        raise ValueError(f"net.diffusers_config: class_embed_type='{embed_type}' is not supported (cmkit passes "
                         f"integer labels): use null with num_class_embeds, or 'timestep'")
    if num_classes > 0:
        if embed_type is None and config.setdefault("num_class_embeds", num_classes) != num_classes:
            raise ValueError(f"net.diffusers_config: num_class_embeds={config['num_class_embeds']} but the data have "
                             f"{num_classes} classes")
    elif embed_type is not None or config.get("num_class_embeds"):
        raise ValueError("net.diffusers_config asks for class conditioning (class_embed_type/num_class_embeds); "
                         "set net.class_cond=true and data.labels=true, or remove those keys")
    return config


class LabelEmbedding(nn.Embedding):
    """nn.Embedding that also takes float (B, K) labels as weights over the table (one-hot, or zeros = the null
    label of classifier-free guidance, cmkit's convention in nets.layers.NoiseEmbedding)."""

    def forward(self, labels: Tensor) -> Tensor:
        if labels.is_floating_point():
            return labels.to(self.weight.dtype) @ self.weight
        return super().forward(labels)


class _Contiguous:
    """Forward pre-hook: make the primal input of GroupNorm contiguous (group_norm's JVP needs it, MACHINE-NOTES §1)."""

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0].contiguous(), *args[1:])


class CmkitAttnProcessor:
    """diffusers Attention processor that runs diffusers' AttnProcessor steps with cmkit's attention kernel."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("cmkit's attention processor supports self-attention without a mask only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.reshape(B, C, H * W).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        b, n, inner = q.shape
        d = inner // attn.heads
        q, k, v = (y.reshape(b, n, attn.heads, d).transpose(1, 2) for y in (q, k, v))  # (B, heads, tokens, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = attention(q, k, v).transpose(1, 2).reshape(b, n, inner)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if four_d:
            out = out.transpose(1, 2).reshape(B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class WideTimesteps(nn.Module):
    """diffusers' sinusoidal ``Timesteps`` projection (get_timestep_embedding) in the timestep's dtype (at least
    float32): the same numbers in float32, exact derivatives in float64. Holds no weights."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.num_channels = original.num_channels
        self.flip_sin_to_cos = original.flip_sin_to_cos
        self.shift = original.downscale_freq_shift
        self.scale = original.scale

    def forward(self, timesteps: Tensor) -> Tensor:
        dtype = torch.promote_types(timesteps.dtype, torch.float32)
        half = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - self.shift)
        emb = self.scale * timesteps[:, None].to(dtype) * torch.exp(exponent).to(dtype)[None]
        emb = torch.cat([emb.sin(), emb.cos()], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if self.num_channels % 2:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb


def make_jvp_safe(unet: nn.Module) -> nn.Module:
    """Install the contiguous GroupNorm hooks, cmkit's attention processor and the wide time projection in place."""
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if isinstance(module, nn.GroupNorm):
            module.register_forward_pre_hook(_Contiguous())
        if isinstance(module, Attention):
            d = module.inner_dim // module.heads
            if not math.isclose(module.scale, d ** -0.5):
                raise ValueError(f"a UNet2DModel attention uses scale {module.scale}, not 1/√head_dim; "
                                 f"cmkit's attention kernel computes softmax(q kᵀ/√d) v")
            module.set_processor(CmkitAttnProcessor())
    if type(unet.time_proj).__name__ == "Timesteps":
        unet.time_proj = WideTimesteps(unet.time_proj)
    table = getattr(unet, "class_embedding", None)
    if type(table) is nn.Embedding:  # same weight, same state_dict key; float labels work too
        flexible = LabelEmbedding(table.num_embeddings, table.embedding_dim, device=table.weight.device,
                                  dtype=table.weight.dtype)
        flexible.weight = table.weight
        unet.class_embedding = flexible
    return unet


class DiffusersUNet(nn.Module):
    """F(x, c_noise, class_labels) = UNet2DModel(x, timestep=c_noise, class_labels).sample, JVP-safe."""

    def __init__(self, unet_config: dict, data_shape: Sequence[int], num_classes: int = 0):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(f"net.name=diffusers_unet needs image data of shape (C, H, W), got {data_shape}; "
                             f"use net.name=mlp for vectors")
        self.unet_config = check_unet_config(unet_config, data_shape, num_classes)
        self.unet = make_jvp_safe(_import_unet2d()(**self.unet_config))
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, data_shape: Sequence[int], num_classes: int = 0) -> "DiffusersUNet":
        """From a NetConfig: net.diffusers_config (preset or JSON) if set, else the generic net.* keys."""
        if cfg.guidance_cond:
            raise ValueError("net.name=diffusers_unet takes no guidance-scale input: set net.guidance_cond=false")
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(f"net.name=diffusers_unet needs image data of shape (C, H, W), got {data_shape}; "
                             f"use net.name=mlp for vectors")
        if cfg.diffusers_config:
            config = read_unet_config(cfg.diffusers_config)
        else:
            config = generic_unet_config(cfg, data_shape)
        return cls(config, data_shape, num_classes)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, guidance=None) -> Tensor:
        if guidance is not None:
            raise ValueError("net.name=diffusers_unet takes no guidance scale")
        if self.num_classes == 0 and class_labels is not None:
            raise ValueError("class_labels given to a network built without them; set net.class_cond=true")
        if self.num_classes > 0 and class_labels is None:
            raise ValueError("this network is class-conditional (net.class_cond=true): pass class_labels")
        c_noise = c_noise.reshape(-1).expand(x.shape[0]) if c_noise.numel() == 1 else c_noise.reshape(-1)
        return self.unet(x, c_noise, class_labels=class_labels).sample


class DiffusersUNetDiscriminator(nn.Module):
    """D(x, c_noise[, labels]) -> (B,) logits: the generator's UNet2DModel down path and middle block with
    layers_per_block = 150% of the generator's, then GroupNorm, SiLU and a Linear to R (ACT App. A)."""

    def __init__(self, unet_config: dict, data_shape: Sequence[int], num_classes: int = 0, num_blocks: int = 3):
        super().__init__()
        config = check_unet_config({**unet_config, "layers_per_block": num_blocks}, tuple(data_shape), num_classes)
        unet = make_jvp_safe(_import_unet2d()(**config))
        self.unet_config = config
        self.num_classes = num_classes
        # Keep the encoder half only (the up path is built by UNet2DModel and dropped here).
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.class_embedding, self.down_blocks, self.mid_block = unet.class_embedding, unet.down_blocks, unet.mid_block
        self.class_embed_type = config.get("class_embed_type")
        C, H, W = data_shape
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        width = config["block_out_channels"][-1]
        self.norm_out = nn.GroupNorm(unet.conv_norm_out.num_groups, width, eps=unet.conv_norm_out.eps)
        self.norm_out.register_forward_pre_hook(_Contiguous())
        self.head = nn.Linear(width * (H // factor) * (W // factor), 1)

    @staticmethod
    def generator_blocks(cfg) -> int:
        """layers_per_block of the generator this discriminator follows (ACT App. A: D has 150% of it)."""
        if cfg.diffusers_config:
            return int(read_unet_config(cfg.diffusers_config).get("layers_per_block", 2))
        return cfg.num_blocks

    @classmethod
    def from_config(cls, cfg, data_shape, num_classes=0, *, num_blocks: int, time_emb: bool = True,
                    activation: str = "silu", hidden: int = 0, depth: int = 0) -> "DiffusersUNetDiscriminator":
        """From the generator's NetConfig with the discriminator's own layers_per_block."""
        if not time_emb or activation != "silu":
            raise ValueError("the diffusers_unet discriminator has a time embedding and SiLU (ACT Table 4's best "
                             "row); the ablations (method.disc_time_emb=false, method.disc_activation) need net.name=unet")
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(f"the diffusers_unet discriminator needs images (C, H, W), got {data_shape}")
        config = read_unet_config(cfg.diffusers_config) if cfg.diffusers_config else generic_unet_config(cfg, data_shape)
        return cls(config, data_shape, num_classes, num_blocks)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        c_noise = c_noise.reshape(-1).expand(x.shape[0]) if c_noise.numel() == 1 else c_noise.reshape(-1)
        emb = self.time_embedding(self.time_proj(c_noise).to(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this discriminator is class-conditional: pass class_labels")
            labels = self.time_proj(class_labels) if self.class_embed_type == "timestep" else class_labels
            emb = emb + self.class_embedding(labels).to(emb.dtype)
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        h = self.mid_block(h, emb) if self.mid_block is not None else h
        return self.head(torch.nn.functional.silu(self.norm_out(h)).flatten(1)).squeeze(1)
