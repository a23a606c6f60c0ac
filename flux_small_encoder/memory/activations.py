"""The memory a pipeline call allocates beyond its weights, by phase and image side: data, shipped in the package.

`data/activations.json` holds one entry per phase (`encode`, `denoise`, `decode`, `decode_tiled`) and image side, each
marked `measured`, `derived` (a measured peak minus the weights on the device) or `estimated`, with its source.
`benchmarks/gpu_suite.py` measures every entry on a GPU and writes a file of the same shape.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources

GiB = 2**30
STATUSES = ("measured", "derived", "estimated")


@dataclass(frozen=True)
class ActivationEntry:
    """What one phase of a call allocates beyond the weights, at one image side.

    Args:
        phase: `encode`, `denoise`, `decode` or `decode_tiled`.
        size: Image side in pixels; `None` for a phase that does not depend on it (`encode`).
        gib: GiB allocated beyond the weights on the device.
        status: `measured`, `derived` or `estimated`.
        source: Where the figure comes from.
    """

    phase: str
    size: int | None
    gib: float
    status: str
    source: str


@dataclass(frozen=True)
class Activation:
    """An entry as it applies to a requested image side: `scale` > 1 where the side is beyond the table's largest."""

    entry: ActivationEntry
    scale: float = 1.0

    @property
    def bytes(self) -> int:
        return math.ceil(self.entry.gib * self.scale * GiB)


class ActivationTable:
    """Activation entries by phase and image side, and the share of a budget kept free for the allocator.

    Args:
        entries: The entries.
        headroom: Fraction of a budget left unplanned (the CUDA caching allocator rounds and fragments).
        source: Where the table was read from.
    """

    def __init__(self, entries: list[ActivationEntry], headroom: float, source: str = "in memory"):
        self.entries, self.headroom, self.source = list(entries), headroom, source
        bad = [entry for entry in self.entries if entry.status not in STATUSES]
        if bad:
            raise ValueError(f"{source}: status {bad[0].status!r} of {bad[0].phase} is not one of {STATUSES}.")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> ActivationTable:
        """Read a table written in the shape of `data/activations.json` (the shipped one by default)."""
        if path is None:
            text = resources.files("flux_small_encoder").joinpath("data", "activations.json").read_text()
            source = "flux_small_encoder/data/activations.json"
        else:
            with open(path) as handle:
                text = handle.read()
            source = os.fspath(path)
        data = json.loads(text)
        entries = [
            ActivationEntry(item["phase"], item["size"], float(item["gib"]), item["status"], item["source"])
            for item in data["activations"]
        ]
        return cls(entries, float(data["headroom"]["fraction"]), source)

    def lookup(self, phase: str, size: int) -> Activation:
        """The entry for `phase` at the smallest tabled side at least `size`; beyond the largest side, the largest
        entry scaled by the number of pixels."""
        rows = sorted((entry for entry in self.entries if entry.phase == phase), key=lambda e: e.size or 0)
        if not rows:
            raise ValueError(f"{self.source} has no entry for the {phase} phase.")
        for entry in rows:
            if entry.size is None or entry.size >= size:
                return Activation(entry)
        largest = rows[-1]
        return Activation(largest, (size / largest.size) ** 2)

    def sizes(self) -> list[int]:
        """The image sides the table covers."""
        return sorted({entry.size for entry in self.entries if entry.size is not None})
