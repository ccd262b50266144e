"""Which examples a run reads: the user's own data file in one of the formats (``prunedlora.formats``)
or one of the built-in tasks, declared here as presets of those formats; and the dev split, the
user's own dev file or a deterministic carve out of the training file.

The built-in tasks' full data sets live in ``../shared/data`` next to the repository (see
:func:`shared_data_path`); small slices of them ship inside the package (``prunedlora/data/<task>/``,
each with its licence) and are what ``path=None`` reads, so the demo and the fast tests need nothing
outside the package. Training (``train/data.py``) renders these examples; ``prunedlora eval`` and
the quality bench (``bench/scoring.py``) score the same examples, so both read them here.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from prunedlora.fieldtypes import check_field_types
from prunedlora.formats import DataError, Example, FormatOptions, detect_format, get_format, read_rows
from prunedlora.formats.base import at, check_columns, rename_columns
from prunedlora.formats.classification import label_words

__all__ = ["DataConfig", "DataError", "Example", "TaskPreset", "load_examples"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev")
# which tokens of a training example carry the loss (DataConfig.loss_on): every assistant turn, the
# final assistant turn only, or every token of the rendering
LOSS_ON = ("response", "last", "all")
DEFAULT_DEV_SIZE = 100  # carved dev split for built-in tasks without a dev file
OWN_DEV_SHARE = 0.1  # own data without a dev file: a tenth of it, at most DEFAULT_DEV_SIZE
# package data (prunedlora/data/), files in a checkout and in an installed wheel alike
VENDORED_DATA_DIR = Path(str(resources.files("prunedlora").joinpath("data")))

# Classification prompts put the instruction last: when a long input must be shortened, it is cut
# from its start (see tokenize_example), so the question the label answers always survives.
SST2_PROMPT = (
    "Sentence: {text}\n\n"
    "Is the sentiment of this sentence positive or negative? Answer with one word: positive or negative."
)
RTE_PROMPT = (
    "Premise: {sentence1}\nHypothesis: {sentence2}\n\n"
    "Does the premise entail the hypothesis? Answer with one word: entailment or not_entailment."
)
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _gsm8k_answer(example: Example, where: str) -> Example:
    if "####" not in example.response:
        raise DataError(
            f"{at(where, example.index)}: the answer does not end in '#### N'; is this GSM8K's train.jsonl?"
        )
    # <<48/2=24>> marks calls to a calculator that is not run here; a model trained on them would
    # learn to write them.
    return replace(example, response=_CALCULATOR.sub("", example.response).strip())


@dataclass(frozen=True)
class TaskPreset:
    """A built-in task: its format, how its file's columns map onto the format's, its prompt template
    and labels, where its files are, and what it is scored on (``metrics``: (name, better) pairs)."""

    format: str
    columns: dict[str, str]
    train_file: str  # vendored name
    shared_train_file: str
    dev_file: str | None = None  # same name in both places; None = carve from train
    labels: dict[str, str] | None = None
    template: str | None = None
    metrics: tuple[tuple[str, str], ...] = (("nll", "lower"),)
    answer: str | None = None  # "final_number": greedy exact match compares the last number
    clean: Any = None  # Example, where -> Example: the task's own clean-up of a record


TASK_PRESETS: dict[str, TaskPreset] = {
    "gsm8k": TaskPreset(
        format="prompt-completion",
        columns={"prompt": "question", "completion": "answer"},
        train_file="train.jsonl",
        shared_train_file="train.jsonl",
        metrics=(("exact_match", "higher"), ("answer_nll", "lower")),
        answer="final_number",
        clean=_gsm8k_answer,
    ),
    "codealpaca": TaskPreset(
        format="alpaca",
        columns={},
        train_file="code_alpaca.json",
        shared_train_file="code_alpaca_2k.json",
    ),
    "sst2": TaskPreset(
        format="classification",
        columns={"text": "sentence"},
        train_file="train.tsv",
        shared_train_file="train_full.tsv",
        dev_file="dev.tsv",
        labels={"0": "negative", "1": "positive"},
        template=SST2_PROMPT,
        metrics=(("accuracy", "higher"),),
    ),
    "rte": TaskPreset(
        format="classification",
        columns={},
        train_file="train.tsv",
        shared_train_file="train.tsv",
        dev_file="dev.tsv",
        labels={"entailment": "entailment", "not_entailment": "not_entailment"},
        template=RTE_PROMPT,
        metrics=(("accuracy", "higher"),),
    ),
}
TASKS = tuple(TASK_PRESETS)
LABELS: dict[str, tuple[str, ...]] = {
    name: tuple(preset.labels.values()) for name, preset in TASK_PRESETS.items() if preset.labels
}


@dataclass
class DataConfig:
    """Which examples to read and how to cut them.

    Either ``task`` (a built-in preset, read from its vendored slice when ``path`` is None, or from
    ``path``: its file or a folder holding its usual file names), or ``path`` to your own data (a
    JSON/JSONL, CSV/TSV, Parquet or text file, a ``save_to_disk`` folder, or a hub data set name) in
    ``format`` (chat, alpaca, prompt-completion, text, classification; detected from the columns when
    None). ``columns`` maps the format's column names to yours (``{messages: conversations}``);
    ``labels`` (a list, or a mapping value -> word) and ``template`` (with ``{text}``) are for
    classification.

    The dev split is ``dev_path`` when given; otherwise ``dev_size`` examples carved out of the
    training file by a hash of each example and ``seed`` (the same on every call and machine, never
    in training). ``dev_size`` defaults to ``DEFAULT_DEV_SIZE`` for built-in tasks without a dev
    file, a tenth of your file (at most ``DEFAULT_DEV_SIZE``) for your own data; for sst2 and rte,
    None means their own dev file and an integer carves from train instead. ``max_examples`` keeps
    the first N of the split in file order, after carving, so the dev split does not depend on it.

    ``mix`` names built-in tasks whose examples are interleaved with the main ones, one of each in
    turn (e.g. LoRAPrune's GSM8K + CodeAlpaca). ``loss_on``: ``response`` (every assistant turn, the
    default), ``last`` (the final assistant turn only), ``all`` (every token, template included).
    ``packing`` (text format): concatenate texts into ``max_length`` blocks (the default) or cut
    each text to ``max_length``.
    """

    task: str | None = None
    path: str | Path | None = None
    format: str | None = None
    columns: dict[str, str] | None = None
    labels: Any = None
    template: str | None = None
    dev_path: str | Path | None = None
    split: str = "train"
    max_examples: int | None = None
    max_length: int = 512
    seed: int = 0
    dev_size: int | None = None
    mix: list[str] | None = None
    loss_on: str = "response"
    packing: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, DataError)  # types first: the range checks below compare values
        if self.task is None and self.path is None:
            raise DataError("give data.path (your data file) or data.task (a built-in task: " + ", ".join(TASKS) + ")")
        if self.task is not None and self.task not in TASKS:
            raise DataError(
                f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)} (for your own file set path and format)"
            )
        if self.task is not None:
            for name in ("format", "columns", "labels", "template", "dev_path"):
                if getattr(self, name) is not None:
                    raise DataError(
                        f"{name} is for your own data; task {self.task} is a preset with its own (drop task to use yours)"
                    )
        if self.format is not None:
            get_format(self.format)
        if self.split not in SPLITS:
            raise DataError(f"unknown split {self.split!r}; use one of: {', '.join(SPLITS)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise DataError(f"max_examples must be a positive integer or None, got {self.max_examples!r}")
        if self.max_length < 2:
            raise DataError(f"max_length must be at least 2 tokens, got {self.max_length!r}")
        if self.dev_size is not None and self.dev_size < 0:
            raise DataError(f"dev_size must be >= 0 or None, got {self.dev_size!r}")
        if self.dev_path is not None and self.dev_size is not None:
            raise DataError("give dev_path (your dev file) or dev_size (a carve from the training file), not both")
        if self.loss_on not in LOSS_ON:
            raise DataError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        self._label_words: dict[str, str] | None = None  # resolved label words (not an option)
        if self.labels is not None:
            self._label_words = label_words(self.labels, "data.labels")
        if self.format is not None or self.template is not None:
            fmt = get_format(self.format) if self.format else None
            if self.template is not None and fmt is not None and fmt.name != "classification":
                raise DataError(f"template is for the classification format, not {fmt.name}")
            if fmt is not None:
                fmt.check_options(FormatOptions(template=self.template), "data.template")
        if self.mix is not None:
            self.mix = list(self.mix)
            unknown = [t for t in self.mix if t not in TASKS]
            if unknown:
                raise DataError(f"unknown task(s) {unknown} in mix; known tasks: {', '.join(TASKS)}")
            if self.task in self.mix or len(set(self.mix)) != len(self.mix):
                raise DataError(f"mix must name other tasks than {self.task!r}, each once; got {self.mix}")
        self.path, self.dev_path = _packaged(self.path), _packaged(self.dev_path)
        if self.path is not None and not isinstance(self.path, Path):
            local = Path(self.path).expanduser()
            # a hub name (org/name) stays a string, so it reaches load_dataset unchanged
            self.path = local if (local.exists() or self.task is not None or local.suffix) else self.path
        if self.dev_path is not None:
            self.dev_path = Path(self.dev_path).expanduser()

    @property
    def preset(self) -> TaskPreset | None:
        return TASK_PRESETS.get(self.task) if self.task else None

    @property
    def name(self) -> str:
        """How messages and progress bars call this data: the task, or the file's name."""
        return self.task or Path(str(self.path)).name

    @property
    def carves_dev(self) -> bool:
        """True when the dev split is cut out of the training file rather than read from its own."""
        if self.preset is not None:
            return self.preset.dev_file is None or self.dev_size is not None
        return self.dev_path is None

    @property
    def effective_dev_size(self) -> int:
        if not self.carves_dev:
            return 0
        return DEFAULT_DEV_SIZE if self.dev_size is None else self.dev_size

    def to_dict(self) -> dict[str, Any]:
        """The options as a recipe writes them (paths as text; only the set own-data options)."""
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name in ("format", "columns", "labels", "template", "dev_path") and value is None:
                continue  # a built-in task's record keeps the keys it always had
            out[name] = str(value) if isinstance(value, Path) else value
        return out


# -- files ----------------------------------------------------------------------------------------

PACKAGE_PREFIX = "package:"  # data shipped in the package: package:examples/chat.jsonl


def _packaged(path: str | Path | None) -> str | Path | None:
    """``package:NAME`` as the file shipped in ``prunedlora/data/`` (so a shipped recipe names its data
    the same way from a checkout and an installed wheel); anything else unchanged."""
    if isinstance(path, str) and path.startswith(PACKAGE_PREFIX):
        return VENDORED_DATA_DIR / path[len(PACKAGE_PREFIX) :]
    return path


def shared_data_dir() -> Path:
    """Where the full data sets live in a checkout: ``../shared/data`` beside the repository."""
    return VENDORED_DATA_DIR.parents[2] / "shared" / "data"


def _preset(task: str) -> TaskPreset:
    if task not in TASK_PRESETS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASK_PRESETS[task]


def shared_data_path(task: str, split: str = "train") -> Path:
    """The full file of ``task`` in the shared data folder (it may not exist outside a checkout)."""
    preset = _preset(task)
    name = preset.shared_train_file if split == "train" or preset.dev_file is None else preset.dev_file
    return shared_data_dir() / task / name


def vendored_data_path(task: str, split: str = "train") -> Path:
    """The slice of ``task`` shipped inside the package."""
    preset = _preset(task)
    name = preset.train_file if split == "train" or preset.dev_file is None else preset.dev_file
    return VENDORED_DATA_DIR / task / name


def _preset_file(config: DataConfig, file_split: str) -> Path:
    preset = _preset(config.task)
    if config.path is None:
        path = vendored_data_path(config.task, file_split)
    elif config.path.is_dir():
        names = [preset.dev_file] if file_split == "dev" else [preset.shared_train_file, preset.train_file]
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


def _source(config: DataConfig, file_split: str) -> str | Path:
    if config.preset is not None:
        return _preset_file(config, file_split)
    if file_split == "dev" and config.dev_path is not None:
        return config.dev_path
    return config.path


def _read(config: DataConfig, file_split: str) -> list[Example]:
    """Every example of one file (before carving), through its format."""
    source = _source(config, file_split)
    rows, where = read_rows(source, file_split)
    if not rows:
        raise DataError(f"{where} is empty; it holds no rows")
    found = list(rows[0])
    preset = config.preset
    columns = preset.columns if preset is not None else config.columns
    rows = rename_columns(rows, columns, found, where)
    canonical = list(rows[0])
    fmt = (
        get_format(preset.format if preset is not None else config.format)
        if (preset is not None or config.format)
        else detect_format(canonical, where)
    )
    template = preset.template if preset is not None else config.template
    fmt.check_options(FormatOptions(template=template), where)
    check_columns(fmt, canonical, where, FormatOptions(template=template))
    options = FormatOptions(
        labels=preset.labels if preset is not None else _own_label_words(config, fmt.name, rows, source),
        template=template,
    )
    examples = fmt.examples(rows, where, options)
    if preset is not None and preset.clean is not None:
        examples = [preset.clean(ex, where) for ex in examples]
    if not examples:
        raise DataError(f"{where} holds no usable examples")
    return examples


def _own_label_words(
    config: DataConfig, fmt: str, read: list[dict[str, Any]] | None = None, source: Any = None
) -> dict[str, str] | None:
    """Label words of a classification file: the recipe's, else every label of the *training* file
    (so a dev file with fewer classes is scored against the same candidates). ``read`` (renamed rows of
    ``source``) is used when ``source`` is that training file, which is then not read again."""
    if fmt != "classification" or config._label_words is not None:
        return config._label_words
    if read is not None and source == config.path:
        rows, where = read, str(source)
    else:
        rows, where = read_rows(config.path, "train")
        rows = rename_columns(rows, config.columns, list(rows[0]) if rows else [], where)
    if rows and "label" not in rows[0]:
        return None  # check_columns names the missing column
    config._label_words = label_words(sorted({str(r["label"]).strip() for r in rows if r["label"] is not None}), where)
    return config._label_words


def label_words_of(config: DataConfig) -> tuple[str, ...]:
    """The candidate answers of a classification config, in order (empty for other formats)."""
    if config.preset is not None:
        return tuple(config.preset.labels.values()) if config.preset.labels else ()
    if data_format(config) != "classification":
        return ()
    return tuple(_own_label_words(config, "classification").values())


def data_format(config: DataConfig) -> str:
    """The format name ``config`` reads: the preset's, the recipe's, or the one its file's columns fit."""
    if config.preset is not None:
        return config.preset.format
    if config.format:
        return config.format
    rows, where = read_rows(config.path, "train")
    if not rows:
        raise DataError(f"{where} is empty; it holds no rows")
    return detect_format(list(rename_columns(rows[:1], config.columns, list(rows[0]), where)[0]), where).name


# -- the dev split ------------------------------------------------------------------------------


def _dev_key(example: Example, seed: int) -> str:
    # By content, not position: the same example lands on the same side whatever file order or
    # Python version, and duplicates of a dev example cannot sneak into training. A conversation's
    # earlier turns count too (only when it has them, so single-turn keys are as they always were).
    text = f"{seed}\0{example.prompt}\0{example.response}"
    if example.history:
        text += "\0" + "\0".join(f"{m['role']}:{m['content']}" for m in example.history)
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


def _dev_size(config: DataConfig, available: int) -> int:
    if config.dev_size is not None:
        return config.dev_size
    if config.preset is not None:
        return DEFAULT_DEV_SIZE
    return min(DEFAULT_DEV_SIZE, int(available * OWN_DEV_SHARE))


def load_examples(config: DataConfig) -> list[Example]:
    """The examples of ``config.split``, read through the data's format and capped to ``max_examples``."""
    file_split = "train" if config.carves_dev else config.split
    examples = _read(config, file_split)
    if config.carves_dev:
        size = _dev_size(config, len(examples))
        if size == 0 and config.split == "dev":
            raise DataError(
                f"split='dev' with dev_size={size} selects nothing from {config.name} "
                "(set dev_size > 0, or dev_path to your dev file)"
            )
        if size:
            train, dev = split_dev(examples, size, config.seed)
            examples = train if config.split == "train" else dev
    if config.mix:
        others = [
            load_examples(DataConfig(task=t, split=config.split, seed=config.seed, max_length=config.max_length))
            for t in config.mix
        ]
        examples = interleave([examples, *others])
    if config.max_examples is not None:
        examples = examples[: config.max_examples]
    return examples


def has_dev_split(config: DataConfig) -> bool:
    """Whether ``config`` has held-out examples (its own dev file, or a carve of at least one)."""
    if not config.carves_dev:
        return True
    if config.dev_size is not None or config.preset is not None:
        return config.effective_dev_size > 0
    return True  # own data: a tenth is carved when the file has ten rows or more (load_examples says)


def interleave(lists: list[list[Example]]) -> list[Example]:
    """One element of each list in turn (their order kept), continuing with the longer ones."""
    out: list[Example] = []
    for i in range(max(map(len, lists), default=0)):
        out.extend(items[i] for items in lists if i < len(items))
    return out
