"""The one parameterised-model wrapper: f(x, t) = c_skip·x + c_out·F(c_in·x, c_noise) (STYLE 3).

Consistency models and diffusion denoisers differ only in the coefficients, which the process
supplies (``process.scalings(t, kind)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cmkit.processes import _bcast


class Parameterized(nn.Module):
    """f(x, t) = c_skip(t)·x + c_out(t)·F(c_in(t)·x, c_noise(t)) over a backbone F.

    ``kind="consistency"`` gives a consistency model (iCT Eq. 2; f(x, t_min) = x exactly),
    ``kind="diffusion"`` a denoiser D(x, σ) (EDM Eq. 7).
    """

    def __init__(self, net: nn.Module, process, kind: str = "consistency"):
        super().__init__()
        self.net = net
        self.process = process
        self.kind = kind

    def coefficients(self, x: Tensor, t: Tensor):
        """Per-sample (c_skip, c_out, c_in) broadcast to x, and c_noise; at least float32."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.process.scalings(t.to(dtype), self.kind)
        return _bcast(c_skip, x), _bcast(c_out, x), _bcast(c_in, x), c_noise

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, **net_kwargs) -> Tensor:
        c_skip, c_out, c_in, c_noise = self.coefficients(x, t)
        F = self.net((c_in * x).to(x.dtype), c_noise, class_labels, **net_kwargs)
        return (c_skip * x + c_out * F.to(c_out.dtype)).to(x.dtype)
