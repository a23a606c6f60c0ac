"""The trainer's `attention_backend`: which attention kernels are allowed while its models run, and its record."""

from __future__ import annotations

import json
import typing

import pytest
import torch
import yaml

from flux_small_encoder.training import DistillationTrainer, TrainingConfig, load_config
from flux_small_encoder.training.attention import ATTENTION_KERNELS, enabled_kernels

ALL_ON = {"flash": True, "efficient": True, "math": True, "cudnn": True}


def train_recording_kernels(tmp_path, backend: str) -> tuple[DistillationTrainer, list[dict], list[dict]]:
    """Train two steps (with a held-out evaluation) and record the enabled kernels at every transformer and student
    forward."""
    config = load_config("tiny", [
        f"output_dir={tmp_path / 'run'}", "report_to=none", "max_steps=2", "num_inference_steps=2", "eval_steps=2",
        "num_eval_prompts=2", f"attention_backend={backend}",
    ])
    trainer = DistillationTrainer(config)
    trainer.setup()
    seen_by_transformer, seen_by_student = [], []
    trainer.frozen.transformer.register_forward_hook(lambda *_: seen_by_transformer.append(enabled_kernels()))
    trainer.accelerator.unwrap_model(trainer.student).register_forward_hook(
        lambda *_: seen_by_student.append(enabled_kernels())
    )
    trainer.train()
    trainer.cleanup()
    return trainer, seen_by_transformer, seen_by_student


@pytest.mark.parametrize(
    "backend, expected",
    [
        ("auto", {"flash": True, "efficient": True, "math": True, "cudnn": False}),
        ("math", {"flash": False, "efficient": False, "math": True, "cudnn": False}),
        ("default", ALL_ON),
    ],
)
def test_the_setting_is_in_force_while_the_models_run_and_only_then(tmp_path, backend, expected):
    assert enabled_kernels() == ALL_ON  # PyTorch's defaults, which the context must give back
    _, seen_by_transformer, seen_by_student = train_recording_kernels(tmp_path, backend)
    # Training steps, the teacher's trajectory and the evaluation all ran the transformer and the student.
    assert len(seen_by_transformer) >= 6 and len(seen_by_student) >= 3
    assert all(seen == expected for seen in seen_by_transformer + seen_by_student)
    assert enabled_kernels() == ALL_ON


def test_the_backend_is_recorded_in_config_yaml_and_the_metrics(tmp_path):
    trainer, _, _ = train_recording_kernels(tmp_path, "auto")
    saved = yaml.safe_load((trainer.output_dir / "config.yaml").read_text())
    assert saved["attention_backend"] == "auto"
    steps = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    training_steps = [line for line in steps if "loss" in line]
    assert training_steps and all(line["attention_backend"] == "flash+efficient+math" for line in training_steps)


def test_the_choices_are_the_kernel_table_and_others_are_refused(tmp_path):
    choices = typing.get_args(typing.get_type_hints(TrainingConfig)["attention_backend"])
    assert set(choices) == set(ATTENTION_KERNELS)
    assert TrainingConfig().attention_backend == "auto"
    with pytest.raises(ValueError, match="attention_backend='cudnn2' is not one of"):
        load_config("tiny", [f"output_dir={tmp_path}", "attention_backend=cudnn2"])


def test_a_kernel_that_cannot_run_here_fails_loudly_instead_of_falling_back(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("memory-efficient attention runs on CUDA")
    # On a CPU, PyTorch has no memory-efficient kernel: the setting is really applied, not advisory.
    with pytest.raises(RuntimeError, match="No viable backend"):
        train_recording_kernels(tmp_path, "efficient")
