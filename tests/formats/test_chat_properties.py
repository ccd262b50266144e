"""Property tests for chat rows: any ``messages`` value (any roles, contents, types, lengths) is either
read into an example whose rendering labels exactly its assistant replies, or refused with the
project's own one-line error naming the row; never another exception."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunedlora.errors import PrunedLoraError
from prunedlora.formats.base import FormatOptions
from prunedlora.formats.chat import Chat
from prunedlora.train.data import IGNORE_INDEX, tokenize_example

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
CONTENT = st.one_of(
    st.text(max_size=12), st.sampled_from(["Hi", "Seven.", " ", "<|im_end|>"]), st.integers(), st.none()
)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot", ""]), "content": CONTENT}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"])}),
    st.text(max_size=4),
)
# mostly well-formed conversations, so the rendering is tested too
WELL_FORMED = st.lists(
    st.tuples(st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10)), min_size=1, max_size=3
).map(
    lambda pairs: [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
)


@PROPERTY
@given(st.one_of(WELL_FORMED, WELL_FORMED, st.lists(MESSAGE, max_size=5), CONTENT))
def test_any_messages_value_is_read_or_refused_in_one_line(default_tokenizer, messages):
    try:
        (example,) = Chat().examples([{"messages": messages}], "chat.jsonl", FormatOptions())
    except PrunedLoraError as err:
        assert "chat.jsonl row 1" in str(err) and "\n" not in str(err)
        return
    feature = tokenize_example(default_tokenizer, example, 4096)
    learned = [t for t, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE_INDEX]
    assert learned, "an assistant turn must carry loss"
    assert default_tokenizer.decode(learned).endswith("<|im_end|>")
    replies = sum(m["role"] == "assistant" for m in example.messages)
    assert default_tokenizer.decode(learned).count("<|im_end|>") >= replies
