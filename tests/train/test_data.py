"""Data readers, chat rendering with response-only labels, dev carving, truncation and errors."""

from __future__ import annotations

import json

import pytest

from prunedlora.answers import final_number
from prunedlora.errors import PrunedLoraError
from prunedlora.tasks import (
    DEFAULT_DEV_SIZE,
    LABELS,
    TASKS,
    DataConfig,
    DataError,
    Example,
    load_examples,
    shared_data_dir,
    shared_data_path,
    split_dev,
    vendored_data_path,
)
from prunedlora.train.data import (
    IGNORE_INDEX,
    ChatTemplateError,
    build_train_dataset,
    chat_prompt,
    make_collator,
    tokenize_example,
)

VENDORED_ROWS = {
    ("gsm8k", "train"): 400,
    ("codealpaca", "train"): 400,
    ("sst2", "train"): 600,
    ("sst2", "dev"): 200,
    ("rte", "train"): 300,
    ("rte", "dev"): 100,
}
needs_shared = pytest.mark.skipif(not shared_data_dir().is_dir(), reason="../shared/data is not present")


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def _fresh_tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def _all(task: str, path=None) -> list[Example]:
    """Every example of the training file, nothing carved out."""
    return load_examples(DataConfig(task=task, path=path, dev_size=0))


# -- readers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_vendored_slice_reads_and_splits(task):
    train = load_examples(DataConfig(task=task))
    dev = load_examples(DataConfig(task=task, split="dev"))
    everything = _all(task)
    if task in ("gsm8k", "codealpaca"):  # no dev file: dev is carved from train
        assert len(dev) == DEFAULT_DEV_SIZE
        assert len(train) + len(dev) == len(everything)
    else:
        assert len(dev) == VENDORED_ROWS[(task, "dev")]
        assert len(train) == len(everything) == VENDORED_ROWS[(task, "train")]
    for ex in train + dev:
        assert ex.prompt.strip() and ex.response.strip()
        if task in LABELS:
            assert ex.label in LABELS[task] and ex.response == ex.label
            assert "Answer with one word" in ex.prompt
        else:
            assert ex.label is None
    assert [ex.index for ex in train] == sorted(ex.index for ex in train)


def test_gsm8k_reader_keeps_final_answer_and_drops_calculator_marks():
    examples = _all("gsm8k")
    raw = [json.loads(line) for line in vendored_data_path("gsm8k").read_text().splitlines()]
    assert len(examples) == len(raw) == 400
    first = examples[0]
    assert first.prompt == raw[0]["question"]
    assert first.response.endswith("#### 72")
    assert "<<" not in first.response and "48/2 = 24 clips" in first.response
    for ex, rec in zip(examples, raw):
        assert "<<" not in ex.response
        assert final_number(ex.response) == rec["answer"].rsplit("####", 1)[1].strip().replace(",", "")


def test_codealpaca_reader_includes_input_and_skips_empty_outputs():
    examples = _all("codealpaca")
    raw = json.loads(vendored_data_path("codealpaca").read_text())
    empty = [i for i, rec in enumerate(raw) if not rec["output"].strip()]
    assert empty == [237]
    assert len(examples) == len(raw) - 1 and 237 not in {ex.index for ex in examples}
    by_index = {ex.index: ex for ex in examples}
    for i, rec in enumerate(raw):
        if i in empty:
            continue
        ex = by_index[i]
        assert ex.response == rec["output"].strip()
        if rec["input"].strip():
            assert ex.prompt == f"{rec['instruction'].strip()}\n\n{rec['input'].strip()}"
        else:
            assert ex.prompt == rec["instruction"].strip()


def test_classification_readers_map_labels():
    sst2 = _all("sst2")
    assert sst2[0].label == "negative" and "hide new secretions from the parental units" in sst2[0].prompt
    dev = load_examples(DataConfig(task="sst2", split="dev"))
    assert dev[0].label == "positive" and "charming and often affecting journey" in dev[0].prompt
    rows = vendored_data_path("sst2").read_text().splitlines()[1:]
    assert [ex.label for ex in sst2] == [LABELS["sst2"][int(r.rsplit("\t", 1)[1])] for r in rows]
    rte = _all("rte")
    assert rte[0].label == "not_entailment" and rte[1].label == "entailment"
    assert "Premise: No Weapons of Mass Destruction Found in Iraq Yet." in rte[0].prompt
    assert "Hypothesis: Weapons of Mass Destruction Found in Iraq." in rte[0].prompt


@needs_shared
@pytest.mark.parametrize(
    "task,split,count",
    [
        ("gsm8k", None, 7473),
        ("codealpaca", None, 2015),
        ("sst2", "train", 67349),
        ("sst2", "dev", 872),
        ("rte", "train", 2490),
        ("rte", "dev", 277),
    ],
)
def test_shared_data_reads_and_vendored_slice_is_its_head(task, split, count):
    if split is None:
        full = _all(task, shared_data_path(task))
        vendored = _all(task)
    else:
        full = load_examples(DataConfig(task=task, split=split, path=shared_data_path(task, split)))
        vendored = load_examples(DataConfig(task=task, split=split))
    assert len(full) == count
    assert vendored == full[: len(vendored)]


@needs_shared
def test_folder_path_picks_the_task_files():
    folder = shared_data_dir() / "sst2"
    assert len(load_examples(DataConfig(task="sst2", path=folder))) == 67349
    assert len(load_examples(DataConfig(task="sst2", path=folder, split="dev"))) == 872


# -- dev split -------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["gsm8k", "codealpaca"])
def test_carved_dev_is_disjoint_stable_and_seeded(task):
    train = load_examples(DataConfig(task=task))
    dev = load_examples(DataConfig(task=task, split="dev"))
    assert {ex.index for ex in train}.isdisjoint({ex.index for ex in dev})
    assert {ex.prompt for ex in train}.isdisjoint({ex.prompt for ex in dev})
    assert sorted(ex.index for ex in train + dev) == [ex.index for ex in _all(task)]
    assert load_examples(DataConfig(task=task, split="dev")) == dev
    assert load_examples(DataConfig(task=task)) == train
    other = load_examples(DataConfig(task=task, split="dev", seed=1))
    assert {ex.index for ex in other} != {ex.index for ex in dev}
    # max_examples caps a split after carving: it never moves examples between train and dev
    assert load_examples(DataConfig(task=task, max_examples=10)) == train[:10]
    assert load_examples(DataConfig(task=task, split="dev", max_examples=5)) == dev[:5]
    bigger = load_examples(DataConfig(task=task, split="dev", dev_size=150))
    assert {ex.index for ex in dev} <= {ex.index for ex in bigger}


@needs_shared
def test_full_file_dev_never_overlaps_vendored_training():
    """The carve is by content hash, so the full GSM8K dev split holds no vendored training example."""
    full_dev = load_examples(DataConfig(task="gsm8k", split="dev", path=shared_data_path("gsm8k")))
    vendored_train = load_examples(DataConfig(task="gsm8k"))
    assert {ex.prompt for ex in full_dev}.isdisjoint({ex.prompt for ex in vendored_train})


def test_dev_size_carves_from_train_for_tasks_with_a_dev_file():
    dev = load_examples(DataConfig(task="sst2", split="dev", dev_size=50))
    train = load_examples(DataConfig(task="sst2", dev_size=50))
    assert len(dev) == 50 and len(train) == 550
    assert {ex.index for ex in dev}.isdisjoint({ex.index for ex in train})


def test_split_dev_rejects_too_large_and_empty_dev():
    examples = _all("rte")
    with pytest.raises(DataError, match="dev_size=300"):
        split_dev(examples, 300)
    with pytest.raises(DataError, match="dev_size=0"):
        load_examples(DataConfig(task="gsm8k", split="dev", dev_size=0))


# -- tokenization ----------------------------------------------------------------------------------


def _learned(feature) -> list[int]:
    return [tok for tok in feature["labels"] if tok != IGNORE_INDEX]


@pytest.mark.parametrize("task", TASKS)
def test_labels_cover_exactly_the_response_and_end_of_turn(tokenizer, task):
    for ex in load_examples(DataConfig(task=task, max_examples=5)):
        feature = tokenize_example(tokenizer, ex, 2048)
        ids, labels = feature["input_ids"], feature["labels"]
        assert len(ids) == len(labels) == len(feature["attention_mask"]) and set(feature["attention_mask"]) == {1}
        full_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}], tokenize=False
        )
        assert tokenizer.decode(ids) == full_text
        prompt_ids = tokenizer(chat_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # the prefix property
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        learned_at = [i for i, tok in enumerate(labels) if tok != IGNORE_INDEX]
        assert learned_at == list(range(len(prompt_ids), learned_at[-1] + 1))  # one contiguous span
        assert all(labels[i] == ids[i] for i in learned_at)
        assert tokenizer.decode(_learned(feature)) == ex.response + "<|im_end|>"
        assert labels[-1] == IGNORE_INDEX and tokenizer.decode(ids[learned_at[-1] + 1 :]) == "\n"


def test_template_without_prefix_property_is_rejected(default_model_path):
    tok = _fresh_tokenizer(default_model_path)
    # The generation prompt opens an "assistant" turn but full conversations write "bot": no prefix.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="not prefix-consistent"):
        tokenize_example(tok, Example(prompt="2+2?", response="4"), 128)


def test_tokenizer_without_chat_template_is_rejected(default_model_path):
    tok = _fresh_tokenizer(default_model_path)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenize_example(tok, Example(prompt="2+2?", response="4"), 128)


def test_long_prompt_is_cut_from_its_start_keeping_the_response(tokenizer):
    ex = load_examples(DataConfig(task="gsm8k", max_examples=1))[0]
    full = tokenize_example(tokenizer, ex, 4096)
    limit = len(full["input_ids"]) - 10
    cut = tokenize_example(tokenizer, ex, limit)
    assert len(cut["input_ids"]) <= limit
    assert _learned(cut) == _learned(full)  # the whole response and end-of-turn survive
    user = tokenizer.decode(cut["input_ids"]).split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert user.startswith("... ") and len(user) < len(ex.prompt)
    assert ex.prompt.endswith(user[len("... ") :])  # the end of the prompt (the question) is kept


def test_long_response_is_cut_at_the_end_and_short_prompts_dropped(tokenizer):
    ex = Example(prompt="Count.", response=" ".join(str(i) for i in range(300)))
    full = tokenize_example(tokenizer, ex, 4096)
    cut = tokenize_example(tokenizer, ex, 80)
    prompt_len = len(tokenizer(chat_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"])
    assert cut["input_ids"] == full["input_ids"][:80]
    assert len(_learned(cut)) == 80 - prompt_len
    assert tokenizer.eos_token_id not in _learned(cut)  # a cut answer must not teach the model to stop
    assert tokenize_example(tokenizer, ex, prompt_len) is None


def test_dataset_counts_dropped_and_cut_examples(tokenizer):
    ds = build_train_dataset(tokenizer, DataConfig(task="gsm8k", max_examples=40, max_length=80))
    stats = ds.stats
    assert stats["examples"] == 40
    assert stats["kept"] + stats["prompt_cut"] + stats["response_cut"] + stats["dropped"] == 40
    assert stats["dropped"] > 0 and stats["response_cut"] > 0
    assert len(ds) == 40 - stats["dropped"] == len(ds.examples)
    assert all(len(f["input_ids"]) <= 80 for f in ds.features)
    with pytest.raises(DataError, match="raise max_length"):
        build_train_dataset(tokenizer, DataConfig(task="gsm8k", max_examples=5, max_length=20))


def test_dataset_and_collator_pad_labels_with_ignore_index(tokenizer):
    import torch

    ds = build_train_dataset(tokenizer, DataConfig(task="sst2", max_examples=8))
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 8 and ds.stats["kept"] == 8
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert len(set(lengths)) > 1
    batch = make_collator(tokenizer)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape == batch["labels"].shape == (8, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["labels"][i, :n].tolist() == ds[i]["labels"]
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()


# -- scoring helper --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She sold 48+24 = 72 clips.\n#### 72", "72"),
        ("#### 1,080", "1080"),
        ("so 3 + 4 = 7 and #### -5 apples, not 9", "-5"),
        ("The answer is $1,234.50.", "1234.5"),
        ("First 12, then 18.00.", "18"),
        ("Answer: 3, 4 and 5", "5"),
        ("no number here", None),
        ("4 apples, so\n#### none", None),
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == expected


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_task_and_split_list_the_known_ones():
    with pytest.raises(DataError, match="known tasks: gsm8k, codealpaca, sst2, rte"):
        DataConfig(task="mnli")
    with pytest.raises(DataError, match="train, dev"):
        DataConfig(task="sst2", split="test")
    assert issubclass(DataError, PrunedLoraError)


def test_missing_file_says_where_the_data_lives(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError) as err:
        load_examples(DataConfig(task="sst2", path=missing))
    message = str(err.value)
    assert str(missing) in message and str(shared_data_dir()) in message and "vendored" in message


@pytest.mark.parametrize(
    "task,name,content,found",
    [
        ("sst2", "x.tsv", "text\tlabel\nfine movie\t1\n", "found text, label"),
        ("rte", "x.tsv", "premise\thypothesis\tlabel\na\tb\tentailment\n", "found premise, hypothesis, label"),
        ("gsm8k", "x.jsonl", '{"question": "q", "solution": "#### 1"}\n', "found question, solution"),
        ("codealpaca", "x.json", '[{"prompt": "p", "completion": "c"}]', "found prompt, completion"),
    ],
)
def test_wrong_columns_list_the_columns_found(tmp_path, task, name, content, found):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=found):
        load_examples(DataConfig(task=task, path=path, dev_size=0))


def test_bad_labels_and_malformed_files_are_reported_with_their_line(tmp_path):
    path = tmp_path / "sst2.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nodd\t2\n")
    with pytest.raises(DataError, match=r"sst2.tsv:3 has label '2'"):
        load_examples(DataConfig(task="sst2", path=path))
    path.write_text("sentence\tlabel\ngood\t1\textra\n")
    with pytest.raises(DataError, match=r"sst2.tsv:2 has 3 tab-separated fields"):
        load_examples(DataConfig(task="sst2", path=path))
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(DataError, match=r"g.jsonl:2 is not a JSON line"):
        load_examples(DataConfig(task="gsm8k", path=jsonl, dev_size=0))
    jsonl.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(DataError, match="####"):
        load_examples(DataConfig(task="gsm8k", path=jsonl, dev_size=0))
    obj = tmp_path / "c.json"
    obj.write_text('{"instruction": "i", "input": "", "output": "o"}')
    with pytest.raises(DataError, match="expected a list"):
        load_examples(DataConfig(task="codealpaca", path=obj, dev_size=0))


# -- task mixtures and loss on every token ---------------------------------------------------------


def test_a_mix_interleaves_the_tasks_in_turn_and_caps_the_result():
    gsm8k = load_examples(DataConfig(task="gsm8k"))
    code = load_examples(DataConfig(task="codealpaca"))
    mixed = load_examples(DataConfig(task="gsm8k", mix=["codealpaca"]))
    assert mixed[:6] == [gsm8k[0], code[0], gsm8k[1], code[1], gsm8k[2], code[2]]
    assert len(mixed) == len(gsm8k) + len(code)
    capped = load_examples(DataConfig(task="gsm8k", mix=["codealpaca"], max_examples=5))
    assert capped == mixed[:5]
    dev = load_examples(DataConfig(task="gsm8k", mix=["codealpaca"], split="dev"))
    assert not {e.prompt for e in dev} & {e.prompt for e in mixed}  # the carved dev split stays out


@pytest.mark.parametrize(
    "mix, message",
    [(["squad"], "unknown task"), (["gsm8k"], "other tasks"), (["codealpaca", "codealpaca"], "each once")],
)
def test_a_bad_mix_is_refused_with_one_line(mix, message):
    with pytest.raises(DataError, match=message):
        DataConfig(task="gsm8k", mix=mix)


def test_loss_on_must_be_response_or_all():
    with pytest.raises(DataError, match="loss_on must be one of response, last, all"):
        DataConfig(task="gsm8k", loss_on="prompt")


def test_loss_on_all_learns_every_token_and_response_only_masks_the_prompt(tokenizer):
    example = load_examples(DataConfig(task="gsm8k", max_examples=1))[0]
    everything = tokenize_example(tokenizer, example, 2048, loss_on="all")
    response = tokenize_example(tokenizer, example, 2048)
    assert everything["input_ids"] == response["input_ids"] == everything["labels"]
    assert IGNORE_INDEX in response["labels"] and response["labels"] != everything["labels"]
    config = DataConfig(task="gsm8k", mix=["codealpaca"], loss_on="all", max_examples=4, max_length=256)
    dataset = build_train_dataset(tokenizer, config)
    assert all(f["labels"] == f["input_ids"] for f in dataset.features) and len(dataset) == 4
