"""Feature extractors (committed digit classifiers, Inception-v3 from a local file, raw coordinates)
and the cached features of the reference set.

An ``Extractor`` maps data-space samples (images in [0, 1] or vectors in data units) to (n, d)
float features and names its weights by a sha256, so that numbers and caches are comparable
only when the extractor is the same. Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmkit.config import ConfigError
from cmkit.evaluation.classifier import CLASSIFIERS, WEIGHTS_DIR, centre_crop, file_sha256, load_classifier

REF_CHUNK = 4096  # reference images read and featurised at a time (rounded to whole extractor batches)
CACHE_VERSION = 1  # bump when the cached content or its computation changes
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_HINT = (
    "Inception-v3 features need the optional extra 'fid' (pip install -c constraints.txt 'cmkit[fid]', which "
    "installs torch-fidelity) and the standard weights file " + INCEPTION_FILE + " on disk, named by "
    "eval.inception_weights=PATH (cmkit eval --inception-weights PATH). cmkit never downloads it."
)


@dataclass
class Extractor:
    name: str  # "mnist-cnn", "digits-cnn", "inception-v3", "raw"
    weights_sha256: str  # "" for raw coordinates
    fn: Callable[[torch.Tensor], torch.Tensor]  # data-space batch -> (b, d) features
    batch_size: int = 500
    info: dict | None = None  # provenance of the weights (e.g. the classifier's held-out accuracy)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Features of all of x, in batches, as float32 on the CPU."""
        out = [self.fn(x[i:i + self.batch_size].float()).float().cpu() for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).reshape(len(x), -1)


# ----------------------------------------------------------------------------
# Extractors.


def classifier_extractor(dataset_name: str, weights: str | Path | None = None) -> Extractor:
    """The committed CNN of ``dataset_name`` (mnist or digits); features = its penultimate layer."""
    if dataset_name not in CLASSIFIERS:
        raise ConfigError(f"there is no bundled classifier for '{dataset_name}' (only {', '.join(CLASSIFIERS)}); "
                          f"use --features inception or raw")
    filename, size = CLASSIFIERS[dataset_name]
    path = Path(weights) if weights else WEIGHTS_DIR / filename
    if not path.is_file():
        raise ConfigError(f"classifier weights '{path}' are missing; reinstall cmkit or run "
                          f"scripts/train_classifier.py --data {dataset_name}")
    net, info = load_classifier(path)

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ConfigError(f"the {dataset_name} classifier takes (n, 1, H, W) greyscale images, got {tuple(x.shape)}")
        return net.features(centre_crop(x, size))  # a data.pad_to border is cropped off

    return Extractor(f"{dataset_name}-cnn", file_sha256(path), fn, info=info)


CONFIDENCE_THRESHOLD = 0.9  # issue 20: the share of samples the committed classifier is this sure about


def classifier_probabilities(dataset_name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(fn, weights sha256): fn(images in [0, 1]) = the committed classifier's softmax, (n, classes).

    ``fn.num_classes`` is the number of classes the classifier tells apart.
    """
    filename, size = CLASSIFIERS[dataset_name]
    path = WEIGHTS_DIR / filename
    net, _ = load_classifier(path)

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.softmax(net(centre_crop(x[i:i + 500].float(), size)), dim=1)
                          for i in range(0, len(x), 500)])

    fn.num_classes = net.head.out_features
    return fn, file_sha256(path)


def classifier_confidence(dataset_name: str) -> tuple[Callable[[torch.Tensor], float], str]:
    """(fn, weights sha256): fn(images in [0, 1]) = the fraction whose committed classifier's max softmax
    probability is >= CONFIDENCE_THRESHOLD (a readability figure: unreadable strokes get low confidence)."""
    probabilities, sha = classifier_probabilities(dataset_name)
    return (lambda x: confident_share(probabilities(x))), sha


def confident_share(p: torch.Tensor) -> float:
    """The fraction of rows of softmax probabilities p (n, classes) whose max is >= CONFIDENCE_THRESHOLD."""
    return int((p.max(dim=1).values >= CONFIDENCE_THRESHOLD).sum()) / len(p)


def class_match(p: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of samples the classifier (softmax p, (n, classes)) assigns to the label they were drawn for."""
    return float((p.argmax(dim=1) == labels.to(p.device).long()).double().mean())


def raw_extractor() -> Extractor:
    """Low-dimensional data: the samples themselves, flattened (data units)."""
    return Extractor("raw", "", lambda x: x.reshape(len(x), -1), batch_size=100_000)


def _inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3, or a ConfigError naming the extra and the option.

    torch_fidelity/__init__ imports its CLIP and VGG extractors, which import torchvision; where
    torchvision is missing or broken (a CPU-only torch with the CUDA torchvision wheel), its
    Inception module, which is plain torch, is loaded under an empty parent package instead.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except Exception as e:  # ImportError, or torchvision's RuntimeError "operator torchvision::nms does not exist"
        first_error = e
    spec = importlib.util.find_spec("torch_fidelity") if "torch_fidelity" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"torch-fidelity is not installed ({type(first_error).__name__}: {first_error}). "
                          + INCEPTION_HINT) from None
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except Exception as e:
        sys.modules.pop("torch_fidelity", None)
        raise ConfigError(f"torch-fidelity is installed but its Inception-v3 module does not import "
                          f"({type(e).__name__}: {e}). " + INCEPTION_HINT) from None


def inception_extractor(weights: str) -> Extractor:
    """Inception-v3 pool3 (2048-d) features of torch-fidelity from a local weights file; never downloads."""
    if not weights:
        raise ConfigError("no Inception weights given. " + INCEPTION_HINT)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"eval.inception_weights='{weights}' is not a file. " + INCEPTION_HINT)
    cls = _inception_class()
    # feature_extractor_weights_path makes torch-fidelity torch.load the file instead of its URL.
    net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"Inception features take (n, 1 or 3, H, W) images, got {tuple(x.shape)}")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        # torch-fidelity takes uint8 images and resizes them to 299x299 itself, as the TF reference does.
        return net((x.clamp(0, 1) * 255).round().to(torch.uint8))[0]

    return Extractor("inception-v3", file_sha256(path), fn, batch_size=64)


FEATURES = ("auto", "classifier", "inception", "raw")


def base_name(dataset_name: str) -> str:
    """'mnist@latent' -> 'mnist': latent runs are judged in pixel space."""
    return dataset_name.split("@")[0]


def build_extractor(features: str, dataset_name: str, kind: str, inception_weights: str = "") -> Extractor:
    """Resolve eval.features: auto = the bundled classifier for mnist/digits, raw for vectors, else Inception."""
    if features not in FEATURES:
        raise ConfigError(f"eval.features='{features}' is not valid. Choose one of: {', '.join(FEATURES)}")
    name = base_name(dataset_name)
    if features == "auto":
        features = "raw" if kind == "vector" else "classifier" if name in CLASSIFIERS else "inception"
    if features == "classifier":
        return classifier_extractor(name)
    if features == "inception":
        return inception_extractor(inception_weights)
    return raw_extractor()


# ----------------------------------------------------------------------------
# Reference set and its cached features.


def reference_dataset(data_cfg, split: str):
    """The reference data: the same data config with split=``split``, in pixel space (no data.vae)."""
    from cmkit.data import load_dataset

    cfg = replace(data_cfg, split=split, labels=False)
    if getattr(cfg, "vae", ""):
        cfg = replace(cfg, vae="")
    return load_dataset(cfg)


def data_fingerprint(dataset) -> str:
    """sha256 of the dataset's content and of its normalisation (data space = x·std + mean for vectors)."""
    h = hashlib.sha256(dataset.fingerprint().encode())
    for t in (getattr(dataset, "mean", None), getattr(dataset, "std", None)):
        if t is not None:
            h.update(t.detach().cpu().double().contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_key(fingerprint: str, extractor: Extractor, n_ref: int, seed: int) -> str:
    """sha256 over everything the reference features depend on."""
    parts = {"version": CACHE_VERSION, "data": fingerprint, "extractor": extractor.name,
             "weights": extractor.weights_sha256, "n_ref": n_ref, "seed": seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def reference_features(dataset, extractor: Extractor, cache_dir: str | None, n_ref: int = 0,
                       seed: int = 0) -> tuple[np.ndarray, dict]:
    """(n, d) features of the reference set (a seeded subset of n_ref if 0 < n_ref < len), cached.

    The cache file is named by ``reference_key`` (data fingerprint + extractor weights hash), so
    changed data or weights miss the cache and are recomputed. Returns the features and a dict
    with the key, the cache path and whether it was a hit.
    """
    fingerprint = data_fingerprint(dataset)
    key = reference_key(fingerprint, extractor, n_ref, seed)
    path = Path(cache_dir).expanduser() / "eval" / f"ref_{key[:32]}.npz" if cache_dir else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) == key:
                    return f["features"], {"key": key, "data_sha256": fingerprint, "cache": str(path), "cache_hit": True}
        except (OSError, KeyError, ValueError, EOFError):
            pass  # a damaged file is recomputed and replaced
    n = len(dataset)
    idx = torch.arange(n)
    if 0 < n_ref < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_ref]
    # Streamed in chunks of whole extractor batches (the same batches as one call over all of x): a
    # prepared (memory-mapped) reference set is read chunk by chunk, never decoded whole into memory.
    step = extractor.batch_size * max(1, REF_CHUNK // extractor.batch_size)
    feats = np.concatenate([extractor(dataset.to_data_space(dataset.x[idx[i:i + step]])).numpy().astype(np.float32)
                            for i in range(0, len(idx), step)])
    if path is not None:
        _atomic_savez(path, features=feats, key=np.array(key))
    return feats, {"key": key, "data_sha256": fingerprint, "cache": str(path) if path else "", "cache_hit": False}


def _atomic_savez(path: Path, **arrays) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ref.", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # an unwritable cache only costs recomputation next time
