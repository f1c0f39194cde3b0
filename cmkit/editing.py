"""Zero-shot editing with any trained consistency model (Song et al. 2023, Algorithm 4, generalised).

Algorithm 4 is not among papers/ (iCT Sec. 1 and ACT Sec. 4.4 / Fig. 2 cite it); written here from
its published form. Given a reference y = A(x_ref) of a linear measurement A and times
t_1 > ... > t_K:

    x ← add_noise(A⁺y, z, t_1)                 # Alg. 4 line 2: x ~ N(y, t_1² I) with the unknown part 0
    x ← f_θ(x, t_1);  x ← project(x, y)
    for k = 2..K:  x ← f_θ(renoise(x, t_k, z), t_k);  x ← project(x, y)

Song et al. write the re-imposition as A⁻¹[(Ay)⊙(1-Ω) + (Ax)⊙Ω] with an orthogonal transform whose
kept rows Q₁ span the row space of the measurement. Since Q₁ᵀQ₁ = Aᵀ(AAᵀ)⁻¹A = A⁺A, this is
project(x, y) = x + A⁺(y - Ax) (derived here): the nearest point to x that reproduces y exactly.
Masks (inpainting), channel mixing (colourisation) and average pooling (super-resolution) are
the operators; denoising starts the chain at the input's own noise level; interpolation slerps
the noises of two seeds. Noise, re-noising and times come from ``model.process`` only, so a
TrigFlow model is edited in TrigFlow time with no change here.

All functions work in the model's (normalised) space, like the samplers in ``cmkit.sampling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cmkit.data import DataError

TASKS = ("inpaint", "colorize", "superres", "denoise", "interpolate")

# Default number of noise levels per task (the levels are model.process.sampling_times(K), from
# t_max down). Several projections let the known part steer the unknown one; denoising takes one
# step from the input's own level. Tuned on the `make demo` iCT U-Net (docs/results.md, "Zero-shot
# editing"): for super-resolution and inpainting both the error and the classifier accuracy of the
# results kept improving up to the largest count tried, 80; colourisation (no RGB data bundled)
# takes the same count untested; one denoising step reached the clean images' accuracy.
DEFAULT_STEPS = {"inpaint": 80, "colorize": 80, "superres": 80, "denoise": 1, "interpolate": 1}

# Greyscale operators for colourisation: plain channel mean, or ITU-R BT.601 luma weights.
GREYSCALE = {"mean": (1 / 3, 1 / 3, 1 / 3), "luminance": (0.299, 0.587, 0.114)}


def default_times(process, task: str, steps: int | None = None) -> list[float]:
    """The task's default noise levels: ``process.sampling_times(DEFAULT_STEPS[task])`` unless steps is given."""
    if task not in DEFAULT_STEPS:
        raise ValueError(f"unknown editing task '{task}'. Valid tasks: {', '.join(TASKS)}")
    return process.sampling_times(DEFAULT_STEPS[task] if steps is None else steps)


# ----------------------------------------------------------------------------
# Linear measurement operators A with their pseudo-inverse A⁺.


@dataclass(frozen=True)
class Mask:
    """A = keep the known pixels; ``missing`` is 1 where the image is to be generated (Alg. 4's Ω)."""

    missing: Tensor  # bool, broadcastable to x

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(self.missing, torch.zeros_like(x), x)

    def pinv(self, y: Tensor) -> Tensor:
        return self.forward(y)  # a selection: A⁺ = Aᵀ = A

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """x + A⁺(y - Ax), written as a select so that known pixels are copied bit for bit."""
        return torch.where(self.missing, x, y)


@dataclass(frozen=True)
class ChannelMix:
    """A x = Σ_c w_c x_c (greyscale, shape (B, 1, H, W)); A⁺ g = w g / |w|²."""

    weights: tuple[float, ...]

    def _w(self, x: Tensor) -> Tensor:
        return torch.tensor(self.weights, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != len(self.weights):
            raise DataError(f"the greyscale operator mixes {len(self.weights)} channels, the images have {x.shape[1]}")
        return (x * self._w(x)).sum(1, keepdim=True)

    def pinv(self, y: Tensor) -> Tensor:
        w = self._w(y)
        return y * w / (w * w).sum()

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.pinv(y - self.forward(x))


@dataclass(frozen=True)
class AvgPool:
    """A = s×s average pooling; A⁺ = nearest upsampling (AAᵀ = I/s², so A⁺ = s²Aᵀ = repeat)."""

    factor: int

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise DataError(f"super-resolution by {self.factor} needs image sizes divisible by it, got {h}x{w}")
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.pinv(y - self.forward(x))


# ----------------------------------------------------------------------------
# The editing loop and the tasks built on it.


def _check_times(times) -> list[float]:
    times = [float(t) for t in times]
    if not times:
        raise ValueError("editing needs at least one time")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"editing times must decrease strictly, got {times}")
    return times


def _full(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@torch.no_grad()
def edit(model, operator, y: Tensor, times, *, generator: torch.Generator | None = None,
         class_labels: Tensor | None = None) -> Tensor:
    """Algorithm 4 of Song et al. (2023) for a linear operator: consistency step, then re-impose y = A x."""
    times = _check_times(times)
    process = model.process
    x = operator.pinv(y)  # Alg. 4 line 1: the known part, zero elsewhere
    for k, tau in enumerate(times):
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = _full(x, tau)
        # Line 2: x ~ N(A⁺y, t_1² I); lines 5-6: x ~ N(x, (t_k² - ε²) I) (the process's renoise).
        x = process.add_noise(x, z, t) if k == 0 else process.renoise(x, t, z)
        x = operator.project(model(x, t, class_labels), y)
    return x


def inpaint(model, x: Tensor, mask: Tensor, times=None, *, generator=None, class_labels=None) -> Tensor:
    """Fill the pixels where ``mask`` is 1 (or True); the others are kept exactly from x."""
    times = default_times(model.process, "inpaint") if times is None else times
    missing = torch.as_tensor(mask, device=x.device).bool()
    try:
        missing = torch.broadcast_to(missing, x.shape)
    except RuntimeError:
        raise DataError(f"mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(x.shape)}") from None
    return edit(model, Mask(missing), x, times, generator=generator, class_labels=class_labels)


def colorize(model, x: Tensor, times=None, *, greyscale: str = "luminance", generator=None,
             class_labels=None) -> Tensor:
    """Colour RGB images x keeping their grey level A(x) (a grey image repeated over 3 channels works too)."""
    if greyscale not in GREYSCALE:
        raise DataError(f"unknown greyscale operator '{greyscale}'. Valid: {', '.join(GREYSCALE)}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise DataError(f"colourisation is only applicable to RGB data (B, 3, H, W), got {tuple(x.shape)}: "
                        f"1-channel images have no colour to restore")
    op = ChannelMix(GREYSCALE[greyscale])
    y = op.forward(x)
    times = default_times(model.process, "colorize") if times is None else times
    return edit(model, op, y, times, generator=generator, class_labels=class_labels)


def superres(model, low: Tensor, factor: int, times=None, *, generator=None, class_labels=None) -> Tensor:
    """Images ``factor`` times larger whose s×s block means equal the low-resolution input."""
    if factor < 1:
        raise DataError(f"the super-resolution factor must be >= 1, got {factor}")
    times = default_times(model.process, "superres") if times is None else times
    return edit(model, AvgPool(factor), low, times, generator=generator, class_labels=class_labels)


def noise_level_time(process, sigma: float) -> float:
    """The time t at which the process holds data plus Gaussian noise of std sigma (up to a scale).

    Every process here writes x_t = a(t) x0 + b(t) z (add_noise is linear), so y = x0 + σz is the
    state a(t)⁻¹x_t of the time with b(t)/a(t) = σ, found by bisection (VE: t = σ; TrigFlow:
    σ_d tan t = σ).
    """
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)

    def ratio(t: float) -> float:
        tt = torch.tensor([t], dtype=torch.float64)
        return float(process.add_noise(zero, one, tt) / process.add_noise(one, zero, tt))

    lo, hi = float(process.t_min), float(process.t_max)
    if not ratio(lo) <= sigma <= ratio(hi):
        raise DataError(f"noise level {sigma:g} is outside what the model was trained on "
                        f"([{ratio(lo):g}, {ratio(hi):g}] in the model's normalised units)")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ratio(mid) < sigma else (lo, mid)
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@torch.no_grad()
def denoise(model, y: Tensor, sigma: float, times=(), *, generator=None, class_labels=None) -> Tensor:
    """Denoise y = x + σz (σ in the model's units): f_θ at the time of noise level σ, then optional lower times."""
    process = model.process
    t0 = noise_level_time(process, float(sigma))
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    scale = float(process.add_noise(one, zero, torch.tensor([t0], dtype=torch.float64)))  # a(t0)
    later = _check_times([t0, *times])[1:] if times else []
    x = model(y * scale, _full(y, t0), class_labels)  # y is the trajectory point a(t0)⁻¹x_{t0}
    for tau in later:  # optional further consistency steps (Alg. 1) below the input's level
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = _full(x, tau)
        x = model(process.renoise(x, t, z), t, class_labels)
    return x


# ----------------------------------------------------------------------------
# Interpolation between two seeds.


def slerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation per sample: sin((1-α)θ)/sin θ·z0 + sin(αθ)/sin θ·z1, θ = ∠(z0, z1)."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos)[:, None]
    s = torch.sin(theta)
    lin = (1 - alpha) * a + alpha * b  # nearly parallel noises: the linear limit
    sph = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / s.clamp_min(1e-12)
    out = torch.where(s > 1e-6, sph, lin)
    return out.reshape(z0.shape).to(z0.dtype)


def seed_noises(shape, n_times: int, seed: int, device=None) -> list[Tensor]:
    """The noises a 1-sample ``sample_batched(..., seed=seed)`` draws: the start, then one per re-noising."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn((1, *shape), generator=g, device=device) for _ in range(n_times)]


@torch.no_grad()
def sample_from_noises(model, noises: list[Tensor], times, *, class_labels=None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023 Alg. 1) with every noise given explicitly."""
    times = _check_times(times)
    if len(noises) != len(times):
        raise ValueError(f"need one noise per time ({len(times)}), got {len(noises)}")
    process = model.process
    t = _full(noises[0], times[0])
    x = model(process.from_noise(noises[0]), t, class_labels)
    for z, tau in zip(noises[1:], times[1:]):
        t = _full(x, tau)
        x = model(process.renoise(x, t, z), t, class_labels)
    return x


@torch.no_grad()
def interpolate(model, shape, seed0: int, seed1: int, alphas, times, *, device=None,
                class_labels=None) -> Tensor:
    """Samples along the slerp between the noises of two seeds; α = 0 and 1 give those seeds' samples.

    Every noise of the chain (the start and each re-noising) is interpolated, so the endpoints equal
    ``sample_batched(model, 1, shape, times, seed=seed0 / seed1)``.
    """
    times = _check_times(times)
    z0 = seed_noises(shape, len(times), seed0, device)
    z1 = seed_noises(shape, len(times), seed1, device)
    out = []
    for alpha in alphas:
        noises = [slerp(a, b, float(alpha)) for a, b in zip(z0, z1)]
        labels = None if class_labels is None else class_labels[:1]
        out.append(sample_from_noises(model, noises, times, class_labels=labels))
    return torch.cat(out)


# ----------------------------------------------------------------------------
# Reading inputs and masks for the CLI (data space: images in [0, 1]).


def read_images(path: str | Path) -> Tensor:
    """An image file (PNG/JPG/BMP) or a .npy/.npz array as (n, C, H, W) float in [0, 1].

    Arrays may be (H, W), (n, H, W), (n, C, H, W) or (n, H, W, C), uint8 or float in [0, 1]
    (the range is checked per task by edit_run: a noisy input may overshoot); a .npz is read from key 'x', 'samples'
    or its only array.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"input '{path}' does not exist")
    if path.suffix.lower() in (".npy", ".npz"):
        try:
            if path.suffix.lower() == ".npy":
                arr = np.load(path, allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as f:
                    keys = list(f.keys())
                    if not keys:
                        raise DataError(f"'{path}' is an .npz file that holds no arrays; save the images under key 'x'")
                    key = next((k for k in ("x", "samples") if k in keys), keys[0] if len(keys) == 1 else None)
                    if key is None:
                        raise DataError(f"'{path}' holds {', '.join(keys)}; save the images under key 'x'")
                    arr = f[key]
        except DataError:
            raise
        except Exception as e:  # ValueError, OSError, EOFError, BadZipFile... for broken files
            from cmkit.data.arrays import not_numpy_message

            raise DataError(not_numpy_message(path, e)) from None
        x = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("L" if im.mode in ("L", "1", "I;16", "I", "LA") else "RGB")
                x = torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)
        except OSError as e:
            raise DataError(f"cannot read image '{path}': {e}") from None
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        x = x[None]
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"'{path}' gives shape {tuple(x.shape)}; expected images (n, C, H, W) with C in 1, 3")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DataError(f"'{path}' holds {bad} NaN/inf value(s); images need finite values in [0, 1]")
    return x.contiguous()


def check_input_range(x: Tensor, what: str, slack: float = 0.0) -> None:
    """Refuse values outside [0, 1] (± slack: a noisy input for denoising may overshoot a little)."""
    lo, hi = float(x.min()), float(x.max())
    if lo < -slack or hi > 1 + slack:
        allowed = "[0, 1]" if not slack else f"[{-slack:.3g}, {1 + slack:.3g}] (a noisy version of [0, 1] data)"
        raise DataError(f"{what} spans [{lo:g}, {hi:g}]; it must lie in {allowed}: save uint8 images (0..255) "
                        f"or floats in [0, 1]")


def read_mask(path: str | Path) -> Tensor:
    """A mask image or array as (n, 1, H, W) bool, True (white, > 0.5) where pixels are to be generated."""
    m = read_images(path)
    check_input_range(m, f"the mask '{path}'")
    return (m.mean(1, keepdim=True) > 0.5) if m.shape[1] == 3 else (m > 0.5)


def degraded_view(task: str, x: Tensor, *, mask: Tensor | None = None, factor: int = 1,
                  greyscale: str = "luminance") -> Tensor:
    """What the editor sees, shown in data space [0, 1]: masked grey, grey, blocky low-res, noisy."""
    if task == "inpaint":
        return torch.where(mask, torch.full_like(x, 0.5), x)
    if task == "colorize":
        g = ChannelMix(GREYSCALE[greyscale]).forward(x.expand(-1, 3, -1, -1))
        return g.expand(-1, 3, -1, -1)
    if task == "superres":
        return AvgPool(factor).pinv(x)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------
# One editing task on a loaded run (what ``cmkit edit`` does), in data space.


def _to_model(run, x: Tensor) -> Tensor:
    return (x * 2 - 1).to(run.device)  # images: [0, 1] -> [-1, 1] (cmkit.data normalisation)


def edit_run(run, task: str, x: Tensor | None = None, *, mask: Tensor | None = None, steps: int | None = None,
             times=None, sigma: float = 0.0, factor: int = 0, greyscale: str = "luminance", seed: int = 0,
             seeds: tuple[int, int] = (0, 1), n: int = 8, label: int | Tensor | None = None,
             ema: bool = True, guidance: float | None = None) -> tuple[Tensor, Tensor]:
    """Run one task on a ``cmkit.load(...)`` run; x (and the result) in data space [0, 1].

    ``label``: a class-conditional run's class, one for all images or a tensor of one per image.

    Returns (result, degraded view of the input). ``sigma`` (denoise) is the noise std in [0, 1]
    pixel units; ``factor`` (superres) defaults to data size / input size, or 2 for full-size input.
    ``guidance``: the CFG scale w (cmkit.run.Run.guided): of a guidance-conditional sCD student (default: its
    method.guidance) or of a class-conditional model trained with method.label_dropout > 0.
    """
    from cmkit.config import ConfigError

    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'. Valid tasks: {', '.join(TASKS)}")
    model, ds = run.model(ema), run.dataset
    if getattr(model, "kind", "consistency") != "consistency":
        raise ConfigError(f"run '{run.dir}' holds a {model.kind} model; zero-shot editing needs a consistency model")
    model = run.guided(model, guidance)
    labels = None
    if run.cfg.net.class_cond:
        if label is None:
            raise ConfigError(f"this run is class-conditional: give --label (0..{ds.num_classes - 1})")
        count = max(1, n if x is None else len(x))
        if isinstance(label, Tensor) and label.ndim == 1:
            if len(label) != count:
                raise ConfigError(f"{len(label)} class labels for {count} images: give one label per image")
            labels = label.to(device=run.device, dtype=torch.long)
        else:
            labels = torch.full((count,), int(label), dtype=torch.long, device=run.device)
    if task == "interpolate":
        times = times or run.objective.sample_times(steps or DEFAULT_STEPS["interpolate"])
        alphas = torch.linspace(0, 1, max(2, n)).tolist()
        out = interpolate(model, ds.shape, seeds[0], seeds[1], alphas, times, device=run.device,
                          class_labels=labels)
        out = ds.to_data_space(out)
        return out, out
    if getattr(run.cfg.data, "vae", ""):
        # The model lives in the autoencoder's latent space: masks, pooling and noise levels act on pixels.
        raise ConfigError(f"--task {task} is a pixel-space edit, but run '{run.dir}' models latents of the "
                          f"autoencoder data.vae='{run.cfg.data.vae}' (shape {ds.shape}). Latent runs support "
                          f"--task interpolate only; inpaint, colorize, superres and denoise need a "
                          f"pixel-space model (a run without data.vae)")
    if ds.kind != "image":
        raise DataError(f"--task {task} needs an image model; run '{run.dir}' was trained on vectors")
    if x is None:
        raise ConfigError(f"--task {task} needs --input (an image or .npz of images)")
    c, h, w = ds.shape
    if task == "denoise" and sigma <= 0:
        raise ConfigError(f"--task denoise needs --sigma > 0 (got {sigma:g}): the input's noise std in [0, 1] "
                          f"pixel units, e.g. --sigma 0.1")
    # Inputs are data-space images in [0, 1]; a noisy input for denoising may overshoot by a few noise stds.
    check_input_range(x, "the input", slack=6 * sigma if task == "denoise" else 0.0)
    if task == "denoise" and steps not in (None, 1):
        raise ConfigError("--task denoise takes one step at the input's noise level; add lower levels with --times")
    if task != "denoise":
        times = times or default_times(model.process, task, steps)
    try:
        _check_times(times or [1.0])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    generator = torch.Generator(device=run.device).manual_seed(seed)
    kw = dict(generator=generator, class_labels=labels)
    if task == "colorize":
        if c != 3:
            raise DataError(f"colourisation is not applicable: run '{run.dir}' models {c}-channel images, "
                            f"so there is no colour to restore (it needs RGB data)")
        if x.shape[-2:] != (h, w):
            raise DataError(f"input is {x.shape[-2]}x{x.shape[-1]}, the model makes {h}x{w} images")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey input: A(g, g, g) = g since Σw = 1
        out = colorize(model, _to_model(run, x), times, greyscale=greyscale, **kw)
        view = degraded_view(task, x, greyscale=greyscale)
    elif task == "superres":
        if x.shape[1] != c:
            raise DataError(f"input has {x.shape[1]} channels, the model {c}")
        if tuple(x.shape[-2:]) == (h, w):  # a full-size image: downsample it first
            factor = factor or 2
            x = AvgPool(factor).forward(x)
        elif h % x.shape[-2] == 0 and w % x.shape[-1] == 0 and h // x.shape[-2] == w // x.shape[-1]:
            if factor and factor != h // x.shape[-2]:
                raise DataError(f"--factor {factor} does not match a {x.shape[-2]}x{x.shape[-1]} input for {h}x{w} images")
            factor = h // x.shape[-2]
        else:
            raise DataError(f"a {x.shape[-2]}x{x.shape[-1]} input is not a downsampling of the model's {h}x{w} images")
        out = superres(model, _to_model(run, x), factor, times, **kw)
        view = degraded_view(task, x, factor=factor)
    else:
        if tuple(x.shape[1:]) != (c, h, w):
            raise DataError(f"input has shape {tuple(x.shape[1:])}, the model makes {(c, h, w)} images")
        if task == "inpaint":
            if mask is None:
                raise ConfigError("--task inpaint needs --mask (white = pixels to generate)")
            if mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, len(x)):
                raise DataError(f"mask of shape {tuple(mask.shape)} does not fit {len(x)} images of {h}x{w}")
            out = inpaint(model, _to_model(run, x), mask.to(run.device), times, **kw)
            view = degraded_view(task, x, mask=mask.expand(len(x), c, h, w))
        else:  # denoise: times are the levels after the input's own
            if sigma <= 0:
                raise ConfigError("--task denoise needs --sigma, the input's noise std in [0, 1] pixel units")
            t0 = noise_level_time(model.process, 2 * sigma)  # [0, 1] -> [-1, 1] doubles the std
            if times and times[0] >= t0:
                raise ConfigError(f"--times for denoising must lie below the input's level t={t0:.4g}")
            out = denoise(model, _to_model(run, x), 2 * sigma, list(times or ()), **kw)
            view = degraded_view(task, x)
    return ds.to_data_space(out), view
