"""`prunedlora demo`: the README main job."""


def register(subparsers) -> None:
    pass
