"""A small CNN digit classifier whose penultimate layer is the feature space for MNIST and digits.

Weights are committed under ``cmkit/weights/`` (safetensors) and trained on the ``train`` split by
``scripts/train_classifier.py``; their held-out accuracy is in the file's metadata and in
docs/evaluation.md. Inputs are images in data space [0, 1], shape (n, 1, S, S).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Which committed classifier serves which bundled dataset, and its input size.
CLASSIFIERS = {"mnist": ("mnist_cnn.safetensors", 28), "digits": ("digits_cnn.safetensors", 8)}


class DigitCNN(nn.Module):
    """conv-conv-pool blocks, global average pooling, a ``feature_dim`` hidden layer, 10 logits.

    ``features(x)`` is the hidden layer after ReLU (the penultimate layer). Two pooling stages for
    28×28 inputs (28→14→7), one for 8×8 (8→4).
    """

    def __init__(self, size: int, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.size = size
        pools = 2 if size >= 16 else 1
        layers: list[nn.Module] = []
        c_in, c = 1, width
        for i in range(pools + 1):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i < pools:
                layers.append(nn.MaxPool2d(2))
            c_in, c = c, c * 2 if i < pools - 1 else c
        self.body = nn.Sequential(*layers)
        self.hidden = nn.Linear(c_in, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features of images in [0, 1], normalised to [-1, 1] inside."""
        h = self.body(x * 2 - 1).mean(dim=(2, 3))
        return F.relu(self.hidden(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_classifier(net: DigitCNN, path: str | Path, metadata: dict) -> None:
    """Weights as float32 safetensors with the architecture and provenance in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()
             if v.dtype.is_floating_point}
    meta = {"size": str(net.size), "feature_dim": str(net.hidden.out_features),
            "width": str(net.body[0].out_channels), "info": json.dumps(metadata, sort_keys=True)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_classifier(path: str | Path) -> tuple[DigitCNN, dict]:
    """The network in eval mode and its metadata (``info``: accuracy, split, training settings)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    net = DigitCNN(int(meta["size"]), int(meta["width"]), int(meta["feature_dim"]))
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    # Only BatchNorm's integer step counters are not stored.
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"'{path}' does not hold a DigitCNN: missing {missing}, unexpected {unexpected}")
    info = json.loads(meta.get("info", "{}"))
    return net.eval(), info


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Undo ``data.pad_to``: the centred size × size window (padding is centred, see cmkit.data.pad_images)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"images {h}x{w} are smaller than the classifier's {size}x{size} input")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]
