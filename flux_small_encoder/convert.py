"""Write a distilled T5 encoder checkpoint in our folder layout or as a ComfyUI file, from any layout it is read in.

Reading (every layout, `.pth` safely) and finding the config are `checkpoint`'s job; this module only writes, and
only safetensors, through `atomic`: a failed or interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_file, atomic_folder
from .checkpoint import CONFIG_METADATA_KEY, read_checkpoint, resolve_config
from .configuration import DistilledT5Config
from .hub import download
from .layouts import to_comfyui_keys
from .messages import few
from .model_card import TRAINING_CONFIG_NAME
from .paths import PICKLE_SUFFIXES, not_a_regular_file
from .registry import MODEL_FILES

# What a folder holding a saved encoder may contain (`save_pretrained`, `convert`, a trainer's `final/`, a download):
# `convert(..., overwrite=True)` replaces only such a folder, or an empty one.
SAVED_ENCODER_FILES = (*MODEL_FILES, "README.md", TRAINING_CONFIG_NAME)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    config: str | os.PathLike | DistilledT5Config | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint into our folder layout, or (for a `.safetensors` destination) into the ComfyUI file.

    Args:
        src: A folder (ours or the public checkpoint's), a `.safetensors` file in either layout, a reference `.pth`
            state dict, or a registry name / Hub repo id (fetched with `hub.download`).
        dst: A folder to write `config.json` + `model.safetensors` into, or a `.safetensors` file path for ComfyUI
            (the config goes into its header, so converting it back restores it exactly).
        config: A `config.json` path or a config: overrides the one stored with `src`. Without either, the dimensions
            are inferred from the tensor shapes (`checkpoint.infer_config`).
        overwrite: Replace an existing `dst`: a safetensors file (a ComfyUI file), or a folder holding a saved encoder
            and nothing else (`SAVED_ENCODER_FILES`). Any other file or folder is refused, naming what it holds:
            nothing of it is deleted.

    Returns:
        The path written.

    Raises:
        ValueError: `src` is not a distilled encoder, the config does not describe its tensors, or `dst` exists
            (without `overwrite`), or is not a saved encoder (with it).
    """
    dst = Path(dst)
    if dst.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"Refusing to write {str(dst)!r}: conversions write safetensors only. Use a folder or a .safetensors path."
        )
    if dst.exists() and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
        raise ValueError(
            f"{str(dst)!r} already exists and is not empty: choose another destination, or pass overwrite "
            "(`--overwrite`) to replace it."
        )
    if dst.exists() and overwrite:
        _check_replaceable(dst)
    checkpoint = read_checkpoint(download(src))
    resolved, _ = resolve_config(checkpoint, config)
    state = {key: value.contiguous() for key, value in checkpoint.tensors.items()}

    if dst.suffix == ".safetensors":
        metadata = {"format": "pt", CONFIG_METADATA_KEY: resolved.to_json_string()}
        with atomic_file(dst, overwrite=overwrite) as staging:
            save_file(to_comfyui_keys(state), staging, metadata=metadata)
    else:
        with atomic_folder(dst, replace=overwrite) as staging:
            resolved.save_pretrained(staging)
            save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    return dst


def _check_replaceable(dst: Path) -> None:
    """Refuse to replace anything but a saved encoder (or an empty folder): `--overwrite` deletes the old one."""
    refusal = f"Refusing to replace {str(dst)!r}"
    keep = "choose another destination, or move what you want to keep out of it first"
    if dst.suffix == ".safetensors":
        if dst.is_dir():
            raise ValueError(f"{refusal}: it is a folder, not a ComfyUI .safetensors file; {keep}.")
        if kind := not_a_regular_file(dst):
            raise ValueError(f"{refusal}: it is {kind}, not a .safetensors file; {keep}.")
        try:
            with safe_open(dst, "pt"):  # the header only
                pass
        except (SafetensorError, OSError):
            raise ValueError(
                f"{refusal}: it is not a safetensors file (its header does not parse), so it holds no weights "
                f"--overwrite may replace; {keep}."
            ) from None
        return
    if not dst.is_dir():
        raise ValueError(f"{refusal}: it is a file, and the destination of a folder conversion is a folder; {keep}.")
    names = sorted(path.name for path in dst.iterdir())
    if not names:
        return
    foreign = [name for name in names if not (dst / name).is_file() or not _is_encoder_file(name)]
    if foreign:
        raise ValueError(
            f"{refusal}: it holds {few(foreign)}, which a saved encoder does not. --overwrite replaces only an empty "
            "folder or one holding a distilled encoder and nothing else (config.json, weights, tokenizer files, "
            f"README.md, {TRAINING_CONFIG_NAME}); {keep}."
        )
    try:
        is_encoder = "project_out_dim" in json.loads((dst / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        is_encoder = False
    if not is_encoder:
        raise ValueError(f"{refusal}: its config.json is not a distilled encoder's (no project_out_dim); {keep}.")


def _is_encoder_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SAVED_ENCODER_FILES)
