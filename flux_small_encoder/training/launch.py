"""Training on several processes: the `accelerate launch` command that starts them, and running it."""

from __future__ import annotations

import subprocess
import sys

from .config import load_config

ENTRY_MODULE = "flux_small_encoder.training"


class TrainingLaunchError(ChildProcessError):
    """The launched training processes exited with an error; their own output says why."""


def launch_command(
    config: str, overrides: list[str], num_processes: int, *, mixed_precision: str = "no"
) -> list[str]:
    """The `accelerate launch --multi_gpu` command that runs `python -m flux_small_encoder.training` on
    `num_processes` processes (one a GPU) of this machine.

    Args:
        config: A shipped config name or a YAML file, as each process will read it.
        overrides: `key=value` overrides, passed on unchanged.
        num_processes: How many processes to start (at least 2).
        mixed_precision: The run's `mixed_precision`, given to accelerate too.
    """
    if num_processes < 2:
        raise ValueError(f"num_processes must be at least 2 to launch, got {num_processes}; for one process, call "
                         "flux_small_encoder.training.train(config).")
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
        "-m", ENTRY_MODULE, "--config", str(config), *overrides,
    ]


def launch_training(config: str, overrides: list[str], num_processes: int) -> None:
    """Check the config here, then train on `num_processes` processes through `accelerate launch`.

    Args:
        config: A shipped config name or a YAML file.
        overrides: `key=value` overrides that win over the file.
        num_processes: How many processes to start (at least 2).

    Raises:
        ValueError, FileNotFoundError: The config is not valid; no process was started.
        TrainingLaunchError: The processes exited with an error (the exit status is in the message).
    """
    resolved = load_config(config, overrides)  # a bad config fails here, before any process starts
    command = launch_command(config, overrides, num_processes, mixed_precision=resolved.mixed_precision)
    code = subprocess.call(command)
    if code:
        raise TrainingLaunchError(
            f"training on {num_processes} processes failed (exit status {code}); their output above says why."
        )
