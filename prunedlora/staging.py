"""Build a folder or files under a temporary sibling name and rename them into place when complete.

Why: an interrupted or failed build (an exported adapter, a model being materialised, an environment
being installed, a results file) must leave nothing that looks finished, and whatever was at the
target stays until the very end: a reader (PEFT, vLLM, a second process) sees the old folder or the
new one, never half of either, and a failed rename puts the old one back. Every writer goes through
here, so this is also where a full disk or an unwritable folder becomes one line naming the path
(``prunedlora.iofaults``) instead of a traceback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunedlora.iofaults import io_fault


@contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; if the block succeeds it replaces ``target`` with one
    rename, if it raises it is removed and ``target`` is left as it was. An I/O fault (a full disk, a
    read-only folder, a file vanishing) in the block or in the rename is raised as IOFaultError naming
    the path under ``target``."""
    target = Path(target)
    staging: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _beside(target, lambda: Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)))
        yield staging
        _publish_permissions(staging)
        _install(staging, target)
    except Exception as err:
        fault = io_fault(err, target, renamed={staging: target} if staging else None)
        if fault is None:
            raise
        raise fault from err
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_files(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of ``targets``; if the block succeeds they are renamed onto
    their targets (after all of them were written), if it raises they are removed and every target is
    left as it was. I/O faults are raised as IOFaultError, as in ``staged_directory``."""
    finals = [Path(target) for target in targets]
    temporaries: list[Path] = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            handle, name = _beside(final, lambda f=final: tempfile.mkstemp(prefix=f".{f.name}.tmp-", dir=f.parent))
            os.close(handle)
            temporaries.append(Path(name))
        yield temporaries
        mode = 0o666 & ~_umask()  # mkstemp makes a private (0600) file; give it a normal write's mode
        for temporary, final in zip(temporaries, finals, strict=True):
            temporary.chmod(mode)
            os.replace(temporary, final)
    except Exception as err:
        fault = io_fault(err, finals[0].parent if finals else None, renamed=dict(zip(temporaries, finals)))
        if fault is None:
            raise
        raise fault from err
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling: a reader never sees half a file."""
    with staged_files(path) as (temporary,):
        temporary.write_text(text)
    return Path(path)


def _beside(target: Path, make):
    """``make()``, which creates a temporary name beside ``target``; a refusal names ``target`` (what the
    user asked for), not the random temporary name."""
    try:
        return make()
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(target)) from err


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _publish_permissions(staging: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the modes a normal write would have."""
    umask = _umask()
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
