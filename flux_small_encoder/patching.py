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
from .private_api import accelerate_offload, group_offload_config, offload_device
from .registry import ResolvedEncoder, hub_kwargs, load_encoder, resolve_encoder
from .torch_utils import as_dtype

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
        width_field: The config field of `width_component` that the encoder's embedding width must equal.
        width_component: The pipeline component that reads the embeddings and holds `width_field` in its config.
    """

    encoder: str
    tokenizer: str
    width_field: str
    width_component: str = "transformer"


# Pipeline class-name prefix -> slot. A pipeline matches on its own class name or any base class's; the prefix must end
# a word ("Flux" names FluxImg2ImgPipeline, not Flux2Pipeline, whose text encoder is no T5), and the longest one wins.
PIPELINE_FAMILIES: dict[str, EncoderSlot] = {
    "Flux": EncoderSlot("text_encoder_2", "tokenizer_2", "joint_attention_dim"),
    "FluxPriorRedux": EncoderSlot("text_encoder_2", "tokenizer_2", "txt_in_features", "image_embedder"),
    "StableDiffusion3": EncoderSlot("text_encoder_3", "tokenizer_3", "joint_attention_dim"),
    "Chroma": EncoderSlot("text_encoder", "tokenizer", "joint_attention_dim"),
    "PixArtSigma": EncoderSlot("text_encoder", "tokenizer", "caption_channels"),
    "PixArtAlpha": EncoderSlot("text_encoder", "tokenizer", "caption_channels"),
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
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    keep_original: bool = False,
    revision: str | None = None,
    **from_pretrained_kwargs,
):
    r"""
    Replace the pipeline's T5 encoder with a distilled one, in place, and return the pipeline.

    The student follows the pipeline: the dtype of the model that reads its embeddings (the transformer) and the
    replaced encoder's device, or the pipeline's model CPU offload, sequential CPU offload or group offload if one is
    enabled. It is registered with `register_modules`, so the patched pipeline saves and loads with `save_pretrained` /
    `from_pretrained` (import `flux_small_encoder` before loading).

    All or nothing: the student is loaded, checked, cast and moved to its device (or given its group offload) before
    the pipeline is touched, so any failure on the way (a refused student, a device out of memory) leaves the pipeline
    as it was, and still patchable. A student instance is adopted, not copied: it is checked first, so a refused one
    is handed back unchanged; once accepted it is cast and moved in place (if the move fails it is moved back).

    Args:
        pipe (`DiffusionPipeline`):
            A pipeline of a supported family (`PIPELINE_FAMILIES`), such as `FluxPipeline`.
        encoder (`str`, `os.PathLike` or `DistilledT5EncoderModel`):
            A registry name (`list_pretrained()`), a folder written by `save_pretrained`, a Hub repo id, or a model.
        dtype (`torch.dtype` or `str`, *optional*):
            The student's dtype, or its name (`"bfloat16"`); defaults to the transformer's (FluxPriorRedux: the image
            embedder's).
        device (`torch.device` or `str`, *optional*):
            The student's device when no offload is enabled; defaults to the replaced encoder's, else the
            transformer's.
        keep_original (`bool`, *optional*, defaults to `False`):
            Keep a reference to the replaced encoder so that `unpatch_encoder` can put it back. By default it is
            dropped and its memory returned.
        revision (`str`, *optional*):
            Hub branch, tag or commit of the encoder (a local folder has none).
        from_pretrained_kwargs:
            Passed to `DistilledT5EncoderModel.from_pretrained` (`token`, `cache_dir`, `local_files_only`, ...).

    Raises:
        TypeError: `encoder` is none of the kinds above (`registry.resolve_encoder` says which it takes).
        ValueError: the encoder cannot be resolved (see `registry.resolve_encoder`), its width differs from what the
            transformer expects, or the pipeline's tokenizer makes ids beyond its vocabulary. The pipeline is left
            unchanged.

    Example:
    ```py
    >>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16)
    >>> patch_encoder(pipe, "t5-base-distilled").to("cuda")
    ```
    """
    dtype = as_dtype(dtype)
    if not isinstance(encoder, DistilledT5EncoderModel):
        encoder = resolve_encoder(encoder, revision)
    return _patch(pipe, encoder, dtype, device, keep_original, from_pretrained_kwargs)


def unpatch_encoder(pipe):
    """Put back the encoder that `patch_encoder` replaced, and return the pipeline.

    Needs `patch_encoder(..., keep_original=True)` unless the pipeline had no encoder (as with `load_pipeline`).
    """
    from diffusers.training_utils import free_memory

    slot = find_encoder_slot(pipe)
    if not hasattr(pipe, _ORIGINAL_ATTR):
        raise ValueError(f"{type(pipe).__name__} was not patched by flux_small_encoder: there is nothing to restore.")
    original = getattr(pipe, _ORIGINAL_ATTR)
    if original is _RELEASED:
        raise ValueError(
            f"The original {slot.encoder} was released when the pipeline was patched, to return its memory. Patch "
            "with `keep_original=True` to be able to unpatch, or load the pipeline again."
        )
    if original is not None:
        _place(pipe, slot, original, dtype=None, device=None)
    _swap(pipe, slot, original)
    delattr(pipe, _ORIGINAL_ATTR)
    free_memory()
    return pipe


def load_pipeline(
    model: str | os.PathLike,
    encoder: str | os.PathLike | DistilledT5EncoderModel = "t5-base-distilled",
    *,
    pipeline_cls=None,
    encoder_revision: str | None = None,
    memory_budget: str | int | float | None = None,
    size: int = 1024,
    **from_pretrained_kwargs,
):
    r"""
    Load a pipeline without its T5 encoder, so its weights are never read, and patch in a distilled one.

    With `memory_budget`, the pipeline also gets the fastest memory recipe predicted to fit it (see
    `flux_small_encoder.memory.plan_memory` and docs/low-vram.md) and is placed on the accelerator (CUDA if available,
    else the CPU); without, it stays where `from_pretrained` put it.

    Args:
        model (`str` or `os.PathLike`):
            The pipeline's Hub repo id or local folder, as for `pipeline_cls.from_pretrained`.
        encoder (`str`, `os.PathLike` or `DistilledT5EncoderModel`, *optional*, defaults to `"t5-base-distilled"`):
            What `patch_encoder` accepts.
        pipeline_cls (`type`, *optional*, defaults to `diffusers.FluxPipeline`):
            The pipeline class to load.
        encoder_revision (`str`, *optional*):
            Hub branch, tag or commit of the encoder (`revision` applies to the pipeline).
        memory_budget (`str`, `int` or `float`, *optional*):
            What the pipeline may allocate on the GPU: GiB as a number, or a string with its unit (`"24GiB"`). A
            budget no recipe fits raises `MemoryBudgetError` (a `ValueError`) naming the smallest that works.
        size (`int`, *optional*, defaults to 1024):
            With `memory_budget`: the image side, in pixels (the larger of height and width), the plan is made for;
            it serves every smaller image, while a larger one may exceed the budget.
        from_pretrained_kwargs:
            Passed to `pipeline_cls.from_pretrained` (`dtype`, `revision`, `token`, ...); `token`, `cache_dir`
            and `local_files_only` apply to the encoder too. `dtype` may be a name (`"bfloat16"`), or a dict by
            component as diffusers takes it.

    Example:
    ```py
    >>> pipe = load_pipeline("black-forest-labs/FLUX.1-dev", encoder="t5-base-distilled", dtype=torch.bfloat16)
    >>> # On a 16 GB card: the transformer stored in float8, everything on the GPU (`flux-small-encoder plan`)
    >>> pipe = load_pipeline("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16, memory_budget="16GiB")
    ```
    """
    # Bad arguments fail before the pipeline's weights are read.
    if memory_budget is not None:
        from .memory import parse_budget

        parse_budget(memory_budget)
    if pipeline_cls is None:
        from diffusers import FluxPipeline

        pipeline_cls = FluxPipeline
    slot = find_encoder_slot(pipeline_cls)
    if not isinstance(encoder, DistilledT5EncoderModel):
        encoder = resolve_encoder(encoder, encoder_revision)
    dtypes = {key: from_pretrained_kwargs[key] for key in ("dtype", "torch_dtype") if key in from_pretrained_kwargs}
    for key, value in dtypes.items():  # diffusers would load a dtype given by name in float32, with a warning
        dtypes[key] = from_pretrained_kwargs[key] = (
            {name: as_dtype(item, f"{key}[{name!r}]") for name, item in value.items()}
            if isinstance(value, dict) else as_dtype(value, key)
        )
    dtype = next((value for value in dtypes.values() if value is not None), None)
    if isinstance(dtype, dict):
        dtype = dtype.get(slot.encoder, dtype.get("default"))
    pipe = pipeline_cls.from_pretrained(model, **{slot.encoder: None}, **from_pretrained_kwargs)
    pipe = _patch(pipe, encoder, dtype, None, False, hub_kwargs(from_pretrained_kwargs))
    if memory_budget is not None:
        from .memory import plan_memory

        plan_memory(pipe, memory_budget, size=size).apply(pipe)
    return pipe


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
    consumer = getattr(pipe, slot.width_component)
    expected = getattr(consumer.config, slot.width_field)
    produced = student.config.project_out_dim
    if produced != expected:
        raise ValueError(
            f"The encoder produces {produced}-wide embeddings but {type(consumer).__name__} expects "
            f"{slot.width_field}={expected}. Use an encoder distilled for this transformer "
            f"(project_out_dim={expected})."
        )
    tokenizer = tokenizer if tokenizer is not None else getattr(pipe, slot.tokenizer, None)
    vocab = student.config.vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"The pipeline's {slot.tokenizer} has {len(tokenizer)} tokens but the encoder's embedding table holds "
            f"{vocab}: its ids would fall outside the table. Use the tokenizer the encoder was trained with."
        )


def _patch(pipe, source: ResolvedEncoder | DistilledT5EncoderModel, dtype, device, keep_original: bool, kwargs: dict):
    """`patch_encoder` once its `encoder` argument is resolved: everything that can fail happens before the swap."""
    from diffusers.training_utils import free_memory

    slot = find_encoder_slot(pipe)
    dtype = dtype or getattr(pipe, slot.width_component).dtype
    if isinstance(source, DistilledT5EncoderModel):
        student = source
    else:
        student = load_encoder(source, dtype=dtype, **kwargs)
    # Checked before any cast, so that a refused instance comes back as it was.
    check_compatible(pipe, student, slot)
    tokenizer = None
    if getattr(pipe, slot.tokenizer, None) is None:
        tokenizer = _load_tokenizer(source, kwargs)
        check_compatible(pipe, student, slot, tokenizer)
    _place(pipe, slot, student.eval(), dtype, device)

    original = getattr(pipe, slot.encoder, None)
    _swap(pipe, slot, student, tokenizer)
    if not hasattr(pipe, _ORIGINAL_ATTR):
        setattr(pipe, _ORIGINAL_ATTR, original if keep_original or original is None else _RELEASED)
    del original  # no reference may outlive the swap, or its memory is not returned
    free_memory()
    return pipe


def _place(pipe, slot: EncoderSlot, encoder: nn.Module, dtype: torch.dtype | None, device) -> None:
    """Cast `encoder` and put it where the pipeline will run it, without touching the pipeline.

    Under group offload it gets the pipeline's group-offload settings; under model or sequential CPU offload it stays
    where it is, for `_swap` to hook it with the rest of the pipeline; otherwise it moves to `device`, by default the
    execution device of the encoder it replaces (else of the width component).
    """
    from diffusers.utils.torch_utils import get_module_execution_device

    if dtype is not None:
        cast_encoder(encoder, dtype)
    modules = [module for module in pipe.components.values() if isinstance(module, nn.Module)]
    group_config = next((config for config in map(group_offload_config, modules) if config is not None), None)
    if group_config is not None:
        if group_offload_config(encoder) is None:
            _apply_group_offload_like(encoder, group_config)
        return
    if accelerate_offload(pipe) is not None:
        return
    if device is None:
        current = getattr(pipe, slot.encoder, None)
        device = get_module_execution_device(current if current is not None else getattr(pipe, slot.width_component))
    previous = next(encoder.parameters()).device
    try:
        encoder.to(device)
    except BaseException:
        encoder.to(previous)  # give back what a half-done move took, such as device memory after an out-of-memory
        raise


def _swap(pipe, slot: EncoderSlot, new: nn.Module | None, tokenizer=None) -> None:
    """Register `new` (and `tokenizer`, if given) in the slot.

    Under model or sequential CPU offload, accelerate's hooks are removed first and the same offload is enabled again
    on the whole pipeline, so the new encoder gets its hooks: what diffusers' LoRA and textual-inversion loaders do.
    """
    offload = accelerate_offload(pipe)
    if offload is not None:
        pipe.remove_all_hooks()
    pipe.register_modules(**{slot.encoder: new}, **({slot.tokenizer: tokenizer} if tokenizer is not None else {}))
    if offload == "model":
        pipe.enable_model_cpu_offload(device=offload_device(pipe))
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=offload_device(pipe))


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


def _load_tokenizer(source: ResolvedEncoder | DistilledT5EncoderModel, from_pretrained_kwargs: dict):
    """The student's tokenizer for a pipeline loaded without one: the registry's source, else the encoder's files."""
    from transformers import AutoTokenizer

    if isinstance(source, DistilledT5EncoderModel):
        raise ValueError(
            "The pipeline has no T5 tokenizer and an encoder instance carries none: load the pipeline with its "
            "tokenizer, or register one with `pipe.register_modules(...)` before patching."
        )
    # A registry entry names the tokenizer's own repo, to which the encoder's revision does not apply.
    if source.spec is not None:
        location, revision = source.spec.tokenizer, None
    else:
        location, revision = source.path, source.revision
    try:
        return AutoTokenizer.from_pretrained(location, revision=revision, **hub_kwargs(from_pretrained_kwargs))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The pipeline has no T5 tokenizer and none could be loaded from {location!r} ({error}). Load the "
            "pipeline with its tokenizer (the teacher's T5 v1.1 tokenizer serves the distilled encoders)."
        ) from error

