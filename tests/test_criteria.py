"""The obs criterion against a quadratic loss whose Hessian and gradient are known exactly."""

import pytest
import torch

from prunedlora.rank.criteria.activation import activation_scores
from prunedlora.rank.criteria.magnitude import magnitude_scores
from prunedlora.rank.criteria.obs_paper import obs_scores
from prunedlora.rank.criteria.taylor import taylor_scores
from prunedlora.rank.obs import damped_inverse_hessian, obs_row_costs, remove_components


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64, restored afterwards: a module-level set_default_dtype leaked
    float64 into every test collected after this file."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


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
    torch.testing.assert_close(sequential.hinv[free][:, free], torch.linalg.inv(h[free][:, free]), atol=1e-9, rtol=0)
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
    gen = torch.Generator().manual_seed(0)
    gb, ga = torch.randn(2, 3, generator=gen), torch.randn(3, 2, generator=gen)
    obs = obs_scores(b, a, gb, ga, damping=0.01)
    torch.testing.assert_close(obs, _obs_by_hand(b, a, gb, ga, 0.01), rtol=1e-10, atol=0)


def _obs_by_hand(b, a, gb, ga, damping):
    """The score the pruner ranks by, written out entry by entry from the README: for each factor (B's
    rows; A's columns) H = G^T G + delta I (delta = damping x mean diag), and for row w with gradient g
    and component j: lambda = (w_j - [H^-1 g]_j) / [H^-1]_jj, cost 1/2 lambda^2 [H^-1]_jj, summed over
    the rows of both factors. Break: drop A's term, or use G_A instead of its transpose -> red."""
    total = torch.zeros(b.shape[1], dtype=torch.float64)
    for rows, grads in ((b.double(), gb.double()), (a.double().T, ga.double().T)):
        h = grads.T @ grads
        h = h + damping * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=torch.float64)
        hinv = torch.linalg.inv(h)
        for i in range(rows.shape[0]):
            step = hinv @ grads[i]
            for j in range(rows.shape[1]):
                lam = (rows[i, j] - step[j]) / hinv[j, j]
                total[j] += 0.5 * lam**2 * hinv[j, j]
    return total


# --- obs-fisher and obs-input: the classic OBS cost with a Hessian of the right scale ---------------


def _schur_removal_cost(w_rows, h, j):
    """Exact min of 1/2 d^T H d subject to (w + d)_j = 0, summed over rows, by elimination."""
    free = [k for k in range(h.shape[0]) if k != j]
    schur = h[j, j] - h[j, free] @ torch.linalg.solve(h[free][:, free], h[free, j])
    return float(0.5 * (w_rows[:, j] ** 2).sum() * schur)


def test_classic_obs_cost_is_the_exact_quadratic_removal_cost():
    from prunedlora.rank.obs import classic_obs_costs

    gen = torch.Generator().manual_seed(3)
    root = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    h = root @ root.T + 0.5 * torch.eye(5, dtype=torch.float64)
    w = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    costs = classic_obs_costs(w, torch.linalg.inv(h))
    for j in range(5):
        assert costs[j].item() == pytest.approx(_schur_removal_cost(w, h, j), rel=1e-10)


def test_compensation_with_the_true_hessian_reaches_the_exact_cost():
    """The recovery update ``compensate`` is the optimal re-fit: its loss change equals the cost."""
    from prunedlora.rank.obs import classic_obs_costs

    gen = torch.Generator().manual_seed(4)
    root = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    h = root @ root.T + 0.1 * torch.eye(6, dtype=torch.float64)
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    new = remove_components(w, torch.zeros_like(w), hinv, [2], "compensate").weight_rows
    d = new - w
    change = 0.5 * float(torch.einsum("ni,ij,nj->", d, h, d))
    assert change == pytest.approx(classic_obs_costs(w, hinv)[2].item(), rel=1e-9)


def _fisher(grad_rows):
    return grad_rows.T @ grad_rows / grad_rows.shape[0]


def test_obs_fisher_scales_with_the_gradient_squared_and_keeps_its_order():
    """Unlike obs-paper (scale-free), obs-fisher is an estimated loss increase: gradients x c -> scores x c^2."""
    from prunedlora.rank.criteria.obs_fisher import obs_fisher_scores

    b, a, gb, ga = _module(seed=5)
    base = obs_fisher_scores(b, a, _fisher(gb), _fisher(ga.T), 0.01)
    scaled = obs_fisher_scores(b, a, _fisher(3.0 * gb), _fisher(3.0 * ga.T), 0.01)
    torch.testing.assert_close(scaled, 9.0 * base, rtol=1e-10, atol=0)
    weights_scaled = obs_fisher_scores(2.0 * b, a, _fisher(gb), _fisher(ga.T), 0.01)
    assert torch.all(weights_scaled > base * (1 + 1e-3))  # it sees the weights: a larger B costs more


def test_obs_fisher_of_a_module_twice_as_wide_made_of_copies_is_twice_the_cost():
    """Per-row Fisher pooled by the mean: two copies of a module cost twice one, whatever the width."""
    from prunedlora.rank.criteria.obs_fisher import obs_fisher_scores

    b, a, gb, ga = _module(seed=6)
    one = obs_fisher_scores(b, a, _fisher(gb), _fisher(ga.T), 0.01)
    b2, gb2 = torch.cat([b, b]), torch.cat([gb, gb])
    a2, ga2 = torch.cat([a, a], dim=1), torch.cat([ga, ga], dim=1)
    two = obs_fisher_scores(b2, a2, _fisher(gb2), _fisher(ga2.T), 0.01)
    torch.testing.assert_close(two, 2.0 * one, rtol=1e-10, atol=0)


def test_obs_input_is_the_least_squares_increase_of_the_modules_output():
    """SparseGPT on B: cost = 1/2 min ||s (B - B') Z||^2 over B' with column j zero (H_z = Z Z^T)."""
    from prunedlora.rank.criteria.obs_input import obs_input_scores

    gen = torch.Generator().manual_seed(7)
    b = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 50, generator=gen, dtype=torch.float64)  # 50 tokens of z = A x
    scaling = 2.0
    scores = obs_input_scores(b, z @ z.T, damping=1e-12, scaling=scaling)
    for j in range(4):
        keep = [k for k in range(4) if k != j]
        target = (scaling * b @ z).T  # (tokens, out)
        refit = torch.linalg.lstsq((scaling * z[keep]).T, target).solution  # (3, out)
        residual = target - (scaling * z[keep]).T @ refit
        assert scores[j].item() == pytest.approx(0.5 * float(residual.square().sum()), rel=1e-6)


def _module(seed, out=12, s=5, inp=10):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(out, s, generator=gen, dtype=torch.float64) * 4e-3,
        torch.randn(s, inp, generator=gen, dtype=torch.float64) * 0.05,
        torch.randn(out, s, generator=gen, dtype=torch.float64) * 1e-4,
        torch.randn(s, inp, generator=gen, dtype=torch.float64) * 1e-4,
    )


# --- sensitivity: AdaLoRA's smoothed importance x uncertainty -----------------------------------------
def test_sensitivity_moving_averages_follow_peft_update_ipt_step_by_step():
    """Two steps by hand: Ibar_1 = .15 I_1, Ubar_1 = .15 |I_1 - Ibar_1|; then the same again from there."""
    from prunedlora.rank.criteria.sensitivity import update_sensitivity

    w = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    importance, uncertainty = torch.zeros_like(w), torch.zeros_like(w)
    update_sensitivity(importance, uncertainty, w, torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    i1 = torch.tensor([[1.0, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(importance, 0.15 * i1, rtol=1e-12, atol=0)
    torch.testing.assert_close(uncertainty, 0.15 * (i1 - 0.15 * i1).abs(), rtol=1e-12, atol=0)
    update_sensitivity(importance, uncertainty, w, torch.tensor([[-0.1, 1.0]], dtype=torch.float64))
    i2 = torch.tensor([[0.2, 1.0]], dtype=torch.float64)
    ibar2 = 0.85 * 0.15 * i1 + 0.15 * i2
    torch.testing.assert_close(importance, ibar2, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        uncertainty, 0.85 * 0.15 * (i1 - 0.15 * i1).abs() + 0.15 * (i2 - ibar2).abs(), rtol=1e-12, atol=0
    )


def test_sensitivity_score_is_the_mean_over_bs_column_plus_the_mean_over_as_row():
    from prunedlora.rank.criteria.sensitivity import sensitivity_scores

    ib = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # B: out 3 x s 2
    ub = torch.tensor([[1.0, 1.0], [2.0, 0.5], [0.0, 1.0]])
    ia = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 2.0, 0.0]])  # A: s 2 x in 4
    ua = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    expected = torch.tensor([(1 + 6 + 0) / 3 + 4 / 4, (2 + 2 + 6) / 3 + 4 / 4], dtype=torch.float64)
    torch.testing.assert_close(sensitivity_scores(ib, ub, ia, ua), expected, rtol=1e-12, atol=0)


def test_sensitivity_scales_with_the_gradient_squared():
    """I = |w g| scales with g, Ubar too, so the score goes with g^2: comparable across modules like obs-fisher."""
    from prunedlora.rank.criteria.sensitivity import sensitivity_scores, update_sensitivity

    b, a, gb, ga = _module(seed=8)

    def score(c):
        stats = [torch.zeros_like(t) for t in (b, b, a, a)]
        for step in range(3):
            update_sensitivity(stats[0], stats[1], b, c * gb * (1 + step))
            update_sensitivity(stats[2], stats[3], a, c * ga * (1 - 0.3 * step))
        return sensitivity_scores(*stats)

    torch.testing.assert_close(score(3.0), 9.0 * score(1.0), rtol=1e-10, atol=0)


# --- taylor-ema: LoRAPrune's moving average of the first-order score ---------------------------------
def test_taylor_ema_is_loraprunes_moving_average_step_by_step():
    """S_1 = .1 s_1, then S_2 = .9 S_1 + .1 s_2, as LoRAPrune's ``s_dict = 0.9 s_dict + 0.1 s``."""
    from prunedlora.rank.criteria.taylor_ema import update_taylor_ema

    average = torch.zeros(3, dtype=torch.float64)
    s1, s2 = torch.tensor([1.0, 4.0, 0.0]), torch.tensor([3.0, 0.0, 2.0])
    update_taylor_ema(average, s1)
    torch.testing.assert_close(average, 0.1 * s1.double(), rtol=1e-12, atol=0)
    update_taylor_ema(average, s2)
    torch.testing.assert_close(average, 0.9 * 0.1 * s1.double() + 0.1 * s2.double(), rtol=1e-12, atol=0)


def test_taylor_ema_scales_with_the_gradient_and_ranks_by_the_averaged_taylor_score():
    """Linear in g (first order), and the average of steps whose taylor ranking flips follows the larger."""
    from prunedlora.rank.criteria.taylor import taylor_scores
    from prunedlora.rank.criteria.taylor_ema import update_taylor_ema

    b, a, gb, ga = _module(seed=9)

    def score(c):
        average = torch.zeros(b.shape[1], dtype=torch.float64)
        for step in range(3):
            update_taylor_ema(average, taylor_scores(b, a, c * gb * (1 + step), c * ga * (1 - 0.3 * step)))
        return average

    torch.testing.assert_close(score(3.0), 3.0 * score(1.0), rtol=1e-10, atol=0)
    average = torch.zeros(2, dtype=torch.float64)
    for step_scores in ([1.0, 0.0], [1.0, 0.0], [0.0, 1.5]):  # component 1 wins the last batch only
        update_taylor_ema(average, torch.tensor(step_scores))
    assert average[0] > average[1]  # one batch does not decide (taylor alone would keep component 1)
