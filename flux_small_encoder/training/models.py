"""Loading what a run needs: the frozen FLUX parts, the teacher, the student (with or without LoRA).

`model: tiny` / `student: tiny` build tiny random stand-ins in code (`flux_small_encoder.tiny`), so the `tiny` config
and the tests run offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modeling import DistilledT5EncoderModel
from .config import TrainingConfig

TINY = "tiny"


@dataclass
class FrozenParts:
    """The pipeline parts that stay frozen: the transformer, its scheduler, CLIP and both tokenizers."""

    transformer: nn.Module
    scheduler: object
    text_encoder: nn.Module
    tokenizer: object
    tokenizer_2: object
    vae_scale_factor: int

    @property
    def width(self) -> int:
        """The width of the T5 embeddings the transformer reads (FLUX.1: 4096)."""
        return self.transformer.config.joint_attention_dim


def load_frozen_parts(config: TrainingConfig, dtype: torch.dtype) -> FrozenParts:
    """The transformer, scheduler, CLIP text encoder and tokenizers of `config.model`, frozen, in `dtype`."""
    if config.model == TINY:
        from ..tiny import tiny_flux_components

        parts = tiny_flux_components(seed=0)
        vae_scale_factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    else:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel

        kwargs = {"revision": config.revision}
        parts = {
            "transformer": FluxTransformer2DModel.from_pretrained(
                config.model, subfolder="transformer", dtype=dtype, **kwargs
            ),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(
                config.model, subfolder="scheduler", **kwargs
            ),
            "text_encoder": CLIPTextModel.from_pretrained(
                config.model, subfolder="text_encoder", dtype=dtype, **kwargs
            ),
            "tokenizer": AutoTokenizer.from_pretrained(config.model, subfolder="tokenizer", **kwargs),
            "tokenizer_2": load_t5_tokenizer(config),
        }
        # Only the VAE's config is needed: the latent grid is 2 ** (levels - 1) times smaller than the image.
        vae_config = AutoencoderKL.load_config(config.model, subfolder="vae", **kwargs)
        vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    for name in ("transformer", "text_encoder"):
        parts[name].requires_grad_(False).eval()
        if parts[name].dtype != dtype:
            parts[name].to(dtype)
    return FrozenParts(
        transformer=parts["transformer"],
        scheduler=parts["scheduler"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        tokenizer_2=parts["tokenizer_2"],
        vae_scale_factor=vae_scale_factor,
    )


def load_t5_tokenizer(config: TrainingConfig):
    """The pipeline's T5 tokenizer (`tokenizer_2`), which the teacher and the student share."""
    if config.model == TINY:
        from ..tiny import tiny_t5_tokenizer

        return tiny_t5_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model, subfolder="tokenizer_2", revision=config.revision)


def teacher_name(config: TrainingConfig) -> str:
    """The teacher's identity, as recorded in (and checked against) a teacher cache."""
    if config.teacher:
        return config.teacher
    revision = f"@{config.revision}" if config.revision else ""
    return TINY if config.model == TINY else f"{config.model}/text_encoder_2{revision}"


def load_teacher(config: TrainingConfig, dtype: torch.dtype) -> nn.Module:
    """The frozen teacher T5 encoder: `config.teacher`, else the pipeline's `text_encoder_2`."""
    if config.model == TINY and not config.teacher:
        from ..tiny import tiny_teacher

        teacher = tiny_teacher(seed=0)
    else:
        from transformers import T5EncoderModel

        if config.teacher:
            teacher = T5EncoderModel.from_pretrained(config.teacher, dtype=dtype)
        else:
            teacher = T5EncoderModel.from_pretrained(
                config.model, subfolder="text_encoder_2", revision=config.revision, dtype=dtype
            )
    return teacher.requires_grad_(False).eval().to(dtype)


def build_student(config: TrainingConfig, width: int) -> DistilledT5EncoderModel:
    """The student in float32, with its projector as wide as the transformer's T5 input.

    `student_init`: `t5` starts from the pretrained T5 encoder `config.student` plus a fresh projector, `random`
    builds the same architecture with random weights, `distilled` loads a distilled encoder to continue from.
    """
    from transformers import T5EncoderModel

    if config.student_init == "distilled":
        from ..registry import load_encoder

        student = load_encoder(config.student, dtype=torch.float32)
        if student.config.project_out_dim != width:
            raise ValueError(f"the student {config.student!r} produces {student.config.project_out_dim}-wide "
                             f"embeddings but the transformer reads {width}.")
        return student
    if config.student == TINY:
        from ..tiny import tiny_t5_config

        torch.manual_seed(config.seed)
        t5 = T5EncoderModel(tiny_t5_config(d_model=32, d_kv=8))
    elif config.student_init == "random":
        from transformers import T5Config

        t5 = T5EncoderModel(T5Config.from_pretrained(config.student))
    else:
        t5 = T5EncoderModel.from_pretrained(config.student, dtype=torch.float32)
    torch.manual_seed(config.seed)
    student = DistilledT5EncoderModel.from_t5_encoder(t5, width, projector_dropout=config.projector_dropout)
    return student.float()


def add_lora(student: DistilledT5EncoderModel, config: TrainingConfig) -> nn.Module:
    """Wrap the student in peft LoRA adapters on `config.lora_target_modules` (all other weights frozen)."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha or config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        modules_to_save=["final_projection"] if config.lora_train_projector else None,
    )
    return get_peft_model(student, lora_config)


def tokenize_t5(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """T5 token ids exactly as `FluxPipeline._get_t5_prompt_embeds` makes them (padded to `max_length`)."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def clip_pooled_embeds(text_encoder: nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP's pooled embeddings exactly as `FluxPipeline._get_clip_prompt_embeds` makes them."""
    input_ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(input_ids.to(text_encoder.device), output_hidden_states=False).pooler_output
