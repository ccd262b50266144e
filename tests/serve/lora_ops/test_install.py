"""lora_ops.install: vLLM's CPU platform hands out the wrapper the mode asks for, behind the start-up check.

Each test puts back vLLM's ``get_punica_wrapper`` and the install state afterwards, so nothing here
leaks into other tests (``vllm_fixes.apply()``, which install also calls, is the worker's own fix).
"""

from __future__ import annotations

import inspect
import logging

import pytest

from prunedlora.serve.lora_ops import LORA_OPS_ENV
from prunedlora.serve.lora_ops import install as install_mod

pytest.importorskip("vllm")
from vllm.lora.punica_wrapper import punica_cpu, punica_selector  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from prunedlora.serve.lora_ops import check  # noqa: E402
from prunedlora.serve.lora_ops import punica_cpu as rank_aware  # noqa: E402

STOCK_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
cpu_only = pytest.mark.skipif(not current_platform.is_cpu(), reason="the hook is installed on vLLM's CPU platform")


@pytest.fixture
def fresh(monkeypatch):
    """vLLM's platform hook and this module's state as before any install; restored after the test."""
    platform_cls = type(current_platform)
    monkeypatch.setattr(platform_cls, "get_punica_wrapper", inspect.getattr_static(platform_cls, "get_punica_wrapper"))
    monkeypatch.setitem(install_mod._state, "installed", False)
    monkeypatch.setitem(install_mod._state, "check", None)
    monkeypatch.delenv(LORA_OPS_ENV, raising=False)
    return monkeypatch


def test_the_rank_aware_wrapper_passes_the_start_up_check():
    assert check.compare_with_vllm() is None


def test_the_check_sees_a_wrong_kernel(monkeypatch):
    """Break: a linear kernel that drops each slot's last live component -> the check names the op."""
    original = rank_aware.linear

    def drop_last_component(out, x, slots, *args, **kwargs):
        trimmed = []
        for slot in slots:
            if slot is not None:
                a = slot.a.clone()
                a[-1] = 0
                slot = type(slot)(a, slot.b, slot.bounds)
            trimmed.append(slot)
        kwargs["stacked"] = None  # several slots in the batch: the per-slot loop, on the trimmed slots
        return original(out, x, trimmed, *args, **kwargs)

    monkeypatch.setattr(rank_aware, "linear", drop_last_component)
    problem = check.compare_with_vllm()
    assert problem is not None and problem.startswith("add_lora_linear (decode) differs")


@cpu_only
def test_install_points_vllms_platform_at_the_mode_asked_for(fresh):
    assert install_mod.install() == "cpu"
    assert install_mod.install() == "cpu"  # idempotent
    assert current_platform.get_punica_wrapper() == install_mod.RANK_AWARE_WRAPPER  # the default
    wrapper = punica_selector.get_punica_wrapper(64, 8, "cpu")  # what vLLM's LoRA manager calls
    assert type(wrapper) is rank_aware.RankAwarePunicaWrapperCPU
    fresh.setenv(LORA_OPS_ENV, "stock")
    assert current_platform.get_punica_wrapper() == STOCK_WRAPPER
    assert type(punica_selector.get_punica_wrapper(64, 8, "cpu")) is punica_cpu.PunicaWrapperCPU
    fresh.setenv(LORA_OPS_ENV, "rank-aware")
    assert current_platform.get_punica_wrapper() == install_mod.RANK_AWARE_WRAPPER


@cpu_only
def test_a_failing_check_falls_back_to_vllms_ops_with_one_line(fresh, caplog):
    fresh.setattr(install_mod, "self_check", lambda: "add_lora_linear (decode) differs by 1")
    install_mod.install()
    with caplog.at_level(logging.INFO, logger="vllm.prunedlora"):
        assert current_platform.get_punica_wrapper() == STOCK_WRAPPER
        assert current_platform.get_punica_wrapper() == STOCK_WRAPPER
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.prunedlora"]
    assert len(lines) == 1 and "using vLLM's own ops" in lines[0] and "differs by 1" in lines[0]


def test_a_check_that_raises_counts_as_failed(fresh):
    """A vLLM whose wrapper signatures changed raises inside the check: that is a failure, not a crash."""

    def broken():
        raise TypeError("add_lora_linear() got an unexpected keyword argument")

    fresh.setattr(check, "compare_with_vllm", broken)
    assert install_mod.self_check().startswith("TypeError: add_lora_linear()")


def test_an_unknown_mode_means_stock(fresh, caplog):
    fresh.setenv(LORA_OPS_ENV, "fast")
    with caplog.at_level(logging.WARNING, logger="vllm.prunedlora"):
        assert install_mod.requested_mode() == "stock"
    assert "PRUNEDLORA_LORA_OPS='fast'" in caplog.text


def test_other_platforms_keep_vllms_kernels(fresh):
    """On CUDA (or any platform but the CPU) nothing is replaced: vLLM's punica kernels stay."""
    platform_cls = type(current_platform)
    before = inspect.getattr_static(platform_cls, "get_punica_wrapper")
    fresh.setattr(platform_cls, "is_cpu", lambda self=None: False)
    assert install_mod.install() == "not-cpu"
    assert inspect.getattr_static(platform_cls, "get_punica_wrapper") is before


@cpu_only
def test_a_compiled_model_keeps_vllms_ops(fresh, caplog):
    """A single Dynamo trace would freeze the Python-side grouping; vLLM's own ops serve compiled models."""
    from vllm.config import CompilationMode, VllmConfig, set_current_vllm_config

    install_mod.install()
    config = VllmConfig()
    config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE
    with set_current_vllm_config(config), caplog.at_level(logging.WARNING, logger="vllm.prunedlora"):
        assert current_platform.get_punica_wrapper() == STOCK_WRAPPER
    assert "compiles this model" in caplog.text
    config.compilation_config.mode = CompilationMode.NONE
    with set_current_vllm_config(config):
        assert current_platform.get_punica_wrapper() == install_mod.RANK_AWARE_WRAPPER
