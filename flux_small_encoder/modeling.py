"""`DistilledT5EncoderModel`: a small T5 encoder followed by an MLP projector into the teacher's width.

This module path is public and permanent: diffusers records it in the `model_index.json` of every pipeline saved with
a patched encoder, and loads the class back from here.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel, T5Config, T5EncoderModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration import DistilledT5Config
from .private_api import init_t5_weights

# diffusers picks the load method of a component from a foreign module by looking up `PreTrainedModel` in that
# module: keep the name exported here, or pipelines saved with this encoder no longer load.
__all__ = ["DistilledT5EncoderModel", "PreTrainedModel"]


class DistilledT5EncoderModel(PreTrainedModel):
    r"""
    A small T5 encoder plus an MLP projector (`Linear -> ReLU -> Dropout -> Linear`, no biases) that produces
    embeddings as wide as the teacher's (T5-XXL: 4096), so it drops into a pipeline in place of the teacher.

    The module layout is that of the public DistillT5 checkpoint: an inner [`~transformers.T5EncoderModel`] under
    `encoder` and the projector under `final_projection`, so its `model.safetensors` loads unchanged.

    Call it like the T5 encoder it replaces: `model(input_ids, attention_mask=None)` returns a
    [`~transformers.modeling_outputs.BaseModelOutput`] whose `last_hidden_state` (also `[0]`) has shape
    `(batch, seq, project_out_dim)`.
    """

    config_class = DistilledT5Config
    base_model_prefix = "distilled_t5"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["T5Block"]
    # T5's feed-forward output overflows in float16; transformers keeps `wo` in float32 for that reason.
    _keep_in_fp32_modules = ["wo"]
    _tied_weights_keys = {"encoder.encoder.embed_tokens.weight": "encoder.shared.weight"}

    def __init__(self, config: DistilledT5Config):
        super().__init__(config)
        self.encoder = T5EncoderModel(_t5_config(config))
        self.final_projection = nn.Sequential(
            nn.Linear(config.project_in_dim, config.project_out_dim, bias=False),
            nn.ReLU(),
            nn.Dropout(config.projector_dropout),
            nn.Linear(config.project_out_dim, config.project_out_dim, bias=False),
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module in (self.final_projection[0], self.final_projection[3]):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
        else:
            init_t5_weights(self.encoder, module)

    # Refused while LoRA adapters (`flux_small_encoder.lora`) are in place: their layers' keys would not load back into
    # a plain encoder, whose weights would then be silently re-initialised. `wraps` keeps the parent's signature, which
    # diffusers inspects to pass `variant`, `safe_serialization`, ... when saving a pipeline.
    @functools.wraps(PreTrainedModel.save_pretrained)
    def save_pretrained(self, save_directory, *args, **kwargs):
        adapters = list(getattr(self, "peft_config", None) or [])
        if adapters:
            raise ValueError(
                f"The encoder carries LoRA adapters {adapters}. Save them with `save_encoder_lora`, or merge them in "
                "with `fuse_encoder_lora` then `unload_encoder_lora` before saving the encoder or its pipeline."
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.encoder.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`):
                Token ids from the teacher's tokenizer (T5 v1.1 vocabulary).
            attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*):
                1 for tokens to attend to, 0 for padding; passed to the T5 encoder.
            inputs_embeds (`torch.Tensor`, *optional*):
                Token embeddings to use instead of `input_ids`.
            output_hidden_states (`bool`, *optional*):
                Also return the T5 encoder's hidden states (before the projector).
            output_attentions (`bool`, *optional*):
                Also return the T5 encoder's attention maps.

        Returns:
            [`~transformers.modeling_outputs.BaseModelOutput`] with `last_hidden_state` of shape
            `(batch, seq, project_out_dim)`.
        """
        outputs = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        hidden = outputs.last_hidden_state
        projection_dtype = self.final_projection[0].weight.dtype
        projected = self.final_projection(hidden.to(projection_dtype))
        result = BaseModelOutput(
            last_hidden_state=projected, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return result if return_dict is not False else result.to_tuple()

    @classmethod
    def from_t5_encoder(
        cls,
        t5_encoder: str | T5EncoderModel,
        project_out_dim: int,
        *,
        projector_dropout: float = 0.1,
        **from_pretrained_kwargs,
    ) -> DistilledT5EncoderModel:
        r"""
        Build a fresh student from a T5 encoder (a checkpoint such as `google/t5-v1_1-base`, a local folder, or a
        loaded `T5EncoderModel`) and a newly initialised projector of width `project_out_dim`.

        Args:
            t5_encoder (`str` or `T5EncoderModel`):
                The T5 encoder to start from. A T5 encoder-decoder checkpoint works too: its decoder is dropped.
            project_out_dim (`int`):
                The teacher's embedding width (FLUX: the transformer's `joint_attention_dim`, 4096).
            projector_dropout (`float`, *optional*, defaults to 0.1):
                Dropout inside the projector during training.
            from_pretrained_kwargs:
                Passed to `T5EncoderModel.from_pretrained` (`revision`, `cache_dir`, `dtype`, ...).
        """
        if not isinstance(t5_encoder, T5EncoderModel):
            t5_encoder = T5EncoderModel.from_pretrained(t5_encoder, **from_pretrained_kwargs)
        t5_config = t5_encoder.config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
            t5_config.pop(key, None)
        config = DistilledT5Config(
            **t5_config, project_out_dim=project_out_dim, projector_dropout=projector_dropout
        )
        config.base_model_name_or_path = t5_encoder.config.name_or_path or None
        with torch.device("meta"):
            model = cls(config)
        model.encoder = t5_encoder
        model.final_projection.to_empty(device=t5_encoder.device)
        model.final_projection.to(t5_encoder.dtype)
        model._init_weights(model.final_projection[0])
        model._init_weights(model.final_projection[3])
        return model


def _t5_config(config: DistilledT5Config) -> T5Config:
    """The plain T5 config of the inner encoder, without the projector's fields."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "project_in_dim", "project_out_dim", "projector_dropout"):
        fields.pop(key, None)
    return T5Config(**fields)


# `AutoConfig` / `AutoModel.from_pretrained` recognise folders saved with `model_type: "distilled_t5"` once this
# module is loaded (any use of the package's model or patching functions loads it).
AutoConfig.register(DistilledT5Config.model_type, DistilledT5Config, exist_ok=True)
AutoModel.register(DistilledT5Config, DistilledT5EncoderModel, exist_ok=True)
