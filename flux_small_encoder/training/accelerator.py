"""The run's `Accelerator`: processes, precision, gradient accumulation and trackers."""

from __future__ import annotations

import os

import torch

from ..private_api import reset_accelerate_state
from .config import TrainingConfig


def make_accelerator(config: TrainingConfig):
    """The run's `Accelerator`: precision, gradient accumulation, trackers, with per-process state reset first."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # accelerate keeps its state per process; a second run in one process (a notebook, the tests) may use another
    # precision or accumulation.
    reset_accelerate_state()
    # Under torchrun on a machine without GPUs, accelerate only forms a (gloo) process group when told `cpu`.
    no_gpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=no_gpu_ddp,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers(config) or None,
        project_dir=config.output_dir,
    )
    set_seed(config.seed)
    return accelerator


def trackers(config: TrainingConfig) -> list[str]:
    """The trackers `report_to` asks for: `["tensorboard"]` or none."""
    if config.report_to == "none":
        return []
    from accelerate.utils import is_tensorboard_available

    if config.report_to == "tensorboard" and not is_tensorboard_available():
        raise ImportError("report_to=tensorboard needs TensorBoard: pip install tensorboard (or report_to=none).")
    return ["tensorboard"] if is_tensorboard_available() else []


def init_trackers(accelerator, config: TrainingConfig) -> None:
    """Start the trackers once per run, with the config's values as hyper-parameters."""
    if accelerator.trackers == [] and trackers(config):
        # Values TensorBoard's hparams accept: numbers, strings, booleans.
        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
        accelerator.init_trackers("tensorboard", config=values)
