"""Configuration of the distilled T5 encoder: a T5 config plus the projector's widths."""

from __future__ import annotations

from transformers import T5Config


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
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "t5":
            if "project_out_dim" not in config_dict:
                raise ValueError(
                    f"{pretrained_model_name_or_path!r} is a plain T5 checkpoint, not a distilled encoder (its config "
                    "has no project_out_dim). Build a student from it with "
                    "`DistilledT5EncoderModel.from_t5_encoder(path, project_out_dim=...)`."
                )
            # The public DistillT5 checkpoint declares itself a plain T5; it is ours.
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.project_in_dim is None:
            self.project_in_dim = self.d_model
        if self.project_in_dim != self.d_model:
            raise ValueError(
                f"project_in_dim ({self.project_in_dim}) must equal d_model ({self.d_model}): the projector reads "
                "the T5 encoder's output. Fix the config or leave project_in_dim unset."
            )
