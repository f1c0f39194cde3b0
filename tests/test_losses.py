"""Distances against closed forms (values and gradients)."""

import torch

from cmkit.losses import l2, pseudo_huber


def test_l2_value():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert torch.equal(l2(x, torch.zeros_like(x)), torch.tensor([25.0, 1.0]))


def test_pseudo_huber_value_and_gradient():
    # d = sqrt(|x-y|^2 + c^2) - c; grad_x = (x - y) / sqrt(|x-y|^2 + c^2)  (iCT Eq. 8)
    c = 0.5
    x = torch.tensor([[3.0, 4.0], [0.3, -0.4]], dtype=torch.float64, requires_grad=True)
    y = torch.zeros_like(x)
    d = pseudo_huber(x, y, c)
    assert torch.allclose(d, torch.tensor([(25 + 0.25) ** 0.5 - 0.5, (0.25 + 0.25) ** 0.5 - 0.5], dtype=torch.float64))
    d.sum().backward()
    ref = x.detach() / torch.sqrt((x.detach() ** 2).sum(1, keepdim=True) + c * c)
    assert torch.allclose(x.grad, ref)


def test_pseudo_huber_limits():
    # small residual: ~ |r|^2 / (2c); large residual: ~ |r| - c (linear growth)
    c = 1.0
    r = torch.tensor([[1e-3]], dtype=torch.float64)
    assert torch.allclose(pseudo_huber(r, torch.zeros_like(r), c), r[:, 0] ** 2 / 2, rtol=1e-5)
    big = torch.tensor([[1e4]], dtype=torch.float64)
    assert torch.allclose(pseudo_huber(big, torch.zeros_like(big), c), big[:, 0] - c, rtol=1e-6)
