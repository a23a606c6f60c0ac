"""Phrases the package's messages share: a few items of a long list, a size in bytes, what a path is."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence


def few(items: Sequence, limit: int = 5) -> str:
    """The first `limit` items, comma-separated, and how many more there are (`"a, b, c and 4 more"`)."""
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def human_size(size: float) -> str:
    """A size in bytes as people read it: `512 B`, `20.0 KB`, `494.2 MB` (steps of 1024)."""
    if size < 1024:
        return f"{size:g} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """What `path` is when it is no regular file, following symlinks (`"missing"`, `"a named pipe (FIFO)"`,
    `"a character device (a symlink to /dev/zero)"`, ...), for a message; `None` for a regular file.

    Reading a pipe or a device as a file would block or never end, so callers check before they open.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a symlink to {os.readlink(path)}, which does not exist" if os.path.islink(path) else "missing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return f"{kind} (a symlink to {os.readlink(path)})" if os.path.islink(path) else kind
