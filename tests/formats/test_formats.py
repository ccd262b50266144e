"""Every format reads from every kind of source the same way, is detected from its columns, takes
other column names through ``columns``, and a hub name reaches ``datasets.load_dataset`` unchanged."""

from __future__ import annotations

import csv
import json

import pytest

from prunedlora.formats import DataError, Example, read_rows
from prunedlora.tasks import VENDORED_DATA_DIR, DataConfig, data_format, label_words_of, load_examples

ROWS = [
    {"prompt": "Two plus two?", "completion": "Four."},
    {"prompt": "Capital of France?", "completion": " Paris. "},
    {"prompt": "Skip me", "completion": ""},
]


def _write_all(folder, rows):
    """The rows as JSON Lines, a JSON list, CSV, TSV, Parquet and a save_to_disk folder."""
    import datasets

    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rows.json").write_text(json.dumps(rows))
    for name, sep in (("rows.csv", ","), ("rows.tsv", "\t")):
        with (folder / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=sep)
            writer.writeheader()
            writer.writerows(rows)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(folder / "rows.parquet"))
    table.save_to_disk(str(folder / "saved"))
    return [folder / n for n in ("rows.jsonl", "rows.json", "rows.csv", "rows.tsv", "rows.parquet", "saved")]


def test_every_source_kind_gives_the_same_examples(tmp_path):
    expected = [Example("Two plus two?", "Four.", index=0), Example("Capital of France?", "Paris.", index=1)]
    for path in _write_all(tmp_path, ROWS):
        config = DataConfig(path=path, dev_size=0)
        assert data_format(config) == "prompt-completion", path.name
        assert load_examples(config) == expected, path.name  # stripped; the empty completion skipped


def test_columns_map_other_names_and_detection_picks_the_specific_format(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Why?", "answer": "Because.", "text": "unused"}) + "\n")
    config = DataConfig(path=path, dev_size=0, columns={"prompt": "question", "completion": "answer"})
    assert data_format(config) == "prompt-completion"
    assert load_examples(config) == [Example("Why?", "Because.", index=0)]
    with pytest.raises(DataError, match="lacks column\\(s\\) nope"):
        load_examples(DataConfig(path=path, dev_size=0, columns={"prompt": "nope", "completion": "answer"}))


def test_classification_label_words_come_from_the_training_file(tmp_path):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("text,label\ngood,pos\nbad,neg\nok,mid\n")
    dev.write_text("text,label\nfine,pos\n")
    config = DataConfig(path=train, dev_path=dev, split="dev")
    assert label_words_of(config) == ("mid", "neg", "pos")  # the dev file alone has only one
    (example,) = load_examples(config)
    assert example.label == "pos" and example.prompt == "fine\n\nAnswer with one word: mid, neg or pos."
    mapped = DataConfig(path=train, dev_size=0, labels={"pos": "positive", "neg": "negative", "mid": "neutral"})
    assert [e.label for e in load_examples(mapped)] == ["positive", "negative", "neutral"]


def test_text_is_plain_and_chat_keeps_its_history(tmp_path):
    text = load_examples(DataConfig(path=VENDORED_DATA_DIR / "examples" / "text.jsonl", dev_size=0))
    assert all(e.plain and not e.prompt for e in text)
    chat = load_examples(DataConfig(path="package:examples/chat.jsonl", dev_size=0))
    assert chat[0].history[0]["role"] == "system" and [m["role"] for m in chat[0].messages][-2:] == [
        "user",
        "assistant",
    ]


def test_own_data_carves_a_tenth_for_dev_and_dev_path_replaces_the_carve(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = load_examples(DataConfig(path=path))
    dev = load_examples(DataConfig(path=path, split="dev"))
    assert len(dev) == 4 and len(train) == 36 and not {e.prompt for e in dev} & {e.prompt for e in train}
    assert len(load_examples(DataConfig(path=path, dev_path=path, split="train"))) == 40


def test_a_hub_name_reaches_load_dataset_unchanged(monkeypatch):
    import datasets

    seen = {}

    def fake_load_dataset(name, split=None, **kwargs):
        seen.update(name=name, split=split)
        return datasets.Dataset.from_list(
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, _ = read_rows("someone/chat-set", "train")
    assert seen == {"name": "someone/chat-set", "split": "train"} and rows[0]["messages"][1]["content"] == "yo"
    config = DataConfig(path="someone/chat-set", dev_size=0)
    assert config.path == "someone/chat-set" and data_format(config) == "chat"


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"\n')
    with pytest.raises(DataError, match="bad.jsonl:3 is not a JSON line"):
        load_examples(DataConfig(path=path, dev_size=0))
