"""The task data sets: where each lives, how its file format is read into prompt/response pairs, and
the dev split carved out of training files that have none.

The full data sets live in ``../shared/data`` next to the repository (see :func:`shared_data_path`);
small slices of them ship inside the package (``prunedlora/data/<task>/``, each with its licence)
and are what ``path=None`` reads, so the demo and the fast tests need nothing outside the package.
Training (``train/data.py``) renders these examples with the chat template; the quality bench
(``bench/scoring.py``) scores the same examples, so both read them here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from prunedlora.errors import PrunedLoraError
from prunedlora.fieldtypes import check_field_types

TASKS = ("gsm8k", "codealpaca", "sst2", "rte")
SPLITS = ("train", "dev")
LOSS_ON = ("response", "all")  # which tokens of a training example carry the loss (DataConfig.loss_on)
LABELS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "rte": ("entailment", "not_entailment"),
}
DEFAULT_DEV_SIZE = 100  # carved dev split for tasks without a dev file
# package data (prunedlora/data/), files in a checkout and in an installed wheel alike
VENDORED_DATA_DIR = Path(str(resources.files("prunedlora").joinpath("data")))

# Classification prompts put the instruction last: when a long input must be shortened, it is cut
# from its start (see tokenize_example), so the question the label answers always survives.
SST2_PROMPT = (
    "Sentence: {sentence}\n\n"
    "Is the sentiment of this sentence positive or negative? Answer with one word: positive or negative."
)
RTE_PROMPT = (
    "Premise: {premise}\nHypothesis: {hypothesis}\n\n"
    "Does the premise entail the hypothesis? Answer with one word: entailment or not_entailment."
)
_CALCULATOR = re.compile(r"<<[^<>]*>>")


class DataError(PrunedLoraError):
    """A data file or data configuration that cannot be read as asked, with how to fix it."""


@dataclass(frozen=True)
class Example:
    """One prompt/response pair; ``label`` is the class word for classification tasks.

    ``index`` is the record's position in its source file (0-based, header excluded), so splits can
    be checked against the file.
    """

    prompt: str
    response: str
    label: str | None = None
    index: int = -1


@dataclass
class DataConfig:
    """Which examples to read and how to cut them.

    ``path`` is the file the requested split is read from (or a folder holding the task's usual
    file names); None reads the slice vendored in the package. ``dev_size`` carves a dev split out
    of the training file (chosen by a hash of each example and ``seed``, so it is the same on every
    call and on every machine, and never enters training). It defaults to ``DEFAULT_DEV_SIZE`` for
    tasks without a dev file (gsm8k, codealpaca); for sst2 and rte, None means their own dev file
    and an integer carves from train instead. ``max_examples`` keeps the first N of the split in
    file order, after carving, so the dev split does not depend on it.

    ``mix`` names further tasks whose examples are interleaved with ``task``'s, one of each in turn
    until each list ends (e.g. LoRAPrune's GSM8K + CodeAlpaca stand-in for instruction data); each is
    read from its vendored slice with this config's split, seed and carving, and ``max_examples``
    caps the interleaved list. ``loss_on`` is ``response`` (the default: loss on the assistant's
    reply only) or ``all`` (every token of the rendered conversation, prompt and template included,
    as general-purpose instruction tuning and LoRAPrune's recovery training do).
    """

    task: str
    path: str | Path | None = None
    split: str = "train"
    max_examples: int | None = None
    max_length: int = 512
    seed: int = 0
    dev_size: int | None = None
    mix: list[str] | None = None
    loss_on: str = "response"

    def __post_init__(self) -> None:
        check_field_types(self, DataError)  # types first: the range checks below compare values
        if self.task not in TASKS:
            raise DataError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if self.split not in SPLITS:
            raise DataError(f"unknown split {self.split!r}; use one of: {', '.join(SPLITS)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise DataError(f"max_examples must be a positive integer or None, got {self.max_examples!r}")
        if self.max_length < 2:
            raise DataError(f"max_length must be at least 2 tokens, got {self.max_length!r}")
        if self.dev_size is not None and self.dev_size < 0:
            raise DataError(f"dev_size must be >= 0 or None, got {self.dev_size!r}")
        if self.loss_on not in LOSS_ON:
            raise DataError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        if self.mix is not None:
            self.mix = list(self.mix)
            unknown = [t for t in self.mix if t not in TASKS]
            if unknown:
                raise DataError(f"unknown task(s) {unknown} in mix; known tasks: {', '.join(TASKS)}")
            if self.task in self.mix or len(set(self.mix)) != len(self.mix):
                raise DataError(f"mix must name other tasks than {self.task!r}, each once; got {self.mix}")
        if self.path is not None:
            self.path = Path(self.path).expanduser()

    @property
    def carves_dev(self) -> bool:
        """True when the dev split is cut out of the training file rather than read from its own."""
        return _TASK_SPECS[self.task].dev_file is None or self.dev_size is not None

    @property
    def effective_dev_size(self) -> int:
        if not self.carves_dev:
            return 0
        return DEFAULT_DEV_SIZE if self.dev_size is None else self.dev_size


# -- readers --------------------------------------------------------------------------------------


def _missing_columns(path: Path, found: list[str], needed: tuple[str, ...], where: str = "") -> DataError:
    return DataError(
        f"{path}{where} lacks column(s) {', '.join(n for n in needed if n not in found)}: "
        f"needs {', '.join(needed)}, found {', '.join(found) or 'none'}; is this the right file for the task?"
    )


def _read_tsv(path: Path, needed: tuple[str, ...]) -> list[dict[str, str]]:
    # GLUE files are tab-separated without quoting (sentences contain bare double quotes).
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path} is empty; expected a header line with columns {', '.join(needed)}")
    header = [h.strip() for h in rows[0]]
    if any(n not in header for n in needed):
        raise _missing_columns(path, header, needed)
    records = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(
                f"{path}:{line_no} has {len(row)} tab-separated fields, the header has {len(header)}; "
                "is the file tab-separated and unquoted (GLUE format)?"
            )
        records.append(dict(zip(header, row)))
    return records


def _check_keys(path: Path, record: Any, needed: tuple[str, ...], where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{path}{where} is a {type(record).__name__}, expected an object with keys {', '.join(needed)}")
    if any(n not in record for n in needed):
        raise _missing_columns(path, list(record), needed, where)
    return record


def _read_jsonl(path: Path, needed: tuple[str, ...]) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no} is not a JSON line ({err}); expected JSON Lines") from err
            records.append(_check_keys(path, record, needed, f":{line_no}"))
    return records


def _read_json_list(path: Path, needed: tuple[str, ...]) -> list[dict]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); expected a list of objects") from err
    if not isinstance(payload, list):
        raise DataError(f"{path} holds a JSON {type(payload).__name__}, expected a list of objects")
    return [_check_keys(path, record, needed, f" record {i}") for i, record in enumerate(payload)]


def _read_gsm8k(path: Path) -> list[Example]:
    examples = []
    for i, rec in enumerate(_read_jsonl(path, ("question", "answer"))):
        if "####" not in rec["answer"]:
            raise DataError(f"{path}:{i + 1}: the answer does not end in '#### N'; is this GSM8K's train.jsonl?")
        # <<48/2=24>> marks calls to a calculator that is not run here; a model trained on them
        # would learn to write them.
        answer = _CALCULATOR.sub("", rec["answer"]).strip()
        examples.append(Example(prompt=rec["question"].strip(), response=answer, index=i))
    return examples


def _read_codealpaca(path: Path) -> list[Example]:
    examples = []
    for i, rec in enumerate(_read_json_list(path, ("instruction", "input", "output"))):
        output = str(rec["output"]).strip()
        if not output:
            continue  # a few records have no answer; they would only teach the model to stop
        prompt = str(rec["instruction"]).strip()
        extra = str(rec["input"] or "").strip()
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        examples.append(Example(prompt=prompt, response=output, index=i))
    return examples


def _label(path: Path, row_index: int, value: str, mapping: dict[str, str]) -> str:
    value = value.strip()
    if value not in mapping:
        raise DataError(
            f"{path}:{row_index + 2} has label {value!r}; expected one of {', '.join(mapping)} "
            "(unlabelled GLUE test files cannot be used)"
        )
    return mapping[value]


def _read_sst2(path: Path) -> list[Example]:
    mapping = {"0": "negative", "1": "positive"}
    examples = []
    for i, row in enumerate(_read_tsv(path, ("sentence", "label"))):
        label = _label(path, i, row["label"], mapping)
        prompt = SST2_PROMPT.format(sentence=row["sentence"].strip())
        examples.append(Example(prompt=prompt, response=label, label=label, index=i))
    return examples


def _read_rte(path: Path) -> list[Example]:
    mapping = {name: name for name in LABELS["rte"]}
    examples = []
    for i, row in enumerate(_read_tsv(path, ("sentence1", "sentence2", "label"))):
        label = _label(path, i, row["label"], mapping)
        prompt = RTE_PROMPT.format(premise=row["sentence1"].strip(), hypothesis=row["sentence2"].strip())
        examples.append(Example(prompt=prompt, response=label, label=label, index=i))
    return examples


@dataclass(frozen=True)
class _TaskSpec:
    reader: Callable[[Path], list[Example]]
    train_file: str  # vendored name
    shared_train_file: str
    dev_file: str | None = None  # same name in both places; None = carve from train


_TASK_SPECS: dict[str, _TaskSpec] = {
    "gsm8k": _TaskSpec(_read_gsm8k, "train.jsonl", "train.jsonl"),
    "codealpaca": _TaskSpec(_read_codealpaca, "code_alpaca.json", "code_alpaca_2k.json"),
    "sst2": _TaskSpec(_read_sst2, "train.tsv", "train_full.tsv", "dev.tsv"),
    "rte": _TaskSpec(_read_rte, "train.tsv", "train.tsv", "dev.tsv"),
}


def shared_data_dir() -> Path:
    """Where the full data sets live in a checkout: ``../shared/data`` beside the repository."""
    return VENDORED_DATA_DIR.parents[2] / "shared" / "data"


def shared_data_path(task: str, split: str = "train") -> Path:
    """The full file of ``task`` in the shared data folder (it may not exist outside a checkout)."""
    spec = _spec(task)
    name = spec.shared_train_file if split == "train" or spec.dev_file is None else spec.dev_file
    return shared_data_dir() / task / name


def vendored_data_path(task: str, split: str = "train") -> Path:
    """The slice of ``task`` shipped inside the package."""
    spec = _spec(task)
    name = spec.train_file if split == "train" or spec.dev_file is None else spec.dev_file
    return VENDORED_DATA_DIR / task / name


def _spec(task: str) -> _TaskSpec:
    if task not in _TASK_SPECS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return _TASK_SPECS[task]


def _source_file(config: DataConfig) -> Path:
    file_split = "train" if config.carves_dev else config.split
    if config.path is None:
        path = vendored_data_path(config.task, file_split)
    elif config.path.is_dir():
        spec = _TASK_SPECS[config.task]
        names = [spec.dev_file] if file_split == "dev" else [spec.shared_train_file, spec.train_file]
        path = next((config.path / n for n in names if (config.path / n).is_file()), config.path / names[0])
    else:
        path = config.path
    if not path.is_file():
        raise DataError(
            f"{config.task} data file {path} not found; the full data sets live in {shared_data_dir()} "
            f"(e.g. {shared_data_path(config.task, file_split)}), or leave path unset to use the slice "
            "vendored in the package"
        )
    return path


def _dev_key(example: Example, seed: int) -> str:
    # By content, not position: the same example lands on the same side whatever file order or
    # Python version, and duplicates of a dev example cannot sneak into training.
    text = f"{seed}\0{example.prompt}\0{example.response}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_dev(examples: list[Example], dev_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, dev) with ``dev_size`` examples carved out by a seeded hash, both in file order."""
    if dev_size >= len(examples):
        raise DataError(
            f"dev_size={dev_size} leaves nothing to train on ({len(examples)} examples); use a smaller dev_size"
        )
    keys = [_dev_key(ex, seed) for ex in examples]
    dev_keys = set(sorted(keys)[:dev_size])
    train = [ex for ex, key in zip(examples, keys) if key not in dev_keys]
    dev = [ex for ex, key in zip(examples, keys) if key in dev_keys]
    return train, dev


def load_examples(config: DataConfig) -> list[Example]:
    """The examples of ``config.split``, read from the task's file and capped to ``max_examples``."""
    path = _source_file(config)
    try:
        examples = _TASK_SPECS[config.task].reader(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); is this the right file for {config.task}?") from err
    if not examples:
        raise DataError(f"{path} holds no usable {config.task} examples")
    if config.carves_dev:
        train, dev = split_dev(examples, config.effective_dev_size, config.seed)
        examples = train if config.split == "train" else dev
        if not examples:
            raise DataError(f"split='dev' with dev_size=0 selects nothing from {path}; set dev_size > 0")
    if config.mix:
        others = [
            load_examples(DataConfig(task=t, split=config.split, seed=config.seed, max_length=config.max_length))
            for t in config.mix
        ]
        examples = interleave([examples, *others])
    if config.max_examples is not None:
        examples = examples[: config.max_examples]
    return examples


def interleave(lists: list[list[Example]]) -> list[Example]:
    """One element of each list in turn (their order kept), continuing with the longer ones."""
    out: list[Example] = []
    for i in range(max(map(len, lists), default=0)):
        out.extend(items[i] for items in lists if i < len(items))
    return out
