"""The `lora` block of a training config: peft `LoraConfig` arguments, checked when the config is read.

The flat `lora_*` keys of earlier versions still load: they are moved into the block with a `FutureWarning`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from typing import Any

# T5's attention and feed-forward projections: the LoRA targets when the `lora` block names none.
T5_LORA_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
# The flat LoRA keys of earlier versions, and where each now lives in the `lora` block.
FLAT_LORA_KEYS = {
    "lora_rank": "lora.r",
    "lora_alpha": "lora.lora_alpha",
    "lora_dropout": "lora.lora_dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_train_projector": "lora.modules_to_save: [final_projection]",
}


def check_lora(lora: dict[str, Any] | None) -> dict[str, Any]:
    """The `lora` block, checked against peft's `LoraConfig` fields; `target_modules` defaults to T5's projections.

    Only plainly typed fields (`r`, `lora_alpha`, `lora_dropout`, `use_dora`, ...) are type-checked here; peft checks
    the rest when the adapters are made.

    Raises:
        ValueError: One line naming the field: an argument `LoraConfig` does not take, or a value of the wrong type.
    """
    if lora is None:
        return {}
    if not isinstance(lora, dict):
        raise ValueError(f"lora must be a mapping of peft LoraConfig arguments, e.g. {{r: 8}}, got {lora!r}.")
    if not lora:
        return {}
    from peft import LoraConfig

    hints = typing.get_type_hints(LoraConfig)
    arguments = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    for key, value in lora.items():
        if key not in arguments:
            close = difflib.get_close_matches(key, arguments, n=1)
            hint = f" (did you mean lora.{close[0]}?)" if close else " (see peft's LoraConfig for its arguments)"
            raise ValueError(f"lora.{key} is not an argument of peft's LoraConfig{hint}.")
        expected = hints[key]
        plain_number = expected in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
        if expected in (int, float, bool, str) and not plain_number and not isinstance(value, expected):
            raise ValueError(f"lora.{key} must be of type {expected.__name__}, got {value!r}.")
    if lora.get("r", 1) <= 0:
        raise ValueError(f"lora.r must be at least 1, got {lora['r']} (for full fine-tuning, leave lora empty).")
    return {**lora, "target_modules": lora.get("target_modules") or list(T5_LORA_TARGETS)}


def move_flat_lora_keys(values: dict[str, Any]) -> None:
    """Map the flat `lora_*` keys of earlier versions into the `lora` block, with a deprecation warning."""
    flat = {key: values.pop(key) for key in FLAT_LORA_KEYS if key in values}
    if not flat:
        return
    renames = ", ".join(f"{key} -> {FLAT_LORA_KEYS[key]}" for key in flat)
    warnings.warn(
        f"the flat LoRA keys are deprecated; write them in the `lora` block of peft LoraConfig arguments ({renames}), "
        "e.g. `lora: {r: 8, lora_alpha: 8}` in YAML or `lora.r=8` on the command line.",
        FutureWarning,
        stacklevel=3,
    )
    lora = dict(values.get("lora") or {})
    rank = flat.get("lora_rank")
    if rank == 0 or (rank is None and not lora):  # rank 0, the old default, meant full fine-tuning
        values["lora"] = {}
        return
    if rank:
        lora["r"] = rank
        lora.setdefault("lora_alpha", rank)  # the old default alpha: the rank
    if flat.get("lora_alpha"):
        lora["lora_alpha"] = flat["lora_alpha"]
    if "lora_dropout" in flat:
        lora["lora_dropout"] = flat["lora_dropout"]
    if flat.get("lora_target_modules"):
        lora["target_modules"] = flat["lora_target_modules"]
    if flat.get("lora_train_projector"):
        lora["modules_to_save"] = ["final_projection"]
    values["lora"] = lora
