"""The obs criterion against a quadratic loss whose Hessian and gradient are known exactly."""

import pytest
import torch

from prunedlora.criteria import (
    activation_scores,
    damped_inverse_hessian,
    magnitude_scores,
    obs_row_costs,
    obs_scores,
    remove_components,
    taylor_scores,
)

torch.set_default_dtype(torch.float64)


def _problem(n=6, s=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, s, generator=gen)
    g = torch.randn(n, s, generator=gen) * 0.3
    hinv = damped_inverse_hessian(g, damping=0.5)
    h = torch.linalg.inv(hinv)
    return w, g, h, hinv


def _loss_change(d, g, h):
    """Exact change of the quadratic loss sum_rows g_i^T d_i + 1/2 d_i^T H d_i."""
    return float((g * d).sum() + 0.5 * torch.einsum("is,st,it->", d, h, d))


def _optimal_removal(w, g, h, removed):
    """min over d of the quadratic with d_Q = -w_Q, solved directly on the free coordinates."""
    s = w.shape[1]
    free = [k for k in range(s) if k not in removed]
    d = torch.zeros_like(w)
    d[:, removed] = -w[:, removed]
    rhs = -(g[:, free] + d[:, removed] @ h[removed][:, free])
    d[:, free] = torch.linalg.solve(h[free][:, free], rhs.T).T
    return d


def test_damped_inverse_hessian_is_the_inverse_of_the_damped_fisher():
    g = torch.randn(7, 4)
    hinv = damped_inverse_hessian(g, damping=0.1)
    h = g.T @ g
    h += 0.1 * h.diagonal().mean() * torch.eye(4)
    torch.testing.assert_close(hinv @ h, torch.eye(4), atol=1e-10, rtol=0)


def test_obs_score_equals_true_loss_increase_of_optimal_removal():
    w, g, h, hinv = _problem()
    newton = -g @ hinv
    best_without_removal = _loss_change(newton, g, h)
    costs = obs_row_costs(w, g, hinv)
    for j in range(w.shape[1]):
        d = _optimal_removal(w, g, h, [j])
        assert torch.all(w[:, j] + d[:, j] == 0)
        true_increase = _loss_change(d, g, h) - best_without_removal
        assert costs[j].item() == pytest.approx(true_increase, rel=1e-9, abs=1e-12)


def test_newton_recovery_is_the_optimal_removal():
    w, g, h, hinv = _problem(seed=1)
    for j in range(w.shape[1]):
        result = remove_components(w, g, hinv, [j], "newton").weight_rows
        torch.testing.assert_close(result - w, _optimal_removal(w, g, h, [j]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compensation_beats_plain_zeroing(seed):
    w, _, h, hinv = _problem(seed=seed)
    zero_grad = torch.zeros_like(w)
    for j in range(w.shape[1]):
        zeroed = w.clone()
        zeroed[:, j] = 0
        compensated = remove_components(w, zero_grad, hinv, [j], "compensate").weight_rows
        newton = remove_components(w, zero_grad, hinv, [j], "newton").weight_rows
        assert compensated[:, j].abs().max() == 0
        loss_zeroed = _loss_change(zeroed - w, zero_grad, h)
        loss_comp = _loss_change(compensated - w, zero_grad, h)
        assert loss_comp < loss_zeroed
        torch.testing.assert_close(compensated, newton, atol=1e-12, rtol=0)


def test_newton_beats_zeroing_with_a_gradient():
    w, g, h, hinv = _problem(seed=3)
    for j in range(w.shape[1]):
        zeroed = w.clone()
        zeroed[:, j] = 0
        newton = remove_components(w, g, hinv, [j], "newton").weight_rows
        assert _loss_change(newton - w, g, h) < _loss_change(zeroed - w, g, h)


@pytest.mark.parametrize("removed", [[1, 3], [4, 0, 2], [2, 1, 0, 4]])
def test_sequential_removal_with_downdate_equals_joint_removal(removed):
    w, g, h, hinv = _problem(n=8, s=6, seed=4)
    sequential = remove_components(w, g, hinv, removed, "newton")
    joint = w + _optimal_removal(w, g, h, removed)
    torch.testing.assert_close(sequential.weight_rows, joint, atol=1e-9, rtol=0)
    # compensation alone is the joint removal of the g = 0 problem
    sequential_comp = remove_components(w, g, hinv, removed, "compensate").weight_rows
    joint_comp = w + _optimal_removal(w, torch.zeros_like(g), h, removed)
    torch.testing.assert_close(sequential_comp, joint_comp, atol=1e-9, rtol=0)
    # the downdated inverse is the inverse of H on the surviving components
    free = [k for k in range(w.shape[1]) if k not in removed]
    torch.testing.assert_close(
        sequential.hinv[free][:, free], torch.linalg.inv(h[free][:, free]), atol=1e-9, rtol=0
    )
    assert sequential.hinv[removed].abs().max() == 0


def test_order_of_sequential_removal_does_not_matter():
    w, g, _, hinv = _problem(n=5, s=6, seed=5)
    a = remove_components(w, g, hinv, [0, 2, 5], "newton").weight_rows
    b = remove_components(w, g, hinv, [5, 0, 2], "newton").weight_rows
    torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_recovery_none_only_zeroes():
    w, g, _, hinv = _problem()
    result = remove_components(w, g, hinv, [1, 2], "none").weight_rows
    expected = w.clone()
    expected[:, [1, 2]] = 0
    assert torch.equal(result, expected)


def test_module_scores_shapes_and_known_values():
    b = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]])  # out=2, r=3
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]])  # r=3, in=2
    mag = magnitude_scores(b, a)
    torch.testing.assert_close(mag, torch.tensor([5.0, 0.0, 8**0.5]))
    gb, ga = torch.ones_like(b), -torch.ones_like(a)
    torch.testing.assert_close(taylor_scores(b, a, gb, ga), torch.tensor([1.0 + 7.0, 1.0, 4.0 + 1.0]))
    torch.testing.assert_close(activation_scores(b, torch.tensor([4.0, 9.0, 1.0])), torch.tensor([2.0, 0.0, 8**0.5]))
    obs = obs_scores(b, a, torch.randn(2, 3), torch.randn(3, 2), damping=0.01)
    assert obs.shape == (3,) and torch.all(obs >= 0)
