"""LoRA adapters on the distilled encoder itself, through transformers' `PeftAdapterMixin` and peft.

diffusers' `load_lora_weights` adapts only the transformer and CLIP, and drops keys meant for the T5 slot. These
functions do for the student what `load_lora_weights` / `set_adapters` / `fuse_lora` / `unfuse_lora` /
`unload_lora_weights` do for the transformer, on the standard peft adapter folder (`adapter_config.json` +
`adapter_model.safetensors`, as written by `PeftModel.save_pretrained` or by `save_encoder_lora`), whose
`target_modules` name the student's T5 layers (`q`, `k`, `v`, `o`, `wi_0`, `wi_1`, `wo`).

`DistilledT5EncoderModel` inherits transformers' `PeftAdapterMixin`: adapters are loaded with its `load_adapter`. Its
other adapter methods (`set_adapter`, `delete_adapter`, `active_adapters`, ...) refuse to run with a peft older than
the one transformers asks for (`MIN_PEFT_VERSION`, 0.22 for transformers 5.24), so activating and deleting go through
peft's own public functions (`peft.functional`) and LoRA layers, which those methods call themselves.

Each function takes a patched pipeline (the student is found in its family's slot) or the student itself, and returns
what it was given, so calls chain.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

from .atomic import atomic_folder
from .modeling import DistilledT5EncoderModel
from .patching import find_encoder_slot
from .private_api import forget_peft_adapters, load_peft_adapter

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# LoRA's key prefix in peft (`lora_A`, `lora_B`, ...), as `delete_adapter` wants it.
_LORA_PREFIX = "lora_"


def load_encoder_lora(
    pipe_or_encoder,
    adapter: str | os.PathLike,
    *,
    adapter_name: str = "default",
    weight: float = 1.0,
    revision: str | None = None,
    **hub_kwargs,
):
    r"""
    Load a peft LoRA adapter onto the distilled encoder of a patched pipeline, and activate it with `weight` beside the
    adapters already active.

    Args:
        pipe_or_encoder (`DiffusionPipeline` or `DistilledT5EncoderModel`):
            A pipeline patched with `patch_encoder`, or the encoder itself.
        adapter (`str` or `os.PathLike`):
            A folder holding `adapter_config.json` and `adapter_model.safetensors`, or a Hub repo id with those files.
        adapter_name (`str`, *optional*, defaults to `"default"`):
            The name to refer to this adapter by in `set_encoder_lora`, `unload_encoder_lora` and `save_encoder_lora`.
        weight (`float`, *optional*, defaults to 1.0):
            The adapter's scale (0 disables it).
        revision (`str`, *optional*):
            Hub branch, tag or commit of the adapter.
        hub_kwargs:
            `token`, `cache_dir`, `local_files_only`, ... for a Hub adapter.

    Raises:
        ValueError: the adapter is not a LoRA, has no safetensors weights, names no layer of the encoder, or its
            weights do not fit the encoder. The encoder is left without the adapter.

    Example:
    ```py
    >>> pipe = load_pipeline("black-forest-labs/FLUX.1-dev", encoder="t5-base-distilled", dtype=torch.bfloat16)
    >>> load_encoder_lora(pipe, "my-student-lora", weight=0.8)
    ```
    """
    from peft import PeftConfig, PeftType
    from safetensors.torch import load_file

    encoder = _encoder_of(pipe_or_encoder)
    if adapter_name in _adapter_names(encoder):
        raise ValueError(
            f"The encoder already has an adapter named {adapter_name!r}: pass another `adapter_name`, or remove it "
            "with `unload_encoder_lora` first."
        )
    config_file, weights_file = _adapter_files(adapter, revision, hub_kwargs)
    config = PeftConfig.from_pretrained(str(Path(config_file).parent))
    if config.peft_type != PeftType.LORA:
        raise ValueError(f"{adapter} is a {config.peft_type.value} adapter; load_encoder_lora loads LoRA adapters.")

    active = _active_weights(encoder)  # before loading: `load_adapter` makes only the new adapter active
    try:
        with _quiet_load_report():
            # Mismatched shapes are reported below, in one message, instead of transformers' re-raise.
            report = load_peft_adapter(
                encoder, adapter_name=adapter_name, peft_config=config, adapter_state_dict=load_file(weights_file),
                ignore_mismatched_sizes=True,
            )
        _check_load_report(report, adapter, adapter_name, type(encoder).__name__)
    except BaseException:
        _remove_adapters(encoder, [adapter_name])
        if active:
            set_encoder_lora(encoder, list(active), list(active.values()))
        raise
    active[adapter_name] = weight
    return set_encoder_lora(pipe_or_encoder, list(active), list(active.values()))


def set_encoder_lora(pipe_or_encoder, adapter_names: str | list[str], weights: float | list[float] | None = None):
    r"""
    Choose which of the encoder's adapters are active, and their weights (as diffusers' `set_adapters`).

    Args:
        pipe_or_encoder (`DiffusionPipeline` or `DistilledT5EncoderModel`):
            A patched pipeline or the encoder itself.
        adapter_names (`str` or `list[str]`):
            The adapters to activate; the others are deactivated.
        weights (`float` or `list[float]`, *optional*):
            One weight for all, or one per adapter; defaults to 1.0 each.
    """
    from peft.functional import set_adapter

    encoder = _encoder_of(pipe_or_encoder)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = sorted(set(names) - set(_adapter_names(encoder)))
    if unknown:
        raise ValueError(f"The encoder has no adapter named {unknown}; it has {_adapter_names(encoder)}.")
    if weights is None:
        weights = [1.0] * len(names)
    elif not isinstance(weights, (list, tuple)):
        weights = [weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"Got {len(weights)} weights for {len(names)} adapters: give one per adapter, or one.")
    set_adapter(encoder, names, inference_mode=True)
    for layer in _lora_layers(encoder):
        for name, weight in zip(names, weights, strict=True):
            layer.set_scale(name, weight)
    return pipe_or_encoder


def fuse_encoder_lora(pipe_or_encoder, adapter_names: list[str] | None = None, *, safe_fuse: bool = False):
    r"""
    Merge adapters into the encoder's weights at their current weights, so inference runs at the base cost.

    Args:
        pipe_or_encoder (`DiffusionPipeline` or `DistilledT5EncoderModel`):
            A patched pipeline or the encoder itself.
        adapter_names (`list[str]`, *optional*):
            The adapters to merge; defaults to the active ones.
        safe_fuse (`bool`, *optional*, defaults to `False`):
            Check the merged weights for NaNs before writing them.
    """
    for layer in _lora_layers(_encoder_of(pipe_or_encoder)):
        layer.merge(safe_merge=safe_fuse, adapter_names=adapter_names)
    return pipe_or_encoder


def unfuse_encoder_lora(pipe_or_encoder):
    """Undo `fuse_encoder_lora`: the encoder's weights are its own again and its adapters stay loaded."""
    for layer in _lora_layers(_encoder_of(pipe_or_encoder)):
        layer.unmerge()
    return pipe_or_encoder


def unload_encoder_lora(pipe_or_encoder, adapter_names: str | list[str] | None = None):
    r"""
    Remove adapters from the encoder (all by default).

    As with diffusers' `fuse_lora` then `unload_lora_weights`, adapters fused by `fuse_encoder_lora` stay baked into
    the weights when all adapters are removed: that is how to save an encoder (or a pipeline) with a LoRA merged in.
    Call `unfuse_encoder_lora` first to get the base encoder back.

    Args:
        pipe_or_encoder (`DiffusionPipeline` or `DistilledT5EncoderModel`):
            A patched pipeline or the encoder itself.
        adapter_names (`str` or `list[str]`, *optional*):
            The adapters to remove.
    """
    encoder = _encoder_of(pipe_or_encoder)
    loaded = _adapter_names(encoder)
    names = loaded if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) else adapter_names
    unknown = sorted(set(names) - set(loaded))
    if unknown:
        raise ValueError(f"The encoder has no adapter named {unknown}; it has {loaded}.")
    if set(names) != set(loaded) and any(layer.merged for layer in _lora_layers(encoder)):
        raise ValueError(
            "The encoder's adapters are fused: call `unfuse_encoder_lora` before removing some of them, or remove all "
            "of them to keep the fused weights."
        )
    remaining = {name: weight for name, weight in _active_weights(encoder).items() if name not in names}
    _remove_adapters(encoder, names)
    if remaining:
        set_encoder_lora(encoder, list(remaining), list(remaining.values()))
    return pipe_or_encoder


def save_encoder_lora(pipe_or_encoder, folder: str | os.PathLike, adapter_name: str = "default") -> Path:
    r"""
    Save one of the encoder's adapters as a standard peft folder (`adapter_config.json` + `adapter_model.safetensors`),
    which `load_encoder_lora` and `PeftModel.from_pretrained` read.

    Args:
        pipe_or_encoder (`DiffusionPipeline` or `DistilledT5EncoderModel`):
            A patched pipeline or the encoder itself.
        folder (`str` or `os.PathLike`):
            Where to write: a new or empty folder.
        adapter_name (`str`, *optional*, defaults to `"default"`):
            The adapter to save.

    Returns:
        `Path`: the folder.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    encoder = _encoder_of(pipe_or_encoder)
    if adapter_name not in _adapter_names(encoder):
        raise ValueError(f"The encoder has no adapter named {adapter_name!r}; it has {_adapter_names(encoder)}.")
    if any(layer.merged for layer in _lora_layers(encoder)):
        raise ValueError("The encoder's adapters are fused: call `unfuse_encoder_lora` before saving one of them.")
    # The key layout of `PeftModel.save_pretrained`, so that peft itself loads the folder too.
    state = {
        f"base_model.model.{key}": value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(encoder, adapter_name=adapter_name).items()
    }
    config = encoder.peft_config[adapter_name].to_dict()
    config["base_model_name_or_path"] = config.get("base_model_name_or_path") or encoder.config.name_or_path or None
    with atomic_folder(folder) as staging:
        save_file(state, staging / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=list))
    return Path(folder)


def _encoder_of(pipe_or_encoder) -> DistilledT5EncoderModel:
    if isinstance(pipe_or_encoder, DistilledT5EncoderModel):
        return pipe_or_encoder
    slot = find_encoder_slot(pipe_or_encoder)
    encoder = getattr(pipe_or_encoder, slot.encoder, None)
    if not isinstance(encoder, DistilledT5EncoderModel):
        raise TypeError(
            f"{type(pipe_or_encoder).__name__}.{slot.encoder} is a {type(encoder).__name__}, not a distilled encoder: "
            "patch the pipeline with `patch_encoder` first. (LoRAs for the transformer and CLIP load with "
            "`pipe.load_lora_weights`.)"
        )
    return encoder


def _lora_layers(encoder):
    from peft.tuners.lora import LoraLayer

    return [module for module in encoder.modules() if isinstance(module, LoraLayer)]


def _adapter_names(encoder) -> list[str]:
    return list(getattr(encoder, "peft_config", {}))


def _active_weights(encoder) -> dict[str, float]:
    """The active adapters and their weights, read from the LoRA layers, where peft keeps them (the weight as part of
    each layer's `scaling`): they stay right when peft's own `set_adapter` or `set_scale` changes them."""
    weights = {}
    for layer in _lora_layers(encoder):
        for name in layer.active_adapters:
            if name in layer.scaling and name not in weights:
                rank = math.sqrt(layer.r[name]) if layer.use_rslora.get(name, False) else layer.r[name]
                weights[name] = layer.scaling[name] / (layer.lora_alpha[name] / rank)  # as `LoraLayer.set_scale` sets
    return weights


def _remove_adapters(encoder, names: list[str]) -> None:
    """Remove adapters (their layers and configs); once none is left, put the plain layers back, as before any adapter
    (with fused weights kept fused), and make the encoder a plain model again for `save_pretrained`."""
    from peft.functional import delete_adapter
    from peft.tuners.lora import LoraLayer

    configs = getattr(encoder, "peft_config", {})
    if set(configs) <= set(names):
        for name, module in list(encoder.named_modules()):
            if isinstance(module, LoraLayer):
                encoder.set_submodule(name, module.get_base_layer())
        forget_peft_adapters(encoder)
        return
    for name in names:
        delete_adapter(encoder, adapter_name=name, prefix=_LORA_PREFIX)
        configs.pop(name, None)


@contextmanager
def _quiet_load_report():
    """Silence the load report of `load_adapter`, which `_check_load_report` replaces: transformers 5.24 counts any key
    holding "lora" (or the adapter's name) as the new adapter's, so it lists the other adapters' weights as missing."""
    logger = logging.getLogger("transformers.integrations.peft")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_load_report(report, adapter, adapter_name: str, model_name: str) -> None:
    """Raise one `ValueError` naming what of the adapter did not fit the encoder, if anything."""
    mismatched = sorted(report.mismatched_keys)
    if mismatched:
        key, found, expected = mismatched[0]
        raise ValueError(
            f"The adapter {adapter} was trained on an encoder of other widths than this one: {key} is "
            f"{tuple(found)} in the adapter but {tuple(expected)} here. Use an adapter trained on this encoder."
        )
    missing = sorted(key for key in report.missing_keys if _LORA_PREFIX in key and f".{adapter_name}." in key)
    unexpected = sorted(report.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"The adapter {adapter} does not fit this {model_name}: "
            + (f"no weights for {missing[:3]}; " if missing else "")
            + (f"weights for layers it lacks: {unexpected[:3]}; " if unexpected else "")
            + "use an adapter trained on this encoder."
        )


def _adapter_files(adapter: str | os.PathLike, revision: str | None, hub_kwargs: dict) -> tuple[str, str]:
    """The adapter's config and safetensors weights, from a folder or the Hub; `.bin` weights are never unpickled."""
    if os.path.isdir(adapter):
        files = [Path(adapter) / name for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ValueError(
                f"{adapter} is not a peft adapter folder with safetensors weights: it lacks {', '.join(missing)}. "
                "Save adapters with `save_encoder_lora` or `PeftModel.save_pretrained` (safetensors is the default)."
            )
        return str(files[0]), str(files[1])
    from huggingface_hub import hf_hub_download

    return tuple(
        hf_hub_download(str(adapter), name, revision=revision, **hub_kwargs)
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
    )
