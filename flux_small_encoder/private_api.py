"""The private names of diffusers, accelerate and transformers that flux-small-encoder relies on, all in this module.

A private name may move or change shape in any release of its library. The package reaches each one only through a
function here. `PRIVATE_NAMES` lists those that can be looked up in their module, with the parameters they are called
with; the three attributes that are only set at run time (`OFFLOAD_DEVICE_ATTRIBUTE`, `ACCELERATE_HOOK_ATTRIBUTE`,
`WEIGHT_CONVERSIONS_ATTRIBUTE`) are checked by running what sets them. `tests/test_private_api.py` checks all of them
against the installed versions and fails naming them, so an upgrade that moves a name breaks one test here rather than
a user's run.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version


@dataclass(frozen=True)
class PrivateName:
    """A private callable or class attribute of another library, and how this package uses it.

    Args:
        module: The module it lives in.
        qualname: Its name in the module (`Class.method` for a method).
        parameters: The parameter names a callable must take, in order (what this package passes); `None` for an
            attribute, which only has to exist.
        used_for: Why the package needs it.
    """

    module: str
    qualname: str
    parameters: tuple[str, ...] | None
    used_for: str

    @property
    def library(self) -> str:
        return self.module.split(".")[0]

    def resolve(self):
        """The object itself; `AttributeError` / `ImportError` if it moved, or if a class only inherits it now (the
        package relies on that class's own)."""
        owner = importlib.import_module(self.module)
        *path, name = self.qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        if name not in vars(owner):
            raise AttributeError(f"{owner.__name__} has no attribute {name!r} of its own")
        return getattr(owner, name)

    def problem(self) -> str | None:
        """Why the installed library no longer offers this name as used here, or `None` if it does."""
        where = f"{self.module}.{self.qualname}"
        try:
            value = self.resolve()
        except (ImportError, AttributeError) as error:
            return f"{where} is gone ({error}) in {installed_versions()}; it is used to {self.used_for}."
        if self.parameters is None:
            return None
        found = tuple(inspect.signature(value).parameters)
        if found != self.parameters:
            return (
                f"{where} now takes {found} instead of {self.parameters} in {installed_versions()}; it is used to "
                f"{self.used_for}."
            )
        return None


_FLUX = "diffusers.pipelines.flux.pipeline_flux"

PRIVATE_NAMES = (
    PrivateName(
        "diffusers.hooks.group_offloading", "_get_top_level_group_offload_hook", ("module",),
        "read a component's group-offload settings so that the new encoder gets the same ones",
    ),
    PrivateName(
        "diffusers.hooks._common", "_GO_LC_SUPPORTED_PYTORCH_LAYERS", None,
        "size the layers that leaf-level group offloading and layerwise casting move or cast one at a time, for the "
        "memory plans",
    ),
    PrivateName(
        "accelerate.state", "AcceleratorState._reset_state", ("reset_partial_state",),
        "let a second training run in one process choose its own precision and accumulation",
    ),
    PrivateName(
        "accelerate.state", "GradientState._reset_state", (),
        "let a second training run in one process choose its own gradient accumulation",
    ),
    PrivateName(
        _FLUX, "FluxPipeline._pack_latents", ("latents", "batch_size", "num_channels_latents", "height", "width"),
        "pack training noise into the transformer's token layout exactly as FluxPipeline does",
    ),
    PrivateName(
        _FLUX, "FluxPipeline._unpack_latents", ("latents", "height", "width", "vae_scale_factor"),
        "turn sampled tokens back into the VAE's latent grid exactly as FluxPipeline does (evaluation images)",
    ),
    PrivateName(
        _FLUX, "FluxPipeline._prepare_latent_image_ids", ("batch_size", "height", "width", "device", "dtype"),
        "make the image tokens' positional ids exactly as FluxPipeline does",
    ),
    PrivateName(
        "transformers.integrations.peft", "PeftAdapterMixin._hf_peft_config_loaded", None,
        "mark an encoder whose last LoRA adapter was removed as a plain model again, so `save_pretrained` writes all "
        "its weights and `load_adapter` starts afresh",
    ),
    PrivateName(
        "transformers.models.t5.modeling_t5", "T5PreTrainedModel._init_weights", ("self", "module"),
        "initialise the student's T5 layers exactly as transformers initialises T5",
    ),
)

# The attribute `DiffusionPipeline.enable_model_cpu_offload` / `enable_sequential_cpu_offload` set to their device.
OFFLOAD_DEVICE_ATTRIBUTE = "_offload_device"
# The attribute `accelerate.hooks.add_hook_to_module` sets to a module's hook (model and sequential CPU offload).
ACCELERATE_HOOK_ATTRIBUTE = "_hf_hook"
# The attribute where transformers keeps the weight renamings a model was loaded with, to undo them in
# `save_pretrained`; `PeftAdapterMixin.load_adapter` overwrites it with the adapter's.
WEIGHT_CONVERSIONS_ATTRIBUTE = "_weight_conversions"


_ABSENT = object()


def installed_versions() -> str:
    """`diffusers X, accelerate Y, transformers Z`, as installed."""
    found = []
    for name in ("diffusers", "accelerate", "transformers"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _get(qualname: str):
    return next(name for name in PRIVATE_NAMES if name.qualname == qualname).resolve()


# --- offloading (patching) ------------------------------------------------------------------------------------------


def accelerate_offload(pipe) -> str | None:
    """`"model"` or `"sequential"` if that CPU offload is enabled on `pipe`, else `None`; changes nothing.

    A pipeline dispatched with a `device_map` carries accelerate hooks too, but is not offloaded.
    """
    from accelerate.hooks import AlignDevicesHook, CpuOffload, SequentialHook

    if pipe.hf_device_map is not None:
        return None
    for component in pipe.components.values():
        hook = getattr(component, ACCELERATE_HOOK_ATTRIBUTE, None)
        hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
        if any(isinstance(hook, CpuOffload) for hook in hooks):
            return "model"
        if any(isinstance(hook, AlignDevicesHook) for hook in hooks):
            return "sequential"
    return None


def offload_device(pipe):
    """The device that `enable_model_cpu_offload` / `enable_sequential_cpu_offload` were given, or `None`."""
    return getattr(pipe, OFFLOAD_DEVICE_ATTRIBUTE, None)


def group_offload_config(module):
    """The group-offload settings (diffusers' `GroupOffloadingConfig`) of `module`, or `None` if it has none."""
    hook = _get("_get_top_level_group_offload_hook")(module)
    return None if hook is None else hook.config


def offload_layer_types() -> tuple[type, ...]:
    """The layer types that leaf-level group offloading moves, and layerwise casting casts, one at a time."""
    return _get("_GO_LC_SUPPORTED_PYTORCH_LAYERS")


# --- accelerate (training) ------------------------------------------------------------------------------------------


def reset_accelerate_state() -> None:
    """Forget accelerate's per-process precision and accumulation settings; the process group is kept."""
    _get("AcceleratorState._reset_state")()
    _get("GradientState._reset_state")()


# --- FLUX latents (training) ----------------------------------------------------------------------------------------


def pack_latents(latents, batch_size: int, channels: int, height: int, width: int):
    """`(batch, channels, height, width)` noise -> FLUX's packed `(batch, height * width / 4, channels * 4)` tokens."""
    return _get("FluxPipeline._pack_latents")(latents, batch_size, channels, height, width)


def unpack_latents(latents, height: int, width: int, vae_scale_factor: int):
    """FLUX's packed tokens -> `(batch, channels, height / f, width / f)` latents of a `height` x `width` image."""
    return _get("FluxPipeline._unpack_latents")(latents, height, width, vae_scale_factor)


def latent_image_ids(batch_size: int, height: int, width: int, device, dtype):
    """FLUX's positional ids of the packed image tokens (`height` and `width` of the packed grid)."""
    return _get("FluxPipeline._prepare_latent_image_ids")(batch_size, height, width, device, dtype)


# --- transformers (modeling, LoRA) -----------------------------------------------------------------------------------


def init_t5_weights(t5_model, module) -> None:
    """Initialise `module`, a layer of `t5_model`, as transformers' T5 does."""
    _get("T5PreTrainedModel._init_weights")(t5_model, module)


def load_peft_adapter(model, **kwargs):
    """`model.load_adapter(**kwargs)` (transformers' `PeftAdapterMixin`), keeping the model's own weight conversions.

    transformers 5.24's `load_adapter` replaces them with the adapter's (`base_model.model.X` -> `X`), so a later
    `save_pretrained` of the model, once its adapters are fused and removed, writes every weight as
    `base_model.model.X` and the saved model no longer loads.
    """
    conversions = model.__dict__.get(WEIGHT_CONVERSIONS_ATTRIBUTE, _ABSENT)
    try:
        return model.load_adapter(**kwargs)
    finally:
        if conversions is _ABSENT:
            model.__dict__.pop(WEIGHT_CONVERSIONS_ATTRIBUTE, None)
        else:
            setattr(model, WEIGHT_CONVERSIONS_ATTRIBUTE, conversions)


def forget_peft_adapters(model) -> None:
    """Make a model whose adapters were all removed a plain model again, as `PeftAdapterMixin.delete_adapter` does."""
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False
