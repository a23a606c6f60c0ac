"""Write a distilled T5 encoder checkpoint in our folder layout or as a ComfyUI file, from any layout it is read in.

Reading (every layout, `.pth` safely) and finding the config are `checkpoint`'s job; this module only writes, and
only safetensors, through `atomic`: a failed or interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from .atomic import atomic_file, atomic_folder
from .checkpoint import CONFIG_METADATA_KEY, PICKLE_SUFFIXES, read_checkpoint, resolve_config
from .configuration import DistilledT5Config
from .hub import download
from .layouts import to_comfyui_keys


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
        overwrite: Replace a non-empty `dst`. Without it, an existing destination is refused.

    Returns:
        The path written.

    Raises:
        ValueError: `src` is not a distilled encoder, the config does not describe its tensors, or `dst` exists.
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
    checkpoint = read_checkpoint(download(os.fspath(src)))
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
