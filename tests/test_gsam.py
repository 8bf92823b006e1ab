"""GSAM (FTD's/DATM's expert optimiser): the update on hand-computed two-parameter examples."""

import pytest
import torch
from torch import nn

from builders.evaluate import label_loss
from builders.gsam import GSAMSettings, decompose, gsam_train_step, perturbation

# L(w) = (w1^2 + 3 w2^2) / 2, grad = (w1, 3 w2); w = (1, 2), rho 0.1, alpha 0.3, SGD lr 0.5.
# Worked by hand (non-adaptive): g = (1, 6), ||g|| = sqrt(37); e = 0.1 g / sqrt(37) = (0.016440, 0.098639);
# h = grad(w + e) = (1.016440, 6.295918); cos = <g,h> / (||g|| ||h||);
# v = g - cos ||g|| h / ||h|| ; d = h - 0.3 v = (1.007278, 6.297397); w - 0.5 d = (0.496361, -1.148699).
# Adaptive: e = 0.1 g w^2 / ||w g||, ||w g|| = sqrt(1 + 144): e = (0.008305, 0.199309);
# h = (1.008305, 6.597927); d = (0.983952, 6.601649); w - 0.5 d = (0.508024, -1.300825).
CASES = [
    (False, (0.01643989873, 0.09863939238), (1.00727836876, 6.29739725365), (0.49636081562, -1.14869862682)),
    (True, (0.00830454799, 0.19930915165), (0.98395182103, 6.60164907291), (0.50802408949, -1.30082453646)),
]


@pytest.mark.parametrize("adaptive, e_hand, d_hand, w_hand", CASES)
def test_gsam_update_matches_the_hand_computed_example(adaptive, e_hand, d_hand, w_hand):
    w = [torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)]
    g = [w[0].clone(), 3 * w[1]]
    e = perturbation(w, g, rho=0.1, adaptive=adaptive)
    torch.testing.assert_close(torch.stack(e), torch.tensor(e_hand, dtype=torch.float64), atol=1e-9, rtol=0)
    h = [w[0] + e[0], 3 * (w[1] + e[1])]
    d = decompose(g, h, alpha=0.3)
    torch.testing.assert_close(torch.stack(d), torch.tensor(d_hand, dtype=torch.float64), atol=1e-9, rtol=0)
    new_w = torch.stack([w[i] - 0.5 * d[i] for i in range(2)])
    torch.testing.assert_close(new_w, torch.tensor(w_hand, dtype=torch.float64), atol=1e-9, rtol=0)


def test_alpha_zero_and_rho_zero_reduce_to_sgd_directions():
    g = [torch.tensor([1.0, -2.0])]
    h = [torch.tensor([0.5, 3.0])]
    torch.testing.assert_close(decompose(g, h, alpha=0.0)[0], h[0])  # SAM: the perturbed gradient
    torch.testing.assert_close(perturbation([torch.ones(2)], g, rho=0.0)[0], torch.zeros(2))


def test_gsam_train_step_runs_the_two_passes_on_a_two_parameter_network():
    """A bias-free Linear(1, 2) (two parameters) on one image: the step equals the formula's."""
    torch.manual_seed(0)
    net = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.3], [-0.4]]))
    x, y = torch.tensor([[2.0]]), torch.tensor([1])
    settings = GSAMSettings(rho_max=0.05, rho_min=0.05, alpha=0.3, adaptive=True)

    def grad_at(w):
        w = w.clone().requires_grad_(True)
        return torch.autograd.grad(label_loss(x @ w.T, y), w)[0]

    w0 = net.weight.detach().clone()
    g = grad_at(w0)
    e = 0.05 * g * w0 ** 2 / (w0.abs() * g).norm()
    h = grad_at(w0 + e)
    cos = (g * h).sum() / (g.norm() * h.norm())
    expected = w0 - 0.1 * (h - 0.3 * (g - cos * g.norm() * h / h.norm()))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gsam_train_step(net, opt, x, y, None, torch.Generator(), settings, settings.rho(0.1, 0.1, 0.1))
    torch.testing.assert_close(net.weight.detach(), expected, atol=1e-7, rtol=0)


def test_rho_follows_the_lr_proportionally():
    s = GSAMSettings(rho_max=0.1, rho_min=0.02)
    assert s.rho(0.01, 0.01, 0.01) == 0.1  # constant lr: rho_max (FTD's StepLR(gamma=1))
    assert s.rho(0.005, 0.01, 0.0) == pytest.approx(0.06)
