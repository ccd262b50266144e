"""A full disk, a read-only or unwritable folder, a file that vanished mid-read: the machine's faults,
not the program's, so they are bad input too and get one line that names the path (exit 2).

Why one place: every writer goes through ``prunedlora.staging`` (folders and files built under a
temporary name and renamed into place), which turns a fault into :class:`IOFaultError` here; the
command line turns what still reaches it (a read of a file that vanished, an output folder that cannot
be made) into the same line with the same function. So the wording and the hint are the same in every
command, no command grows its own ``try``/``except``, and a genuine bug (an error that is not an I/O
fault) keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from prunedlora.errors import PrunedLoraError


class IOFaultError(PrunedLoraError):
    """The operating system refused a read or a write; the message names the path and what to do."""


# safetensors (Rust) reports a failed write as ``SafetensorError('Error while serializing: I/O error:
# No space left on device (os error 28)')``: no errno attribute, no file name.
_SAFETENSORS_IO = re.compile(r"I/O error: (?P<reason>.*?) \(os error (?P<code>\d+)\)")

_NO_ACCESS = "you may not write (or read) there: write somewhere else or fix the folder's permissions"
_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free space there or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: _NO_ACCESS,
    errno.EPERM: _NO_ACCESS,
    errno.ENOENT: "a file or folder vanished while it was in use: check that nothing else moves or deletes it "
    "and run again",
}
_OTHER = "check the disk and the folder, then run again"


def io_fault(
    err: BaseException, path: str | os.PathLike | None = None, *, renamed: Mapping[Path, Path] | None = None
) -> IOFaultError | None:
    """The one-line error for ``err`` when it is an I/O fault, else None (re-raise ``err`` as it is).

    The message names the file the error names, else ``path``. ``renamed`` maps temporary paths to the
    paths they were being written for: a file inside a staging folder is named where the user asked
    for it, since the staging folder is removed.
    """
    if isinstance(err, PrunedLoraError):
        return None
    if isinstance(err, OSError) and err.errno is not None:
        code, reason, named = err.errno, err.strerror or str(err), err.filename
    elif type(err).__name__ == "SafetensorError" and (match := _SAFETENSORS_IO.search(str(err))):
        code, reason, named = int(match["code"]), match["reason"], None
    else:
        return None
    where = Path(os.fsdecode(named)) if isinstance(named, (str, bytes, os.PathLike)) else None
    where = where or (Path(path) if path is not None else None)
    for temporary, final in (renamed or {}).items():
        if where is not None and (where == temporary or temporary in where.parents):
            where = final / where.relative_to(temporary)
    hint = _HINTS.get(code, _OTHER)
    return IOFaultError(f"{where}: {reason}; {hint}" if where is not None else f"{reason}; {hint}")


@contextmanager
def reporting_io_faults(path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an I/O fault raised in the block into :class:`IOFaultError` (naming ``path`` when the error
    names no file); any other error passes unchanged."""
    try:
        yield
    except Exception as err:
        fault = io_fault(err, path)
        if fault is None:
            raise
        raise fault from err
