"""Models identified by content: their config and a fingerprint of their weights that reads a few MiB, not gigabytes.

A teacher cache records the teacher it was written with; a run checks its own teacher against that record. A
checkpoint records the pipeline (`model`) it was trained against, so that a resume accepts the same pipeline in a
folder that moved. The path or repo id alone would accept the same path holding other weights (stale embeddings) and
refuse the same model under another spelling (a relative path, a copy). The fingerprint hashes:

- the model's `config.json` (without `_name_or_path` and `transformers_version`, which differ between copies),
- for every weight file, in name order: its size, its whole safetensors header (each tensor's name, dtype, shape and
  offsets) and 64 KiB read at 16 evenly spaced places.

That is under 3 MiB read for T5-XXL's 9.5 GB, at every training start. Weights that were retrained, fine-tuned,
converted or truncated change it; an edit confined to the bytes between the samples would not, which is the price of
not reading gigabytes. A built-in teacher (`tiny`) is built in memory and all its tensors are hashed. A pipeline is
identified by its transformer's and CLIP's folders; a built-in one by its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..registry import is_repo_id
from .config import TrainingConfig
from .models import PRETRAINED, load_teacher, model_source, teacher_name

SAMPLES, SAMPLE_BYTES = 16, 64 * 1024
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")


@dataclass(frozen=True)
class TeacherIdentity:
    """Which teacher wrote (or reads) a teacher cache.

    Args:
        name: The teacher's repo id or folder as the config gave it (for messages).
        fingerprint: The hash of its config and weights (see the module's docstring), or `None` when its weights are
            not on this machine (a training machine that only has the cache).
    """

    name: str
    fingerprint: str | None


def teacher_identity(config: TrainingConfig) -> TeacherIdentity:
    """The identity of `config`'s teacher (`teacher`, else `model`'s `text_encoder_2`)."""
    name = teacher_name(config)
    if model_source(config.teacher or config.model) is not PRETRAINED:
        return TeacherIdentity(name, module_fingerprint(load_teacher(config, torch.float32)))
    folder = _teacher_folder(config)
    return TeacherIdentity(name, folder_fingerprint(folder) if folder else None)


def pipeline_fingerprint(name: str, revision: str | None = None) -> str | None:
    """The fingerprint of a FLUX pipeline's frozen models with weights (its transformer and CLIP), or `None` when they
    are not on this machine or `name` is a built-in source (whose name says it all)."""
    if model_source(name) is not PRETRAINED:
        return None
    prints = []
    for subfolder in ("transformer", "text_encoder"):
        folder = _local_folder(name, subfolder, revision)
        prints.append(folder_fingerprint(folder) if folder else None)
    return None if None in prints else hashlib.sha256(":".join(prints).encode()).hexdigest()


def folder_fingerprint(folder: Path) -> str | None:
    """The fingerprint of a model folder's `config.json` and weights, or `None` if either is missing."""
    config_path = folder / "config.json"
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # every shard the index names must be here
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = [folder / shard for shard in shards]
    if not config_path.is_file() or not weights or not all(path.is_file() for path in weights):
        return None
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as file:
            if path.suffix == ".safetensors" and size >= 8:
                (header_size,) = struct.unpack("<Q", file.read(8))
                digest.update(file.read(min(header_size, size - 8)))
            for index in range(SAMPLES):
                file.seek(index * max(size - SAMPLE_BYTES, 0) // max(SAMPLES - 1, 1))
                digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """The hash of every tensor of a (small) module, by name, dtype, shape and value."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _teacher_folder(config: TrainingConfig) -> Path | None:
    """The local folder of the teacher's files (a folder, or the Hub cache's snapshot), or `None` if not here."""
    if config.teacher:
        return _local_folder(config.teacher, "", None)
    return _local_folder(config.model, "text_encoder_2", config.revision)


def _local_folder(name: str, subfolder: str, revision: str | None) -> Path | None:
    """The local folder of `name`'s `subfolder` (in a folder, or the Hub cache's snapshot), or `None` if not here."""
    from huggingface_hub import try_to_load_from_cache

    if os.path.isdir(name):
        return Path(name) / subfolder
    if not is_repo_id(name):
        return None
    found = try_to_load_from_cache(name, f"{subfolder}/config.json" if subfolder else "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None
