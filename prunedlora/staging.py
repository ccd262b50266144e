"""Build a folder under a temporary sibling name and rename it into place when it is complete.

Why: an interrupted or failed build (an exported adapter, a model being materialised, an environment
being installed) must leave nothing that looks finished, and whatever was at the target stays until
the very end: a reader (PEFT, vLLM, a second process) sees the old folder or the new one, never half
of either, and a failed rename puts the old one back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; if the block succeeds it replaces ``target`` with one
    rename, if it raises it is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _publish_permissions(staging)
        _install(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _publish_permissions(staging: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the modes a normal write would have."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [staging, *staging.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _install(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; the old ``target`` is moved aside first, removed only after the
    rename succeeded and put back if it failed."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "content")
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old / "content", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
