"""Perplexity: exp(mean NLL) over non-overlapping windows, checked against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from prunedlora.perplexity import (
    PerplexityConfig,
    PerplexityError,
    cut_windows,
    join_lines,
    perplexity,
    perplexity_of_ids,
    read_corpus,
)
from tests.conftest import tiny_llama_config

VOCAB = 61


class CharTokenizer:
    """One token per character (code point mod VOCAB): enough to drive a random model."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])}


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).eval()


def hand_ppl(model, ids: torch.Tensor, window: int, count: int) -> tuple[float, int]:
    nlls = []
    for i in range(count):
        chunk = ids[i * window : (i + 1) * window]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), dim=-1)
        nlls += [-float(logp[t, chunk[t + 1]]) for t in range(window - 1)]
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


def test_cut_windows_exact():
    ids = torch.arange(23)
    windows = cut_windows(ids, 5)
    assert windows.tolist() == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert cut_windows(ids, 5, max_windows=2).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert cut_windows(ids, 23).shape == (1, 23)


def test_perplexity_matches_hand_computation(tiny_model, tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 4
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    ids = CharTokenizer()(text)["input_ids"][0]
    expected, tokens = hand_ppl(tiny_model, ids, window=16, count=len(ids) // 16)
    result = perplexity(tiny_model, CharTokenizer(), path, PerplexityConfig(window=16, batch_size=3, progress=False))
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.tokens == tokens and result.windows == result.total_windows == len(ids) // 16
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)
    assert result.corpus == "corpus.txt" and result.window == 16 and result.max_windows is None


def test_window_nlls_are_each_windows_sum_in_corpus_order(tiny_model):
    # 7 windows in batches of 3: the last batch is short, and every window keeps its own sum and place
    ids = torch.randint(0, VOCAB, (75,), generator=torch.Generator().manual_seed(2))
    result = perplexity_of_ids(tiny_model, ids, PerplexityConfig(window=10, batch_size=3, progress=False))
    expected = [math.log(hand_ppl(tiny_model, ids[i * 10 :], window=10, count=1)[0]) * 9 for i in range(7)]
    assert result.window_nlls == pytest.approx(expected, rel=1e-5)
    assert math.fsum(result.window_nlls) / result.tokens == pytest.approx(result.nll, rel=1e-12)
    assert result.to_dict()["window_nlls"] == result.window_nlls


def test_max_windows_is_recorded_and_uses_the_first_windows(tiny_model):
    ids = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(1))
    result = perplexity_of_ids(tiny_model, ids, PerplexityConfig(window=10, max_windows=3, progress=False))
    expected, tokens = hand_ppl(tiny_model, ids, window=10, count=3)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert (result.windows, result.total_windows, result.tokens, result.max_windows) == (3, 10, tokens, 3)
    assert "first 3 of 10 windows" in result.summary()


def test_joins():
    assert join_lines(" = A = \r\n\r\n b c \r\n", "wikitext") == " = A = \n\n\n\n\n b c \n\n\n"
    assert join_lines(" a b \n c \n\n", "sentences") == "a b c"
    assert join_lines("x\ny", "raw") == "x\ny"


def test_errors(tmp_path):
    with pytest.raises(PerplexityError, match="not found"):
        read_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(PerplexityError, match="empty"):
        read_corpus(empty)
    with pytest.raises(PerplexityError, match="at least 2"):
        PerplexityConfig(window=1)
    with pytest.raises(PerplexityError, match="at least 2"):
        cut_windows(torch.arange(10), 1)
    with pytest.raises(PerplexityError, match="fewer than one window"):
        cut_windows(torch.arange(10), 11)
    with pytest.raises(PerplexityError, match="max_windows"):
        PerplexityConfig(max_windows=0)
    with pytest.raises(PerplexityError, match="unknown join"):
        join_lines("x", "words")


def test_shared_corpora_resolve():
    from prunedlora.perplexity import corpus_path

    assert corpus_path("wikitext2").name == "wiki.test.raw"
    assert corpus_path("ptb").name == "ptb.test.txt"
