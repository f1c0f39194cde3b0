"""Distances against closed forms (values and gradients)."""

import torch

from cmkit.losses import l1, l2, make_distance, pseudo_huber


def test_l2_value():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert torch.equal(l2(x, torch.zeros_like(x)), torch.tensor([25.0, 1.0]))


def test_l1_value_gradient_and_name():
    # d = |3| + |-4| = 7 and |1 - 0.5| + |0 - 2| = 2.5 by hand; grad_x = sign(x - y) (Song et al. 2023, Sec. 3)
    x = torch.tensor([[3.0, -4.0], [1.0, 0.0]], requires_grad=True)
    y = torch.tensor([[0.0, 0.0], [0.5, 2.0]])
    d = l1(x, y)
    assert torch.equal(d, torch.tensor([7.0, 2.5]))
    d.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, -1.0], [1.0, -1.0]]))

    class M:  # what make_distance reads of a method config
        distance = "l1"
    assert make_distance(M(), (2,))(x, y, 0.0).tolist() == [7.0, 2.5]


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
