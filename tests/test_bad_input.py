"""Bad input never shows a traceback: a corpus of broken inputs run through the real command line.

Every case goes through ``prunedlora.cli.main`` (the function the console script calls; two cases run
the console script itself) and must give exit status 2, exactly one line on stderr that names the
file or the key, no traceback, and leave the working folder as it was (no run directory, no export,
the old output untouched). No case trains or starts vLLM: each error comes before that. The corpus
data lives in ``tests/corpus`` (see its README); run directories and adapters are damaged copies of
good ones made with the builders the export and serve tests use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from prunedlora.cli import main

CORPUS = Path(__file__).parent / "corpus"
RECIPES = sorted((CORPUS / "recipes").glob("*.yaml"))


# -- the contract -----------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and mtime: what 'nothing written' compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def refused(argv: list[str], capsys, names: str | tuple[str, ...], cwd: Path) -> str:
    """Run the command in ``cwd``; assert exit 2, one stderr line naming one of ``names``, nothing written."""
    before = snapshot(cwd)
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{argv[0]} {argv[1]}: exit {code}; stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    names = (names,) if isinstance(names, str) else names
    assert any(str(name) in lines[0] for name in names), f"{lines[0]!r} names none of {names}"
    assert snapshot(cwd) == before, "the failed command wrote or changed files"
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working folder for one case: the command runs there, so anything it writes shows up."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def write_recipe(folder: Path, raw: dict | str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def good_recipe(model: str | Path = "default", **data) -> dict:
    return {
        "model": str(model),
        "data": {"task": "sst2", "max_examples": 8, "max_length": 64, **data},
        "method": {
            "r0": 4,
            "lora_alpha": 8,
            "target_rank": 2,
            "prune_start_step": 1,
            "prune_end_step": 2,
            "prune_every": 1,
        },
        "training": {"output_dir": "run", "max_steps": 3, "per_device_train_batch_size": 2},
    }


# -- recipes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_broken_recipe_files(path, work, capsys):
    expect = path.read_text(errors="replace").splitlines()[0].removeprefix("# expect: ")
    line = refused(["train", "--config", path], capsys, str(path), work)
    assert expect in line


def test_the_issue_recipes_give_one_line(work, capsys):
    bad_yaml = write_recipe(work, "model: default\n data: [\n", "a.yaml")
    assert "not valid YAML (line 2" in refused(["train", "--config", bad_yaml], capsys, "a.yaml", work)
    no_task = write_recipe(work, {"model": "default", "data": {"max_length": 64}}, "b.yaml")
    assert "data.path" in refused(["train", "--config", no_task], capsys, "b.yaml", work)


def test_recipe_that_is_not_text(work, capsys):
    path = work / "garbage.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    refused(["train", "--config", path], capsys, "garbage.yaml", work)
    refused(["train", "--config", work / "missing.yaml"], capsys, "missing.yaml", work)


# A value of the wrong type for every key of every section, and one out of range where a range exists.
WRONG_TYPE = {"int": "abc", "float": "fast", "bool": "yes please", "str": [1], "list[str]": 5}
OUT_OF_RANGE = {
    "method": {
        "r0": 0,
        "lora_alpha": 0,
        "lora_dropout": 1.0,
        "target_modules": [],
        "target_rank": 100,
        "min_rank": -1,
        "max_rank": 64,
        "prune_start_step": -1,
        "prune_end_step": 0,
        "prune_every": 0,
        "schedule": "linear",
        "components_per_event": 0,
        "allocation": "local",
        "criterion": "random",
        "recovery": "sometimes",
        "hessian_damping": 0,
    },
    "training": {
        "output_dir": " ",
        "max_steps": 0,
        "per_device_train_batch_size": 0,
        "gradient_accumulation_steps": 0,
        "learning_rate": 0,
        "weight_decay": -1,
        "warmup_steps": -1,
        "lr_scheduler_type": "fast",
        "max_grad_norm": -1,
        "logging_steps": 0,
        "save_steps": 0,
        "save_total_limit": 0,
        "seed": -1,
        "dtype": "int8",
    },
    "data": {"task": "sst5", "split": "test", "max_examples": 0, "max_length": 1, "dev_size": -1},
}


def _section_fields():
    from dataclasses import fields

    from prunedlora.rank.config import PrunedLoraConfig
    from prunedlora.tasks import DataConfig
    from prunedlora.train.recipe import TrainingOptions

    for section, cls in (("method", PrunedLoraConfig), ("training", TrainingOptions), ("data", DataConfig)):
        for f in fields(cls):
            base = f.type.split("|")[0].strip()
            yield section, f.name, WRONG_TYPE.get(base, [1])


TYPE_CASES = list(_section_fields())
RANGE_CASES = [(section, key, value) for section, values in OUT_OF_RANGE.items() for key, value in values.items()]


@pytest.mark.parametrize("section, key, value", TYPE_CASES, ids=[f"{s}.{k}" for s, k, _ in TYPE_CASES])
def test_wrong_type_in_recipe_file(section, key, value, work, capsys):
    raw = good_recipe()
    raw[section][key] = value
    line = refused(["train", "--config", write_recipe(work, raw)], capsys, "recipe.yaml", work)
    assert key in line and section in line


@pytest.mark.parametrize("section, key, value", RANGE_CASES, ids=[f"{s}.{k}" for s, k, _ in RANGE_CASES])
def test_out_of_range_as_override(section, key, value, work, capsys):
    recipe = write_recipe(work, good_recipe())
    line = refused(["train", "--config", recipe, f"--{section}.{key}", json.dumps(value)], capsys, key, work)
    assert "recipe.yaml" in line


def test_range_table_names_real_keys():
    # a misspelt key in the table would be refused as unknown, not by the range check it is meant for
    known = {(s, k) for s, k, _ in TYPE_CASES}
    assert {(s, k) for s, k, _ in RANGE_CASES} <= known


@pytest.mark.parametrize(
    "override, names",
    [
        (["--training.max_steps", "["], "--training.max_steps"),
        (["--method.target_modules", "{q_proj"], "--method.target_modules"),
        (["--training.epochs", "3"], "epochs"),
        (["--num_epochs", "3"], "--num_epochs"),
        (["--optimizer.lr", "1"], "optimizer"),
        (["--model.name", "x"], "--model.name"),
        (["--method.r0.value", "8"], "--method.r0.value"),
        (["--training.max_steps"], "--training.max_steps"),
        (["max_steps", "3"], "max_steps"),
        (["--prune", "maybe"], "prune"),
        (["--model", "[1, 2]"], "model"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_overrides_that_do_not_parse_or_name_nothing(override, names, work, capsys):
    recipe = write_recipe(work, good_recipe())
    refused(["train", "--config", recipe, *override], capsys, names, work)


def test_cross_section_check_before_anything_is_written(work, capsys):
    recipe = write_recipe(work, good_recipe())
    refused(["train", "--config", recipe, "--method.prune_end_step", "5"], capsys, "prune_end_step", work)
    refused(["train", "--config", recipe, "--model", str(work / "no-such-model")], capsys, "no-such-model", work)


# -- data files -------------------------------------------------------------------------------------

DATA_CASES = {
    "empty_sst2.tsv": "is empty",
    "wrong_columns_sst2.tsv": "lacks column(s) sentence",
    "ragged_sst2.tsv": "tab-separated fields",
    "label_sst2.tsv": "has label '7'",
    "label_rte.tsv": "has label 'yes'",
    "wrong_keys_gsm8k.jsonl": "lacks column(s) question, answer",
    "not_json_gsm8k.jsonl": "is not a JSON line",
    "no_marker_gsm8k.jsonl": "#### N",
    "object_codealpaca.json": "expected a list of objects",
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_broken_data_files(name, tiny_model_path, work, capsys):
    path = CORPUS / "data" / name
    task = path.stem.rsplit("_", 1)[1]
    recipe = write_recipe(work, good_recipe(tiny_model_path, task=task, path=str(path)))
    assert DATA_CASES[name] in refused(["train", "--config", recipe], capsys, name, work)


# file -> (data options, a piece of the one-line error): your own data in the formats
OWN_DATA_CASES = {
    "ok_then_bad_roles.jsonl": ({"format": "chat"}, ":2: roles must alternate user, assistant"),
    "no_assistant.jsonl": ({"format": "chat"}, "no assistant turn"),
    "unknown_role.jsonl": ({"format": "chat"}, "unknown role 'bot'"),
    "messages_not_list.jsonl": ({"format": "chat"}, "messages is a str, expected a list"),
    "misspelled_column.jsonl": ({"format": "chat"}, "lacks column(s) messages that format chat needs"),
    "empty.jsonl": ({"format": "chat"}, "is empty"),
    "label_outside.csv": ({"format": "classification", "labels": ["positive", "negative"]}, "has label 'neutral'"),
    "template_without_text.csv": ({"format": "classification", "template": "Review: ?"}, "has no placeholder"),
    "format_mismatch.csv": ({"format": "chat"}, "found instruction, output"),
}


@pytest.mark.parametrize("name", sorted(OWN_DATA_CASES))
def test_broken_own_data_files(name, tiny_model_path, work, capsys):
    options, expected = OWN_DATA_CASES[name]
    path = CORPUS / "data" / "own" / name
    recipe = good_recipe(tiny_model_path, path=str(path), **options)
    del recipe["data"]["task"]
    # a bad option (the template) is named by its key, found before the file is read
    line = refused(["train", "--config", write_recipe(work.parent, recipe)], capsys, (name, "data.template"), work)
    assert expected in line


def test_own_data_longer_than_max_length_everywhere(tiny_model_path, work, capsys):
    recipe = good_recipe(tiny_model_path, path=str(CORPUS.parent.parent / "prunedlora/data/examples/chat.jsonl"))
    del recipe["data"]["task"]
    recipe["data"].update(format="chat", max_length=8)
    assert "raise max_length" in refused(
        ["train", "--config", write_recipe(work.parent, recipe)], capsys, "max_length", work
    )


def test_binary_and_missing_data_files(tiny_model_path, work, capsys):
    garbage = work.parent / "garbage.tsv"
    garbage.write_bytes(bytes(range(256)) * 8)
    for path, task in ((garbage, "sst2"), (garbage, "gsm8k"), (garbage, "codealpaca"), (work.parent / "no.tsv", "rte")):
        recipe = write_recipe(work.parent, good_recipe(tiny_model_path, task=task, path=str(path)))
        refused(["train", "--config", recipe], capsys, path.name, work)


def test_every_example_longer_than_max_length(tiny_model_path, work, capsys):
    recipe = write_recipe(work.parent, good_recipe(tiny_model_path, max_length=8, max_examples=4))
    assert "raise max_length" in refused(["train", "--config", recipe], capsys, "max_length", work)


# -- run directories --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_model_path) -> Path:
    from tests.export.conftest import make_fake_run

    return make_fake_run(tiny_model_path, tmp_path_factory.mktemp("good-run") / "run")


def _write_masks(run: Path, change) -> None:
    from prunedlora import metadata

    masks = metadata.load_masks(run / metadata.MASKS_FILE)
    metadata.save_masks(run / metadata.MASKS_FILE, change(masks))


def _edit_record(run: Path, change) -> None:
    path = run / "prunedlora_run.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


RUN_DAMAGE = {
    "masks missing": ("masks.safetensors", lambda run: (run / "masks.safetensors").unlink()),
    "masks truncated": (
        "masks.safetensors",
        lambda run: (run / "masks.safetensors").write_bytes((run / "masks.safetensors").read_bytes()[:40]),
    ),
    "masks 2-D": ("masks.safetensors", lambda run: _write_masks(run, lambda m: {k: v[None] for k, v in m.items()})),
    "masks of another r0": (
        "masks.safetensors",
        lambda run: _write_masks(run, lambda m: {k: v.new_ones(v.shape[0] + 3) for k, v in m.items()}),
    ),
    "masks for other modules": (
        "masks.safetensors",
        lambda run: _write_masks(run, lambda m: {k.replace("q_proj", "qq_proj"): v for k, v in m.items()}),
    ),
    "record not JSON": ("prunedlora_run.json", lambda run: (run / "prunedlora_run.json").write_text('{"r0": 8,')),
    "record a list": ("prunedlora_run.json", lambda run: (run / "prunedlora_run.json").write_text("[1, 2]")),
    "record without r0": (
        "prunedlora_run.json",
        lambda run: _edit_record(run, lambda r: {k: v for k, v in r.items() if k != "r0"}),
    ),
    "record r0 a string": ("prunedlora_run.json", lambda run: _edit_record(run, lambda r: {**r, "r0": "eight"})),
    "record ranks a list": ("prunedlora_run.json", lambda run: _edit_record(run, lambda r: {**r, "ranks": [1, 2]})),
    "record missing": ("prunedlora_run.json", lambda run: (run / "prunedlora_run.json").unlink()),
    "adapter without weights": (
        "adapter_model.safetensors",
        lambda run: (run / "adapter" / "adapter_model.safetensors").unlink(),
    ),
    "adapter config not JSON": (
        "adapter_config.json",
        lambda run: (run / "adapter" / "adapter_config.json").write_text("{"),
    ),
}


INSPECT_NEVER_READS = {"adapter config not JSON"}  # inspect reads the record, the masks and the tensor shapes


@pytest.fixture
def damaged_run(good_run, tmp_path):
    def make(case: str) -> tuple[Path, str]:
        run = tmp_path / "runs" / "damaged"
        shutil.copytree(good_run, run)
        name, damage = RUN_DAMAGE[case]
        damage(run)
        return run, name

    return make


@pytest.mark.parametrize("case", sorted(RUN_DAMAGE))
def test_damaged_run_directories(case, damaged_run, work, capsys):
    run, name = damaged_run(case)
    if case not in INSPECT_NEVER_READS:
        refused(["inspect", run], capsys, name, work)
    refused(["export", run, work / "out"], capsys, name, work)
    refused(["export", run, work.parent / "out"], capsys, name, work.parent)  # no staging folder left beside it


def test_damaged_rank_history_does_not_matter(good_run, tmp_path, capsys):
    # rank_history.json is for people (the train table and plots); export and inspect never read it
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (run / "rank_history.json").write_text("[{")
    assert main(["inspect", str(run)]) == 0
    assert main(["export", str(run), str(tmp_path / "out")]) == 0


def test_export_over_an_existing_output_leaves_it_untouched(good_run, work, capsys):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(["export", good_run, out], capsys, ("out", "--overwrite"), work)


def test_damaged_run_record_is_one_line_from_the_console_script(damaged_run, work):
    """The MetadataError of a damaged record through the installed command, as a user runs it."""
    run, _ = damaged_run("record not JSON")
    before = snapshot(work)
    done = subprocess.run(
        [sys.executable, "-m", "prunedlora.cli", "inspect", str(run)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert done.stderr.startswith("prunedlora inspect: error: ") and "prunedlora_run.json" in done.stderr
    assert snapshot(work) == before


# -- adapters ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_base(tmp_path_factory, default_model_path) -> Path:
    from tests.serve.helpers import build_vllm_tiny_llama

    return build_vllm_tiny_llama(tmp_path_factory.mktemp("bad-input-base"), default_model_path)


@pytest.fixture(scope="module")
def adapters(vllm_base, tmp_path_factory) -> dict[str, Path]:
    """A good adapter and the broken ones the serve tests refuse, made with the serve tests' builder."""
    from safetensors.torch import load_file, save_file

    from tests.serve.helpers import make_adapter

    root = tmp_path_factory.mktemp("bad-adapters")
    good = make_adapter(vllm_base, root / "good", r=4)
    made = {
        "dora": make_adapter(vllm_base, root / "dora", use_dora=True),
        "pickled": make_adapter(vllm_base, root / "pickled", safe_serialization=False),
    }

    def copy(name: str) -> Path:
        made[name] = shutil.copytree(good, root / name)
        return made[name]

    def edit_config(name: str, **changes) -> None:
        path = copy(name) / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    weights = "adapter_model.safetensors"
    data = (good / weights).read_bytes()
    (copy("truncated") / weights).write_bytes(data[: len(data) - 100])
    (copy("no weights") / weights).unlink()
    (copy("config not JSON") / "adapter_config.json").write_text("[1, 2")
    (copy("no config") / "adapter_config.json").unlink()
    edit_config("rank 0", r=0)
    edit_config("target the base lacks", target_modules=["q_proj", "foo_proj"])
    edit_config("another PEFT type", peft_type="IA3")
    tensors = load_file(str(good / weights))
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(copy("no lora_B") / weights))
    save_file({k: v * float("nan") for k, v in tensors.items()}, str(copy("NaN weights") / weights))
    three = copy("three problems")  # a config problem, a tensor problem, a module problem
    config = json.loads((three / "adapter_config.json").read_text())
    (three / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    broken = {k: v * float("nan") if "layers.0.self_attn.q_proj.lora_A" in k else v for k, v in tensors.items()}
    save_file({k: v for k, v in broken.items() if "layers.1.self_attn.v_proj.lora_B" not in k}, str(three / weights))
    copy("not a folder")
    shutil.rmtree(made["not a folder"])
    made["not a folder"].write_text("a file")
    return made


ADAPTER_CASES = [
    "truncated",
    "no weights",
    "config not JSON",
    "no config",
    "rank 0",
    "target the base lacks",
    "another PEFT type",
    "no lora_B",
    "NaN weights",
    "dora",
    "pickled",
    "not a folder",
    "three problems",
]


class _FakeServer(BaseHTTPRequestHandler):
    """Lists the base model at /v1/models like vLLM; any POST (a load) is recorded: it must not happen."""

    base: Path
    posts: list[str] = []

    def do_GET(self):  # noqa: N802
        body = json.dumps({"data": [{"id": "base", "root": str(self.base)}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.posts.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_server(vllm_base):
    handler = type("Handler", (_FakeServer,), {"base": vllm_base, "posts": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.posts
    server.shutdown()


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_broken_adapters_refused_by_serve_and_adapters_add(case, adapters, vllm_base, fake_server, work, capsys):
    path, (url, posts) = adapters[case], fake_server
    names = (str(path), "'x'")
    refused(["serve", "--model", vllm_base, "--dry-run", "--adapter", f"x={path}"], capsys, names, work)
    refused(
        ["adapters", "add", "x", path, "--url", url, "--model", vllm_base, "--max-lora-rank", "16"], capsys, names, work
    )
    assert posts == []  # nothing was sent to the server


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_broken_adapters_refused_by_export(case, adapters, vllm_base, work, capsys):
    path = adapters[case]
    line = refused(["export", path, work / "out", "--base-model", vllm_base], capsys, path.name, work)
    if case == "target the base lacks":  # refused from the headers, not by verification after loading the model
        assert "match no module of base model" in line


def test_three_problems_in_one_line(adapters, vllm_base, work, capsys):
    """Every problem of an adapter in the one line, '; '-separated, so one run shows all there is to fix."""
    path = adapters["three problems"]
    line = refused(["serve", "--model", vllm_base, "--dry-run", "--adapter", f"x={path}"], capsys, str(path), work)
    assert "trains biases" in line
    assert "layers.0.self_attn.q_proj.lora_A.weight holds NaN" in line
    assert "layers.1.self_attn.v_proj has no lora_B weight" in line


# inspect shows what an adapter holds, so it describes adapters whose files it can read even when they
# cannot be served; it refuses only what it cannot read.
INSPECT_CANNOT_READ = {"truncated", "no weights", "config not JSON", "no config", "pickled", "not a folder"}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_inspect_refuses_what_it_cannot_read(case, adapters, work, capsys):
    path = adapters[case]
    if case in INSPECT_CANNOT_READ:
        refused(["inspect", path], capsys, path.name, work)
        return
    assert main(["inspect", str(path)]) == 0
    assert str(path) in capsys.readouterr().out


# -- models -----------------------------------------------------------------------------------------

MODELS = CORPUS / "models"


@pytest.fixture(scope="module")
def no_tokenizer_model(tmp_path_factory, tiny_model_path) -> Path:
    """The tiny model's config and weights without its tokenizer files."""
    folder = tmp_path_factory.mktemp("no-tokenizer")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_path / name, folder / name)
    return folder


MODEL_CASES = {
    "no weights": (MODELS / "no_weights", "has config.json but no weights"),
    "unsupported family": (MODELS / "unsupported_family", "model family 'gpt2' (GPT2LMHeadModel) is not supported"),
    "GGUF file": (MODELS / "model.gguf", "is a GGUF file, not a Hugging Face model folder"),
}


@pytest.mark.parametrize("case", [*MODEL_CASES, "no tokenizer"])
def test_model_folders_train_and_serve_cannot_use(case, no_tokenizer_model, work, capsys):
    path, expect = MODEL_CASES.get(case, (no_tokenizer_model, "has no tokenizer files"))
    recipe = write_recipe(work.parent, good_recipe(path))
    assert expect in refused(["train", "--config", recipe], capsys, str(path), work)
    assert expect in refused(["serve", "--model", path, "--dry-run"], capsys, str(path), work)


def test_a_family_the_installed_vllm_lacks(tiny_model_path, work, capsys, monkeypatch):
    from prunedlora import vllm_compat

    monkeypatch.setattr(vllm_compat, "vllm_has_architecture", lambda name: name != "LlamaForCausalLM")
    line = refused(["serve", "--model", tiny_model_path, "--dry-run"], capsys, str(tiny_model_path), work)
    assert "the installed vLLM" in line and "has no LlamaForCausalLM (Llama)" in line


def test_target_module_matching_nothing_in_the_family(tiny_model_path, work, capsys):
    raw = good_recipe(tiny_model_path)
    raw["method"]["target_modules"] = ["q_proj", "qkv_proj"]
    recipe = write_recipe(work.parent, raw)
    line = refused(["train", "--config", recipe], capsys, "qkv_proj", work)
    assert (
        "matches no module of this model" in line
        and "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in line
    )


# -- bench ------------------------------------------------------------------------------------------


def test_bench_with_broken_inputs(work, capsys):
    refused(["bench", "quality", "--tasks", "sst5", "--list"], capsys, "sst5", work)
    refused(["bench", "quality", "--methods", "nope", "--list"], capsys, "nope", work)
    refused(["bench", "latency", "--run", work / "no-such-run", "--quick"], capsys, "no-such-run", work)


def test_one_line_from_the_console_script(work):
    """The same contract when the installed ``prunedlora`` command runs, as a user types it."""
    recipe = write_recipe(work, "model: default\n data: [\n")
    before = snapshot(work)
    script = Path(sys.executable).parent / "prunedlora"
    done = subprocess.run([str(script), "train", "--config", str(recipe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"prunedlora train: error: {recipe} is not valid YAML (line 2, column 6): mapping values are not allowed "
        "here; check the indentation and brackets there"
    )
    assert snapshot(work) == before
