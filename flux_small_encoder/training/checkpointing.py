"""A run's checkpoints: what one holds, writing its files, keeping the newest ones, and which one a run resumes from.

    output_dir/checkpoint-STEP/
      student/             the student's save_pretrained folder, with its training_config.yaml
      adapter/             with LoRA: the peft adapter folder (student/ then holds the adapters merged in)
      state/               student, optimizer and random generator states, without pickle (see state.py)
      config.yaml          the run's resolved configuration
      trainer_state.json   the step, the lineage (see run_folder.py), the resumes so far (from which checkpoint, what
                           changed) and the fingerprint of the pipeline's weights

`write_checkpoint` has the main process write each checkpoint into a folder that `atomic_folder` renames when
complete, with the generator states the other processes send it: they write nothing, so writing needs no shared
filesystem (resuming does: every process reads the checkpoint). If the main process fails, every process raises its
error.

What a resumed run may change, field by field (`resume_changes`):

- refused (`REFUSED_ON_RESUME`): `model`, `student`, `student_init`, `lora`. The checkpoint's student and optimizer
  state belong to them; to continue its weights under other ones, start a new run from its `student/` folder with
  `student_init=distilled`. A `model` folder that moved is the same model when its weights are (`fingerprint.py`).
- applied (`APPLIED_ON_RESUME`): the optimizer's and the schedule's hyper-parameters, `max_steps`, `max_grad_norm`.
  The resumed run uses the new values from its first step on and says so in one line.
- warned (`DIVERGING_ON_RESUME`): what decides the prompts, noise, guidance and loss of each step. The run continues,
  but not as the interrupted one would have.
- anything else (outputs, evaluation, logging, checkpointing) changes freely.

`config.yaml` holds the values a run used from its last start on; each checkpoint's `trainer_state.json` lists the
resumes before it with the values they changed.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..atomic import atomic_folder, remove
from ..provenance import TRAINING_CONFIG_NAME
from .config import TrainingConfig
from .config_checks import read_yaml
from .files import DamagedFileError
from .fingerprint import pipeline_fingerprint
from .run_folder import (
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    FINAL_NAME,
    STATE_NAME,
    checkpoint_step,
    earlier_run,
    list_checkpoints,
    read_trainer_state,
    start_run_folder,
    writing_into,
)
from .state import (
    apply_optimizer_config,
    check_training_state,
    load_training_state,
    refuse_pickles,
    rng_state,
    save_rng_states,
    save_training_state,
)

logger = logging.getLogger(__name__)

REFUSED_ON_RESUME = ("model", "student", "student_init", "lora")
APPLIED_ON_RESUME = (
    "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "lr_scheduler", "lr_warmup_steps",
    "max_steps", "max_grad_norm",
)
DIVERGING_ON_RESUME = (
    "seed", "train_data", "train_batch_size", "gradient_accumulation_steps", "num_inference_steps", "resolution",
    "guidance_scales", "max_sequence_length", "objective", "zero_pooled_embeds", "projector_dropout", "teacher",
    "revision", "mixed_precision",
)


@dataclass
class Resume:
    """The checkpoint a run resumes from, and why that one.

    Args:
        path: The checkpoint folder.
        step: Its step.
        reason: Why it was picked, for the line the run prints.
        history: The resumes recorded in its `trainer_state.json`.
        lineage: The sessions that led to it (see `run_folder.new_session`).
        model_fingerprint: The fingerprint of the pipeline it was trained against, if its weights were local.
        config: The configuration it was written with (its `config.yaml`), if it has one.
    """

    path: Path
    step: int
    reason: str
    history: list[dict] = field(default_factory=list)
    lineage: list[dict] = field(default_factory=list)
    model_fingerprint: str | None = None
    config: dict | None = None


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def save_student(student: nn.Module, folder: Path, config: TrainingConfig, adapter_folder: Path) -> None:
    """Write the student's `save_pretrained` folder with the run's `training_config.yaml` in it.

    With LoRA the adapters go to `adapter_folder` (a peft adapter folder) and `folder` gets the student with the
    adapters merged in, so that `patch_encoder(pipe, folder)` needs no peft.
    """
    if config.lora:
        student.save_pretrained(adapter_folder)
        student = copy.deepcopy(student).merge_and_unload()
    student.save_pretrained(folder)
    config.save(folder, TRAINING_CONFIG_NAME)


def write_checkpoint(
    accelerator, folder: Path, student: nn.Module, optimizer, config: TrainingConfig, state: dict
) -> None:
    """Write the checkpoint `folder` atomically, every process's generator states included (a collective call).

    The main process writes everything; the others send it their generator states. If the main process fails (a
    full disk: `DiskFullError`), every process raises its error, so none waits for the others.

    Args:
        accelerator: The run's `Accelerator`.
        folder: `output_dir/checkpoint-STEP`; one of the same step is replaced once the new one is complete.
        student: The prepared student.
        optimizer: The prepared optimizer.
        config: The run's configuration.
        state: What `trainer_state.json` records: `step`, `lineage`, `resumes`, `model_fingerprint`.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    rng_states, error = gather_object([rng_state()]), None
    if accelerator.is_main_process:
        try:
            with writing_into(folder.parent, folder.name), atomic_folder(folder, replace=True) as staging:
                student = accelerator.unwrap_model(student)
                save_rng_states(staging / "state", rng_states)
                save_training_state(staging / "state", student, optimizer)
                save_student(student, staging / "student", config, adapter_folder=staging / "adapter")
                config.save(staging)
                (staging / STATE_NAME).write_text(json.dumps(state, indent=2))
        except Exception as failure:
            error = failure
    shared = broadcast_object_list([None if error is None else _portable(error)])[0]
    if error is not None:
        raise error
    if shared is not None:
        raise shared


def _portable(error: Exception) -> Exception:
    """`error` as the other processes will receive it (torch.distributed pickles the objects it sends): itself, or a
    `RuntimeError` with its message when it does not survive the trip."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def write_final(accelerator, output_dir: Path, student: nn.Module, config: TrainingConfig) -> Path:
    """Write `output_dir/final`, the student's `save_pretrained` folder (see `save_student`), atomically (main
    process; a collective call); returns it."""
    final = Path(output_dir) / FINAL_NAME
    if accelerator.is_main_process:
        with writing_into(output_dir, f"{FINAL_NAME}/"), atomic_folder(final, replace=True) as staging:
            save_student(accelerator.unwrap_model(student), staging, config, adapter_folder=staging / "adapter")
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete all but the `limit` newest checkpoints (nothing without a limit)."""
    if limit:
        for old in list_checkpoints(output_dir)[:-limit]:
            remove(old)


def find_resume_checkpoint(config: TrainingConfig) -> Resume | None:
    """The checkpoint `config.resume_from_checkpoint` names (`latest`: the newest in `output_dir`), or `None`.

    Raises:
        FileExistsError: The run does not resume, and `output_dir` holds what an earlier run left (checkpoints,
            `final/`, `metrics.jsonl` or `config.yaml`): nothing is overwritten.
        FileNotFoundError: There is no such checkpoint.
        ValueError: The checkpoint carries a pickle (see `state.refuse_pickles`).
        DamagedFileError: A file of the checkpoint is damaged (`check_checkpoint`); the message names it and the
            previous good checkpoint.
    """
    output_dir, choice = Path(config.output_dir), config.resume_from_checkpoint
    if choice is None:
        found = earlier_run(output_dir)
        if found and list_checkpoints(output_dir):
            raise FileExistsError(f"{output_dir} holds an earlier run ({', '.join(found)}): continue it with "
                                  "resume_from_checkpoint=latest, or give a new output_dir (nothing was overwritten).")
        if found:
            raise FileExistsError(f"{output_dir} holds an earlier run ({', '.join(found)}) with no checkpoint to "
                                  "continue from: give a new output_dir, or move those out of it to start afresh "
                                  "there (nothing was overwritten).")
        return None
    if choice == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest: no checkpoint in {output_dir}.")
        path, reason = found[-1], "resume_from_checkpoint=latest: the newest in output_dir"
    else:
        path, reason = Path(choice), "resume_from_checkpoint names it"
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint of this trainer (no {STATE_NAME}).")
    refuse_pickles(path)
    try:
        state, saved_config = check_checkpoint(path)
    except DamagedFileError as error:
        raise DamagedFileError(f"{error} {_previous_good(path)}") from None
    return Resume(path, state["step"], reason, state["resumes"], state["lineage"], state.get("model_fingerprint"),
                  saved_config)


def check_checkpoint(path: Path) -> tuple[dict, dict | None]:
    """A checkpoint's `trainer_state.json` and `config.yaml` (if any), once every file a resume reads from it is
    checked (`run_folder.read_trainer_state`, `state.check_training_state`): a damaged one fails here, naming the
    file, before any model loads.

    Raises:
        DamagedFileError: A file of the checkpoint is missing, truncated or malformed.
    """
    state = read_trainer_state(path)
    check_training_state(path / "state")
    saved_path = path / CONFIG_NAME
    if not saved_path.is_file():
        return state, None
    try:
        saved = read_yaml(saved_path)
    except ValueError as error:  # the message names the file, line and column
        raise DamagedFileError(f"{error} The checkpoint {path} cannot be resumed.") from None
    if not isinstance(saved, dict):
        raise DamagedFileError(f"{saved_path} is damaged (not a mapping of config fields): the checkpoint {path} "
                               "cannot be resumed.")
    return state, saved


def _previous_good(path: Path) -> str:
    """The sentence naming the newest whole checkpoint before `path` in its folder, to resume from instead."""
    step = checkpoint_step(path)
    if step is not None:
        for earlier in reversed(list_checkpoints(path.parent)):
            if checkpoint_step(earlier) >= step:
                continue
            try:
                refuse_pickles(earlier)
                check_checkpoint(earlier)
            except ValueError:
                continue
            return (f"The previous good checkpoint is {earlier}: resume from it with "
                    f"resume_from_checkpoint={earlier} (nothing was changed).")
    return f"No earlier checkpoint in {path.parent} is whole (nothing was changed)."


def resume_changes(resume: Resume, config: TrainingConfig) -> dict[str, list]:
    """Check what `config` changes against the checkpoint's run; returns the applied changes, `{field: [old, new]}`.

    Raises:
        ValueError: A refused field changed, or `max_steps` is below the checkpoint's step (nothing was changed).
    """
    if config.max_steps < resume.step:
        raise ValueError(
            f"{resume.path} is at step {resume.step}, past max_steps={config.max_steps}: raise max_steps to continue "
            "it, or resume from an earlier checkpoint (nothing was changed)."
        )
    if resume.config is None:
        return {}
    saved, current = resume.config, config.to_dict()
    changed = {key: [saved[key], current[key]] for key in current if key in saved and saved[key] != current[key]}
    if "model" in changed and resume.model_fingerprint is not None and (
        resume.model_fingerprint == pipeline_fingerprint(config.model, config.revision)
    ):
        del changed["model"]  # the same weights elsewhere: a moved folder, or a local copy of the Hub repo
    refused = [key for key in REFUSED_ON_RESUME if key in changed]
    if refused:
        key = refused[0]
        raise ValueError(
            f"{resume.path} was trained with {key}={changed[key][0]!r}, this run has {key}={changed[key][1]!r}: a run "
            f"resumes only with the same {', '.join(REFUSED_ON_RESUME)}. To continue its weights with other ones, "
            f"start a new run with student_init=distilled student={resume.path / 'student'} (nothing was changed)."
        )
    diverging = sorted(key for key in DIVERGING_ON_RESUME if key in changed)
    if diverging:
        logger.warning(f"resuming {resume.path} with other values of {diverging}: the run continues, but not as the "
                       "interrupted one would have.")
    return {key: changed[key] for key in APPLIED_ON_RESUME if key in changed}


def restore(accelerator, resume: Resume, student: nn.Module, optimizer, config: TrainingConfig,
            changes: dict[str, list]) -> list[dict]:
    """Restore a checkpoint into the prepared student and optimizer (whose hyper-parameters then follow `config`),
    set aside what it abandons (main process), and print which checkpoint it was, why, and what changed.

    Returns:
        The run's resumes so far, this one last, for the checkpoints it writes.
    """
    try:
        load_training_state(resume.path / "state", accelerator.unwrap_model(student), optimizer,
                            accelerator.process_index)
    except DamagedFileError as error:
        raise DamagedFileError(f"{error} {_previous_good(resume.path)}") from None
    apply_optimizer_config(optimizer, config)
    aside = None
    if accelerator.is_main_process:
        aside = start_run_folder(Path(config.output_dir), resume.path, resume.step, resume.lineage)
    accelerator.wait_for_everyone()
    accelerator.print(_resume_message(resume, changes, aside, config.max_steps))
    return [*resume.history, {"from": str(resume.path), "step": resume.step, "changed": changes}]


def _resume_message(resume: Resume, changes: dict[str, list], aside: Path | None, max_steps: int) -> str:
    """The one line a resumed run prints: which checkpoint and why, what it set aside, what it changed."""
    line = f"resuming from {resume.path} at step {resume.step} ({resume.reason})"
    if aside is not None:
        line += f"; the checkpoints it abandons are kept in {aside}"
    if changes:
        changed = ", ".join(f"{key}={new!r} (was {old!r})" for key, (old, new) in changes.items())
        line += f"; applied from step {resume.step + 1} on: {changed}"
    if resume.step == max_steps:
        line += "; it is at max_steps already: only final/ is written"
    return line
