"""LoRA with a patched pipeline: diffusers' transformer/CLIP LoRA behaves as without patching, and peft LoRA adapters
load onto the student itself (`flux_small_encoder.lora`)."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flux_small_encoder import patch_encoder
from flux_small_encoder.lora import (
    fuse_encoder_lora,
    load_encoder_lora,
    save_encoder_lora,
    set_encoder_lora,
    unfuse_encoder_lora,
    unload_encoder_lora,
)
from flux_small_encoder.tiny import tiny_student

from .conftest import run_pipe

compat = pytest.mark.compat
STUDENT_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def random_lora(module: torch.nn.Module, targets: list[str], seed: int) -> dict:
    """A LoRA state dict for `module` with random (non-zero) up and down weights."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    adapted = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), copy.deepcopy(module)
    )
    return get_peft_model_state_dict(adapted)


@pytest.fixture(scope="module")
def flux_lora(flux_components, tmp_path_factory):
    """A FLUX LoRA for the transformer and CLIP, saved the way diffusers' training scripts save them."""
    from diffusers import FluxPipeline

    folder = tmp_path_factory.mktemp("flux-lora")
    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=random_lora(flux_components["transformer"], ["to_q", "to_k", "to_v", "to_out.0"], 0),
        text_encoder_lora_layers=random_lora(flux_components["text_encoder"], ["q_proj", "k_proj", "v_proj"], 1),
    )
    return folder


@pytest.fixture(scope="module")
def student_lora(student, tmp_path_factory):
    """A student adapter in the standard peft layout, as `PeftModel.save_pretrained` (and the trainer) write it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=STUDENT_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(student), config)
    folder = tmp_path_factory.mktemp("student-lora")
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def patched_pipe(make_pipe, student):
    """A factory of fresh tiny FluxPipelines patched with copies of the session's student."""
    return lambda: patch_encoder(make_pipe(), copy.deepcopy(student))


def close(a, b):
    return np.abs(a - b).max() < 1e-4


@compat("LoRA", "transformer + CLIP LoRA (load, set_adapters, fuse, unfuse, unload), before or after patching")
def test_flux_lora_behaves_as_without_patching(make_pipe, patched_pipe, student, flux_lora):
    results = {}
    for variant in ("unpatched", "loaded before patching", "loaded after patching"):
        base = run_pipe(make_pipe() if variant == "unpatched" else patched_pipe())
        pipe = make_pipe()
        if variant == "loaded after patching":
            patch_encoder(pipe, copy.deepcopy(student))
        pipe.load_lora_weights(flux_lora, adapter_name="style")
        if variant == "loaded before patching":
            patch_encoder(pipe, copy.deepcopy(student))
        student_state = {key: value.clone() for key, value in pipe.text_encoder_2.state_dict().items()}

        assert pipe.get_list_adapters() == {"transformer": ["style"], "text_encoder": ["style"]}
        styled = run_pipe(pipe)
        pipe.set_adapters("style", 0.5)
        half = run_pipe(pipe)
        pipe.set_adapters("style", 1.0)
        pipe.fuse_lora()
        fused = run_pipe(pipe)
        pipe.unfuse_lora()
        unfused = run_pipe(pipe)
        pipe.unload_lora_weights()
        unloaded = run_pipe(pipe)

        assert not close(styled, base) and not close(half, styled), variant
        assert close(fused, styled) and close(unfused, styled), variant
        assert close(unloaded, base), variant
        # The LoRA never touched the student.
        assert pipe.text_encoder_2.state_dict().keys() == student_state.keys()
        assert all(torch.equal(value, student_state[key]) for key, value in pipe.text_encoder_2.state_dict().items())
        results[variant] = styled
    np.testing.assert_allclose(results["loaded before patching"], results["loaded after patching"], atol=1e-6)


@compat("LoRA", "peft LoRA on the student: load_encoder_lora, set_encoder_lora, fuse/unfuse, unload, save")
def test_student_lora_round_trip(patched_pipe, student, student_lora, tmp_path):
    from peft import PeftModel

    pipe = patched_pipe()
    base = run_pipe(pipe)
    assert load_encoder_lora(pipe, student_lora, weight=1.0) is pipe
    adapted = run_pipe(pipe)
    assert not close(adapted, base)

    # The same numbers as peft's own wrapper of the student with this adapter.
    ids = torch.tensor([[5, 9, 30, 1]])
    reference = PeftModel.from_pretrained(copy.deepcopy(student), student_lora)
    torch.testing.assert_close(pipe.text_encoder_2(ids)[0], reference(input_ids=ids)[0])

    set_encoder_lora(pipe, "default", 0.0)
    assert close(run_pipe(pipe), base)
    set_encoder_lora(pipe, "default", 0.5)
    half = run_pipe(pipe)
    assert not close(half, base) and not close(half, adapted)
    fuse_encoder_lora(pipe)
    assert close(run_pipe(pipe), half)
    unfuse_encoder_lora(pipe)
    assert close(run_pipe(pipe), half)

    saved = save_encoder_lora(pipe, tmp_path / "saved")
    assert sorted(path.name for path in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert all(key.startswith("base_model.model.encoder.") for key in load_file(saved / "adapter_model.safetensors"))
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        save_encoder_lora(pipe, saved)

    unload_encoder_lora(pipe)
    assert close(run_pipe(pipe), base)
    assert type(pipe.text_encoder_2.encoder.encoder.block[0].layer[0].SelfAttention.q) is torch.nn.Linear

    load_encoder_lora(pipe, saved)  # what we saved loads back, with the same effect
    assert close(run_pipe(pipe), adapted)


def test_student_and_flux_loras_stay_apart(patched_pipe, student_lora, flux_lora, caplog, monkeypatch):
    pipe = patched_pipe()
    load_encoder_lora(pipe, student_lora, adapter_name="student", weight=0.7)
    # transformers' loggers do not propagate to the root logger, where caplog listens.
    monkeypatch.setattr(logging.getLogger("transformers.integrations.peft"), "handlers", [caplog.handler])
    load_encoder_lora(pipe, student_lora, adapter_name="second", weight=0.3)
    assert not caplog.records  # no load report claiming that the first adapter's weights were not loaded
    pipe.load_lora_weights(flux_lora, adapter_name="style")
    both = run_pipe(pipe)
    pipe.unload_lora_weights()  # removes the transformer/CLIP LoRA only
    assert sorted(pipe.text_encoder_2.peft_config) == ["second", "student"]
    assert not close(run_pipe(pipe), both)
    unload_encoder_lora(pipe, "second")
    assert list(pipe.text_encoder_2.peft_config) == ["student"]
    with pytest.raises(ValueError, match="no adapter named"):
        set_encoder_lora(pipe, "second")


def test_bad_student_adapters_are_refused(make_pipe, patched_pipe, student_lora, tmp_path):
    from peft import LoraConfig, get_peft_model

    pipe = patched_pipe()
    base = run_pipe(pipe)

    (tmp_path / "bin-only").mkdir()
    (tmp_path / "bin-only" / "adapter_config.json").write_text((student_lora / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="lacks adapter_model.safetensors"):
        load_encoder_lora(pipe, tmp_path / "bin-only")

    # An adapter trained on another (wider) student: same layer names, other shapes.
    wide = get_peft_model(tiny_student(project_out_dim=64), LoraConfig(r=4, target_modules=["final_projection.0"]))
    wide.save_pretrained(tmp_path / "wide")
    shapes = r"final_projection\.0\.lora_B\.default\.weight is \(64, 4\) in the adapter but \(32, 4\) here"
    with pytest.raises(ValueError, match=f"trained on an encoder of other widths than this one: {shapes}"):
        load_encoder_lora(pipe, tmp_path / "wide")
    assert not hasattr(pipe.text_encoder_2, "peft_config")

    with pytest.raises(TypeError, match="patch the pipeline"):
        load_encoder_lora(make_pipe(), student_lora)

    load_encoder_lora(pipe, student_lora)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        load_encoder_lora(pipe, student_lora)
    unload_encoder_lora(pipe)
    assert close(run_pipe(pipe), base)  # nothing of the refused adapters is left behind


@compat("LoRA", "student LoRA merged for good: fuse_encoder_lora, unload_encoder_lora, save_pretrained")
def test_fused_student_lora_saves_with_the_pipeline(patched_pipe, student_lora, tmp_path):
    from diffusers import FluxPipeline

    pipe = patched_pipe()
    load_encoder_lora(pipe, student_lora, weight=0.5)
    adapted = run_pipe(pipe)
    with pytest.raises(ValueError, match="carries LoRA adapters"):
        pipe.save_pretrained(tmp_path / "refused")  # the LoRA layers' keys would not load back
    assert not (tmp_path / "refused" / "text_encoder_2" / "model.safetensors").exists()
    assert not (tmp_path / "refused" / "model_index.json").exists()  # no folder that would load as a pipeline

    fuse_encoder_lora(pipe)
    unload_encoder_lora(pipe)  # keeps the fused weights, as diffusers' fuse_lora + unload_lora_weights do
    assert close(run_pipe(pipe), adapted)
    pipe.save_pretrained(tmp_path / "merged")
    assert close(run_pipe(FluxPipeline.from_pretrained(tmp_path / "merged")), adapted)


def test_active_adapters_follow_what_peft_itself_was_told(patched_pipe, student_lora, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.functional import set_adapter

    from flux_small_encoder.lora import _lora_layers

    pipe = patched_pipe()
    load_encoder_lora(pipe, student_lora, adapter_name="a", weight=0.5)
    load_encoder_lora(pipe, student_lora, adapter_name="b", weight=1.0)
    set_adapter(pipe.text_encoder_2, ["a"], inference_mode=True)  # the user turns "b" off through peft directly
    load_encoder_lora(pipe, student_lora, adapter_name="c", weight=0.25)

    layers = _lora_layers(pipe.text_encoder_2)
    assert all(layer.active_adapters == ["a", "c"] for layer in layers)  # "b" stays off
    scale = 8 / 4  # the adapter's lora_alpha / r
    assert all(layer.scaling["a"] == pytest.approx(0.5 * scale) for layer in layers)
    assert all(layer.scaling["c"] == pytest.approx(0.25 * scale) for layer in layers)

    for layer in layers:
        layer.set_scale("a", 0.75)  # and changes a weight through peft
    unload_encoder_lora(pipe, "c")
    assert all(layer.active_adapters == ["a"] for layer in layers)
    assert all(layer.scaling["a"] == pytest.approx(0.75 * scale) for layer in layers)

    # An adapter refused while loading leaves the active ones as they were.
    wide = get_peft_model(tiny_student(project_out_dim=64), LoraConfig(r=4, target_modules=["final_projection.0"]))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="trained on an encoder of other widths"):
        load_encoder_lora(pipe, tmp_path / "wide", adapter_name="wide")
    assert all(layer.active_adapters == ["a"] for layer in _lora_layers(pipe.text_encoder_2))
