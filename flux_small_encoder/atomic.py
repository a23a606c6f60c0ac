"""Write a file or a folder so that readers see the old version or the complete new one, never half of either.

Every writer of the package goes through `atomic_file` or `atomic_folder`. The content is written under a hidden
staging name beside the target (`.NAME.<pid>-<random>.partial`, on the same filesystem, so the final rename is
atomic), flushed to disk, and renamed into place only once complete. An exception removes the staging copy and leaves
the target as it was; a kill leaves at worst a `.partial` sibling, which no reader of the package ever picks.

Replacing an existing folder moves the old one aside first (`.NAME.<pid>-<random>.old`), renames the new one in, and
deletes the old one last; `remove` also moves a folder aside before deleting it. A kill at any moment leaves either the
old or the new folder at the target, never a half-written or half-deleted one. What a kill leaves beside it is found by
`leftovers`: the pid in the name tells whether its writer is still running on this machine. Multi-process barriers
(the trainer's ranks) belong to the callers, around these calls.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_SUFFIX = ".partial"
ASIDE_SUFFIX = ".old"
# `.NAME.<pid>-<8 hex>.partial` or `.old` (earlier versions wrote no pid).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[0-9a-f]{8}\.(?:partial|old)$")


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends without an error it is renamed to `path`.

    Args:
        path: The file to write. Its folder is created if missing.
        overwrite: Replace an existing `path`. Without it, an existing file is refused with `FileExistsError` (checked
            again at the rename, so a file that appeared meanwhile is not lost).

    Example:
    ```py
    >>> with atomic_file("run/metrics.jsonl") as tmp:
    ...     tmp.write_text(text)
    ```
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists: nothing was written.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(path, STAGING_SUFFIX)
    # Created empty with the permissions `open()` would give the file (umask applied), not mkstemp's 0600.
    os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield staging
        _fsync(staging)
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} appeared while it was being written: nothing was replaced.")
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_text_atomically(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write `text` to `path` through `atomic_file`; returns the path."""
    with atomic_file(path, overwrite=overwrite) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error it becomes `path`.

    Args:
        path: The folder to create. Its parent is created if missing.
        replace: Replace an existing `path` (moved aside first, deleted only once the new one is in place). Without
            it, an existing non-empty folder or a file at `path` is refused with `FileExistsError`; an empty folder
            holds nothing to lose and is replaced.

    Example:
    ```py
    >>> with atomic_folder("out/model") as staging:
    ...     model.save_pretrained(staging)
    ```
    """
    path = Path(path)
    if not replace:
        _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(path, STAGING_SUFFIX)
    staging.mkdir(mode=0o777)
    try:
        yield staging
        for file in sorted(staging.rglob("*")):
            if file.is_file() and not file.is_symlink():
                _fsync(file)
        if path.exists() or path.is_symlink():
            if not replace:
                _refuse_existing(path)  # again: something may have appeared while writing
            aside = _staging_name(path, ASIDE_SUFFIX)
            os.rename(path, aside)
            try:
                os.rename(staging, path)
            except BaseException:
                os.rename(aside, path)
                raise
            _fsync(path.parent)
            remove(aside)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(path.parent)


def remove(path: str | os.PathLike) -> None:
    """Delete a file, a symlink or a whole folder (nothing if it is absent).

    A folder is first renamed aside (`.NAME.<pid>-<random>.old`), so a kill while it is deleted leaves a leftover that
    no reader picks, not a half-deleted folder under its own name.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        if not _LEFTOVER.match(path.name):
            aside = _staging_name(path, ASIDE_SUFFIX)
            os.rename(path, aside)
            path = aside
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def leftovers(folder: str | os.PathLike, name: str | None = None, *, stale_only: bool = False) -> list[Path]:
    """The staging (`.partial`) and set-aside (`.old`) copies that killed writers left in `folder`.

    Args:
        folder: The folder to look in (not recursively).
        name: Only the leftovers of this target name (`checkpoint-4`, `cache`); default: all.
        stale_only: Only those whose writer is no longer running on this machine (a name without a pid, from an
            earlier version, counts as stale). Without it, a caller must know that no writer can be running, for
            example because it holds the folder's lock.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _LEFTOVER.match(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if stale_only and match["pid"] is not None and _is_running(int(match["pid"])):
            continue
        found.append(path)
    return sorted(found)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the disk or the user's quota is full.

    Writers report it in their own ways: `OSError` with `ENOSPC` from Python, a `SafetensorError` naming "os error 28"
    from safetensors, "unexpected pos" from `torch.save`'s zip writer.
    """
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if os.strerror(errno.ENOSPC) in text or "unexpected pos" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _refuse_existing(path: Path) -> None:
    if path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty: nothing was written.")


def _staging_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _is_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (pids are per machine: a writer elsewhere looks gone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, where the platform allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # folders cannot be fsynced on some platforms and filesystems
    finally:
        os.close(descriptor)
