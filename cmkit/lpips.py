"""LPIPS (Zhang et al. 2018) as a consistency-training distance, from local weight files only.

d(x, y) = Σ_l mean_hw ‖w_l ⊙ (φ̂_l(x) - φ̂_l(y))‖², φ̂_l = channel-unit-normalised features of VGG16 (relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3) or AlexNet (relu1..relu5), w_l the learned linear heads (LPIPS v0.1).
CT and CD (Song et al. 2023; iCT Sec. 3.3 and its Table 1 "LPIPS" column), ACT and CM-GAN report their headline
numbers with it. As in openai/consistency_models (cm/karras_diffusion.py), images smaller than 256 px are
resized bilinearly to 224 px first; ``pooling='avg'`` is that code's ``piq.LPIPS(replace_pooling=True)``.
The feature stacks are written here in plain torch (torchvision does not import on this CPU torch); the weights
come from files the user names (``method.lpips_weights``), read without pickle, never downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.config import ConfigError

# (kind, out_channels, kernel, stride, padding) per torchvision `features` index; "relu" and "pool" carry no weights.
# torchvision's vgg16().features: 13 convs 3x3, max-pool 2x2 after blocks 1-5 (indices 4, 9, 16, 23, 30).
VGG16 = [("conv", 64, 3, 1, 1), ("relu",), ("conv", 64, 3, 1, 1), ("relu",), ("pool", 2, 2),
         ("conv", 128, 3, 1, 1), ("relu",), ("conv", 128, 3, 1, 1), ("relu",), ("pool", 2, 2),
         ("conv", 256, 3, 1, 1), ("relu",), ("conv", 256, 3, 1, 1), ("relu",), ("conv", 256, 3, 1, 1), ("relu",),
         ("pool", 2, 2),
         ("conv", 512, 3, 1, 1), ("relu",), ("conv", 512, 3, 1, 1), ("relu",), ("conv", 512, 3, 1, 1), ("relu",),
         ("pool", 2, 2),
         ("conv", 512, 3, 1, 1), ("relu",), ("conv", 512, 3, 1, 1), ("relu",), ("conv", 512, 3, 1, 1), ("relu",)]
# torchvision's alexnet().features up to relu5.
ALEXNET = [("conv", 64, 11, 4, 2), ("relu",), ("pool", 3, 2), ("conv", 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
           ("conv", 384, 3, 1, 1), ("relu",), ("conv", 256, 3, 1, 1), ("relu",), ("conv", 256, 3, 1, 1), ("relu",)]
# LPIPS taps the output of these `features` indices (lpips/pretrained_networks.py slices).
NETS = {"vgg": (VGG16, (3, 8, 15, 22, 29)), "alex": (ALEXNET, (1, 4, 7, 9, 11))}
POOLINGS = ("max", "avg")

# LPIPS ScalingLayer on inputs in [-1, 1]: (x - shift)/scale, i.e. ImageNet mean/std on [0, 1] images.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
RESIZE = 224  # bilinear target size for images smaller than 256 px (openai/consistency_models)

HINT = ("method.distance=lpips reads local files only (nothing downloads): name them with "
        "method.lpips_weights=[FEATURES,HEADS] or one merged file. Accepted keys: torchvision's VGG16/AlexNet "
        "state_dict (features.N.weight/bias, e.g. vgg16-397923af.pth) plus the LPIPS v0.1 linear heads "
        "(lin0..lin4 .model.1.weight, e.g. lpips/weights/v0.1/vgg.pth), or a full lpips.LPIPS state_dict "
        "(net.sliceK.N.*, linK.*). Formats: .safetensors or a weights-only .pth/.pt (no pickled code).")


def read_weights(paths: Sequence[str]) -> dict[str, Tensor]:
    """Merge the tensors of the files in ``paths`` (safetensors, or torch.load with weights_only=True)."""
    if not paths:
        raise ConfigError("method.distance=lpips needs method.lpips_weights. " + HINT)
    tensors: dict[str, Tensor] = {}
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise ConfigError(f"method.lpips_weights: '{path}' is not a file. " + HINT)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt file, pickle with code (refused by weights_only), ...
            raise ConfigError(f"method.lpips_weights: cannot read '{path}' as tensors ({type(e).__name__}: {e}). "
                              + HINT) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(f"method.lpips_weights: '{path}' holds a {type(state).__name__}, not a state_dict. "
                              + HINT)
        tensors.update({k: v for k, v in state.items() if isinstance(v, Tensor)})
    return tensors


def canonical_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision / lpips key layouts onto ``features.N.{weight,bias}`` and ``lin.K.weight``."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        parts = key.split(".")
        if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):  # lpips: net.slice2.5.weight
            out[f"features.{parts[2]}.{parts[3]}"] = value
        elif parts[0] == "features" and len(parts) == 3:  # torchvision: features.5.weight
            out[key] = value
        elif parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":  # lin2.model.1.weight
            out[f"lin.{parts[0][3:]}.weight"] = value
    return out


class LPIPS(nn.Module):
    """Per-sample LPIPS distance d(x, y) -> (B,) between image batches in [-1, 1] (1 or 3 channels).

    All weights are non-persistent buffers: no parameters (optimisers and EMAs never see them) and nothing in
    a checkpoint. Gradients flow to the inputs.
    """

    def __init__(self, state: dict[str, Tensor], net: str = "vgg", pooling: str = "max", source: str = ""):
        super().__init__()
        if net not in NETS:
            raise ConfigError(f"method.lpips_net='{net}' is not valid. Choose one of: {', '.join(NETS)}")
        if pooling not in POOLINGS:
            raise ConfigError(f"method.lpips_pooling='{pooling}' is not valid. Choose one of: {', '.join(POOLINGS)}")
        layers, self.taps = NETS[net]
        self.layers, self.pooling = layers[: self.taps[-1] + 1], pooling
        state = canonical_keys(state)
        expected, cin = {}, 3
        for i, layer in enumerate(self.layers):
            if layer[0] == "conv":
                expected[f"features.{i}.weight"] = (layer[1], cin, layer[2], layer[2])
                expected[f"features.{i}.bias"] = (layer[1],)
                cin = layer[1]
        widths = [self._width_at(t) for t in self.taps]
        for k, c in enumerate(widths):
            expected[f"lin.{k}.weight"] = (1, c, 1, 1)
        missing = [k for k in expected if k not in state]
        if missing:
            raise ConfigError(f"method.lpips_weights{' ' + source if source else ''} lack {len(missing)} tensor(s) "
                              f"of the {net} LPIPS network, e.g. {', '.join(missing[:3])}. " + HINT)
        wrong = [f"{k} {tuple(state[k].shape)} (expected {s})" for k, s in expected.items()
                 if tuple(state[k].shape) != s]
        if wrong:
            raise ConfigError(f"method.lpips_weights: wrong shapes for lpips_net={net}: {'; '.join(wrong[:3])}")
        for k in expected:
            self.register_buffer(k.replace(".", "_"), state[k].detach().float().clone(), persistent=False)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def _width_at(self, index: int) -> int:
        return [layer[1] for layer in self.layers[: index + 1] if layer[0] == "conv"][-1]

    @classmethod
    def from_files(cls, paths: Sequence[str], net: str = "vgg", pooling: str = "max") -> "LPIPS":
        return cls(read_weights(paths), net, pooling, source=str(list(paths)))

    def features(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised features at the LPIPS taps of images in [-1, 1]."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # greyscale: the same image in each colour channel
        if min(x.shape[-2:]) < 256:  # consistency_models: upsample small images to 224 px, bilinear
            x = F.interpolate(x, size=(RESIZE, RESIZE), mode="bilinear", align_corners=False)
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for i, layer in enumerate(self.layers):
            if layer[0] == "conv":
                w, b = getattr(self, f"features_{i}_weight"), getattr(self, f"features_{i}_bias")
                h = F.conv2d(h, w.to(h.dtype), b.to(h.dtype), stride=layer[3], padding=layer[4])
            elif layer[0] == "relu":
                h = F.relu(h)
            elif self.pooling == "max":
                h = F.max_pool2d(h, layer[1], layer[2])
            else:
                h = F.avg_pool2d(h, layer[1], layer[2])
            if i in self.taps:
                # LPIPS normalize_tensor: f/(‖f‖₂ + 1e-10) over channels; rsqrt(‖f‖² + 1e-20) is the same to
                # float precision and keeps a finite gradient where a ReLU feature vector is all zero. In float32
                # at least (1e-20 underflows in fp16 under autocast).
                f = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
                out.append(f * torch.rsqrt(f.square().sum(1, keepdim=True) + 1e-20))
        return out

    def forward(self, x: Tensor, y: Tensor, c: float = 0.0) -> Tensor:
        """d(x, y) per sample; c is ignored (the signature of cmkit.losses' distances)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS compares (B, 1 or 3, H, W) image batches, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx = self.features(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and y.requires_grad):
            fy = self.features(y)
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            w = getattr(self, f"lin_{k}_weight").to(a.dtype)
            total = total + F.conv2d((a - b).square(), w).mean(dim=(2, 3)).squeeze(1)
        return total.float()


def build_lpips(method_cfg, shape: Sequence[int], latent: bool = False) -> LPIPS:
    """The LPIPS distance of a method config (method.lpips_weights/lpips_net/lpips_pooling) for data of ``shape``."""
    if len(shape) != 3 or shape[0] not in (1, 3) or latent:
        raise ConfigError(f"method.distance=lpips compares RGB or greyscale images (1 or 3 channels, not latents); "
                          f"this data has shape {tuple(shape)}{' (latents of data.vae)' if latent else ''}. "
                          f"Use method.distance=pseudo_huber or l2")
    return LPIPS.from_files(method_cfg.lpips_weights, method_cfg.lpips_net, method_cfg.lpips_pooling)


def check_lpips_options(m) -> None:
    """Validate a method config's LPIPS keys (ValueError, raised by the config as ConfigError)."""
    if m.lpips_net not in NETS:
        raise ValueError(f"method.lpips_net='{m.lpips_net}' is not valid. Choose one of: {', '.join(NETS)}")
    if m.lpips_pooling not in POOLINGS:
        raise ValueError(f"method.lpips_pooling='{m.lpips_pooling}' is not valid. Choose one of: {', '.join(POOLINGS)}")
    if m.distance == "lpips" and not m.lpips_weights:
        raise ValueError("method.distance=lpips needs method.lpips_weights=PATH (or [FEATURES,HEADS]). " + HINT)
