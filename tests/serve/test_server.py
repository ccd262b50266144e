"""One real vLLM server (127.0.0.1, CPU) with a base model and three adapters of different rank patterns.

Answers are compared token for token with HF+PEFT greedy decoding; broken adapters are refused before
vLLM sees them while the others keep answering; stopping the server leaves no process behind.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prunedlora.cli import main as cli_main
from prunedlora.serve.config import ServeConfig
from prunedlora.serve.http import http_json
from prunedlora.serve.record import serve_record_path
from prunedlora.serve.runtime import RuntimeAdapterError, add_adapter, list_adapters, remove_adapter
from prunedlora.serve.server import VllmServer
from prunedlora.serve.validate import AdapterValidationError
from tests.serve.helpers import alive, fold_scaling_like_export, hf_greedy, make_adapter

pytestmark = pytest.mark.slow

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Hello, my name is", "The capital of France is", "def add(a, b):", "1 2 3 4"]
MAX_TOKENS = 10
BASE_NAME = "tiny-base"


@pytest.fixture(scope="module")
def base(vllm_tiny_model_path) -> Path:
    return vllm_tiny_model_path


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    """A uniform-rank PEFT adapter, one with rank_pattern/alpha_pattern, and one in export's layout."""
    root = tmp_path_factory.mktemp("adapters")
    exported = make_adapter(
        base,
        root / "exported",
        r=6,
        lora_alpha=12,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"layers.0.self_attn.k_proj": 1, "v_proj": 3},
        use_rslora=True,
        seed=3,
    )
    return {
        "uniform": make_adapter(base, root / "uniform", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
        "patterned": make_adapter(
            base,
            root / "patterned",
            r=8,
            lora_alpha=16,
            target_modules=ALL,
            rank_pattern={"o_proj": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"down_proj": 4.0},
            seed=2,
        ),
        "exported": fold_scaling_like_export(exported),
    }


@pytest.fixture(scope="module")
def server(base, adapters, tmp_path_factory):
    config = ServeConfig(
        model=base,
        adapters=adapters,
        port=0,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=16,
        served_model_name=BASE_NAME,
        log_file=tmp_path_factory.mktemp("logs") / "vllm.log",
        echo=False,
    )
    with VllmServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def references(base, adapters) -> dict[str, list[list[int]]]:
    """HF+PEFT greedy token ids per model name (the base and each adapter) for PROMPTS."""
    refs = {}
    for name, path in [(BASE_NAME, None), *adapters.items()]:
        tokens, margin = hf_greedy(base, path, PROMPTS, MAX_TOKENS)
        assert margin > 1e-3, f"{name}: a near tie in the reference ({margin}); parity would be luck"
        refs[name] = tokens
    return refs


def complete(url: str, model: str, prompt: str) -> tuple[int, object]:
    return http_json(
        url + "/v1/completions",
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=300,
    )


def completion_ids(url: str, model: str, prompt: str) -> list[int]:
    status, body = complete(url, model, prompt)
    assert status == 200, body
    return list(body["choices"][0]["token_ids"])


def test_slots_chosen_from_adapters(server):
    assert server.plan.max_lora_rank == 8  # widest module rank 8 -> slot 8
    assert server.plan.max_loras == 3 and server.plan.max_cpu_loras == 3
    assert server.plan.adapter_padding["patterned"] < server.plan.adapter_padding["uniform"]


def test_models_lists_base_and_adapters(server, adapters):
    status, body = http_json(server.url + "/v1/models")
    assert status == 200
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {BASE_NAME, *adapters}
    assert cards[BASE_NAME]["parent"] is None
    for name, path in adapters.items():
        assert cards[name]["parent"] == BASE_NAME
        assert Path(cards[name]["root"]).resolve() == path.resolve()
    assert sorted(list_adapters(server.url)) == sorted(adapters)


def test_concurrent_mixed_batch_equals_hf_peft_greedy(server, references):
    jobs = [(model, i) for model in references for i in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda job: completion_ids(server.url, job[0], PROMPTS[job[1]]), jobs))
    for (model, i), ids in zip(jobs, answers):
        assert ids == references[model][i], f"{model} on {PROMPTS[i]!r}"
    # The adapters really change the answers, so the comparison could tell them apart.
    for name in references:
        if name != BASE_NAME:
            assert references[name] != references[BASE_NAME]


def test_runtime_add_use_remove(server, base, tmp_path):
    late = make_adapter(base, tmp_path / "late", r=2, lora_alpha=2, target_modules=["gate_proj", "up_proj"], seed=7)
    expected, _ = hf_greedy(base, late, PROMPTS[:1], MAX_TOKENS)
    info = add_adapter("late", late, server.url)
    assert info.max_rank == 2
    assert "late" in list_adapters(server.url)
    assert completion_ids(server.url, "late", PROMPTS[0]) == expected[0]
    remove_adapter("late", server.url)
    assert "late" not in list_adapters(server.url)
    status, body = complete(server.url, "late", PROMPTS[0])
    assert status == 404, body
    with pytest.raises(RuntimeAdapterError, match="cannot be found"):
        remove_adapter("late", server.url)


def test_adapter_written_by_prunedlora_export(server, base, tmp_path):
    """The export stage's real output (anchored per-module patterns, scaling folded into B, an
    AdapterRecord) is validated, added at runtime and answers like HF+PEFT."""
    from prunedlora.export import exporter as export  # an import error is a failure, not a skip

    source = make_adapter(
        base,
        tmp_path / "src",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 3},
        seed=9,
    )
    out = export.export_adapter(source, tmp_path / "exported", base_model=str(base)).out_dir
    expected, _ = hf_greedy(base, out, PROMPTS[:2], MAX_TOKENS)
    info = add_adapter("from-export", out, server.url)
    assert info.record is not None and sorted(set(info.ranks.values())) == [3, 8]
    try:
        for i in range(2):
            assert completion_ids(server.url, "from-export", PROMPTS[i]) == expected[i]
    finally:
        remove_adapter("from-export", server.url)


def _broken(kind: str, base: Path, other_base: Path, good: Path, tmp_path: Path) -> Path:
    if kind == "truncated":
        path = tmp_path / "truncated"
        shutil.copytree(good, path)
        weights = path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
        return path
    if kind == "wrong_shapes":
        return make_adapter(other_base, tmp_path / "wrong_shapes")
    if kind == "rank_above_slot":
        return make_adapter(base, tmp_path / "wide", r=16, target_modules=["q_proj"])
    if kind == "dora":
        return make_adapter(base, tmp_path / "dora", use_dora=True)
    if kind == "pickled_bin":
        return make_adapter(base, tmp_path / "pickled", safe_serialization=False)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "is truncated"),
        ("wrong_shapes", "belongs to another base model"),
        ("rank_above_slot", "above the server's max_lora_rank 8; restart the server with --max-lora-rank 16"),
        ("dora", "uses DoRA"),
        ("pickled_bin", "ships a pickled adapter_model.bin"),
    ],
)
def test_broken_adapter_refused_others_still_answer(
    server, base, other_tiny_model_path, adapters, references, tmp_path, kind, message
):
    broken = _broken(kind, base, other_tiny_model_path, adapters["uniform"], tmp_path)
    with pytest.raises(AdapterValidationError, match=message):
        add_adapter("broken", broken, server.url)
    assert "broken" not in list_adapters(server.url)
    for name in ("patterned", BASE_NAME):
        assert completion_ids(server.url, name, PROMPTS[1]) == references[name][1]


def test_cli_adapters_commands(server, base, adapters, tmp_path, capsys):
    dora = make_adapter(base, tmp_path / "dora", use_dora=True)
    capsys.readouterr()
    assert cli_main(["adapters", "add", "cli-dora", str(dora), "--url", server.url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunedlora adapters: error: adapter 'cli-dora'") and "DoRA" in err and "\n" not in err

    assert cli_main(["adapters", "add", "cli-copy", str(adapters["uniform"]), "--url", server.url]) == 0
    assert cli_main(["adapters", "list", "--url", server.url]) == 0
    assert "cli-copy" in capsys.readouterr().out.split()
    assert completion_ids(server.url, "cli-copy", PROMPTS[2]) == completion_ids(server.url, "uniform", PROMPTS[2])
    assert cli_main(["adapters", "remove", "cli-copy", "--url", server.url]) == 0
    assert "cli-copy" not in list_adapters(server.url)


def test_shutdown_leaves_no_process(server):
    """Runs last in this module: stop the shared server and check its whole process tree is gone."""
    import psutil

    tree = [server.process.pid, *(p.pid for p in psutil.Process(server.process.pid).children(recursive=True))]
    assert len(tree) >= 3  # API server, engine core, worker
    record = serve_record_path(server.host, server.port)
    assert record.is_file()
    server.stop()
    assert not server.running
    assert alive(tree) == []
    assert not record.exists()
    with pytest.raises(OSError):
        http_json(server.url + "/health", timeout=2)
