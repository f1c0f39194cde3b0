"""Sample-quality metrics on feature vectors: Fréchet distance, k-NN precision/recall, SWD, MMD.

All functions take (n, d) arrays or tensors and compute in float64. None of them sees images:
the feature extractor (``features.py``) comes first.
"""

from __future__ import annotations

import numpy as np
import torch


def _as64(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return x.detach().to(torch.float64).reshape(len(x), -1).cpu()


# ----------------------------------------------------------------------------
# Fréchet distance (Heusel et al. 2017; "FID" when the features are Inception-v3 pool3).


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (n-1 denominator, as in the reference FID code) of (n, d) features."""
    f = _as64(feats).numpy()
    if len(f) < 2:
        raise ValueError(f"feature statistics need at least 2 samples, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² = ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^{1/2}) between N(μ1, Σ1) and N(μ2, Σ2).

    Dowson & Landau 1982 (the FID of Heusel et al. 2017). Tr((Σ1 Σ2)^{1/2}) is computed as
    Σ_i sqrt(λ_i) over the eigenvalues of the symmetric PSD matrix Σ1^{1/2} Σ2 Σ1^{1/2}, which has
    the same spectrum as Σ1 Σ2; this avoids the complex round-off of a general ``sqrtm``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return float(max(d2, 0.0))  # ≥ 0 in exact arithmetic; clip round-off of identical statistics


# ----------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2).


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64, computed in row chunks."""
    return torch.cat([torch.cdist(a[i:i + chunk], b) for i in range(0, len(a), chunk)])


def knn_radii(feats, k: int = 3) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set, the point itself excluded."""
    f = _as64(feats)
    if not 1 <= k < len(f):
        raise ValueError(f"k={k} nearest neighbours need 1 <= k < set size {len(f)}")
    d = pairwise_distances(f, f)
    # Row i holds d(i, i) = 0 as its smallest entry, so the (k+1)-th smallest is the k-th neighbour.
    return d.kthvalue(k + 1, dim=1).values


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Fraction of points inside at least one ball B(centre_j, radius_j)."""
    inside = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k: int = 3, real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 Eq. 1-2: precision = share of fake samples inside the real manifold,
    recall = share of real samples inside the fake manifold.

    A manifold is the union of balls around each sample with radius the distance to its k-th
    nearest neighbour in its own set (the paper uses k = 3). ``real_radii`` may be passed cached.
    """
    real, fake = _as64(real), _as64(fake)
    if real_radii is None:
        real_radii = knn_radii(real, k)
    fake_radii = knn_radii(fake, k)
    precision = _coverage(fake, real, real_radii.to(torch.float64))
    recall = _coverage(real, fake, fake_radii)
    return precision, recall


# ----------------------------------------------------------------------------
# Low-dimensional metrics, directly on samples.


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W1 between the empirical distributions of the columns of a (n, m) and b (n', m): ∫|F_a - F_b| dx.

    Exact for any set sizes: both CDFs are step functions, so the integral is a sum over the
    intervals between consecutive values of the merged sample.
    """
    n, m = len(a), len(b)
    values, order = torch.sort(torch.cat([a, b]), dim=0)
    steps = torch.cat([torch.full((n,) + a.shape[1:], 1.0 / n, dtype=a.dtype),
                       torch.full((m,) + b.shape[1:], -1.0 / m, dtype=b.dtype)])
    cdf_diff = torch.gather(steps, 0, order).cumsum(0)[:-1]  # F_a - F_b on each interval
    return (cdf_diff.abs() * (values[1:] - values[:-1])).sum(0)


def random_directions(dim: int, n_proj: int, seed: int) -> torch.Tensor:
    """n_proj unit vectors (dim, n_proj), uniform on the sphere, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(dim, n_proj, generator=g, dtype=torch.float64)
    return dirs / dirs.norm(dim=0, keepdim=True)


def sliced_wasserstein(a, b, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance: mean over random directions θ of W1(θ·a, θ·b) (Rabin et al. 2011)."""
    a, b = _as64(a), _as64(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dimension mismatch: {a.shape[1]} vs {b.shape[1]}")
    dirs = random_directions(a.shape[1], n_proj, seed)
    return wasserstein_1d(a @ dirs, b @ dirs).mean().item()


def median_distance(x, max_points: int = 2000, seed: int = 0) -> float:
    """Median pairwise distance of (a seeded subset of) x: the kernel bandwidth of ``mmd``."""
    x = _as64(x)
    if len(x) > max_points:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_points]]
    d = torch.pdist(x)
    return float(d.median()) if len(d) else 1.0


def mmd(a, b, bandwidth: float) -> float:
    """Unbiased MMD² (Gretton et al. 2012, Eq. 3) with the Gaussian kernel exp(-||x - y||² / (2 h²)).

    Can be slightly negative for equal distributions (it is unbiased); h is passed explicitly so
    that numbers with the same reference set are comparable (``median_distance`` of the reference).
    """
    a, b = _as64(a), _as64(b)
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least 2 samples in each set")
    gamma = 1.0 / (2.0 * bandwidth**2)

    def kernel_sum(x, y, same):
        total = 0.0
        for i in range(0, len(x), 2048):
            total += torch.exp(-gamma * torch.cdist(x[i:i + 2048], y).square()).sum().item()
        return total - (len(x) if same else 0.0)  # drop the diagonal k(x_i, x_i) = 1

    kaa = kernel_sum(a, a, True) / (n * (n - 1))
    kbb = kernel_sum(b, b, True) / (m * (m - 1))
    kab = kernel_sum(a, b, False) / (n * m)
    return kaa + kbb - 2 * kab
