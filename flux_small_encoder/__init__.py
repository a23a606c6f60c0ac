"""Small distilled T5 text encoders for FLUX and other T5-conditioned diffusion pipelines."""

from transformers import AutoConfig, AutoModel

from .configuration import DistilledT5Config
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
    "get_pretrained_spec",
    "list_pretrained",
    "load_encoder",
    "load_pipeline",
    "patch_encoder",
    "unpatch_encoder",
]
