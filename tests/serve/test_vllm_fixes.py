"""vllm_fixes: the CPU LoRA ops leave tokens without an adapter untouched, and equal vLLM's otherwise.

Every op is checked against a per-token reference written here (slot s: ``scaling * A_s x`` then
``B_s z``; slot -1: nothing), on a batch whose indices mix -1 with every slot, and against a pristine
copy of vLLM's own ops (loaded from vLLM's file, so an earlier ``apply()`` in this process cannot hide
them) as the control that shows the bug. ``apply()`` itself is called on pristine modules.
"""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from prunedlora.serve import vllm_fixes

pytest.importorskip("vllm")  # the serving extra; where it is installed, the imports below must work
from vllm.lora.ops import torch_ops  # noqa: E402  (a hard failure if vLLM moved its CPU ops)
from vllm.lora.ops.torch_ops import lora_ops  # noqa: E402
from vllm.lora.punica_wrapper import punica_cpu  # noqa: E402

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
SLOTS, RANK, HIDDEN, OUT = 3, 4, 8, 6
# decode batch: every slot and two tokens without an adapter (-1), interleaved
INDICES = torch.tensor([0, -1, 2, -1, 1])


def _pristine_vllm_ops():
    """vLLM's CPU LoRA ops as shipped, from a fresh copy of their module (never the patched one)."""
    spec = importlib.util.spec_from_file_location("_pristine_vllm_lora_ops", lora_ops.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fixed_namespace():
    return types.SimpleNamespace(**{name: getattr(vllm_fixes, name) for name in OPS})


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    x = torch.randn(len(INDICES), HIDDEN, generator=g)
    z = torch.randn(len(INDICES), RANK, generator=g)
    return a, b, x, z


def _ref_shrink(a, x, indices, scaling):
    rows = [scaling * a[s, 0] @ x[t] if s >= 0 else torch.zeros(RANK) for t, s in enumerate(indices.tolist())]
    return torch.stack(rows)


def _ref_expand(b, z, base, indices, add_inputs, offset=0):
    y = base.clone()
    for t, s in enumerate(indices.tolist()):
        if s >= 0:
            delta = b[s, 0] @ z[t]
            cols = slice(offset, offset + delta.shape[0])
            y[t, cols] = y[t, cols] + delta if add_inputs else delta
    return y


def _run_all(ops, indices=INDICES, seed=0):
    """Each of the three ops on the same mixed batch: {what: (output, reference)}."""
    a, b, x, z = _case(seed)
    shrink = torch.zeros(len(indices), RANK)
    ops.bgmv_shrink(x, a, shrink, indices, 0.5)
    results = {"shrink": (shrink, _ref_shrink(a, x, indices, 0.5))}
    base = torch.randn(len(indices), OUT + 4, generator=torch.Generator().manual_seed(seed + 100))
    for add in (True, False):
        y = base[:, :OUT].clone()
        ops.bgmv_expand(z, b, y, indices, add)
        results[f"expand add={add}"] = (y, _ref_expand(b, z, base[:, :OUT], indices, add))
        y = base.clone()
        ops.bgmv_expand_slice(z, b, y, indices, 3, OUT, add)
        results[f"expand_slice add={add}"] = (y, _ref_expand(b, z, base, indices, add, offset=3))
    return results


def test_the_batch_is_mixed_and_the_last_slot_would_show():
    """The test batch holds tokens of every slot and of none; slot -1 (the last) changes a token if applied."""
    assert set(INDICES.tolist()) == {-1, *range(SLOTS)}
    a, b, x, _ = _case()
    assert torch.all((a[-1, 0] @ x[1]).abs() > 0)  # what the bug would add is non-zero


def test_fixed_ops_equal_the_per_token_reference():
    """Break: drop the masked_fill in any fixed op (slot -1 applied) or the slice offset -> red."""
    for what, (got, expected) in _run_all(_fixed_namespace()).items():
        torch.testing.assert_close(got, expected, msg=what)


def test_control_vllm_ops_as_shipped_apply_the_last_slot_to_minus_one_tokens():
    """The bug the fix exists for, on vLLM's own ops: rows of index -1 get slot -1 = the last slot.

    If this fails, vLLM fixed its ops: apply() leaves them alone (see test_apply_leaves_fixed_ops_alone)
    and vllm_fixes can go. Valid rows equal the reference, so the fix changes nothing else.
    """
    pristine = _pristine_vllm_ops()
    assert not vllm_fixes.ops_skip_no_lora_tokens(pristine)
    as_last = INDICES.clone()
    as_last[INDICES < 0] = SLOTS - 1
    valid = INDICES >= 0
    buggy, fixed = _run_all(pristine), _run_all(_fixed_namespace())
    for what, (got, expected) in buggy.items():
        torch.testing.assert_close(got[valid], expected[valid], msg=what)
        assert not torch.allclose(got[~valid], expected[~valid]), what  # the bug is visible
        torch.testing.assert_close(got[valid], fixed[what][0][valid], msg=what)
    # and exactly what the last slot gives
    for what, (got, expected) in _run_all(pristine, indices=as_last).items():
        torch.testing.assert_close(buggy[what][0], got, msg=what)


def test_detector_tells_buggy_from_fixed_ops():
    assert vllm_fixes.ops_skip_no_lora_tokens(_fixed_namespace())
    assert not vllm_fixes.ops_skip_no_lora_tokens(_pristine_vllm_ops())


@pytest.fixture
def pristine_modules(monkeypatch):
    """lora_ops, torch_ops and punica_cpu holding vLLM's shipped ops, apply() not yet run; restored after."""
    pristine = _pristine_vllm_ops()
    for module in (lora_ops, torch_ops, punica_cpu):
        for name in OPS:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(pristine, name))
    # sgmv_* resolve bgmv_* in lora_ops' globals, so lora_ops must hold the pristine names too
    monkeypatch.setattr(vllm_fixes, "_applied", False)
    return pristine


def _sgmv_all(ops_module, seed=3):
    """vLLM's prefill ops: two sequences, 3 tokens without an adapter then 2 of slot 1, then 1 of slot 2."""
    a, b, _, _ = _case(seed)
    g = torch.Generator().manual_seed(seed)
    x, z = torch.randn(6, HIDDEN, generator=g), torch.randn(6, RANK, generator=g)
    base = torch.randn(6, OUT + 4, generator=g)
    start, lens, idx = torch.tensor([0, 3, 5]), torch.tensor([3, 2, 1]), torch.tensor([-1, 1, 2])
    per_token = torch.repeat_interleave(idx, lens)
    out = {}
    shrink = torch.zeros(6, RANK)
    ops_module.sgmv_shrink(x, a, shrink, start, lens, idx, 3, 3, 6, 0.5)
    out["sgmv_shrink"] = (shrink, _ref_shrink(a, x, per_token, 0.5))
    y = base[:, :OUT].clone()
    ops_module.sgmv_expand(z, b, y, start, lens, idx, 3, 3, 6, True)
    out["sgmv_expand"] = (y, _ref_expand(b, z, base[:, :OUT], per_token, True))
    y = base.clone()
    ops_module.sgmv_expand_slice(z, b, y, start, lens, idx, 3, 3, 6, 2, OUT, True)
    out["sgmv_expand_slice"] = (y, _ref_expand(b, z, base, per_token, True, offset=2))
    return out


def test_apply_patches_every_op_where_vllm_looks_it_up(pristine_modules):
    """Break: leave out punica_cpu (or lora_ops) from apply()'s modules, or bgmv_expand_slice from its
    table -> the identity checks and the decode/prefill results below go red."""
    # control: before apply(), the prefill path through vLLM's modules shows the bug
    before = _sgmv_all(lora_ops)
    assert not torch.allclose(before["sgmv_shrink"][0][:3], torch.zeros(3, RANK))
    assert vllm_fixes.apply() is True
    assert vllm_fixes.apply() is True  # idempotent
    for module in (lora_ops, torch_ops, punica_cpu):
        for name in OPS:
            assert getattr(module, name) is getattr(vllm_fixes, name), f"{module.__name__}.{name}"
    assert vllm_fixes.ops_skip_no_lora_tokens(lora_ops)
    # decode (punica_cpu's bgmv names) and prefill (sgmv_* -> lora_ops' bgmv names) on mixed batches
    for what, (got, expected) in _run_all(punica_cpu).items():
        torch.testing.assert_close(got, expected, msg=what)
    for what, (got, expected) in _sgmv_all(punica_cpu).items():
        torch.testing.assert_close(got, expected, msg=what)


def test_apply_leaves_fixed_ops_alone(pristine_modules, monkeypatch):
    """A vLLM whose ops already skip -1 tokens is not patched (mutation: such ops stand in for vLLM's)."""
    replacement = {name: (lambda *a, _f=getattr(vllm_fixes, name), **k: _f(*a, **k)) for name in OPS}
    for name, function in replacement.items():
        monkeypatch.setattr(lora_ops, name, function)
    assert vllm_fixes.apply() is False
    assert vllm_fixes._applied is False
    for name, function in replacement.items():
        assert getattr(lora_ops, name) is function
        assert getattr(punica_cpu, name) is getattr(pristine_modules, name)
