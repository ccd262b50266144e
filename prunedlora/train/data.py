"""Training data: examples (read by :mod:`prunedlora.tasks`) rendered with the model's own chat
template, with the loss on the assistant's replies only; plain text packed into blocks.

Why the chat template: the adapters are served by vLLM's chat endpoint, which renders requests
with that same template; training on another rendering would teach the model a prompt format it
never sees at serving time. Why loss on the response only: the prompt is given at inference, so
learning to predict it spends capacity (and, for short answers such as a sentiment word, most of
the gradient) on text the model never has to produce.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace

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


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_prompt(tokenizer, prompt: str, history: tuple[dict[str, str], ...] | list = ()) -> str:
    """The prompt as the model sees it at inference (earlier turns, the user turn and the assistant
    header), as text. Evaluation must use exactly this rendering: every training example of the
    conversation starts with it."""
    _check_template(tokenizer)
    messages = [*history, {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_text(tokenizer, prompt: str, response: str, history: tuple[dict[str, str], ...] | list = ()) -> str:
    """A whole example (earlier turns, user turn, assistant turn) as text, exactly as training renders it.

    Anything that must see the inputs training sees (e.g. SALR's calibration text) renders with this.
    """
    _check_template(tokenizer)
    messages = [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _ids(tokenizer, text: str) -> list[int]:
    # The template writes any BOS itself; letting the tokenizer add one would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class _Rendered:
    """A conversation's tokens and, per assistant turn, the span ``[start, stop)`` that carries loss
    (the reply and its end-of-turn token)."""

    input_ids: list[int]
    spans: list[tuple[int, int]]

    @property
    def prompt_len(self) -> int:
        """Tokens before the final reply."""
        return self.spans[-1][0]


def _template_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "this tokenizer"


def _marks_generation(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def _render(tokenizer, messages: list[dict[str, str]]) -> _Rendered:
    """One rendering of the whole conversation, with the assistant turns' spans.

    Where the template marks ``{% generation %}``, the spans are the tokenizer's assistant mask;
    otherwise each turn's span starts where the conversation up to it, rendered with
    ``add_generation_prompt=True``, ends: that rendering must be a token prefix of the whole one
    (the template is prefix-consistent), or the split between prompt and reply would be wrong.
    """
    if _marks_generation(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        spans, start = [], None
        for i, flag in enumerate([*mask, 0]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                spans.append((start, i))
                start = None
        if len(spans) != sum(m["role"] == "assistant" for m in messages):
            raise ChatTemplateError(
                f"the chat template of {_template_name(tokenizer)!r} marks {len(spans)} generation spans for "
                f"{sum(m['role'] == 'assistant' for m in messages)} assistant turns; fix its {{% generation %}} tags"
            )
        return _Rendered(ids, spans)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    full_ids = _ids(tokenizer, full_text)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        turn_text = (
            full_text if k == len(messages) - 1 else tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        )
        prompt_ids, turn_ids = _ids(tokenizer, prompt_text), _ids(tokenizer, turn_text)
        for head, text in ((prompt_ids, prompt_text), (turn_ids, turn_text)):
            if full_ids[: len(head)] != head:
                at = next((i for i, (a, b) in enumerate(zip(head, full_ids)) if a != b), len(full_ids))
                raise ChatTemplateError(
                    f"the chat template of {_template_name(tokenizer)!r} is not prefix-consistent: the conversation "
                    f"up to turn {k} rendered alone differs from the start of the whole conversation at token {at} "
                    f"({text[-40:]!r} vs {full_text[max(0, len(text) - 40) : len(text)]!r}); labels per assistant "
                    "turn need that prefix, so fix tokenizer.chat_template (or mark {% generation %}) or use another model"
                )
        learned = _learned_length(
            tokenizer, turn_text[len(prompt_text) :], message["content"], turn_ids[len(prompt_ids) :]
        )
        spans.append((len(prompt_ids), len(prompt_ids) + learned))
    return _Rendered(full_ids, spans)


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


def _drop_oldest_exchange(example: Example) -> Example | None:
    """The conversation without its oldest user/assistant exchange (a system message stays), or None
    when only the final exchange is left: a long conversation loses whole turns, never half of one."""
    system = [m for m in example.history[:1] if m["role"] == "system"]
    turns = list(example.history[len(system) :])
    if len(turns) < 2:
        return None
    return replace(example, history=tuple(system + turns[2:]))


def _shorten_prompt(tokenizer, example: Example, max_length: int, rendered: _Rendered) -> _Rendered | None:
    """The example with its prompt cut from the start so the whole response fits, or None when that
    would remove more than half of the prompt (an answer to a question mostly not asked)."""
    content = _ids(tokenizer, example.prompt)
    min_keep = math.ceil(len(content) / 2)
    keep = len(content) - (len(rendered.input_ids) - max_length)
    while keep >= min_keep and keep > 0:
        text = _ELLIPSIS + tokenizer.decode(content[-keep:], skip_special_tokens=False).lstrip()
        candidate = _render(tokenizer, replace(example, prompt=text).messages)
        overflow = len(candidate.input_ids) - max_length
        if overflow <= 0:
            return candidate
        keep -= overflow
    return None


def plain_ids(tokenizer, example: Example) -> list[int]:
    """A ``text`` example's tokens: the text as the tokenizer writes it, then end-of-sequence (so
    packed texts do not run into each other)."""
    ids = list(tokenizer(example.response)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def _feature(ids: list[int], labels: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _tokenize(
    tokenizer, example: Example, max_length: int, loss_on: str = "response"
) -> tuple[dict[str, list[int]] | None, str]:
    if example.plain:
        ids = plain_ids(tokenizer, example)
        status = "kept" if len(ids) <= max_length else "response_cut"
        ids = ids[:max_length]
        return _feature(ids, list(ids)), status
    _check_template(tokenizer)
    rendered = _render(tokenizer, example.messages)
    status = "kept"
    while len(rendered.input_ids) > max_length and (shorter := _drop_oldest_exchange(example)) is not None:
        example, status = shorter, "turns_dropped"
        rendered = _render(tokenizer, example.messages)
    if len(rendered.input_ids) > max_length:
        shortened = _shorten_prompt(tokenizer, example, max_length, rendered)
        if shortened is not None:
            rendered, status = shortened, "prompt_cut"
        elif rendered.prompt_len < max_length:
            start, stop = rendered.spans[-1]
            rendered = _Rendered(rendered.input_ids[:max_length], [(start, min(stop, max_length))])
            status = "response_cut"
        else:
            return None, "dropped"
    ids = rendered.input_ids
    if loss_on == "all":
        return _feature(ids, list(ids)), status
    spans = rendered.spans[-1:] if loss_on == "last" else rendered.spans
    labels = [IGNORE_INDEX] * len(ids)
    for start, stop in spans:
        labels[start:stop] = ids[start:stop]
    return _feature(ids, labels), status


def tokenize_example(
    tokenizer, example: Example, max_length: int, loss_on: str = "response"
) -> dict[str, list[int]] | None:
    """``input_ids``, ``attention_mask`` and ``labels`` for one example, or None if it cannot fit.

    The conversation (earlier turns, the user turn, the assistant's reply) is rendered once by the
    tokenizer's chat template. Labels are ``IGNORE_INDEX`` everywhere but the assistant turns' replies
    and their end-of-turn tokens (``loss_on="response"``), the final reply only (``"last"``), or
    nowhere (``"all"``: every token learned). Over ``max_length``, a conversation first loses whole
    exchanges from the oldest (a system message stays); then the final prompt is cut from its start
    (keeping the response whole) if at least half of it remains; otherwise the response is cut at
    the end; an example whose prompt alone fills ``max_length`` is dropped (None). A ``text`` example
    (``plain``) is its tokens, cut to ``max_length``, all learned.

    Raises ChatTemplateError when the template has no prefix property (a turn's prompt rendered with
    ``add_generation_prompt=True`` is not a token prefix of the full rendering) and marks no
    ``{% generation %}`` spans: the split between masked and learned tokens would then be wrong.
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


def _packed(tokenizer, examples: list[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Texts concatenated (each ending in end-of-sequence) and cut into ``max_length`` blocks, every
    token learned: continued pretraining's usual shape, no padding spent. A last block shorter than
    two tokens teaches nothing and is dropped."""
    stream = [tok for ex in examples for tok in plain_ids(tokenizer, ex)]
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return [_feature(b, list(b)) for b in blocks if len(b) >= 2]


def build_train_dataset(
    tokenizer, config: DataConfig, progress: bool | None = None, split: str | None = None
) -> TokenizedDataset:
    """The tokenized examples of ``config`` (its ``split``, or ``split`` when given) as a torch Dataset.

    Examples that cannot fit ``config.max_length`` are dropped and counted in ``dataset.stats``
    (a warning is logged); all of them being dropped is an error. ``text`` data is packed into
    ``max_length`` blocks when ``config.packing`` (``stats["blocks"]``), else each text is cut.
    """
    from tqdm.auto import tqdm

    if split is not None and split != config.split:
        config = replace(config, split=split)
    examples = load_examples(config)
    stats = {"examples": len(examples), "kept": 0, "turns_dropped": 0, "prompt_cut": 0, "response_cut": 0, "dropped": 0}
    if examples and all(ex.plain for ex in examples) and config.packing:
        features = _packed(tokenizer, examples, config.max_length)
        stats.update(kept=len(examples), blocks=len(features))
        if not features:
            raise DataError(f"{config.name}: the texts hold fewer than two tokens in all; nothing to learn")
        return TokenizedDataset(features, stats, examples)
    features, kept = [], []
    disable = (not progress) if progress is not None else (None if len(examples) >= 2000 else True)
    for example in tqdm(examples, desc=f"tokenizing {config.name}", disable=disable):
        feature, status = _tokenize(tokenizer, example, config.max_length, config.loss_on)
        stats[status] += 1
        if feature is not None:
            features.append(feature)
            kept.append(example)
    if not features:
        raise DataError(
            f"every one of the {len(examples)} {config.name} examples has a prompt longer than "
            f"max_length={config.max_length} tokens; raise max_length"
        )
    if stats["dropped"]:
        logger.warning(
            "%s: dropped %d of %d examples whose prompt leaves no room for the response within %d tokens",
            config.name,
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
