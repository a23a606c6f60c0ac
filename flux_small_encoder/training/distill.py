"""The distillation objectives, as modules whose `forward` returns a dict with `"loss"`.

`VisionDistillation` is the paper's method: along the teacher's own sampling trajectory, the frozen FLUX transformer
predicts once with the teacher's embeddings (no grad) and once with the student's (grad flows through the transformer
into the student); the loss is the MSE between the two predictions, and the latents then advance with the teacher's
prediction. `NaiveDistillation` is the paper's ablation: MSE between the embeddings themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Trajectory:
    """One micro-batch of prompts on its way along the teacher's trajectory.

    Args:
        prompts: The prompts.
        input_ids: Their T5 token ids, `(batch, max_sequence_length)`.
        teacher_embeds: The teacher's embeddings of `input_ids`, computed once for the whole trajectory.
        pooled_embeds: CLIP's pooled embeddings (or zeros), `(batch, pooled_projection_dim)`.
        latents: The packed latents at the current timestep, `(batch, image_tokens, channels)`.
        latent_ids: FLUX's positional ids of the image tokens.
        guidance: The guidance value of each prompt, or None for transformers without guidance embeddings.
    """

    prompts: list[str]
    input_ids: torch.Tensor
    teacher_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    latents: torch.Tensor
    latent_ids: torch.Tensor
    guidance: torch.Tensor | None


def flux_schedule(scheduler, num_inference_steps: int, image_seq_len: int, device=None):
    """The timesteps and sigmas `FluxPipeline` samples with at this resolution.

    As the pipeline does: sigmas `linspace(1, 1/N, N)`, shifted by `mu = calculate_shift(image_seq_len, ...)` from
    the scheduler's config. The scheduler is copied, not changed.

    Returns:
        `(timesteps, sigmas)`: N timesteps (0-1000 scale) and N + 1 sigmas (the last is 0).
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = copy.deepcopy(scheduler)
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError("the scheduler samples stochastically; step following needs the deterministic Euler step.")
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    return timesteps, scheduler.sigmas.to(device)


class VisionDistillation(nn.Module):
    """Vision-based distillation with step following: the student's embeddings must make the frozen transformer
    predict what the teacher's embeddings make it predict, at every timestep of the teacher's trajectory.

    Args:
        transformer: The frozen FLUX transformer. It stays in eval mode and needs no gradients of its own.
        timesteps: The N timesteps of the trajectory (see `flux_schedule`).
        sigmas: Its N + 1 sigmas.
    """

    def __init__(self, transformer: nn.Module, timesteps: torch.Tensor, sigmas: torch.Tensor):
        super().__init__()
        self.transformer = transformer.requires_grad_(False).eval()
        self.register_buffer("timesteps", timesteps.float(), persistent=False)
        self.register_buffer("sigmas", sigmas.float(), persistent=False)

    def train(self, mode: bool = True):
        # The frozen transformer stays in eval mode whatever the trainer does.
        super().train(mode)
        self.transformer.eval()
        return self

    def predict(self, trajectory: Trajectory, embeds: torch.Tensor, step_index: int) -> torch.Tensor:
        """The transformer's prediction at `step_index` with `embeds` as the T5 embeddings (called as FluxPipeline
        calls it)."""
        latents = trajectory.latents
        timestep = self.timesteps[step_index].expand(latents.shape[0]).to(latents.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=trajectory.guidance,
            pooled_projections=trajectory.pooled_embeds,
            encoder_hidden_states=embeds.to(latents.dtype),
            txt_ids=text_ids,
            img_ids=trajectory.latent_ids,
            return_dict=False,
        )[0]

    def advance(self, trajectory: Trajectory, teacher_pred: torch.Tensor, step_index: int) -> torch.Tensor:
        """The scheduler's Euler step `x + (sigma_next - sigma) * v`, in float32 as FlowMatchEulerDiscreteScheduler
        does, without its per-call step counter (several trajectories share one schedule here)."""
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return (trajectory.latents.float() + dt * teacher_pred.float()).to(teacher_pred.dtype)

    @torch.no_grad()
    def follow(
        self, trajectory: Trajectory, embeds: torch.Tensor, steps: int | None = None,
        predictions: list[torch.Tensor] | None = None,
    ) -> None:
        """Advance `trajectory` through its first `steps` timesteps (default: all) with the predictions `embeds` make:
        FluxPipeline's sampling loop, so the final latents are the image these embeddings give. Each step's
        prediction is appended to `predictions` when it is given (the teacher's, for `trajectory_errors`)."""
        for step_index in range(len(self.timesteps) if steps is None else steps):
            pred = self.predict(trajectory, embeds, step_index)
            if predictions is not None:
                predictions.append(pred)
            trajectory.latents = self.advance(trajectory, pred, step_index)

    def follow_teacher(self, trajectory: Trajectory, steps: int) -> None:
        """Advance `trajectory` through its first `steps` timesteps with the teacher's predictions (to resume a
        trajectory in its middle: the teacher's path does not depend on the student)."""
        self.follow(trajectory, trajectory.teacher_embeds, steps)

    @torch.no_grad()
    def trajectory_errors(
        self, trajectory: Trajectory, student_embeds: torch.Tensor, teacher_preds: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Follow the whole teacher trajectory, comparing the predictions with student and teacher embeddings.

        Args:
            trajectory: The micro-batch at its first timestep (advanced in place).
            student_embeds: The student's embeddings of its prompts.
            teacher_preds: The teacher's prediction at each timestep of this trajectory (`follow` with the teacher's
                embeddings records them), to reuse instead of computing them again: half the transformer calls.

        Returns:
            Per prompt, averaged over the timesteps: the MSE between the two predictions, and the same divided by
            the teacher prediction's mean square (comparable across models).
        """
        steps = len(self.timesteps)
        error, relative_error = 0, 0
        for step_index in range(steps):
            if teacher_preds is not None:
                teacher_pred = teacher_preds[step_index].to(trajectory.latents.device)
            else:
                teacher_pred = self.predict(trajectory, trajectory.teacher_embeds, step_index)
            student_pred = self.predict(trajectory, student_embeds, step_index)
            step_error = per_sample_mse(student_pred, teacher_pred)
            error = error + step_error / steps
            relative_error = relative_error + step_error / teacher_pred.float().pow(2).flatten(1).mean(1) / steps
            trajectory.latents = self.advance(trajectory, teacher_pred, step_index)
        return error, relative_error

    def forward(self, student_embeds: torch.Tensor, trajectory: Trajectory, step_index: int) -> dict:
        """
        Args:
            student_embeds: The student's embeddings of `trajectory.input_ids` (with grad).
            trajectory: The micro-batch; its `latents` are those of timestep `step_index`.
            step_index: Which of the N timesteps.

        Returns:
            `{"loss", "student_pred", "teacher_pred", "next_latents"}`; the caller stores `next_latents` in the
            trajectory after the backward pass.
        """
        with torch.no_grad():
            teacher_pred = self.predict(trajectory, trajectory.teacher_embeds, step_index)
        student_pred = self.predict(trajectory, student_embeds, step_index)
        loss = F.mse_loss(student_pred.float(), teacher_pred.float())
        return {
            "loss": loss,
            "student_pred": student_pred,
            "teacher_pred": teacher_pred,
            "next_latents": self.advance(trajectory, teacher_pred, step_index),
        }


class NaiveDistillation(VisionDistillation):
    """The paper's ablation: MSE between the student's and the teacher's embeddings, no transformer in the loss.

    It keeps the transformer only so that the held-out evaluation can compare predictions the same way for both
    objectives (the paper reports that this objective collapses there).
    """

    def forward(self, student_embeds: torch.Tensor, trajectory: Trajectory, step_index: int) -> dict:
        loss = F.mse_loss(student_embeds.float(), trajectory.teacher_embeds.float())
        return {"loss": loss, "next_latents": trajectory.latents}


# `objective` in the config -> its module.
OBJECTIVES = {"vision": VisionDistillation, "naive": NaiveDistillation}


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of each sample, in float64."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).double()
