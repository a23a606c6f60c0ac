"""Write a file or a folder so that readers see the old version or the complete new one, never half of either.

Every file the package writes goes through `atomic_file` or `atomic_folder`, but for two that are written in place on
purpose: a training run's `metrics.jsonl`, appended one line per logged step (a resume tolerates a torn last line and
rewrites the file through `atomic_file`), and the run's `.lock`, whose content only names the process holding it
(`training/run_folder.py`). The content is written under a hidden staging name beside the target
(`.NAME.<pid>-<host>-<random>.partial`, on the same filesystem, so the final rename is atomic), given the permissions
`open()` gives a new file (libraries such as safetensors create theirs readable by their owner only), flushed to disk,
and renamed into place only once complete. An exception removes the staging copy and leaves the target as it was; a
kill leaves at worst a `.partial` sibling, which no reader of the package ever picks, and which the next writer of
the same target deletes once its writer's process is gone.

Replacing an existing folder moves the old one aside first (`.NAME.<pid>-<host>-<random>.old`), renames the new one in,
and deletes the old one last; `remove` also moves a folder aside before deleting it. A kill leaves the old or the new
folder at the target, never a half-written or half-deleted one; killed between the two renames, it leaves the target
absent and the old folder whole under its `.old` name, which is why a stale `.old` is deleted only once its target
exists again. What a kill leaves is found by `leftovers`: the writer's pid and host in the name tell whether it is
still running. Multi-process barriers (the trainer's ranks) belong to the callers, around these calls.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import causes

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".partial"
ASIDE_SUFFIX = ".old"
# `.NAME.<pid>-<host>-<8 hex>.partial` or `.old`; earlier versions wrote no host, and before that no pid either.
_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-(?:(?P<host>[0-9a-f]{8})-)?)?[0-9a-f]{8}\.(?:partial|old)$"
)


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends without an error it is renamed to `path`.

    Args:
        path: The file to write. Its folder is created if missing.
        overwrite: Replace an existing `path`. Without it, an existing file is refused with `FileExistsError`, and so
            is one that appears while the new one is written: the new file is hard-linked into place, which fails
            instead of replacing anything.

    Example:
    ```py
    >>> with atomic_file("run/metrics.jsonl") as tmp:
    ...     tmp.write_text(text)
    ```
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists: nothing was written.")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_leftovers(path)
    staging = _staging_name(path, STAGING_SUFFIX)
    # Created empty with the permissions `open()` gives a new file (umask applied), which it keeps whatever writes it.
    os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = _mode(staging)
    try:
        yield staging
        os.chmod(staging, mode)
        _fsync(staging)
        if overwrite:
            os.replace(staging, path)
        else:
            _rename_if_absent(staging, path)
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
    _remove_stale_leftovers(path)
    staging = _staging_name(path, STAGING_SUFFIX)
    staging.mkdir(mode=0o777)
    folder_mode = _mode(staging)
    try:
        yield staging
        for item in sorted(staging.rglob("*")):
            if item.is_symlink():
                continue
            if item.is_dir():
                os.chmod(item, folder_mode)
            else:
                os.chmod(item, folder_mode & 0o666)
                _fsync(item)
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

    A folder is first renamed aside (`.NAME.<pid>-<host>-<random>.old`), so a kill while it is deleted leaves a
    leftover that no reader picks, not a half-deleted folder under its own name.
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
        stale_only: Only those whose writer is no longer running: its pid is gone on this machine (a name without a
            pid, from an earlier version, counts as stale; one written on another machine, which this one cannot
            check, never does). Without it, a caller must know that no writer can be running, for example because it
            holds the folder's lock.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _LEFTOVER.match(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if stale_only and not _is_stale(match):
            continue
        found.append(path)
    return sorted(found)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the disk or the user's quota is full.

    Writers report it in their own ways: `OSError` with `ENOSPC` from Python, a `SafetensorError` naming "os error 28"
    from safetensors, "unexpected pos" from `torch.save`'s zip writer.
    """
    for cause in causes(error):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cause)
        if os.strerror(errno.ENOSPC) in text or "unexpected pos" in text:
            return True
    return False


def _remove_stale_leftovers(path: Path) -> None:
    """Delete what killed writers of `path` left beside it: every stale `.partial`, and a stale `.old` once `path`
    exists (while it is absent, a `.old` may hold its only complete copy)."""
    for leftover in leftovers(path.parent, path.name, stale_only=True):
        if leftover.name.endswith(ASIDE_SUFFIX) and not os.path.lexists(path):
            continue
        logger.warning(f"removing {leftover}, what a killed writer left of {path}")
        try:
            remove(leftover)
        except OSError:  # another writer removed it first, or it cannot be: it is in no one's way
            pass


def _rename_if_absent(staging: Path, path: Path) -> None:
    """Rename `staging` to `path` unless something is at `path`, in one step: a hard link fails where anything is
    (`os.rename` would silently replace it); the staging name is then dropped."""
    try:
        os.link(staging, path)
    except FileExistsError:
        raise FileExistsError(f"{path} appeared while it was being written: nothing was replaced.") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A filesystem without hard links (FAT, some network mounts): check, then rename, which leaves a short race.
        if os.path.lexists(path):
            raise FileExistsError(f"{path} appeared while it was being written: nothing was replaced.") from None
        os.rename(staging, path)
        return
    staging.unlink()


def _refuse_existing(path: Path) -> None:
    if path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty: nothing was written.")


def _staging_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{_host_id()}-{secrets.token_hex(4)}{suffix}")


@functools.cache
def _host_id() -> str:
    """8 hex digits naming this machine in staging names: a pid says whether a writer runs only on its own host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _is_stale(match: re.Match) -> bool:
    if match["pid"] is None:
        return True
    if match["host"] is not None and match["host"] != _host_id():
        return False
    return not _is_running(int(match["pid"]))


def _is_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _mode(path: Path) -> int:
    """The permission bits of `path`."""
    return os.stat(path).st_mode & 0o777


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
