"""LoRA adapters on the distilled encoder itself, through peft.

diffusers' `load_lora_weights` adapts only the transformer and CLIP, and drops keys meant for the T5 slot. These
functions do for the student what `load_lora_weights` / `set_adapters` / `fuse_lora` / `unfuse_lora` /
`unload_lora_weights` do for the transformer, on the standard peft adapter folder (`adapter_config.json` +
`adapter_model.safetensors`, as written by `PeftModel.save_pretrained` or by `save_encoder_lora`), whose
`target_modules` name the student's T5 layers (`q`, `k`, `v`, `o`, `wi_0`, `wi_1`, `wo`).

Each function takes a patched pipeline (the student is found in its family's slot) or the student itself, and returns
what it was given, so calls chain.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .modeling import DistilledT5EncoderModel
from .patching import find_encoder_slot

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# The encoder's attribute recording the active adapters and their weights, which peft layers keep only as scalings.
_WEIGHTS_ATTR = "_flux_small_encoder_lora_weights"


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
    from peft import PeftConfig, PeftType, inject_adapter_in_model, set_peft_model_state_dict
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
    config.inference_mode = True
    # `PeftModel.save_pretrained` prefixes keys with the wrapper's path; the adapter goes onto the bare encoder here.
    state = {key.removeprefix("base_model.model."): value for key, value in load_file(weights_file).items()}

    configs = dict(getattr(encoder, "peft_config", {}))
    try:
        inject_adapter_in_model(config, encoder, adapter_name=adapter_name)
        encoder.peft_config = {**configs, adapter_name: config}  # peft keeps only the newest adapter's config here
        result = set_peft_model_state_dict(encoder, state, adapter_name=adapter_name)
        missing = [key for key in result.missing_keys if ".lora_" in key and f".{adapter_name}." in key]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"The adapter {adapter} does not fit this {type(encoder).__name__}: "
                + (f"no weights for {missing[:3]}; " if missing else "")
                + (f"weights for layers it lacks: {result.unexpected_keys[:3]}; " if result.unexpected_keys else "")
                + "use an adapter trained on this encoder."
            )
    except Exception as error:
        _discard(encoder, adapter_name, configs)
        if isinstance(error, RuntimeError) and "size mismatch" in str(error):
            raise ValueError(
                f"The adapter {adapter} was trained on an encoder of other widths than this one: {error}"
            ) from error
        raise
    active = {**_active_weights(encoder), adapter_name: weight}
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
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

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
    set_weights_and_activate_adapters(encoder, names, list(weights))
    setattr(encoder, _WEIGHTS_ATTR, dict(zip(names, weights, strict=True)))
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
    for name in names:
        _discard(encoder, name, {key: value for key, value in encoder.peft_config.items() if key != name})
    if remaining:
        set_encoder_lora(encoder, list(remaining), list(remaining.values()))
    else:
        setattr(encoder, _WEIGHTS_ATTR, {})
    return pipe_or_encoder


def save_encoder_lora(pipe_or_encoder, folder: str | os.PathLike, adapter_name: str = "default") -> Path:
    r"""
    Save one of the encoder's adapters as a standard peft folder (`adapter_config.json` + `adapter_model.safetensors`),
    which `load_encoder_lora` and `PeftModel.from_pretrained` read.

    Args:
        pipe_or_encoder (`DiffusionPipeline` or `DistilledT5EncoderModel`):
            A patched pipeline or the encoder itself.
        folder (`str` or `os.PathLike`):
            Where to write; refused if it already holds adapter files.
        adapter_name (`str`, *optional*, defaults to `"default"`):
            The adapter to save.

    Returns:
        `Path`: the folder.
    """
    from peft import get_peft_model_state_dict

    encoder = _encoder_of(pipe_or_encoder)
    if adapter_name not in _adapter_names(encoder):
        raise ValueError(f"The encoder has no adapter named {adapter_name!r}; it has {_adapter_names(encoder)}.")
    if any(layer.merged for layer in _lora_layers(encoder)):
        raise ValueError("The encoder's adapters are fused: call `unfuse_encoder_lora` before saving one of them.")
    folder = Path(folder)
    existing = [name for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if (folder / name).exists()]
    if existing:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}: choose an empty folder.")
    # The key layout of `PeftModel.save_pretrained`, so that peft itself loads the folder too.
    state = {
        f"base_model.model.{key}": value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(encoder, adapter_name=adapter_name).items()
    }
    config = encoder.peft_config[adapter_name].to_dict()
    config["base_model_name_or_path"] = config.get("base_model_name_or_path") or encoder.config._name_or_path or None
    folder.mkdir(parents=True, exist_ok=True)
    # Write both files under temporary names first, so an interrupted save leaves no half-written adapter behind.
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        save_file(state, Path(staging) / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        (Path(staging) / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=list))
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            os.replace(Path(staging) / name, folder / name)
    return folder


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
    """The adapters made active by `set_encoder_lora`, with their weights."""
    return dict(getattr(encoder, _WEIGHTS_ATTR, {}))


def _discard(encoder, adapter_name: str, remaining_configs: dict) -> None:
    """Remove one adapter's layers and config; with none left, put the plain layers back, as before any adapter."""
    from diffusers.utils.peft_utils import delete_adapter_layers, recurse_remove_peft_layers

    if remaining_configs:
        delete_adapter_layers(encoder, adapter_name)
        encoder.peft_config = remaining_configs
    else:
        recurse_remove_peft_layers(encoder)
        if hasattr(encoder, "peft_config"):
            del encoder.peft_config


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
