import gc
import shutil
import weakref

import pytest
import torch
from diffusers import FluxPipeline

from flux_small_encoder import DistilledT5EncoderModel, load_pipeline, patch_encoder, unpatch_encoder
from flux_small_encoder.tiny import tiny_student

from .conftest import PROMPT, run_pipe


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
    _, pooled, _ = reference.encode_prompt(PROMPT, None, max_sequence_length=48)
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


def assert_unpatched(pipe, teacher):
    """`pipe` still holds `teacher`, records it in its config, and was never marked as patched."""
    assert pipe.text_encoder_2 is teacher and pipe.config.text_encoder_2 == ("transformers", "T5EncoderModel")
    assert not hasattr(pipe, "_flux_small_encoder_original")


def test_width_mismatch_is_refused_before_any_change(make_pipe, fresh_student):
    pipe = make_pipe().to(torch.bfloat16)
    teacher = pipe.text_encoder_2
    wide = tiny_student(project_out_dim=48)
    with pytest.raises(ValueError, match=r"48-wide.*joint_attention_dim=32"):
        patch_encoder(pipe, wide)
    assert_unpatched(pipe, teacher)
    assert wide.dtype == torch.float32  # the refused instance was not cast to the transformer's bfloat16
    assert patch_encoder(pipe, fresh_student).text_encoder_2.dtype == torch.bfloat16  # and the pipeline still patches


def test_failed_move_leaves_the_pipeline_unchanged_and_patchable(make_pipe, public_checkpoint, fresh_student,
                                                                 monkeypatch):
    real_to, moves = DistilledT5EncoderModel.to, []

    def out_of_memory(self, *args, **kwargs):
        device = next((arg for arg in args if isinstance(arg, torch.device)), None)
        if device is not None:
            moves.append(device)
        if device == torch.device("cuda"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(DistilledT5EncoderModel, "to", out_of_memory)
    pipe = make_pipe()
    teacher = pipe.text_encoder_2
    for encoder in (public_checkpoint, fresh_student):
        with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
            patch_encoder(pipe, encoder, device=torch.device("cuda"))
        assert_unpatched(pipe, teacher)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert moves == [cuda, cpu, cuda, cpu]  # each student moved back to where it was, to free what the move took
    assert isinstance(patch_encoder(pipe, fresh_student).text_encoder_2, DistilledT5EncoderModel)
    assert run_pipe(pipe).shape == (1, 32, 32, 3)


NOT_AN_ENCODER = r"An encoder is named by a registry name \(t5-base-distilled\), a folder written by `save_pretrained`"


@pytest.mark.parametrize("encoder", [None, 123, "T5EncoderModel"])
def test_what_is_not_an_encoder_is_refused_saying_what_is(make_pipe, encoder):
    if encoder == "T5EncoderModel":
        encoder = make_pipe().text_encoder_2
    pipe = make_pipe()
    teacher = pipe.text_encoder_2
    with pytest.raises(TypeError, match=NOT_AN_ENCODER + r".*also take a DistilledT5EncoderModel; a plain T5 encoder"):
        patch_encoder(pipe, encoder)
    assert_unpatched(pipe, teacher)


@pytest.mark.parametrize("encoder", [None, 123])
@pytest.mark.parametrize("entry", ["load_pipeline", "convert", "download"])
def test_every_entry_point_refuses_what_is_not_an_encoder_before_reading_anything(entry, encoder, tmp_path,
                                                                                  monkeypatch):
    from flux_small_encoder import convert, hub

    def no_loading(*args, **kwargs):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", no_loading)
    call = {
        "load_pipeline": lambda: load_pipeline(str(tmp_path), encoder),
        "convert": lambda: convert.convert(encoder, tmp_path / "out"),
        "download": lambda: hub.download(encoder),
    }[entry]
    with pytest.raises(TypeError, match=NOT_AN_ENCODER):
        call()
    assert not (tmp_path / "out").exists()


def test_dtype_by_name_is_the_dtype(make_pipe, fresh_student, seeded_hub, tmp_path):
    pipe = patch_encoder(make_pipe(), fresh_student, dtype="float16")
    assert pipe.text_encoder_2.dtype == torch.float16
    make_pipe().save_pretrained(tmp_path)
    pipe = load_pipeline(str(tmp_path), dtype="bfloat16")  # diffusers alone would load it in float32
    assert pipe.transformer.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
    pipe = load_pipeline(str(tmp_path), dtype={"text_encoder_2": "float16", "default": torch.bfloat16})
    assert (pipe.transformer.dtype, pipe.text_encoder_2.dtype) == (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", ["fp17", "int8", 16])
def test_what_is_not_a_dtype_is_refused_before_anything_changes(make_pipe, fresh_student, dtype):
    pipe = make_pipe()
    teacher = pipe.text_encoder_2
    with pytest.raises((TypeError, ValueError), match=f"dtype={dtype!r} is not a floating-point torch dtype"):
        patch_encoder(pipe, fresh_student, dtype=dtype)
    assert_unpatched(pipe, teacher)
    assert fresh_student.dtype == torch.float32


def _tokenizer_in_hub_cache() -> None:
    """The tiny T5 tokenizer cached as the registry's tokenizer source, `google/t5-v1_1-xxl`."""
    import tempfile
    from pathlib import Path

    from flux_small_encoder.tiny import tiny_t5_config, tiny_t5_tokenizer

    from .conftest import seed_hub_cache

    with tempfile.TemporaryDirectory() as folder:
        tiny_t5_tokenizer().save_pretrained(folder)
        tiny_t5_config().save_pretrained(folder)  # the real repo has a config.json beside its tokenizer
        seed_hub_cache("google/t5-v1_1-xxl", {path.name: path for path in Path(folder).iterdir()})


def test_encoder_argument_is_resolved_once(make_pipe, seeded_hub, monkeypatch):
    from flux_small_encoder import patching, registry

    resolve, calls = registry.resolve_encoder, []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return resolve(*args, **kwargs)

    for module in (registry, patching):
        monkeypatch.setattr(module, "resolve_encoder", counting)
    _tokenizer_in_hub_cache()
    patch_encoder(make_pipe(tokenizer_2=None), "t5-base-distilled")  # loads the encoder, then its tokenizer
    assert calls == ["t5-base-distilled"]


def test_tokenizer_beyond_vocabulary_is_refused(make_pipe, fresh_student):
    fresh_student.resize_token_embeddings(100)
    fresh_student.config.vocab_size = 100
    pipe = make_pipe()
    teacher = pipe.text_encoder_2
    with pytest.raises(ValueError, match=r"tokenizer_2 has 237 tokens .* holds 100"):
        patch_encoder(pipe, fresh_student)
    assert_unpatched(pipe, teacher)


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


def test_missing_tokenizer_comes_from_the_registry_source(make_pipe, seeded_hub):
    _tokenizer_in_hub_cache()
    pipe = make_pipe(text_encoder_2=None, tokenizer_2=None)
    patch_encoder(pipe, "t5-base-distilled")
    assert len(pipe.tokenizer_2) == 237 and pipe.config.tokenizer_2[0] == "transformers"
    assert run_pipe(pipe).shape == (1, 32, 32, 3)


def test_missing_tokenizer_with_an_instance_says_what_to_do(make_pipe, fresh_student):
    with pytest.raises(ValueError, match="no T5 tokenizer"):
        patch_encoder(make_pipe(text_encoder_2=None, tokenizer_2=None), fresh_student)
