"""Chat labels are right token by token: in a 3-turn conversation with a system prompt exactly the
assistant turns' replies (and their end-of-turn tokens) carry labels, only the last with
``loss_on="last"``, for SmolLM2's template, a hand-written Mistral-style template and one marking
``{% generation %}`` (read through the tokenizer's assistant mask). A template that rewrites earlier
turns is refused; a conversation too long loses whole exchanges from the oldest, never half a turn."""

from __future__ import annotations

import copy

import pytest

from prunedlora.formats import Example
from prunedlora.train.data import IGNORE_INDEX, ChatTemplateError, tokenize_example

# Mistral's layout ([INST] ... [/INST], the reply right after, end of sequence closing it; no generation
# prompt of its own), written by hand on SmolLM2's tokenizer, with <|im_end|> as its end of turn
MISTRAL_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)
# Gemma's layout, with the assistant's text marked for return_assistant_tokens_mask
GENERATION_MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<start_of_turn>model\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# rewrites every earlier assistant turn (as templates that strip reasoning do): not prefix-consistent
REWRITES_HISTORY = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[earlier reply]"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
CONVERSATION = Example(
    prompt="And doubled?",
    response="Fourteen.",
    history=(
        {"role": "system", "content": "You answer in words."},
        {"role": "user", "content": "What is three plus four?"},
        {"role": "assistant", "content": "Seven."},
    ),
)


def _tokenizer(base, template: str | None):
    tokenizer = copy.deepcopy(base)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def learned_text(tokenizer, feature) -> list[str]:
    """The labelled stretches of a feature, decoded, in order."""
    spans, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


@pytest.mark.parametrize("template", [None, MISTRAL_STYLE, GENERATION_MARKED], ids=["smollm2", "mistral", "generation"])
def test_exactly_the_assistant_turns_carry_labels(default_tokenizer, template):
    tokenizer = _tokenizer(default_tokenizer, template)
    every = learned_text(tokenizer, tokenize_example(tokenizer, CONVERSATION, 512))
    assert every == ["Seven.<|im_end|>", "Fourteen.<|im_end|>"]
    last = learned_text(tokenizer, tokenize_example(tokenizer, CONVERSATION, 512, loss_on="last"))
    assert last == ["Fourteen.<|im_end|>"]
    feature = tokenize_example(tokenizer, CONVERSATION, 512, loss_on="all")
    assert feature["labels"] == feature["input_ids"]


def test_a_template_that_rewrites_earlier_turns_is_refused(default_tokenizer):
    tokenizer = _tokenizer(default_tokenizer, REWRITES_HISTORY)
    with pytest.raises(ChatTemplateError, match="not prefix-consistent"):
        tokenize_example(tokenizer, CONVERSATION, 512)


def test_too_long_conversations_drop_whole_exchanges_from_the_oldest(default_tokenizer):
    tokenizer = default_tokenizer
    long_history = (
        {"role": "system", "content": "You answer in words."},
        {"role": "user", "content": "Tell me a long story. " * 20},
        {"role": "assistant", "content": "Once upon a time. " * 20},
        *CONVERSATION.history[1:],
    )
    example = Example(CONVERSATION.prompt, CONVERSATION.response, history=long_history)
    whole = tokenize_example(tokenizer, example, 1024)
    short = tokenize_example(tokenizer, CONVERSATION, 1024)
    fitted = tokenize_example(tokenizer, example, len(short["input_ids"]))
    assert len(whole["input_ids"]) > len(short["input_ids"])
    assert fitted == short  # the story's exchange is gone whole; the system prompt stays
    assert "You answer in words." in tokenizer.decode(fitted["input_ids"])
