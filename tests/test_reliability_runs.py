"""Training runs that cannot be lost or mixed up (issue 9): kills at exact lines, a full disk, two runs in one folder,
resumes that change the config, moved runs, the teacher cache, pickles in checkpoints, offline models, threads.

A kill is `os._exit` in a forked child at the line named: no `except`, `finally` or `atexit` runs, as under `kill -9`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flux_small_encoder import atomic
from flux_small_encoder.cli import main
from flux_small_encoder.training import DistillationTrainer, TeacherCache, cache_teacher, load_config, train

QUICK = ["report_to=none", "eval_steps=1000", "num_eval_prompts=4", "num_inference_steps=2"]
KILLED = 137


def run_killed(function, target, name: str, when=None, then=None) -> None:
    """Run `function` in a forked child that dies at the first call of `target.name` where `when(*args)` holds,
    after `then(*args)` (a partial write) if given."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            original = getattr(target, name)

            def dying(*args, **kwargs):
                if when is None or when(*args, **kwargs):
                    if then is not None:
                        then(*args, **kwargs)
                    os._exit(KILLED)
                return original(*args, **kwargs)

            setattr(target, name, dying)
            function()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED, "the child did not reach its kill point"


def tiny(out: Path, *overrides: str):
    return load_config("tiny", [*QUICK, f"output_dir={out}", *overrides])


def metric_steps(folder: Path) -> list[int]:
    """The steps of the training lines of `folder/metrics.jsonl` (not the step-0 evaluation)."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "loss" in line]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run of 4 steps with checkpoint-2, checkpoint-4 and final/, trained once per session."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(out, "max_steps=4", "checkpointing_steps=2"))
    return out


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of `finished_run` of the test's own, at `tmp_path/run`."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def hidden(folder: Path) -> list[str]:
    """What writers left under hidden names in `folder` (staging and set-aside copies), not the run's lock."""
    return sorted(p.name for p in folder.glob(".*") if p.name != ".lock")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    """The command's one `error: ...` line (progress bars may come before it), with no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


# --- 1. metrics.jsonl ------------------------------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    out = tmp_path / "run"
    args = ["max_steps=4", "checkpointing_steps=2"]

    def torn_write(trainer, metrics):  # the kill lands halfway through the line of step 3
        with open(out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics)[:20])

    run_killed(lambda: train(tiny(out, *args)), DistillationTrainer, "log",
               when=lambda trainer, metrics: metrics["step"] == 3, then=torn_write)
    assert not (out / "metrics.jsonl").read_text().endswith("\n")
    train(tiny(out, *args, "resume_from_checkpoint=latest"))
    assert metric_steps(out) == [1, 2, 3, 4]


def test_a_kill_while_resume_rewrites_the_metrics_keeps_them_whole(run):
    out = run
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 4 was logged but before its checkpoint
    before = (out / "metrics.jsonl").read_bytes()
    run_killed(lambda: train(tiny(out, "max_steps=4", "resume_from_checkpoint=latest")), os, "replace",
               when=lambda source, target: Path(target).name == "metrics.jsonl")
    assert (out / "metrics.jsonl").read_bytes() == before


# --- 2. lineage ------------------------------------------------------------------------------------------------------


def test_latest_after_an_explicit_resume_continues_the_new_branch(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["max_steps=10", "checkpointing_steps=2"]
    train(tiny(out, *args))
    old_ten = (out / "checkpoint-10" / "student" / "model.safetensors").read_bytes()
    # Back to checkpoint-4, killed at step 7 (after checkpoint-6 of the new branch).
    run_killed(lambda: train(tiny(out, *args, f"resume_from_checkpoint={out / 'checkpoint-4'}")), DistillationTrainer,
               "log", when=lambda trainer, metrics: metrics["step"] == 7)

    trainer = DistillationTrainer(tiny(out, *args, "resume_from_checkpoint=latest"))
    trainer.setup()
    try:
        assert trainer.step == 6
        line = f"resuming from {out / 'checkpoint-6'} at step 6 (resume_from_checkpoint=latest: the newest in output"
        assert line in capsys.readouterr().out
    finally:
        trainer.cleanup()
    # The abandoned branch is kept, under names `latest` never picks.
    aside = out / "abandoned-1"
    assert sorted(p.name for p in aside.iterdir()) == [
        "checkpoint-10", "checkpoint-6", "checkpoint-8", "final", "metrics.jsonl"
    ]
    assert (aside / "checkpoint-10" / "student" / "model.safetensors").read_bytes() == old_ten
    assert metric_steps(aside) == [5, 6, 7, 8, 9, 10]


def metric_lines(folder: Path) -> dict[int, dict]:
    """The training lines of `folder/metrics.jsonl` by step."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if "loss" in line}


def start_only(config) -> DistillationTrainer:
    """Set a run up and let it go, as a run killed before its first new checkpoint leaves its folder."""
    trainer = DistillationTrainer(config)
    trainer.setup()
    trainer.cleanup()
    return trainer


def test_resuming_an_abandoned_checkpoint_sets_the_current_branch_aside(tmp_path):
    out = tmp_path / "run"
    args = ["max_steps=8", "checkpointing_steps=2"]
    train(tiny(out, *args))
    # Back to checkpoint-4 on other prompts: the old 6 and 8 go to abandoned-1; the new branch reaches checkpoint-6.
    run_killed(lambda: train(tiny(out, *args, f"resume_from_checkpoint={out / 'checkpoint-4'}", "seed=3")),
               DistillationTrainer, "log", when=lambda trainer, metrics: metrics["step"] == 7)
    old = metric_lines(out / "abandoned-1")

    # Getting the abandoned work back: its checkpoint-8's history is 2 and 4 here, then 6 and 8 there.
    start_only(tiny(out, "max_steps=10", "checkpointing_steps=2", f"resume_from_checkpoint={out / 'abandoned-1'}/"
                                                                    "checkpoint-8"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (out / "abandoned-2").iterdir()) == ["checkpoint-6", "metrics.jsonl"]
    assert metric_steps(out / "abandoned-2") == [5, 6]
    lines = metric_lines(out)
    assert sorted(lines) == list(range(1, 9)) and all(lines[step] == old[step] for step in (5, 6, 7, 8))


def test_resuming_another_runs_checkpoint_sets_this_folders_run_aside(finished_run, tmp_path):
    other = Path(shutil.copytree(finished_run, tmp_path / "other"))
    out = tmp_path / "run"
    train(tiny(out, "max_steps=2", "checkpointing_steps=2", "seed=3"))
    mine = metric_lines(out)

    start_only(tiny(out, "max_steps=6", f"resume_from_checkpoint={other / 'checkpoint-4'}"))
    assert not list(out.glob("checkpoint-*"))  # `latest` cannot pick a checkpoint of this folder's own run
    assert sorted(p.name for p in (out / "abandoned-1").iterdir()) == ["checkpoint-2", "final", "metrics.jsonl"]
    assert metric_lines(out / "abandoned-1") == mine
    assert metric_lines(out) == metric_lines(other)  # the history of the checkpoint it continues


# --- 3. one run per folder -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True], ids=["two fresh runs", "two latest resumes"])
def test_a_second_run_into_a_held_folder_is_refused_and_changes_nothing(finished_run, tmp_path, capsys, resume):
    out = tmp_path / "run"
    args = ["max_steps=6", "checkpointing_steps=2"]
    if resume:
        shutil.copytree(finished_run, out)
        args.append("resume_from_checkpoint=latest")
    first = DistillationTrainer(tiny(out, *args))
    first.setup()
    try:
        before = snapshot(out)
        capsys.readouterr()
        assert main(["train", "--config", "tiny", *QUICK, *args, f"output_dir={out}"]) == 2
        message = one_line_error(capsys)
        assert f"{out} is in use by another run (pid {os.getpid()} on " in message
        assert snapshot(out) == before
        first.train()
    finally:
        first.cleanup()
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
    out = tmp_path / "run"
    run_killed(lambda: train(tiny(out, "max_steps=4", "checkpointing_steps=2")), DistillationTrainer, "log",
               when=lambda trainer, metrics: metrics["step"] == 3)
    assert json.loads((out / ".lock").read_text())["pid"] != os.getpid()  # the dead holder's name is still there
    train(tiny(out, "max_steps=4", "resume_from_checkpoint=latest"))
    assert metric_steps(out) == [1, 2, 3, 4] and not (out / ".lock").exists()


def test_a_new_holder_taking_the_folder_while_the_lock_lets_go_is_left_alone(tmp_path, monkeypatch):
    from flux_small_encoder.training.run_folder import RunFolderInUseError, RunLock

    folder = tmp_path / "run"
    first, second = RunLock(folder).acquire(), RunLock(folder)
    rmdir = Path.rmdir

    def a_new_holder_first(path):  # between the release's unlink of .lock and its removal of the empty folder
        second.acquire()
        rmdir(path)

    monkeypatch.setattr(Path, "rmdir", a_new_holder_first)
    first.release()
    monkeypatch.undo()
    with pytest.raises(RunFolderInUseError):  # the new holder still holds it
        RunLock(folder).acquire()
    second.release()


# --- 4. replacing and removing folders under kills ------------------------------------------------------------------


def _partial_rmtree(path, *args, **kwargs):
    """A kill during a folder's deletion: one file is gone."""
    next(p for p in sorted(Path(path).rglob("*.safetensors"))).unlink()


KILL_POINTS = {
    "with the new one staged": ("rename", lambda source, target: Path(source).name == "checkpoint-4", None),
    "after the move-aside": ("rename", lambda source, target: Path(target).name == "checkpoint-4", None),
    "during the removal of the old one": ("rmtree", lambda path, *a, **k: ".checkpoint-4." in str(path),
                                          _partial_rmtree),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_replacing_a_checkpoint_never_shows_a_half_folder_and_leftovers_go_at_the_next_start(run, point):
    out = run
    old = snapshot(out / "checkpoint-4")

    def replace_checkpoint_4():
        with atomic.atomic_folder(out / "checkpoint-4", replace=True) as staging:
            shutil.copytree(out / "checkpoint-4", staging, dirs_exist_ok=True)
            (staging / "replaced.txt").write_text("the new one")

    name, when, then = KILL_POINTS[point]
    run_killed(replace_checkpoint_4, os if name == "rename" else shutil, name, when=when, then=then)
    assert hidden(out)
    # Whatever `latest` picks is one whole checkpoint: the old checkpoint-4, the new one, or checkpoint-2.
    picked = DistillationTrainer(tiny(out, "max_steps=4", "resume_from_checkpoint=latest"))
    picked.setup()
    try:
        resumed = snapshot(out / f"checkpoint-{picked.step}")
        assert resumed in (old, {**old, "replaced.txt": b"the new one"}, snapshot(out / "checkpoint-2"))
        assert hidden(out) == []  # removed at the start, under the lock
    finally:
        picked.cleanup()


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(run):
    out = run
    run_killed(lambda: atomic.remove(out / "checkpoint-2"), shutil, "rmtree", then=_partial_rmtree)
    assert not (out / "checkpoint-2").exists() and hidden(out)


def test_staging_names_carry_the_writers_pid_so_stale_ones_are_known(tmp_path):
    run_killed(lambda: atomic.write_text_atomically(tmp_path / "a.txt", "x"), os, "replace")
    (tmp_path / f".b.txt.{os.getpid()}-0123abcd.partial").write_text("")  # a live writer's
    assert [p.name.split(".")[1] for p in atomic.leftovers(tmp_path, stale_only=True)] == ["a"]
    assert len(atomic.leftovers(tmp_path)) == 2


# --- 5. what a resume may change ------------------------------------------------------------------------------------


def test_resuming_with_another_learning_rate_applies_it_says_so_and_records_it(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["lr_scheduler=constant", "lr_warmup_steps=0", "checkpointing_steps=2"]
    train(tiny(out, *args, "max_steps=2", "learning_rate=1e-3"))
    capsys.readouterr()
    train(tiny(out, *args, "max_steps=4", "learning_rate=2e-4", "resume_from_checkpoint=latest"))
    assert "applied from step 3 on: learning_rate=0.0002 (was 0.001)" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in lines if "loss" in r] == [1e-3, 1e-3, 2e-4, 2e-4]
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 2e-4
    resumes = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["resumes"]
    changed = {"learning_rate": [1e-3, 2e-4], "max_steps": [2, 4]}
    assert resumes == [{"from": str(out / "checkpoint-2"), "step": 2, "changed": changed}]


@pytest.mark.parametrize("override, field", [("lora.r=4", "lora"), ("student_init=random", "student_init"),
                                             ("model=tiny-other", "model")])
def test_resuming_with_another_student_or_lora_is_refused_in_one_line(tmp_path, capsys, override, field):
    out = tmp_path / "run"
    train(tiny(out, "max_steps=1", "student_init=t5"))
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=4", f"output_dir={out}", "student_init=t5",
                 "resume_from_checkpoint=latest", override]) == 2
    message = one_line_error(capsys)
    assert f"{out / 'checkpoint-1'} was trained with {field}=" in message and "student_init=distilled" in message
    assert snapshot(out) == before


def test_a_moved_pipeline_folder_resumes_and_another_pipeline_is_refused(tmp_path, capsys):
    from flux_small_encoder.tiny import tiny_flux_pipeline

    tiny_flux_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    out, args = tmp_path / "run", [*QUICK, "checkpointing_steps=2", f"output_dir={tmp_path / 'run'}"]
    train(tiny(out, "max_steps=2", "checkpointing_steps=2", f"model={tmp_path / 'pipe'}"))
    (tmp_path / "pipe").rename(tmp_path / "moved")  # the same weights under another path
    assert main(["train", "--config", "tiny", *args, "max_steps=4", f"model={tmp_path / 'moved'}",
                 "resume_from_checkpoint=latest"]) == 0

    tiny_flux_pipeline(seed=1).save_pretrained(tmp_path / "other")
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *args, "max_steps=6", f"model={tmp_path / 'other'}",
                 "resume_from_checkpoint=latest"]) == 2
    assert (f"{out / 'checkpoint-4'} was trained with model='{tmp_path / 'moved'}', this run has "
            f"model='{tmp_path / 'other'}'") in one_line_error(capsys)
    assert snapshot(out) == before


def test_resuming_a_student_of_another_size_names_the_first_weight_in_one_line(run):
    from flux_small_encoder.tiny import tiny_student

    out = run
    trainer = DistillationTrainer(tiny(out, "max_steps=4", "resume_from_checkpoint=latest"), student=tiny_student())
    with pytest.raises(ValueError, match=r"weights differ in name or shape \(encoder\.") as error:
        trainer.setup()
    assert "\n" not in str(error.value) and not (out / ".lock").exists()


# --- 6. moved runs, max_steps, config checks ------------------------------------------------------------------------


def test_a_moved_run_resumes_in_the_folder_it_sits_in(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "b")  # config.yaml still says output_dir=<finished_run>
    before = snapshot(finished_run)
    assert main(["train", "--config", str(tmp_path / "b" / "config.yaml"), "max_steps=6",
                 "resume_from_checkpoint=latest"]) == 0
    assert snapshot(finished_run) == before
    assert (tmp_path / "b" / "checkpoint-6").is_dir() and metric_steps(tmp_path / "b") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("kept", ["final", "metrics.jsonl", "config.yaml"])
def test_a_fresh_run_is_refused_where_an_earlier_run_left_anything_but_checkpoints(run, capsys, kept):
    out = run
    for path in out.iterdir():  # the checkpoints deleted, and all but one of the rest
        if path.name != kept:
            atomic.remove(path)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=2", f"output_dir={out}"]) == 2
    assert (f"{out} holds an earlier run ({kept}) with no checkpoint to continue from: give a new output_dir, or "
            "move those out of it to start afresh there (nothing was overwritten).") in one_line_error(capsys)
    assert snapshot(out) == before


def test_a_runs_config_yaml_starts_no_resume_of_its_own(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["max_steps=4", "checkpointing_steps=2"]
    train(tiny(out, *args))
    train(tiny(out, *args, f"resume_from_checkpoint={out / 'checkpoint-2'}", "seed=3"))
    for saved in (out / "config.yaml", out / "final" / "training_config.yaml", out / "checkpoint-4" / "config.yaml",
                  out / "checkpoint-4" / "student" / "training_config.yaml"):
        assert yaml.safe_load(saved.read_text())["resume_from_checkpoint"] is None, saved
    # Without a resume, the run's own config.yaml is a fresh run into a folder that holds one: refused.
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--config", str(out / "config.yaml"), "max_steps=8"]) == 2
    assert f"{out} holds an earlier run (checkpoint-2, checkpoint-4, " in one_line_error(capsys)
    assert snapshot(out) == before
    # With `latest`, it continues from the newest checkpoint: the one just trained, not the one resumed before.
    assert main(["train", "--config", str(out / "config.yaml"), "max_steps=8", "resume_from_checkpoint=latest"]) == 0
    assert f"resuming from {out / 'checkpoint-4'} at step 4" in capsys.readouterr().out
    assert metric_steps(out) == list(range(1, 9)) and not (out / "abandoned-2").exists()


def test_max_steps_below_the_checkpoint_is_refused_and_final_is_kept(run, capsys):
    out = run
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=2", f"output_dir={out}",
                 "resume_from_checkpoint=latest"]) == 2
    assert f"{out / 'checkpoint-4'} is at step 4, past max_steps=2: raise max_steps" in one_line_error(capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "override, message",
    [("resolution=500", "resolution=500 is not a multiple of 16, which FLUX's latents need (8 pixels a latent, 2x2 "
                        "latents a token): use 496 or 512."),
     ("resolution=8", "use 16."),
     ("learning_rate=-1", "learning_rate must be positive, got -1."),
     ("lora.r=-2", "lora.r must be at least 1, got -2"),
     ("lora_rank=-1", "lora.r must be at least 1, got -1")],
)
def test_bad_numbers_are_refused_with_the_config_before_any_model_loads(tmp_path, capsys, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("tiny", ["student_init=t5", override])
    assert main(["train", "--config", "tiny", *QUICK, f"output_dir={tmp_path / 'run'}", "student_init=t5",
                 override]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


# --- 7. the teacher cache --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "cache"
    return cache_teacher(load_config("tiny"), folder, dtype="float32")


@pytest.fixture
def teacher_folder(tmp_path) -> Path:
    from flux_small_encoder.tiny import tiny_teacher

    tiny_teacher(seed=0).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_the_teacher_cache_knows_its_teacher_by_content_not_by_path(tmp_path, teacher_folder, monkeypatch, capsys):
    from flux_small_encoder.tiny import tiny_teacher

    cache_teacher(load_config("tiny", [f"teacher={teacher_folder}"]), tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    relative = ["teacher=teacher", f"teacher_cache={tmp_path / 'cache'}", "max_steps=2"]
    assert main(["train", "--config", "tiny", *QUICK, *relative, f"output_dir={tmp_path / 'run'}"]) == 0

    tiny_teacher(seed=1).save_pretrained(teacher_folder)  # the same path, other weights
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, *relative, f"output_dir={tmp_path / 'run2'}"]) == 2
    assert ("and this run's teacher 'teacher' has other weights (config and weights fingerprint differ): write a new "
            "cache for it with `flux-small-encoder cache-teacher`.") in one_line_error(capsys)
    assert not (tmp_path / "run2").exists()


def test_a_truncated_shard_is_refused_when_the_cache_opens(tiny_cache, tmp_path, capsys):
    shutil.copytree(tiny_cache, tmp_path / "cache")
    shard = tmp_path / "cache" / "embeddings-00000.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    assert main(["train", "--config", "tiny", *QUICK, f"teacher_cache={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert f"teacher cache shard {shard} is truncated or damaged (" in one_line_error(capsys)


def flip_a_bit_in_every_entry(shard: Path) -> None:
    """A bit flip in the last byte of every embedding of a safetensors shard: its size stays the same."""
    data = bytearray(shard.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    for key, entry in json.loads(data[8 : 8 + header_size]).items():
        if key != "__metadata__":
            data[8 + header_size + entry["data_offsets"][1] - 1] ^= 0x01
    shard.write_bytes(data)


def test_verify_teacher_cache_finds_a_shard_that_changed_on_disk(tiny_cache, tmp_path):
    from flux_small_encoder.training import verify_teacher_cache

    shutil.copytree(tiny_cache, tmp_path / "cache")
    assert len(verify_teacher_cache(tmp_path / "cache")) == len(TeacherCache(tiny_cache))
    shard = tmp_path / "cache" / "embeddings-00000.safetensors"
    flip_a_bit_in_every_entry(shard)
    with pytest.raises(ValueError, match=f"teacher cache shard {re.escape(str(shard))} does not match its checksum"):
        verify_teacher_cache(tmp_path / "cache")


def test_a_flipped_bit_in_a_cached_embedding_stops_training_in_one_line(tiny_cache, tmp_path, capsys):
    shutil.copytree(tiny_cache, tmp_path / "cache")
    shard = tmp_path / "cache" / "embeddings-00000.safetensors"
    flip_a_bit_in_every_entry(shard)
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=2", f"teacher_cache={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert (f"teacher cache shard {shard} is damaged: the embeddings of prompt " in one_line_error(capsys))


@pytest.mark.parametrize(
    "edit, problem",
    [(lambda index: index["shards"][0].update(file="../other/embeddings-00000.safetensors"),
      "it names '../other/embeddings-00000.safetensors' as a shard, which is not a file of its own folder"),
     (lambda index: index["shards"][0].update(file="/etc/passwd"),
      "it names '/etc/passwd' as a shard, which is not a file of its own folder"),
     (lambda index: index["shards"].append("x"), "a shard entry 'x' is not an object"),
     (lambda index: index.update(teacher=None), "no teacher name")],
    ids=["parent folder", "absolute path", "not an object", "no teacher"],
)
def test_a_cache_index_pointing_outside_its_folder_is_refused_before_anything_is_read(tiny_cache, tmp_path,
                                                                                      monkeypatch, edit, problem):
    from flux_small_encoder.training import cache

    shutil.copytree(tiny_cache, tmp_path / "other")  # a whole shard where `../other/...` points
    shutil.copytree(tiny_cache, tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    edit(index)
    (tmp_path / "cache" / "index.json").write_text(json.dumps(index))
    opened = []
    monkeypatch.setattr(cache, "safe_open", lambda path, **kwargs: opened.append(path))
    with pytest.raises(ValueError) as error:
        TeacherCache(tmp_path / "cache")
    assert str(error.value) == (f"{tmp_path / 'cache' / 'index.json'} is not an index as cache-teacher writes it "
                                f"({problem}): refused, nothing was read through it; write the cache again with "
                                "`flux-small-encoder cache-teacher`.")
    assert opened == []


def test_a_cache_index_that_is_not_an_object_is_refused_in_one_line(tiny_cache, tmp_path, capsys):
    shutil.copytree(tiny_cache, tmp_path / "cache")
    (tmp_path / "cache" / "index.json").write_text("[1]")
    assert main(["train", "--config", "tiny", *QUICK, f"teacher_cache={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert "index.json is not an index as cache-teacher writes it (a JSON list, not an object)" in (
        one_line_error(capsys))


@pytest.mark.parametrize(
    "edit, problem",
    [(lambda index: index.update(shards=[]), "holds 0 entries, but its index says {n}: the cache is damaged"),
     (lambda index: index.update(format=99), "is in format 99, newer than this version reads"),
     (lambda index: index.update(format=1), "was written by an earlier version")],
    ids=["no shards", "newer format", "earlier format"],
)
def test_a_cache_index_that_disagrees_with_its_shards_or_its_reader_is_refused(tiny_cache, tmp_path, edit, problem):
    from flux_small_encoder.training import verify_teacher_cache

    shutil.copytree(tiny_cache, tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    n = index["num_prompts"]
    edit(index)
    (tmp_path / "cache" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(problem.format(n=n))):
        verify_teacher_cache(tmp_path / "cache")


def test_a_shard_of_the_written_size_whose_header_does_not_describe_it_is_named_damaged(tiny_cache, tmp_path):
    from flux_small_encoder.training import verify_teacher_cache

    shutil.copytree(tiny_cache, tmp_path / "cache")
    shard = tmp_path / "cache" / "embeddings-00000.safetensors"
    shard.write_bytes(b"x" * shard.stat().st_size)
    with pytest.raises(ValueError, match=re.escape(
            f"teacher cache shard {shard} is damaged (its safetensors header does not describe its")):
        verify_teacher_cache(tmp_path / "cache")


def test_checking_that_the_cache_covers_the_prompts_tokenizes_them_in_chunks(tiny_cache, monkeypatch):
    from flux_small_encoder.tiny import tiny_t5_tokenizer
    from flux_small_encoder.training import cache, load_sources
    from flux_small_encoder.training.models import tokenize_t5

    config, tokenizer, sizes = load_config("tiny"), tiny_t5_tokenizer(), []

    def tokenize(prompts):
        sizes.append(len(prompts))
        return tokenize_t5(tokenizer, prompts, config.max_sequence_length)

    monkeypatch.setattr(cache, "TOKENIZE_CHUNK", 16, raising=False)
    prompts = load_sources(config.train_data, seed=config.seed)
    TeacherCache(tiny_cache).check_covers(prompts, tokenize)
    assert max(sizes) == 16 and sum(sizes) == len(set(prompts))


def test_a_killed_cache_teacher_leaves_no_staging_folder_behind(tmp_path):
    from flux_small_encoder.training import cache

    config = load_config("tiny")
    run_killed(lambda: cache_teacher(config, tmp_path / "cache"), cache, "save_file")
    assert [p.name.split(".")[1] for p in tmp_path.iterdir()] == ["cache"]  # the hidden staging folder
    cache_teacher(config, tmp_path / "cache")
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


# --- 9. no pickle ----------------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that runs code: it creates a file when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoints_hold_no_pickle_and_one_carrying_a_pickle_is_refused(run, tmp_path, capsys):
    out = run
    suffixes = {p.suffix for checkpoint in out.glob("checkpoint-*") for p in checkpoint.rglob("*") if p.is_file()}
    assert suffixes == {".safetensors", ".json", ".yaml"}, suffixes

    marker = tmp_path / "code-ran"
    planted = out / "checkpoint-4" / "state" / "custom_checkpoint_0.pkl"
    planted.write_bytes(pickle.dumps(_Payload(marker)))
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", f"output_dir={out}",
                 "resume_from_checkpoint=latest"]) == 2
    assert f"{planted} may be a pickle, which can run code when loaded" in one_line_error(capsys)
    assert not marker.exists()


# --- damaged checkpoints and metrics ---------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _to_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


DAMAGES = {
    "truncated optimizer": ("state/optimizer.safetensors", _truncate, "is truncated or damaged ("),
    "truncated rng": ("state/rng-0.safetensors", _truncate, "is truncated or damaged ("),
    "truncated student": ("state/student.safetensors", _truncate, "is truncated or damaged ("),
    "optimizer linked to /dev/zero": ("state/optimizer.safetensors", _to_dev_zero,
                                      "is a character device (a symlink to /dev/zero)"),
    "student missing": ("state/student.safetensors", Path.unlink, "is missing"),
    "config.yaml not a mapping": ("config.yaml", lambda path: path.write_text("[1, 2]\n"), "is damaged (not a "),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_file_is_refused_naming_it_and_the_previous_good_checkpoint(run, capsys, damage):
    out = run
    name, harm, problem = DAMAGES[damage]
    harm(out / "checkpoint-4" / name)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", f"output_dir={out}",
                 "resume_from_checkpoint=latest"]) == 2
    message = one_line_error(capsys)
    assert f"error: {out / 'checkpoint-4' / name} {problem}" in message
    assert message.endswith(f"the checkpoint {out / 'checkpoint-4'} cannot be resumed. The previous good checkpoint "
                            f"is {out / 'checkpoint-2'}: resume from it with resume_from_checkpoint="
                            f"{out / 'checkpoint-2'} (nothing was changed).")
    assert snapshot(out) == before and not (out / ".lock").exists()


def test_a_damaged_checkpoint_with_no_whole_one_before_it_says_so(run, capsys):
    out = run
    _truncate(out / "checkpoint-4" / "state" / "optimizer.safetensors")
    (out / "checkpoint-2" / "trainer_state.json").write_text("[1]")
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", f"output_dir={out}",
                 "resume_from_checkpoint=latest"]) == 2
    assert one_line_error(capsys).endswith(f"No earlier checkpoint in {out} is whole (nothing was changed).")


@pytest.mark.parametrize(
    "state, problem",
    [('{"step": "abc"}', "its step 'abc' is not a whole number of at least 0"),
     ("[1]", "a JSON list, not an object"),
     ('{"step": -3}', "its step -3 is not a whole number of at least 0"),
     ('{"step": 3}', "its step 3 is not the step of its folder, checkpoint-4"),
     ('{"step": 4, "lineage": [1]}', "its lineage or resumes are not lists as the trainer writes them"),
     ("{", "is not JSON")],
)
def test_a_trainer_state_that_does_not_fit_its_checkpoint_is_refused_naming_the_file(run, capsys, state, problem):
    out = run
    (out / "checkpoint-4" / "trainer_state.json").write_text(state)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", f"output_dir={out}",
                 "resume_from_checkpoint=latest"]) == 2
    message = one_line_error(capsys)
    assert f"error: {out / 'checkpoint-4' / 'trainer_state.json'} " in message and problem in message
    assert f"The previous good checkpoint is {out / 'checkpoint-2'}" in message
    assert snapshot(out) == before


def test_a_checkpoint_written_before_lineages_resumes_and_keeps_its_history(run):
    out = run
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # as earlier versions wrote them: no lineage, no sessions
        (out / checkpoint / "trainer_state.json").write_text(json.dumps({"step": int(checkpoint[-1])}))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (out / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in line.items() if k != "session"}) + "\n"
                                               for line in lines))
    train(tiny(out, "max_steps=6", "checkpointing_steps=2", "resume_from_checkpoint=latest"))
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6] and (out / "checkpoint-2").is_dir()
    assert not list(out.glob("abandoned-*"))


@pytest.mark.parametrize("where", ["inside", "last"])
def test_a_metrics_line_without_a_step_is_refused_naming_the_file_and_line(run, capsys, where):
    out = run
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    number = 2 if where == "inside" else len(lines) + 1
    lines.insert(number - 1, '{"loss": 1}\n')
    (out / "metrics.jsonl").write_text("".join(lines))
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", f"output_dir={out}",
                 "resume_from_checkpoint=latest"]) == 2
    assert (f"error: {out / 'metrics.jsonl'} line {number} is not a metrics record (an object with a whole `step`): "
            "the file is damaged; repair or remove that line, then resume (nothing was changed).") in (
                one_line_error(capsys))
    assert snapshot(out) == before


# --- 14. one line, exit status 2 -------------------------------------------------------------------------------------


def test_training_a_model_that_is_not_cached_offline_says_what_to_download(tmp_path, capsys):
    assert main(["train", "--config", "tiny", *QUICK, "model=black-forest-labs/FLUX.1-dev",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    message = one_line_error(capsys)
    assert "the Hub is offline (HF_HUB_OFFLINE=1) and black-forest-labs/FLUX.1-dev is not in the local" in message
    assert ('`hf download black-forest-labs/FLUX.1-dev --include "transformer/*" --include "scheduler/*" --include '
            '"text_encoder/*" --include "tokenizer/*" --include "tokenizer_2/*" --include "vae/*" '
            '--include "text_encoder_2/*"`') in message
    assert main(["cache-teacher", "--config", "tiny", "model=black-forest-labs/FLUX.1-dev",
                 f"--out={tmp_path / 'cache'}"]) == 2
    assert ('`hf download black-forest-labs/FLUX.1-dev --include "tokenizer_2/*" --include "text_encoder_2/*"`'
            in one_line_error(capsys))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_built_in_model_name_that_is_also_a_folder_here_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=1", "output_dir=run"]) == 2
    assert ("'tiny' names both a built-in model source and the folder ./tiny here: write ./tiny (or the folder's full "
            "path) to use the folder, or run from a directory without a 'tiny' folder to use the built-in source."
            ) in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["model=/nonexistent/path", "student=/nonexistent", "teacher=/nonexistent",
                                      "teacher=./nonexistent", "model=~/nonexistent"])
def test_a_model_path_to_no_folder_is_refused_before_anything_loads(override, tmp_path, monkeypatch, capsys):
    from flux_small_encoder.training import trainer

    monkeypatch.setattr(trainer, "load_frozen_parts", lambda *args: pytest.fail("a model was loaded"))
    assert main(["train", "--config", "tiny", *QUICK, f"output_dir={tmp_path / 'run'}", "student_init=t5",
                 override]) == 2
    assert one_line_error(capsys) == f"error: {override}: no such folder; give a local folder or a Hub repo id."
    assert not (tmp_path / "run").exists()


def test_an_encoder_folder_as_the_model_is_refused_as_no_pipeline(student, tmp_path, monkeypatch, capsys):
    from flux_small_encoder.training import trainer

    student.save_pretrained(tmp_path / "encoder")  # config.json + model.safetensors, no model_index.json
    monkeypatch.setattr(trainer, "load_frozen_parts", lambda *args: pytest.fail("a model was loaded"))
    assert main(["train", "--config", "tiny", *QUICK, f"output_dir={tmp_path / 'run'}",
                 f"model={tmp_path / 'encoder'}"]) == 2
    assert one_line_error(capsys) == (
        f"error: model={tmp_path / 'encoder'} is not a diffusers pipeline folder: it has no model_index.json. It "
        "holds a config.json: it looks like a single model, such as an encoder (which goes in as student or "
        "teacher), not a pipeline. Give a FLUX pipeline folder saved with save_pretrained, or a Hub repo id such as "
        "black-forest-labs/FLUX.1-dev.")
    assert not (tmp_path / "run").exists()


def _full_disk(tensors, filename, metadata=None):
    """safetensors' save_file on a full disk: part of the file is written, then ENOSPC."""
    Path(filename).write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_checkpointing_names_the_last_good_checkpoint(run, capsys, monkeypatch):
    from flux_small_encoder.training import state

    out = run
    monkeypatch.setattr(state, "save_file", _full_disk)
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", "checkpointing_steps=2", f"output_dir={out}",
                 "resume_from_checkpoint=latest"]) == 2
    assert (f"error: the disk of {out} is full: checkpoint-6 could not be written (nothing of it was kept) and the "
            f"last good checkpoint is {out / 'checkpoint-4'}. Free some space") in one_line_error(capsys)
    assert not (out / "checkpoint-6").exists() and hidden(out) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where this process may mount one (root on Linux)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode:
        pytest.skip("this machine does not let the tests mount a tmpfs; the patched-write test covers the case")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_while_checkpointing_names_the_last_good_checkpoint(small_disk, capsys):
    out = small_disk / "run"
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", "checkpointing_steps=2",
                 f"output_dir={out}"]) == 2
    message = one_line_error(capsys)
    assert f"error: the disk of {out} is full: checkpoint-" in message and "the last good checkpoint is" in message
    good = message.split("the last good checkpoint is ")[1].split(". Free")[0]
    load_file(Path(good) / "student" / "model.safetensors")  # whole
    assert hidden(out) == []


def _safetensors_full_disk(tensors, filename, metadata=None):
    """safetensors' save_file on a full disk, as it reports one: part of the file written, then its own error."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 100)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_while_writing_the_teacher_cache_is_one_line_and_keeps_nothing(tmp_path, capsys, monkeypatch):
    from flux_small_encoder.training import cache

    monkeypatch.setattr(cache, "save_file", _safetensors_full_disk)
    assert main(["cache-teacher", "--config", "tiny", f"--out={tmp_path / 'cache'}"]) == 2
    assert one_line_error(capsys) == (
        f"error: the disk of {tmp_path} is full: the teacher cache {tmp_path / 'cache'} could not be written (nothing "
        "of it was kept) and nothing else was changed: free some space, then run cache-teacher again.")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_as_a_run_takes_its_folder_is_one_line_naming_the_lock_file(tmp_path, capsys, monkeypatch):
    from flux_small_encoder.training import run_folder

    real_dumps = json.dumps

    def dumps(value, *args, **kwargs):  # the holder's name is the first thing a run writes into its folder
        if isinstance(value, dict) and "pid" in value:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dumps(value, *args, **kwargs)

    monkeypatch.setattr(run_folder.json, "dumps", dumps)
    assert main(["train", "--config", "tiny", *QUICK, f"output_dir={tmp_path / 'run'}"]) == 2
    assert one_line_error(capsys) == (
        f"error: the disk of {tmp_path / 'run'} is full: its lock file .lock could not be written (nothing of it was "
        "kept) and no checkpoint was written yet, so there is nothing to resume. Free some space, then start the run "
        "again.")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_before_the_first_checkpoint_says_to_start_again_not_to_resume(tmp_path, capsys, monkeypatch):
    from flux_small_encoder.training import state

    out = tmp_path / "run"
    monkeypatch.setattr(state, "save_file", _full_disk)
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=2", "checkpointing_steps=2",
                 f"output_dir={out}"]) == 2
    assert one_line_error(capsys) == (
        f"error: the disk of {out} is full: checkpoint-2 could not be written (nothing of it was kept) and no "
        "checkpoint was written yet, so there is nothing to resume. Free some space, then start the run again with a "
        f"new output_dir, or after moving metrics.jsonl, config.yaml out of {out}.")


def test_a_really_full_disk_at_the_start_of_a_run_is_one_line(small_disk, capsys):
    try:
        with open(small_disk / "filler", "wb") as filler:  # fill the disk to its last byte
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
    except OSError:
        pass
    assert main(["train", "--config", "tiny", *QUICK, f"output_dir={small_disk / 'run'}"]) == 2
    assert one_line_error(capsys).startswith(f"error: the disk of {small_disk / 'run'} is full: ")
    assert not (small_disk / "run").exists()


# --- 4, 5. the teacher, checked before it costs anything -------------------------------------------------------------


def _refuse_to_build(*args, **kwargs):
    raise AssertionError("the teacher was built")


def test_a_distilled_encoder_as_the_teacher_is_refused_before_anything_is_written(tmp_path, capsys):
    from flux_small_encoder.tiny import tiny_student

    tiny_student().save_pretrained(tmp_path / "student")
    message = (f"error: teacher {tmp_path / 'student'} is a distilled encoder (a T5 with a projector), not a teacher: "
               "a teacher is a plain T5 encoder (T5EncoderModel) as wide as the transformer's T5 input")
    assert main(["cache-teacher", "--config", "tiny", f"--out={tmp_path / 'cache'}",
                 f"teacher={tmp_path / 'student'}"]) == 2
    assert one_line_error(capsys).startswith(message)
    assert main(["train", "--config", "tiny", *QUICK, f"teacher={tmp_path / 'student'}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert one_line_error(capsys).startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_a_teacher_of_another_width_is_refused_before_it_loads(tmp_path, capsys, monkeypatch):
    from transformers import T5EncoderModel

    from flux_small_encoder.tiny import tiny_t5_config

    T5EncoderModel(tiny_t5_config(d_model=16, d_kv=4)).save_pretrained(tmp_path / "t5")
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", _refuse_to_build)
    message = (f"error: teacher {tmp_path / 't5'} is 16 wide (d_model) but the transformer reads 32-wide T5 "
               "embeddings (joint_attention_dim): give a teacher of that width, such as the pipeline's own "
               "text_encoder_2 (leave teacher unset).")
    for command in (["cache-teacher", "--config", "tiny", f"--out={tmp_path / 'cache'}"],
                    ["train", "--config", "tiny", *QUICK, f"output_dir={tmp_path / 'run'}"]):
        assert main([*command, f"teacher={tmp_path / 't5'}"]) == 2
        assert one_line_error(capsys) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5"]


def test_a_teacher_cache_of_another_width_is_refused_at_training_start(tmp_path, capsys):
    from flux_small_encoder.tiny import tiny_t5_tokenizer
    from flux_small_encoder.training import load_sources, write_teacher_cache
    from flux_small_encoder.training.fingerprint import teacher_identity
    from flux_small_encoder.training.models import tokenize_t5

    config = load_config("tiny", QUICK)
    tokenizer = tiny_t5_tokenizer()
    write_teacher_cache(  # as a 16-wide teacher would have written it
        tmp_path / "cache", encode=lambda ids: torch.zeros(len(ids), ids.shape[1], 16),
        tokenize=lambda prompts: tokenize_t5(tokenizer, prompts, config.max_sequence_length),
        prompts=load_sources(config.train_data) + config.validation_prompts, teacher=teacher_identity(config),
        max_sequence_length=config.max_sequence_length, progress=False,
    )
    assert main(["train", "--config", "tiny", *QUICK, f"teacher_cache={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert one_line_error(capsys) == (
        f"error: the teacher cache {tmp_path / 'cache'} holds 16-wide embeddings, but the transformer reads 32-wide "
        "ones (its joint_attention_dim): write a cache with this pipeline's teacher (`flux-small-encoder "
        "cache-teacher` with the same model and teacher).")
    assert not (tmp_path / "run").exists()


def test_a_teacher_config_that_does_not_describe_its_weights_is_refused_before_anything_is_built(
    tmp_path, capsys, monkeypatch, teacher_folder
):
    from transformers import T5EncoderModel

    config = json.loads((teacher_folder / "config.json").read_text())
    (teacher_folder / "config.json").write_text(json.dumps({**config, "num_heads": 400_000_000}))
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", _refuse_to_build)  # 400 GB, were it built
    assert main(["cache-teacher", "--config", "tiny", f"--out={tmp_path / 'cache'}",
                 f"teacher={teacher_folder}"]) == 2
    message = one_line_error(capsys)
    assert message.startswith(f"error: the config of teacher {teacher_folder} does not describe its weights: other "
                              "shapes: encoder.block.0.layer.0.SelfAttention.k.weight [32, 32] (config says "
                              "[3200000000, 32]), ")
    assert message.endswith(f"Correct the config.json of teacher {teacher_folder} ({teacher_folder}), or give the "
                            "folder its weights were saved with.")
    (teacher_folder / "config.json").write_text(json.dumps({**config, "num_layers": 1_000_000}))
    assert main(["cache-teacher", "--config", "tiny", f"--out={tmp_path / 'cache'}",
                 f"teacher={teacher_folder}"]) == 2
    assert "it says num_layers=1000000 but the weights hold 3 T5 blocks." in one_line_error(capsys)


# --- 8. Ctrl-C -------------------------------------------------------------------------------------------------------


def _interrupt_at(step: int):
    original = DistillationTrainer.training_step

    def training_step(trainer, trajectories, step_index):
        if trainer.step + 1 == step:
            raise KeyboardInterrupt
        return original(trainer, trajectories, step_index)

    return training_step


def test_ctrl_c_names_the_last_good_checkpoint_and_the_resume_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(DistillationTrainer, "training_step", _interrupt_at(4))
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", "checkpointing_steps=2",
                 f"output_dir={out}"]) == 130
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith("interrupted")]
    assert lines == [
        f"interrupted at step 3: the last good checkpoint is {out / 'checkpoint-2'}. Resume with "
        f"resume_from_checkpoint=latest (`flux-small-encoder train --config {out / 'config.yaml'} "
        "resume_from_checkpoint=latest`).",
        "interrupted",
    ]
    monkeypatch.undo()
    assert main(["train", "--config", str(out / "config.yaml"), "resume_from_checkpoint=latest"]) == 0
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(DistillationTrainer, "training_step", _interrupt_at(2))
    assert main(["train", "--config", "tiny", *QUICK, "max_steps=6", "checkpointing_steps=4",
                 f"output_dir={out}"]) == 130
    assert (f"interrupted at step 1: no checkpoint was written yet, so there is nothing to resume. Start the run "
            f"again with a new output_dir, or after moving metrics.jsonl, config.yaml out of {out}.\ninterrupted\n"
            ) in capsys.readouterr().err


# --- 18. threads -----------------------------------------------------------------------------------------------------


def test_tiny_runs_use_one_thread_and_give_the_count_back(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = DistillationTrainer(tiny(tmp_path / "run", "max_steps=1"))
        trainer.setup()
        assert torch.get_num_threads() == 1
        trainer.cleanup()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_test_session_and_its_subprocesses_use_one_thread():
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
