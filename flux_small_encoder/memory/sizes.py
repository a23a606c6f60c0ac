"""What each component of a pipeline holds on the device under each placement, counted from its modules' tensors.

The modules come from one of three places, and no weight is read to size them:

- a loaded pipeline: its components as they are (their parameters and buffers, in their dtypes);
- a pipeline folder or Hub repo (only its JSON files are fetched): each component built on the meta device from its
  `config.json`, in the dtype it will run in;
- FLUX.1-dev's published configs, shipped in `data/flux1-dev.json` and built the same way, to plan with nothing
  downloaded.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..private_api import offload_layer_types
from ..torch_utils import default_dtype

# Which phase of a text-to-image call runs each component; a component not named here counts in every phase.
PHASES = ("encode", "denoise", "decode")
COMPONENT_PHASES = {
    "text_encoder": "encode", "text_encoder_2": "encode", "text_encoder_3": "encode", "image_encoder": "encode",
    "transformer": "denoise", "controlnet": "denoise", "vae": "decode",
}
# The side, in pixels, of the tiles a tiled VAE decode works on; FLUX.1's VAE config says 1024, so that
# `vae.enable_tiling()` alone never tiles a 1024 px image.
TILE_SIZE = 512
REFERENCE_NAME = "FLUX.1-dev"
# The T5 encoder of a pipeline is its component of one of these classes (or of a subclass).
T5_CLASSES = ("T5EncoderModel", "DistilledT5EncoderModel")


@dataclass(frozen=True)
class ComponentFootprint:
    """Bytes a component holds on the device while it runs, under each placement.

    Args:
        resident: All its parameters and buffers.
        streamed: The most that leaf-level group offloading with prefetching holds at once: the layer running and the
            one being fetched (the two largest, to be safe), plus every tensor that belongs to no such layer.
        float8: Its weights stored in float8 with per-layer upcasting (diffusers' `enable_layerwise_casting`): what
            stays stored plus the largest layer upcast; `None` where the component does not support it.
    """

    resident: int
    streamed: int
    float8: int | None = None


@dataclass(frozen=True)
class PipelineFootprint:
    """The footprints of a pipeline's components, and what the plan needs to know about the pipeline.

    Args:
        components: Component name -> footprint, in the pipeline's order.
        encoder: The component holding the T5 encoder (FLUX: `text_encoder_2`), `None` if there is none.
        dtype: The dtype the transformer computes in.
        vae_sample_size: The VAE's `sample_size`: the side of its own decode tiles, in pixels.
        vae_scale_factor: Pixels per latent, along a side.
        source: Where the sizes come from, in words.
    """

    components: dict[str, ComponentFootprint]
    encoder: str | None
    dtype: torch.dtype
    vae_sample_size: int
    vae_scale_factor: int
    source: str

    @property
    def resident(self) -> int:
        """Bytes of every component's weights."""
        return sum(footprint.resident for footprint in self.components.values())

    @property
    def tile_side(self) -> int:
        """The side, in pixels, of the tiles a tiled decode works on: images up to this side are not tiled."""
        return min(self.vae_sample_size, TILE_SIZE)

    @property
    def tile_setting(self) -> tuple[int, int] | None:
        """`(pixels, latents)` tile sides to set on the VAE where its own tiles are larger than `TILE_SIZE`."""
        if self.vae_sample_size <= TILE_SIZE:
            return None
        return TILE_SIZE, TILE_SIZE // self.vae_scale_factor


def module_footprint(module: nn.Module) -> ComponentFootprint:
    """The `ComponentFootprint` of `module`, counted from its tensors (a meta-device module works as well)."""
    layer_types = offload_layer_types()
    # Layers that share their weights (T5's tied input embeddings) are one layer on the device.
    layers = {frozenset(t): t for t in (_tensors(m) for m in module.modules() if isinstance(m, layer_types))}.values()
    in_layers = {key for tensors in layers for key in tensors}
    loose = {key: tensor for key, tensor in _tensors(module).items() if key not in in_layers}
    largest = sorted((_sum_bytes(tensors) for tensors in layers), reverse=True)[:2]
    return ComponentFootprint(
        resident=_nbytes(module), streamed=_sum_bytes(loose) + sum(largest), float8=_float8_bytes(module, largest)
    )


def pipeline_footprint(pipe) -> PipelineFootprint:
    """The footprint of a loaded pipeline, from its components' own parameters and buffers."""
    modules = {name: module for name, module in pipe.components.items() if isinstance(module, nn.Module)}
    classes = {name: [base.__name__ for base in type(module).__mro__] for name, module in modules.items()}
    return PipelineFootprint(
        components={name: module_footprint(module) for name, module in modules.items()},
        encoder=next((name for name, names in classes.items() if set(names) & set(T5_CLASSES)), None),
        dtype=pipe.transformer.dtype,
        **_vae_geometry(modules["vae"].config),
        source=f"the loaded {type(pipe).__name__}'s parameters and buffers",
    )


def folder_footprint(
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    revision: str | None = None,
    **hub_kwargs,
) -> PipelineFootprint:
    """The footprint of a pipeline described by configs only: each component is built on the meta device.

    Args:
        model: A pipeline folder or Hub repo id (only `model_index.json` and the components' `config.json` are
            fetched); `None` for FLUX.1-dev's published configs shipped with the package.
        encoder: The distilled encoder that takes the T5 slot (a registry name, a folder or a Hub repo id); `None`
            keeps the pipeline's own T5 encoder.
        dtype: The dtype the pipeline will run in.
        revision: Hub revision of `model`.
        hub_kwargs: `token`, `cache_dir`, `local_files_only`, ... for the Hub.
    """
    if model is None:
        specs, left_out, source = reference_specs()["components"], [], f"{REFERENCE_NAME}'s configs"
    else:
        specs, left_out = _folder_specs(model, revision, hub_kwargs)
        source = f"the configs of {os.fspath(model)}"
    # The T5 slot: the component of a T5 class, else (a pipeline saved without its T5) a text encoder left out.
    slot = next((name for name, spec in specs.items() if spec["class"] in T5_CLASSES), None)
    slot = slot or next((name for name in left_out if name.startswith("text_encoder")), None)
    if encoder is not None:
        if slot is None:
            raise ValueError(f"{source} hold no T5 encoder, nor a text encoder left out: there is no slot for "
                             f"{os.fspath(encoder)}.")
        spec = encoder_spec(encoder, **hub_kwargs)
        _check_width(spec, specs.get("transformer"), encoder, source)
        specs = {**specs, slot: spec}
        source += f" with {os.fspath(encoder)}"
    modules = {name: build_component(spec, dtype=dtype) for name, spec in specs.items()}
    return PipelineFootprint(
        components={name: module_footprint(module) for name, module in modules.items()},
        encoder=slot,
        dtype=dtype,
        **_vae_geometry(modules["vae"].config),
        source=f"{source}, built without weights",
    )


def _check_width(encoder_spec: dict, transformer_spec: dict | None, encoder, source: str) -> None:
    """Refuse an encoder read from files whose embeddings the transformer cannot read. (A registry name's shipped
    spec is FLUX.1-dev's width, as every registered student is; `patch_encoder` checks it against the real one.)"""
    width = (transformer_spec or {}).get("config", {}).get("joint_attention_dim")
    out_dim = encoder_spec["config"]["project_out_dim"]
    if encoder_spec.get("shipped") or width is None or out_dim == width:
        return
    raise ValueError(
        f"{os.fspath(encoder)} gives {out_dim}-wide embeddings, but the transformer of "
        f"{source.removeprefix('the configs of ')} reads {width}-wide ones (joint_attention_dim): it cannot take its "
        "T5 slot; plan with an encoder distilled for this pipeline."
    )


def reference_specs() -> dict:
    """`data/flux1-dev.json`: FLUX.1-dev's component classes and configs, and the registered students'."""
    return json.loads(resources.files("flux_small_encoder").joinpath("data", "flux1-dev.json").read_text())


def encoder_spec(encoder: str | os.PathLike, **hub_kwargs) -> dict:
    """The spec (library, class, config) of a distilled encoder: a registry name's shipped config, else the
    `config.json` of a folder or Hub repo."""
    from ..configuration import DistilledT5Config
    from ..registry import fetch_encoder, resolve_encoder

    resolved = resolve_encoder(encoder)
    students = reference_specs()["students"]
    if resolved.spec is not None and resolved.spec.name in students:
        return {**students[resolved.spec.name], "shipped": True}
    folder = fetch_encoder(resolved, allow_patterns=["config.json"], **hub_kwargs)
    config = DistilledT5Config.from_pretrained(folder)
    return {"library": "flux_small_encoder", "class": "DistilledT5EncoderModel", "config": config.to_dict()}


def build_component(spec: dict, *, dtype: torch.dtype, device: str | torch.device = "meta") -> nn.Module:
    """Build a component from its spec (`library`, `class`, `config`) on `device`, in `dtype`, with random weights
    (none at all on the meta device)."""
    from diffusers import ModelMixin

    cls = getattr(importlib.import_module(spec["library"]), spec["class"])
    with torch.device(device), default_dtype(dtype), _quiet():
        if issubclass(cls, ModelMixin):
            return cls.from_config(spec["config"]).eval()
        return cls(cls.config_class.from_dict(spec["config"])).eval()  # transformers


def _folder_specs(model: str | os.PathLike, revision: str | None, hub_kwargs: dict) -> tuple[dict, list[str]]:
    """The spec of each model component of a pipeline folder or Hub repo (JSON files only), and the components it
    was saved without."""
    from ..registry import check_pipeline_source

    check_pipeline_source(model, repr(os.fspath(model)))
    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        patterns = ["model_index.json", "*/config.json"]
        try:
            folder = Path(snapshot_download(os.fspath(model), revision=revision, allow_patterns=patterns,
                                            **hub_kwargs))
        except LocalEntryNotFoundError:
            command = f"hf download {os.fspath(model)}" + (f" --revision {revision}" if revision else "")
            raise LocalEntryNotFoundError(
                f"The configs of the pipeline {os.fspath(model)!r} are not in the local Hugging Face cache, and the "
                "Hub could not be reached (offline, or no connection). Fetch them on a connected machine with "
                f"`{command} --include model_index.json --include '*/config.json'` (a few kB), or plan without "
                "--model for FLUX.1-dev's shipped configs."
            ) from None
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{model} has no model_index.json: give a diffusers pipeline folder or repo id.")
    index = json.loads(index_path.read_text())
    specs, left_out = {}, []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        config = folder / name / "config.json"
        if None in entry or not config.parent.is_dir():
            left_out.append(name)
        elif config.is_file():  # a model, not a scheduler or a tokenizer
            specs[name] = {"library": entry[0], "class": entry[1], "config": json.loads(config.read_text())}
    return specs, left_out


def _tensors(module: nn.Module) -> dict[int, torch.Tensor]:
    """The parameters and buffers of `module`, each once (tied weights are one tensor)."""
    return {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}


def _sum_bytes(tensors: dict[int, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def _nbytes(module: nn.Module) -> int:
    return _sum_bytes(_tensors(module))


def _float8_bytes(module: nn.Module, largest_layers: list[int]) -> int | None:
    """Bytes of `module` under diffusers' layerwise casting to float8, from a weightless twin cast by diffusers."""
    from diffusers import ModelMixin

    if not isinstance(module, ModelMixin):
        return None
    with torch.device("meta"), default_dtype(module.dtype), _quiet():
        twin = type(module).from_config(module.config)
    twin.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=module.dtype)
    return _nbytes(twin) + (largest_layers[0] if largest_layers else 0)


def _vae_geometry(config) -> dict[str, int]:
    """The VAE's own tile side and its pixels per latent (FLUX.1: 1024 and 8)."""
    sample_size = config.sample_size
    if isinstance(sample_size, (list, tuple)):
        sample_size = min(sample_size)
    from ..training.models import vae_scale_factor

    return {"vae_sample_size": sample_size, "vae_scale_factor": vae_scale_factor(config)}


@contextlib.contextmanager
def _quiet():
    """Silence diffusers' and transformers' notices while a twin is built (they concern loading, not sizing)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
