"""The held-out evaluation: how far the student's embeddings move the transformer's predictions from the teacher's,
along the teacher's trajectory, on prompts the run does not train on."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from .batch import TrajectoryMaker
from .config import TrainingConfig
from .distill import per_sample_mse


class HeldOutEvaluation:
    """The held-out prompts with their teacher embeddings (computed once), and the student's errors on them.

    Args:
        prompts: The held-out prompts.
        trajectories: The run's trajectory maker (tokenizer, teacher, noise).
        objective: The run's objective (its `trajectory_errors`).
        config: The run's configuration (`train_batch_size`, `eval_guidance_scale`).
    """

    def __init__(self, prompts: list[str], trajectories: TrajectoryMaker, objective: nn.Module,
                 config: TrainingConfig):
        self.prompts, self.trajectories, self.objective, self.config = prompts, trajectories, objective, config
        ids = trajectories.tokenize(prompts) if prompts else None
        self.teacher_embeds = None if ids is None else trajectories.teacher_embeds(ids).cpu()

    @torch.no_grad()
    def __call__(self, student: nn.Module, accelerator,
                 forward_context: Callable[[], AbstractContextManager]) -> dict[str, float]:
        """`eval_error` (MSE between the transformer's predictions with student and with teacher embeddings, averaged
        over timesteps and prompts), `eval_relative_error` (the same over the teacher prediction's mean square) and
        `eval_embedding_error` (MSE between the embeddings themselves); each process evaluates its share."""
        if not self.prompts:
            return {}
        cfg = self.config
        totals = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
        mine = list(range(accelerator.process_index, len(self.prompts), accelerator.num_processes))
        for start in range(0, len(mine), cfg.train_batch_size):
            indices = mine[start : start + cfg.train_batch_size]
            trajectory = self.trajectories.make_trajectory(
                [self.prompts[i] for i in indices], indices, guidance=cfg.eval_guidance_scale,
                teacher_embeds=self.teacher_embeds[indices], eval_noise=True,
            )
            with forward_context():
                student_embeds = student(trajectory.input_ids, output_hidden_states=False)[0]
                error, relative_error = self.objective.trajectory_errors(trajectory, student_embeds)
            embedding_error = per_sample_mse(student_embeds, trajectory.teacher_embeds)
            totals[:3] += torch.stack([error.sum(), relative_error.sum(), embedding_error.sum()])
            totals[3] += len(indices)
        totals = accelerator.reduce(totals, "sum")
        count = totals[3].item()
        return {
            "eval_error": totals[0].item() / count,
            "eval_relative_error": totals[1].item() / count,
            "eval_embedding_error": totals[2].item() / count,
        }
