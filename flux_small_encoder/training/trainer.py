"""The training loop: `setup`, `train`, `save_checkpoint`, `cleanup`, read top to bottom.

One batch of prompts gives `num_inference_steps` optimizer steps (one per timestep of the teacher's trajectory). Its
teacher embeddings are computed once (or read from the cache), not once per timestep.

Everything random is a function of `(seed, position)`: the prompts at a position of the stream, the noise and the
guidance of each prompt. So a resumed run continues bit for bit, and N processes see the prompts and noise that one
process with an N times larger batch would.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from ..private_api import latent_image_ids, pack_latents, reset_accelerate_state
from ..torch_utils import precision_dtype
from .cache import TeacherCache
from .config import TrainingConfig
from .data import PromptStream, load_sources, sample_prompts, split_eval
from .distill import NaiveDistillation, Trajectory, VisionDistillation, flux_schedule
from .models import (
    add_lora,
    build_student,
    clip_pooled_embeds,
    load_frozen_parts,
    load_teacher,
    teacher_name,
    tokenize_t5,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Fields that decide the prompts, noise, guidance and loss of each step.
_RESUME_FIELDS = (
    "seed", "train_data", "train_batch_size", "gradient_accumulation_steps", "num_inference_steps", "resolution",
    "guidance_scales", "max_sequence_length", "objective", "zero_pooled_embeds", "model", "student",
)
METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.json"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DistillationTrainer:
    """Distil a small T5 encoder from FLUX's T5-XXL by vision-based distillation with step following.

    Args:
        config: The run's configuration (see `TrainingConfig`).

    Example:

    ```python
    >>> from flux_small_encoder.training import DistillationTrainer, load_config
    >>> trainer = DistillationTrainer(load_config("tiny", ["output_dir=/tmp/tiny-run"]))
    >>> trainer.setup()
    >>> final_folder = trainer.train()  # a save_pretrained folder; patch_encoder(pipe, final_folder) loads it
    >>> trainer.cleanup()
    ```
    """

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.step = 0

    # --- setup ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        cfg = self.config
        # accelerate keeps its state per process; a second run in one process (a notebook, the tests) may use
        # another precision or accumulation.
        reset_accelerate_state()
        # Under torchrun on a machine without GPUs, accelerate only forms a (gloo) process group when told `cpu`.
        no_gpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            cpu=no_gpu_ddp,
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=self._trackers() or None,
            project_dir=str(self.output_dir),
        )
        set_seed(cfg.seed)
        self.dtype = precision_dtype(cfg.mixed_precision)

        # Data first: a malformed prompt file fails before any model is loaded.
        train_prompts = load_sources(cfg.train_data, seed=cfg.seed)
        if cfg.eval_data:
            eval_prompts = sample_prompts(load_sources(cfg.eval_data, seed=cfg.seed), cfg.num_eval_prompts, cfg.seed)
        elif cfg.num_eval_prompts:
            train_prompts, eval_prompts = split_eval(train_prompts, cfg.num_eval_prompts, seed=cfg.seed)
        else:
            eval_prompts = []
        self.stream = PromptStream(train_prompts, seed=cfg.seed)
        self.eval_prompts = eval_prompts
        resume_path = self._find_resume_checkpoint()

        # Frozen parts, teacher (or its cache) and student.
        device = self.accelerator.device
        self.frozen = load_frozen_parts(cfg, self.dtype)
        self.frozen.transformer.to(device)
        self.frozen.text_encoder.to(device)
        if cfg.gradient_checkpointing:
            self.frozen.transformer.enable_gradient_checkpointing()
        if cfg.teacher_cache:
            self.teacher = None
            self.cache = TeacherCache(cfg.teacher_cache, teacher=teacher_name(cfg))
            self._check_cache_covers(train_prompts + eval_prompts)
        else:
            self.cache = None
            self.teacher = load_teacher(cfg, self.dtype).to(device)
        student = build_student(cfg, self.frozen.width)
        if cfg.lora_rank:
            student = add_lora(student, cfg)
        student.train()

        # The schedule FluxPipeline samples with at this resolution, and the objective.
        height = 2 * (cfg.resolution // (self.frozen.vae_scale_factor * 2))
        self.latent_shape = (self.frozen.transformer.config.in_channels // 4, height, height)
        timesteps, sigmas = flux_schedule(self.frozen.scheduler, cfg.num_inference_steps, (height // 2) ** 2)
        objective_cls = VisionDistillation if cfg.objective == "vision" else NaiveDistillation
        self.objective = objective_cls(self.frozen.transformer, timesteps, sigmas).to(device)

        # Optimizer over the student's trainable parameters only; the schedule steps once per optimizer step.
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            self.trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
        )
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_steps,
        )
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        self.accelerator.register_for_checkpointing(self.lr_scheduler)

        # Held-out teacher embeddings, computed once.
        self.eval_teacher_embeds = self._teacher_embeds(self._tokenize(eval_prompts)).cpu() if eval_prompts else None

        if resume_path is not None:
            self._resume(resume_path)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir)
        if self.accelerator.trackers == [] and self._trackers():
            self.accelerator.init_trackers("tensorboard", config=_flat(cfg.to_dict()))
        self.start_time = time.perf_counter()

    # --- train ------------------------------------------------------------------------------------------------------

    def train(self) -> Path:
        """Train until `max_steps`; returns `output_dir/final`, a `save_pretrained` folder of the student."""
        from tqdm.auto import tqdm

        cfg = self.config
        steps_per_batch = cfg.steps_per_batch
        progress = tqdm(
            total=cfg.max_steps, initial=self.step, desc="distill", disable=not self.accelerator.is_local_main_process
        )
        if self.step == 0 and self.eval_prompts:
            self.log({"step": 0, **self.evaluate()})

        while self.step < cfg.max_steps:
            # A new batch: its prompts, teacher embeddings, noise and guidance, one trajectory per micro-batch.
            group = self.step // steps_per_batch
            trajectories = [self.make_trajectory(group, j) for j in range(cfg.gradient_accumulation_steps)]
            first = self.step % steps_per_batch
            # Resuming mid-trajectory: the teacher's path does not depend on the student, so it is replayed.
            self._replay(trajectories, first)

            for step_index in range(first, steps_per_batch):
                # One optimizer step at this timestep; then the latents advance with the teacher's prediction.
                metrics = self.training_step(trajectories, step_index)
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.2e}")

                if self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps:
                    metrics.update(self.evaluate())
                self.log(metrics)
                if self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
                if self.step >= cfg.max_steps:
                    break

        progress.close()
        return self.save_final()

    def make_trajectory(self, group: int, micro: int) -> Trajectory:
        """The micro-batch `micro` of batch `group` on this process, at the start of its trajectory."""
        cfg = self.config
        size = cfg.train_batch_size
        start = ((group * cfg.gradient_accumulation_steps + micro) * self.accelerator.num_processes
                 + self.accelerator.process_index) * size
        prompts = self.stream.take(start, size)
        return self._trajectory(prompts, list(range(start, start + size)), guidance=None)

    def training_step(self, trajectories: list[Trajectory], step_index: int) -> dict:
        """Forward and backward on every micro-batch at `step_index`, then one optimizer step on the student."""
        losses = []
        for trajectory in trajectories:
            with self.accelerator.accumulate(self.student), self.accelerator.autocast():
                student_embeds = self.student(trajectory.input_ids, output_hidden_states=False)[0]
                outputs = self.objective(student_embeds, trajectory, step_index)
                self.accelerator.backward(outputs["loss"])
            trajectory.latents = outputs["next_latents"]
            losses.append(outputs["loss"].detach())

        loss = self.accelerator.reduce(torch.stack(losses).mean(), "mean").item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad()
            last = self._checkpoints()[-1] if self._checkpoints() else None
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDivergedError(
                f"the loss is {loss} at step {self.step + 1}; training stopped before applying that update and "
                f"{kept}. Lower learning_rate (now {self.config.learning_rate}), use lr_warmup_steps, or check the "
                "teacher embeddings."
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
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Student-vs-teacher prediction error along the teacher's trajectory on the held-out prompts.

        Returns `eval_error` (MSE between the transformer's predictions with student and with teacher embeddings,
        averaged over timesteps and prompts), `eval_relative_error` (the same over the teacher prediction's mean
        square) and `eval_embedding_error` (MSE between the embeddings themselves).
        """
        if not self.eval_prompts:
            return {}
        cfg = self.config
        student = self.accelerator.unwrap_model(self.student)
        student.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        totals = torch.zeros(4, device=self.accelerator.device, dtype=torch.float64)
        mine = list(range(rank, len(self.eval_prompts), world))
        for start in range(0, len(mine), cfg.train_batch_size):
            indices = mine[start : start + cfg.train_batch_size]
            trajectory = self._trajectory(
                [self.eval_prompts[i] for i in indices], indices, guidance=cfg.eval_guidance_scale,
                teacher_embeds=self.eval_teacher_embeds[indices], eval_noise=True,
            )
            with self.accelerator.autocast():
                student_embeds = student(trajectory.input_ids, output_hidden_states=False)[0]
            totals[2] += _per_sample_mse(student_embeds, trajectory.teacher_embeds).sum()
            for step_index in range(cfg.num_inference_steps):
                teacher_pred = self.objective.predict(trajectory, trajectory.teacher_embeds, step_index)
                student_pred = self.objective.predict(trajectory, student_embeds, step_index)
                error = _per_sample_mse(student_pred, teacher_pred)
                totals[0] += error.sum() / cfg.num_inference_steps
                totals[1] += (error / teacher_pred.float().pow(2).flatten(1).mean(1)).sum() / cfg.num_inference_steps
                trajectory.latents = self.objective.advance(trajectory, teacher_pred, step_index)
            totals[3] += len(indices)
        totals = self.accelerator.reduce(totals, "sum")
        student.train()
        count = totals[3].item()
        return {
            "eval_error": totals[0].item() / count,
            "eval_relative_error": totals[1].item() / count,
            "eval_embedding_error": totals[2].item() / count,
        }

    def log(self, metrics: dict) -> None:
        """Append one line to `metrics.jsonl` and send the numbers to the trackers (TensorBoard)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS_NAME, "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        numbers = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(numbers, step=metrics["step"])

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-STEP` atomically: into a temporary folder, renamed when complete.

        It holds `student/` (a `save_pretrained` folder that `patch_encoder` loads), `adapter/` with LoRA (a peft
        adapter folder), `state/` (accelerate's optimizer, scheduler and RNG states) and `trainer_state.json`.
        """
        folder = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        staging = self.output_dir / f".{folder.name}.tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging / "state"))
        if self.accelerator.is_main_process:
            self._save_student(staging)
            self.config.save(staging)
            (staging / STATE_NAME).write_text(json.dumps({"step": self.step}))
            if folder.exists():  # a checkpoint of an abandoned run at the same step
                shutil.rmtree(folder)
            staging.rename(folder)
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        return folder

    def save_final(self) -> Path:
        """Write `output_dir/final`: the student's `save_pretrained` folder (plus `adapter/` with LoRA)."""
        final = self.output_dir / "final"
        if self.accelerator.is_main_process:
            staging = self.output_dir / ".final.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            self._save_student(staging, student_folder=staging)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        self.accelerator.wait_for_everyone()
        return final

    def _save_student(self, folder: Path, student_folder: Path | None = None) -> None:
        student = self.accelerator.unwrap_model(self.student)
        if self.config.lora_rank:
            student.save_pretrained(folder / "adapter")
            student = copy.deepcopy(student).merge_and_unload()
        student.save_pretrained(student_folder or folder / "student")

    def _checkpoints(self) -> list[Path]:
        found = [p for p in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_NAME).is_file()]
        return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))

    def _prune_checkpoints(self) -> None:
        limit = self.config.checkpoints_total_limit
        if limit:
            for old in self._checkpoints()[:-limit]:
                shutil.rmtree(old)

    def _find_resume_checkpoint(self) -> Path | None:
        choice = self.config.resume_from_checkpoint
        if choice is None:
            if self.output_dir.is_dir() and self._checkpoints():
                raise FileExistsError(
                    f"{self.output_dir} holds checkpoints of an earlier run: continue it with "
                    "resume_from_checkpoint=latest, or give a new output_dir (nothing was overwritten)."
                )
            return None
        path = Path(choice)
        if choice == "latest":
            found = self._checkpoints() if self.output_dir.is_dir() else []
            if not found:
                raise FileNotFoundError(f"resume_from_checkpoint=latest: no checkpoint in {self.output_dir}.")
            path = found[-1]
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint of this trainer (no {STATE_NAME}).")
        return path

    def _resume(self, path: Path) -> None:
        self.accelerator.load_state(str(path / "state"))
        self.step = json.loads((path / STATE_NAME).read_text())["step"]
        if (path / "config.yaml").is_file():
            # Resuming continues exactly only if the data order, noise and objective are the same.
            saved = yaml.safe_load((path / "config.yaml").read_text())
            changed = sorted(k for k in _RESUME_FIELDS if saved.get(k) != self.config.to_dict().get(k))
            if changed:
                logger.warning(f"resuming {path} with other values of {changed}: the run continues, but not as "
                               "the interrupted one would have.")
        # Metrics logged after the checkpoint by the interrupted run are dropped: this run logs those steps again.
        metrics = self.output_dir / METRICS_NAME
        if self.accelerator.is_main_process and metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    # --- cleanup ----------------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        self.accelerator.end_training()
        from diffusers.training_utils import free_memory

        free_memory()

    # --- helpers ----------------------------------------------------------------------------------------------------

    @property
    def _global_batch(self) -> int:
        cfg = self.config
        return cfg.train_batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes

    def _trackers(self) -> list[str]:
        if self.config.report_to == "none":
            return []
        from accelerate.utils import is_tensorboard_available

        if self.config.report_to == "tensorboard" and not is_tensorboard_available():
            raise ImportError("report_to=tensorboard needs TensorBoard: pip install tensorboard (or report_to=none).")
        return ["tensorboard"] if is_tensorboard_available() else []

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize_t5(self.frozen.tokenizer_2, prompts, self.config.max_sequence_length)

    @torch.no_grad()
    def _teacher_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        device = self.accelerator.device
        if self.cache is not None:
            return self.cache(input_ids).to(device, self.dtype)
        embeds = []
        for chunk in input_ids.split(self.config.train_batch_size):
            embeds.append(self.teacher(chunk.to(device), output_hidden_states=False)[0])
        return torch.cat(embeds).to(self.dtype)

    def _trajectory(
        self, prompts: list[str], positions: list[int], guidance: float | None,
        teacher_embeds: torch.Tensor | None = None, eval_noise: bool = False,
    ) -> Trajectory:
        """Tokens, teacher embeddings, pooled embeddings, noise and guidance for prompts at these positions."""
        cfg, device = self.config, self.accelerator.device
        input_ids = self._tokenize(prompts)
        if teacher_embeds is None:
            teacher_embeds = self._teacher_embeds(input_ids)
        if cfg.zero_pooled_embeds:
            pooled = torch.zeros(len(prompts), self.frozen.transformer.config.pooled_projection_dim)
        else:
            pooled = clip_pooled_embeds(self.frozen.text_encoder, self.frozen.tokenizer, prompts)
        channels, height, width = self.latent_shape
        noise, scales = [], []
        for position in positions:
            # Each prompt's noise and guidance depend on (seed, position) only.
            generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + position) * 2 + int(eval_noise))
            noise.append(torch.randn(self.latent_shape, generator=generator))
            index = torch.randint(len(cfg.guidance_scales), (1,), generator=generator).item()
            scales.append(cfg.guidance_scales[index] if guidance is None else guidance)
        latents = pack_latents(torch.stack(noise), len(prompts), channels, height, width)
        latent_ids = latent_image_ids(len(prompts), height // 2, width // 2, device, self.dtype)
        has_guidance = self.frozen.transformer.config.guidance_embeds
        return Trajectory(
            prompts=prompts,
            input_ids=input_ids.to(device),
            teacher_embeds=teacher_embeds.to(device, self.dtype),
            pooled_embeds=pooled.to(device, self.dtype),
            latents=latents.to(device, self.dtype),
            latent_ids=latent_ids,
            guidance=torch.tensor(scales, device=device, dtype=torch.float32) if has_guidance else None,
        )

    @torch.no_grad()
    def _replay(self, trajectories: list[Trajectory], steps: int) -> None:
        with self.accelerator.autocast():
            for step_index in range(steps):
                for trajectory in trajectories:
                    teacher_pred = self.objective.predict(trajectory, trajectory.teacher_embeds, step_index)
                    trajectory.latents = self.objective.advance(trajectory, teacher_pred, step_index)

    def _check_cache_covers(self, prompts: list[str]) -> None:
        distinct = list(dict.fromkeys(prompts))
        missing = [p for p, ids in zip(distinct, self._tokenize(distinct), strict=True) if ids not in self.cache]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(distinct)} prompts are not in the teacher cache {self.config.teacher_cache} "
                f"(first: {missing[0]!r}): write the cache with the same config (`flux-small-encoder cache-teacher`)."
            )


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).double()


def _flat(values: dict) -> dict:
    """Config values TensorBoard's hparams accept (numbers, strings, booleans)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def train(config: TrainingConfig) -> Path:
    """Run a whole distillation: setup, train, cleanup. Returns `output_dir/final`."""
    trainer = DistillationTrainer(config)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
