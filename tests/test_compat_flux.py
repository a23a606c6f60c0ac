"""Every FLUX-family pipeline that holds T5 in `text_encoder_2` runs with a patched student (tiny models, offline)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from flux_small_encoder import patch_encoder
from flux_small_encoder.tiny import (
    JOINT_ATTENTION_DIM,
    tiny_flux_components,
    tiny_flux_controlnet,
    tiny_flux_transformer,
    tiny_redux_components,
    tiny_student,
)

from ._compat import CallRecorder, generate, sample_image, sample_mask

compat = pytest.mark.compat


@pytest.fixture(scope="module")
def parts():
    """Everything the FLUX family needs, built once: base components, transformer variants, ControlNets."""
    return {
        "base": tiny_flux_components(),
        "control_transformer": tiny_flux_transformer(in_channels=8, out_channels=4),
        "fill_transformer": tiny_flux_transformer(in_channels=12, out_channels=4),
        "controlnet": tiny_flux_controlnet(),
        "union_controlnet": tiny_flux_controlnet(num_mode=4),
        "student": tiny_student(),
    }


def _controlnet(parts, kind: str):
    from diffusers import FluxMultiControlNetModel

    if kind == "multi":
        return FluxMultiControlNetModel([copy.deepcopy(parts["controlnet"]), copy.deepcopy(parts["union_controlnet"])])
    return copy.deepcopy(parts["union_controlnet" if kind == "union" else "controlnet"])


IMAGE, MASK = sample_image(0), sample_mask()
CONTROL = sample_image(1)
KONTEXT_SMALL = {"max_area": 32 * 32, "_auto_resize": False}
# (pipeline class, extra components, call arguments, feature shown in docs/compatibility.md)
CASES = {
    "flux": ("FluxPipeline", {}, {}, "FluxPipeline (text-to-image)"),
    "img2img": ("FluxImg2ImgPipeline", {}, {"image": IMAGE, "strength": 0.9}, "FluxImg2ImgPipeline"),
    "inpaint": ("FluxInpaintPipeline", {}, {"image": IMAGE, "mask_image": MASK, "strength": 0.9},
                "FluxInpaintPipeline"),
    "fill": ("FluxFillPipeline", {"transformer": "fill_transformer"}, {"image": IMAGE, "mask_image": MASK},
             "FluxFillPipeline"),
    "control": ("FluxControlPipeline", {"transformer": "control_transformer"}, {"control_image": CONTROL},
                "FluxControlPipeline"),
    "control_img2img": ("FluxControlImg2ImgPipeline", {"transformer": "control_transformer"},
                        {"image": IMAGE, "control_image": CONTROL, "strength": 0.9}, "FluxControlImg2ImgPipeline"),
    "control_inpaint": ("FluxControlInpaintPipeline", {"transformer": "control_transformer"},
                        {"image": IMAGE, "mask_image": MASK, "control_image": CONTROL, "strength": 0.9},
                        "FluxControlInpaintPipeline"),
    "controlnet": ("FluxControlNetPipeline", {"controlnet": "single"}, {"control_image": CONTROL},
                   "FluxControlNetPipeline (single ControlNet)"),
    "controlnet_union": ("FluxControlNetPipeline", {"controlnet": "union"},
                         {"control_image": CONTROL, "control_mode": 1}, "FluxControlNetPipeline (Union ControlNet)"),
    "controlnet_multi": ("FluxControlNetPipeline", {"controlnet": "multi"},
                         {"control_image": [CONTROL, CONTROL], "control_mode": [None, 2],
                          "controlnet_conditioning_scale": [0.7, 0.5]},
                         "FluxControlNetPipeline (FluxMultiControlNetModel)"),
    "controlnet_img2img": ("FluxControlNetImg2ImgPipeline", {"controlnet": "single"},
                           {"image": IMAGE, "control_image": CONTROL, "strength": 0.9},
                           "FluxControlNetImg2ImgPipeline"),
    "controlnet_inpaint": ("FluxControlNetInpaintPipeline", {"controlnet": "single"},
                           {"image": IMAGE, "mask_image": MASK, "control_image": CONTROL, "strength": 0.9},
                           "FluxControlNetInpaintPipeline"),
    # Kontext resizes the output to `max_area` (default 1024x1024) and the input image to one of its preferred
    # resolutions (about 1 megapixel) unless `_auto_resize=False`: either default makes a tiny run take many minutes.
    "kontext": ("FluxKontextPipeline", {}, {"image": IMAGE, **KONTEXT_SMALL}, "FluxKontextPipeline"),
    "kontext_inpaint": ("FluxKontextInpaintPipeline", {}, {"image": IMAGE, "mask_image": MASK, "strength": 0.9,
                                                          **KONTEXT_SMALL}, "FluxKontextInpaintPipeline"),
}


def build(parts, name: str):
    import diffusers

    cls_name, extra, _, _ = CASES[name]
    components = copy.deepcopy(parts["base"])
    for key, value in extra.items():
        components[key] = _controlnet(parts, value) if key == "controlnet" else copy.deepcopy(parts[value])
    return getattr(diffusers, cls_name)(**components)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=compat("FLUX family", case[3])) for name, case in CASES.items()]
)
def test_pipeline_runs_patched(parts, name):
    pipe = build(parts, name)
    call = CASES[name][2]
    teacher_image = generate(pipe, **call)

    student = copy.deepcopy(parts["student"])
    assert patch_encoder(pipe, student) is pipe and pipe.text_encoder_2 is student
    recorder = CallRecorder(student)
    image = generate(pipe, **call)
    recorder.close()

    assert recorder.shapes and recorder.shapes[0] == (1, 48, JOINT_ATTENTION_DIM)
    assert image.shape == teacher_image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # The student's embeddings reached the transformer: the image is not the teacher's.
    assert np.abs(image - teacher_image).max() > 1e-4
    np.testing.assert_array_equal(image, generate(pipe, **call))


@compat("FLUX family", "FLUX.1-schnell-shaped transformer (no guidance embeddings)")
def test_schnell_shaped_transformer(parts):
    from diffusers import FluxPipeline

    pipe = patch_encoder(FluxPipeline(**tiny_flux_components(guidance_embeds=False)), copy.deepcopy(parts["student"]))
    assert not pipe.transformer.config.guidance_embeds
    image = generate(pipe, guidance_scale=0.0)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@compat("FLUX family", "`from_pipe` from a patched pipeline (keeps the student)")
def test_from_pipe_keeps_student(parts):
    from diffusers import FluxControlNetPipeline, FluxImg2ImgPipeline

    pipe = patch_encoder(build(parts, "flux"), copy.deepcopy(parts["student"]))
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    controlnet = FluxControlNetPipeline.from_pipe(pipe, controlnet=_controlnet(parts, "single"))
    for derived in (img2img, controlnet):
        assert derived.text_encoder_2 is pipe.text_encoder_2
        assert derived.config.text_encoder_2 == pipe.config.text_encoder_2 == (
            "flux_small_encoder.modeling", "DistilledT5EncoderModel"
        )
    recorder = CallRecorder(pipe.text_encoder_2)
    generate(img2img, image=IMAGE, strength=0.9)
    generate(controlnet, control_image=CONTROL)
    recorder.close()
    assert len(recorder.shapes) == 2


@compat("FLUX family", "FluxPriorReduxPipeline (patched, with a prompt) followed by FluxPipeline")
def test_prior_redux_then_flux(parts):
    from diffusers import FluxPipeline, FluxPriorReduxPipeline

    base = copy.deepcopy(parts["base"])
    text_parts = {key: base.pop(key) for key in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    prior = FluxPriorReduxPipeline(**tiny_redux_components(), **text_parts)
    student = copy.deepcopy(parts["student"])
    patch_encoder(prior, student)
    recorder = CallRecorder(student)
    prior_output = prior(IMAGE, prompt="a red cube")
    recorder.close()
    assert recorder.shapes == [(1, 512, JOINT_ATTENTION_DIM)]  # Redux always encodes 512 tokens
    image_tokens = (32 // 8) ** 2
    assert prior_output.prompt_embeds.shape == (1, 512 + image_tokens, JOINT_ATTENTION_DIM)

    flux = FluxPipeline(**base, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    image = generate(flux, prompt=None, max_sequence_length=512, **prior_output)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@compat("Width check", "FluxPriorReduxPipeline: student width checked against the Redux image embedder")
def test_prior_redux_width_is_checked_against_its_embedder(parts):
    from diffusers import FluxPriorReduxPipeline

    prior = FluxPriorReduxPipeline(**tiny_redux_components())
    with pytest.raises(ValueError, match="ReduxImageEncoder expects txt_in_features=32"):
        patch_encoder(prior, tiny_student(project_out_dim=16))
    assert prior.text_encoder_2 is None


@pytest.mark.parametrize("name", ["Flux2Pipeline", "Flux2KleinPipeline"])
def test_other_flux_generations_are_not_mistaken_for_flux1(name):
    import diffusers

    from flux_small_encoder.patching import find_encoder_slot

    with pytest.raises(TypeError, match="not a supported pipeline"):
        find_encoder_slot(getattr(diffusers, name))
