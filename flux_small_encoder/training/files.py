"""Checks of the files a run reads back: safetensors files that are whole, and names that stay in their folder.

A safetensors file is read by mapping it into memory: a truncated one fails with an error that names no file, or, read
past its end, kills the process with SIGBUS. Its header describes its exact size, so a file whose size differs (or
that is not a regular file: a symlink to `/dev/zero`) is refused, naming it, before anything reads it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..paths import not_a_regular_file


class DamagedFileError(ValueError):
    """A file that a run reads back (a checkpoint's, the metrics) is damaged; the message names it."""


def described_size(path: Path) -> int | None:
    """The file size a safetensors header describes (8 + header + data), or `None` if the header does not parse."""
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if header_size > path.stat().st_size:
                return None
            header = json.loads(file.read(header_size))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error):
        return None
    return 8 + header_size + max(ends, default=0)


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (`"missing"`, `"a character device (a symlink to /dev/zero)"`,
    `"truncated or damaged (N bytes, ...)"`), or `None`."""
    if kind := not_a_regular_file(path):
        return kind
    size = path.stat().st_size
    if described_size(path) != size:
        return f"truncated or damaged ({size} bytes, not what its header describes)"
    return None
