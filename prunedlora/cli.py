"""The ``prunedlora`` command. It only parses: each subcommand calls a public function.

Each stage owns its subcommands in ``prunedlora/<stage>/cli.py`` with a ``register(subparsers)``
function; handlers import heavy libraries (torch, vLLM) only when they run, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from prunedlora.errors import PrunedLoraError
from prunedlora.iofaults import io_fault

_STAGE_CLIS = (
    "prunedlora.train.cli",
    "prunedlora.export.cli",
    "prunedlora.serve.cli",
    "prunedlora.bench.cli",
    "prunedlora.salr.cli",
    "prunedlora.loraprune.cli",
    "prunedlora.demo",
)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error of the command (argparse
    prints the whole usage first); subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(err: BaseException) -> str:
    """The error's message on one line: messages quote files, YAML and JSON that may hold newlines."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="prunedlora",
        description="Train, export, serve and benchmark pruned variable-rank LoRA adapters.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _STAGE_CLIS:
        module = importlib.import_module(module_name)
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "_parse_known", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    try:
        result = args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except PrunedLoraError as err:
        print(f"prunedlora {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # an I/O fault no writer saw (a read of a vanished file): one line too
        fault = io_fault(err)
        if fault is None:
            raise
        print(f"prunedlora {args.command}: error: {one_line(fault)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
