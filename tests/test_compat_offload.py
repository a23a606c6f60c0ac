"""Offloading and `torch.compile` with a patched pipeline (CPU: offload devices are both "cpu" here, which still runs
every hook; the accelerator case differs only in where the weights wait)."""

from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest
import torch

from flux_small_encoder import patch_encoder
from flux_small_encoder.private_api import ACCELERATE_HOOK_ATTRIBUTE, group_offload_config, offload_device

from .conftest import run_pipe

compat = pytest.mark.compat


def enable(pipe, kind: str):
    if kind == "model CPU offload":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_group_offload(
            onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1,
        )


def offloaded_as(module, kind: str) -> bool:
    from accelerate.hooks import CpuOffload

    if kind == "model CPU offload":
        return isinstance(getattr(module, ACCELERATE_HOOK_ATTRIBUTE, None), CpuOffload)
    return group_offload_config(module) is not None


@pytest.mark.parametrize("order", ["before patching", "after patching"])
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("model CPU offload", marks=compat("Offload", "`enable_model_cpu_offload(device=...)`")),
        pytest.param("group offload", marks=compat("Offload", "`enable_group_offload` (block level)")),
    ],
)
def test_offload(make_pipe, fresh_student, kind, order):
    reference = run_pipe(patch_encoder(make_pipe(), copy.deepcopy(fresh_student)))
    pipe = make_pipe()
    teacher = weakref.ref(pipe.text_encoder_2)
    if order == "before patching":
        enable(pipe, kind)
        patch_encoder(pipe, fresh_student)
    else:
        patch_encoder(pipe, fresh_student)
        enable(pipe, kind)
    gc.collect()
    assert teacher() is None  # the offload hooks kept no reference to the replaced encoder
    assert offloaded_as(fresh_student, kind)
    np.testing.assert_allclose(run_pipe(pipe), reference, atol=1e-5)


@compat("Offload", "`enable_sequential_cpu_offload` before patching: enabled again with the student (CPU: hooks only)")
def test_sequential_offload_enabled_before_patching_is_enabled_again(make_pipe, fresh_student, monkeypatch):
    """Patching removes accelerate's hooks and enables sequential offload again, on the device it was enabled with, so
    the student is offloaded with the rest. On a CPU the hooks install but cannot run (accelerate fails moving weights
    to the meta device), for the stock pipeline as for the patched one: the generation checks the same failure."""
    from accelerate.hooks import AlignDevicesHook

    pipe = make_pipe()
    pipe.enable_sequential_cpu_offload(device="cpu")
    recorded = offload_device(pipe)
    assert recorded == torch.device("cpu", 0)
    calls, enable_again = [], pipe.enable_sequential_cpu_offload

    def spy(**kwargs):
        calls.append(kwargs)
        enable_again(**kwargs)

    monkeypatch.setattr(pipe, "enable_sequential_cpu_offload", spy)
    teacher = weakref.ref(pipe.text_encoder_2)
    patch_encoder(pipe, fresh_student)

    assert calls == [{"device": recorded}]
    hook = getattr(fresh_student.final_projection[0], ACCELERATE_HOOK_ATTRIBUTE)
    assert isinstance(hook, AlignDevicesHook) and hook.offload and hook.execution_device == recorded
    assert {parameter.device.type for parameter in fresh_student.parameters()} == {"meta"}  # weights wait offloaded
    gc.collect()
    assert teacher() is None

    stock = make_pipe()
    stock.enable_sequential_cpu_offload(device="cpu")
    for offloaded in (stock, pipe):
        with pytest.raises(TypeError, match=r"new\(\) received an invalid combination of arguments"):
            run_pipe(offloaded)


@compat("Compile", "`torch.compile` of the student (CPU, inductor)")
@pytest.mark.slow
def test_torch_compile_student_matches_eager(fresh_student):
    ids = torch.randint(0, 300, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        eager = fresh_student(ids, attention_mask=mask)[0]
        compiled = torch.compile(fresh_student)
        first = compiled(ids, attention_mask=mask)[0]
        again = compiled(ids, attention_mask=mask)[0]
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["model", "sequential"])
@pytest.mark.parametrize("order", ["before patching", "after patching"])
def test_accelerator_offload(make_pipe, fresh_student, kind, order):
    reference_image = run_pipe(patch_encoder(make_pipe(), copy.deepcopy(fresh_student)).to("cuda"))
    pipe = make_pipe()
    offload = pipe.enable_model_cpu_offload if kind == "model" else pipe.enable_sequential_cpu_offload
    if order == "before patching":
        offload()
        patch_encoder(pipe, fresh_student)
    else:
        patch_encoder(pipe, fresh_student)
        offload()
    np.testing.assert_allclose(run_pipe(pipe), reference_image, atol=1e-4)
