"""The memory recipes: diffusers' own mechanisms, composed, fastest first.

A recipe says where each component lives (`Placement`) and whether the VAE decodes in tiles. It is data: the same
recipe predicts its peak (`plan.py`) and lists the diffusers calls that apply it (`Recipe.steps`), so what is
printed is what runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch


class Placement(str, Enum):
    """Where a component's weights live while the pipeline runs."""

    RESIDENT = "resident"  # on the device throughout
    FLOAT8 = "float8"  # on the device, stored in float8 and upcast one layer at a time (layerwise casting)
    STREAMED = "streamed"  # in CPU memory, fetched one layer ahead while it runs (leaf-level group offload, streams)
    OFFLOADED = "offloaded"  # in CPU memory, moved whole to the device while it runs (model CPU offload)


@dataclass(frozen=True)
class Step:
    """One call of a recipe: the line a user would write, and the function that makes it on a pipeline."""

    call: str
    run: Callable


@dataclass(frozen=True)
class Recipe:
    """A memory recipe for a FLUX-family pipeline.

    Args:
        name: Its name (`plan --all` lists them).
        time_class: What it costs in time, in words; recipes are ordered fastest first.
        transformer: Placement of the transformer.
        encoder: Placement of the T5 encoder (or the student in its slot).
        others: Placement of every other component (CLIP, the VAE).
        tiled_decode: Decode with `vae.enable_tiling()`, in tiles of `sizes.TILE_SIZE` pixels.
    """

    name: str
    time_class: str
    transformer: Placement = Placement.RESIDENT
    encoder: Placement = Placement.RESIDENT
    others: Placement = Placement.RESIDENT
    tiled_decode: bool = False

    def placement(self, component: str, encoder: str) -> Placement:
        """The placement of the component called `component`; `encoder` names the T5 slot."""
        if component == "transformer":
            return self.transformer
        return self.encoder if component == encoder else self.others

    def steps(
        self,
        components: Sequence[str],
        encoder: str,
        device: torch.device | str,
        dtype: torch.dtype,
        tile_setting: tuple[int, int] | None,
    ) -> list[Step]:
        """The calls that apply this recipe to a pipeline with these components, in order.

        Args:
            components: The pipeline's model components, by name.
            encoder: The component holding the T5 encoder.
            device: The accelerator the pipeline runs on.
            dtype: The dtype the transformer computes in (float8 weights are upcast to it).
            tile_setting: `(pixels, latents)` tile sides to set on the VAE, or `None` to keep its own.
        """
        device = torch.device(device)
        where = f'"{device}"'
        streams = device.type != "cpu"  # CUDA streams overlap the copies with compute
        placements = {name: self.placement(name, encoder) for name in components}
        kinds = set(placements.values())
        if kinds == {Placement.OFFLOADED}:
            steps = [Step(f"pipe.enable_model_cpu_offload(device={where})",
                          lambda pipe: pipe.enable_model_cpu_offload(device=device))]
        elif kinds == {Placement.STREAMED}:
            steps = [Step(
                f'pipe.enable_group_offload(onload_device={where}, offload_type="leaf_level", use_stream={streams})',
                lambda pipe: pipe.enable_group_offload(onload_device=device, offload_type="leaf_level",
                                                       use_stream=streams),
            )]
        elif kinds == {Placement.RESIDENT}:
            steps = [Step(f"pipe.to({where})", lambda pipe: pipe.to(device))]
        elif Placement.OFFLOADED in kinds:
            raise ValueError(f"recipe {self.name}: model CPU offload applies to the whole pipeline or not at all.")
        else:
            steps = [step for name in components for step in _component_steps(name, placements[name], device,
                                                                                 streams, dtype)]
        if self.tiled_decode:
            steps.append(Step("pipe.vae.enable_tiling()", lambda pipe: pipe.vae.enable_tiling()))
            if tile_setting is not None:
                pixels, latents = tile_setting
                steps.append(Step(
                    f"pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = {pixels}, {latents}",
                    lambda pipe: _set_tile(pipe.vae, tile_setting),
                ))
        return steps


def _component_steps(name: str, placement: Placement, device, streams: bool, dtype) -> list[Step]:
    if placement is Placement.STREAMED:
        return [Step(
            f'apply_group_offloading(pipe.{name}, onload_device="{device}", offload_type="leaf_level", '
            f"use_stream={streams})",
            lambda pipe: _stream(getattr(pipe, name), device, streams),
        )]
    steps = []
    if placement is Placement.FLOAT8:
        steps.append(Step(
            f"pipe.{name}.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype={dtype})",
            lambda pipe: getattr(pipe, name).enable_layerwise_casting(
                storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype
            ),
        ))
    steps.append(Step(f'pipe.{name}.to("{device}")', lambda pipe: getattr(pipe, name).to(device)))
    return steps


def _stream(module, device, streams: bool) -> None:
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(module, onload_device=device, offload_type="leaf_level", use_stream=streams)


def _set_tile(vae, tile: tuple[int, int]) -> None:
    # FLUX.1's VAE config sets 1024 px tiles, so `enable_tiling()` alone does not tile a 1024 px image.
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile


RESIDENT, FLOAT8, STREAMED, OFFLOADED = Placement

# Fastest first: the plan takes the first whose predicted peak fits the budget.
RECIPES: tuple[Recipe, ...] = (
    Recipe("resident", "fastest: every weight stays on the GPU"),
    Recipe("tiled_decode", "as resident; the VAE decodes in 512 px tiles", tiled_decode=True),
    Recipe(
        "t5_streamed", "as resident, plus the T5 encoder's weights streamed from CPU memory once a prompt",
        encoder=STREAMED, tiled_decode=True,
    ),
    Recipe(
        "transformer_fp8", "each transformer layer upcast from float8 at every step (small quality change)",
        transformer=FLOAT8, tiled_decode=True,
    ),
    Recipe(
        "group_offload", "every weight streamed from CPU memory at every step, overlapped with compute",
        transformer=STREAMED, encoder=STREAMED, others=STREAMED, tiled_decode=True,
    ),
    Recipe(
        "model_cpu_offload", "each model copied to the GPU whole when it runs, and back",
        transformer=OFFLOADED, encoder=OFFLOADED, others=OFFLOADED,
    ),
)


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; a `ValueError` listing the names otherwise."""
    for recipe in RECIPES:
        if recipe.name == name:
            return recipe
    raise ValueError(f"no memory recipe {name!r}: the recipes are {', '.join(recipe.name for recipe in RECIPES)}.")
