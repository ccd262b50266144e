"""The tensor-level rules of compaction, checked against direct computation of B @ A."""

from __future__ import annotations

import math
import re

import pytest
import torch

from prunedlora.export.compact import (
    ModuleFactors,
    adalora_module,
    compact_module,
    lora_scaling,
    pad_module,
    pattern_key,
    svd_truncate,
)
from prunedlora.export.errors import ExportError
from prunedlora.vllm_compat import PATTERN_MATCH


def _factors(rank=6, d_in=10, d_out=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, d_in, generator=g, dtype=dtype), torch.randn(d_out, rank, generator=g, dtype=dtype)


def _delta(A, B, scaling=1.0):
    return (B.double() @ A.double()) * scaling


def test_compact_keeps_live_components_in_order_and_folds_scaling():
    A, B = _factors()
    keep = torch.tensor([True, False, True, True, False, True])
    A[~keep] = 0
    B[:, ~keep] = 0
    out = compact_module("m", A, B, keep, scaling=2.5)
    assert out.rank == 4
    assert torch.equal(out.A, A[keep])  # original order, A untouched
    assert torch.allclose(out.B.double(), B[:, keep].double() * 2.5)
    assert torch.allclose(_delta(out.A, out.B), _delta(A, B, 2.5), atol=1e-6)


def test_compact_returns_none_for_a_module_pruned_to_zero():
    A, B = _factors()
    A.zero_()
    B.zero_()
    assert compact_module("m", A, B, torch.zeros(6, dtype=torch.bool), 1.0) is None


def test_compact_without_mask_keeps_everything():
    A, B = _factors()
    out = compact_module("m", A, B, None, 0.5)
    assert out.rank == 6
    assert torch.allclose(_delta(out.A, out.B), _delta(A, B, 0.5), atol=1e-6)


def test_component_marked_pruned_but_alive_is_refused():
    A, B = _factors()
    keep = torch.tensor([True, False, True, True, True, True])
    with pytest.raises(ExportError, match=r"masks do not match the adapter.*component\(s\) \[1\]"):
        compact_module("layers.0.q_proj", A, B, keep, 1.0)


def test_pruned_component_with_only_one_zero_factor_contributes_nothing_and_is_accepted():
    A, B = _factors()
    keep = torch.tensor([True, False, True, True, True, True])
    B[:, 1] = 0  # A row 1 stays nonzero: B A is unchanged by dropping it
    out = compact_module("m", A, B, keep, 1.0)
    assert torch.allclose(_delta(out.A, out.B), _delta(A, B), atol=1e-6)


def test_mask_of_wrong_length_is_refused():
    A, B = _factors()
    with pytest.raises(ExportError, match="rank 6 but its mask has 5 entries"):
        compact_module("m", A, B, torch.ones(5, dtype=torch.bool), 1.0)


def test_inconsistent_factor_shapes_are_refused():
    A, _ = _factors(rank=6)
    _, B = _factors(rank=5)
    with pytest.raises(ExportError, match="inconsistent"):
        compact_module("m", A, B, None, 1.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scaling_matches_peft(rslora):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)),
        LoraConfig(r=4, lora_alpha=12, use_rslora=rslora, target_modules=["0"]),
    )
    layer = model.base_model.model[0]
    assert lora_scaling(4, 12, rslora) == pytest.approx(layer.scaling["default"])
    assert lora_scaling(4, 12, rslora) == (12 / math.sqrt(4) if rslora else 3.0)


def test_pad_adds_zero_components_up_to_a_multiple():
    A, B = _factors(rank=5)
    padded = pad_module(ModuleFactors(A, B), 8)
    assert padded.rank == 8
    assert torch.equal(padded.A[:5], A) and torch.equal(padded.B[:, :5], B)
    assert not padded.A[5:].any() and not padded.B[:, 5:].any()
    assert torch.equal(_delta(padded.A, padded.B), _delta(A, B))
    assert pad_module(ModuleFactors(A, B), 5).rank == 5
    assert pad_module(ModuleFactors(A, B), 1).rank == 5


def test_svd_truncate_is_the_best_low_rank_approximation():
    A, B = _factors(rank=6, d_in=12, d_out=9)
    full = _delta(A, B)
    out, rel = svd_truncate(ModuleFactors(A, B), 3)
    assert out.rank == 3 and out.A.dtype == A.dtype
    s = torch.linalg.svdvals(full)
    expected_rel = math.sqrt(float(s[3:].square().sum() / s.square().sum()))
    assert rel == pytest.approx(expected_rel, rel=1e-6)
    err = torch.linalg.norm(full - _delta(out.A, out.B)) / torch.linalg.norm(full)
    assert float(err) == pytest.approx(expected_rel, rel=1e-4)


def test_svd_truncate_of_a_low_rank_product_is_exact():
    A, B = _factors(rank=6)
    A[3:] = A[:3] * 2  # rank 3 product stored at rank 6
    out, rel = svd_truncate(ModuleFactors(A, B), 3)
    assert rel < 1e-6
    assert torch.allclose(_delta(out.A, out.B), _delta(A, B), atol=1e-4)


def test_svd_truncate_leaves_small_modules_alone():
    A, B = _factors(rank=3)
    f = ModuleFactors(A, B)
    out, rel = svd_truncate(f, 4)
    assert out is f and rel == 0.0


def test_adalora_triplets_become_plain_factors():
    A, B = _factors(rank=4)
    E = torch.tensor([[0.5], [0.0], [2.0], [-1.0]])
    keep = torch.tensor([True, True, False, True])
    out = adalora_module("m", A, E, B, keep, scaling=8.0, ranknum=4.0)
    assert out.rank == 2  # triplet 1 has E == 0, triplet 2 is not kept
    masked = keep & (E.flatten() != 0)
    expected = (B[:, masked].double() @ (A[masked].double() * E[masked].double())) * 8.0 / (4.0 + 1e-5)
    assert torch.allclose(_delta(out.A, out.B), expected, atol=1e-6)


def _peft_match(key: str, name: str) -> bool:
    from peft.utils.other import get_pattern_key

    return get_pattern_key([key], name) == key


@pytest.mark.parametrize(
    "name, other",
    [
        ("model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"),
        ("model.layers.1.self_attn.q_proj", "language_model.model.layers.1.self_attn.q_proj"),
        ("model.layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj_x"),
        ("model.layers.1.mlp.up_proj", "model.layers.1Xmlp.up_proj"),
    ],
)
def test_pattern_keys_match_exactly_one_module_in_peft_and_vllm(name, other):
    key = pattern_key(name)
    assert _peft_match(key, name) and not _peft_match(key, other)
    vllm_rule = lambda n: re.match(PATTERN_MATCH.format(key=key), n) is not None  # noqa: E731
    assert vllm_rule(name) and not vllm_rule(other)


def test_half_precision_factors_are_written_in_float32():
    A, B = _factors(dtype=torch.bfloat16)
    out = compact_module("m", A, B, None, 0.3)
    assert out.A.dtype == out.B.dtype == torch.float32
    assert torch.allclose(_delta(out.A, out.B), _delta(A, B, 0.3), atol=1e-6)
