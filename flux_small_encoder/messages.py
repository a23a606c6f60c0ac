"""Phrases the package's messages share: a few items of a long list, a size in bytes."""

from __future__ import annotations

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
