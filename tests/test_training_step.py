"""One training step of the trainer against a computation by hand, and the pieces it is made of."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flux_small_encoder.training import DistillationTrainer, load_config
from flux_small_encoder.training.distill import flux_schedule


def make_trainer(tmp_path, *overrides) -> DistillationTrainer:
    config = load_config("tiny", [f"output_dir={tmp_path / 'run'}", "report_to=none", "num_eval_prompts=0",
                                  "lr_scheduler=constant", "lr_warmup_steps=0", *overrides])
    trainer = DistillationTrainer(config)
    trainer.setup()
    return trainer


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return make_trainer(tmp_path_factory.mktemp("step"), "max_grad_norm=1e-4", "weight_decay=0.1")


def test_schedule_is_the_pipelines(make_pipe):
    from .conftest import run_pipe

    pipe = make_pipe()
    run_pipe(pipe, num_inference_steps=4, height=16, width=16)
    timesteps, sigmas = flux_schedule(pipe.scheduler, 4, image_seq_len=64)
    torch.testing.assert_close(timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)


def test_flux_dev_resolution_shift_by_hand():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler config: dynamic shifting between 0.5 (256 tokens) and 1.15 (4096 tokens).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    _, sigmas = flux_schedule(scheduler, 20, image_seq_len=1024)  # 512 px
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)
    for i, sigma in enumerate(torch.linspace(1.0, 1 / 20, 20).tolist()):
        expected = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
        assert sigmas[i].item() == pytest.approx(expected, rel=1e-5)
    assert sigmas[-1] == 0


def test_one_step_against_a_hand_computation(trainer):
    cfg = trainer.config
    trajectory = trainer.make_trajectory(0, 0)
    student = trainer.accelerator.unwrap_model(trainer.student)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    latents = trajectory.latents.clone()

    # By hand: the teacher's embeddings straight from the teacher, both predictions straight from the transformer.
    transformer = trainer.frozen.transformer
    teacher_embeds = trainer.teacher(trajectory.input_ids)[0]
    torch.testing.assert_close(trajectory.teacher_embeds, teacher_embeds, rtol=0, atol=0)
    sigma, sigma_next = trainer.objective.sigmas[0], trainer.objective.sigmas[1]
    shared = dict(
        hidden_states=latents, timestep=(sigma * 1000).expand(len(latents)) / 1000, guidance=trajectory.guidance,
        pooled_projections=trajectory.pooled_embeds, txt_ids=torch.zeros(teacher_embeds.shape[1], 3),
        img_ids=trajectory.latent_ids, return_dict=False,
    )
    with torch.no_grad():
        teacher_pred = transformer(encoder_hidden_states=teacher_embeds, **shared)[0]
    student_pred = transformer(encoder_hidden_states=student(trajectory.input_ids)[0], **shared)[0]
    loss = F.mse_loss(student_pred, teacher_pred)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    clip = min(1.0, cfg.max_grad_norm / (norm.item() + 1e-6))
    # AdamW's first step: decoupled decay, then m_hat / (sqrt(v_hat) + eps) with m_hat = g, v_hat = g^2.
    expected = {}
    for (name, p), g in zip(student.named_parameters(), grads, strict=True):
        g = g * clip
        expected[name] = p.detach() * (1 - cfg.learning_rate * cfg.weight_decay) - cfg.learning_rate * g / (
            g.abs() + cfg.adam_epsilon
        )

    metrics = trainer.training_step([trajectory], 0)

    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.equal(p.detach(), before[name]) or before[name].abs().max() == 0
    # The latents advance with the teacher's prediction, by the scheduler's Euler step.
    torch.testing.assert_close(trajectory.latents, latents + (sigma_next - sigma) * teacher_pred)
    # Nothing but the student learns, and the transformer keeps no gradients.
    assert all(p.grad is None and not p.requires_grad for p in transformer.parameters())


def test_pooled_embeds_are_clips_by_default_and_zeros_on_request(trainer, make_pipe, tmp_path):
    pipe = make_pipe()
    trajectory = trainer.make_trajectory(3, 0)
    expected = pipe._get_clip_prompt_embeds(trajectory.prompts, device="cpu")
    torch.testing.assert_close(trajectory.pooled_embeds, expected, rtol=0, atol=0)
    zeroing = make_trainer(tmp_path, "zero_pooled_embeds=true")
    assert not zeroing.make_trajectory(3, 0).pooled_embeds.any()


def test_guidance_is_drawn_from_the_grid(trainer):
    values = torch.cat([trainer.make_trajectory(g, 0).guidance for g in range(8)]).tolist()
    assert set(values) <= set(trainer.config.guidance_scales) and len(set(values)) > 3


def test_teacher_runs_once_per_batch_not_per_timestep(tmp_path):
    trainer = make_trainer(tmp_path, "max_steps=8", "num_inference_steps=4", "checkpointing_steps=1000")
    calls = []
    trainer.teacher.register_forward_hook(lambda *args: calls.append(1))
    trainer.train()
    assert trainer.step == 8 and len(calls) == 2  # two batches of four timesteps each
