"""Errors whose message is the whole story for the user."""


class PrunedLoraError(Exception):
    """Printed by the CLI as one line (``prunedlora CMD: error: ...``) without a traceback.

    Subclass it for stage-specific errors; raise it with a message that says what is wrong and how
    to fix it.
    """
