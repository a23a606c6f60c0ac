"""Images while training: the teacher's and the student's images of the validation prompts, side by side.

Every `validation_steps` the student's images of `validation_prompts` x `validation_seeds` are sampled with the
trainer's own objective (`VisionDistillation.follow` along the run's schedule) from the same noise as the teacher's,
which are made once. One grid per step goes to `output_dir/validation/step-N.png` (a row per prompt and seed: teacher,
student) and to TensorBoard, with the mean PSNR and SSIM as scalars. At the end of the run the fidelity report of the
held-out prompts is written to `output_dir/fidelity/` by `compare`'s own code.

This is the shape of diffusers' `log_validation` in its training examples: fixed seeds, images to every tracker.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_file
from ..evaluation.compare import Candidate, Comparison
from ..evaluation.generation import GenerationSettings, Sampler
from ..evaluation.metrics import image_metrics
from ..evaluation.prompts import EvalPrompt
from .config import TrainingConfig
from .distill import VisionDistillation
from .models import FrozenParts
from .run_folder import writing_into

VALIDATION_FOLDER = "validation"
FIDELITY_FOLDER = "fidelity"


def generation_settings(config: TrainingConfig) -> GenerationSettings:
    """The run's trajectory as generation settings: its steps, resolution, sequence length, evaluation guidance."""
    return GenerationSettings(
        steps=config.num_inference_steps, size=config.resolution, guidance=config.eval_guidance_scale,
        max_sequence_length=config.max_sequence_length,
    )


class Validator:
    """Teacher and student images of the validation prompts, and the fidelity report at the end of a run.

    Args:
        config: The run's configuration (`validation_prompts`, `validation_seeds`, the trajectory settings).
        frozen: The frozen parts, with the VAE.
        objective: The run's objective, whose schedule the images are sampled along.
        teacher_embeds: Token ids -> the teacher's embeddings (the trainer's `TrajectoryMaker.teacher_embeds`).
        device: Where the latents live.
        dtype: The frozen models' dtype.
    """

    def __init__(self, config: TrainingConfig, frozen: FrozenParts, objective: VisionDistillation,
                 teacher_embeds: Callable[[torch.Tensor], torch.Tensor], device, dtype: torch.dtype):
        self.config, self.teacher_embeds = config, teacher_embeds
        self.sampler = Sampler(frozen, generation_settings(config), device=device, dtype=dtype, objective=objective)
        jobs = [(prompt, seed) for prompt in config.validation_prompts for seed in config.validation_seeds]
        prompts = [prompt for prompt, _ in jobs]
        self.trajectory = self.sampler.start(prompts, [seed for _, seed in jobs],
                                             teacher_embeds(self.sampler.tokenize(prompts)))
        self.teacher_images = self.sampler.images(self.trajectory, self.trajectory.teacher_embeds)  # made once

    @torch.no_grad()
    def __call__(self, student: nn.Module, step: int, output_dir: Path, trackers: Iterable = ()) -> dict[str, float]:
        """The student's images at `step`: writes `output_dir/validation/step-N.png` and logs the grid to the
        TensorBoard tracker among `trackers`; returns the mean `validation_psnr` / `validation_ssim`."""
        from PIL import Image

        embeds = student(self.trajectory.input_ids, output_hidden_states=False)[0]
        images = self.sampler.images(self.trajectory, embeds)
        metrics = image_metrics(images.double() / 255, self.teacher_images.double() / 255)
        # One row per prompt and seed: teacher | student.
        grid = torch.cat([torch.cat([teacher, student_image], dim=2)
                          for teacher, student_image in zip(self.teacher_images, images, strict=True)], dim=1)
        grid = grid.permute(1, 2, 0).numpy()
        path = Path(output_dir) / VALIDATION_FOLDER / f"step-{step}.png"
        with writing_into(output_dir, f"{VALIDATION_FOLDER}/{path.name}"), atomic_file(path) as staging:
            Image.fromarray(grid).save(staging, format="PNG")
        for tracker in trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": grid[None]}, step=step, dataformats="NHWC")
        return {f"validation_{name}": statistics.fmean(values) for name, values in metrics.items()}

    @torch.no_grad()
    def write_fidelity_report(self, student: nn.Module, prompts: list[str], output_dir: Path) -> Path:
        """The fidelity report of the student on `prompts` (the held-out ones), at `validation_seeds`, written by
        `compare`'s code to `output_dir/fidelity/` (replacing the report of an earlier run into the same folder)."""
        held_out = [EvalPrompt(prompt, "held-out", "held-out prompts") for prompt in prompts]
        comparison = Comparison(
            self.sampler, self.teacher_embeds, held_out, list(self.config.validation_seeds),
            batch_size=self.config.train_batch_size, model=self.config.model, progress=False,
            ocr=importlib.util.find_spec("rapidocr_onnxruntime") is not None,
        )
        comparison.add(Candidate("student", student, "distilled"))
        with writing_into(output_dir, f"the fidelity report {FIDELITY_FOLDER}/"):
            return comparison.results.save(Path(output_dir) / FIDELITY_FOLDER, overwrite=True)
