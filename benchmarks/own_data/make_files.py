"""Data files in each format of ``prunedlora.formats``, built from real data sets (no filler):

- ``chat``: GSM8K problems as a two-exchange tutor dialogue: a system prompt, the problem, the worked
  solution, a follow-up asking for the final answer alone, and the answer. The follow-up's wording
  varies (chosen by a hash of the problem).
- ``alpaca``: CodeAlpaca records as they are (instruction / input / output).
- ``prompt-completion``: GSM8K problems and solutions (calculator marks removed).
- ``text``: GSM8K problems with their solutions as running text.
- ``classification``: CodeAlpaca instructions labelled with the language of their reference code
  (python / javascript / sql, read from the code; records whose code matches none or several are
  left out): three classes of the user's choosing.

``--out prunedlora/data/examples --size 60`` writes the small files shipped in the package (from the
vendored slices); ``--out runs/own_data --shared`` the full ones the results in docs/results.md were
trained on (from ../shared/data): 500 training + 100 held-out conversations for chat, and so on.

    python benchmarks/own_data/make_files.py --out runs/own_data --shared
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
from pathlib import Path

from prunedlora.tasks import shared_data_path, vendored_data_path

SYSTEM = "You are a patient math tutor. Work through the problem step by step, then state the result."
FOLLOW_UPS = (
    "So what is the final answer? Reply with the number only.",
    "Just the final number, please.",
    "What number do we end up with? Only the number.",
    "Can you give me only the final answer as a number?",
)
_CALCULATOR = re.compile(r"<<[^<>]*>>")
LANGUAGES = {
    "python": re.compile(r"\bdef \w+\(|\bprint\(|^import \w+|\bfor \w+ in ", re.M),
    "javascript": re.compile(r"\bfunction\s*\w*\(|console\.log|\b(let|const|var) \w+ =|=>"),
    "sql": re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|CREATE TABLE|DELETE FROM)\b"),
}


def _gsm8k(shared: bool) -> list[tuple[str, str, str]]:
    """(question, worked solution, final answer) in file order."""
    path = shared_data_path("gsm8k") if shared else vendored_data_path("gsm8k")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        work, answer = _CALCULATOR.sub("", record["answer"]).split("####")
        out.append((record["question"].strip(), work.strip(), answer.strip()))
    return out


def _codealpaca(shared: bool) -> list[dict]:
    path = shared_data_path("codealpaca") if shared else vendored_data_path("codealpaca")
    return [r for r in json.loads(path.read_text(encoding="utf-8")) if str(r["output"]).strip()]


def _pick(text: str, options: tuple[str, ...]) -> str:
    return options[int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(options)]


def chat_rows(problems) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
                {"role": "assistant", "content": work},
                {"role": "user", "content": _pick(question, FOLLOW_UPS)},
                {"role": "assistant", "content": answer},
            ]
        }
        for question, work, answer in problems
    ]


def language(code: str) -> str | None:
    found = [name for name, pattern in LANGUAGES.items() if pattern.search(code)]
    return found[0] if len(found) == 1 else None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_files(out: Path, shared: bool, size: int | None, held_out: int) -> dict[str, int]:
    """Every format's file (and, with ``held_out``, a dev file of that many rows after the training ones)."""
    out.mkdir(parents=True, exist_ok=True)
    problems, records = _gsm8k(shared), _codealpaca(shared)
    labelled = [(r, language(str(r["output"]))) for r in records]
    labelled = [(r, lang) for r, lang in labelled if lang is not None]

    def split(rows):
        train = rows[:size] if size else rows[: len(rows) - held_out]
        dev = rows[len(train) : len(train) + held_out]
        return train, dev

    counts = {}
    for name, rows, write in (
        ("chat", chat_rows(problems), lambda p, rs: _write_jsonl(p.with_suffix(".jsonl"), rs)),
        (
            "prompt_completion",
            [{"prompt": q, "completion": f"{w}\n#### {a}"} for q, w, a in problems],
            lambda p, rs: _write_jsonl(p.with_suffix(".jsonl"), rs),
        ),
        ("text", [{"text": f"Problem: {q}\nSolution: {w}\nAnswer: {a}"} for q, w, a in problems], None),
        (
            "alpaca",
            [{k: r[k] for k in ("instruction", "input", "output")} for r in records],
            lambda p, rs: p.with_suffix(".json").write_text(json.dumps(rs, indent=1, ensure_ascii=False) + "\n"),
        ),
        (
            "classification",
            [
                {
                    "request": " ".join([r["instruction"].strip(), str(r["input"] or "").strip()]).strip(),
                    "language": lang,
                }
                for r, lang in labelled
            ],
            None,
        ),
    ):
        train, dev = split(rows)
        for suffix, part in (("", train), ("_dev", dev)):
            if not part:
                continue
            path = out / f"{name}{suffix}"
            if name == "text":
                _write_jsonl(path.with_suffix(".jsonl"), part)
            elif name == "classification":
                with path.with_suffix(".csv").open("w", newline="", encoding="utf-8") as handle:
                    writer = csv.DictWriter(handle, fieldnames=["request", "language"])
                    writer.writeheader()
                    writer.writerows(part)
            else:
                write(path, part)
            counts[f"{name}{suffix}"] = len(part)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shared", action="store_true", help="read ../shared/data (the full sets)")
    parser.add_argument("--size", type=int, default=None, help="rows per training file (default: all but held-out)")
    parser.add_argument("--held-out", type=int, default=0, help="rows per held-out file")
    args = parser.parse_args()
    print(json.dumps(write_files(args.out, args.shared, args.size, args.held_out)))


if __name__ == "__main__":
    main()
