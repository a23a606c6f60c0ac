"""`compare_encoders` on tiny models: the teacher scores perfectly, worse students score worse, the teacher's images
are cached, quantized teachers run or are skipped with their reason, and the sampler is FluxPipeline's."""

from __future__ import annotations

import copy

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


def test_teacher_images_are_cached_not_made_again(make_pipe, tmp_path):
    pipe = make_pipe()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))

    def transformer_calls(cache_dir, encoders=("teacher",)):
        calls.clear()
        compare_encoders(pipe, encoders, PROMPTS[:2], seeds=[0], cache_dir=cache_dir, ocr=False, **TINY)
        return len(calls)

    first = transformer_calls(tmp_path / "cache")
    again = transformer_calls(tmp_path / "cache")
    # The teacher's images cost one call per step and image (batch size 1); nothing else is cached.
    assert first - again == TINY["steps"] * 2
    assert transformer_calls(tmp_path / "other-cache") == first
    # A second candidate adds its own calls only.
    assert transformer_calls(tmp_path / "cache", {"teacher": "teacher", "again": "teacher"}) == 2 * again


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
