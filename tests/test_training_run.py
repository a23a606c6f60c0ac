"""Whole tiny runs: it learns, resumes exactly, stops on NaN, caches the teacher, trains LoRA, runs on 2 processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_small_encoder import DistilledT5EncoderModel, patch_encoder
from flux_small_encoder.cli import main
from flux_small_encoder.training import (
    DistillationTrainer,
    TeacherCache,
    TrainingDivergedError,
    cache_teacher,
    load_config,
    load_sources,
    train,
)

QUICK = ["report_to=none", "eval_steps=1000", "num_eval_prompts=4"]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_tiny_config_learns_offline(tmp_path, make_pipe):
    from .conftest import run_pipe

    assert main(["train", "--config", "tiny", f"output_dir={tmp_path / 'run'}"]) == 0

    records = metrics(tmp_path / "run")
    errors = [r["eval_error"] for r in records if "eval_error" in r]
    assert records[0]["step"] == 0 and errors[-1] <= errors[0] / 5, errors
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 401))
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in steps)
    assert (tmp_path / "run" / "config.yaml").is_file()
    # The final folder drops into a pipeline.
    pipe = patch_encoder(make_pipe(), tmp_path / "run" / "final")
    assert isinstance(pipe.text_encoder_2, DistilledT5EncoderModel)
    assert run_pipe(pipe, max_sequence_length=16).shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_resume_mid_trajectory_gives_the_same_weights(tmp_path):
    # 8 timesteps a batch: step 20 is in the middle of the third trajectory. Dropout on, so RNG states matter too.
    common = [*QUICK, "num_inference_steps=8", "checkpointing_steps=10", "projector_dropout=0.1",
              "lr_scheduler=constant", "lr_warmup_steps=0"]
    train(load_config("tiny", [*common, "max_steps=30", f"output_dir={tmp_path / 'straight'}"]))
    train(load_config("tiny", [*common, "max_steps=20", f"output_dir={tmp_path / 'resumed'}"]))
    train(load_config("tiny", [*common, "max_steps=30", f"output_dir={tmp_path / 'resumed'}",
                               "resume_from_checkpoint=latest"]))
    straight, resumed = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [r["loss"] for r in metrics(tmp_path / "resumed") if "loss" in r] == [
        r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r
    ]
    # The checkpoint's student folder is itself loadable.
    DistilledT5EncoderModel.from_pretrained(tmp_path / "resumed" / "checkpoint-10" / "student")


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    train(load_config("tiny", [*QUICK, "max_steps=2", "num_inference_steps=2", f"output_dir={out}"]))
    before = (out / "checkpoint-2" / "student" / "model.safetensors").read_bytes()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=2", f"output_dir={out}"]) == 2
    assert (out / "checkpoint-2" / "student" / "model.safetensors").read_bytes() == before


def test_every_student_folder_carries_its_training_config(tmp_path):
    out = tmp_path / "run"
    config = load_config("tiny", [*QUICK, "max_steps=2", "num_inference_steps=2", f"output_dir={out}"])
    final = train(config)
    for folder in (final, out / "checkpoint-2" / "student"):
        assert load_config(folder / "training_config.yaml") == config
        DistilledT5EncoderModel.from_pretrained(folder)
    assert load_config(out / "config.yaml") == load_config(out / "checkpoint-2" / "config.yaml") == config


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*QUICK, "num_inference_steps=2", "max_steps=4", "checkpointing_steps=2", f"output_dir={out}"]
    train(load_config("tiny", args))
    first = weights(out / "checkpoint-4" / "student")
    # Steps 3 and 4 again from checkpoint-2, on other prompts: the first checkpoint-4 is kept aside, not refused.
    capsys.readouterr()
    train(load_config("tiny", [*args, f"resume_from_checkpoint={out / 'checkpoint-2'}", "seed=5"]))
    assert (f"resuming from {out / 'checkpoint-2'} at step 2 (resume_from_checkpoint names it); the "
            f"checkpoints it abandons are kept in {out / 'abandoned-1'}") in capsys.readouterr().out
    second = weights(out / "checkpoint-4" / "student")
    assert any(not torch.equal(first[key], second[key]) for key in first)
    assert weights(out / "abandoned-1" / "checkpoint-4" / "student").keys() == first.keys()
    assert all(torch.equal(value, first[key])
               for key, value in weights(out / "abandoned-1" / "checkpoint-4" / "student").items())
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert not list(out.glob(".*"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    config = load_config("tiny", [*QUICK, "max_steps=6", "checkpointing_steps=1", "learning_rate=1e30",
                                  "max_grad_norm=0", "lr_scheduler=constant", "lr_warmup_steps=0",
                                  f"output_dir={out}"])
    with pytest.raises(TrainingDivergedError, match=r"the loss is (nan|inf) at step (\d+)") as error:
        train(config)
    bad_step = int(error.value.args[0].split(" at step ")[1].split(";")[0])
    assert bad_step > 1 and f"checkpoint-{bad_step - 1}" in str(error.value)
    assert (out / f"checkpoint-{bad_step - 1}" / "student" / "model.safetensors").is_file()
    assert not (out / f"checkpoint-{bad_step}").exists() and not (out / "final").exists()
    assert not list(out.glob(".*"))  # no staging folder left behind


def test_teacher_cache_matches_the_teacher_and_replaces_it(tmp_path):
    from flux_small_encoder.training.fingerprint import teacher_identity
    from flux_small_encoder.training.models import load_t5_tokenizer, load_teacher, tokenize_t5

    cache_dir = tmp_path / "cache"
    config = load_config("tiny")
    with pytest.raises(ValueError, match="no folder for the teacher cache"):
        cache_teacher(config)
    assert cache_teacher(config, cache_dir, dtype="float32") == cache_dir
    before = (cache_dir / "index.json").read_text()
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        cache_teacher(config, cache_dir)
    assert (cache_dir / "index.json").read_text() == before and not list(tmp_path.glob(".*"))
    cache = TeacherCache(cache_dir, teacher=teacher_identity(config))
    teacher = load_teacher(config, torch.float32)
    prompts = load_sources(config.train_data)[:5]
    ids = tokenize_t5(load_t5_tokenizer(config), prompts, config.max_sequence_length)
    assert torch.equal(cache(ids), teacher(ids)[0])

    # Training from the cache is the same run as training with the teacher loaded.
    args = [*QUICK, "max_steps=4", "num_inference_steps=2"]
    live = train(load_config("tiny", [*args, f"output_dir={tmp_path / 'live'}"]))
    cached = DistillationTrainer(load_config("tiny", [*args, f"output_dir={tmp_path / 'cached'}",
                                                      f"teacher_cache={cache_dir}"]))
    cached.setup()
    assert cached.teacher is None
    cached = cached.train()
    for key, value in weights(live).items():
        assert torch.equal(value, weights(cached)[key]), key


def test_lora_run_saves_peft_adapters_and_a_merged_student(tmp_path, make_pipe):
    from peft import PeftModel

    from flux_small_encoder import load_encoder_lora
    from flux_small_encoder.training.models import build_student

    overrides = [*QUICK, "max_steps=4", "num_inference_steps=2", "student_init=t5", "lora.r=4", "lora.lora_alpha=4",
                 "learning_rate=1e-2", f"output_dir={tmp_path / 'run'}"]
    final = train(load_config("tiny", overrides))
    adapter = final / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert any(".q.lora_A." in key for key in load_file(adapter / "adapter_model.safetensors"))
    # The merged folder is the base student plus the adapters, and loads into a pipeline.
    base = build_student(load_config("tiny", overrides), 32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    for key, value in weights(final).items():
        torch.testing.assert_close(value, merged.state_dict()[key], msg=key)
    patch_encoder(make_pipe(), final)
    # The adapter also loads, in one call, onto a pipeline patched with the base student.
    pipe = patch_encoder(make_pipe(), build_student(load_config("tiny", overrides), 32))
    load_encoder_lora(pipe, adapter)
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder_2(ids)[0], merged.eval()(ids)[0])


def test_naive_objective_is_embedding_mse(tmp_path):
    final = train(load_config("tiny", [*QUICK, "objective=naive", "max_steps=3", f"output_dir={tmp_path / 'run'}"]))
    records = metrics(final.parent)
    assert [r["timestep_index"] for r in records if "loss" in r] == [0, 0, 0]  # one step a batch
    assert records[0]["eval_embedding_error"] > records[-1]["eval_embedding_error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    args = [*QUICK, "max_steps=8", "num_inference_steps=4", "lr_scheduler=constant", "lr_warmup_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(Path(__file__).with_name("_distributed_train.py")), str(tmp_path / "ddp"),
               *args, "train_batch_size=4"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])

    single = train(load_config("tiny", [*args, "train_batch_size=8", f"output_dir={tmp_path / 'single'}"]))
    ddp_loss = [r["loss"] for r in metrics(tmp_path / "ddp") if "loss" in r]
    single_loss = [r["loss"] for r in metrics(single.parent) if "loss" in r]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-3)
    for key, value in weights(single).items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-3, atol=1e-5)


def _run_process_group(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; if it hangs past `timeout`, kill the whole group and fail."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the processes still ran after {timeout} s (one waits for the other): {stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_checkpoints_of_two_processes_need_no_shared_disk_and_a_failure_stops_both(tmp_path):
    out = tmp_path / "run"
    args = [*QUICK, "max_steps=4", "num_inference_steps=2", "checkpointing_steps=2", "train_batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(Path(__file__).with_name("_distributed_checkpoint.py")), str(out),
               str(tmp_path), *args]
    result = _run_process_group(command, env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    # checkpoint-2: both ranks' generator states, written by the main process alone.
    assert sorted(p.name for p in (out / "checkpoint-2" / "state").glob("rng-*")) == [
        "rng-0.safetensors", "rng-1.safetensors"
    ]
    # checkpoint-4: the main process's disk filled up, and both ranks stopped with its error.
    reports = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert reports[0] == reports[1], reports
    assert reports[0].startswith(f"DiskFullError: the disk of {out} is full: checkpoint-4 could not be written")
    assert not (out / "checkpoint-4").exists()


def test_bf16_with_gradient_checkpointing_and_accumulation(tmp_path):
    out = tmp_path / "run"
    trainer = DistillationTrainer(load_config("tiny", [
        *QUICK, "max_steps=4", "num_inference_steps=2", "mixed_precision=bf16", "gradient_checkpointing=true",
        "gradient_accumulation_steps=2", f"output_dir={out}",
    ]))
    trainer.setup()
    assert trainer.frozen.transformer.dtype == torch.bfloat16 and trainer.teacher.dtype == torch.bfloat16
    assert trainer.frozen.transformer.gradient_checkpointing
    student = trainer.accelerator.unwrap_model(trainer.student)
    assert student.dtype == torch.float32  # master weights stay float32 under autocast
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 4 and all(r["loss"] > 0 for r in steps)


def test_tensorboard_logging_when_installed(tmp_path):
    from accelerate.utils import is_tensorboard_available

    if not is_tensorboard_available():
        pytest.skip("TensorBoard is not installed")
    out = tmp_path / "run"
    train(load_config("tiny", ["report_to=tensorboard", "num_eval_prompts=4", "max_steps=2", f"output_dir={out}"]))
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_resume_with_another_data_order_warns(tmp_path, caplog):
    out = tmp_path / "run"
    args = [*QUICK, "num_inference_steps=2", f"output_dir={out}"]
    train(load_config("tiny", [*args, "max_steps=2"]))
    with caplog.at_level("WARNING", logger="flux_small_encoder.training.checkpointing"):
        train(load_config("tiny", [*args, "max_steps=3", "seed=5", "resume_from_checkpoint=latest"]))
    assert "['seed']" in caplog.text
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_the_training_module_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "flux_small_encoder.training", "--help"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: flux-small-encoder train" in result.stdout and "lora" in result.stdout
