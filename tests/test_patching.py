import copy
import gc
import shutil
import weakref

import pytest
import torch
from diffusers import FluxPipeline

from flux_small_encoder import DistilledT5EncoderModel, load_pipeline, patch_encoder, unpatch_encoder
from flux_small_encoder.tiny import tiny_student

from .conftest import PROMPT, run_pipe


@pytest.fixture
def fresh_student(student):
    """A copy of the session's student: patching adopts the instance it is given (casts it, hooks it for offload)."""
    return copy.deepcopy(student)


def _student_embeddings(pipe, student, max_length=48):
    ids = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return student(ids.input_ids)[0]


def test_patched_image_equals_unpatched_fed_student_embeddings(make_pipe, seeded_hub):
    pipe = make_pipe()
    assert patch_encoder(pipe, "t5-base-distilled") is pipe
    assert isinstance(pipe.text_encoder_2, DistilledT5EncoderModel)
    patched = run_pipe(pipe)

    reference = make_pipe()  # still holds the teacher
    pooled = reference._get_clip_prompt_embeds(PROMPT, device="cpu")
    embeds = _student_embeddings(reference, pipe.text_encoder_2)
    by_hand = run_pipe(reference, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    assert abs(patched - by_hand).max() == 0
    assert abs(patched - run_pipe(reference)).max() > 0  # the teacher gives another image


def test_patch_from_folder_instance_and_repo_id_agree(make_pipe, public_checkpoint, seeded_hub, fresh_student):
    images = []
    for encoder in (str(public_checkpoint), fresh_student, "LifuWang/DistillT5"):
        images.append(run_pipe(patch_encoder(make_pipe(), encoder)))
    assert abs(images[0] - images[1]).max() == 0 and abs(images[0] - images[2]).max() == 0


def test_follows_transformer_dtype_and_keeps_wo_in_float32(make_pipe, public_checkpoint):
    pipe = make_pipe().to(torch.bfloat16)
    patch_encoder(pipe, public_checkpoint)
    assert pipe.text_encoder_2.dtype == torch.bfloat16
    pipe = patch_encoder(make_pipe(), public_checkpoint, dtype=torch.float16)
    assert pipe.text_encoder_2.dtype == torch.float16
    wo = pipe.text_encoder_2.encoder.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32


def test_width_mismatch_is_refused_before_any_change(make_pipe):
    pipe = make_pipe()
    teacher = pipe.text_encoder_2
    with pytest.raises(ValueError, match=r"48-wide.*joint_attention_dim=32"):
        patch_encoder(pipe, tiny_student(project_out_dim=48))
    assert pipe.text_encoder_2 is teacher and pipe.config.text_encoder_2[1] == "T5EncoderModel"
    assert not hasattr(pipe, "_flux_small_encoder_original")


def test_tokenizer_beyond_vocabulary_is_refused(make_pipe):
    small = tiny_student()
    small.resize_token_embeddings(100)
    small.config.vocab_size = 100
    pipe = make_pipe()
    with pytest.raises(ValueError, match=r"tokenizer_2 has 237 tokens .* holds 100"):
        patch_encoder(pipe, small)
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"


def test_patched_pipeline_saves_and_loads(make_pipe, public_checkpoint, tmp_path):
    pipe = patch_encoder(make_pipe(), public_checkpoint)
    pipe.save_pretrained(tmp_path)
    reloaded = FluxPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.text_encoder_2, DistilledT5EncoderModel)
    assert abs(run_pipe(reloaded) - run_pipe(pipe)).max() == 0


def test_replaced_encoder_is_released(make_pipe, fresh_student):
    pipe = make_pipe()
    teacher = weakref.ref(pipe.text_encoder_2)
    patch_encoder(pipe, fresh_student)
    gc.collect()
    assert teacher() is None


def test_unpatch_restores_the_original_object(make_pipe, fresh_student):
    pipe = make_pipe()
    teacher = pipe.text_encoder_2
    before = run_pipe(pipe)
    patch_encoder(pipe, fresh_student, keep_original=True)
    assert unpatch_encoder(pipe) is pipe
    assert pipe.text_encoder_2 is teacher and pipe.config.text_encoder_2[1] == "T5EncoderModel"
    assert abs(run_pipe(pipe) - before).max() == 0
    with pytest.raises(ValueError, match="not patched"):
        unpatch_encoder(pipe)


def test_unpatch_after_release_says_how_to_keep_it(make_pipe, fresh_student):
    pipe = patch_encoder(make_pipe(), fresh_student)
    with pytest.raises(ValueError, match="keep_original=True"):
        unpatch_encoder(pipe)


def test_model_cpu_offload_enabled_before_patching(make_pipe, fresh_student):
    pipe = make_pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    teacher = weakref.ref(pipe.text_encoder_2)
    patch_encoder(pipe, fresh_student)
    gc.collect()
    assert teacher() is None
    assert hasattr(pipe.text_encoder_2, "_hf_hook")
    reference = patch_encoder(make_pipe(), fresh_student)
    assert abs(run_pipe(pipe) - run_pipe(reference)).max() < 1e-6


def test_group_offload_enabled_before_patching(make_pipe, fresh_student):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    pipe = make_pipe()
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    patch_encoder(pipe, fresh_student)
    assert _is_group_offload_enabled(pipe.text_encoder_2)
    reference = patch_encoder(make_pipe(), fresh_student)
    assert abs(run_pipe(pipe) - run_pipe(reference)).max() < 1e-6


def test_load_pipeline_never_reads_the_teacher(make_pipe, seeded_hub, tmp_path):
    make_pipe().save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "text_encoder_2")  # the teacher's weights are gone: loading them would fail
    pipe = load_pipeline(str(tmp_path), encoder="t5-base-distilled")
    assert isinstance(pipe.text_encoder_2, DistilledT5EncoderModel)
    assert run_pipe(pipe).shape == (1, 32, 32, 3)
    assert unpatch_encoder(pipe).text_encoder_2 is None  # the original was "no encoder"


def test_load_pipeline_checks_encoder_name_first(tmp_path):
    with pytest.raises(ValueError, match="Registered names: t5-base-distilled"):
        load_pipeline(str(tmp_path), encoder="no-such-encoder")


def test_unsupported_pipeline_is_refused(fresh_student):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8, block_out_channels=(4,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
        norm_num_groups=2, layers_per_block=1,
    )
    pipe = DDPMPipeline(unet, DDPMScheduler())
    with pytest.raises(TypeError, match="DDPMPipeline is not a supported pipeline"):
        patch_encoder(pipe, fresh_student)


def test_missing_tokenizer_comes_from_the_registry_source(make_pipe, seeded_hub, tmp_path):
    from flux_small_encoder.tiny import tiny_t5_config, tiny_t5_tokenizer

    from .conftest import seed_hub_cache

    tiny_t5_tokenizer().save_pretrained(tmp_path)
    tiny_t5_config().save_pretrained(tmp_path)  # the real repo has a config.json beside its tokenizer
    seed_hub_cache("google/t5-v1_1-xxl", {p.name: p for p in tmp_path.iterdir()})
    pipe = make_pipe(text_encoder_2=None, tokenizer_2=None)
    patch_encoder(pipe, "t5-base-distilled")
    assert len(pipe.tokenizer_2) == 237 and pipe.config.tokenizer_2[0] == "transformers"
    assert run_pipe(pipe).shape == (1, 32, 32, 3)


def test_missing_tokenizer_with_an_instance_says_what_to_do(make_pipe, fresh_student):
    with pytest.raises(ValueError, match="no T5 tokenizer"):
        patch_encoder(make_pipe(text_encoder_2=None, tokenizer_2=None), fresh_student)
