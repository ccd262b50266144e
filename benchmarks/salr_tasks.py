"""SALR after training: GSM8K answer NLL (or SST-2 accuracy) of each way to spend one adapter budget on a sparse base.

Issue 13's task table at a CPU-affordable scale. Every trained cell uses one PEFT LoRA of the same rank
``r_res + r_task`` with the same scaling (alpha = 2 x rank), data, data order, steps, learning rate and
seed, through ``prunedlora train`` (the ``salr:`` recipe section for the sparse cells):

=================  ===================================================================================
``dense-lora``     the dense model, plain LoRA at rank r_res + r_task (the reference SALR aims for)
``sparse-lora``    magnitude 50%, LoRA at rank r_res + r_task from PEFT's init (no residual)
``salr-frozen``    magnitude 50%, the residual's rank-r_res SVD + r_task task components, residual frozen
``salr-trainable`` the same, residual trained with the task components
``wanda-residual`` Wanda 50% (one calibration pass), residual + task, residual frozen
``wanda-trainable`` the same, residual trained
``wanda-lora``     Wanda 50%, LoRA from PEFT's init (no residual): what the Wanda residual cells beat or not
``2:4-residual``   magnitude 2:4, residual + task, residual frozen
``*-whitened``     salr-frozen, salr-trainable, wanda-trainable and salr-untrained with the whitened
                   residual fit (``residual_fit: whitened``: the truncation best for each layer's output)
``*-whitened-task`` salr-trainable with the whitened fit calibrated on the task's own training text
                   (chat-rendered, as training sees it) instead of sparsify's default CodeAlpaca text
``*-whitened-raw`` the same as ``-task`` with the examples' own text only: no chat template and no
                   instruction (for SST-2 the bare sentences, where the template is 82% of the tokens)
``*-whitened-general`` salr-trainable-whitened (and salr-untrained-whitened) calibrated on general text:
                   WikiText-2 beyond the windows perplexity scores (the second half of the test file,
                   the only split the shared data holds), so the fit repairs language, not a task
``*-whitened-mixed`` half the task's chat-rendered text, half that general text: the fit repairs both
``*-whitened-mixed-raw`` the same with the examples' own text (``-raw``'s) for the task's half
``salr-damped-whitened-*`` salr-trainable-whitened-raw (-task, -mixed) with the residual's components
                   trained at RESIDUAL_LR_SCALE x the learning rate (``salr.residual_lr_scale``): they
                   move, so the whole rank learns the task, but slower than the task part, so the repair
                   is not overwritten by a short task as the trainable one's is on SST-2
``*-whitened-all`` salr-trainable-whitened with all r_res + r_task components a residual (no zero task
                   part): trained, a residual component learns the task as well as a zero one could
                   (``-mixed-all``: the same calibrated as ``-mixed``)
=================  ===================================================================================

Three untrained rows frame them: ``dense-base`` (the dense model, no adapter), ``sparse-base`` (magnitude
50%, no adapter) and ``salr-untrained`` (magnitude 50% + the residual, task components still zero: what
the residual alone gives back; ``salr-untrained-whitened-mixed-all``: the whole rank as the residual the
``-mixed-all`` cell starts from, so training's effect on it can be read off).

The score is the quality bench's (``prunedlora.bench.scoring.score_adapter``): for GSM8K (``--task gsm8k``,
the default) the answer NLL per token of the reference solution on the dev split carved from train, which
training never sees; for SST-2 (``--task sst2``) the accuracy on its dev file from one forward pass per
sentence, with the gold label's log-prob margin kept per example. Each is compared
paired on the same examples, and WikiText-2 test perplexity of each cell's merged model (what the sparse
base lost in general, beyond the task).
Bytes on disk are the base as stored (the dense safetensors, or sparsify's compressed bitmap store)
plus the adapter's safetensors; vLLM would serve the materialised dense base, so these are disk bytes,
not memory or speed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/salr_tasks.py [--steps 30] [--batch 4]
        [--eval-examples 100] [--cells dense-lora salr-frozen ...]

Each cell is written to benchmarks/results/salr/tasks.json when it finishes (with tasks.md and tasks.png),
and a rerun with the same settings skips finished cells; an interrupted training resumes from its last
checkpoint under ``--work`` (default runs/salr-tasks, not committed). Paths in the results are relative.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).parent / "results" / "salr"
SHARED_DATA = REPO.parent / "shared" / "data"

# The metric each task is scored by: (key in the scores, what the tables call it, lower is better?)
METRICS = {"gsm8k": ("answer_nll", "answer NLL", True), "sst2": ("accuracy", "accuracy", False)}
TASK_NAMES = {"gsm8k": "GSM8K", "sst2": "SST-2"}
# The training file's first N examples, as the quality protocol reads SST-2's 67,349 (None: all of it).
TRAIN_EXAMPLES = {"sst2": 2000}


def _magnitude(**options: Any) -> dict[str, Any]:
    """The sparsify options of a cell on an unstructured magnitude mask (at --sparsity), with ``options`` added."""
    return {"mask": "magnitude", "pattern": "unstructured", **options}


def _whitened(**options: Any) -> dict[str, Any]:
    """A magnitude cell with the whitened residual fit (``calibration``: a CALIBRATION_MODES key)."""
    return _magnitude(fit="whitened", **options)


# name -> (sparsify options, or None for the dense model; residual mode; trained?)
CELLS: dict[str, tuple[dict[str, Any] | None, str | None, bool]] = {
    "dense-lora": (None, None, True),
    "sparse-lora": (_magnitude(residual=0), "trainable", True),
    "salr-frozen": (_magnitude(), "frozen", True),
    "salr-trainable": (_magnitude(), "trainable", True),
    "wanda-residual": ({"mask": "wanda", "pattern": "unstructured"}, "frozen", True),
    "wanda-trainable": ({"mask": "wanda", "pattern": "unstructured"}, "trainable", True),
    "wanda-lora": ({"mask": "wanda", "pattern": "unstructured", "residual": 0}, "trainable", True),
    "2:4-residual": ({"mask": "magnitude", "pattern": "2:4"}, "frozen", True),
    "salr-frozen-whitened": (_whitened(), "frozen", True),
    "salr-trainable-whitened": (_whitened(), "trainable", True),
    "wanda-trainable-whitened": ({"mask": "wanda", "pattern": "unstructured", "fit": "whitened"}, "trainable", True),
    "salr-trainable-whitened-task": (_whitened(calibration="task"), "trainable", True),
    "salr-trainable-whitened-raw": (_whitened(calibration="raw"), "trainable", True),
    "salr-trainable-whitened-all": (_whitened(residual="all"), "trainable", True),
    "salr-trainable-whitened-mixed-all": (_whitened(calibration="mixed", residual="all"), "trainable", True),
    "salr-trainable-whitened-general": (_whitened(calibration="general"), "trainable", True),
    "salr-trainable-whitened-mixed": (_whitened(calibration="mixed"), "trainable", True),
    "salr-trainable-whitened-mixed-raw": (_whitened(calibration="mixed-raw"), "trainable", True),
    "salr-damped-whitened-raw": (_whitened(calibration="raw"), "trainable", True),
    "salr-damped-whitened-task": (_whitened(calibration="task"), "trainable", True),
    "salr-damped-whitened-mixed": (_whitened(calibration="mixed"), "trainable", True),
    "dense-base": (None, None, False),
    "salr-untrained": (_magnitude(), "frozen", False),
    "salr-untrained-whitened": (_whitened(), "frozen", False),
    "salr-untrained-whitened-general": (_whitened(calibration="general"), "frozen", False),
    "salr-untrained-whitened-mixed-all": (_whitened(calibration="mixed", residual="all"), "frozen", False),
    "sparse-base": ({"mask": "magnitude", "pattern": "unstructured", "residual": 0}, None, False),
}

# The trainable cells whose residual learns at a fraction of the learning rate (salr.residual_lr_scale).
RESIDUAL_LR_SCALE = {f"salr-damped-whitened-{text}": 0.1 for text in ("raw", "task", "mixed")}

# Each residual cell against the cell with the same sparse base and no residual: the share of the gap
# between that cell and dense LoRA the residual closes is the issue's "recovers most of what the
# sparse base lost" (2:4 has no such cell: its row is compared with dense LoRA only).
NO_RESIDUAL = {
    "salr-frozen": "sparse-lora",
    "salr-trainable": "sparse-lora",
    "wanda-residual": "wanda-lora",
    "wanda-trainable": "wanda-lora",
    "salr-frozen-whitened": "sparse-lora",
    "salr-trainable-whitened": "sparse-lora",
    "wanda-trainable-whitened": "wanda-lora",
    "salr-trainable-whitened-task": "sparse-lora",  # a magnitude mask reads no calibration text
    "salr-trainable-whitened-raw": "sparse-lora",
    "salr-trainable-whitened-all": "sparse-lora",
    "salr-trainable-whitened-mixed-all": "sparse-lora",
    "salr-trainable-whitened-general": "sparse-lora",
    "salr-trainable-whitened-mixed": "sparse-lora",
    "salr-trainable-whitened-mixed-raw": "sparse-lora",
    **dict.fromkeys(RESIDUAL_LR_SCALE, "sparse-lora"),
}

# Each variant against the cell it changes one thing of (the fit, then the calibration text), paired.
VARIANT_OF = {
    "salr-frozen-whitened": ("salr-frozen", "whitened fit"),
    "salr-trainable-whitened": ("salr-trainable", "whitened fit"),
    "wanda-trainable-whitened": ("wanda-trainable", "whitened fit"),
    "salr-trainable-whitened-task": ("salr-trainable-whitened", "calibrated on the task's text"),
    "salr-trainable-whitened-raw": ("salr-trainable-whitened-task", "the examples' text without template"),
    "salr-trainable-whitened-all": ("salr-trainable-whitened", "all of the rank a residual (no task part)"),
    "salr-trainable-whitened-general": ("salr-trainable-whitened", "calibrated on general text (WikiText-2)"),
    "salr-trainable-whitened-mixed-all": ("salr-trainable-whitened-mixed", "all of the rank a residual (no task part)"),
    "salr-trainable-whitened-mixed": ("salr-trainable-whitened-task", "half the task's text swapped for general text"),
    "salr-trainable-whitened-mixed-raw": (
        "salr-trainable-whitened-raw",
        "half the task's text swapped for general text",
    ),
    **{
        cell: (cell.replace("damped", "trainable"), f"the residual trained at {scale:g} x the learning rate")
        for cell, scale in RESIDUAL_LR_SCALE.items()
    },
    "salr-untrained-whitened-general": ("salr-untrained-whitened", "calibrated on general text (WikiText-2)"),
}

# Calibration text of the cells that ask for ``"calibration": "task"``: the first examples of the task's
# own training split (the dev carve excluded, as in training), rendered with the chat template as
# training renders them, so the whitened fit is best for the inputs the task puts through each layer.
# ``"raw"``: the same examples' own text only (SST-2: the sentence; otherwise prompt and response), so a
# short task's fit is not made best for its template and instruction, repeated in every example.
# ``"general"``: WikiText-2 text the perplexity windows never read (see general_text); ``"mixed"``: the
# task's chat-rendered text for the first half of the calibration tokens, then the general text.
# The other calibrated cells read sparsify's default (the vendored CodeAlpaca slice, raw text).
CALIBRATION_EXAMPLES = 400
_TASK_TEXT = "{task} training split, first {n} examples"
_GENERAL_TEXT = "WikiText-2 test text after the evaluated windows (its second half)"
CALIBRATION_MODES = {  # mode -> what its text is, as a cell's row records it
    "task": _TASK_TEXT + ", chat-rendered",
    "raw": _TASK_TEXT + ", own text, no template",
    "general": _GENERAL_TEXT,
    "mixed": _TASK_TEXT + ", chat-rendered, for half the calibration tokens; then " + _GENERAL_TEXT,
    "mixed-raw": _TASK_TEXT + ", own text, no template, for half the calibration tokens; then " + _GENERAL_TEXT,
}


# WikiText-2 test perplexity of every cell, trained or not, over its first windows of 512 tokens, as
# benchmarks/salr_eval.py measures the untrained bases: the general language ability the sparse base
# lost, besides the task the adapter was trained on.
PPL_WINDOWS = 8


@dataclass
class Settings:
    """Everything a cell's number depends on; a table holds cells of one Settings only."""

    steps: int = 30
    batch: int = 4
    learning_rate: float = 5e-4
    warmup_steps: int = 3
    max_length: int = 384
    eval_examples: int = 100
    sparsity: float = 0.5
    residual_rank: int = 16
    task_rank: int = 8
    seed: int = 0
    data: str = "vendored"  # "vendored" (the package's slice) or "../shared/data/<task>"
    task: str = "gsm8k"

    @property
    def rank(self) -> int:
        return self.residual_rank + self.task_rank

    def data_path(self) -> str | None:
        return None if self.data == "vendored" else str(REPO / self.data)


def rel(path: Path) -> str:
    path = Path(path).resolve()
    for root, prefix in ((REPO, ""), (REPO.parent, "../")):
        if path.is_relative_to(root):
            return prefix + str(path.relative_to(root))
    return path.name


def sparsify_options(cell: str, s: Settings) -> dict[str, Any] | None:
    spec = CELLS[cell][0]
    if spec is None:
        return None
    residual = spec.get("residual", s.residual_rank)
    if residual == "all":  # the whole budget repairs the base; trained, every component also learns the task
        residual = s.rank
    return {
        "sparsity": s.sparsity,
        "pattern": spec["pattern"],
        "mask": spec["mask"],
        "residual_fit": spec.get("fit", "svd"),
        "residual_rank": residual,
        "task_rank": s.rank - residual,
        "lora_alpha": float(2 * s.rank),
        "seed": s.seed,
    }


def calibration_of(cell: str) -> str | None:
    """The calibration mode ("task" or "raw", see calibration_text) of a cell; None for sparsify's default text."""
    spec = CELLS[cell][0]
    return None if spec is None else spec.get("calibration")


def folder_name(options: dict[str, Any], calibration: str | None = None) -> str:
    pattern = "24" if options["pattern"] == "2:4" else f"u{round(options['sparsity'] * 100)}"
    fit = "" if options.get("residual_fit", "svd") == "svd" else f"-{options['residual_fit']}"
    cal = "" if calibration is None else f"-cal{calibration}"
    return f"{options['mask']}-{pattern}-res{options['residual_rank']}{fit}{cal}-task{options['task_rank']}"


def general_text() -> str:
    """WikiText-2 from the first article heading past the middle of the joined test file on.

    The shared data holds WikiText-2's test split only, and perplexity scores its first PPL_WINDOWS x 512
    tokens (about 17,000 characters of 1.3 million), so the second half is text the metric never reads:
    in-domain for perplexity, as a calibration set for a WikiText-2 figure usually is (SparseGPT and
    Wanda calibrate on C4; none is on disk here), and disjoint from what is scored."""
    import re

    from prunedlora.perplexity import read_corpus

    text = read_corpus("wikitext2")
    heading = re.compile(r"\n \= [^=\n]+ \= \n").search(text, len(text) // 2)
    if heading is None:
        raise ValueError("no article heading in the second half of WikiText-2's test file")
    return text[heading.start() + 1 :]


def calibration_text(examples, tokenizer, mode: str) -> str:
    """The calibration text of ``mode`` (see CALIBRATION_MODES)."""
    from prunedlora.salr.config import SparsifyConfig
    from prunedlora.tasks import SST2_PROMPT
    from prunedlora.train.data import chat_text

    if mode not in CALIBRATION_MODES:
        raise ValueError(f"unknown calibration mode {mode!r}: use one of {', '.join(CALIBRATION_MODES)}")
    if mode == "general":
        return general_text()
    before, after = SST2_PROMPT.split("{sentence}")

    def own_text(ex) -> str:
        if ex.prompt.startswith(before) and ex.prompt.endswith(after):  # SST-2: the sentence alone
            return ex.prompt[len(before) : len(ex.prompt) - len(after)]
        return f"{ex.prompt}\n{ex.response}"

    if mode in ("task", "mixed"):
        text = "".join(chat_text(tokenizer, ex.prompt, ex.response) for ex in examples)
    else:
        text = "\n\n".join(own_text(ex) for ex in examples)
    if not mode.startswith("mixed"):
        return text
    # calibration_batch reads consecutive windows from the start: the task's text fills the first half of
    # its tokens, cut at a window's end, and the general text the rest
    defaults = SparsifyConfig()
    half = defaults.calibration_samples // 2 * defaults.calibration_length
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:half]
    return tokenizer.decode(ids) + "\n\n" + general_text()


def task_calibration_file(s: Settings, work: Path, mode: str = "task") -> Path:
    """The task's first CALIBRATION_EXAMPLES training examples as one text file (see calibration_text)."""
    from transformers import AutoTokenizer

    from prunedlora.models import resolve_model
    from prunedlora.tasks import DataConfig, load_examples

    suffix = "" if mode == "task" else f"-{mode}"
    path = work / "calibration" / f"{s.task}-seed{s.seed}-train{CALIBRATION_EXAMPLES}{suffix}.txt"
    if not path.is_file():
        config = DataConfig(task=s.task, path=s.data_path(), split="train", seed=s.seed)
        examples = load_examples(config)[:CALIBRATION_EXAMPLES]
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(calibration_text(examples, tokenizer, mode))
    return path


def recipe_for(cell: str, s: Settings, work: Path) -> dict[str, Any]:
    """The ``recipe_from_dict`` mapping of a trained cell."""
    raw: dict[str, Any] = {
        "model": "default",
        "prune": False,
        "data": {
            "task": s.task,
            "path": s.data_path(),
            "max_examples": TRAIN_EXAMPLES.get(s.task),
            "max_length": s.max_length,
            "seed": s.seed,
        },
        "training": {
            "output_dir": str(work / cell.replace(":", "")),
            "max_steps": s.steps,
            "per_device_train_batch_size": s.batch,
            "learning_rate": s.learning_rate,
            "warmup_steps": s.warmup_steps,
            "save_steps": max(1, min(10, s.steps)),
            "save_total_limit": 1,
            "logging_steps": 5,
            "seed": s.seed,
        },
    }
    options = sparsify_options(cell, s)
    if options is None:
        raw["method"] = {"r0": s.rank, "lora_alpha": float(2 * s.rank), "target_rank": float(s.rank)}
    else:
        folder = work / "sparsify" / folder_name(options, calibration_of(cell))
        raw["salr"] = {"dir": str(folder), "residual": CELLS[cell][1], "sparsify": options}
        if cell in RESIDUAL_LR_SCALE:
            raw["salr"]["residual_lr_scale"] = RESIDUAL_LR_SCALE[cell]
        if calibration_of(cell) is not None:  # the recipe checks the folder was made from this text
            raw["salr"]["calibration"] = str(task_calibration_file(s, work, calibration_of(cell)))
    return raw


def file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def ensure_folder(options: dict[str, Any], work: Path, s: Settings, calibration: str | None = None) -> Path:
    from prunedlora.salr.pipeline import RECORD_FILE, sparsify
    from prunedlora.salr.recipe import SalrSection

    folder = work / "sparsify" / folder_name(options, calibration)
    section = SalrSection.from_dict({"dir": str(folder), "sparsify": options})  # checks a reused folder
    if not (folder / RECORD_FILE).is_file():
        text = None if calibration is None else task_calibration_file(s, work, calibration)
        sparsify("default", folder, section.sparsify, calibration=text)
    return folder


def run_cell(cell: str, s: Settings, work: Path) -> dict[str, Any]:
    """Train (resuming) and score one cell; returns its result row."""
    from prunedlora import metadata
    from prunedlora.bench.scoring import EvalSettings, score_adapter
    from prunedlora.cpu import machine_record
    from prunedlora.models import resolve_model
    from prunedlora.train.recipe import recipe_from_dict
    from prunedlora.train.runner import train

    options = sparsify_options(cell, s)
    trained = CELLS[cell][2]
    row: dict[str, Any] = {"cell": cell, "residual": CELLS[cell][1], "trained": trained}
    if cell in RESIDUAL_LR_SCALE:
        row["residual_lr_scale"] = RESIDUAL_LR_SCALE[cell]
    row["machine"] = machine_record(dtype="float32")
    start = time.time()
    if options is not None:
        folder = ensure_folder(options, work, s, calibration_of(cell))
        record = json.loads((folder / "salr.json").read_text())
        base_dir, base_bytes = folder / "base", record["bytes"]["compressed_file"]
        keys = ("mask", "pattern", "sparsity", "residual_rank", "task_rank")
        row.update(sparsify={k: options[k] for k in keys})
        if options["residual_fit"] != "svd":  # rows of the plain fit predate the option and stay as they were
            row["sparsify"]["residual_fit"] = options["residual_fit"]
        if calibration_of(cell) is not None:
            row["sparsify"]["calibration"] = {
                "text": CALIBRATION_MODES[calibration_of(cell)].format(task=s.task, n=CALIBRATION_EXAMPLES),
                "sha256": record["calibration"]["sha256"],
                "tokens": record["calibration"]["tokens"],
            }
    else:
        base_dir = resolve_model("default")
        base_bytes = file_bytes(base_dir)
    row["sparsify_seconds"] = round(time.time() - start, 1)

    adapter = None
    if trained:
        recipe = recipe_from_dict(recipe_for(cell, s, work))
        run_dir = Path(recipe.training.output_dir)
        start = time.time()
        done = (run_dir / metadata.RUN_RECORD_FILE).is_file() and (
            metadata.read_run_record(run_dir).global_step >= s.steps
        )
        result = None if done else train(recipe, resume="auto")
        row["train_seconds"] = round(time.time() - start, 1)
        row["train_loss"] = None if result is None else result.train_loss
        row["losses"] = [] if result is None else result.losses
        adapter = run_dir / metadata.RUN_ADAPTER_DIR
    elif options is not None and options["residual_rank"] > 0:
        adapter = base_dir.parent / "adapter"  # residual + zero task components, as sparsify wrote it

    start = time.time()
    evals = EvalSettings(max_examples=s.eval_examples, max_length=s.max_length, batch_size=8, exact_match_examples=0)
    scores = score_adapter(base_dir, adapter, s.task, s.data_path(), evals, data_seed=s.seed)
    row["eval_seconds"] = round(time.time() - start, 1)
    row[METRICS[s.task][0]] = scores[METRICS[s.task][0]]
    row["wikitext2"] = wikitext_perplexity(base_dir, adapter)
    row["eval_examples"] = scores["eval_examples"]
    row["per_example"] = scores["per_example"]
    row["bytes"] = {
        "base_stored": base_bytes,
        "adapter": file_bytes(adapter) if adapter is not None else 0,
    }
    row["bytes"]["total"] = row["bytes"]["base_stored"] + row["bytes"]["adapter"]
    return row


def wikitext_perplexity(base_dir: Path, adapter: Path | None) -> dict[str, Any]:
    """WikiText-2 test perplexity of the base with the cell's adapter merged (first PPL_WINDOWS windows)."""
    from prunedlora.bench.scoring import load_model, load_tokenizer
    from prunedlora.perplexity import PerplexityConfig, perplexity

    model = load_model(base_dir, adapter)
    config = PerplexityConfig(window=512, max_windows=PPL_WINDOWS)
    return perplexity(model, load_tokenizer(base_dir), "wikitext2", config).to_dict()


def paired_metric(row: dict, reference: dict, metric: str, seed: int) -> Any:
    """``metric`` of ``row`` minus ``reference`` on their common dev examples (token-weighted for an NLL),
    with a paired bootstrap 95% interval (``prunedlora.bench.paired``)."""
    from prunedlora.bench.paired import example_values, paired_bootstrap

    mine, weights = example_values({"eval": row}, metric)
    ref, _ = example_values({"eval": reference}, metric)
    common = sorted(set(mine) & set(ref))
    return paired_bootstrap([mine[i] - ref[i] for i in common], [weights[i] for i in common], seed=seed)


def paired_lines(data: dict) -> list[str]:
    """The paired table: each trained sparse cell against dense LoRA and against its no-residual cell."""
    cells, seed = data["cells"], data["settings"]["seed"]
    metric, label, lower = METRICS[data["settings"].get("task", "gsm8k")]
    dense = cells.get("dense-lora")
    if dense is None:
        return []
    lines = [
        "",
        f"Paired on the same dev examples ({label}, cell - reference; paired bootstrap 95%). Gap closed: the "
        f"share of the no-residual cell's distance to dense LoRA that the residual removes (100% = dense LoRA's {label}).",
        "",
        "| cell | vs dense LoRA | no-residual cell | vs it | gap closed |",
        "|---|---|---|---|---:|",
    ]
    for name in [c for c in CELLS if c in cells and c != "dense-lora" and CELLS[c][2]]:
        row = cells[name]
        vs_dense = paired_metric(row, dense, metric, seed)
        ref_name = NO_RESIDUAL.get(name)
        ref = cells.get(ref_name) if ref_name else None
        vs_ref, closed = "-", "-"
        if ref is not None:
            d = paired_metric(row, ref, metric, seed)
            vs_ref = f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
            gap = dense[metric] - ref[metric]
            dense_better = gap < 0 if lower else gap > 0
            closed = f"{(row[metric] - ref[metric]) / gap:.0%}" if dense_better else "-"
        lines.append(
            f"| {name} | {vs_dense.mean:+.4f} [{vs_dense.low:+.4f}, {vs_dense.high:+.4f}] | {ref_name or '-'} "
            f"| {vs_ref} | {closed} |"
        )
    variants = [(name, *VARIANT_OF[name]) for name in VARIANT_OF if name in cells and VARIANT_OF[name][0] in cells]
    if variants:
        lines += [
            "",
            f"Each variant against the cell it changes one thing of ({label}, variant - that cell; paired bootstrap 95%):",
            "",
            "| variant | changes | against | paired difference |",
            "|---|---|---|---|",
        ]
        for name, base, change in variants:
            d = paired_metric(cells[name], cells[base], metric, seed)
            lines.append(f"| {name} | {change} | {base} | {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] |")
    return lines


def write_outputs(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tasks.json.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out / "tasks.json")
    (out / "tasks.md").write_text(markdown(data))
    if data["cells"]:
        plot(data, out / "tasks.png")


def markdown(data: dict) -> str:
    from prunedlora.cpu import machine_line

    s = data["settings"]
    task = s.get("task", "gsm8k")
    metric, label, lower = METRICS[task]
    cells = data["cells"]
    dense = cells.get("dense-lora", {}).get(metric)
    score = (
        f"answer NLL per token of the reference solution on the first {s['eval_examples']} examples of the carved "
        "dev split (lower is better)"
        if task == "gsm8k"
        else f"accuracy on the first {s['eval_examples']} sentences of the dev file (higher is better)"
    )
    lines = [
        f"# SALR on {TASK_NAMES[task]}: {label} at one adapter budget (benchmarks/salr_tasks.py)",
        "",
        f"SmolLM2-135M-Instruct, float32, CPU. Every trained cell: one LoRA of rank {s['residual_rank']} + "
        f"{s['task_rank']} = {s['residual_rank'] + s['task_rank']} on all seven projections (alpha = 2 x rank), "
        f"{s['steps']} steps x {s['batch']} examples, lr {s['learning_rate']:g} ({s['warmup_steps']} warm-up "
        f"steps), seed {s['seed']}, {TASK_NAMES[task]} data {s['data']}. Score: {score}. "
        f"Sparsity {s['sparsity']:.0%}.",
        "",
        f"| cell | base | residual | trained | {label} | vs dense LoRA | WikiText-2 ppl | base stored (MB) "
        "| adapter (MB) | total (MB) | train s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [c for c in CELLS if c in cells]:
        row = cells[name]
        sp = row.get("sparsify")
        base, residual = "dense", "-"
        if sp is not None:
            base = f"{sp['mask']} " + ("2:4" if sp["pattern"] == "2:4" else f"{sp['sparsity']:.0%}")
            residual = "none" if sp["residual_rank"] == 0 else f"r{sp['residual_rank']} {row['residual']}"
            if "residual_lr_scale" in row:
                residual += f" at {row['residual_lr_scale']:g} x lr"
        diff = "" if dense is None or not row["trained"] else f"{row[metric] - dense:+.4f}"
        b = row["bytes"]
        ppl = f"{row['wikitext2']['ppl']:.1f}" if "wikitext2" in row else "-"
        lines.append(
            f"| {name} | {base} | {residual} | {'yes' if row['trained'] else 'no'} | {row[metric]:.4f} | {diff} "
            f"| {ppl} "
            f"| {b['base_stored'] / 1e6:.1f} | {b['adapter'] / 1e6:.2f} | {b['total'] / 1e6:.1f} "
            f"| {row.get('train_seconds', '')} |"
        )
    lines += paired_lines(data)
    machines = sorted({machine_line(r.get("machine")) for r in cells.values() if r.get("machine")})
    lines += [
        "",
        f"- Machine: {'; '.join(machines) or 'not recorded'}.",
        "- Bytes are on disk: the sparse bases are sparsify's compressed store (values + 1-bit bitmap); vLLM "
        "serves the materialised dense base, so they buy no memory or speed there.",
        "- One seed and a short run: differences of a few thousandths are within what another seed or data "
        "order would move; `per_example` in tasks.json allows paired comparisons on the same examples.",
        "",
    ]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Every trained cell's metric as a bar (the sparse cells share one size on disk, so against bytes they
    stack in one column), then the metric and, where measured, WikiText-2 perplexity against bytes."""
    from prunedlora.figures import label_points, new_figure, save_figure

    s = data["settings"]
    metric, label, lower = METRICS[s.get("task", "gsm8k")]
    panels = [(metric, f"{TASK_NAMES[s.get('task', 'gsm8k')]} {label} (dev)")]
    if any("wikitext2" in row for row in data["cells"].values()):
        panels.append(("wikitext2", "WikiText-2 test perplexity (log)"))
    fig = new_figure(6.5 * (len(panels) + 1), 4.2)
    bars = fig.add_subplot(1, len(panels) + 1, 1)
    trained = sorted(
        ((name, row[metric]) for name, row in data["cells"].items() if row["trained"]),
        key=lambda item: -item[1] if lower else item[1],
    )
    base_colour = {"dense": "tab:green", "magnitude": "tab:blue", "wanda": "tab:orange"}
    colours = [
        base_colour["dense"]
        if "sparsify" not in data["cells"][n]
        else base_colour.get(data["cells"][n]["sparsify"]["mask"])
        for n, _ in trained
    ]
    bars.barh([n for n, _ in trained], [v for _, v in trained], color=colours)
    for ref, style in (("dense-lora", "-"), ("sparse-lora", "--"), ("wanda-lora", ":")):
        if ref in data["cells"]:
            bars.axvline(data["cells"][ref][metric], color="black", linestyle=style, linewidth=0.8, label=ref)
    values = [v for _, v in trained]
    if values:
        pad = 0.15 * (max(values) - min(values) or 1.0)
        bars.set_xlim(min(values) - pad, max(values) + pad)
    bars.set_xlabel(f"{label} ({'lower' if lower else 'higher'} is better; green dense, blue magnitude, orange Wanda)")
    bars.tick_params(axis="y", labelsize=7)
    bars.legend(fontsize=7, loc="lower right")
    bars.grid(True, axis="x", alpha=0.3)
    for k, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels) + 1, k + 2)
        points = []
        for name, row in data["cells"].items():
            if key not in row:
                continue
            x, y = row["bytes"]["total"] / 1e6, row[key]["ppl"] if key == "wikitext2" else row[key]
            ax.plot([x], [y], "o" if row["trained"] else "x", color="tab:blue" if row["trained"] else "grey")
            points.append((name, x, y))
        if key == "wikitext2":
            ax.set_yscale("log")
        label_points(ax, points)
        ax.set_xlabel("bytes on disk: base as stored + adapter (MB)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"SmolLM2-135M, {s['sparsity']:.0%} sparse bases, adapter rank {s['residual_rank']}+{s['task_rank']}, "
        f"{s['steps']} steps x {s['batch']}",
        fontsize=9,
    )
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = Settings()
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--eval-examples", type=int, default=d.eval_examples)
    parser.add_argument("--sparsity", type=float, default=d.sparsity)
    parser.add_argument("--residual-rank", type=int, default=d.residual_rank)
    parser.add_argument("--task-rank", type=int, default=d.task_rank)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--task", choices=list(METRICS), default=d.task)
    parser.add_argument(
        "--data",
        choices=["vendored", "shared"],
        default="vendored",
        help="the package's slice or all of ../shared/data/<task>",
    )
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "salr-tasks", help="runs and sparsify folders")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    shared = SHARED_DATA / args.task
    if args.data == "shared" and not shared.is_dir():
        parser.error(f"{rel(shared)} is missing; use --data vendored")
    settings = Settings(
        steps=args.steps,
        batch=args.batch,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        max_length=args.max_length,
        eval_examples=args.eval_examples,
        sparsity=args.sparsity,
        residual_rank=args.residual_rank,
        task_rank=args.task_rank,
        seed=args.seed,
        data="vendored" if args.data == "vendored" else rel(shared),
        task=args.task,
    )
    metric, label, _ = METRICS[args.task]
    path = args.out / "tasks.json"
    data = json.loads(path.read_text()) if path.is_file() else None
    if data is not None and {"task": "gsm8k", **data["settings"]} != asdict(settings):  # older tables: GSM8K
        parser.error(f"{rel(path)} holds a table with other settings; move it away or pass the same ones")
    data = data or {"settings": asdict(settings), "cells": {}}
    for cell in args.cells:
        if cell in data["cells"]:
            print(f"{cell}: done ({label} {data['cells'][cell][metric]:.4f})", flush=True)
            continue
        row = run_cell(cell, settings, args.work)
        data["cells"][cell] = row
        write_outputs(data, args.out)
        print(f"{cell}: {label} {row[metric]:.4f}, {row['bytes']['total']:,} bytes", flush=True)
    write_outputs(data, args.out)


if __name__ == "__main__":
    main()
