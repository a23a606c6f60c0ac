"""A run's checkpoints: what one holds, writing its files, keeping the newest ones, and resuming from one.

    output_dir/checkpoint-STEP/
      student/             the student's save_pretrained folder, with its training_config.yaml
      adapter/             with LoRA: the peft adapter folder (student/ then holds the adapters merged in)
      state/               accelerate's save_state: student, optimizer, lr schedule, RNG states of every process
      config.yaml          the run's resolved configuration
      trainer_state.json   the step

The trainer writes each checkpoint into a staging folder that `atomic_folder` renames when complete; the barriers
between processes are the trainer's.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import yaml
from torch import nn

from ..atomic import remove, write_text_atomically
from .config import STUDENT_CONFIG_NAME, TrainingConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
# Fields that decide the prompts, noise, guidance and loss of each step.
RESUME_FIELDS = (
    "seed", "train_data", "train_batch_size", "gradient_accumulation_steps", "num_inference_steps", "resolution",
    "guidance_scales", "max_sequence_length", "objective", "zero_pooled_embeds", "model", "student", "lora",
)


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def save_student(student: nn.Module, folder: Path, config: TrainingConfig, adapter_folder: Path) -> None:
    """Write the student's `save_pretrained` folder with the run's `training_config.yaml` in it.

    With LoRA the adapters go to `adapter_folder` (a peft adapter folder) and `folder` gets the student with the
    adapters merged in, so that `patch_encoder(pipe, folder)` needs no peft.
    """
    if config.lora:
        student.save_pretrained(adapter_folder)
        student = copy.deepcopy(student).merge_and_unload()
    student.save_pretrained(folder)
    config.save(folder, STUDENT_CONFIG_NAME)


def write_checkpoint_files(folder: Path, student: nn.Module, config: TrainingConfig, step: int) -> None:
    """Everything of a checkpoint except accelerate's `state/`, which every process writes itself."""
    save_student(student, folder / "student", config, adapter_folder=folder / "adapter")
    config.save(folder)
    (folder / STATE_NAME).write_text(json.dumps({"step": step}))


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete all but the `limit` newest checkpoints (nothing without a limit)."""
    if limit:
        for old in list_checkpoints(output_dir)[:-limit]:
            remove(old)


def find_resume_checkpoint(config: TrainingConfig) -> Path | None:
    """The checkpoint `config.resume_from_checkpoint` names (`latest`: the newest in `output_dir`), or `None`.

    Raises:
        FileExistsError: `output_dir` holds checkpoints but the run does not resume (nothing is overwritten).
        FileNotFoundError: There is no such checkpoint.
    """
    output_dir, choice = Path(config.output_dir), config.resume_from_checkpoint
    if choice is None:
        if list_checkpoints(output_dir):
            raise FileExistsError(
                f"{output_dir} holds checkpoints of an earlier run: continue it with resume_from_checkpoint=latest, "
                "or give a new output_dir (nothing was overwritten)."
            )
        return None
    path = Path(choice)
    if choice == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest: no checkpoint in {output_dir}.")
        path = found[-1]
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint of this trainer (no {STATE_NAME}).")
    return path


def load_checkpoint(accelerator, path: Path, config: TrainingConfig) -> int:
    """Restore accelerate's state (student, optimizer, schedule, RNG) from a checkpoint; returns its step.

    Warns when the checkpoint's run differs in a field that decides the prompts, noise or loss of a step: the run
    continues, but not as the interrupted one would have.
    """
    accelerator.load_state(str(path / "state"))
    saved_config = path / "config.yaml"
    if saved_config.is_file():
        saved, current = yaml.safe_load(saved_config.read_text()), config.to_dict()
        changed = sorted(key for key in RESUME_FIELDS if key in saved and saved[key] != current[key])
        if changed:
            logger.warning(f"resuming {path} with other values of {changed}: the run continues, but not as the "
                           "interrupted one would have.")
    return json.loads((path / STATE_NAME).read_text())["step"]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines after `step` that an interrupted run logged past its last checkpoint (the resumed run logs
    those steps again)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text_atomically(path, "".join(line + "\n" for line in kept))
