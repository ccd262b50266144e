"""`prunedlora serve` / `prunedlora adapters`: refusals before anything starts, and a real run stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunedlora.cli import main as cli_main
from prunedlora.serve.http import free_port, http_json
from tests.serve.helpers import alive, live_vllm_children, make_adapter


@pytest.fixture(scope="module")
def two_adapters(vllm_tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-adapters")
    return {
        "small": make_adapter(vllm_tiny_model_path, root / "small", r=2, seed=1),
        "wide": make_adapter(vllm_tiny_model_path, root / "wide", r=12, target_modules=["q_proj", "down_proj"], seed=2),
    }


def test_dry_run_prints_choice_and_command(vllm_tiny_model_path, two_adapters, capsys):
    args = ["serve", "--model", str(vllm_tiny_model_path), "--dry-run", "--port", "8123"]
    args += [f"--adapter={name}={path}" for name, path in two_adapters.items()]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "max_lora_rank=16 (chosen; widest: adapter 'wide'" in out
    assert "% zero rows" in out
    command = out.strip().splitlines()[-1]
    assert "--enable-lora" in command and "--max-lora-rank 16" in command and "--host 127.0.0.1" in command
    assert f"small={two_adapters['small'].resolve()}" in command
    assert "--worker-extension-cls prunedlora.serve.vllm_worker.PrunedLoraWorkerExtension" in command
    assert "\ncpu: " in out and " -> dtype " in out and "threads: " in out  # the CPU choice, one line
    assert "--dtype auto" not in command  # resolved from the CPU
    assert "PRUNEDLORA_LORA_OPS=rank-aware " in command  # the LoRA ops the workers install (default)
    assert cli_main([*args, "--lora-ops", "stock"]) == 0
    assert "PRUNEDLORA_LORA_OPS=stock " in capsys.readouterr().out


def test_adapters_dir(vllm_tiny_model_path, two_adapters, capsys):
    root = two_adapters["small"].parent
    assert cli_main(["serve", "--model", str(vllm_tiny_model_path), "--adapters-dir", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "'wide'" in out and "small=" in out


def test_forced_slot_too_small_is_refused_before_start(vllm_tiny_model_path, two_adapters, capsys):
    args = ["serve", "--model", str(vllm_tiny_model_path), "--max-lora-rank", "8"]
    args += [f"--adapter={name}={path}" for name, path in two_adapters.items()]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunedlora serve: error: --max-lora-rank 8 is smaller than adapter 'wide'")
    assert "rank 12" in err and "--max-lora-rank 16" in err and "\n" not in err


def test_broken_adapter_is_refused_before_start(vllm_tiny_model_path, two_adapters, tmp_path, capsys):
    dora = make_adapter(vllm_tiny_model_path, tmp_path / "dora", use_dora=True)
    capsys.readouterr()
    args = ["serve", "--model", str(vllm_tiny_model_path), "--adapter", f"good={two_adapters['small']}"]
    assert cli_main([*args, "--adapter", f"d={dora}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunedlora serve: error: adapter 'd'") and "DoRA" in err and "\n" not in err


def test_bad_names_and_duplicates(vllm_tiny_model_path, two_adapters, capsys):
    small = two_adapters["small"]
    model = ["serve", "--model", str(vllm_tiny_model_path), "--dry-run"]
    assert cli_main([*model, "--adapter", f"a={small}", "--adapter", f"a={small}"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert cli_main([*model, "--adapter", f"{vllm_tiny_model_path.name}={small}"]) == 2
    assert "served name" in capsys.readouterr().err


def test_adapters_add_without_server(two_adapters, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["adapters", "add", "x", str(two_adapters["small"]), "--url", url]) == 2
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_runs_until_sigterm_and_leaves_nothing(vllm_tiny_model_path, two_adapters, tmp_path):
    import psutil

    port = free_port()
    log = tmp_path / "vllm.log"
    cmd = [sys.executable, "-m", "prunedlora.cli", "serve", "--model", str(vllm_tiny_model_path), "--port", str(port)]
    cmd += ["--adapter", f"small={two_adapters['small']}", "--max-model-len", "128", "--quiet", "--log-file", str(log)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree: set[int] = {process.pid}
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            tree.update(p.pid for p in psutil.Process(process.pid).children(recursive=True))
            try:
                if http_json(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the server did not become ready")
        tree.update(p.pid for p in psutil.Process(process.pid).children(recursive=True))
        status, body = http_json(
            url + "/v1/completions", {"model": "small", "prompt": "Hi", "max_tokens": 3, "temperature": 0}, timeout=300
        )
        assert status == 200, body
        assert len(tree) >= 4  # prunedlora, vLLM API server, engine core, worker
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    out = process.stdout.read()
    assert "max_lora_rank=8" in out and "stopping vLLM" in out
    assert alive(tree) == []
    text = log.read_text()
    assert "--enable-lora" in text.splitlines()[0] and "prunedlora: patched vLLM's CPU LoRA ops" in text
    assert os.path.getsize(log) > 1000


def _hf_chat_answer(base, adapter, question, max_tokens):
    """HF (+PEFT) greedy reply to one user message through the tokenizer's chat template, stopping at
    EOS as vLLM does; with the smallest top-1/top-2 logit gap on the way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    generated, margin = [], float("inf")
    with torch.no_grad():
        for _ in range(max_tokens):
            top = torch.topk(model(input_ids=ids).logits[0, -1], 2)
            margin = min(margin, float(top.values[0] - top.values[1]))
            token = int(top.indices[0])
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(generated, skip_special_tokens=True), margin


@pytest.mark.slow
def test_serve_and_ask_answers_each_model_then_stops(vllm_tiny_model_path, two_adapters, tmp_path, capsys):
    """The demo's serving step: one question per model (the base included), answers printed, server gone."""
    from prunedlora.serve.cli import serve_and_ask
    from prunedlora.serve.config import ServeConfig

    earlier = {p.pid for p in live_vllm_children()}  # engines of other tests may still be shutting down
    config = ServeConfig(
        model=vllm_tiny_model_path,
        adapters=two_adapters,
        port=0,
        dtype="float32",
        max_model_len=256,
        log_file=tmp_path / "vllm.log",
        echo=False,
    )
    answers = serve_and_ask(config, {"base": "Say hi.", "small": "Name a color.", "wide": "Count to 3."}, max_tokens=5)
    assert set(answers) == {vllm_tiny_model_path.name, "small", "wide"}
    # Each answer is what HF (+PEFT) answers greedily through the same chat template (float32 both).
    # Break: the wrong adapter for a name, or an adapter applied to the base's request -> red.
    expected = {
        vllm_tiny_model_path.name: _hf_chat_answer(vllm_tiny_model_path, None, "Say hi.", 5),
        "small": _hf_chat_answer(vllm_tiny_model_path, two_adapters["small"], "Name a color.", 5),
        "wide": _hf_chat_answer(vllm_tiny_model_path, two_adapters["wide"], "Count to 3.", 5),
    }
    assert min(margin for _, margin in expected.values()) > 1e-3  # no near tie that float noise could flip
    assert answers == {name: text for name, (text, _) in expected.items()}
    assert len(set(answers.values())) == 3  # the three models answer differently, so the check can tell them apart
    out = capsys.readouterr().out
    assert "max_lora_rank=16" in out and "[small] Name a color." in out and out.rstrip().endswith("server stopped")
    leftovers = [p.pid for p in live_vllm_children() if p.pid not in earlier]
    assert alive(leftovers) == []
