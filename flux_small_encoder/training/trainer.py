"""The training loop: `setup`, `train`, `save_checkpoint`, `cleanup`, read top to bottom.

One batch of prompts gives `num_inference_steps` optimizer steps (one per timestep of the teacher's trajectory). Its
teacher embeddings are computed once (or read from the cache), not once per timestep. What a batch holds is in
`batch.py`, where the models come from in `models.py`, and what a checkpoint holds in `checkpointing.py`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..torch_utils import precision_dtype
from .accelerator import init_trackers, make_accelerator
from .attention import attention_kernels, describe_attention
from .batch import TrajectoryMaker, micro_batch_positions
from .cache import TeacherCache
from .checkpointing import (
    checkpoint_folder,
    find_resume_checkpoint,
    prune_checkpoints,
    restore,
    resume_changes,
    write_checkpoint,
    write_final,
)
from .config import TrainingConfig
from .data import PromptStream, load_prompts
from .distill import OBJECTIVES, Trajectory, flux_schedule
from .fingerprint import pipeline_fingerprint, teacher_identity
from .held_out import HeldOutEvaluation
from .model_checks import check_handed_in, check_student, check_teacher, check_teacher_source
from .models import (
    FrozenParts,
    add_lora,
    build_student,
    check_cached,
    load_frozen_parts,
    load_teacher,
    set_source_threads,
    teacher_name,
    transformer_width,
)
from .run_folder import (
    CONFIG_NAME,
    append_metrics,
    hold_run_folder,
    how_to_go_on,
    last_good_checkpoint,
    new_session,
    writing_into,
)
from .state import build_lr_scheduler


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DistillationTrainer:
    """Distil a small T5 encoder from FLUX's T5-XXL by vision-based distillation with step following.

    Args:
        config: The run's configuration (see `TrainingConfig`; `load_config` reads one).
        frozen: The frozen FLUX parts to use instead of loading `config.model`'s: `FrozenParts`, or a FLUX pipeline
            (whose `text_encoder_2` is then the teacher, unless one is handed in or `config.teacher_cache` is set).
        teacher: The teacher T5 encoder to use instead of loading one (not with `config.teacher_cache`).
        student: The `DistilledT5EncoderModel` to train instead of building one from `config.student`
            (`config.lora` still wraps it in adapters).

    Example:

    ```python
    >>> from flux_small_encoder.training import DistillationTrainer, load_config
    >>> trainer = DistillationTrainer(load_config("tiny", ["output_dir=/tmp/tiny-run"]))
    >>> trainer.setup()
    >>> final_folder = trainer.train()  # a save_pretrained folder; patch_encoder(pipe, final_folder) loads it
    >>> trainer.cleanup()
    ```
    """

    def __init__(
        self,
        config: TrainingConfig,
        *,
        frozen: FrozenParts | None = None,
        teacher: nn.Module | None = None,
        student: nn.Module | None = None,
    ):
        frozen, teacher = check_handed_in(config, frozen, teacher, student)
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.frozen, self.teacher, self.student = frozen, teacher, student
        self.accelerator, self.ready = None, False  # set up by setup()
        self.step = 0
        self.history: list[dict] = []  # the resumes so far, recorded in every checkpoint
        self.lineage: list[dict] = []  # the sessions that led here, this one last (see run_folder.py)
        self.progress = None

    # --- setup ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Take `output_dir` (before anything is written: a second run there is refused), then data, models and
        optimizer; the folder is let go again if any of them fails."""
        self.accelerator = make_accelerator(self.config)
        self.lock = hold_run_folder(self.accelerator, self.output_dir)
        self.threads = torch.get_num_threads()  # given back by cleanup()
        try:
            set_source_threads(self.config)
            self.setup_data()
            self.setup_models()
            self.setup_optimizer()
        except BaseException:
            self.cleanup()
            raise
        self.start_time, self.ready = time.perf_counter(), True

    def setup_data(self) -> None:
        """Read every prompt file and find the checkpoint to resume, checking what the config changes against it (a
        malformed file or a refused change fails before any model loads)."""
        train_prompts, self.eval_prompts = load_prompts(self.config)
        self.stream = PromptStream(train_prompts, seed=self.config.seed)
        self.resume = find_resume_checkpoint(self.config)
        self.changes = resume_changes(self.resume, self.config) if self.resume else {}
        self.model_fingerprint = pipeline_fingerprint(self.config.model, self.config.revision)

    def setup_models(self) -> None:
        """The frozen parts, the teacher (or its cache), the student and the objective: built unless handed in."""
        cfg, device = self.config, self.accelerator.device
        self.dtype = precision_dtype(cfg.mixed_precision)
        loads_teacher = self.teacher is None and not cfg.teacher_cache
        check_cached(cfg, frozen_parts=self.frozen is None, teacher=loads_teacher, student=self.student is None)
        if loads_teacher:  # from its files, before any weights load
            check_teacher_source(cfg, self.frozen.width if self.frozen is not None else transformer_width(cfg))
        if self.frozen is None:
            self.frozen = load_frozen_parts(cfg, self.dtype)
        self.frozen.freeze(device, self.dtype)
        if cfg.gradient_checkpointing:
            self.frozen.transformer.enable_gradient_checkpointing()

        if cfg.teacher_cache:
            teacher = TeacherCache(cfg.teacher_cache, teacher=teacher_identity(cfg))
            teacher.check_width(self.frozen.width)
        else:
            if loads_teacher:
                self.teacher = load_teacher(cfg, self.dtype)
            check_teacher(self.teacher, self.frozen.width, f"teacher {teacher_name(cfg)}" if loads_teacher
                          else "the teacher handed in")
            teacher = self.teacher.requires_grad_(False).eval().to(device, self.dtype)
        self.trajectories = TrajectoryMaker(cfg, self.frozen, teacher, device, self.dtype)
        if cfg.teacher_cache:  # every prompt must be cached: nothing is silently recomputed
            teacher.check_covers(self.stream.prompts + self.eval_prompts + cfg.validation_prompts,
                                 self.trajectories.tokenize)

        if self.student is None:
            self.student = build_student(cfg, self.frozen.width)
        check_student(self.student, self.frozen.width)
        if cfg.lora:
            self.student = add_lora(self.student, cfg.lora)
        self.student.train()

        # The schedule FluxPipeline samples with at this resolution, and the objective.
        _, height, width = self.trajectories.latent_shape
        timesteps, sigmas = flux_schedule(self.frozen.scheduler, cfg.num_inference_steps, height * width // 4)
        self.objective = OBJECTIVES[cfg.objective](self.frozen.transformer, timesteps, sigmas).to(device)
        # The held-out prompts, with their teacher embeddings computed once.
        self.held_out = HeldOutEvaluation(self.eval_prompts, self.trajectories, self.objective, cfg)
        # Validation images (main process only): the teacher's are made here, once.
        self.validator = None
        if cfg.validation_prompts and self.accelerator.is_main_process:
            from .validation import Validator

            with self.forward_context():
                self.validator = Validator(cfg, self.frozen, self.objective, self.trajectories.teacher_embeds,
                                           device, self.dtype)

    def setup_optimizer(self) -> None:
        """AdamW over the student's trainable parameters and its schedule, prepared; restored when resuming."""
        cfg = self.config
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            self.trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
        )
        self.student, self.optimizer = self.accelerator.prepare(self.student, optimizer)
        if self.resume is not None:  # restored; what it abandons is set aside, and it says so in one line
            self.step = self.resume.step
            self.history = restore(self.accelerator, self.resume, self.student, self.optimizer, cfg, self.changes)
        self.lineage = new_session(self.resume.lineage if self.resume else [], self.step)
        # The schedule steps once per optimizer step; a resumed run rebuilds it at its step, from its config.
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg, self.step)

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """What every forward pass of the run's models runs under: its precision (accelerate's autocast) and its
        attention kernels (`attention_backend`). A backward pass uses the kernels its forward pass chose."""
        with self.accelerator.autocast(), attention_kernels(self.config.attention_backend):
            yield

    # --- train ------------------------------------------------------------------------------------------------------

    def train(self) -> Path:
        """Train until `max_steps`; returns `output_dir/final`, a `save_pretrained` folder of the student.

        Interrupted (Ctrl-C), it says which checkpoint the run can resume from, and how, before the interrupt goes on.
        """
        from tqdm.auto import tqdm

        if not self.ready:
            raise RuntimeError("call setup() before train(): it takes output_dir and builds the models.")
        cfg = self.config
        with self.saying_how_to_go_on():
            # The run's record: its resolved config beside its outputs, and the trackers.
            if self.accelerator.is_main_process:
                with writing_into(self.output_dir, CONFIG_NAME):
                    cfg.save(self.output_dir)
            init_trackers(self.accelerator, cfg)
            progress = self.progress = tqdm(total=cfg.max_steps, initial=self.step, desc="distill",
                                            disable=not self.accelerator.is_local_main_process)
            if self.step == 0 and self.eval_prompts:
                self.log({"step": 0, **self.evaluate()})

            while self.step < cfg.max_steps:
                # A new batch: its prompts, teacher embeddings, noise and guidance, one trajectory per micro-batch.
                group, first = divmod(self.step, cfg.steps_per_batch)
                trajectories = [self.make_trajectory(group, micro) for micro in range(cfg.gradient_accumulation_steps)]
                # Resuming mid-trajectory: the teacher's path does not depend on the student, so it is replayed.
                with self.forward_context():
                    for trajectory in trajectories:
                        self.objective.follow_teacher(trajectory, first)

                for step_index in range(first, cfg.steps_per_batch):
                    # One optimizer step at this timestep; then the latents advance with the teacher's prediction.
                    metrics = self.training_step(trajectories, step_index)
                    self.step += 1
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.2e}")

                    if self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps:
                        metrics.update(self.evaluate())
                    if self.step % cfg.validation_steps == 0 or self.step == cfg.max_steps:
                        metrics.update(self.validate())
                    self.log(metrics)
                    if self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_steps:
                        self.save_checkpoint()
                    if self.step >= cfg.max_steps:
                        break

            progress.close()
            final = self.save_final()
            self.write_fidelity_report()
        return final

    @contextmanager
    def saying_how_to_go_on(self) -> Iterator[None]:
        """On Ctrl-C, close the progress bar and print the last good checkpoint and the resume command (main process),
        then let the interrupt go on."""
        try:
            yield
        except KeyboardInterrupt:
            if self.progress is not None:
                self.progress.close()
            if self.accelerator.is_main_process:
                print(f"interrupted at step {self.step}: {how_to_go_on(self.output_dir)}", file=sys.stderr, flush=True)
            raise

    def make_trajectory(self, group: int, micro: int) -> Trajectory:
        """The micro-batch `micro` of batch `group` on this process, at the start of its trajectory."""
        positions = micro_batch_positions(
            self.config, group, micro, self.accelerator.process_index, self.accelerator.num_processes
        )
        return self.trajectories.make_trajectory(self.stream.take(positions.start, len(positions)), positions)

    def training_step(self, trajectories: list[Trajectory], step_index: int) -> dict:
        """Forward and backward on every micro-batch at `step_index`, then one optimizer step on the student."""
        losses = []
        for trajectory in trajectories:
            # The attention kernels of a backward pass are those its forward pass chose.
            with self.accelerator.accumulate(self.student), self.forward_context():
                student_embeds = self.student(trajectory.input_ids, output_hidden_states=False)[0]
                outputs = self.objective(student_embeds, trajectory, step_index)
                self.accelerator.backward(outputs["loss"])
            trajectory.latents = outputs["next_latents"]
            losses.append(outputs["loss"].detach())

        loss = self.accelerator.reduce(torch.stack(losses).mean(), "mean").item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad()
            raise TrainingDivergedError(
                f"the loss is {loss} at step {self.step + 1}; training stopped before applying that update and "
                f"{last_good_checkpoint(self.output_dir)}. Lower learning_rate (now {self.config.learning_rate}), use "
                "lr_warmup_steps, or check the teacher embeddings."
            )
        lr = self.lr_scheduler.get_last_lr()[0]
        grad_norm = None
        if self.config.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        return {
            "step": self.step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "timestep_index": step_index,
            "epoch": (self.step // self.config.steps_per_batch + 1) * self._global_batch / len(self.stream),
            "elapsed_s": round(time.perf_counter() - self.start_time, 3),
            "attention_backend": describe_attention(self.config.attention_backend),
        }

    def evaluate(self) -> dict:
        """The student's errors on the held-out prompts (`held_out.py`): `eval_error`, `eval_relative_error` and
        `eval_embedding_error`."""
        with self.student_in_eval_mode() as student:
            return self.held_out(student, self.accelerator, self.forward_context)

    @torch.no_grad()
    def validate(self) -> dict:
        """Teacher and student images of the validation prompts (`validation.py`): a grid in
        `output_dir/validation/` and on TensorBoard; returns their mean `validation_psnr` and `validation_ssim`."""
        if self.validator is None:
            return {}
        with self.student_in_eval_mode() as student, self.forward_context():
            return self.validator(student, self.step, self.output_dir, self.accelerator.trackers)

    @torch.no_grad()
    def write_fidelity_report(self) -> None:
        """With validation on, the student's fidelity report on the held-out prompts, in `output_dir/fidelity/`."""
        if self.validator is not None and self.eval_prompts:
            with self.student_in_eval_mode() as student, self.forward_context():
                self.validator.write_fidelity_report(student, self.eval_prompts, self.output_dir)

    @contextmanager
    def student_in_eval_mode(self) -> Iterator[nn.Module]:
        """The unwrapped student in eval mode (no dropout), back in train mode afterwards."""
        student = self.accelerator.unwrap_model(self.student).eval()
        try:
            yield student
        finally:
            student.train()

    def log(self, metrics: dict) -> None:
        """Append one line to `metrics.jsonl`, naming this session (see run_folder.py), and send the numbers to the
        trackers (TensorBoard)."""
        if self.accelerator.is_main_process:
            append_metrics(self.output_dir, {**metrics, "session": self.lineage[-1]["session"]})
        numbers = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(numbers, step=metrics["step"])

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-STEP` (see `checkpointing.py`) atomically, then prune old checkpoints.

        None of the same step is there: those of other branches were set aside as the run started (`restore`).
        """
        folder = checkpoint_folder(self.output_dir, self.step)
        state = {"step": self.step, "lineage": self.lineage, "resumes": self.history,
                 "model_fingerprint": self.model_fingerprint}
        write_checkpoint(self.accelerator, folder, self.student, self.optimizer, self.config, state)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return folder

    def save_final(self) -> Path:
        """Write `output_dir/final`: the student's `save_pretrained` folder (plus `adapter/` with LoRA)."""
        return write_final(self.accelerator, self.output_dir, self.student, self.config)

    # --- cleanup ----------------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """End the trackers, free memory, restore torch's thread count and let `output_dir` go."""
        from diffusers.training_utils import free_memory

        if self.progress is not None:  # closed before an error is printed, not glued to the bar
            self.progress.close()
        if self.accelerator is None:  # never set up
            return
        self.ready = False
        self.accelerator.end_training()
        free_memory()
        torch.set_num_threads(self.threads)
        self.lock.release()

    # --- helpers ----------------------------------------------------------------------------------------------------

    @property
    def _global_batch(self) -> int:
        cfg = self.config
        return cfg.train_batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes


def train(config: TrainingConfig) -> Path:
    """Run a whole distillation: setup, train, cleanup. Returns `output_dir/final`."""
    trainer = DistillationTrainer(config)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
