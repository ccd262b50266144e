"""``prunedlora eval``: every candidate scored on the same examples, paired with the first; a LoRA
adapter that changes nothing ties the base model exactly; run directories and PEFT folders both load;
bad input is one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prunedlora.bench.evaluate import evaluate, format_table, resolve_adapter, write_results
from prunedlora.bench.scoring import EvalSettings, ScoringError
from prunedlora.cli import main
from prunedlora.tasks import VENDORED_DATA_DIR, DataConfig

EXAMPLES = VENDORED_DATA_DIR / "examples"


def _adapter(model_path, out, seed: int | None):
    """A LoRA adapter on the tiny model: B = 0 (changes nothing) when ``seed`` is None, else random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_path),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    if seed is not None:
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return _adapter(tiny_model_path, folder / "noop", None), _adapter(tiny_model_path, folder / "random", 0)


def test_a_noop_adapter_ties_the_base_and_a_changed_one_is_compared(tiny_model_path, adapters):
    data = DataConfig(path=EXAMPLES / "chat.jsonl", dev_size=0, max_examples=6, max_length=256)
    payload = evaluate(data, list(adapters), model=str(tiny_model_path), settings=EvalSettings(batch_size=4))
    base, noop, changed = (row["result"] for row in payload["rows"])
    assert noop["per_example"] == base["per_example"] and noop["nll"] == base["nll"]
    by_name = {c["name"]: c for c in payload["comparisons"]}
    assert by_name[str(adapters[0])]["difference"] == 0 and by_name[str(adapters[0])]["verdict"] == "tie"
    assert by_name[str(adapters[1])]["difference"] == pytest.approx(changed["nll"] - base["nll"])
    assert "nll per token" in format_table(payload)


def test_classification_and_text_metrics(tiny_model_path, adapters, tmp_path):
    classification = DataConfig(
        path=EXAMPLES / "classification.csv",
        dev_size=0,
        max_examples=8,
        columns={"text": "request", "label": "language"},
    )
    payload = evaluate(classification, [adapters[1]], model=str(tiny_model_path))
    accuracy = payload["rows"][0]["result"]["accuracy"]
    assert 0 <= accuracy <= 1 and payload["comparisons"][0]["metric"] == "accuracy"
    text = DataConfig(path=EXAMPLES / "text.jsonl", dev_size=0, max_examples=3, max_length=64)
    result = evaluate(text, [], model=str(tiny_model_path))["rows"][0]["result"]
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    json_path, md_path = write_results(payload, tmp_path / "out")
    assert json.loads(json_path.read_text())["rows"][0]["result"]["per_example"]["index"] and md_path.is_file()


def test_a_run_directory_resolves_to_its_adapter_and_base(tmp_path, adapters):
    from prunedlora import metadata

    run = tmp_path / "run"
    (run / metadata.RUN_ADAPTER_DIR).mkdir(parents=True)
    for f in adapters[0].iterdir():
        (run / metadata.RUN_ADAPTER_DIR / f.name).write_bytes(f.read_bytes())
    (run / metadata.RUN_RECORD_FILE).write_text(
        json.dumps(
            {
                "base_model": "/models/base",
                "r0": 2,
                "lora_alpha": 4,
                "use_rslora": False,
                "target_modules": ["q_proj"],
                "ranks": {},
                "method": {},
                "training": {},
                "global_step": 1,
            }
        )
    )
    assert resolve_adapter(run) == (run / metadata.RUN_ADAPTER_DIR, "/models/base")
    with pytest.raises(ScoringError, match="neither a PEFT adapter folder"):
        resolve_adapter(tmp_path)


def test_bad_eval_input_is_one_line(tiny_model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where runs/eval/ would be written
    cases = [
        (["eval", str(tmp_path), "--data", str(EXAMPLES / "chat.jsonl")], "neither a PEFT adapter folder"),
        (["eval", "--data", str(EXAMPLES / "chat.jsonl"), "--task", "sst2"], "exactly one of"),
        (
            ["eval", "--data", str(EXAMPLES / "chat.jsonl"), "--answer-regex", "(", "--model", str(tiny_model_path)],
            "not a regular expression",
        ),
        (["eval", "--data", str(tmp_path / "none.jsonl"), "--model", str(tiny_model_path)], "not found"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "runs").exists()
