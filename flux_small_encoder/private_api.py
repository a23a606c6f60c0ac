"""The private names of diffusers and accelerate that flux-small-encoder relies on, all in this one module.

A private name may move or change shape in any release of its library. The package reaches each one only through a
function here, and `PRIVATE_NAMES` lists them with the parameters they are called with: `tests/test_private_api.py`
checks every entry against the installed versions and fails naming them, so an upgrade that moves a name breaks one
test here rather than a user's run.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version


@dataclass(frozen=True)
class PrivateName:
    """A private callable of another library, and how this package uses it.

    Args:
        module: The module it lives in.
        qualname: Its name in the module (`Class.method` for a method).
        parameters: The parameter names it must take, in order (what this package passes).
        used_for: Why the package needs it.
    """

    module: str
    qualname: str
    parameters: tuple[str, ...]
    used_for: str

    @property
    def library(self) -> str:
        return self.module.split(".")[0]

    def resolve(self):
        """The object itself; `AttributeError` / `ImportError` if it moved."""
        value = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            value = getattr(value, part)
        return value

    def problem(self) -> str | None:
        """Why the installed library no longer offers this name as used here, or `None` if it does."""
        where = f"{self.module}.{self.qualname}"
        try:
            value = self.resolve()
        except (ImportError, AttributeError) as error:
            return f"{where} is gone ({error}) in {installed_versions()}; it is used to {self.used_for}."
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
        "diffusers.loaders.lora_base", "_func_optionally_disable_offloading", ("_pipeline",),
        "remove a pipeline's accelerate offload hooks before its encoder is swapped, as diffusers' loaders do",
    ),
    PrivateName(
        "diffusers.hooks.group_offloading", "_get_top_level_group_offload_hook", ("module",),
        "read a component's group-offload settings so that the new encoder gets the same ones",
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
        _FLUX, "FluxPipeline._prepare_latent_image_ids", ("batch_size", "height", "width", "device", "dtype"),
        "make the image tokens' positional ids exactly as FluxPipeline does",
    ),
)

# The attribute `DiffusionPipeline.enable_model_cpu_offload` / `enable_sequential_cpu_offload` set to their device.
OFFLOAD_DEVICE_ATTRIBUTE = "_offload_device"


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


def remove_offload_hooks(pipe) -> tuple[bool, bool]:
    """Remove the accelerate hooks of model or sequential CPU offload from every component of `pipe`.

    Returns:
        `(model_offload, sequential_offload)`: which of the two was enabled, to enable it again afterwards.
    """
    model_offload, sequential_offload, _ = _get("_func_optionally_disable_offloading")(pipe)
    return model_offload, sequential_offload


def offload_device(pipe):
    """The device that `enable_model_cpu_offload` / `enable_sequential_cpu_offload` were given, or `None`."""
    return getattr(pipe, OFFLOAD_DEVICE_ATTRIBUTE, None)


def group_offload_config(module):
    """The group-offload settings (diffusers' `GroupOffloadingConfig`) of `module`, or `None` if it has none."""
    hook = _get("_get_top_level_group_offload_hook")(module)
    return None if hook is None else hook.config


# --- accelerate (training) ------------------------------------------------------------------------------------------


def reset_accelerate_state() -> None:
    """Forget accelerate's per-process precision and accumulation settings; the process group is kept."""
    _get("AcceleratorState._reset_state")()
    _get("GradientState._reset_state")()


# --- FLUX latents (training) ----------------------------------------------------------------------------------------


def pack_latents(latents, batch_size: int, channels: int, height: int, width: int):
    """`(batch, channels, height, width)` noise -> FLUX's packed `(batch, height * width / 4, channels * 4)` tokens."""
    return _get("FluxPipeline._pack_latents")(latents, batch_size, channels, height, width)


def latent_image_ids(batch_size: int, height: int, width: int, device, dtype):
    """FLUX's positional ids of the packed image tokens (`height` and `width` of the packed grid)."""
    return _get("FluxPipeline._prepare_latent_image_ids")(batch_size, height, width, device, dtype)
