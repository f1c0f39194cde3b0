"""One attention entry point for every cmkit network: softmax(q kᵀ/√d) v over (B, heads, tokens, head_dim).

Every network calls :func:`attention`; which kernel runs is decided here, not in the networks
(DESIGN.md, the scale phase). Today: the hand-written math path, which has forward-mode AD on CPU
(MACHINE-NOTES §1: CPU SDPA has none). The memory-efficient JVP path of sCM App. F plugs in here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v with q, k, v of shape (B, H, N, d); JVP-safe everywhere."""
    w = torch.einsum("bhqd,bhkd->bhqk", q, k / math.sqrt(q.shape[-1])).softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", w, v)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention over (B, H, N, d) tensors, safe under torch.func.jvp."""
    return math_attention(q, k, v)
