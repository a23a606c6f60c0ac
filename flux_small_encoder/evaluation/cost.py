"""What an encoder costs: its parameters and bytes, and the time and peak memory of encoding the prompts.

Peak memory: on CUDA, the allocator's peak above what was allocated before the encode step
(`torch.cuda.max_memory_allocated`); on a CPU, the process's peak resident memory above its resident memory before
the step (Linux's `VmHWM`, reset through `/proc/self/clear_refs`), which misses memory the allocator reuses without
asking the system for more; elsewhere it is not measured.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def encoder_size(encoder: nn.Module) -> dict[str, int]:
    """`parameters` (quantized weights counted as the values they stand for) and `bytes` in memory (transformers'
    `get_memory_footprint` where the model has it: it counts quantized weights at their stored size)."""
    parameters = sum(parameter.numel() for parameter in encoder.parameters())
    if hasattr(encoder, "get_memory_footprint"):
        size = encoder.get_memory_footprint()
    else:
        tensors = [*encoder.parameters(), *encoder.buffers()]
        size = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return {"parameters": int(parameters), "bytes": int(size)}


def measure_encoding(run: Callable[[], Any], device: torch.device | str) -> tuple[Any, dict]:
    """Run `run()` (the encode step) and return its result with `seconds`, `peak_memory_bytes` and `memory_measure`
    (how the peak was measured, or why it was not)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = _reset_peak_rss()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, measure = torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    elif before is not None:
        peak, measure = _status_kib("VmHWM") * 1024 - before, "peak RSS above RSS before (Linux VmHWM)"
    else:
        peak, measure = None, "not measured on this platform"
    return result, {"seconds": seconds, "peak_memory_bytes": peak, "memory_measure": measure}


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE).group(1))


def _reset_peak_rss() -> int | None:
    """Make the peak resident memory the current one; returns it in bytes, or `None` where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, AttributeError):
        return None
