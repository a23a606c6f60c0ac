"""Small distilled T5 text encoders for FLUX and other T5-conditioned diffusion pipelines."""

from transformers import AutoConfig, AutoModel

from .configuration import DistilledT5Config
from .lora import (
    fuse_encoder_lora,
    load_encoder_lora,
    save_encoder_lora,
    set_encoder_lora,
    unfuse_encoder_lora,
    unload_encoder_lora,
)
from .modeling import DistilledT5EncoderModel
from .patching import PIPELINE_FAMILIES, load_pipeline, patch_encoder, unpatch_encoder
from .registry import PretrainedSpec, get_pretrained_spec, list_pretrained, load_encoder

__version__ = "0.1.0"

AutoConfig.register(DistilledT5Config.model_type, DistilledT5Config, exist_ok=True)
AutoModel.register(DistilledT5Config, DistilledT5EncoderModel, exist_ok=True)

__all__ = [
    "DistilledT5Config",
    "DistilledT5EncoderModel",
    "PIPELINE_FAMILIES",
    "PretrainedSpec",
    "__version__",
    "fuse_encoder_lora",
    "get_pretrained_spec",
    "list_pretrained",
    "load_encoder",
    "load_encoder_lora",
    "load_pipeline",
    "patch_encoder",
    "save_encoder_lora",
    "set_encoder_lora",
    "unfuse_encoder_lora",
    "unload_encoder_lora",
    "unpatch_encoder",
]
