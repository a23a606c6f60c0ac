"""Configuration of the distilled T5 encoder: a T5 config plus the projector's widths."""

from __future__ import annotations

import json
from collections.abc import Mapping

from huggingface_hub.errors import StrictDataclassError
from transformers import T5Config

# The fields that size the model's tensors (and, for num_layers, how many modules are built): each must be a whole
# number above zero, or a config file could ask for a model that cannot exist, or one that exhausts the machine.
SIZE_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
    "relative_attention_max_distance", "project_in_dim", "project_out_dim",
)


class DistilledT5Config(T5Config):
    r"""
    Configuration of [`DistilledT5EncoderModel`]: every field of [`~transformers.T5Config`] describes the small T5
    encoder, and three fields describe the MLP projector that maps its `d_model`-wide output to the teacher's width.

    The public DistillT5 checkpoint writes `model_type: "t5"` with `project_in_dim` / `project_out_dim`; this class
    reads that file unchanged.

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
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        where = repr(str(pretrained_model_name_or_path))
        try:
            config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            # transformers reports a file that does not parse as an OSError raised while handling the parse error.
            if not isinstance(error.__context__, (json.JSONDecodeError, UnicodeDecodeError)):
                raise
            raise ValueError(
                f"The config.json of {where} is not valid JSON ({error.__context__}). {_FIX_CONFIG_FILE}"
            ) from None
        if problems := invalid_sizes(config_dict):
            raise ValueError(f"The config.json of {where} is invalid: {'; '.join(problems)}. {_FIX_CONFIG_FILE}")
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
        # A value of the wrong type fails transformers' field validation, whose error is no ValueError.
        try:
            return super().from_dict(config_dict, **kwargs)
        except StrictDataclassError as error:
            raise ValueError(f"Invalid config: {' '.join(str(error).split())}") from None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if problems := invalid_sizes({name: getattr(self, name) for name in SIZE_FIELDS}):
            raise ValueError(f"Invalid config: {'; '.join(problems)}.")
        if self.project_in_dim is None:
            self.project_in_dim = self.d_model
        if self.project_in_dim != self.d_model:
            raise ValueError(
                f"project_in_dim ({self.project_in_dim}) must equal d_model ({self.d_model}): the projector reads "
                "the T5 encoder's output. Fix the config or leave project_in_dim unset."
            )


_FIX_CONFIG_FILE = (
    "Correct the file, or leave it out and convert the weights alone (`flux-small-encoder convert "
    "model.safetensors OUT/` reads the sizes off the tensor shapes)."
)


def invalid_sizes(values: Mapping) -> list[str]:
    """What is wrong with the `SIZE_FIELDS` in `values` (a config or its dict), one phrase per field."""
    problems = []
    for name in SIZE_FIELDS:
        value = values.get(name)
        if name in values and value is not None and (type(value) is not int or value < 1):
            problems.append(f"{name} must be a whole number above 0, not {value!r}")
    return problems
