"""Images while training: validation grids, their scalars and images on TensorBoard, the teacher's images made once,
and the held-out fidelity report beside final/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux_small_encoder.training import load_config, train

QUICK = ["num_inference_steps=2", "max_steps=4", "validation_steps=2", "eval_steps=1000", "num_eval_prompts=3",
         "checkpointing_steps=1000"]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validation") / "run"
    train(load_config("tiny", [*QUICK, "report_to=tensorboard", f"output_dir={out}"]))
    return out


def test_tiny_config_turns_validation_on():
    config = load_config("tiny")
    assert config.validation_prompts and config.validation_seeds and config.validation_steps < config.max_steps


def test_validation_grid_every_validation_steps(run):
    config = load_config(run / "config.yaml")
    rows = len(config.validation_prompts) * len(config.validation_seeds)
    for step in (2, 4):
        with Image.open(run / "validation" / f"step-{step}.png") as grid:
            # One row per prompt and seed, teacher | student.
            assert grid.size == (2 * config.resolution, rows * config.resolution)
    assert sorted(path.name for path in (run / "validation").iterdir()) == ["step-2.png", "step-4.png"]
    logged = {r["step"]: r for r in metrics(run) if "validation_psnr" in r}
    assert sorted(logged) == [2, 4]
    assert all(0 < r["validation_ssim"] <= 1 and r["validation_psnr"] > 0 for r in logged.values())


def test_validation_images_and_scalars_reach_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list((run / "tensorboard").rglob("events.out.tfevents.*"))[:1]
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "validation" in tags["images"]
    assert [event.step for event in accumulator.Images("validation")] == [2, 4]
    assert {"validation_psnr", "validation_ssim"} <= set(tags["scalars"])


def test_fidelity_report_of_the_held_out_prompts_beside_final(run):
    results = json.loads((run / "fidelity" / "results.json").read_text())
    assert (run / "fidelity" / "index.html").is_file() and (run / "final").is_dir()
    assert [entry["encoder"] for entry in results["encoders"]] == ["student"]
    assert len(results["records"]) == 3  # the held-out prompts, validation seed 0
    assert {"psnr", "ssim", "embedding_cosine", "trajectory_error"} <= set(results["records"][0])


def test_the_teachers_validation_images_are_made_once(tmp_path):
    from flux_small_encoder.tiny import tiny_student
    from flux_small_encoder.training.batch import latent_shape
    from flux_small_encoder.training.distill import VisionDistillation, flux_schedule
    from flux_small_encoder.training.models import load_frozen_parts, load_teacher
    from flux_small_encoder.training.validation import Validator

    config = load_config("tiny", [*QUICK, f"output_dir={tmp_path}"])
    frozen, teacher = load_frozen_parts(config, torch.float32), load_teacher(config, torch.float32)
    teacher_calls, decodes = [], []

    def teacher_embeds(input_ids):
        teacher_calls.append(1)
        return teacher(input_ids)[0]

    decode = frozen.vae.decode
    frozen.vae.decode = lambda *args, **kwargs: decodes.append(1) or decode(*args, **kwargs)
    _, height, width = latent_shape(config.resolution, frozen)
    objective = VisionDistillation(frozen.transformer, *flux_schedule(frozen.scheduler, 2, height * width // 4))
    validator = Validator(config, frozen, objective, teacher_embeds, "cpu", torch.float32)
    for step in (1, 2):
        validator(tiny_student(), step, tmp_path)
    # The teacher encodes and decodes once; each validation decodes the student's images only.
    assert len(teacher_calls) == 1 and len(decodes) == 3
    assert (tmp_path / "validation" / "step-2.png").is_file()
