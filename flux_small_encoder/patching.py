"""Swap a pipeline's T5-XXL encoder for a distilled one, in place, and back.

Which attribute holds the T5 differs between pipeline families; that lives in one table, `PIPELINE_FAMILIES`, so a new
family is a new row, not a new branch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from .modeling import DistilledT5EncoderModel
from .private_api import group_offload_config, offload_device, remove_offload_hooks
from .registry import hub_kwargs, load_encoder, resolve_encoder

# The pipeline's attribute that keeps the encoder replaced by `patch_encoder`, for `unpatch_encoder`.
_ORIGINAL_ATTR = "_flux_small_encoder_original"
# Stands for an original encoder that was dropped on patching to return its memory.
_RELEASED = object()


@dataclass(frozen=True)
class EncoderSlot:
    """Where a pipeline family keeps its T5 encoder.

    Args:
        encoder: The pipeline attribute holding the T5 encoder.
        tokenizer: The pipeline attribute holding its tokenizer.
        width: The config field of `width_module` that the encoder's embeddings must match.
        max_length: The pipeline's default `max_sequence_length`.
        width_module: The pipeline component that consumes the embeddings and holds `width` in its config.
    """

    encoder: str
    tokenizer: str
    width: str
    max_length: int
    width_module: str = "transformer"


# Pipeline class-name prefix -> slot. A pipeline matches on its own class name or any base class's; the prefix must end
# a word ("Flux" names FluxImg2ImgPipeline, not Flux2Pipeline, whose text encoder is no T5), and the longest one wins.
PIPELINE_FAMILIES: dict[str, EncoderSlot] = {
    "Flux": EncoderSlot("text_encoder_2", "tokenizer_2", "joint_attention_dim", 512),
    "FluxPriorRedux": EncoderSlot("text_encoder_2", "tokenizer_2", "txt_in_features", 512, "image_embedder"),
    "StableDiffusion3": EncoderSlot("text_encoder_3", "tokenizer_3", "joint_attention_dim", 256),
    "Chroma": EncoderSlot("text_encoder", "tokenizer", "joint_attention_dim", 512),
    "PixArtSigma": EncoderSlot("text_encoder", "tokenizer", "caption_channels", 300),
    "PixArtAlpha": EncoderSlot("text_encoder", "tokenizer", "caption_channels", 120),
}


def find_encoder_slot(pipeline_or_cls) -> EncoderSlot:
    """The slot of the family whose prefix names the pipeline's class (or the nearest base class)."""
    cls = pipeline_or_cls if isinstance(pipeline_or_cls, type) else type(pipeline_or_cls)
    for base in cls.__mro__:
        name = base.__name__
        prefixes = [prefix for prefix in PIPELINE_FAMILIES if re.match(f"{prefix}[A-Z]", name)]
        if prefixes:
            return PIPELINE_FAMILIES[max(prefixes, key=len)]
    raise TypeError(
        f"{cls.__name__} is not a supported pipeline: flux-small-encoder knows the T5 slot of the "
        f"{', '.join(PIPELINE_FAMILIES)} pipeline families."
    )


def patch_encoder(
    pipe,
    encoder: str | os.PathLike | DistilledT5EncoderModel,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    keep_original: bool = False,
    revision: str | None = None,
    **from_pretrained_kwargs,
):
    r"""
    Replace the pipeline's T5 encoder with a distilled one, in place, and return the pipeline.

    The student follows the pipeline: the dtype of the model that reads its embeddings (the transformer) and the
    replaced encoder's device, or the pipeline's model CPU offload or group offload if one is enabled. It is registered
    with `register_modules`, so the patched pipeline saves and loads with `save_pretrained` / `from_pretrained` (import
    `flux_small_encoder` before loading).

    Args:
        pipe (`DiffusionPipeline`):
            A pipeline of a supported family (`PIPELINE_FAMILIES`), such as `FluxPipeline`.
        encoder (`str`, `os.PathLike` or `DistilledT5EncoderModel`):
            A registry name (`list_pretrained()`), a folder written by `save_pretrained`, a Hub repo id, or a model.
        dtype (`torch.dtype`, *optional*):
            The student's dtype; defaults to the transformer's (FluxPriorRedux: the image embedder's).
        device (`torch.device` or `str`, *optional*):
            The student's device when no offload is enabled; defaults to the replaced encoder's, else the
            transformer's.
        keep_original (`bool`, *optional*, defaults to `False`):
            Keep a reference to the replaced encoder so that `unpatch_encoder` can put it back. By default it is
            dropped and its memory returned.
        revision (`str`, *optional*):
            Hub branch, tag or commit of the encoder.
        from_pretrained_kwargs:
            Passed to `DistilledT5EncoderModel.from_pretrained` (`token`, `cache_dir`, `local_files_only`, ...).

    Raises:
        ValueError: the student's width differs from what the transformer expects, or the pipeline's tokenizer makes
            ids beyond the student's vocabulary. The pipeline is left unchanged.

    Example:
    ```py
    >>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16)
    >>> patch_encoder(pipe, "t5-base-distilled").to("cuda")
    ```
    """
    slot = find_encoder_slot(pipe)
    dtype = dtype or getattr(pipe, slot.width_module).dtype
    if isinstance(encoder, DistilledT5EncoderModel):
        student = encoder
    else:
        student = load_encoder(encoder, dtype=dtype, revision=revision, **from_pretrained_kwargs)
    student = cast_encoder(student, dtype).eval()
    check_compatible(pipe, student, slot)
    if getattr(pipe, slot.tokenizer, None) is None:
        tokenizer = _load_tokenizer(encoder, revision, from_pretrained_kwargs)
        check_compatible(pipe, student, slot, tokenizer)
        pipe.register_modules(**{slot.tokenizer: tokenizer})

    if not hasattr(pipe, _ORIGINAL_ATTR):
        original = getattr(pipe, slot.encoder, None)
        setattr(pipe, _ORIGINAL_ATTR, original if keep_original or original is None else _RELEASED)
        del original  # no reference may outlive the swap, or its memory is not returned
    _swap(pipe, slot, student, device)
    return pipe


def unpatch_encoder(pipe):
    """Put back the encoder that `patch_encoder` replaced, and return the pipeline.

    Needs `patch_encoder(..., keep_original=True)` unless the pipeline had no encoder (as with `load_pipeline`).
    """
    slot = find_encoder_slot(pipe)
    if not hasattr(pipe, _ORIGINAL_ATTR):
        raise ValueError(f"{type(pipe).__name__} was not patched by flux_small_encoder: there is nothing to restore.")
    original = getattr(pipe, _ORIGINAL_ATTR)
    if original is _RELEASED:
        raise ValueError(
            f"The original {slot.encoder} was released when the pipeline was patched, to return its memory. Patch "
            "with `keep_original=True` to be able to unpatch, or load the pipeline again."
        )
    _swap(pipe, slot, original, device=None)
    delattr(pipe, _ORIGINAL_ATTR)
    return pipe


def load_pipeline(
    model: str | os.PathLike,
    encoder: str | os.PathLike | DistilledT5EncoderModel = "t5-base-distilled",
    *,
    pipeline_cls=None,
    encoder_revision: str | None = None,
    **from_pretrained_kwargs,
):
    r"""
    Load a pipeline without its T5 encoder, so its weights are never read, and patch in a distilled one.

    Args:
        model (`str` or `os.PathLike`):
            The pipeline's Hub repo id or local folder, as for `pipeline_cls.from_pretrained`.
        encoder (`str`, `os.PathLike` or `DistilledT5EncoderModel`, *optional*, defaults to `"t5-base-distilled"`):
            What `patch_encoder` accepts.
        pipeline_cls (`type`, *optional*, defaults to `diffusers.FluxPipeline`):
            The pipeline class to load.
        encoder_revision (`str`, *optional*):
            Hub branch, tag or commit of the encoder (`revision` applies to the pipeline).
        from_pretrained_kwargs:
            Passed to `pipeline_cls.from_pretrained` (`dtype`, `revision`, `token`, ...); `token`, `cache_dir`,
            `local_files_only` and `proxies` apply to the encoder too.

    Example:
    ```py
    >>> pipe = load_pipeline("black-forest-labs/FLUX.1-dev", encoder="t5-base-distilled", dtype=torch.bfloat16)
    ```
    """
    if pipeline_cls is None:
        from diffusers import FluxPipeline

        pipeline_cls = FluxPipeline
    slot = find_encoder_slot(pipeline_cls)
    if not isinstance(encoder, DistilledT5EncoderModel):
        resolve_encoder(encoder)  # fail on a bad name before reading the pipeline's weights
    pipe = pipeline_cls.from_pretrained(model, **{slot.encoder: None}, **from_pretrained_kwargs)
    dtype = from_pretrained_kwargs.get("dtype") or from_pretrained_kwargs.get("torch_dtype")
    return patch_encoder(pipe, encoder, dtype=dtype, revision=encoder_revision, **hub_kwargs(from_pretrained_kwargs))


def cast_encoder(encoder: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a T5-based encoder to `dtype`, keeping T5's `wo` layers in float32 under float16 as transformers does."""
    encoder.to(dtype)
    if dtype == torch.float16:
        keep = getattr(encoder, "_keep_in_fp32_modules", None) or []
        for name, module in encoder.named_modules():
            if name.split(".")[-1] in keep:
                module.float()
    return encoder


def check_compatible(pipe, student: DistilledT5EncoderModel, slot: EncoderSlot | None = None, tokenizer=None) -> None:
    """Raise a `ValueError` naming both numbers if the student cannot serve this pipeline (with `tokenizer`, if given,
    in place of the pipeline's own)."""
    slot = slot or find_encoder_slot(pipe)
    consumer = getattr(pipe, slot.width_module)
    expected = getattr(consumer.config, slot.width)
    produced = student.config.project_out_dim
    if produced != expected:
        raise ValueError(
            f"The encoder produces {produced}-wide embeddings but {type(consumer).__name__} expects "
            f"{slot.width}={expected}. Use an encoder distilled for this transformer (project_out_dim={expected})."
        )
    tokenizer = tokenizer if tokenizer is not None else getattr(pipe, slot.tokenizer, None)
    vocab = student.config.vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"The pipeline's {slot.tokenizer} has {len(tokenizer)} tokens but the encoder's embedding table holds "
            f"{vocab}: its ids would fall outside the table. Use the tokenizer the encoder was trained with."
        )


def _swap(pipe, slot: EncoderSlot, new: nn.Module | None, device) -> None:
    """Put `new` in the encoder slot, carrying over the pipeline's offload state, and free the old encoder.

    Accelerate's hooks (model or sequential CPU offload) are removed and re-applied to the whole pipeline, as
    diffusers' LoRA and textual-inversion loaders do; group offloading is applied to `new` as the pipeline has it.
    """
    from diffusers.training_utils import free_memory
    from diffusers.utils.torch_utils import get_module_execution_device

    old = getattr(pipe, slot.encoder, None)
    modules = [module for module in pipe.components.values() if isinstance(module, nn.Module)]
    group_configs = [config for config in map(group_offload_config, modules) if config is not None]
    if device is None:
        device = get_module_execution_device(old if old is not None else getattr(pipe, slot.width_module))
    model_offload, sequential_offload = remove_offload_hooks(pipe)

    pipe.register_modules(**{slot.encoder: new})
    if model_offload:
        pipe.enable_model_cpu_offload(device=offload_device(pipe))
    elif sequential_offload:
        pipe.enable_sequential_cpu_offload(device=offload_device(pipe))
    elif new is not None and group_configs:
        _apply_group_offload_like(new, group_configs[0])
    elif new is not None:
        new.to(device)
    del old
    free_memory()


def _apply_group_offload_like(module: nn.Module, config) -> None:
    """Apply diffusers' group offloading to `module` with the settings of another module's hook."""
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(
        module,
        onload_device=config.onload_device,
        offload_device=config.offload_device,
        offload_type=config.offload_type,
        num_blocks_per_group=config.num_blocks_per_group,
        non_blocking=config.non_blocking,
        use_stream=config.stream is not None,
        record_stream=config.record_stream,
        low_cpu_mem_usage=config.low_cpu_mem_usage,
        offload_to_disk_path=config.offload_to_disk_path,
    )


def _load_tokenizer(encoder, revision: str | None, from_pretrained_kwargs: dict):
    """The student's tokenizer for a pipeline loaded without one: the registry's source, else the encoder's files."""
    from transformers import AutoTokenizer

    if isinstance(encoder, DistilledT5EncoderModel):
        raise ValueError(
            "The pipeline has no T5 tokenizer and an encoder instance carries none: load the pipeline with its "
            "tokenizer, or register one with `pipe.register_modules(...)` before patching."
        )
    resolved = resolve_encoder(encoder, revision)
    source = resolved.spec.tokenizer if resolved.spec is not None else resolved.path
    try:
        return AutoTokenizer.from_pretrained(source, **hub_kwargs(from_pretrained_kwargs))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The pipeline has no T5 tokenizer and none could be loaded from {source!r} ({error}). Load the pipeline "
            "with its tokenizer (the teacher's T5 v1.1 tokenizer serves the distilled encoders)."
        ) from error
