"""A small KL autoencoder that cmkit trains itself (``cmkit train-ae``), so latent training runs offline.

Same kind of model as LDM's KL-f4/f8 autoencoders (Rombach et al. 2021), scaled down: a conv
encoder to the mean and log-variance of a diagonal Gaussian posterior q(z|x), a conv decoder, and
the loss ‖x - D(z)‖² + β·KL(q(z|x) ‖ N(0, I)) with z ~ q(z|x). A small β leaves the latents
free in scale, with heavier tails than a Gaussian: the situation iLCT Sec. 4.1 studies.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkit.nets.layers import GroupNorm

CONFIG_FILE = "cmkit_ae.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class AEConfig:
    in_channels: int = 1
    latent_channels: int = 4
    channels: int = 16  # width of the first level; doubled at each downsampling
    levels: int = 2  # downsamplings: latent side = image side / 2**levels
    blocks: int = 0  # residual blocks per level (0: plain conv-SiLU stacks, fast on a CPU)
    kl_weight: float = 1e-4  # β in ‖x - D(z)‖² + β·KL (per element means)


class _Block(nn.Module):
    """GroupNorm-SiLU-conv residual block."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(GroupNorm(ch, 8), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  GroupNorm(ch, 8), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class KLAutoencoder(nn.Module):
    """Conv encoder → (mean, log-variance) of q(z|x); conv decoder z → x. Images in [-1, 1]."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels * 2**i for i in range(cfg.levels + 1)]

        def stage(ch: int) -> list[nn.Module]:
            return [nn.SiLU()] + [_Block(ch) for _ in range(cfg.blocks)]

        enc: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1), *stage(widths[0])]
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [nn.Conv2d(a, b, 3, stride=2, padding=1), *stage(b)]
        enc += [nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1), *stage(widths[-1])]
        for a, b in zip(widths[::-1][:-1], widths[::-1][1:]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1), *stage(b)]
        dec += [nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x), log-variance clamped to [-30, 20] as in LDM."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """Deterministic latent: the posterior mean (what the cache stores)."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(reconstruction MSE, KL per latent element) of one batch, with z ~ q(z|x)."""
        mean, logvar = self.posterior(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
        rec = F.mse_loss(self.decode(z), x)
        # KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² - 1 - log σ²), averaged over latent elements.
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        return rec, kl


def train_autoencoder(x: Tensor, cfg: AEConfig, *, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
                      seed: int = 0, device: str | torch.device = "cpu", log_every: int = 0) -> tuple[KLAutoencoder, dict]:
    """Train a KLAutoencoder on images x (n, C, H, W) in [-1, 1]; return it (eval mode, CPU) and a summary."""
    if x.ndim != 4:
        raise ValueError(f"the autoencoder trains on images (n, C, H, W), got shape {tuple(x.shape)}")
    factor = 2**cfg.levels
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not divisible by 2**levels = {factor}; "
                         f"pad the images (data.pad_to) or use fewer levels")
    torch.manual_seed(seed)
    device = torch.device(device)
    model = KLAutoencoder(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed + 1)
    n, start = x.shape[0], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        rec, kl = model.loss(x[idx].to(device), generator=gd)
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"train-ae: step {step + 1}/{steps} rec_mse {rec.item():.5f} kl {kl.item():.4f}", flush=True)
    model = model.cpu().eval()
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
               "train_seconds": round(time.perf_counter() - start, 1),
               "reconstruction_mse": reconstruction_mse(model, x)}
    return model, summary


@torch.no_grad()
def reconstruction_mse(model, x: Tensor, batch_size: int = 256) -> float:
    """Mean squared error of decode(encode(x)) against x, per element, in the images' [-1, 1] units."""
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        total += float((model.decode(model.encode(xb)) - xb).square().sum())
    return total / x.numel()


def save_autoencoder(model: KLAutoencoder, out: str | Path, info: dict | None = None) -> Path:
    """Write out/cmkit_ae.json (architecture, training summary) and out/weights.safetensors."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"config": asdict(model.cfg), **(info or {})}, indent=2))
    return out


def load_autoencoder_dir(path: str | Path) -> KLAutoencoder:
    """Read a directory written by save_autoencoder."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    model = KLAutoencoder(AEConfig(**meta["config"]))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.eval()
