"""Every supported pipeline runs with a patched student (tiny models, offline): the FLUX family in `text_encoder_2`,
Stable Diffusion 3 in `text_encoder_3`, Chroma and PixArt in `text_encoder`. Each family's width check asks for
exactly what its pipeline needs."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

from flux_small_encoder import PIPELINE_FAMILIES, patch_encoder
from flux_small_encoder.patching import find_encoder_slot
from flux_small_encoder.tiny import JOINT_ATTENTION_DIM, tiny_student

from ._compat import CallRecorder, sample_image, sample_mask
from .conftest import build_pipeline, run_pipe

compat = pytest.mark.compat

IMAGE, MASK = sample_image(0), sample_mask()
CONTROL = sample_image(1)
# Kontext resizes the output to `max_area` (default 1024x1024) and the input image to one of its preferred resolutions
# (about 1 megapixel) unless `_auto_resize=False`: either default makes a tiny run take many minutes.
KONTEXT_SMALL = {"max_area": 32 * 32, "_auto_resize": False}
FLUX, OTHERS = "FLUX family", "Other T5 pipelines"

# id -> (pipeline class, components, extra components, call arguments, passes an attention mask, (area, feature)).
# Components: "flux" is `flux_components` (the extra components come from `flux_variant_parts`); the others are
# `family_components` entries.
CASES = {
    "flux": ("FluxPipeline", "flux", {}, {}, False, (FLUX, "FluxPipeline (text-to-image)")),
    "img2img": ("FluxImg2ImgPipeline", "flux", {}, {"image": IMAGE, "strength": 0.9}, False,
                (FLUX, "FluxImg2ImgPipeline")),
    "inpaint": ("FluxInpaintPipeline", "flux", {}, {"image": IMAGE, "mask_image": MASK, "strength": 0.9}, False,
                (FLUX, "FluxInpaintPipeline")),
    "fill": ("FluxFillPipeline", "flux", {"transformer": "fill_transformer"}, {"image": IMAGE, "mask_image": MASK},
             False, (FLUX, "FluxFillPipeline")),
    "control": ("FluxControlPipeline", "flux", {"transformer": "control_transformer"}, {"control_image": CONTROL},
                False, (FLUX, "FluxControlPipeline")),
    "control_img2img": ("FluxControlImg2ImgPipeline", "flux", {"transformer": "control_transformer"},
                        {"image": IMAGE, "control_image": CONTROL, "strength": 0.9}, False,
                        (FLUX, "FluxControlImg2ImgPipeline")),
    "control_inpaint": ("FluxControlInpaintPipeline", "flux", {"transformer": "control_transformer"},
                        {"image": IMAGE, "mask_image": MASK, "control_image": CONTROL, "strength": 0.9}, False,
                        (FLUX, "FluxControlInpaintPipeline")),
    "controlnet": ("FluxControlNetPipeline", "flux", {"controlnet": "controlnet"}, {"control_image": CONTROL}, False,
                   (FLUX, "FluxControlNetPipeline (single ControlNet)")),
    "controlnet_union": ("FluxControlNetPipeline", "flux", {"controlnet": "union_controlnet"},
                         {"control_image": CONTROL, "control_mode": 1}, False,
                         (FLUX, "FluxControlNetPipeline (Union ControlNet)")),
    "controlnet_multi": ("FluxControlNetPipeline", "flux", {"controlnet": "multi"},
                         {"control_image": [CONTROL, CONTROL], "control_mode": [None, 2],
                          "controlnet_conditioning_scale": [0.7, 0.5]}, False,
                         (FLUX, "FluxControlNetPipeline (FluxMultiControlNetModel)")),
    "controlnet_img2img": ("FluxControlNetImg2ImgPipeline", "flux", {"controlnet": "controlnet"},
                           {"image": IMAGE, "control_image": CONTROL, "strength": 0.9}, False,
                           (FLUX, "FluxControlNetImg2ImgPipeline")),
    "controlnet_inpaint": ("FluxControlNetInpaintPipeline", "flux", {"controlnet": "controlnet"},
                           {"image": IMAGE, "mask_image": MASK, "control_image": CONTROL, "strength": 0.9}, False,
                           (FLUX, "FluxControlNetInpaintPipeline")),
    "kontext": ("FluxKontextPipeline", "flux", {}, {"image": IMAGE, **KONTEXT_SMALL}, False,
                (FLUX, "FluxKontextPipeline")),
    "kontext_inpaint": ("FluxKontextInpaintPipeline", "flux", {},
                        {"image": IMAGE, "mask_image": MASK, "strength": 0.9, **KONTEXT_SMALL}, False,
                        (FLUX, "FluxKontextInpaintPipeline")),
    "sd3": ("StableDiffusion3Pipeline", "sd3", {}, {}, False, (OTHERS, "StableDiffusion3Pipeline")),
    "sd3_img2img": ("StableDiffusion3Img2ImgPipeline", "sd3", {}, {"image": IMAGE, "strength": 0.9}, False,
                    (OTHERS, "StableDiffusion3Img2ImgPipeline")),
    "chroma": ("ChromaPipeline", "chroma", {}, {}, True, (OTHERS, "ChromaPipeline")),
    "chroma_img2img": ("ChromaImg2ImgPipeline", "chroma", {}, {"image": IMAGE, "strength": 0.9}, True,
                       (OTHERS, "ChromaImg2ImgPipeline")),
    "pixart_sigma": ("PixArtSigmaPipeline", "pixart", {}, {"use_resolution_binning": False}, True,
                     (OTHERS, "PixArtSigmaPipeline")),
    "pixart_alpha": ("PixArtAlphaPipeline", "pixart", {}, {"use_resolution_binning": False}, True,
                     (OTHERS, "PixArtAlphaPipeline")),
}


@pytest.fixture
def build(flux_components, flux_variant_parts, family_components):
    """`build(case_id)`: a fresh pipeline of that case, from copies of the session's components."""

    def part(name: str):
        if name == "multi":
            from diffusers import FluxMultiControlNetModel

            return FluxMultiControlNetModel([part("controlnet"), part("union_controlnet")])
        return copy.deepcopy(flux_variant_parts[name])

    def make(case_id: str):
        cls_name, source, extra, *_ = CASES[case_id]
        if source == "flux":
            return build_pipeline(cls_name, flux_components, **{key: part(name) for key, name in extra.items()})
        return build_pipeline(cls_name, family_components[source])

    return make


@pytest.mark.parametrize("case_id", [pytest.param(key, marks=compat(*case[5])) for key, case in CASES.items()])
def test_pipeline_runs_patched(build, fresh_student, case_id):
    pipe = build(case_id)
    call, passes_mask = CASES[case_id][3], CASES[case_id][4]
    teacher_image = run_pipe(pipe, **call)

    assert patch_encoder(pipe, fresh_student) is pipe
    assert getattr(pipe, find_encoder_slot(pipe).encoder) is fresh_student
    recorder = CallRecorder(fresh_student)
    image = run_pipe(pipe, **call)
    recorder.close()

    assert recorder.shapes and recorder.shapes[0] == (1, 48, JOINT_ATTENTION_DIM)
    assert all(recorder.masks) == passes_mask
    assert image.shape == teacher_image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # The student's embeddings reached the transformer: the image is not the teacher's.
    assert np.abs(image - teacher_image).max() > 1e-4
    np.testing.assert_array_equal(image, run_pipe(pipe, **call))


@compat(FLUX, "FLUX.1-schnell-shaped transformer (no guidance embeddings)")
def test_schnell_shaped_transformer(flux_components, fresh_student):
    from flux_small_encoder.tiny import tiny_flux_transformer

    pipe = build_pipeline("FluxPipeline", flux_components, transformer=tiny_flux_transformer(guidance_embeds=False))
    patch_encoder(pipe, fresh_student)
    assert not pipe.transformer.config.guidance_embeds
    image = run_pipe(pipe, guidance_scale=0.0)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@compat(FLUX, "`from_pipe` from a patched pipeline (keeps the student)")
def test_from_pipe_keeps_student(build, flux_variant_parts, fresh_student):
    from diffusers import FluxControlNetPipeline, FluxImg2ImgPipeline

    pipe = patch_encoder(build("flux"), fresh_student)
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    controlnet = FluxControlNetPipeline.from_pipe(pipe, controlnet=copy.deepcopy(flux_variant_parts["controlnet"]))
    for derived in (img2img, controlnet):
        assert derived.text_encoder_2 is pipe.text_encoder_2
        assert derived.config.text_encoder_2 == pipe.config.text_encoder_2 == (
            "flux_small_encoder.modeling", "DistilledT5EncoderModel"
        )
    recorder = CallRecorder(pipe.text_encoder_2)
    run_pipe(img2img, image=IMAGE, strength=0.9)
    run_pipe(controlnet, control_image=CONTROL)
    recorder.close()
    assert len(recorder.shapes) == 2


@compat(FLUX, "FluxPriorReduxPipeline (patched, with a prompt) followed by FluxPipeline")
def test_prior_redux_then_flux(flux_components, redux_components, fresh_student):
    from diffusers import FluxPipeline, FluxPriorReduxPipeline

    base = copy.deepcopy(flux_components)
    text_parts = {key: base.pop(key) for key in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    prior = build_pipeline(FluxPriorReduxPipeline, redux_components, **text_parts)
    patch_encoder(prior, fresh_student)
    recorder = CallRecorder(fresh_student)
    prior_output = prior(IMAGE, prompt="a red cube")
    recorder.close()
    assert recorder.shapes == [(1, 512, JOINT_ATTENTION_DIM)]  # Redux always encodes 512 tokens
    image_tokens = (32 // 8) ** 2
    assert prior_output.prompt_embeds.shape == (1, 512 + image_tokens, JOINT_ATTENTION_DIM)

    flux = FluxPipeline(**base, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    image = run_pipe(flux, prompt=None, max_sequence_length=512, **prior_output)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@compat("Width check", "FluxPriorReduxPipeline: student width checked against the Redux image embedder")
def test_prior_redux_width_is_checked_against_its_embedder(redux_components):
    from diffusers import FluxPriorReduxPipeline

    prior = build_pipeline(FluxPriorReduxPipeline, redux_components)
    with pytest.raises(ValueError, match="ReduxImageEncoder expects txt_in_features=32"):
        patch_encoder(prior, tiny_student(project_out_dim=16))
    assert prior.text_encoder_2 is None


@pytest.mark.parametrize(
    "case_id",
    [
        pytest.param(case_id, marks=compat("Width check", f"{CASES[case_id][0]}: student width refused unless the "
                                                          "pipeline's"))
        for case_id in ("sd3", "chroma", "pixart_sigma")
    ],
)
def test_width_check_matches_what_the_pipeline_needs(build, case_id):
    pipe = build(case_id)
    slot = find_encoder_slot(pipe)
    teacher = getattr(pipe, slot.encoder)
    narrow = tiny_student(project_out_dim=16)

    with pytest.raises(ValueError, match=f"expects {slot.width_field}={JOINT_ATTENTION_DIM}"):
        patch_encoder(pipe, narrow)
    assert getattr(pipe, slot.encoder) is teacher  # refused before anything changed

    # The check is not stricter than the pipeline: forced in, the narrow encoder fails inside the transformer. (For
    # SD3 this holds although its two CLIPs together are only 16 wide: it zero-pads them to the T5 width, and the
    # transformer's context embedder reads `joint_attention_dim` features.)
    pipe.register_modules(**{slot.encoder: narrow})
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_pipe(pipe, **CASES[case_id][3])


@compat("Width check", "StableDiffusion3Pipeline: CLIP embeddings zero-padded to the student's width")
def test_sd3_pads_clip_embeddings_to_the_student_width(build, fresh_student):
    pipe = patch_encoder(build("sd3"), fresh_student)
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert clip_width < JOINT_ATTENTION_DIM
    prompt_embeds, *_ = pipe.encode_prompt("a cat", "a cat", "a cat", max_sequence_length=48, device="cpu")
    assert prompt_embeds.shape == (1, 77 + 48, JOINT_ATTENTION_DIM)
    assert torch.count_nonzero(prompt_embeds[:, :77, clip_width:]) == 0


@pytest.mark.parametrize(
    "case_id",
    [
        pytest.param(case_id, marks=compat("Attention mask", f"{CASES[case_id][0]}: the student honours the mask it "
                                                             "is given"))
        for case_id in ("chroma", "pixart_sigma")
    ],
)
def test_student_honours_the_attention_mask(build, fresh_student, case_id):
    """Chroma and PixArt pass the tokenizer's mask: the student's embeddings of the prompt's tokens must not depend on
    how much padding follows."""
    pipe = patch_encoder(build(case_id), fresh_student)
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
    "name, width_field",
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
def test_family_table_rows(name, width_field):
    import diffusers

    cls = getattr(diffusers, name)
    slot = find_encoder_slot(cls)
    assert slot.width_field == width_field and slot in PIPELINE_FAMILIES.values()
    # Each slot names arguments of the pipeline's constructor and a config field of the component reading the
    # embeddings.
    parameters = inspect.signature(cls.__init__).parameters
    assert {slot.encoder, slot.tokenizer, slot.width_component} <= set(parameters)
    consumer = parameters[slot.width_component].annotation
    if isinstance(consumer, str):
        consumer = getattr(diffusers, consumer, None) or getattr(diffusers.pipelines.flux.modeling_flux, consumer)
    assert slot.width_field in inspect.signature(consumer.__init__).parameters


@pytest.mark.parametrize("name", ["Flux2Pipeline", "Flux2KleinPipeline"])
def test_other_flux_generations_are_not_mistaken_for_flux1(name):
    import diffusers

    with pytest.raises(TypeError, match="not a supported pipeline"):
        find_encoder_slot(getattr(diffusers, name))
