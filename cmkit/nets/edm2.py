"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Fig. 21, config G) with sCM's Sec. 4.1 changes as options (004_225d7b9daa3d4cfe.txt).

The network of sCM's ImageNet 64² and 512² runs ("based on EDM2 but with modifications in Sec. 4.1", sCM
Table 2). Equation numbers below are EDM2's (arXiv 2312.02696), as its released code cites them; the layout
follows the authors' released training/networks_edm2.py (NVlabs/edm2), read to verify, written anew.
Module and parameter names are EDM2's (``enc``/``dec`` keys such as ``64x64_block0``, ``conv_res0``,
``emb_gain``, ``out_gain``), so the tensors of an EDM2 checkpoint ('unet.' prefix dropped) load onto this net.

sCM's options, each selected by the shared NetConfig keys:
- ``net.embedding``: ``fourier`` = EDM2's magnitude-preserving Fourier features (Eq. 75) with bandwidth
  ``net.fourier_scale`` (EDM2 uses 1); ``positional`` = sCM Sec. 4.1's positional time embedding, scaled
  by √2 to unit magnitude.
- ``net.modulation``: ``film`` = EDM2's own conditioning, y·(1 + s(t)) with a learned gain starting at 0
  (a scale-only FiLM); ``double_norm`` = sCM Sec. 4.1's adaptive double normalisation
  y = pnorm(y)⊙pnorm(s(t)) + pnorm(b(t)) (pnorm = EDM2's pixel norm, which also stands for norm(·), since
  EDM2 has no group norm). How sCM fits it into EDM2's block is in its App. G, which the extracted text lacks;
  this reading adds one emb→width projection per block (b(t); the gain goes): 293.9M parameters at EDM2-S
  against EDM2's 280.2M. sCM Table 2's 280M is EDM2-S's size label, not a count of the modified network: the
  table gives the same 280M / 498M / 778M / 1.1B / 1.5B to EDM2-S…XXL as published, to its own teachers
  ("based on EDM2 but with modifications in Sec. 4.1", †) and to sCT/sCD-S…XXL alike. The 1%-test is
  therefore on the unmodified EDM2-S count (280.2M, tests/test_edm2.py), and the addition is counted exactly.
- ``logvar(c_noise)``: EDM2's learned log-variance u(σ) (EDM2 Eq. 21; MPFourier/positional features of
  width ``net.logvar_channels``, 128 in EDM2, and one MPConv), the w_φ(t) of sCM Eq. 8;
  ``cmkit.objectives.scm`` uses it when ``has_logvar``. Off by default (``net.logvar_channels=0``): a head
  that the objective does not use would leave parameters without gradients, which DDP refuses.

Forced weight normalisation (EDM2 Eq. 66): EDM2 overwrites every weight with its normalised copy at the
start of each training-mode forward. Here the overwrite happens only when the weight changed since the
last one (its version counter moved: an optimiser step, a load): with one forward per step, as in EDM2,
that is the same; with several (sCM's JVP pass then its student pass, CT's target and student passes) the
first pass normalises and the others reuse the stored weights bit for bit, and no pass overwrites a weight
that an earlier pass saved for backward. Under ``torch.func.jvp`` (which refuses in-place writes to
captured tensors) the write runs outside the transform: it is not part of the function being
differentiated, since the forward only sees normalize(w) (Eq. 47's "traditional" normalisation), which is
scale-invariant up to ε = 1e-4. So the JVP pass and a plain forward of the same step agree exactly
(tests/test_edm2.py), and the overwrite itself moves the output by O(ε) relative, once, as in EDM2.
Under torch.compile the overwrite runs once per forward in EDM2UNet.force_normalize, outside the graph.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.nets.attention import attention
from cmkit.nets.layers import PositionalEmbedding

# Private torch API (the context torch.func itself uses to leave its transforms); a no-op if it ever goes away,
# in which case forced normalisation inside torch.func.jvp raises torch's in-place error instead of going wrong.
_outside_functorch = getattr(torch._C, "_DisableFuncTorch", contextlib.nullcontext)

# ----------------------------------------------------------------------------
# Magnitude-preserving primitives.


def normalize(x: Tensor, dim=None, eps: float = 1e-4) -> Tensor:
    """x / (ε + ‖x‖/√(n)) over dim (all but the first by default): unit RMS magnitude (EDM2 Eq. 47, 66)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU, silu(x)/0.596 (EDM2 Eq. 81): E[silu(z)²] = 0.596² for z ~ N(0, 1)."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """((1 - t)a + t b)/√((1 - t)² + t²) (EDM2 Eq. 88): unit magnitude for independent unit-magnitude a, b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenation with the balance t (EDM2 Eq. 103): [w_a a, w_b b], w_a = C(1 - t)/√N_a, w_b = C t/√N_b,
    C = √((N_a + N_b)/((1 - t)² + t²)); the result has unit magnitude when a and b have."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """√2·cos(2π(f c + φ)), f ~ N(0, bandwidth²), φ ~ U[0, 1) (EDM2 Eq. 75); fixed, stored buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # identical in every build; the global RNG stays untouched
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels, generator=g) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels, generator=g))

    def forward(self, c: Tensor) -> Tensor:
        dtype = torch.promote_types(c.dtype, torch.float32)
        y = torch.outer(c.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * math.sqrt(2)).to(c.dtype)


class MPPositional(nn.Module):
    """sCM Sec. 4.1 positional time embedding [cos(c ω_i), sin(c ω_i)]·√2, unit magnitude like MPFourier."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.pos = PositionalEmbedding(num_channels)

    def forward(self, c: Tensor) -> Tensor:
        return self.pos(c).to(c.dtype) * math.sqrt(2)  # cos² + sin² = 1 per pair: mean square ½ before √2


def make_mp_embedding(kind: str, num_channels: int, bandwidth: float = 1.0) -> nn.Module:
    """EDM2's Fourier features (kind 'fourier', Eq. 75) or sCM's positional embedding ('positional')."""
    if kind == "fourier":
        return MPFourier(num_channels, bandwidth)
    if kind == "positional":
        return MPPositional(num_channels)
    raise ValueError(f"net.embedding='{kind}' is not valid for net.name=edm2. Choose one of: fourier, positional")


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()) without bias (EDM2 Eq. 47)
    with forced weight normalisation in training mode (Eq. 66; see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._normalized = None  # (storage, version counter) of the weight right after the last forced normalisation

    def force_normalize(self) -> None:
        """Overwrite the weight with normalize(weight) (EDM2 Eq. 66) unless it is unchanged since the last time."""
        w = self.weight
        if w.device.type == "meta" or self._normalized == (w.data_ptr(), w._version):
            return  # the storage too, in case the weight's tensor is replaced by one whose counter happens to match
        # torch.func transforms refuse in-place writes to captured tensors; this write is not part of the function
        # being differentiated (the forward only sees normalize(w), whatever w's scale), so it runs outside them.
        with torch.no_grad(), _outside_functorch():
            w.copy_(normalize(w))
        self._normalized = (w.data_ptr(), w._version)

    def forward(self, x: Tensor, gain=1.0) -> Tensor:
        if self.training and not torch.compiler.is_compiling():  # compiled: EDM2UNet.force_normalize does it
            self.force_normalize()
        w = normalize(self.weight)  # traditional weight normalisation: the forward only sees the direction
        w = w * (gain / math.sqrt(w[0].numel()))  # Eq. 47: ‖w_i‖ = 1/√fan_in keeps unit-variance outputs
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


# ----------------------------------------------------------------------------
# U-Net block (EDM2 Fig. 21).

MODULATIONS = ("film", "double_norm")


class Block(nn.Module):
    """EDM2 encoder ('enc') or decoder ('dec') block: resample, residual branch conditioned on emb,
    magnitude-preserving sums, optional cosine self-attention, activation clipping."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256, modulation: str = "film"):
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f"net.modulation='{modulation}' is not valid for net.name=edm2. "
                             f"Choose one of: {', '.join(MODULATIONS)}")
        if attention and out_channels % channels_per_head:
            raise ValueError(f"net.channels_per_head={channels_per_head} must divide the attention width "
                             f"{out_channels}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance  # EDM2: balance between main branch (0) and residual branch (1)
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.modulation = modulation
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        if modulation == "film":
            self.emb_gain = nn.Parameter(torch.zeros([]))  # EDM2: c = 1 + g·s(t), g = 0 at init
            self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        else:  # sCM double normalisation: s(t) and b(t); pnorm makes a gain meaningless
            self.emb_linear = MPConv(emb_channels, 2 * out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Main branch: resample ([1, 1] filter = 2x2 average / nearest), encoder skip conv and pixel norm.
        if self.resample_mode == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample_mode == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm (EDM2 config G)

        # Residual branch.
        y = self.conv_res0(mp_silu(x))
        if self.modulation == "film":
            c = self.emb_linear(emb, gain=self.emb_gain) + 1
            y = y * c[:, :, None, None].to(y.dtype)
        else:
            # sCM Sec. 4.1 adaptive double normalisation: y = norm(y)⊙pnorm(s(t)) + pnorm(b(t)).
            s, b = self.emb_linear(emb).chunk(2, dim=1)
            y = normalize(y, dim=1) * normalize(s, dim=1)[:, :, None, None] + normalize(b, dim=1)[:, :, None, None]
        y = mp_silu(y)
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)  # the global generator: SharedDropout replays the masks
        y = self.conv_res1(y)

        # Connect the branches (Eq. 88).
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention with cosine similarity: q, k, v pixel-normalised per head (EDM2 config G).
        if self.num_heads:
            B, C, H, W = x.shape
            y = self.attn_qkv(x).reshape(B, self.num_heads, -1, 3, H * W)  # EDM2's channel layout
            q, k, v = normalize(y, dim=2).unbind(3)  # (B, heads, head_dim, HW) each
            y = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))  # (B, heads, HW, d)
            y = self.attn_proj(y.transpose(-1, -2).reshape(B, C, H, W))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:  # out of place: in-place clip_ would break forward-mode AD
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


# ----------------------------------------------------------------------------
# The U-Net.


class EDM2UNet(nn.Module):
    """EDM2 U-Net F(x, c_noise[, class_labels, guidance]) over images (C, H, W), plus a logvar(c_noise) head."""

    def __init__(
        self,
        data_shape: Sequence[int],
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        num_classes: int = 0,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        embedding: str = "fourier",
        fourier_scale: float = 1.0,
        modulation: str = "film",
        emb_channels: int = 0,
        guidance_cond: bool = False,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        logvar_channels: int = 0,
        **block_kwargs,
    ):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(f"net.name=edm2 needs image data of shape (C, H, W), got {data_shape}")
        if not channel_mult or num_blocks < 1 or model_channels < 1:
            raise ValueError("net.channel_mult must be non-empty, net.num_blocks >= 1 and net.channels >= 1")
        if channels_per_head < 1 or logvar_channels < 0:
            raise ValueError(f"net.channels_per_head must be >= 1 (EDM2: 64) and net.logvar_channels >= 0 (EDM2: 128, "
                             f"0 = no head), got {channels_per_head} and {logvar_channels}")
        img_channels, H, W = data_shape
        factor = 2 ** (len(channel_mult) - 1)
        if H % factor or W % factor:
            raise ValueError(f"image size {H}x{W} is not divisible by 2**(len(net.channel_mult)-1) = {factor}; "
                             f"use fewer levels in net.channel_mult or pad the images (data.pad_to)")
        resolutions = [H >> level for level in range(len(channel_mult))]
        unused = sorted(set(attn_resolutions) - set(resolutions))
        if unused:
            raise ValueError(f"net.attn_resolutions {unused} match none of this U-Net's resolutions {resolutions}")
        cblock = [model_channels * m for m in channel_mult]
        cnoise = cblock[0]  # EDM2: channel_mult_noise=None -> the first level's width
        cemb = emb_channels or max(cblock)  # EDM2: channel_mult_emb=None -> the widest level
        self.num_classes = num_classes
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))  # EDM2: the output starts at zero
        block = dict(channels_per_head=channels_per_head, dropout=dropout, modulation=modulation, **block_kwargs)

        # Embedding: noise features -> MPConv, mp_sum with the class embedding (Fig. 21).
        self.emb_fourier = make_mp_embedding(embedding, cnoise, fourier_scale)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(num_classes, cemb, kernel=()) if num_classes else None
        # cmkit extension (sCM Sec. 5.2, Meng et al. 2023): the CFG scale w as an input, its features through an
        # MPConv added with a gain that starts at 0, so a student initialised from its teacher starts as it.
        self.emb_guidance = MPConv(cnoise, cemb, kernel=()) if guidance_cond else None
        self.guidance_gain = nn.Parameter(torch.zeros([])) if guidance_cond else None

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # EDM2 appends a constant-one channel
        for level, channels in enumerate(cblock):
            h, w = H >> level, W >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{h}x{w}_conv"] = MPConv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{h}x{w}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{h}x{w}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                        attention=h in attn_resolutions, **block)

        # Decoder.
        self.dec = nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            h, w = H >> level, W >> level
            if level == len(cblock) - 1:
                self.dec[f"{h}x{w}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block)
                self.dec[f"{h}x{w}_in1"] = Block(cout, cout, cemb, flavor="dec", **block)
            else:
                self.dec[f"{h}x{w}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{h}x{w}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                        attention=h in attn_resolutions, **block)
        self.out_conv = MPConv(cout, img_channels, kernel=(3, 3))

        # EDM2 Precond's uncertainty head u(σ) (Eq. 21) = sCM Eq. 8's w_φ(t), on the same kind of features.
        self.has_logvar = logvar_channels > 0
        if self.has_logvar:
            self.logvar_fourier = make_mp_embedding(embedding, logvar_channels, fourier_scale)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=())

    @classmethod
    def from_config(cls, cfg, data_shape: Sequence[int], num_classes: int = 0) -> "EDM2UNet":
        """Build from a NetConfig: net.channels is EDM2's model_channels, net.emb_dim its embedding width (0 = auto)."""
        return cls(
            data_shape,
            model_channels=cfg.channels,
            channel_mult=cfg.channel_mult,
            num_blocks=cfg.num_blocks,
            attn_resolutions=cfg.attn_resolutions,
            num_classes=num_classes,
            channels_per_head=getattr(cfg, "channels_per_head", 64),
            dropout=cfg.dropout,
            embedding=cfg.embedding,
            fourier_scale=cfg.fourier_scale,
            modulation=getattr(cfg, "modulation", "film"),
            emb_channels=cfg.emb_dim,
            guidance_cond=cfg.guidance_cond,
            logvar_channels=getattr(cfg, "logvar_channels", 0),
        )

    def _batch(self, c: Tensor, batch: int, dtype) -> Tensor:
        c = torch.as_tensor(c, dtype=dtype)
        return c.expand(batch) if c.ndim == 0 else c.to(dtype)

    def embed(self, c_noise: Tensor, class_labels: Tensor | None, batch: int, dtype, guidance=None) -> Tensor:
        """The conditioning vector mp_silu(mp_sum(noise emb, class emb)) of Fig. 21 (B, emb_channels)."""
        emb = self.emb_noise(self.emb_fourier(self._batch(c_noise, batch, dtype)))
        if self.emb_guidance is not None:
            if guidance is None:
                raise ValueError("this network takes a guidance scale (net.guidance_cond=true): pass guidance")
            w = self._batch(torch.as_tensor(guidance, device=emb.device), batch, dtype)
            emb = emb + self.emb_guidance(self.emb_fourier(w), gain=self.guidance_gain)
        elif guidance is not None:
            raise ValueError("guidance given to a network built without it; set net.guidance_cond=true")
        if self.emb_label is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a network built without them; set net.class_cond=true")
        else:
            if class_labels is None:
                raise ValueError("this network is class-conditional (net.class_cond=true): pass class_labels")
            # One-hot (or the zero null label of classifier-free guidance) × √K: unit magnitude (EDM2).
            onehot = class_labels.to(dtype) if class_labels.is_floating_point() else F.one_hot(
                class_labels.long(), self.num_classes).to(dtype)
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.num_classes)), t=self.label_balance)
        return mp_silu(emb)

    @torch.compiler.disable
    def force_normalize(self) -> None:
        """Forced weight normalisation of every MPConv at once (EDM2 Eq. 66), outside torch.compile's graphs."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.force_normalize()

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, guidance=None) -> Tensor:
        if self.training and torch.compiler.is_compiling():
            self.force_normalize()  # one graph break here instead of one per layer (train.compile=true)
        emb = self.embed(c_noise, class_labels, x.shape[0], x.dtype, guidance)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def logvar(self, c_noise: Tensor) -> Tensor:
        """Learned log-variance u(c_noise) (B,): EDM2 Eq. 21, the adaptive weighting w_φ(t) of sCM Eq. 8."""
        if not self.has_logvar:
            raise ValueError("this EDM2 net has no log-variance head: set net.logvar_channels=128 (EDM2's width)")
        c = self._batch(c_noise, 1, torch.promote_types(torch.as_tensor(c_noise).dtype, torch.float32))
        return self.logvar_linear(self.logvar_fourier(c)).squeeze(1)
