"""The key layouts a distilled T5 encoder's tensors are stored in, whatever the file format, and the maps between them.

- `"distill-t5"` (ours): the public `LifuWang/DistillT5` checkpoint, the reference trainer's `.pth` state dicts and
  every folder `save_pretrained` writes. The T5 encoder sits under the wrapper's `encoder.` prefix
  (`encoder.shared.weight`, `encoder.encoder.block.{i}...`), the projector under `final_projection.`.
- `"comfyui"`: the T5 stack one level up (`encoder.encoder.` stripped to `encoder.`), as ComfyUI's DistillT5 loader
  holds it, and as the single-file `DistillT5-F32.safetensors` stores it with the wrapper prefix removed
  (`shared.weight`, `encoder.block.{i}...`, `final_projection.*`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .messages import few

OURS = "distill-t5"
COMFYUI = "comfyui"
SHARED_KEY = "encoder.shared.weight"
EMBED_TOKENS_KEY = "encoder.encoder.embed_tokens.weight"  # tied to SHARED_KEY; transformers stores only that one


def to_our_keys(keys: list[str], source: str) -> tuple[str, dict[str, str | None]]:
    """Detect the layout of `keys` and map each to our layout (`None`: a tied copy to drop).

    Raises:
        ValueError: the keys are in neither layout, or name tensors a distilled T5 encoder does not have.
    """
    ours = any(key.startswith("encoder.encoder.") for key in keys)
    comfy = any(key.startswith(("encoder.block.", "encoder.final_layer_norm.")) for key in keys)
    if ours == comfy:
        detail = "both the distill-t5 and the ComfyUI layout" if ours else "no T5 encoder blocks"
        raise ValueError(
            f"{source!r} is not a distilled T5 encoder checkpoint: its keys show {detail} ({few(sorted(keys))})."
        )
    renames, unknown = {}, []
    for key in keys:
        if ours or key.startswith("final_projection."):
            new = key
        elif key in ("shared.weight", SHARED_KEY):
            new = SHARED_KEY
        else:
            new = "encoder." + key
        if not new.startswith(("encoder.encoder.", "final_projection.")) and new != SHARED_KEY:
            unknown.append(key)
        renames[key] = new
    if unknown:
        raise ValueError(f"{source!r} holds tensors a distilled T5 encoder does not have: {few(unknown)}.")
    # The input embedding is tied: keep it once, under the name `save_pretrained` stores it as.
    if embed := next((key for key, new in renames.items() if new == EMBED_TOKENS_KEY), None):
        renames[embed] = None if SHARED_KEY in renames.values() else SHARED_KEY
    return (OURS if ours else COMFYUI), renames


def check_tied_copies(tensors: Mapping[str, torch.Tensor], renames: Mapping[str, str | None], source: str) -> None:
    """Refuse two different copies of the tied input embedding: keeping one would silently drop the other."""
    copies = [tensors[key] for key, new in renames.items() if new in (SHARED_KEY, None)]
    if len(copies) == 2 and not torch.equal(*copies):
        raise ValueError(
            f"{source!r} holds two different input embeddings ({SHARED_KEY} and {EMBED_TOKENS_KEY}); the model ties "
            "them, so one would be silently discarded. Keep the one you mean and drop the other."
        )


def renamed(mapping: Mapping, renames: Mapping[str, str | None]) -> dict:
    """`mapping` under the names `to_our_keys` gave, without the tied copies it dropped."""
    return {renames[key]: value for key, value in mapping.items() if renames[key] is not None}


def to_comfyui_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout -> ComfyUI's (`encoder.shared.weight` -> `shared.weight`, `encoder.encoder.` -> `encoder.`)."""
    out = {}
    for key, value in state.items():
        if key == SHARED_KEY:
            out["shared.weight"] = value
        elif key.startswith("encoder.encoder."):
            out[key.removeprefix("encoder.")] = value
        else:
            out[key] = value
    return out
