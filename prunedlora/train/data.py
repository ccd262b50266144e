"""Instruction data for training: task examples (read by :mod:`prunedlora.tasks`) rendered with the
model's own chat template, with the loss on the response only.

Why the chat template: the adapters are served by vLLM's chat endpoint, which renders requests
with that same template; training on another rendering would teach the model a prompt format it
never sees at serving time. Why loss on the response only: the prompt is given at inference, so
learning to predict it spends capacity (and, for short answers such as a sentiment word, most of
the gradient) on text the model never has to produce.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch.utils.data import Dataset

from prunedlora.tasks import DataConfig, DataError, Example, load_examples

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what torch's cross-entropy, the Trainer and DataCollatorForSeq2Seq skip
_ELLIPSIS = "... "


class ChatTemplateError(DataError):
    """A tokenizer whose chat template cannot give response-only labels."""


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; training renders "
            "examples as chat turns, so use an instruct model or set tokenizer.chat_template"
        )


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it at inference (user turn + assistant header), as text.

    Evaluation must use exactly this rendering: it is the prefix every training example starts with.
    """
    _check_template(tokenizer)
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_text(tokenizer, prompt: str, response: str) -> str:
    """A whole example (user turn + assistant turn) as text, exactly as training renders it.

    Anything that must see the inputs training sees (e.g. SALR's calibration text) renders with this.
    """
    _check_template(tokenizer)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _ids(tokenizer, text: str) -> list[int]:
    # The template writes any BOS itself; letting the tokenizer add one would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class _Rendered:
    input_ids: list[int]
    prompt_len: int
    learned: int  # tokens after the prompt that carry loss: the response and the end-of-turn token


def _render(tokenizer, prompt: str, response: str) -> _Rendered:
    prompt_text = chat_prompt(tokenizer, prompt)
    full_text = chat_text(tokenizer, prompt, response)
    prompt_ids = _ids(tokenizer, prompt_text)
    full_ids = _ids(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(full_ids))
        raise ChatTemplateError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} is not prefix-consistent: "
            f"the prompt rendered with add_generation_prompt=True differs from the start of the full "
            f"conversation at token {at} ({prompt_text[-40:]!r} vs {full_text[len(prompt_text) - 40 : len(prompt_text)]!r}); "
            "response-only labels need that prefix, so fix tokenizer.chat_template or use another model"
        )
    completion = full_ids[len(prompt_ids) :]
    return _Rendered(
        full_ids, len(prompt_ids), _learned_length(tokenizer, full_text[len(prompt_text) :], response, completion)
    )


def _learned_length(tokenizer, completion_text: str, response: str, completion: list[int]) -> int:
    """How many completion tokens carry loss: through the end-of-turn token, not the template's
    trailing separator (``<|im_end|>`` is learned so the model learns to stop, the ``\\n`` after it
    is not: nothing is generated after the stop)."""
    answer = response.strip()
    at = completion_text.rfind(answer) if answer else -1
    if at < 0:
        return len(completion)
    suffix = _ids(tokenizer, completion_text[at + len(answer) :])
    if not suffix or completion[-len(suffix) :] != suffix:
        return len(completion)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    end = next((i for i, tok in enumerate(suffix) if tok in special), len(suffix) - 1)
    return len(completion) - len(suffix) + end + 1


def _shorten_prompt(tokenizer, example: Example, max_length: int, rendered: _Rendered) -> _Rendered | None:
    """The example with its prompt cut from the start so the whole response fits, or None when that
    would remove more than half of the prompt (an answer to a question mostly not asked)."""
    content = _ids(tokenizer, example.prompt)
    min_keep = math.ceil(len(content) / 2)
    keep = len(content) - (len(rendered.input_ids) - max_length)
    while keep >= min_keep and keep > 0:
        text = _ELLIPSIS + tokenizer.decode(content[-keep:], skip_special_tokens=False).lstrip()
        candidate = _render(tokenizer, text, example.response)
        overflow = len(candidate.input_ids) - max_length
        if overflow <= 0:
            return candidate
        keep -= overflow
    return None


def _tokenize(
    tokenizer, example: Example, max_length: int, loss_on: str = "response"
) -> tuple[dict[str, list[int]] | None, str]:
    _check_template(tokenizer)
    rendered = _render(tokenizer, example.prompt, example.response)
    status = "kept"
    if len(rendered.input_ids) > max_length:
        shortened = _shorten_prompt(tokenizer, example, max_length, rendered)
        if shortened is not None:
            rendered, status = shortened, "prompt_cut"
        elif rendered.prompt_len < max_length:
            keep_learned = min(rendered.learned, max_length - rendered.prompt_len)
            rendered = _Rendered(rendered.input_ids[:max_length], rendered.prompt_len, keep_learned)
            status = "response_cut"
        else:
            return None, "dropped"
    ids = rendered.input_ids
    start, stop = rendered.prompt_len, rendered.prompt_len + rendered.learned
    if loss_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * start + ids[start:stop] + [IGNORE_INDEX] * (len(ids) - stop)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, status


def tokenize_example(
    tokenizer, example: Example, max_length: int, loss_on: str = "response"
) -> dict[str, list[int]] | None:
    """``input_ids``, ``attention_mask`` and ``labels`` for one example, or None if it cannot fit.

    The user turn is the prompt, the assistant turn the response, rendered by the tokenizer's chat
    template. Labels are ``IGNORE_INDEX`` on the prompt and the assistant header, and on anything
    the template writes after the end-of-turn token. Over ``max_length``, the prompt is cut from its
    start (keeping the response whole) if at least half of it remains; otherwise the response is
    cut at the end; an example whose prompt alone fills ``max_length`` is dropped (None).

    Raises ChatTemplateError when the template has no prefix property (the prompt rendered with
    ``add_generation_prompt=True`` is not a token prefix of the full rendering): the split between
    masked and learned tokens would then be wrong. With ``loss_on="all"`` every kept token is
    learned (labels equal ``input_ids``); the cutting rules are the same.
    """
    return _tokenize(tokenizer, example, max_length, loss_on)[0]


class TokenizedDataset(Dataset):
    """A list of tokenized examples as a map-style torch Dataset, with counts of what was cut.

    ``stats``: examples read, kept whole, prompt_cut, response_cut, dropped (did not fit).
    """

    def __init__(self, features: list[dict[str, list[int]]], stats: dict[str, int], examples: list[Example]):
        self.features = features
        self.stats = stats
        self.examples = examples  # the kept ones, aligned with features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def build_train_dataset(tokenizer, config: DataConfig, progress: bool | None = None) -> TokenizedDataset:
    """The tokenized examples of ``config`` as a torch Dataset for the Trainer.

    Examples that cannot fit ``config.max_length`` are dropped and counted in ``dataset.stats``
    (a warning is logged); all of them being dropped is an error.
    """
    from tqdm.auto import tqdm

    examples = load_examples(config)
    stats = {"examples": len(examples), "kept": 0, "prompt_cut": 0, "response_cut": 0, "dropped": 0}
    features, kept = [], []
    disable = (not progress) if progress is not None else (None if len(examples) >= 2000 else True)
    for example in tqdm(examples, desc=f"tokenizing {config.task}", disable=disable):
        feature, status = _tokenize(tokenizer, example, config.max_length, config.loss_on)
        stats[status] += 1
        if feature is not None:
            features.append(feature)
            kept.append(example)
    if not features:
        raise DataError(
            f"every one of the {len(examples)} {config.task} examples has a prompt longer than "
            f"max_length={config.max_length} tokens; raise max_length"
        )
    if stats["dropped"]:
        logger.warning(
            "%s: dropped %d of %d examples whose prompt leaves no room for the response within %d tokens",
            config.task,
            stats["dropped"],
            len(examples),
            config.max_length,
        )
    return TokenizedDataset(features, stats, kept)


def make_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """transformers' DataCollatorForSeq2Seq: pads input_ids with the pad token, labels with -100.

    A tokenizer without a pad token gets its end-of-sequence token as one (padded positions are
    masked out of attention and loss, so which token pads does not matter).
    """
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        label_pad_token_id=IGNORE_INDEX,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )
