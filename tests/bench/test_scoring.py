"""Scoring: held-out NLL equals the training loss on the same tokens, label scoring picks the most
likely label word, exact match compares final numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prunedlora.bench.scoring import (
    EvalSettings,
    classification_accuracy,
    dev_examples,
    exact_match,
    load_model,
    load_tokenizer,
    mean_nll,
    score_task,
)
from prunedlora.tasks import Example
from prunedlora.train.data import make_collator, tokenize_example


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    return load_model(tiny_model_path), load_tokenizer(tiny_model_path)


def test_mean_nll_is_the_models_own_loss_on_the_learned_tokens(tiny):
    model, tokenizer = tiny
    examples = dev_examples("gsm8k", None, EvalSettings(max_examples=3))
    features = [tokenize_example(tokenizer, ex, 512) for ex in examples]
    expected_total, expected_count = 0.0, 0
    with torch.no_grad():
        for feature in features:
            batch = make_collator(tokenizer)([feature])
            n = int((batch["labels"][:, 1:] != -100).sum())
            expected_total += float(model(**batch).loss) * n  # HF's loss is the mean over learned tokens
            expected_count += n
    got = mean_nll(model, tokenizer, examples, EvalSettings(batch_size=2))  # padded batches of two
    assert got == pytest.approx(expected_total / expected_count, rel=1e-4)


class _Prefers:
    """A fake causal LM whose next-token distribution always favours ``token``."""

    def __init__(self, vocab: int, token: int):
        self.vocab, self.token = vocab, token

    def __call__(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 10.0
        return SimpleNamespace(logits=logits)


def test_accuracy_follows_the_label_the_model_prefers(tokenizer_and_labels):
    tokenizer, examples = tokenizer_and_labels
    share_positive = sum(ex.label == "positive" for ex in examples) / len(examples)
    for word, expected in (("positive", share_positive), ("negative", 1 - share_positive)):
        feature = tokenize_example(tokenizer, Example("x", word, word), 512)
        first_label_token = next(t for t, label in zip(feature["input_ids"], feature["labels"]) if label != -100)
        model = _Prefers(len(tokenizer), first_label_token)
        got = classification_accuracy(model, tokenizer, examples, ("negative", "positive"), EvalSettings(batch_size=4))
        assert got == pytest.approx(expected)


@pytest.fixture(scope="module")
def tokenizer_and_labels(tiny_model_path):
    examples = dev_examples("sst2", None, EvalSettings(max_examples=20))
    assert {ex.label for ex in examples} == {"negative", "positive"}
    return load_tokenizer(tiny_model_path), examples


def test_exact_match_compares_final_numbers():
    refs = ["so 3 + 4 = 7\n#### 7", "#### 1,200", "#### 5"]
    assert exact_match(["The answer is 7.", "It costs $1200.00", "no idea"], refs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match(["1"], refs)


def test_score_task_reports_each_tasks_metrics(tiny):
    model, tokenizer = tiny
    settings = EvalSettings(max_examples=2, max_new_tokens=4, batch_size=2)
    gsm8k = score_task(model, tokenizer, "gsm8k", None, settings)
    assert {"exact_match", "answer_nll", "eval_examples"} <= set(gsm8k) and gsm8k["eval_examples"] == 2
    # the NLLs are mean_nll's (itself checked against the model's own loss above) on the same examples
    for task, key in (("gsm8k", "answer_nll"), ("codealpaca", "nll")):
        expected = mean_nll(model, tokenizer, dev_examples(task, None, settings), settings)
        result = gsm8k if task == "gsm8k" else score_task(model, tokenizer, task, None, settings)
        assert result[key] == pytest.approx(expected, rel=1e-9)


def test_score_task_accuracy_is_exact_on_a_model_that_always_prefers_one_label(tokenizer_and_labels):
    """Break: accuracy counted over the wrong examples or with the margin's sign flipped -> red."""
    tokenizer, _ = tokenizer_and_labels
    settings = EvalSettings(max_examples=20, batch_size=4)
    examples = dev_examples("sst2", None, settings)
    share_positive = sum(ex.label == "positive" for ex in examples) / len(examples)
    assert 0 < share_positive < 1
    for word, expected in (("positive", share_positive), ("negative", 1 - share_positive)):
        feature = tokenize_example(tokenizer, Example("x", word, word), 512)
        first_label_token = next(t for t, label in zip(feature["input_ids"], feature["labels"]) if label != -100)
        result = score_task(_Prefers(len(tokenizer), first_label_token), tokenizer, "sst2", None, settings)
        assert result["eval_examples"] == 20 and result["accuracy"] == pytest.approx(expected, abs=0)


def test_logits_at_selected_positions_equal_the_full_forward(tiny):
    from prunedlora.bench.scoring import logits_at

    model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    rows, positions = torch.tensor([0, 1, 2, 2]), torch.tensor([8, 5, 0, 4])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[rows, positions]
        torch.testing.assert_close(logits_at(model, ids, mask, rows, positions), full.float(), rtol=1e-5, atol=1e-5)


def test_margins_are_the_gold_label_log_prob_lead_at_the_first_label_token(tiny, tokenizer_and_labels):
    """One forward pass per example, checked against the full forward of each candidate."""
    from prunedlora.bench.scoring import classification_margins

    model, tokenizer = tiny
    _, examples = tokenizer_and_labels
    margins = classification_margins(
        model, tokenizer, examples[:6], ("negative", "positive"), EvalSettings(batch_size=4)
    )
    assert [i for i, _ in margins] == list(range(6))
    for (index, margin), example in zip(margins, examples[:6]):
        lead = {}
        for label in ("negative", "positive"):
            feature = tokenize_example(tokenizer, Example(example.prompt, label, label), 512)
            at = next(k for k, lab in enumerate(feature["labels"]) if lab != -100)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([feature["input_ids"][:at]])).logits[0, -1]
            lead[label] = float(torch.log_softmax(logits.float(), -1)[feature["input_ids"][at]])
        other = "positive" if example.label == "negative" else "negative"
        assert margin == pytest.approx(lead[example.label] - lead[other], abs=1e-4)
    accuracy = classification_accuracy(model, tokenizer, examples[:6], ("negative", "positive"), EvalSettings())
    assert accuracy == sum(m > 0 for _, m in margins) / 6
