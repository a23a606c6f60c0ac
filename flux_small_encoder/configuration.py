"""Configuration of the distilled T5 encoder: a T5 config plus the projector's widths."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import T5Config
from transformers.activations import ACT2FN

# The fields that size the model's tensors (and, for num_layers, how many modules are built): each must be a whole
# number above zero, or a config file could ask for a model that cannot exist, or one that exhausts the machine.
SIZE_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
    "relative_attention_max_distance", "project_in_dim", "project_out_dim",
)
# The dropout probabilities the model's layers are built with.
DROPOUT_FIELDS = ("dropout_rate", "classifier_dropout", "projector_dropout")


class InvalidConfigError(ValueError):
    """Config fields that describe no model; `problems` says, field by field, what each must be."""

    def __init__(self, problems: list[str]):
        super().__init__(f"Invalid config: {'; '.join(problems)}.")
        self.problems = problems


class DistilledT5Config(T5Config):
    r"""
    Configuration of [`DistilledT5EncoderModel`]: every field of [`~transformers.T5Config`] describes the small T5
    encoder, and three fields describe the MLP projector that maps its `d_model`-wide output to the teacher's width.

    The public DistillT5 checkpoint writes `model_type: "t5"` with `project_in_dim` / `project_out_dim`; this class
    reads that file unchanged. Fields that describe no model (a size that is not a whole number above zero, a dropout
    that is no probability, an unknown activation) raise `InvalidConfigError`, a `ValueError`; `from_pretrained` names
    the file.

    Args:
        project_in_dim (`int`, *optional*):
            Input width of the projector. Must equal `d_model`; defaults to it.
        project_out_dim (`int`, *optional*, defaults to 4096):
            Output width of the projector: the teacher's embedding width (FLUX's `joint_attention_dim`).
        projector_dropout (`float`, *optional*, defaults to 0.1):
            Dropout between the projector's two linear layers (active in training only).
    """

    model_type = "distilled_t5"

    project_in_dim: int | None = None
    project_out_dim: int = 4096
    projector_dropout: float = 0.1

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except InvalidConfigError as error:
            source = f"The config.json of {str(pretrained_model_name_or_path)!r}"
            raise ValueError(f"{source} is invalid: {'; '.join(error.problems)}. {FIX_CONFIG_FILE}") from None

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        where = repr(str(pretrained_model_name_or_path))
        local_file = Path(pretrained_model_name_or_path) / "config.json"
        if local_file.is_file():  # read first what transformers' reader would fail on with no word of the file
            read_config_file(local_file, f"The config.json of {where}")
        try:
            config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            # transformers reports a file that does not parse as an OSError raised while handling the parse error.
            if not isinstance(error.__context__, (json.JSONDecodeError, UnicodeDecodeError)):
                raise
            raise ValueError(
                f"The config.json of {where} is not valid JSON ({error.__context__}). {FIX_CONFIG_FILE}"
            ) from None
        if config_dict.get("model_type") == "t5":
            if "project_out_dim" not in config_dict:
                raise ValueError(
                    f"{where} is a plain T5 checkpoint, not a distilled encoder (its config "
                    "has no project_out_dim). Build a student from it with "
                    "`DistilledT5EncoderModel.from_t5_encoder(path, project_out_dim=...)`."
                )
            # The public DistillT5 checkpoint declares itself a plain T5; it is ours.
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        if problems := invalid_fields(config_dict):  # in our words, before transformers' type checks
            raise InvalidConfigError(problems)
        # A value of another wrong type fails transformers' field validation, whose error is no ValueError.
        try:
            return super().from_dict(config_dict, **kwargs)
        except StrictDataclassError as error:
            raise InvalidConfigError([" ".join(str(error).split())]) from None

    def __post_init__(self, **kwargs):
        # Checked before T5Config reads them (it splits feed_forward_proj) and before anything is built from them.
        fields = {name: getattr(self, name) for name in (*SIZE_FIELDS, *DROPOUT_FIELDS, "feed_forward_proj")}
        if problems := invalid_fields(fields):
            raise InvalidConfigError(problems)
        super().__post_init__(**kwargs)
        if self.project_in_dim is None:
            self.project_in_dim = self.d_model
        if self.project_in_dim != self.d_model:
            raise InvalidConfigError([
                f"project_in_dim ({self.project_in_dim}) must equal d_model ({self.d_model}), since the projector "
                "reads the T5 encoder's output: correct it or leave project_in_dim unset"
            ])


FIX_CONFIG_FILE = (
    "Correct the file, or leave it out and convert the weights alone (`flux-small-encoder convert "
    "model.safetensors OUT/` reads the sizes off the tensor shapes)."
)


def read_config_file(path: str | os.PathLike, source: str, fix: str = FIX_CONFIG_FILE) -> dict:
    """The JSON object in a config file, or one `ValueError` naming `source` (`"The config.json of 'x'"`), the problem
    and `fix`: the file cannot be read, or what `parse_config_json` refuses."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{source} cannot be read ({error}). {fix}") from None
    return parse_config_json(text, source, fix)


def parse_config_json(text: str, source: str, fix: str = FIX_CONFIG_FILE) -> dict:
    """The JSON object in `text`, or one `ValueError` naming `source`, the problem and `fix`: it is not JSON, is nested
    too deeply to parse, or holds no object."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON ({error}). {fix}") from None
    except RecursionError:
        raise ValueError(f"{source} is nested too deeply to be a config. {fix}") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{source} holds {'null' if config is None else f'a JSON {type(config).__name__}'}, not an object of "
            f"config fields ({{\"d_model\": ..., ...}}). {fix}"
        )
    return config


def config_from_dict(config_dict: dict, source: str, fix: str = FIX_CONFIG_FILE) -> DistilledT5Config:
    """`DistilledT5Config.from_dict(config_dict)`, or one `ValueError` naming `source`, each bad field and `fix`."""
    try:
        return DistilledT5Config.from_dict(config_dict)
    except InvalidConfigError as error:
        raise ValueError(f"{source} is invalid: {'; '.join(error.problems)}. {fix}") from None


def invalid_fields(values: Mapping) -> list[str]:
    """What is wrong with the fields of `values` (a config or its dict) that size the model (`SIZE_FIELDS`), its
    dropouts (`DROPOUT_FIELDS`) and its activation (`feed_forward_proj`), one phrase per field."""
    problems = invalid_sizes(values)
    for name in DROPOUT_FIELDS:
        value = values.get(name)
        if name in values and value is not None and not _is_probability(value):
            problems.append(f"{name} must be a probability from 0 to 1, not {value!r}")
    if "feed_forward_proj" in values and not _is_activation(values["feed_forward_proj"]):
        problems.append(
            "feed_forward_proj must be an activation of transformers' ACT2FN, alone or as 'gated-ACT' (such as 'relu' "
            f"or 'gated-gelu'), not {values['feed_forward_proj']!r}"
        )
    return problems


def invalid_sizes(values: Mapping) -> list[str]:
    """What is wrong with the `SIZE_FIELDS` in `values` (a config or its dict), one phrase per field."""
    problems = []
    for name in SIZE_FIELDS:
        value = values.get(name)
        if name in values and value is not None and (type(value) is not int or value < 1):
            problems.append(f"{name} must be a whole number above 0, not {value!r}")
    return problems


def _is_probability(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= 1


def _is_activation(value) -> bool:
    parts = value.split("-") if isinstance(value, str) else []
    return (len(parts) == 1 or len(parts) == 2 and parts[0] == "gated") and parts[-1] in ACT2FN
