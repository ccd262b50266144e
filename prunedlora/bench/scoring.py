"""How the quality bench scores a trained adapter on a task's held-out split, with Hugging Face + PEFT.

- SST-2: accuracy on the dev file. Each candidate answer ("negative", "positive") is scored by the
  log-likelihood of the exact tokens training taught the model to write for it (the label word and
  the end-of-turn token, after the chat-rendered prompt); the higher one is the prediction. This is
  next-token scoring, so a model that would phrase its answer differently is still scored on the
  label words, and no sampling is involved.
- GSM8K: exact match of the final number of a greedy answer (``final_number`` on both sides) and the
  negative log-likelihood per token of the reference solution, on the dev split carved from train.
- CodeAlpaca: negative log-likelihood per token of the reference answer on the carved dev split.

NLL is averaged over every learned token of the split (the same tokens and labels training uses,
from ``tokenize_example``), so it is the held-out value of the training loss.

Per-example values are kept (``per_example`` in ``score_task``'s result: the gold label's log-prob
margin for classification, each example's summed log-likelihood and token count for NLL) so that
methods can be compared *paired*, on the same examples (``prunedlora.bench.paired``).

Cost: logits are computed only where they are read (the vocabulary projection of a 49k-token vocabulary
at every position is most of a small model's forward pass), and a classification example takes one
forward pass over the prompt and the answer tokens the candidates share, scored at the first token
where they differ ("negative" / "positive" differ at their first token).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from prunedlora.answers import final_number
from prunedlora.errors import PrunedLoraError
from prunedlora.tasks import TASK_PRESETS, DataConfig, Example, data_format, label_words_of, load_examples
from prunedlora.train.data import IGNORE_INDEX, chat_prompt, plain_ids

# What each built-in task reports, and which way is better (for tables and plots): its preset's.
TASK_METRICS: dict[str, tuple[tuple[str, str], ...]] = {name: p.metrics for name, p in TASK_PRESETS.items()}
FINAL_NUMBER = "final_number"  # an answer pattern: the last number of the text (GSM8K's "#### N")


class ScoringError(PrunedLoraError):
    """An adapter or split that cannot be scored."""


@dataclass
class EvalSettings:
    """How much of each split to score and how long GSM8K answers may be."""

    max_examples: int | None = None  # None: the whole dev split
    max_length: int = 512
    batch_size: int = 16
    max_new_tokens: int = 256
    exact_match_examples: int | None = None  # GSM8K: greedy answers on the first N only (None: all, 0: none)
    dev_size: int | None = None  # the dev carve of tasks without a dev file (None: DataConfig's default)


def load_model(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, dtype: str = "float32"):
    """The base model with a PEFT adapter (LoRA or AdaLoRA) merged in, in eval mode.

    Merging makes every forward pass as cheap as the base model's; an adapter PEFT cannot merge is
    kept as a wrapper, which computes the same function.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if adapter_dir is not None:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():
            # AdaLoRA keeps its rank_pattern as {"...lora_E": [kept?]}; PEFT's LoRA-style key check
            # warns about it, but AdaLoRA resizes its modules from it correctly.
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        try:
            model = model.merge_and_unload()
        except Exception:  # pragma: no cover - every adapter type used here merges
            pass
    return model.eval()


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dev_examples(
    task: str, data_path: str | os.PathLike | None, settings: EvalSettings, seed: int = 0
) -> list[Example]:
    """The held-out split training never sees: the task's dev file, or the split carved from train by
    ``DataConfig`` (seeded by ``seed``, the data seed of the training runs, so the carve is theirs)."""
    return load_examples(_dev_config(task, data_path, settings, seed))


def _dev_config(task: str, data_path: str | os.PathLike | None, settings: EvalSettings, seed: int) -> DataConfig:
    return DataConfig(
        task=task,
        path=data_path,
        split="dev",
        max_examples=settings.max_examples,
        dev_size=settings.dev_size,
        max_length=settings.max_length,
        seed=seed,
    )


def _batches(items: list, size: int, desc: str):
    """``items`` in chunks of ``size``, with a progress bar: scoring a whole dev split takes minutes
    to tens of minutes on a CPU, and a cell's log should show it moving."""
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=desc, unit="ex", leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            yield chunk
            bar.update(len(chunk))


def _pad(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits_at(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Float logits at ``(rows[k], positions[k])`` only, shape (k, vocab).

    Runs the decoder, then the output projection on the selected hidden states. A model whose
    causal-LM head does more than project (logit soft-capping) is run whole and indexed instead.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    plain_head = head is not None and decoder is not None and not getattr(model.config, "final_logit_softcapping", None)
    if plain_head:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head(hidden[rows, positions]).float()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, positions].float()


@torch.no_grad()
def token_logprob_sums(
    model, tokenizer, features: list[dict[str, list[int]]], batch_size: int
) -> list[tuple[float, int]]:
    """(sum of log p over the learned tokens, number of learned tokens) for each feature."""
    results = []
    for chunk in _batches(features, batch_size, "log-likelihoods"):
        batch = _pad(chunk, tokenizer.pad_token_id)
        targets = batch["labels"][:, 1:]
        rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # logits at t predict token t + 1
        logprobs = torch.log_softmax(logits_at(model, batch["input_ids"], batch["attention_mask"], rows, positions), -1)
        picked = logprobs.gather(-1, targets[rows, positions].unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, picked.double())
        counts = torch.bincount(rows, minlength=len(chunk))
        results.extend((float(sums[r]), int(counts[r])) for r in range(len(chunk)))
    return results


def example_nlls(
    model, tokenizer, examples: list[Example], settings: EvalSettings, loss_on: str = "response"
) -> list[tuple[int, float, int]]:
    """(index in ``examples``, summed log-likelihood, learned tokens) of every example that fits:
    the tokens training learns (``loss_on``: every assistant turn's reply, or the last one's)."""
    from prunedlora.train.data import tokenize_example

    fitted = [
        (i, f)
        for i, f in enumerate(tokenize_example(tokenizer, ex, settings.max_length, loss_on) for ex in examples)
        if f is not None
    ]
    if not fitted:
        raise ScoringError(f"no example fits max_length={settings.max_length}; raise it")
    sums = token_logprob_sums(model, tokenizer, [f for _, f in fitted], settings.batch_size)
    return [(i, total, count) for (i, _), (total, count) in zip(fitted, sums)]


def mean_nll(model, tokenizer, examples: list[Example], settings: EvalSettings) -> float:
    """Negative log-likelihood per learned token over the examples (token-weighted)."""
    per_example = example_nlls(model, tokenizer, examples, settings)
    return -sum(s for _, s, _ in per_example) / sum(n for _, _, n in per_example)


@torch.no_grad()
def classification_margins(
    model, tokenizer, examples: list[Example], labels: tuple[str, ...], settings: EvalSettings
) -> list[tuple[int, float]]:
    """(index in ``examples``, log p(gold) - max log p(other label)) for every example that fits.

    The candidates' token sequences (prompt, then each label as training renders it) share a prefix;
    one forward pass over that prefix gives the next-token distribution at the first token where they
    differ, and each label is scored by its token there. Positive margin = correct prediction.
    """
    from prunedlora.train.data import tokenize_example

    items = []  # (index, shared prefix ids, the candidates' tokens at the split, gold position)
    for index, example in enumerate(examples):
        candidates = [
            tokenize_example(tokenizer, Example(example.prompt, label, label), settings.max_length) for label in labels
        ]
        if any(c is None for c in candidates):
            continue
        ids = [c["input_ids"] for c in candidates]
        split = next(
            k for k in range(min(map(len, ids)) + 1) if k == min(map(len, ids)) or len({seq[k] for seq in ids}) > 1
        )
        tokens = [seq[split] if split < len(seq) else None for seq in ids]
        if None in tokens or len(set(tokens)) != len(tokens):
            raise ScoringError(f"labels {labels} cannot be told apart at one token after the shared prefix")
        items.append((index, ids[0][:split], tokens, labels.index(example.label)))
    if not items:
        raise ScoringError(f"no example fits max_length={settings.max_length}; raise it")
    margins = []
    for chunk in _batches(items, settings.batch_size, "label margins"):
        batch = _pad([{"input_ids": prefix, "labels": prefix} for _, prefix, _, _ in chunk], tokenizer.pad_token_id)
        rows = torch.arange(len(chunk))
        last = torch.tensor([len(prefix) - 1 for _, prefix, _, _ in chunk])
        logprobs = torch.log_softmax(logits_at(model, batch["input_ids"], batch["attention_mask"], rows, last), -1)
        for row, (index, _, tokens, gold) in enumerate(chunk):
            scores = logprobs[row, tokens]
            others = torch.cat([scores[:gold], scores[gold + 1 :]])
            margins.append((index, float(scores[gold] - others.max())))
    return margins


def classification_accuracy(
    model, tokenizer, examples: list[Example], labels: tuple[str, ...], settings: EvalSettings
) -> float:
    """Share of examples whose gold label gets the highest log-likelihood among ``labels``."""
    margins = classification_margins(model, tokenizer, examples, labels, settings)
    return sum(m > 0 for _, m in margins) / len(margins)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str | Example], settings: EvalSettings) -> list[str]:
    """Greedy completions of chat-rendered prompts, or of examples' conversations up to their final
    reply (left-padded batches, stop at end of turn)."""
    texts = [
        chat_prompt(tokenizer, p.prompt, p.history) if isinstance(p, Example) else chat_prompt(tokenizer, p)
        for p in prompts
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for chunk in _batches(texts, settings.batch_size, "greedy answers"):
            batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **batch, max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            answers.extend(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers


def answer_of(text: str, pattern: str = FINAL_NUMBER) -> str | None:
    """The answer a text gives: its final number, or the first group (else the whole match) of the
    last match of a regular expression; None when there is none."""
    if pattern == FINAL_NUMBER:
        return final_number(text)
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.groups() else last.group(0)).strip()


def exact_matches(predictions: list[str], references: list[str], pattern: str = FINAL_NUMBER) -> list[bool]:
    """Per prediction: does its answer equal the reference's (an answer-less reference never matches)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out = []
    for prediction, reference in zip(predictions, references):
        expected = answer_of(reference, pattern)
        out.append(expected is not None and answer_of(prediction, pattern) == expected)
    return out


def exact_match(predictions: list[str], references: list[str], pattern: str = FINAL_NUMBER) -> float:
    """Share of predictions whose answer equals the reference's (None never matches)."""
    hits = exact_matches(predictions, references, pattern)
    return sum(hits) / len(references)


def check_answer_pattern(pattern: str) -> None:
    """Refuse a regular expression that does not compile, in one line."""
    if pattern == FINAL_NUMBER:
        return
    try:
        re.compile(pattern)
    except re.error as err:
        raise ScoringError(f"answer pattern {pattern!r} is not a regular expression ({err})") from None


@torch.no_grad()
def text_nlls(model, tokenizer, examples: list[Example], settings: EvalSettings) -> list[tuple[int, float, int]]:
    """(index, summed log-likelihood, tokens) of each plain text, read in consecutive ``max_length``
    windows (each window's first token has no context and is not scored), for perplexity."""
    features, owners = [], []
    for index, example in enumerate(examples):
        ids = plain_ids(tokenizer, example)
        for start in range(0, len(ids), settings.max_length):
            window = ids[start : start + settings.max_length]
            if len(window) >= 2:
                features.append({"input_ids": window, "labels": window})
                owners.append(index)
    if not features:
        raise ScoringError("the texts hold fewer than two tokens; nothing to score")
    sums = token_logprob_sums(model, tokenizer, features, settings.batch_size)
    totals: dict[int, list[float]] = {}
    for owner, (total, count) in zip(owners, sums):
        acc = totals.setdefault(owner, [0.0, 0])
        acc[0] += total
        acc[1] += count
    return [(i, total, int(count)) for i, (total, count) in totals.items()]


def metrics_of(config: DataConfig, answer_pattern: str | None = None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(scorer, metrics) for data: ``classification`` (label accuracy), ``perplexity`` (text) or
    ``nll`` (the replies' NLL per token, and exact match when there is an answer pattern)."""
    if config.preset is not None:
        kind = "classification" if config.preset.format == "classification" else "nll"
        return kind, config.preset.metrics
    fmt = data_format(config)
    if fmt == "classification":
        return "classification", (("accuracy", "higher"),)
    if fmt == "text":
        return "perplexity", (("perplexity", "lower"),)
    metrics = (("nll", "lower"),)
    return "nll", ((("exact_match", "higher"),) + metrics) if answer_pattern else metrics


def score_examples(
    model,
    tokenizer,
    examples: list[Example],
    settings: EvalSettings,
    kind: str,
    labels: tuple[str, ...] = (),
    nll_name: str = "nll",
    answer_pattern: str | None = None,
    loss_on: str = "response",
) -> dict:
    """Every metric of one scorer (``metrics_of``) on ``examples``, with per-example values for pairing."""
    result: dict = {"eval_examples": len(examples)}
    if kind == "classification":
        margins = classification_margins(model, tokenizer, examples, labels, settings)
        result["accuracy"] = sum(m > 0 for _, m in margins) / len(margins)
        result["per_example"] = {"index": [i for i, _ in margins], "margin": [m for _, m in margins]}
        return result
    nlls = (
        text_nlls(model, tokenizer, examples, settings)
        if kind == "perplexity"
        else example_nlls(model, tokenizer, examples, settings, loss_on)
    )
    mean = -sum(s for _, s, _ in nlls) / sum(n for _, _, n in nlls)
    if kind == "perplexity":
        result["nll"], result["perplexity"] = mean, math.exp(mean)
    else:
        result[nll_name] = mean
    result["per_example"] = {
        "index": [i for i, _, _ in nlls],
        "logprob_sum": [s for _, s, _ in nlls],
        "tokens": [n for _, _, n in nlls],
    }
    if answer_pattern and settings.exact_match_examples != 0:
        # greedy decoding is the slow part: on the first ``exact_match_examples`` only (None: all)
        subset = examples[: settings.exact_match_examples] if settings.exact_match_examples else examples
        answers = greedy_answers(model, tokenizer, subset, settings)
        hits = exact_matches(answers, [ex.response for ex in subset], answer_pattern)
        result["exact_match"] = sum(hits) / len(subset)
        result["exact_match_examples"] = len(subset)
        result["exact_match_per_example"] = [bool(h) for h in hits]  # the first N examples, in order
        result["sample_answer"] = answers[0][:400] if answers else ""
    return result


def score_data(model, tokenizer, config: DataConfig, settings: EvalSettings, answer_pattern: str | None = None) -> dict:
    """Every metric of ``config``'s examples (see ``metrics_of``): a built-in task's or your own data's."""
    kind, metrics = metrics_of(config, answer_pattern)
    if config.preset is not None and config.preset.answer:
        answer_pattern = answer_pattern or config.preset.answer
    nll_name = next((m for m, _ in metrics if m.endswith("nll")), "nll")
    result = score_examples(
        model,
        tokenizer,
        load_examples(config),
        settings,
        kind,
        labels=label_words_of(config),
        nll_name=nll_name,
        answer_pattern=answer_pattern,
        loss_on=config.loss_on,
    )
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ScoringError(f"{config.name} {key} is {value}: the model's outputs are not finite")
    return result


def score_task(
    model, tokenizer, task: str, data_path: str | os.PathLike | None, settings: EvalSettings, data_seed: int = 0
) -> dict[str, float | int]:
    """Every metric of built-in ``task`` (see ``TASK_METRICS``) on its held-out split."""
    if task not in TASK_METRICS:
        raise ScoringError(f"no scorer for task {task!r}; known: {', '.join(TASK_METRICS)}")
    return score_data(model, tokenizer, _dev_config(task, data_path, settings, data_seed), settings)


def score_adapter(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None,
    task: str,
    data_path: str | os.PathLike | None = None,
    settings: EvalSettings | None = None,
    data_seed: int = 0,
) -> dict[str, float | int]:
    """Load the base model with the adapter merged and score it on ``task``'s held-out split."""
    settings = settings or EvalSettings()
    model = load_model(Path(model_dir), adapter_dir)
    tokenizer = load_tokenizer(model_dir)
    return score_task(model, tokenizer, task, data_path, settings, data_seed)
