"""Perplexity of a causal language model on a whole test corpus (WikiText-2, PTB or any text file).

The protocol is the one pruning papers (SparseGPT, Wanda, SALR) report, so numbers compare with
theirs in kind: the corpus is joined into one text the way the Hugging Face data sets are joined by
those evaluations, tokenized once, cut into non-overlapping windows of ``window`` tokens (the tail
shorter than a window is dropped), and perplexity is exp of the mean next-token NLL over every
predicted token (``window - 1`` per window: the first token of a window has no context). Windows
are independent, so the first ``max_windows`` give a cheaper estimate on slow machines; the cap is
recorded in the result so a number is never quoted without it.

Nothing here knows about pruning: any Hugging Face causal LM works, PEFT-wrapped ones too (SALR's
sparse bases and LoRAPrune's sliced models are evaluated the same way).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prunedlora.errors import PrunedLoraError

# Corpus name -> (file under the shared data folder, how its lines are joined)
CORPORA = {"wikitext2": ("wikitext2/wiki.test.raw", "wikitext"), "ptb": ("ptb/ptb.test.txt", "sentences")}
JOINS = ("wikitext", "sentences", "raw")


class PerplexityError(PrunedLoraError):
    """A corpus or setting perplexity cannot be measured on."""


@dataclass(frozen=True)
class PerplexityConfig:
    """``window`` tokens per forward pass; ``max_windows`` caps how many (None: the whole corpus)."""

    window: int = 512
    max_windows: int | None = None
    batch_size: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.window < 2:
            raise PerplexityError(f"window must be at least 2 tokens (one context, one prediction), got {self.window}")
        if self.max_windows is not None and self.max_windows < 1:
            raise PerplexityError(f"max_windows must be at least 1 or unset, got {self.max_windows}")
        if self.batch_size < 1:
            raise PerplexityError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token, in nats
    tokens: int  # predicted tokens the mean is over
    windows: int  # windows evaluated
    total_windows: int  # windows the whole corpus has
    corpus: str
    window: int
    max_windows: int | None
    # each window's summed NLL (nats), in corpus order: what a bootstrap over windows resamples, and
    # what a paired comparison of two models on the same windows differences
    window_nlls: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        part = "" if self.windows == self.total_windows else f" (first {self.windows} of {self.total_windows} windows)"
        return f"{self.corpus}: perplexity {self.ppl:.3f} over {self.tokens:,} tokens, window {self.window}{part}"


def corpus_path(corpus: str | os.PathLike) -> Path:
    """A known corpus name (``wikitext2``, ``ptb``) as its file in the shared data folder, else a path."""
    if isinstance(corpus, str) and corpus in CORPORA:
        from prunedlora.tasks import shared_data_dir

        return shared_data_dir() / CORPORA[corpus][0]
    return Path(corpus)


def join_lines(text: str, join: str) -> str:
    """The evaluation text of a corpus file.

    ``wikitext``: rows as the Hugging Face ``wikitext-2-raw-v1`` test split holds them (a line with
    its newline, a blank line empty) joined with blank lines, as ``"\\n\\n".join(test["text"])`` does;
    ``sentences``: stripped lines joined by one space, as PTB's ``" ".join(test["sentence"])``;
    ``raw``: the file as it is. Windows line endings are read as newlines first.
    """
    if join not in JOINS:
        raise PerplexityError(f"unknown join {join!r}; choose one of {', '.join(JOINS)}")
    text = text.replace("\r\n", "\n")
    if join == "wikitext":
        return "\n\n".join(line + "\n" if line.strip() else "" for line in text.split("\n"))
    if join == "sentences":
        return " ".join(line.strip() for line in text.split("\n") if line.strip())
    return text


def read_corpus(corpus: str | os.PathLike, join: str | None = None) -> str:
    """The joined text of ``corpus`` (a name from CORPORA or a file; a file joins ``raw`` by default)."""
    path = corpus_path(corpus)
    if join is None:
        join = CORPORA[corpus][1] if isinstance(corpus, str) and corpus in CORPORA else "raw"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PerplexityError(f"corpus file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PerplexityError(f"corpus file {path} is unreadable as UTF-8 text: {err}") from None
    joined = join_lines(text, join)
    if not joined.strip():
        raise PerplexityError(f"corpus file {path} is empty")
    return joined


def cut_windows(ids: torch.Tensor, window: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, window] non-overlapping windows from the start of the 1-D ``ids`` (the short tail dropped)."""
    if window < 2:
        raise PerplexityError(f"window must be at least 2 tokens, got {window}")
    count = ids.numel() // window
    if count < 1:
        raise PerplexityError(f"the corpus has {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * window].reshape(count, window)


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor (tokenized once, special tokens as the tokenizer adds them)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise PerplexityError("the corpus tokenizes to no tokens")
    return ids


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, config: PerplexityConfig, desc: str = "perplexity") -> list[float]:
    """Each window's summed next-token NLL (nats), accumulated in float64."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: list[float] = []
    try:
        starts = range(0, windows.shape[0], config.batch_size)
        for start in tqdm(starts, desc=desc, disable=not config.progress, unit="batch"):
            batch = windows[start : start + config.batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            sums.extend(float(row) for row in loss.double().sum(dim=1))
    finally:
        model.train(was_training)
    return sums


def perplexity_of_ids(
    model, ids: torch.Tensor, config: PerplexityConfig | None = None, corpus: str = "text"
) -> PerplexityResult:
    """Perplexity of ``model`` on pre-tokenized ``ids`` (reuse one tokenization across many models)."""
    config = config or PerplexityConfig()
    total_windows = ids.numel() // config.window
    windows = cut_windows(ids, config.window, config.max_windows)
    sums = window_nlls(model, windows, config, desc=f"{corpus} ppl")
    tokens = windows.shape[0] * (config.window - 1)
    nll = math.fsum(sums) / tokens
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=tokens,
        windows=windows.shape[0],
        total_windows=total_windows,
        corpus=corpus,
        window=config.window,
        max_windows=config.max_windows,
        window_nlls=sums,
    )


def perplexity(
    model,
    tokenizer,
    corpus: str | os.PathLike = "wikitext2",
    config: PerplexityConfig | None = None,
    join: str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``corpus`` (a name from CORPORA or a text file); see the module docstring."""
    config = config or PerplexityConfig()
    ids = tokenize_corpus(tokenizer, read_corpus(corpus, join))
    name = corpus if isinstance(corpus, str) and corpus in CORPORA else Path(corpus).name
    return perplexity_of_ids(model, ids, config, corpus=name)
