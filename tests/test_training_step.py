"""One training step of the trainer against a computation by hand, and the pieces it is made of."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flux_small_encoder.training import DistillationTrainer, NaiveDistillation, Trajectory, load_config, models
from flux_small_encoder.training.distill import flux_schedule


def tiny_config(tmp_path, *overrides):
    return load_config("tiny", [f"output_dir={tmp_path / 'run'}", "report_to=none", "num_eval_prompts=0",
                                "lr_scheduler=constant", "lr_warmup_steps=0", *overrides])


def make_trainer(tmp_path, *overrides, **models_handed_in) -> DistillationTrainer:
    trainer = DistillationTrainer(tiny_config(tmp_path, *overrides), **models_handed_in)
    trainer.setup()
    return trainer


def student_update(trainer: DistillationTrainer, trajectories: list[Trajectory]) -> tuple[float, dict]:
    """One `training_step` at the first timestep: its loss and how much each student weight moved."""
    student = trainer.accelerator.unwrap_model(trainer.student)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    loss = trainer.training_step(trajectories, 0)["loss"]
    return loss, {name: p.detach() - before[name] for name, p in student.named_parameters()}


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


def test_the_vae_scale_factor_is_the_one_flux_pipeline_computes(make_pipe):
    import json
    from importlib import resources

    pipe = make_pipe()
    assert models.vae_scale_factor(pipe.vae.config) == pipe.vae_scale_factor
    flux_dev = json.loads((resources.files("flux_small_encoder") / "data" / "flux1-dev.json").read_text())
    assert models.vae_scale_factor(flux_dev["components"]["vae"]["config"]) == 8


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


def test_two_micro_batches_of_four_make_the_update_of_one_batch_of_eight(tmp_path):
    # An epsilon far above every gradient turns AdamW's first step into plain SGD (lr * g / eps = 1000 g here), so
    # the update is proportional to the gradient: a wrongly scaled or partial accumulation shows.
    # One trainer after the other: accelerate's accumulation setting is per process.
    sgd = ["adam_epsilon=1e6", "learning_rate=1e9", "weight_decay=0", "max_grad_norm=0"]
    accumulated = make_trainer(tmp_path / "a", *sgd, "train_batch_size=4", "gradient_accumulation_steps=2")
    micro_batches = [accumulated.make_trajectory(0, 0), accumulated.make_trajectory(0, 1)]
    loss, update = student_update(accumulated, micro_batches)
    single = make_trainer(tmp_path / "b", *sgd, "train_batch_size=8")
    batch = single.make_trajectory(0, 0)
    assert [p for t in micro_batches for p in t.prompts] == batch.prompts
    expected_loss, expected_update = student_update(single, [batch])

    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert max(u.abs().max() for u in expected_update.values()) > 1e-3
    for name, value in expected_update.items():
        torch.testing.assert_close(update[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_naive_loss_is_the_mean_squared_difference_of_the_embeddings(tmp_path):
    teacher = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    student = torch.tensor([[[1.5, 2.0], [3.0, 2.0]]])
    trajectory = Trajectory(["p"], torch.zeros(1, 2), teacher, torch.zeros(1, 1), torch.zeros(1, 1, 1), None, None)
    objective = NaiveDistillation(nn.Identity(), torch.zeros(1), torch.zeros(2))
    assert objective(student, trajectory, 0)["loss"].item() == (0.5**2 + 0 + 0 + 2**2) / 4

    # In the trainer: the loss of a step is that of the student's and the teacher's own embeddings of the prompts.
    trainer = make_trainer(tmp_path, "objective=naive")
    trajectory = trainer.make_trajectory(0, 0)
    with torch.no_grad():
        student_embeds = trainer.accelerator.unwrap_model(trainer.student)(trajectory.input_ids)[0]
        teacher_embeds = trainer.teacher(trajectory.input_ids)[0]
    expected = (student_embeds - teacher_embeds).pow(2).sum().item() / teacher_embeds.numel()
    assert trainer.training_step([trajectory], 0)["loss"] == pytest.approx(expected, rel=1e-5)


def test_models_handed_in_are_the_ones_trained_and_nothing_is_loaded(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    tiny = models.model_source("tiny")
    frozen, teacher = tiny.frozen_parts(config, torch.float32), tiny.teacher(config, torch.float32)
    student = models.build_student(config, frozen.width)

    def refuse(*args):
        raise AssertionError("a model was loaded although one was handed in")

    monkeypatch.setitem(models.BUILT_IN_SOURCES, "tiny", models.ModelSource(refuse, refuse, refuse, refuse))
    trainer = make_trainer(tmp_path, frozen=frozen, teacher=teacher, student=student)

    assert trainer.frozen is frozen and trainer.teacher is teacher
    assert trainer.objective.transformer is frozen.transformer
    assert trainer.accelerator.unwrap_model(trainer.student) is student
    _, update = student_update(trainer, [trainer.make_trajectory(0, 0)])
    assert any(u.abs().max() > 0 for u in update.values())  # the student handed in is the one that learns


def test_a_teacher_and_a_teacher_cache_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        DistillationTrainer(tiny_config(tmp_path, f"teacher_cache={tmp_path}"), teacher=nn.Identity())


def test_the_lora_block_reaches_peft(tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    trainer = make_trainer(tmp_path, "student_init=t5", "lora={r: 4, use_dora: true, target_modules: [q, v]}")
    student = trainer.accelerator.unwrap_model(trainer.student)
    assert isinstance(student, PeftModel) and student.peft_config["default"].use_dora
    adapted = {name.rsplit(".", 1)[1]: module for name, module in student.named_modules()
               if isinstance(module, LoraLayer)}
    assert set(adapted) == {"q", "v"}
    assert all(module.r["default"] == 4 and "default" in module.lora_magnitude_vector for module in adapted.values())


# --- what the trainer is handed --------------------------------------------------------------------------------------


def _plain_t5():
    from transformers import T5EncoderModel

    from flux_small_encoder.tiny import tiny_t5_config

    return T5EncoderModel(tiny_t5_config())


@pytest.mark.parametrize(
    "handed_in, message",
    [({"config": None}, "config must be a TrainingConfig, got None: make one with load_config(NAME_OR_YAML)"),
     ({"config": "tiny"}, "config must be a TrainingConfig, got 'tiny': make one with load_config(NAME_OR_YAML)"),
     ({"student": _plain_t5}, "student must be a DistilledT5EncoderModel (a T5 encoder with its projector), got "
                              "T5EncoderModel: make one from a T5 encoder with DistilledT5EncoderModel."),
     ({"student": lambda: nn.Linear(4, 4)}, "student must be a DistilledT5EncoderModel (a T5 encoder with its "
                                            "projector), got Linear"),
     ({"frozen": object}, "frozen must be FrozenParts or a FLUX pipeline, got object: make FrozenParts("),
     ({"teacher": object}, "the teacher must be a T5 encoder (an nn.Module such as transformers' T5EncoderModel), "
                           "got object.")],
    ids=["config None", "config a name", "student a plain T5", "student a Linear", "frozen an object",
         "teacher an object"],
)
def test_models_of_the_wrong_kind_are_refused_when_the_trainer_is_made(tmp_path, handed_in, message):
    arguments = {"config": tiny_config(tmp_path)}
    arguments.update({key: value() if callable(value) else value for key, value in handed_in.items()})
    config = arguments.pop("config")
    with pytest.raises(TypeError) as error:
        DistillationTrainer(config, **arguments)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_student_of_another_width_is_refused_at_setup_and_lets_the_folder_go(tmp_path):
    from flux_small_encoder.tiny import tiny_student

    trainer = DistillationTrainer(tiny_config(tmp_path), student=tiny_student(project_out_dim=16))
    with pytest.raises(ValueError, match=re.escape("the student produces 16-wide embeddings but the transformer reads "
                                                   "32-wide ones: make its projector 32 wide (project_out_dim).")):
        trainer.setup()
    assert not (tmp_path / "run").exists()


def test_a_flux_pipeline_handed_in_gives_its_parts_and_its_t5_as_the_teacher(tmp_path, make_pipe, monkeypatch):
    pipe, student = make_pipe(), models.build_student(tiny_config(tmp_path), 32)

    def refuse(*args):
        raise AssertionError("a model was loaded although a pipeline was handed in")

    monkeypatch.setitem(models.BUILT_IN_SOURCES, "tiny", models.ModelSource(refuse, refuse, refuse, refuse))
    trainer = make_trainer(tmp_path, frozen=pipe, student=student)
    assert trainer.frozen.transformer is pipe.transformer and trainer.teacher is pipe.text_encoder_2
    assert trainer.frozen.vae_scale_factor == pipe.vae_scale_factor
    loss, _ = student_update(trainer, [trainer.make_trajectory(0, 0)])
    assert math.isfinite(loss)


def test_train_before_setup_says_to_call_setup(tmp_path):
    with pytest.raises(RuntimeError, match=re.escape("call setup() before train()")):
        DistillationTrainer(tiny_config(tmp_path)).train()
    DistillationTrainer(tiny_config(tmp_path)).cleanup()  # nothing to clean up: no error either
