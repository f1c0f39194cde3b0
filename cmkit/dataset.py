"""The in-memory dataset container and DataError: imported by cmkit.data and cmkit.latent alike.

They live here, outside both packages, so that cmkit.latent never imports cmkit.data (which imports
cmkit.latent for data.vae): one direction only, no import circle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch


class DataError(ValueError):
    """Bad data the user can fix; the message names the problem and the fix."""


@dataclass
class Dataset:
    name: str
    x: torch.Tensor  # float32: (n, C, H, W) in [-1, 1], or (n, D) standardised
    labels: torch.Tensor | None  # int64 (n,) or None
    kind: str  # "image" | "vector"
    num_classes: int = 0  # 0 if unlabelled
    mean: torch.Tensor | None = field(default=None, repr=False)  # vectors: x_data = x * std + mean
    std: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def to_data_space(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation, as float32 on the CPU: images to [0, 1] (clamped), vectors to original units."""
        x = x.detach().float().cpu()
        if self.kind == "image":
            return ((x + 1) / 2).clamp(0, 1)
        if self.mean is not None:
            return x * self.std + self.mean
        return x

    def fingerprint(self) -> str:
        """sha256 hex of the normalised data, its shape and the labels: keys caches of derived statistics."""
        h = hashlib.sha256(str(tuple(self.x.shape)).encode())
        h.update(self.x.detach().cpu().contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def subset(self, idx: torch.Tensor) -> Dataset:
        """The rows idx, keeping the normalisation (and so to_data_space) of the full set."""
        labels = self.labels[idx] if self.labels is not None else None
        return Dataset(self.name, take_rows(self.x, idx), labels, self.kind, self.num_classes, self.mean, self.std)


def take_rows(x, idx):
    """x[idx] as a new tensor, or a lazy row selection of a memory-mapped array (cmkit.data.prepared)."""
    return x.select_rows(idx) if hasattr(x, "select_rows") else x[idx].contiguous()


def uint8_to_unit(x) -> torch.Tensor:
    """uint8 pixels 0..255 to float32 in [-1, 1]: x/255·2 - 1 computed in float64, rounded once to float32.

    The one quantisation of every uint8 source (folders, arrays, bundled MNIST, prepared memmaps), so the
    same images give the same bits whichever path loads them; works on any device.
    """
    x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return (x.double() / 255.0 * 2 - 1).float()
