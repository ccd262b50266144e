"""Rows of a data source, read with Hugging Face ``datasets``: a local JSON/JSONL, CSV/TSV,
Parquet, Arrow or text file, a ``save_to_disk`` folder, or a hub data set name (passed to
``load_dataset`` unchanged; nothing here reaches a hub itself).

Why ``datasets``: it is how the peers' users (TRL, axolotl, torchtune) already hold their data, it
reads every format above with one call, and a user with a hub mirror gets it for free. Its errors are
tracebacks from pyarrow or pandas; every one is turned into a one-line :class:`DataError` naming the
file and, for JSON Lines, the line that does not parse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunedlora.formats.base import DataError, Where

# file suffix -> (datasets builder, its options). CSV/TSV cells are read as text with no "NA"
# guessing: a sentence "null" or a label "0" must reach the format as written.
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {"na_filter": False}),
    # GLUE's TSV files are unquoted (sentences hold bare double quotes): quoting=3 is csv.QUOTE_NONE
    ".tsv": ("csv", {"sep": "\t", "na_filter": False, "quoting": 3}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
    ".txt": ("text", {}),
}
SUFFIXES = tuple(_BUILDERS)


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()  # a bar per file read, for files that read in a blink
    datasets.logging.set_verbosity_error()
    return datasets


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _bad_json_line(path: Path) -> str | None:
    """``path:line (reason)`` of the first line of a JSON Lines file that is not one JSON object."""
    try:
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{path}:{line_no} is not a JSON line ({err})"
                if not isinstance(record, dict):
                    return f"{path}:{line_no} is a JSON {type(record).__name__}, expected an object"
    except UnicodeDecodeError as err:
        return f"{path} is not UTF-8 text ({err})"
    return None


def _json_rows(path: Path) -> list[dict[str, Any]] | None:
    """Rows of a JSON file holding a list of objects, or None when it is JSON Lines. Read with the
    standard library: pyarrow infers one type per column, so rows whose values differ in type (a
    ``messages`` that is a list in one row and a string in another: bad input to name, not a crash)
    would fail there with a message about arrays and strings."""
    text = path.read_text(encoding="utf-8")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataError(f"{path} is not valid JSON ({err}); expected a list of objects or JSON Lines") from None
        return None  # several lines of objects: JSON Lines under a .json name
    if not isinstance(payload, list):
        raise DataError(
            f"{path} holds a JSON {type(payload).__name__}, expected a list of objects (or one object per line)"
        )
    for i, record in enumerate(payload):
        if not isinstance(record, dict):
            raise DataError(f"{path} record {i} is a {type(record).__name__}, expected an object")
    return payload


def _jsonl_rows(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    problem = _bad_json_line(path)
    if problem is not None:
        raise DataError(f"{problem}; expected JSON Lines (one object per line)")
    rows, lines = [], []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                rows.append(json.loads(line))
                lines.append(line_no)
    return rows, lines


def _csv_lines(path: Path, sep: str, quoting: int) -> list[int]:
    """The line each record of a CSV/TSV file starts on; a record with more or fewer fields than the
    header is refused here, naming its line (pandas would shift or fill its cells silently)."""
    import csv

    kind = "tab-separated" if sep == "\t" else "comma-separated"
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=sep, quoting=quoting)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path} is empty; expected a header line naming its columns")
        lines = []
        start = reader.line_num + 1
        for row in reader:
            if row:
                if len(row) != len(header):
                    hint = " and unquoted (GLUE format)" if sep == "\t" else ""
                    raise DataError(
                        f"{path}:{start} has {len(row)} {kind} fields, the header has {len(header)}; "
                        f"is the file {kind}{hint}?"
                    )
                lines.append(start)
            start = reader.line_num + 1
    return lines


def read_rows(source: str | Path, split: str = "train") -> tuple[list[dict[str, Any]], Where]:
    """(rows as dicts in file order, the source's name for messages).

    ``split`` picks the split of a ``save_to_disk`` DatasetDict or a hub data set; a single file is
    one split. JSON is read by the standard library (exact line numbers in errors, no type
    inference across rows); every other format by ``datasets``.
    """
    path = Path(source).expanduser()
    where = Where(str(source))
    if path.is_dir():
        return _from_disk(path, split), where
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _BUILDERS:
            raise DataError(
                f"{path} has suffix {suffix or '(none)'}; data files are {', '.join(SUFFIXES)} or a save_to_disk folder"
            )
        try:
            if suffix in (".json", ".jsonl"):
                rows = _json_rows(path) if suffix == ".json" else None
                if rows is not None:
                    return rows, where
                rows, lines = _jsonl_rows(path)
                return rows, Where.lined(where, lines)
            if _BUILDERS[suffix][0] == "csv":
                options = _BUILDERS[suffix][1]
                lines = _csv_lines(path, options.get("sep", ","), options.get("quoting", 0))
                rows = _with_datasets(path, suffix) if lines else []
                return rows, Where.lined(where, lines)
            return _with_datasets(path, suffix), where
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err})") from None
    if path.suffix.lower() in _BUILDERS or path.is_absolute() or str(source).startswith((".", "~")):
        raise DataError(f"data file {path} not found")
    return _from_hub(str(source), split), where


def _with_datasets(path: Path, suffix: str) -> list[dict[str, Any]]:
    datasets = _quiet_datasets()
    builder, options = _BUILDERS[suffix]
    if builder == "csv":  # every column as text: a label "0" or "007" stays as written
        options = {**options, "features": _text_features(path, options.get("sep", ","), options.get("quoting", 0))}
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # pyarrow, pandas and datasets raise many types; all mean "cannot read"
        raise DataError(f"{path} could not be read as {builder} ({_first_line(err)})") from None
    return table.to_list()


def _text_features(path: Path, sep: str, quoting: int):
    import csv

    from datasets import Features, Value

    with path.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle, delimiter=sep, quoting=quoting), None) or []
    if len(set(header)) != len(header):
        raise DataError(f"{path} names a column twice in its header: {', '.join(header)}")
    return Features({name: Value("string") for name in header})


def _from_disk(path: Path, split: str) -> list[dict[str, Any]]:
    if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise DataError(
            f"{path} is a folder but not a datasets save_to_disk folder; give a data file "
            f"({', '.join(SUFFIXES)}) or a folder written by Dataset.save_to_disk"
        )
    datasets = _quiet_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path} could not be read with datasets.load_from_disk ({_first_line(err)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has splits {', '.join(loaded)}, not {split!r}")
        loaded = loaded[split]
    return loaded.to_list()


def _from_hub(name: str, split: str) -> list[dict[str, Any]]:
    datasets = _quiet_datasets()
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"data {name!r} is neither a local file nor a data set datasets.load_dataset could load "
            f"({_first_line(err)})"
        ) from None
    return table.to_list()
