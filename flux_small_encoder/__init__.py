"""Small distilled T5 text encoders for FLUX and other T5-conditioned diffusion pipelines.

The public names load on first use, so `import flux_small_encoder` (and the command line's `--help`, `--version` and
`list`) cost no torch, transformers or diffusers import. A stand-in for `flux_small_encoder.modeling` is nevertheless
put into `sys.modules` at once, and imports the real module on first use: diffusers finds the class of a saved
pipeline's encoder there (`model_index.json` names `flux_small_encoder.modeling`), and only looks in modules already
imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from .lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "DistilledT5Config": "configuration",
    "DistilledT5EncoderModel": "modeling",
    "PIPELINE_FAMILIES": "patching",
    "load_pipeline": "patching",
    "patch_encoder": "patching",
    "unpatch_encoder": "patching",
    "PretrainedSpec": "registry",
    "get_pretrained_spec": "registry",
    "list_pretrained": "registry",
    "load_encoder": "registry",
    "fuse_encoder_lora": "lora",
    "load_encoder_lora": "lora",
    "save_encoder_lora": "lora",
    "set_encoder_lora": "lora",
    "unfuse_encoder_lora": "lora",
    "unload_encoder_lora": "lora",
}

__all__ = sorted([*_PUBLIC, "__version__"])

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)


class _ImportedOnFirstUse(types.ModuleType):
    """Stands for a submodule in `sys.modules` until one of its names is asked for; then imports it for real and
    answers from it. Its dunder attributes (`__file__`, `__spec__`, ...) are plain, so tools that walk `sys.modules`
    (torch does while it imports) do not trigger the import."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def _register_on_first_use(submodule: str) -> None:
    """Put a stand-in for `flux_small_encoder.<submodule>` into `sys.modules`, to be imported on first use."""
    name = f"{__name__}.{submodule}"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    stand_in = _ImportedOnFirstUse(name)
    stand_in.__spec__, stand_in.__file__, stand_in.__package__ = spec, spec.origin, __name__
    sys.modules[name] = stand_in


_register_on_first_use("modeling")
