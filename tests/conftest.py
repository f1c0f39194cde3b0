import os
import sys

import pytest
import torch

# Intra-op threads: OMP_NUM_THREADS when the caller sets it (`make test` sets 1 per pytest worker, so that two
# workers do not oversubscribe the 2 cores), else at most 2.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """Tests read configs/ relative to the repository root."""
    monkeypatch.chdir(ROOT)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between equal-size point sets, computed here for the tests."""
    g = torch.Generator().manual_seed(seed)
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return (pa - pb).abs().mean().item()


def flat_items(tree: dict, prefix: str = ""):
    """(path, leaf) pairs of a nested checkpoint-state dict."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flat_items(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def assert_states_equal(a: dict, b: dict, parts=("objective", "optimizers", "ema")) -> None:
    """Two checkpoint states hold bit-identical tensors and equal scalars in each of ``parts``."""
    for part in parts:
        fa, fb = dict(flat_items(a[part])), dict(flat_items(b[part]))
        assert fa.keys() == fb.keys(), part
        for k in fa:
            same = torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k]) else fa[k] == fb[k]
            assert same, f"{part}/{k}"


sys.modules.setdefault("cmkit_testutils", sys.modules[__name__])
