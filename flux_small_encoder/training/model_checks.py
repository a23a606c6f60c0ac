"""Checks of a run's models before they cost anything: the teacher from its files, and the models handed in.

The teacher is a plain T5 encoder (`T5EncoderModel`) as wide (`d_model`) as the transformer's T5 input
(`joint_attention_dim`; FLUX.1: T5-XXL, 4096). Before its weights load, its `config.json` is read: a distilled encoder
(which `T5EncoderModel` would load without its projector, silently) and another width are refused, and the config is
compared with the names and shapes in its safetensors headers, as `registry.load_encoder` does for encoders: a config
asking for more than its weights hold (4e8 attention heads) is refused at once instead of allocating gigabytes.
Weights in another format (`.bin`) are not compared: reading their shapes means unpickling them.

What `DistillationTrainer` is handed is checked when it is made (types) and when it is set up (widths).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..checkpoint import INDEX_NAME, weight_files
from ..configuration import DistilledT5Config
from ..messages import few
from ..modeling import DistilledT5EncoderModel
from ..registry import is_repo_id
from .config import TrainingConfig
from .models import PRETRAINED, FrozenParts, model_source, teacher_name

_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.")
_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # tied to `shared.weight`, which save_pretrained writes instead


def check_teacher_source(config: TrainingConfig, width: int | None) -> None:
    """Before the teacher's weights load, refuse it from its `config.json` and safetensors headers (module docstring).

    Args:
        config: The run's configuration (`teacher`, else `model`'s `text_encoder_2`).
        width: The transformer's `joint_attention_dim`, `None` if unknown (then only the weights are compared).

    Raises:
        ValueError: A distilled encoder, another width, or a config that does not describe the weights.
    """
    if model_source(config.teacher or config.model) is not PRETRAINED:
        return  # built in code: checked once built (`check_teacher`)
    folder = _teacher_files(config)
    if folder is None or not (folder / "config.json").is_file():
        return  # from_pretrained says what is missing
    label = f"teacher {teacher_name(config)}"
    try:
        raw = json.loads((folder / "config.json").read_text())
    except ValueError as error:
        raise ValueError(f"the config.json of {label} ({folder}) is not JSON ({error}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"the config.json of {label} ({folder}) is not a JSON object.")
    if raw.get("model_type") == DistilledT5Config.model_type or "project_out_dim" in raw:
        raise ValueError(_distilled_teacher(label))
    if width is not None and raw.get("d_model") != width:
        raise ValueError(_teacher_width(label, raw.get("d_model"), width))
    _check_config_against_weights(raw, folder, label)


def check_teacher(teacher: Any, width: int | None = None, label: str = "the teacher") -> None:
    """Refuse a teacher model (built, loaded or handed in) that is not a module, is a distilled encoder, or, with
    `width` and when its config says its own, is not `width` wide."""
    if isinstance(teacher, DistilledT5EncoderModel):
        raise ValueError(_distilled_teacher(label))
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{label} must be a T5 encoder (an nn.Module such as transformers' T5EncoderModel), got "
                        f"{type(teacher).__name__}.")
    d_model = getattr(getattr(teacher, "config", None), "d_model", None)
    if width is not None and d_model is not None and d_model != width:
        raise ValueError(_teacher_width(label, d_model, width))


def check_student(student: Any, width: int | None = None) -> None:
    """Refuse a student that is not a `DistilledT5EncoderModel`, or (with `width`) whose projector is not `width` wide.

    A plain T5 encoder would train, but write a `final/` that nothing loads as a distilled encoder.
    """
    if not isinstance(student, DistilledT5EncoderModel):
        raise TypeError(
            f"student must be a DistilledT5EncoderModel (a T5 encoder with its projector), got "
            f"{type(student).__name__}: make one from a T5 encoder with DistilledT5EncoderModel.from_t5_encoder(t5, "
            "width), load one with load_encoder, or hand in none to build it from the config."
        )
    if width is not None and student.config.project_out_dim != width:
        raise ValueError(f"the student produces {student.config.project_out_dim}-wide embeddings but the transformer "
                         f"reads {width}-wide ones: make its projector {width} wide (project_out_dim).")


def check_handed_in(config: Any, frozen: Any, teacher: Any, student: Any) -> tuple[FrozenParts | None, Any]:
    """Check what `DistillationTrainer` is handed, by type; returns the frozen parts and teacher to use.

    A FLUX pipeline is accepted for `frozen`: its parts are taken, and its `text_encoder_2` is the teacher when none
    is handed in and `teacher_cache` is not set.

    Raises:
        TypeError: Something is not of the type the trainer takes (the message says which, and how to make one).
        ValueError: A teacher and a teacher cache are both given.
    """
    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig, got {config!r}: make one with load_config(NAME_OR_YAML) "
                        "(a shipped name such as 'tiny', or a YAML file) or TrainingConfig(...).")
    if frozen is not None and not isinstance(frozen, FrozenParts):
        if not _is_flux_pipeline(frozen):
            raise TypeError(f"frozen must be FrozenParts or a FLUX pipeline, got {type(frozen).__name__}: make "
                            "FrozenParts(transformer=..., scheduler=..., text_encoder=..., tokenizer=..., "
                            "tokenizer_2=..., vae_scale_factor=...), or FrozenParts.from_pipeline(pipe).")
        if teacher is None and not config.teacher_cache:
            teacher = frozen.text_encoder_2
        frozen = FrozenParts.from_pipeline(frozen)
    if teacher is not None and config.teacher_cache:
        raise ValueError("a teacher was handed in and teacher_cache is set: give one source of teacher "
                         "embeddings, not both.")
    if teacher is not None:
        check_teacher(teacher)
    if student is not None:
        check_student(student)
    return frozen, teacher


def _is_flux_pipeline(pipe: Any) -> bool:
    names = ("transformer", "scheduler", "text_encoder", "tokenizer", "tokenizer_2", "text_encoder_2")
    return all(hasattr(pipe, name) for name in names) and hasattr(pipe, "vae_scale_factor")


def _distilled_teacher(label: str) -> str:
    return (f"{label} is a distilled encoder (a T5 with a projector), not a teacher: a teacher is a plain T5 encoder "
            "(T5EncoderModel) as wide as the transformer's T5 input, such as FLUX's T5-XXL (leave teacher unset to "
            "use the pipeline's text_encoder_2). To go on training a distilled encoder, give it as the student, with "
            "student_init=distilled.")


def _teacher_width(label: str, d_model: Any, width: int) -> str:
    return (f"{label} is {d_model} wide (d_model) but the transformer reads {width}-wide T5 embeddings "
            "(joint_attention_dim): give a teacher of that width, such as the pipeline's own text_encoder_2 (leave "
            "teacher unset).")


def _teacher_files(config: TrainingConfig) -> Path | None:
    """The local folder of the teacher's config and safetensors (fetched from the Hub into its cache if needed, as
    `from_pretrained` would), or `None` for a name that is neither a folder nor a repo id."""
    name, subfolder = (config.teacher, "") if config.teacher else (config.model, "text_encoder_2")
    if os.path.isdir(name):
        return Path(name) / subfolder
    if not is_repo_id(name):
        return None
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    root = snapshot_download(name, revision=None if config.teacher else config.revision,
                             allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"])
    return Path(root) / subfolder


def _check_config_against_weights(raw: dict, folder: Path, label: str) -> None:
    """Refuse a T5 `config.json` that does not describe the tensors in the folder's safetensors headers."""
    if (folder / INDEX_NAME).is_file() or (folder / "model.safetensors").is_file():
        files = weight_files(folder)  # an index naming files outside the folder is refused there
    else:
        return  # weights in another format: their shapes are not read (module docstring)
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {file} as safetensors ({error}): is the file complete? Fetch or copy "
                             f"{label} again.") from None
    fix = f"Correct the config.json of {label} ({folder}), or give the folder its weights were saved with."
    blocks = len({match[1] for key in shapes if (match := _BLOCK_KEY.match(key))})
    if raw.get("num_layers") != blocks:
        raise ValueError(f"the config of {label} does not describe its weights: it says "
                         f"num_layers={raw.get('num_layers')!r} but the weights hold {blocks} T5 blocks. {fix}")
    from transformers import T5Config, T5EncoderModel

    try:
        with torch.device("meta"):  # laid out without memory: only the shapes are wanted
            layout = T5EncoderModel(T5Config.from_dict(raw))
        expected = {key: tuple(value.shape) for key, value in layout.state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"the config of {label} does not describe a T5 encoder ({error}). {fix}") from None
    if "shared.weight" in shapes or _TIED_EMBEDDING in shapes:
        expected.pop(_TIED_EMBEDDING if "shared.weight" in shapes else "shared.weight", None)
    missing = sorted(expected.keys() - shapes.keys())
    other = [f"{key} {list(shapes[key])} (config says {list(expected[key])})"
             for key in sorted(expected.keys() & shapes.keys()) if shapes[key] != expected[key]]
    if missing or other:
        problems = "; ".join(part for part in (missing and f"missing {few(missing, 3)}",
                                               other and f"other shapes: {few(other, 3)}") if part)
        raise ValueError(f"the config of {label} does not describe its weights: {problems}. {fix}")
