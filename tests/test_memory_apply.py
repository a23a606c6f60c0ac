"""Memory plans applied to the tiny pipeline: each budget gives its recipe's hooks and dtypes, and the images hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_small_encoder import load_pipeline
from flux_small_encoder.memory import (
    RECIPES,
    ActivationEntry,
    ActivationTable,
    MemoryBudgetError,
    plan_memory,
)
from flux_small_encoder.memory.activations import GiB
from flux_small_encoder.private_api import accelerate_offload, group_offload_config

from .conftest import run_pipe

MODULES = ("text_encoder", "text_encoder_2", "transformer", "vae")
SIZE = 64  # twice the tiny VAE's tile: a tiled decode really tiles


def tiny_table() -> ActivationTable:
    """Activations that make a whole decode costly and a tiled one free, so that every recipe's peak differs."""
    entries = [ActivationEntry(phase, None, gib, "measured", "test")
               for phase, gib in (("encode", 0.0), ("denoise", 0.0), ("decode", 0.001), ("decode_tiled", 0.0))]
    return ActivationTable(entries, headroom=0.0)


def plan_for(pipe, recipe_name: str):
    """The plan of `pipe` under the budget that is exactly the predicted peak of `recipe_name`."""
    predictions = plan_memory(pipe, 100, size=SIZE, table=tiny_table()).predictions
    peak = next(p.peak for p in predictions if p.recipe.name == recipe_name)
    return plan_memory(pipe, (peak + 1) / GiB, size=SIZE, table=tiny_table())


def offloaded_by_groups(pipe) -> set[str]:
    return {name for name in MODULES if group_offload_config(getattr(pipe, name)) is not None}


def float8_modules(pipe) -> dict[str, set[str]]:
    """Component -> the kinds of its modules that hold float8 weights."""
    found = {}
    for name in MODULES:
        kinds = {type(m).__name__ for m in getattr(pipe, name).modules()
                 if any(p.dtype == torch.float8_e4m3fn for p in m.parameters(recurse=False))}
        if kinds:
            found[name] = kinds
    return found


# What each recipe leaves on the tiny pipeline: group-offloaded components, float8 components, accelerate's offload,
# tiled decode.
EXPECTED = {
    "resident": (set(), {}, None, False),
    "tiled_decode": (set(), {}, None, True),
    "t5_streamed": ({"text_encoder_2"}, {}, None, True),
    "transformer_fp8": (set(), {"transformer": {"Linear"}}, None, True),
    "group_offload": (set(MODULES), {}, None, True),
}


@pytest.mark.parametrize("recipe", list(EXPECTED))
def test_each_budget_applies_its_recipe_s_hooks_and_dtypes(make_pipe, recipe):
    pipe = make_pipe()
    plan = plan_for(pipe, recipe)
    assert plan.recipe.name == recipe
    plan.apply(pipe, "cpu")
    groups, float8, offload, tiled = EXPECTED[recipe]
    assert offloaded_by_groups(pipe) == groups
    assert float8_modules(pipe) == float8  # norms and embedders stay as they were, as diffusers skips them
    assert accelerate_offload(pipe) == offload
    assert pipe.vae.use_tiling is tiled
    for name in groups:  # on a CPU there are no streams to overlap copies with
        config = group_offload_config(getattr(pipe, name))
        assert (config.offload_type.value, config.stream) == ("leaf_level", None)


def test_model_cpu_offload_is_the_slowest_recipe_and_applies_accelerates_hooks(make_pipe):
    pipe = make_pipe()
    slowest = plan_memory(pipe, size=SIZE, table=tiny_table(), recipe="model_cpu_offload")
    assert slowest.recipe is RECIPES[-1] and slowest.calls("cpu") == ['pipe.enable_model_cpu_offload(device="cpu")']
    slowest.apply(pipe, "cpu")
    assert accelerate_offload(pipe) == "model" and not offloaded_by_groups(pipe) and not pipe.vae.use_tiling


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.name)
def test_images_match_the_plain_pipeline_where_the_vae_does_not_tile(make_pipe, recipe):
    expected = run_pipe(make_pipe())  # 32 px: one tile of the tiny VAE
    pipe = make_pipe()
    plan_memory(pipe, size=32, table=tiny_table(), recipe=recipe.name).apply(pipe, "cpu")
    if recipe.name == "transformer_fp8":  # weights rounded to float8: close, not equal
        np.testing.assert_allclose(run_pipe(pipe), expected, atol=0.05)
    else:
        np.testing.assert_array_equal(run_pipe(pipe), expected)


def test_a_tiled_decode_tiles_beyond_the_vae_s_tile(make_pipe):
    plain, tiled = make_pipe(), make_pipe()
    plan_for(tiled, "tiled_decode").apply(tiled, "cpu")
    whole, in_tiles = run_pipe(plain, height=SIZE, width=SIZE), run_pipe(tiled, height=SIZE, width=SIZE)
    assert in_tiles.shape == whole.shape and not np.array_equal(in_tiles, whole)  # blended seams: not bit-identical


def test_flux_s_vae_gets_512_px_tiles(make_pipe):
    from diffusers import AutoencoderKL

    # FLUX.1's VAE config says sample_size 1024: `enable_tiling()` alone would not tile a 1024 px image.
    vae = AutoencoderKL(sample_size=1024, block_out_channels=(4, 4, 4, 4), latent_channels=1, norm_num_groups=1,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)
    pipe = make_pipe(vae=vae)
    plan = plan_memory(pipe, 100, size=1024, table=tiny_table())
    predictions = {p.recipe.name: p.peak for p in plan.predictions}
    plan = plan_memory(pipe, (predictions["tiled_decode"] + 1) / GiB, size=1024, table=tiny_table())
    assert plan.recipe.name == "tiled_decode"
    assert plan.calls("cpu")[-1] == "pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 512, 64"
    plan.apply(pipe, "cpu")
    assert (pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size) == (512, 64)


def test_a_pipeline_already_offloaded_is_refused(make_pipe):
    pipe = make_pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="already has CPU or group offloading enabled"):
        plan_for(make_pipe(), "resident").apply(pipe, "cpu")


# --- load_pipeline --------------------------------------------------------------------------------------------------


def test_load_pipeline_applies_the_plan_for_its_budget_and_size(pipeline_folder, seeded_hub):
    reference = load_pipeline(pipeline_folder, dtype=torch.float32)
    # The shipped table at 1024 px: the smallest budget that plans group offloading.
    predictions = plan_memory(reference, 100, size=1024).predictions
    group = next(p for p in predictions if p.recipe.name == "group_offload")
    budget = group.peak / (1 - ActivationTable.load().headroom) / GiB + 1e-9
    pipe = load_pipeline(pipeline_folder, dtype=torch.float32, memory_budget=budget, size=1024)
    assert offloaded_by_groups(pipe) == set(MODULES)
    with pytest.raises(MemoryBudgetError, match="a budget of at least"):
        load_pipeline(pipeline_folder, dtype=torch.float32, memory_budget=budget * 0.99, size=1024)


def test_load_pipeline_refuses_a_bad_budget_before_reading_anything(tmp_path):
    with pytest.raises(ValueError, match="memory budget 'plenty' is not a size"):
        load_pipeline(tmp_path / "not-there", memory_budget="plenty")
