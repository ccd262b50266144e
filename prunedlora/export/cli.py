"""`prunedlora` subcommands of this stage (filled in by its issue)."""


def register(subparsers) -> None:
    pass
