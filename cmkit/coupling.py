"""Minibatch optimal-transport coupling of noise and data (iLCT Sec. 4.4, after Pooladian et al. 2023).

Within one batch, the noise draws z_1..z_B are re-assigned to the data x_1..x_B by the permutation
π minimising Σ_b ‖x_b - z_π(b)‖₂². The pairing is exact (a linear assignment problem); it only
permutes the noise, so labels stay with their data and the noise marginal is unchanged. Each
rank pairs its own batch, so it composes with data-parallel training without communication.

For the VE corruption x_σ = x + σ z the optimal π is the same for every σ > 0: ‖x - σz‖² differs
from σ·(-2⟨x, z⟩) only by terms that do not depend on π. So pairing with the unit noise z is
pairing with the prior sample σ_max·z.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def squared_cost(x: Tensor, z: Tensor) -> Tensor:
    """C[a, b] = ‖x_a - z_b‖₂² over flattened samples, in float64 on the CPU."""
    x = x.detach().flatten(1).double().cpu()
    z = z.detach().flatten(1).double().cpu()
    return (x.square().sum(1)[:, None] + z.square().sum(1)[None, :] - 2 * x @ z.T).clamp_min(0)


def _assign_scipy(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def _assign_pot(cost: np.ndarray) -> np.ndarray:
    try:
        import ot
    except ImportError:
        raise ValueError("method.coupling=ot_pot needs POT: pip install 'cmkit[ot]' (or use coupling=ot)") from None
    n = cost.shape[0]
    w = np.full(n, 1.0 / n)
    # MACHINE-NOTES 4: POT's default numItermax stops short of optimality at n = 2048.
    plan = ot.emd(w, w, cost, numItermax=max(100_000, 50 * n * n))
    # For equal uniform marginals the EMD plan is a permutation matrix divided by n (Birkhoff).
    return plan.argmax(1).astype(np.int64)


SOLVERS = {"ot": _assign_scipy, "ot_pot": _assign_pot}


def ot_permutation(x: Tensor, z: Tensor, solver: str = "ot") -> Tensor:
    """perm with z[perm] paired to x row by row, minimising Σ_b ‖x_b - z[perm][b]‖₂² exactly."""
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"OT pairing needs equal batch sizes, got {x.shape[0]} data and {z.shape[0]} noise")
    if solver not in SOLVERS:
        raise ValueError(f"unknown OT solver '{solver}'. Valid solvers: {', '.join(SOLVERS)}")
    perm = SOLVERS[solver](squared_cost(x, z).numpy())
    return torch.from_numpy(perm).to(z.device)


def ot_pair(x: Tensor, z: Tensor, solver: str = "ot") -> Tensor:
    """The noise z re-ordered so that row b is the OT partner of x[b] (iLCT Sec. 4.4, Fig. 3)."""
    return z[ot_permutation(x, z, solver)]


COUPLINGS = ("none", "ot", "ot_pot")  # none: independent pairs, as in iCT
