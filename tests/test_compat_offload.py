"""Offloading and `torch.compile` with a patched pipeline (CPU: offload devices are both "cpu" here, which still runs
every hook; the accelerator case differs only in where the weights wait)."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from flux_small_encoder import patch_encoder
from flux_small_encoder.tiny import tiny_flux_components, tiny_student

from ._compat import generate

compat = pytest.mark.compat


@pytest.fixture(scope="module")
def components():
    return tiny_flux_components()


@pytest.fixture(scope="module")
def reference(components):
    """The patched pipeline's image without any offloading."""
    from diffusers import FluxPipeline

    return generate(patch_encoder(FluxPipeline(**copy.deepcopy(components)), tiny_student()))


def enable(pipe, kind: str):
    if kind == "model CPU offload":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_group_offload(
            onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1,
        )


def offload_hooked(module) -> bool:
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    return hasattr(module, "_hf_hook") or _get_top_level_group_offload_hook(module) is not None


@pytest.mark.parametrize("order", ["before patching", "after patching"])
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("model CPU offload", marks=compat("Offload", "`enable_model_cpu_offload(device=...)`")),
        pytest.param("group offload", marks=compat("Offload", "`enable_group_offload` (block level)")),
    ],
)
def test_offload(components, reference, kind, order):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**copy.deepcopy(components))
    student = tiny_student()
    if order == "before patching":
        enable(pipe, kind)
        patch_encoder(pipe, student)
    else:
        patch_encoder(pipe, student)
        enable(pipe, kind)
    assert offload_hooked(student)
    np.testing.assert_allclose(generate(pipe), reference, atol=1e-5)


@compat("Compile", "`torch.compile` of the student (CPU, inductor)")
@pytest.mark.slow
def test_torch_compile_student_matches_eager():
    student = tiny_student()
    ids = torch.randint(0, 300, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        eager = student(ids, attention_mask=mask)[0]
        compiled = torch.compile(student)
        start = time.perf_counter()
        first = compiled(ids, attention_mask=mask)[0]
        compile_seconds = time.perf_counter() - start
        again = compiled(ids, attention_mask=mask)[0]
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, eager, atol=1e-5, rtol=1e-5)
    print(f"torch.compile of the tiny student: first call {compile_seconds:.1f} s")


def test_sequential_offload_on_cpu_fails_as_for_the_stock_pipeline(components):
    """Without an accelerator, `enable_sequential_cpu_offload` fails for the stock pipeline: check that patching
    changes nothing about that, rather than claim it works."""
    from diffusers import FluxPipeline

    errors = []
    for patched in (False, True):
        pipe = FluxPipeline(**copy.deepcopy(components))
        if patched:
            patch_encoder(pipe, tiny_student())
        with pytest.raises(Exception) as error:
            pipe.enable_sequential_cpu_offload(device="cpu")
            generate(pipe)
        errors.append((type(error.value), str(error.value)))
    assert errors[0] == errors[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["model", "sequential"])
@pytest.mark.parametrize("order", ["before patching", "after patching"])
def test_accelerator_offload(components, kind, order):
    from diffusers import FluxPipeline

    reference_pipe = patch_encoder(FluxPipeline(**copy.deepcopy(components)), tiny_student()).to("cuda")
    reference_image = generate(reference_pipe)
    pipe = FluxPipeline(**copy.deepcopy(components))
    offload = pipe.enable_model_cpu_offload if kind == "model" else pipe.enable_sequential_cpu_offload
    if order == "before patching":
        offload()
        patch_encoder(pipe, tiny_student())
    else:
        patch_encoder(pipe, tiny_student())
        offload()
    np.testing.assert_allclose(generate(pipe), reference_image, atol=1e-4)
