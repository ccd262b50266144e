import math

import pytest
import torch

from prunedlora.salr.mask import keep_mask
from prunedlora.salr.residual import ResidualDamping, error_bound_sq, fold_residual, lora_layers, residual_factors
from tests.salr.helpers import scale_residual_gradients


def pruning_residual(weight, sparsity=0.5, pattern="unstructured"):
    keep = keep_mask(weight, sparsity, pattern)
    return torch.where(keep, torch.zeros(()), weight)


def check_bound(E, rank):
    f = residual_factors(E, rank)
    direct = float((E.double() - f.B.double() @ f.A.double()).square().sum())
    assert f.error_sq == pytest.approx(direct, rel=1e-4, abs=1e-9)
    assert f.total_sq == pytest.approx(float(E.double().square().sum()), rel=1e-9)
    assert f.error_sq <= error_bound_sq(f.total_sq, rank, tuple(E.shape)) * (1 + 1e-9)
    return f


@pytest.mark.parametrize("rank", [0, 1, 8, 32])
def test_the_eckart_young_bound_holds_on_random_residuals(rank):
    torch.manual_seed(rank)
    check_bound(pruning_residual(torch.randn(48, 96)), rank)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_the_eckart_young_bound_holds_on_real_weights(real_weights, pattern):
    for weight in real_weights.values():
        E = pruning_residual(weight, pattern=pattern)
        errors = [check_bound(E, rank).error_sq for rank in (8, 16, 64)]
        assert errors[0] > errors[1] > errors[2]  # more rank, less error


def test_factors_are_balanced_and_reproduce_the_truncation():
    torch.manual_seed(3)
    E = torch.randn(40, 24)
    f = residual_factors(E, 5)
    U, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
    assert torch.allclose((f.B @ f.A).double(), U[:, :5] @ torch.diag(S[:5]) @ Vh[:5], atol=1e-5)
    assert torch.allclose(f.B.norm(dim=0), f.A.norm(dim=1), rtol=1e-4)


def test_a_rank_beyond_the_weight_is_refused():
    from prunedlora.salr import SalrError

    with pytest.raises(SalrError, match="does not fit"):
        residual_factors(torch.randn(4, 6), 5)


def peft_tiny(rank=6, alpha=12.0, rslora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj", "down_proj"])
    return get_peft_model(model, config)


@pytest.mark.parametrize("rslora", [False, True])
def test_the_folded_components_give_exactly_the_residual_under_peft_scaling(rslora):
    model = peft_tiny(rslora=rslora)
    layers = lora_layers(model)
    torch.manual_seed(5)
    factors = {
        name: residual_factors(torch.randn(layer.out_features, layer.in_features), 3) for name, layer in layers.items()
    }
    fold_residual(model, factors)
    for name, layer in layers.items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        assert s == pytest.approx(12.0 / (math.sqrt(6) if rslora else 6))
        assert torch.allclose(s * B[:, :3] @ A[:3], factors[name].B @ factors[name].A, atol=1e-6)
        assert not B[:, 3:].any()  # the task components as PEFT made them: B = 0
        assert torch.allclose(layer.get_delta_weight("default"), factors[name].B @ factors[name].A, atol=1e-6)


def test_a_frozen_residual_survives_adamw_with_weight_decay_while_the_task_part_learns():
    model = peft_tiny()
    layers = lora_layers(model)
    fold_residual(
        model, {n: residual_factors(torch.randn(l.out_features, l.in_features), 3) for n, l in layers.items()}
    )
    before = {
        n: (l.lora_A["default"].weight.detach().clone(), l.lora_B["default"].weight.detach().clone())
        for n, l in layers.items()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    freeze = ResidualDamping(model, 3, optimizer)
    ids = torch.randint(0, 128, (2, 12))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, layer in layers.items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.equal(A[:3], before[name][0][:3]) and torch.equal(B[:, :3], before[name][1][:, :3])
        assert not torch.equal(A[3:], before[name][0][3:]) and B[:, 3:].any()
    freeze.remove()
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(layer.lora_A["default"].weight.grad[:3].any() for layer in layers.values())


def _folded_tiny():
    torch.manual_seed(1)
    model = peft_tiny()
    layers = lora_layers(model)
    fold_residual(
        model, {n: residual_factors(torch.randn(l.out_features, l.in_features), 3) for n, l in layers.items()}
    )
    with torch.no_grad():  # a task part that is not zero, so every component gets a gradient
        for layer in layers.values():
            layer.lora_B["default"].weight[:, 3:].normal_(std=0.02)
    return model


def test_a_damped_residual_takes_the_step_of_a_smaller_learning_rate_and_the_task_part_the_full_one():
    """Damping at 0.25 over SGD equals SGD with the residual's gradients scaled by 0.25, over four steps."""
    import copy

    damped = _folded_tiny()
    reference = copy.deepcopy(damped)
    scale_residual_gradients(reference, 3, 0.25)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    runs = []
    for model in (damped, reference):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        if model is damped:
            damping = ResidualDamping(model, 3, optimizer, scale=0.25)
        for _ in range(4):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    start = {n: p for n, p in _folded_tiny().named_parameters() if p.requires_grad}
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=1e-6)
        assert not torch.equal(runs[0][name], start[name])  # residual and task parts both moved
    damping.remove()  # after remove() a step is the optimizer's own
    assert not damping._handles


@pytest.mark.parametrize("scale", [-0.1, 1.0, 2.0])
def test_a_damping_scale_outside_zero_to_one_is_refused(scale):
    from prunedlora.salr import SalrError

    with pytest.raises(SalrError, match=r"must be in \[0, 1\)"):
        ResidualDamping(peft_tiny(), 3, scale=scale)


# --- the whitened fit: the truncation best for the layer's output on the calibration inputs --------------
def _inputs(seed, tokens=200, features=24):
    """Anisotropic inputs: a few features carry most of the signal, as a transformer's do."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, features, dtype=torch.float64)
    return torch.randn(tokens, features, generator=gen, dtype=torch.float64) * scales


def _output_error_sq(E, f, X):
    return float(((E.double() - f.B.double() @ f.A.double()) @ X.T).square().sum())


def test_whitened_fit_with_an_identity_gram_and_no_damping_is_the_plain_truncation():
    from prunedlora.salr.residual import whitened_residual_factors

    torch.manual_seed(4)
    E = torch.randn(30, 16, dtype=torch.float64)
    plain, whitened = residual_factors(E, 5), whitened_residual_factors(E, torch.eye(16), 5, damping=0.0)
    torch.testing.assert_close(whitened.B @ whitened.A, plain.B @ plain.A, rtol=0, atol=1e-10)
    assert whitened.error_sq == pytest.approx(plain.error_sq, rel=1e-10)


@pytest.mark.parametrize("rank", [1, 4, 10])
def test_whitened_fit_beats_the_plain_svd_on_the_output_and_its_error_and_bound_hold_in_that_norm(rank):
    from prunedlora.salr.residual import whitened_residual_factors

    X = _inputs(rank)
    E = pruning_residual(torch.randn(40, 24, generator=torch.Generator().manual_seed(rank)))
    gram = X.T @ X
    f = whitened_residual_factors(E, gram, rank, damping=0.0)
    assert _output_error_sq(E, f, X) < _output_error_sq(E, residual_factors(E, rank), X)
    assert f.error_sq == pytest.approx(_output_error_sq(E, f, X), rel=1e-8)  # undamped: exactly the output error
    assert f.total_sq == pytest.approx(float((E.double() @ X.T).square().sum()), rel=1e-10)
    assert f.error_sq <= error_bound_sq(f.total_sq, rank, tuple(E.shape)) * (1 + 1e-9)


def test_whitened_fit_is_a_minimum_of_the_output_error():
    """No small rank-preserving move of the factors lowers ||(E - BA) X^T||: the first-order optimum."""
    from prunedlora.salr.residual import whitened_residual_factors

    X, E = _inputs(7), torch.randn(20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    f = whitened_residual_factors(E, X.T @ X, 3, damping=0.0)
    best = _output_error_sq(E, f, X)
    gen = torch.Generator().manual_seed(8)
    for _ in range(20):
        moved = type(f)(
            B=f.B + 1e-4 * torch.randn(f.B.shape, generator=gen, dtype=torch.float64),
            A=f.A + 1e-4 * torch.randn(f.A.shape, generator=gen, dtype=torch.float64),
            error_sq=0.0,
            total_sq=0.0,
        )
        assert _output_error_sq(E, moved, X) >= best * (1 - 1e-12)


def test_whitened_fit_damps_features_never_seen_and_refuses_a_gram_of_the_wrong_shape():
    from prunedlora.salr import SalrError
    from prunedlora.salr.residual import whitened_residual_factors

    E = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gram = torch.zeros(8, 8, dtype=torch.float64)
    gram[:4, :4] = torch.eye(4)  # features 4..7 never carry a signal: singular without damping
    f = whitened_residual_factors(E, gram, 2)
    assert torch.isfinite(f.B).all() and torch.isfinite(f.A).all() and f.rank == 2
    assert whitened_residual_factors(E, gram, 0).A.shape == (0, 8)
    with pytest.raises(SalrError, match="Gram matrix"):
        whitened_residual_factors(E, torch.eye(12), 2)
