"""The training configuration and the prompt files: YAML + overrides, shipped configs, readers and mixing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml

from flux_small_encoder.training import (
    SHIPPED_CONFIGS,
    PromptFileError,
    TrainingConfig,
    TrainingLaunchError,
    launch_command,
    launch_training,
    load_config,
    read_prompts,
)
from flux_small_encoder.training.config import config_path
from flux_small_encoder.training.data import PromptStream, load_prompts, load_sources, split_eval
from flux_small_encoder.training.lora_block import T5_LORA_TARGETS

# The choices of the config, read from its type hints as the config itself reads them.
CHOICES = {
    name: typing.get_args(hint)
    for name, hint in typing.get_type_hints(TrainingConfig).items()
    if typing.get_origin(hint) is Literal
}


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_loads(name, tmp_path):
    config = load_config(name, [f"output_dir={tmp_path}", f"data_root={tmp_path}"])
    assert isinstance(config, TrainingConfig)
    assert config_path(name).is_file()
    assert config.train_data, "every shipped config names its training prompts"
    for source in config.train_data + config.eval_data:
        assert Path(source.path).is_absolute()


def test_tiny_config_ships_its_prompts():
    config = load_config("tiny")
    prompts = load_sources(config.train_data)
    assert len(prompts) > 50 and all(prompts)


def test_paper_hyper_parameters_in_stage_configs():
    stages = {name: load_config(name) for name in ("stage1-compbench", "stage2-commontext", "stage3-mixed")}
    assert [c.max_steps for c in stages.values()] == [50_000, 70_000, 200_000]
    assert stages["stage2-commontext"].resolution == 1024
    for config in stages.values():
        assert config.learning_rate == 1e-4 and config.num_inference_steps == 20
        assert config.guidance_scales == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]


def test_overrides_win_and_are_typed(tmp_path):
    config = load_config("tiny", ["max_steps=7", "zero_pooled_embeds=true", "guidance_scales=[3.5]",
                                  "output_dir=123", "resume_from_checkpoint=latest"])
    assert config.max_steps == 7 and config.zero_pooled_embeds is True and config.guidance_scales == [3.5]
    assert config.output_dir == "123"  # paths stay strings


def test_user_yaml_relative_paths_and_saved_config(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\nа dog\n")
    (tmp_path / "run.yaml").write_text("model: tiny\ntrain_data: [prompts.txt]\nmax_steps: 3\n")
    config = load_config(tmp_path / "run.yaml", {"output_dir": str(tmp_path / "out")})
    assert config.train_data[0].path == str(tmp_path / "prompts.txt")
    (tmp_path / "out").mkdir()
    saved = config.save(tmp_path / "out")
    assert load_config(saved) == config



def test_a_relative_data_root_is_saved_absolute_so_the_saved_config_reads_the_same_prompts_from_anywhere(
    tmp_path, monkeypatch
):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p.txt").write_text("a cat\n")
    (tmp_path / "run.yaml").write_text("model: tiny\ntrain_data: [p.txt]\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("run.yaml", ["data_root=prompts", f"output_dir={tmp_path / 'out'}"])
    assert config.train_data[0].path == str(tmp_path / "prompts" / "p.txt")
    assert config.data_root == str(tmp_path / "prompts")
    (tmp_path / "out").mkdir()
    saved = config.save(tmp_path / "out")
    monkeypatch.chdir(tmp_path / "out")  # a resume, started from another folder
    assert load_config(saved) == config

@pytest.mark.parametrize(
    "overrides, message",
    [(["mixed_precision=fp16"], "bf16"), (["objective=kl"], "objective"), (["max_stepz=3"], "unknown config keys"),
     (["max_steps"], "key=value"), (["max_steps=0"], "at least 1")],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", overrides)


def test_unknown_config_name():
    with pytest.raises(FileNotFoundError, match="stage1-compbench"):
        load_config("stage9")


def test_prompt_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n  two  \n\n")
    (tmp_path / "b.json").write_text(json.dumps(["three", "", {"prompt": "four"}]))
    (tmp_path / "c.jsonl").write_text('"five"\n\n{"caption": "six", "x": 1}\n')
    (tmp_path / "d.csv").write_text("id,caption\n1,seven\n2,\n3,eight\n")
    assert read_prompts(tmp_path / "a.txt") == ["one", "two"]
    assert read_prompts(tmp_path / "b.json") == ["three", "four"]
    assert read_prompts(tmp_path / "c.jsonl", column="caption") == ["five", "six"]
    assert read_prompts(tmp_path / "d.csv", column="caption") == ["seven", "eight"]


@pytest.mark.parametrize(
    "name, text, where",
    [("bad.json", '[\n"a",\n"b"\n"c"]', "bad.json:4"), ("bad.jsonl", '"a"\n{"prompt": 3}\n', "bad.jsonl, line 2"),
     ("list.json", '["a", 3]', "list.json, item 1"),
     ("bad2.jsonl", '"a"\n"b"\n{oops\n', "bad2.jsonl:3"), ("bad.csv", "id,text\n1,a\n", "bad.csv:1"),
     ("bad.yaml", "x", "unknown prompt file type")],
)
def test_malformed_prompt_file_names_file_and_line(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptFileError, match=where.replace(".", r"\.")):
        read_prompts(tmp_path / name)


def test_malformed_file_fails_the_trainer_at_start(tmp_path):
    from flux_small_encoder.cli import main

    (tmp_path / "p.jsonl").write_text('"ok"\n{broken\n')
    code = main(["train", "--config", "tiny", f"train_data=[{tmp_path / 'p.jsonl'}]",
                 f"output_dir={tmp_path / 'out'}", "report_to=none"])
    assert code == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".csv"])
def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tmp_path, suffix):
    (tmp_path / f"p{suffix}").write_bytes(b"prompt\n\x00\x80\xff\xfe\n")
    with pytest.raises(PromptFileError, match=re.escape(f"{tmp_path / f'p{suffix}'}:2: not UTF-8 text (byte 0x80): a "
                                                        "prompt file must be UTF-8 text; save it as UTF-8.")):
        read_prompts(tmp_path / f"p{suffix}", column="prompt")


def test_no_training_prompts_is_said_first_and_a_repeat_of_zero_is_refused(tmp_path, capsys):
    from flux_small_encoder.cli import main

    (tmp_path / "empty.yaml").write_text("")
    assert main(["train", "--config", str(tmp_path / "empty.yaml"), f"output_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err == ("error: train_data gives no prompts: it names no prompt file; give train_data "
                                       "(in the YAML config, or as train_data=[prompts.txt]).\n")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"tiny_prompts.txt must be above 0, got 0.0 \(to leave the source out, "):
        load_config("tiny", ["train_data=[{path: package:tiny_prompts.txt, repeat: 0}]"])
    config = load_config("tiny", ["train_data=[{path: package:tiny_prompts.txt, repeat: 0.001}]"])
    with pytest.raises(ValueError, match="train_data gives no prompts: its repeats take none of them; raise repeat"):
        load_prompts(config)


@pytest.mark.parametrize("where", ["file", "dev/null", "inside a file"])
def test_an_output_dir_that_is_no_folder_is_refused_with_the_config(tmp_path, where):
    (tmp_path / "file").write_text("kept")
    output_dir = {"file": tmp_path / "file", "dev/null": Path("/dev/null"), "inside a file": tmp_path / "file" / "run"}
    what = {"file": "is a file", "dev/null": "is a character device",
            "inside a file": f"is inside {tmp_path / 'file'}, which is a file"}[where]
    with pytest.raises(ValueError, match=re.escape(f"output_dir={output_dir[where]} {what}, not a folder: give a "
                                                   "folder (new or one of an earlier run) for the run's checkpoints")):
        load_config("tiny", [f"output_dir={output_dir[where]}"])
    assert (tmp_path / "file").read_text() == "kept"


def test_mixing_by_repeat_and_weight(tmp_path):
    (tmp_path / "small.txt").write_text("\n".join(f"s{i}" for i in range(10)))
    (tmp_path / "big.txt").write_text("\n".join(f"b{i}" for i in range(90)))
    config = load_config("tiny", {"train_data": [{"path": str(tmp_path / "small.txt"), "repeat": 2.5},
                                                 {"path": str(tmp_path / "big.txt")}]})
    mixed = load_sources(config.train_data, seed=0)
    assert sum(p.startswith("s") for p in mixed) == 25 and sum(p.startswith("b") for p in mixed) == 90
    config = load_config("tiny", {"train_data": [{"path": str(tmp_path / "small.txt"), "weight": 1},
                                                 {"path": str(tmp_path / "big.txt"), "weight": 1}]})
    mixed = load_sources(config.train_data, seed=0)
    # Equal weights: half the mix from each source, whatever their sizes.
    assert sum(p.startswith("s") for p in mixed) == 50 and abs(sum(p.startswith("b") for p in mixed) - 50) <= 1


def test_glob_sources_and_empty_glob(tmp_path):
    for name in ("x_train.txt", "y_train.txt", "x_val.txt"):
        (tmp_path / name).write_text(name)
    config = load_config("tiny", {"train_data": [str(tmp_path / "*_train.txt")]})
    assert load_sources(config.train_data) == ["x_train.txt", "y_train.txt"]
    config = load_config("tiny", {"train_data": [str(tmp_path / "*_test.txt")]})
    with pytest.raises(PromptFileError, match="matches no file"):
        load_sources(config.train_data)


def test_stream_is_a_function_of_seed_and_position():
    prompts = [f"p{i}" for i in range(10)]
    stream = PromptStream(prompts, seed=3)
    first_epoch = stream.take(0, 10)
    assert sorted(first_epoch) == prompts and first_epoch != prompts
    assert PromptStream(prompts, seed=3).take(13, 4) == stream.take(13, 4)
    # Two processes taking alternate halves see what one process with the double batch sees.
    assert stream.take(20, 2) + stream.take(22, 2) == stream.take(20, 4)


def test_split_eval_holds_prompts_out():
    prompts = [f"p{i}" for i in range(20)] * 2
    train, held_out = split_eval(prompts, 5)
    assert len(held_out) == 5 and not set(train) & set(held_out) and len(train) == 30


def test_launch_command_runs_the_training_module_on_n_processes():
    command = launch_command("tiny", ["output_dir=/tmp/x", "lora.r=4"], 8, mixed_precision="bf16")
    assert command[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    assert command[command.index("--num_processes") + 1] == "8"
    assert command[command.index("--mixed_precision") + 1] == "bf16"
    assert command[-6:] == ["-m", "flux_small_encoder.training", "--config", "tiny", "output_dir=/tmp/x", "lora.r=4"]
    with pytest.raises(ValueError, match="at least 2"):
        launch_command("tiny", [], 1)


def test_launch_training_checks_the_config_first_and_names_the_exit_status(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 3)
    with pytest.raises(ValueError, match="objective='kl'"):
        launch_training("tiny", ["objective=kl"], 2)
    assert calls == []  # a bad config starts no process
    with pytest.raises(TrainingLaunchError, match="exit status 3"):
        launch_training("tiny", ["mixed_precision=bf16", f"output_dir={tmp_path}"], 2)
    assert len(calls) == 1 and calls[0][calls[0].index("--mixed_precision") + 1] == "bf16"


# --- choices and the LoRA block -------------------------------------------------------------------------------------


def test_the_choices_are_the_literal_hints():
    assert set(CHOICES) == {"objective", "student_init", "mixed_precision", "report_to", "attention_backend",
                            "lr_scheduler"}


def test_every_lr_scheduler_choice_is_a_diffusers_schedule_that_builds():
    import torch
    from diffusers.optimization import SchedulerType

    from flux_small_encoder.training.state import apply_optimizer_config, build_lr_scheduler

    assert set(CHOICES["lr_scheduler"]) <= {kind.value for kind in SchedulerType}
    for name in CHOICES["lr_scheduler"]:
        config = load_config("tiny", [f"lr_scheduler={name}"])
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        apply_optimizer_config(optimizer, config)  # as a resume does
        assert build_lr_scheduler(optimizer, config, step=3).get_last_lr()[0] >= 0


@pytest.mark.parametrize("name, value", [(name, value) for name, values in CHOICES.items() for value in values])
def test_every_allowed_value_of_a_choice_loads(name, value):
    assert getattr(load_config("tiny", [f"{name}={value}"]), name) == value


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_a_value_outside_a_choice_is_refused_naming_the_allowed_values(name):
    with pytest.raises(ValueError) as error:
        load_config("tiny", [f"{name}=bogus"])
    message = str(error.value)
    assert message.startswith(f"{name}='bogus' is not one of ") and "\n" not in message
    assert re.findall(r"'(\w+)'", message.split(" (")[0])[1:] == list(CHOICES[name])


def test_default_student_is_the_published_students_start():
    assert TrainingConfig().student == "google/flan-t5-base"


def test_lora_block_from_yaml_and_dotted_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("model: tiny\nstudent_init: t5\nlora: {r: 8, use_dora: true}\n")
    config = load_config(tmp_path / "run.yaml", ["lora.r=4", "lora.target_modules=[q, v]"])
    assert config.lora == {"r": 4, "use_dora": True, "target_modules": ["q", "v"]}
    # Absent or empty: full fine-tuning; without target_modules: T5's projections.
    assert load_config("tiny").lora == {}
    assert load_config("tiny", ["student_init=t5", "lora.r=2"]).lora == {"r": 2, "target_modules": T5_LORA_TARGETS}


def test_flat_lora_keys_still_load_into_the_block_with_a_warning():
    with pytest.warns(FutureWarning, match=r"lora_rank -> lora\.r, lora_dropout -> lora\.lora_dropout"):
        config = load_config("tiny", ["student_init=t5", "lora_rank=4", "lora_dropout=0.1",
                                      "lora_train_projector=true"])
    assert config.lora == {"r": 4, "lora_alpha": 4, "lora_dropout": 0.1, "modules_to_save": ["final_projection"],
                           "target_modules": T5_LORA_TARGETS}


def test_a_config_saved_with_flat_lora_keys_still_loads(tmp_path):
    saved = load_config("tiny").to_dict()
    del saved["lora"]
    saved.update(lora_rank=0, lora_alpha=None, lora_dropout=0.0, lora_target_modules=["q"], lora_train_projector=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.warns(FutureWarning, match="lora_rank"):
        assert load_config(tmp_path / "config.yaml").lora == {}  # rank 0 meant full fine-tuning


@pytest.mark.parametrize(
    "override, message",
    [("lora.rank=4", "lora.rank is not an argument of peft's LoraConfig"),
     ("lora.r=four", "lora.r must be of type int"), ("lora.use_dora=maybe", "lora.use_dora must be of type bool"),
     ("lora=8", "lora must be a mapping"),
     ("lora.r=0", "lora.r must be at least 1")],
)
def test_a_bad_lora_block_fails_at_config_time_naming_the_field(override, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        load_config("tiny", ["student_init=t5", override])
    assert "\n" not in str(error.value)


# --- every value against its type hint -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [("max_steps=abc", "max_steps must be a whole number, got 'abc' (Optimizer steps to train for.)"),
     ("max_steps=1.5", "max_steps must be a whole number, got 1.5"),
     ("max_steps=true", "max_steps must be a whole number, got True"),
     ("seed=abc", "seed must be a whole number, got 'abc'"),
     ("seed=-1", "seed must be between 0 and 2**32 - 1, got -1."),
     ("output_dir=", "output_dir must be a string, got None (Where checkpoints"),
     ("train_data=5", "train_data must be a list whose items are each a path or a mapping of path, column, repeat, "
                      "weight, got 5"),
     ("eval_data=5", "eval_data must be a list whose items are each a path"),
     ("validation_prompts=5", "validation_prompts must be a list of strings, got 5"),
     ("train_data=[{path: a.txt, weight: abc}]", "train_data[0].weight must be a finite number or null, got 'abc'."),
     ("train_data=[{path: 5}]", "train_data[0].path must be a string, got 5."),
     ("train_data=[{path: a.txt, repeat: -1}]", "repeat of the prompt source"),
     ("guidance_scales=abc", "guidance_scales must be a list of finite numbers, got 'abc'"),
     ("guidance_scales=[.nan]", "guidance_scales[0] must be a finite number, got nan."),
     ("num_eval_prompts=-1", "num_eval_prompts must not be negative, got -1."),
     ("lr_scheduler=xx", "lr_scheduler='xx' is not one of 'constant', 'constant_with_warmup', 'linear', 'cosine', "
                         "'cosine_with_restarts', 'polynomial'"),
     ("learning_rate=.nan", "learning_rate must be a finite number, got nan"),
     ("learning_rate=nan", "learning_rate must be a finite number, got 'nan'"),
     ("max_grad_norm=.inf", "max_grad_norm must be a finite number, got inf"),
     ("validation_seeds=abc", "validation_seeds must be a list of whole numbers, got 'abc'"),
     ("validation_seeds=[0.5]", "validation_seeds[0] must be a whole number, got 0.5."),
     ("adam_beta2=1", "adam_beta2 must be at least 0 and below 1, got 1.0."),
     ("zero_pooled_embeds=3", "zero_pooled_embeds must be true or false, got 3"),
     ("checkpoints_total_limit=-1", "checkpoints_total_limit must be at least 1, or 0 / null to keep every "
                                    "checkpoint; got -1.")],
)
def test_every_value_is_checked_against_its_type_hint_naming_field_value_and_expectation(override, message):
    with pytest.raises(ValueError) as error:
        load_config("tiny", [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_numbers_yaml_reads_as_strings_are_numbers_and_paths_are_strings(tmp_path):
    config = load_config("tiny", ["max_steps=1e3", "learning_rate=1e-4", "checkpoints_total_limit=0"])
    assert config.max_steps == 1000 and type(config.max_steps) is int and config.learning_rate == 1e-4
    config = TrainingConfig(model="tiny", output_dir=tmp_path / "run", train_data=[tmp_path / "a.txt"])
    assert config.output_dir == str(tmp_path / "run") and config.train_data[0].path == str(tmp_path / "a.txt")
    (tmp_path / "run").mkdir()
    assert yaml.safe_load(config.save(tmp_path / "run").read_text())["output_dir"] == str(tmp_path / "run")


def test_a_checkpoint_limit_keeps_that_many_and_zero_keeps_all(tmp_path):
    from flux_small_encoder.training.checkpointing import prune_checkpoints

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    prune_checkpoints(tmp_path, load_config("tiny", ["checkpoints_total_limit=0"]).checkpoints_total_limit)
    assert len(list(tmp_path.iterdir())) == 3
    prune_checkpoints(tmp_path, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-6"]


# --- YAML files --------------------------------------------------------------------------------------------------


def test_yaml_errors_name_the_file_and_duplicate_keys_are_refused(tmp_path):
    from flux_small_encoder.training.config_checks import UniqueKeyLoader

    (tmp_path / "dup.yaml").write_text("model: tiny\nmax_steps: 1\nmax_steps: 2\n")
    with pytest.raises(ValueError) as error:
        load_config(tmp_path / "dup.yaml")
    assert str(error.value) == (f"{tmp_path / 'dup.yaml'}, line 3, column 1: found the key 'max_steps' a second time "
                                "(first on line 2): give each key once.")
    with pytest.raises(ValueError, match="override lora: the value '{r: 1, r: 2}' is not valid YAML"):
        load_config("tiny", ["lora={r: 1, r: 2}"])
    # A merge key's entries may be overridden one by one.
    assert yaml.load("a: &a {r: 4, s: 1}\nb: {<<: *a, r: 8}\n", Loader=UniqueKeyLoader)["b"] == {"r": 8, "s": 1}


@pytest.mark.parametrize("text, message", [
    (b"model: tiny\nmax_steps: [1\n", "line 3, column 1: expected ',' or ']', but got '<stream end>' (while parsing a "
                                       "flow sequence); correct the YAML there."),
    (b"model: tiny\n\tmax_steps: 1\n", "line 2, column 1: found character '\\t' that cannot start any token (while "
                                        "scanning for the next token); correct the YAML there."),
    (b"model: \x80\xff\n", "byte 7: not UTF-8 text (invalid start byte, 0x80); save the config as UTF-8."),
    (b"model: \"a\x07\"\n", "character 9: a control character (0x07) that YAML does not allow; remove it."),
])
def test_a_yaml_syntax_error_is_one_line_naming_the_file_line_and_column(tmp_path, capsys, text, message):
    from flux_small_encoder.cli import main

    (tmp_path / "broken.yaml").write_bytes(text)
    assert main(["train", "--config", str(tmp_path / "broken.yaml"), f"output_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'broken.yaml'}, {message}\n"
    assert not (tmp_path / "out").exists()


def test_the_model_card_convert_and_hub_do_not_load_the_training_package():
    code = ("import sys, flux_small_encoder.model_card, flux_small_encoder.convert, flux_small_encoder.hub; "
            "print(sorted(name for name in sys.modules if name.startswith('flux_small_encoder.training')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"
