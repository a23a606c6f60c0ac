"""Beyond FLUX: Stable Diffusion 3, Chroma and PixArt run with a patched student, and each family's width check asks
for exactly what its pipeline needs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flux_small_encoder import PIPELINE_FAMILIES, patch_encoder
from flux_small_encoder.patching import find_encoder_slot
from flux_small_encoder.tiny import (
    JOINT_ATTENTION_DIM,
    tiny_chroma_components,
    tiny_pixart_components,
    tiny_sd3_components,
    tiny_student,
)

from ._compat import CallRecorder, generate, sample_image

compat = pytest.mark.compat

# pipeline class -> (components builder, extra call arguments, does the pipeline pass an attention mask)
FAMILIES = {
    "StableDiffusion3Pipeline": (tiny_sd3_components, {}, False),
    "StableDiffusion3Img2ImgPipeline": (tiny_sd3_components, {"image": sample_image(), "strength": 0.9}, False),
    "ChromaPipeline": (tiny_chroma_components, {}, True),
    "ChromaImg2ImgPipeline": (tiny_chroma_components, {"image": sample_image(), "strength": 0.9}, True),
    "PixArtSigmaPipeline": (tiny_pixart_components, {"use_resolution_binning": False}, True),
    "PixArtAlphaPipeline": (tiny_pixart_components, {"use_resolution_binning": False}, True),
}


@pytest.fixture(scope="module")
def components():
    return {builder: builder() for builder in {builder for builder, _, _ in FAMILIES.values()}}


def build(components, name: str):
    import diffusers

    builder = FAMILIES[name][0]
    return getattr(diffusers, name)(**copy.deepcopy(components[builder]))


@pytest.mark.parametrize("name", [pytest.param(name, marks=compat("Other T5 pipelines", name)) for name in FAMILIES])
def test_pipeline_runs_patched(components, name):
    pipe = build(components, name)
    slot = find_encoder_slot(pipe)
    call = FAMILIES[name][1]
    teacher_image = generate(pipe, **call)

    student = tiny_student()
    patch_encoder(pipe, student)
    assert getattr(pipe, slot.encoder) is student
    recorder = CallRecorder(student)
    image = generate(pipe, **call)
    recorder.close()

    assert recorder.shapes and recorder.shapes[0] == (1, 48, JOINT_ATTENTION_DIM)
    assert all(recorder.masks) == FAMILIES[name][2]
    assert image.shape == teacher_image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert np.abs(image - teacher_image).max() > 1e-4


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=compat("Width check", f"{name}: student width refused unless the pipeline's"))
        for name in ("StableDiffusion3Pipeline", "ChromaPipeline", "PixArtSigmaPipeline")
    ],
)
def test_width_check_matches_what_the_pipeline_needs(components, name):
    pipe = build(components, name)
    slot = find_encoder_slot(pipe)
    teacher = getattr(pipe, slot.encoder)
    narrow = tiny_student(project_out_dim=16)

    with pytest.raises(ValueError, match=f"expects {slot.width}={JOINT_ATTENTION_DIM}"):
        patch_encoder(pipe, narrow)
    assert getattr(pipe, slot.encoder) is teacher  # refused before anything changed

    # The check is not stricter than the pipeline: forced in, the narrow encoder fails inside the transformer. (For
    # SD3 this holds although its two CLIPs together are only 16 wide: it zero-pads them to the T5 width, and the
    # transformer's context embedder reads `joint_attention_dim` features.)
    pipe.register_modules(**{slot.encoder: narrow})
    with pytest.raises(RuntimeError):
        generate(pipe, **FAMILIES[name][1])


@compat("Width check", "StableDiffusion3Pipeline: CLIP embeddings zero-padded to the student's width")
def test_sd3_pads_clip_embeddings_to_the_student_width(components):
    pipe = patch_encoder(build(components, "StableDiffusion3Pipeline"), tiny_student())
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert clip_width < JOINT_ATTENTION_DIM
    prompt_embeds, *_ = pipe.encode_prompt("a cat", "a cat", "a cat", max_sequence_length=48, device="cpu")
    assert prompt_embeds.shape == (1, 77 + 48, JOINT_ATTENTION_DIM)
    assert torch.count_nonzero(prompt_embeds[:, :77, clip_width:]) == 0


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=compat("Attention mask", f"{name}: the student honours the mask it is given"))
        for name in ("ChromaPipeline", "PixArtSigmaPipeline")
    ],
)
def test_student_honours_the_attention_mask(components, name):
    """Chroma and PixArt pass the tokenizer's mask: the student's embeddings of the prompt's tokens must not depend on
    how much padding follows."""
    pipe = patch_encoder(build(components, name), tiny_student())
    slot = find_encoder_slot(pipe)
    tokenizer, student = getattr(pipe, slot.tokenizer), getattr(pipe, slot.encoder)

    def embed(length: int, masked: bool = True):
        tokens = tokenizer("a red cube", padding="max_length", max_length=length, return_tensors="pt")
        mask = tokens.attention_mask if masked else None
        with torch.no_grad():
            return student(tokens.input_ids, attention_mask=mask)[0], int(tokens.attention_mask.sum())

    short, real = embed(16)
    long, _ = embed(48)
    torch.testing.assert_close(short[:, :real], long[:, :real], atol=1e-5, rtol=1e-5)
    unmasked, _ = embed(48, masked=False)
    assert (unmasked[:, :real] - long[:, :real]).abs().max() > 1e-4  # the mask matters


@pytest.mark.parametrize(
    "name, width",
    [
        ("FluxPipeline", "joint_attention_dim"),
        ("FluxFillPipeline", "joint_attention_dim"),
        ("FluxPriorReduxPipeline", "txt_in_features"),
        ("StableDiffusion3ControlNetPipeline", "joint_attention_dim"),
        ("StableDiffusion3PAGImg2ImgPipeline", "joint_attention_dim"),
        ("ChromaInpaintPipeline", "joint_attention_dim"),
        ("PixArtSigmaPAGPipeline", "caption_channels"),
        ("PixArtAlphaPipeline", "caption_channels"),
    ],
)
def test_family_table_rows(name, width):
    import inspect

    import diffusers

    cls = getattr(diffusers, name)
    slot = find_encoder_slot(cls)
    assert slot.width == width and slot in PIPELINE_FAMILIES.values()
    # Each slot names an argument of the pipeline's constructor and a config field of the model reading the embeddings.
    parameters = inspect.signature(cls.__init__).parameters
    assert {slot.encoder, slot.tokenizer, slot.width_module} <= set(parameters)
    consumer = parameters[slot.width_module].annotation
    if isinstance(consumer, str):
        consumer = getattr(diffusers, consumer, None) or getattr(diffusers.pipelines.flux.modeling_flux, consumer)
    assert slot.width in inspect.signature(consumer.__init__).parameters
