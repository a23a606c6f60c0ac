"""Read a state dict from a `.pth` file (the reference trainer's format) without running code and without letting a
small file expand into a large one.

A file that `torch.save` writes is a zip archive whose records (the pickle and one record per storage) are stored
uncompressed. Before anything is unpickled, the archive is checked: its records may not expand beyond the file's own
size (a compressed record could hold gigabytes of zeros), and each must match its checksum, so that a damaged file is
reported as damaged. Only then does `torch.load(weights_only=True)` read it, which refuses any object but tensors and
plain containers: what it refuses in an intact file is what the author put there, not damage. Last, the tensors may not
describe more data than the file stores (views that repeat one storage would expand when copied).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .messages import human_size


def load_pickled_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save`d state dict (bare, under `"state_dict"` or `"model"`, or from a DDP wrapper).

    Args:
        path: A `.pth` / `.pt` / `.bin` / `.ckpt` file written by `torch.save` (PyTorch 1.6 or later).

    Raises:
        ValueError: the file is damaged or truncated, would expand beyond its size, holds objects other than tensors
            and plain containers (nothing of it is run), or is not a state dict of tensors.
    """
    path = Path(path)
    stored = _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch says what it refused after "WeightsUnpickler error:", e.g. "Unsupported global: GLOBAL io.open ...".
        reason = str(error).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0].split(". ")[0]
        raise ValueError(
            f"Refusing to load {str(path)!r}: `torch.load(weights_only=True)` accepts tensors and plain containers "
            f"only, and this file holds something else ({reason}). Nothing in it was run: unpickling other "
            "objects can execute arbitrary code. If you trust its author, load it yourself with "
            "`torch.load(path, weights_only=False)`, save the state dict with `safetensors.torch.save_file`, and "
            "convert that file."
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"Cannot read {str(path)!r} as a PyTorch file ({error}): is the file complete?") from None
    if isinstance(state, Mapping) and not _all_tensors(state):
        nested = [key for key in ("state_dict", "model") if isinstance(state.get(key), Mapping)]
        if len(nested) == 1 and _all_tensors(state[nested[0]]):
            state = state[nested[0]]
    if not isinstance(state, Mapping) or not _all_tensors(state):
        kind = type(state).__name__ if not isinstance(state, Mapping) else f"a dict with keys {list(state)[:5]}"
        raise ValueError(f"{str(path)!r} holds {kind}, not a state dict of tensors.")
    _check_expansion(path, state, stored)
    if all(key.startswith("module.") for key in state):  # saved from a DistributedDataParallel wrapper
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def _check_archive(path: Path) -> int:
    """Refuse a file that is no intact `torch.save` archive, or whose records expand beyond it; return their size."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            stored = sum(record.file_size for record in records)
            if stored > path.stat().st_size:
                raise ValueError(
                    f"Refusing to load {str(path)!r}: its records would expand to {human_size(stored)} from a "
                    f"{human_size(path.stat().st_size)} file (`torch.save` stores them uncompressed). Nothing was "
                    "unpacked; if the file is yours, save the state dict again with `torch.save` or "
                    "`safetensors.torch.save_file`."
                )
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as error:
        raise ValueError(
            f"Cannot read {str(path)!r}: it is not a complete `torch.save` archive ({error}). The file is truncated "
            "or damaged (fetch or copy it again), or was saved by PyTorch before 1.6, whose format is not read here "
            "(load it with that PyTorch and save it again)."
        ) from None
    if damaged is not None:
        raise ValueError(
            f"Cannot read {str(path)!r}: its record {damaged!r} does not match its checksum, so the file is damaged. "
            "Fetch or copy it again."
        )
    return stored


def _check_expansion(path: Path, state: Mapping[str, torch.Tensor], stored: int) -> None:
    # A tensor shared under two names (a tied embedding) is one view of one storage: count it once.
    views = {_view_key(tensor): tensor for tensor in state.values()}
    expanded = sum(view.numel() * view.element_size() for view in views.values())
    if expanded > stored:
        raise ValueError(
            f"Refusing to load {str(path)!r}: its tensors describe {human_size(expanded)} of data but the file stores "
            f"{human_size(stored)} (views that repeat the same storage). Save each tensor whole (`.contiguous()`) and "
            "try again."
        )


def _view_key(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype


def _all_tensors(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())
