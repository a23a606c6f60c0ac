"""Phrases the package's messages share: a few items of a long list, a size in bytes; and the size a user writes
(`parse_budget`), read here without torch so that the command line can check it while parsing."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_UNITS = {"": 2**30, "gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}


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


def parse_budget(budget: str | int | float) -> int:
    """A memory budget in bytes: a number of GiB (`24`, `"23.5"`), or a string with its unit (`"24GiB"`,
    `"24 GB"`, `"16000MiB"`)."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        number, unit = float(budget), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(budget))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"memory budget {budget!r} is not a size: write it as 24, '24GiB', '24GB' or '16000MiB'.")
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"memory budget {budget!r} must be a finite size above zero: write it as 24, '24GiB' or "
                         "'16000MiB'.")
    return int(number * _UNITS[unit])
