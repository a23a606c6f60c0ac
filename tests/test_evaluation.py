"""`compare_encoders` on tiny models: the teacher scores perfectly, worse students score worse, the teacher's images
are cached, quantized teachers run or are skipped with their reason, and the sampler is FluxPipeline's."""

from __future__ import annotations

import copy
import importlib.machinery
import shutil
import sys

import pytest
import torch

from flux_small_encoder.evaluation import compare_encoders
from flux_small_encoder.evaluation.generation import GenerationSettings, Sampler, encode, frozen_parts_of
from flux_small_encoder.evaluation.metrics import PSNR_CAP_DB
from flux_small_encoder.tiny import tiny_student

PROMPTS = ["a cat holding a sign that says 'hello'", "a red cube above a blue sphere", "two green dogs"]
TINY = {"steps": 2, "size": 32, "max_sequence_length": 32, "progress": False}


@pytest.fixture(scope="module")
def pipe(flux_components):
    from diffusers import FluxPipeline

    return FluxPipeline(**copy.deepcopy(flux_components))


@pytest.fixture(scope="module")
def results(pipe, tmp_path_factory):
    """One comparison shared by the tests that read its results."""
    encoders = {"teacher": "teacher", "student": tiny_student(), "teacher@quanto-int8": "teacher@quanto-int8",
                "teacher@bnb-nf4": "teacher@bnb-nf4"}
    return compare_encoders(pipe, encoders, PROMPTS, seeds=[0, 1], cache_dir=tmp_path_factory.mktemp("cache"), **TINY)


def records_of(results, encoder: str) -> list[dict]:
    return [record for record in results.records if record["encoder"] == encoder]


def test_teacher_as_candidate_scores_perfectly(results):
    records = records_of(results, "teacher")
    assert len(records) == len(PROMPTS) * 2
    for record in records:
        assert record["psnr"] == PSNR_CAP_DB
        assert record["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert record["embedding_cosine"] == pytest.approx(1.0, abs=1e-12)
        assert record["embedding_mse"] == 0.0
        assert record["trajectory_error"] == 0.0


def test_a_student_scores_below_the_teacher(results):
    for record in records_of(results, "student"):
        assert record["psnr"] < PSNR_CAP_DB and record["ssim"] < 1 and record["embedding_cosine"] < 0.99
        assert record["trajectory_error"] > 0


def test_growing_projector_noise_scores_monotonically_worse(make_pipe):
    """The teacher here is a distilled encoder itself, so the unperturbed copy scores perfectly and each larger
    perturbation of its projector must score worse on every metric."""
    teacher = tiny_student(seed=3)
    scales = [0.0, 0.05, 0.2, 1.0]
    candidates = {}
    for scale in scales:
        candidate = copy.deepcopy(teacher)
        weight = candidate.final_projection[3].weight
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            weight += scale * weight.std() * noise
        candidates[f"noise {scale}"] = candidate
    results = compare_encoders(make_pipe(text_encoder_2=teacher), candidates, PROMPTS[1:], seeds=[0],
                               **{**TINY, "steps": 4})
    means = {name: stats["metrics"] for name, stats in results.summary().items()}
    rising = {"embedding_mse": True, "trajectory_error": True, "trajectory_relative_error": True,
              "psnr": False, "ssim": False, "embedding_cosine": False}
    for metric, worse_is_higher in rising.items():
        values = [means[f"noise {scale}"][metric]["mean"] for scale in scales]
        ordered = values if worse_is_higher else [-value for value in values]
        assert ordered == sorted(ordered) and len(set(values)) == len(values), (metric, values)


def counting(pipe) -> dict[str, int]:
    """Counts of the transformer's calls (one per step and batch) and the VAE's decodes (one per batch of images)."""
    counts = {"transformer": 0, "decode": 0}

    def count(name):
        return lambda module, args: counts.update({name: counts[name] + 1})

    pipe.transformer.register_forward_pre_hook(count("transformer"))
    pipe.vae.decoder.register_forward_pre_hook(count("decode"))
    return counts


def test_teacher_images_are_cached_not_made_again(make_pipe, tmp_path):
    pipe = make_pipe()
    counts = counting(pipe)
    steps = TINY["steps"]

    def calls(cache_dir, encoders=("teacher",)):
        counts.update(transformer=0, decode=0)
        compare_encoders(pipe, encoders, PROMPTS[:2], seeds=[0], cache_dir=cache_dir, ocr=False, **TINY)
        return dict(counts)

    # Two images (batch size 1). Per image: the teacher's (steps calls, whose predictions the trajectory errors
    # reuse, and a decode), then per candidate its image (steps calls, a decode) and its trajectory error (steps).
    assert calls(tmp_path / "cache") == {"transformer": 2 * 3 * steps, "decode": 2 * 2}
    # Cached: the teacher's images are not made again (no decode); its predictions are made once (steps calls).
    assert calls(tmp_path / "cache") == {"transformer": 2 * 3 * steps, "decode": 2 * 1}
    assert calls(tmp_path / "other-cache") == {"transformer": 2 * 3 * steps, "decode": 2 * 2}
    # A second candidate adds its own calls only.
    assert calls(tmp_path / "cache", {"teacher": "teacher", "again": "teacher"}) == {
        "transformer": 2 * 5 * steps, "decode": 2 * 2}


def test_a_damaged_cache_entry_is_made_again_and_only_that_one(make_pipe, tmp_path, caplog):
    """A truncated cached PNG is a cache miss, logged once naming the file, not an UnidentifiedImageError for every
    later run: the teacher makes that image again (one decode more than a fully cached run), and it is rewritten."""
    from PIL import Image

    pipe, cache = make_pipe(), tmp_path / "cache"
    counts = counting(pipe)

    def decodes():
        counts.update(transformer=0, decode=0)
        compare_encoders(pipe, ["teacher"], PROMPTS[:2], seeds=[0], cache_dir=cache, ocr=False, **TINY)
        return counts["decode"]

    assert decodes() == 2 * 2
    damaged, kept = sorted(cache.glob("teacher-*.png"))
    damaged.write_bytes(damaged.read_bytes()[:60])
    caplog.clear()
    with caplog.at_level("WARNING", logger="flux_small_encoder.evaluation.generation"):
        assert decodes() == 2 * 1 + 1  # the candidate's two, and the teacher's damaged one only
    warnings = [record.getMessage() for record in caplog.records if "cannot be read" in record.getMessage()]
    assert len(warnings) == 1 and str(damaged) in warnings[0]
    with Image.open(damaged) as image:
        image.load()  # rewritten whole
    assert decodes() == 2 * 1


def test_quantized_teacher_runs_on_cpu(results):
    [encoder] = [entry for entry in results.encoders if entry["encoder"] == "teacher@quanto-int8"]
    assert encoder["kind"] == "quantized"
    records = records_of(results, "teacher@quanto-int8")
    assert len(records) == len(PROMPTS) * 2
    # int8 weights: close to the teacher, not equal to it.
    assert all(0.99 < record["embedding_cosine"] < 1 for record in records)


def test_a_method_that_cannot_run_is_skipped_with_its_reason(results):
    [skipped] = results.skipped
    assert skipped["encoder"] == "teacher@bnb-nf4"
    assert "bitsandbytes is not installed" in skipped["reason"] or "needs a CUDA device" in skipped["reason"]
    assert not records_of(results, "teacher@bnb-nf4")


def test_unknown_method_or_encoder_is_refused_before_any_image(pipe):
    with pytest.raises(ValueError, match=r"teacher@int3: no such quantization method; use one of teacher@bnb-nf4"):
        compare_encoders(pipe, ["teacher@int3"], PROMPTS, **TINY)
    with pytest.raises(ValueError, match="Cannot resolve encoder 'no-such-encoder'"):
        compare_encoders(pipe, ["no-such-encoder"], PROMPTS, **TINY)


def test_a_comparison_none_of_whose_candidates_can_run_is_refused_before_any_image(pipe, monkeypatch):
    calls = []
    pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"no candidate can run here: teacher@bnb-nf4 \(bitsandbytes"):
        compare_encoders(pipe, ["teacher@bnb-nf4"], PROMPTS, **TINY)
    assert calls == []


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -1.0])
def test_a_guidance_that_is_not_a_finite_number_of_at_least_0_is_refused(pipe, guidance):
    with pytest.raises(ValueError, match="guidance must be a finite number of at least 0"):
        compare_encoders(pipe, ["teacher"], PROMPTS, guidance=guidance, **TINY)


def test_a_candidate_that_is_neither_a_name_nor_a_module_is_refused(pipe):
    with pytest.raises(TypeError, match="a candidate is a name .* not NoneType"):
        compare_encoders(pipe, [None], PROMPTS, **TINY)


def test_a_pipeline_without_its_t5_encoder_is_refused(make_pipe):
    with pytest.raises(ValueError, match=r"the pipeline has no T5 encoder \(text_encoder_2 is None\)"):
        compare_encoders(make_pipe(text_encoder_2=None), ["teacher"], PROMPTS, **TINY)


def test_no_prompts_is_refused(pipe):
    with pytest.raises(ValueError, match="no prompts to compare on"):
        compare_encoders(pipe, ["teacher"], [], **TINY)


def test_the_sampler_makes_the_pipelines_own_image(pipe):
    """Seed s draws FluxPipeline's noise for a CPU generator seeded with s, and the loop is FluxPipeline's."""
    settings = GenerationSettings(steps=3, size=32, guidance=3.5, max_sequence_length=32)
    sampler = Sampler(frozen_parts_of(pipe), settings)
    embeds = encode(pipe.text_encoder_2, sampler.tokenize(PROMPTS[1:]))
    ours = sampler.images(sampler.start(PROMPTS[1:], [7, 8], embeds), embeds)
    for prompt, seed, image in zip(PROMPTS[1:], [7, 8], ours, strict=True):
        theirs = pipe(prompt, height=32, width=32, num_inference_steps=3, max_sequence_length=32, guidance_scale=3.5,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(theirs * 255).round().to(torch.uint8))


# --- candidates checked before any image, and a load failure that happens anyway ----------------------------------


def test_a_candidate_of_another_width_is_refused_before_any_image(make_pipe, tmp_path):
    pipe = make_pipe()
    counts = counting(pipe)
    tiny_student(project_out_dim=24).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError) as refusal:
        compare_encoders(pipe, {"teacher": "teacher", "narrow": tmp_path / "narrow"}, PROMPTS, **TINY)
    assert counts == {"transformer": 0, "decode": 0}  # refused from its config, before the teacher's images
    assert str(refusal.value).startswith(
        "narrow: The encoder produces 24-wide embeddings but FluxTransformer2DModel expects joint_attention_dim=32.")


def test_a_hub_candidate_is_checked_from_its_config_alone_before_any_image(make_pipe, tmp_path):
    from .conftest import seed_hub_cache

    pipe = make_pipe()
    counts = counting(pipe)
    tiny_student(project_out_dim=24).save_pretrained(tmp_path / "narrow")
    seed_hub_cache("me/narrow", {"config.json": tmp_path / "narrow" / "config.json"})  # no weights in the cache
    with pytest.raises(ValueError, match=r"^me/narrow: The encoder produces 24-wide embeddings"):
        compare_encoders(pipe, ["teacher", "me/narrow"], PROMPTS, **TINY)
    with pytest.raises(OSError, match=r"^Cannot read the config of the encoder 'me/missing' to check it before "
                                      r"comparing: "):
        compare_encoders(pipe, ["teacher", "me/missing"], PROMPTS, **TINY)  # offline, not cached
    assert counts == {"transformer": 0, "decode": 0}


def test_a_candidate_failing_after_the_checks_is_a_skipped_row_and_the_rest_is_kept(make_pipe, tmp_path,
                                                                                    monkeypatch):
    """A Hub candidate that passes its config check but whose weights cannot be fetched (401) or read."""
    from flux_small_encoder import registry

    tiny_student().save_pretrained(tmp_path / "gated")

    def refuse(*args, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/me/gated")

    monkeypatch.setattr(registry, "load_encoder", refuse)
    encoders = {"teacher": "teacher", "gated": tmp_path / "gated", "student": tiny_student()}
    results = compare_encoders(make_pipe(), encoders, PROMPTS[1:], **TINY)
    assert results.skipped == [
        {"encoder": "gated", "reason": "failed to load: OSError: 401 Client Error: Unauthorized for url: "
                                       "https://huggingface.co/me/gated"}]
    assert results.encoder_names == ["teacher", "student"]
    assert len(results.records) == 2 * len(PROMPTS[1:])
    results.save(tmp_path / "report")
    assert (tmp_path / "report" / "index.html").is_file()


# --- the teacher image cache: keyed by what the pipeline holds ------------------------------------------------------


def test_the_cache_key_changes_with_the_weights_not_with_the_path(make_pipe, tmp_path):
    """Retrained weights saved into the same folder make new teacher images (stale ones would make the `teacher`
    self-check imperfect); the same weights under another path find the cached ones."""
    from diffusers import FluxPipeline

    from flux_small_encoder.tiny import tiny_flux_transformer

    folder, cache = tmp_path / "pipe", tmp_path / "cache"

    def teacher_run(path):
        pipe = FluxPipeline.from_pretrained(path)
        counts = counting(pipe)
        results = compare_encoders(pipe, ["teacher"], PROMPTS[1:], cache_dir=cache, **TINY)
        return counts["decode"], [record["psnr"] for record in results.records]

    make_pipe().save_pretrained(folder)
    images = len(PROMPTS[1:])
    assert teacher_run(folder) == (2 * images, [PSNR_CAP_DB] * images)
    make_pipe(transformer=tiny_flux_transformer(seed=5)).save_pretrained(folder)  # retrained in place
    assert teacher_run(folder) == (2 * images, [PSNR_CAP_DB] * images)  # teacher images made again
    shutil.copytree(folder, tmp_path / "copy")
    assert teacher_run(tmp_path / "copy") == (images, [PSNR_CAP_DB] * images)  # found in the cache


# --- teacher@METHOD: the teacher in memory ------------------------------------------------------------------------


def test_teacher_at_method_quantizes_the_teacher_in_memory_not_its_folder(make_pipe, tmp_path):
    """The folder the pipeline came from holds another teacher by now: teacher@quanto-int8 must still be the one that
    made the reference images, and that one is left as it was."""
    from diffusers import FluxPipeline

    from flux_small_encoder.tiny import tiny_teacher

    make_pipe().save_pretrained(tmp_path / "pipe")
    pipe = FluxPipeline.from_pretrained(tmp_path / "pipe")
    tiny_teacher(seed=7).save_pretrained(tmp_path / "pipe" / "text_encoder_2")
    before = {key: value.clone() for key, value in pipe.text_encoder_2.state_dict().items()}
    results = compare_encoders(pipe, ["teacher@quanto-int8"], PROMPTS[1:], **TINY)
    assert all(0.99 < record["embedding_cosine"] < 1 for record in results.records)
    after = pipe.text_encoder_2.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


# --- LPIPS ----------------------------------------------------------------------------------------------------------


def test_lpips_is_skipped_with_its_reason_without_torchvision(pipe, monkeypatch):
    """The path this machine takes (torchvision has no release for this torch here): the reason is in the results."""
    from flux_small_encoder.evaluation.metrics import lpips_unavailable

    monkeypatch.setitem(sys.modules, "torchvision", None)
    reason = ("torchvision is not installed (LPIPS takes its AlexNet from it: pip install the torchvision release "
              "built for your torch)")
    assert lpips_unavailable() == reason
    results = compare_encoders(pipe, ["teacher"], PROMPTS[1:2], **TINY)
    assert results.to_json()["skipped_metrics"] == {"lpips": reason}
    assert not any("lpips" in record for record in results.records)


def test_lpips_downloads_nothing_when_its_weights_are_missing(monkeypatch, tmp_path):
    """With torchvision but without AlexNet's weights in torch's hub cache, LPIPS is skipped, naming where they go,
    and nothing is fetched."""
    import types

    from flux_small_encoder.evaluation.metrics import lpips_unavailable

    url = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    models = types.SimpleNamespace(AlexNet_Weights=types.SimpleNamespace(DEFAULT=types.SimpleNamespace(url=url)))
    fake = types.ModuleType("torchvision")
    fake.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    fake.models = models
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reason = lpips_unavailable()
    assert reason.startswith(f"the AlexNet weights LPIPS needs are not at {tmp_path}/hub/checkpoints/"
                             "alexnet-owt-7be5be79.pth, and nothing is downloaded here")
    assert list(tmp_path.iterdir()) == []


# --- the teacher's predictions, made once -------------------------------------------------------------------------


def test_teacher_predictions_are_made_once_per_image_and_give_the_same_errors(make_pipe):
    pipe = make_pipe()
    counts = counting(pipe)
    students = {"student": tiny_student(), "other": tiny_student(seed=2)}
    results = compare_encoders(pipe, students, PROMPTS[1:], seeds=[0, 1], **TINY)
    images, steps = len(PROMPTS[1:]) * 2, TINY["steps"]
    # Per image: the teacher's trajectory once, then per candidate its own image and its predictions along the
    # teacher's trajectory (not the teacher's again).
    assert counts["transformer"] == images * steps * (1 + 2 * len(students))
    # The errors computed from scratch, image by image (batch size 1, as the comparison ran).
    sampler = Sampler(frozen_parts_of(pipe), GenerationSettings(2, 32, 3.5, 32))
    for record in results.records:
        ids = sampler.tokenize([record["prompt"]])
        trajectory = sampler.start([record["prompt"]], [record["seed"]], encode(pipe.text_encoder_2, ids))
        error, _ = sampler.objective.trajectory_errors(trajectory, encode(students[record["encoder"]], ids))
        assert record["trajectory_error"] == float(error[0])


# --- what `generate` makes again ------------------------------------------------------------------------------------


def test_a_distilled_candidates_image_is_the_patched_pipelines_own(make_pipe):
    """What `flux-small-encoder generate --encoder E --seed s` runs: FluxPipeline patched with the student."""
    from flux_small_encoder import patch_encoder

    student = tiny_student()
    results = compare_encoders(make_pipe(), {"student": copy.deepcopy(student)}, PROMPTS[1:2], seeds=[3], **TINY)
    patched = patch_encoder(make_pipe(), student)
    theirs = patched(PROMPTS[1], height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                     guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    ours = results.images.get("student", (0, 3))
    assert torch.equal(ours.permute(1, 2, 0), torch.from_numpy(theirs * 255).round().to(torch.uint8))
