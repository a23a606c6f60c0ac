"""Every private upstream name the package relies on (`flux_small_encoder.private_api`) is still there, in the shape
the package uses it; a failure names the name, what it is used for, and the installed versions."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from flux_small_encoder import private_api
from flux_small_encoder.private_api import PRIVATE_NAMES, installed_versions


def owner_and_attribute(name):
    """The object holding the last part of `name.qualname` (a module or a class), and that part."""
    owner = importlib.import_module(name.module)
    *path, attribute = name.qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attribute


@pytest.mark.parametrize("name", PRIVATE_NAMES, ids=lambda name: name.qualname)
def test_private_name_is_still_there(name):
    problem = name.problem()
    if problem is not None:
        pytest.fail(problem)


# The checker itself: each entry's test above fails, with the installed versions, when the name goes or changes shape.


@pytest.mark.parametrize("name", PRIVATE_NAMES, ids=lambda name: name.qualname)
def test_a_name_that_is_gone_is_reported(name, monkeypatch):
    monkeypatch.delattr(*owner_and_attribute(name))
    assert name.problem().startswith(f"{name.module}.{name.qualname} is gone (")
    assert f"in {installed_versions()}; it is used to {name.used_for}." in name.problem()


@pytest.mark.parametrize(
    "name", [name for name in PRIVATE_NAMES if name.parameters is not None], ids=lambda name: name.qualname
)
def test_a_callable_that_changed_shape_is_reported(name, monkeypatch):
    def reshaped(*parameters, extra):
        pass

    monkeypatch.setattr(*owner_and_attribute(name), reshaped)
    assert name.problem() == (
        f"{name.module}.{name.qualname} now takes ('parameters', 'extra') instead of {name.parameters} in "
        f"{installed_versions()}; it is used to {name.used_for}."
    )


def test_installed_versions_name_each_library():
    from importlib.metadata import version

    assert installed_versions() == ", ".join(
        f"{library} {version(library)}" for library in ("diffusers", "accelerate", "transformers")
    )


# The attributes set only at run time, checked by running what sets them.


def test_cpu_offload_still_records_what_private_api_reads(make_pipe):
    pipe = make_pipe()
    assert private_api.offload_device(pipe) is None and private_api.accelerate_offload(pipe) is None
    pipe.enable_model_cpu_offload(device="cpu")
    found = (private_api.offload_device(pipe), private_api.accelerate_offload(pipe))
    assert found == (torch.device("cpu", 0), "model"), (
        f"enable_model_cpu_offload no longer sets `{private_api.OFFLOAD_DEVICE_ATTRIBUTE}` or accelerate's "
        f"`{private_api.ACCELERATE_HOOK_ATTRIBUTE}` as before in {installed_versions()}: found {found}."
    )
    pipe.enable_sequential_cpu_offload(device="cpu")
    found = (private_api.offload_device(pipe), private_api.accelerate_offload(pipe))
    assert found == (torch.device("cpu", 0), "sequential"), (
        f"enable_sequential_cpu_offload no longer sets `{private_api.OFFLOAD_DEVICE_ATTRIBUTE}` or accelerate's "
        f"`{private_api.ACCELERATE_HOOK_ATTRIBUTE}` as before in {installed_versions()}: found {found}."
    )


@pytest.fixture(scope="module")
def adapter_folder(student, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(copy.deepcopy(student), LoraConfig(r=2, target_modules=["q", "v"])).save_pretrained(folder)
    return folder


def test_load_adapter_still_replaces_the_weight_conversions(student, adapter_folder):
    """`private_api.load_peft_adapter` puts back what `load_adapter` overwrites; if this fails, transformers no longer
    overwrites that attribute (or keeps it elsewhere): the workaround can go, or must follow the new attribute."""
    from peft import PeftConfig

    attribute = private_api.WEIGHT_CONVERSIONS_ATTRIBUTE
    plain, kept = copy.deepcopy(student), copy.deepcopy(student)
    plain.load_adapter(str(adapter_folder))
    assert getattr(plain, attribute, None), (
        f"load_adapter no longer sets `{attribute}` in {installed_versions()}: see private_api.load_peft_adapter."
    )
    private_api.load_peft_adapter(kept, peft_config=PeftConfig.from_pretrained(adapter_folder),
                                  adapter_state_dict=_adapter_weights(adapter_folder))
    assert attribute not in vars(kept)


def _adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")
