"""The LoRA-guided importance against autograd, and the reduction of element scores to GQA groups.

The relation tested: for a LoRA Linear y = (W0 + s·B·A) x, the chain rule gives the factors'
gradients from the merged weight's gradient G_W (which is also W0's own gradient, ∂L/∂W0):
G_B = s·G_W·Aᵀ and G_A = s·Bᵀ·G_W. Hence Ĝ = G_B·A + B·G_A − G_B·G_A
= s·(G_W·AᵀA + B·Bᵀ·G_W) − s²·G_W·Aᵀ·Bᵀ·G_W, and Ĝ equals ∂L/∂W0 exactly when s = 1, B = 0 and A is
square and orthogonal (the update of the product B·A is then W0's own gradient step).
"""

import pytest
import torch

from prunedlora.loraprune.criteria import element_scores, layer_scores
from prunedlora.loraprune.groups import DecoderShape
from prunedlora.loraprune.importance import estimated_weight_grad, reduce_to_groups
from tests.loraprune.helpers import batch, tiny_peft

SHAPE = DecoderShape(num_layers=3, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=128)


def o_proj(model, layer=1):
    return model.base_model.model.model.layers[layer].self_attn.o_proj


def backward_with_base_grad(model, module):
    module.base_layer.weight.requires_grad_(True)
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    return module.base_layer.weight.grad


def test_estimate_equals_the_true_weight_gradient_when_the_product_steps_like_w0():
    # rank = in_features, A orthogonal, B = 0, scaling 1: G_B·A = G_W·AᵀA = G_W and the other terms vanish
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=128, num_hidden_layers=3)).double()
    model = get_peft_model(base, LoraConfig(r=64, lora_alpha=64, target_modules=["o_proj"], lora_dropout=0.0))
    module = o_proj(model)
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    assert module.scaling["default"] == 1.0 and a.shape == (64, 64)
    with torch.no_grad():
        a.copy_(torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0])
        b.zero_()
    true_grad = backward_with_base_grad(model, module)
    estimate = estimated_weight_grad(a.detach(), b.detach(), a.grad, b.grad)
    assert true_grad.abs().max() > 1e-6
    torch.testing.assert_close(estimate, true_grad, rtol=1e-10, atol=1e-14)


def test_estimate_is_the_closed_form_in_the_true_gradient_for_any_factors():
    model = tiny_peft(targets=["o_proj"], dtype=torch.float64)
    module = o_proj(model)
    a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
    assert s == 2.0 and b.abs().sum() > 0
    g = backward_with_base_grad(model, module)
    torch.testing.assert_close(b.grad, s * g @ a.detach().T)
    torch.testing.assert_close(a.grad, s * b.detach().T @ g)
    a_, b_ = a.detach(), b.detach()
    closed = s * (g @ a_.T @ a_ + b_ @ b_.T @ g) - s * s * g @ a_.T @ b_.T @ g
    torch.testing.assert_close(estimated_weight_grad(a_, b_, a.grad, b.grad), closed)
    # the score multiplies by the merged weight W0 + s·B·A, where the scaling enters
    merged = module.base_layer.weight.detach() + s * b_ @ a_
    torch.testing.assert_close(element_scores(module, "lora"), (closed * merged).abs().float())
    torch.testing.assert_close(element_scores(module, "grad", g), (g * merged).abs().float())
    torch.testing.assert_close(element_scores(module, "magnitude"), merged.abs().float())


def test_no_gradient_yet_means_no_lora_score():
    model = tiny_peft()
    assert element_scores(o_proj(model), "lora") is None
    assert element_scores(o_proj(model), "grad", None) is None


def test_rows_and_columns_reduce_to_the_kv_group_that_owns_them():
    # 4 query heads over 2 KV heads of 16 dims: query heads 0,1 read KV head 0, heads 2,3 read KV head 1
    q = torch.zeros(64, 64)
    q[16:32] = 1.0  # query head 1 -> group 0
    assert reduce_to_groups("q_proj", q, SHAPE).tolist() == [16 * 64, 0]
    o = torch.zeros(64, 64)
    o[:, 40] = 1.0  # input column of query head 2 -> group 1
    assert reduce_to_groups("o_proj", o, SHAPE).tolist() == [0, 64]
    k = torch.zeros(32, 64)
    k[20] = 1.0  # K row of KV head 1
    assert reduce_to_groups("k_proj", k, SHAPE).tolist() == [0, 64]
    down = torch.zeros(64, 128)
    down[:, 7] = 2.0
    channels = reduce_to_groups("down_proj", down, SHAPE)
    assert channels.shape == (128,) and channels.argmax() == 7 and channels[7] == 128


def test_each_module_counts_once_whatever_its_scale():
    model = tiny_peft()
    layer = model.base_model.model.model.layers[0]
    projections = {
        n: getattr(layer.self_attn if n[0] in "qkvo" else layer.mlp, n)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    heads, channels = layer_scores(projections, "magnitude", SHAPE)
    with torch.no_grad():
        projections["q_proj"].base_layer.weight.mul_(1000.0)
        projections["q_proj"].lora_B["default"].weight.mul_(1000.0)
    heads_scaled, _ = layer_scores(projections, "magnitude", SHAPE)
    torch.testing.assert_close(heads_scaled, heads, rtol=1e-4, atol=1e-6)  # normalised per module
    assert heads.shape == (2,) and channels.shape == (128,)
    assert torch.linalg.vector_norm(heads) <= 4 + 1e-5  # the sum of four unit vectors


def test_random_scores_repeat_with_the_seed():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = layer_scores({}, "random", SHAPE, generator=g1)
    second = layer_scores({}, "random", SHAPE, generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("criterion", ["lora", "grad"])
def test_gradient_criteria_need_a_backward(criterion):
    model = tiny_peft()
    layer = model.base_model.model.model.layers[0]
    projections = {
        "q_proj": layer.self_attn.q_proj,
        "k_proj": layer.self_attn.k_proj,
        "v_proj": layer.self_attn.v_proj,
        "o_proj": layer.self_attn.o_proj,
        "gate_proj": layer.mlp.gate_proj,
        "up_proj": layer.mlp.up_proj,
        "down_proj": layer.mlp.down_proj,
    }
    assert layer_scores(projections, criterion, SHAPE) == (None, None)


def test_lora_act_scales_each_input_column_by_its_feature_norm():
    model = tiny_peft()
    module = o_proj(model)
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    norms = torch.rand(64) + 0.5
    assert element_scores(module, "lora-act") is None  # no feature norms: nothing to score with
    torch.testing.assert_close(
        element_scores(module, "lora-act", input_norm=norms), element_scores(module, "lora") * norms
    )
