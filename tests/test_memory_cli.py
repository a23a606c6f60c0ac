"""`plan` and `generate --vram`: the memory plans from the command line."""

from __future__ import annotations

import re

import huggingface_hub
import numpy as np
import pytest
from PIL import Image

from flux_small_encoder.cli import build_parser, main
from flux_small_encoder.memory import folder_footprint, plan_memory

from .test_cli import one_line_error


def plans(vram: float, size: int = 1024) -> list:
    """What the library plans for FLUX.1-dev with the student and with T5-XXL: what `plan` must print."""
    return [plan_memory(folder_footprint(None, encoder), vram, size=size) for encoder in ("t5-base-distilled", None)]


def test_plan_shows_the_student_and_t5_xxl_side_by_side(capsys):
    assert main(["plan", "--vram", "24", "--size", "1024", "--all"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith(" " * 16 + "student:"))
    assert "T5-XXL: the pipeline's own" in header  # one row, two columns
    rows = {line[:16].strip(): line[16:].split() for line in out.splitlines() if line[:16].strip()}
    student, t5 = plans(24)
    assert rows["recipe"] == [student.recipe.name, t5.recipe.name]
    assert student.recipe.name in ("resident", "tiled_decode")  # the goal: the transformer stays resident
    peaks = [f"{plan.chosen.peak / 2**30:.2f}" for plan in (student, t5)]
    assert rows["predicted peak"] == [peaks[0], "GiB", peaks[1], "GiB"]
    assert rows["time class"][:3] == ["2", "of", "6:"]
    assert "FLUX.1-dev's configs with t5-base-distilled, built without weights" in out
    assert "\n".join(f"  {call}" for call in t5.calls()) in out
    assert 'apply_group_offloading(pipe.text_encoder_2, onload_device="cuda", offload_type="leaf_level", ' in out
    if not student.measured:
        assert f"the peak's {student.peak_activation.entry.phase} figure at 1024 px is estimated" in out
    every = out[out.index("every recipe"):].splitlines()
    assert [line.split()[0] for line in every[1:]] == [
        "resident", "tiled_decode", "t5_streamed", "transformer_fp8", "group_offload", "model_cpu_offload"
    ]


def test_plan_with_a_budget_only_the_student_fits(capsys):
    assert main(["plan", "--vram", "16"]) == 0
    rows = {line[:16].strip(): line[16:].split() for line in capsys.readouterr().out.splitlines()}
    assert rows["recipe"] == [plan.recipe.name for plan in plans(16)] == ["transformer_fp8", "group_offload"]


def test_plan_refuses_a_budget_nothing_fits_with_the_smallest_that_works(capsys):
    assert main(["plan", "--vram", "0.5"]) == 2
    assert "no memory recipe fits 0.5 GiB at 1024 px: the smallest, group_offload" in one_line_error(capsys)


NOT_A_BUDGET = "must be a finite size above zero: write it as 24, '24GiB' or '16000MiB'."


@pytest.mark.parametrize("vram", ["inf", "nan", "0", "-1"])
def test_a_budget_that_is_no_size_is_a_usage_error_before_anything_is_read(vram, tmp_path, capsys, monkeypatch):
    import diffusers

    from flux_small_encoder.memory import sizes

    def refuse(*args, **kwargs):
        raise AssertionError("something was read before the budget was checked")

    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(sizes, "folder_footprint", refuse)
    for argv in (["plan"], ["generate", "a cat", "--out", str(tmp_path / "cat.png")]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--vram", vram])
        assert exit_.value.code == 2
        assert f"argument --vram: memory budget '{vram}' " in capsys.readouterr().err


@pytest.mark.parametrize("budget", [float("inf"), float("nan")])
def test_load_pipeline_refuses_a_budget_that_is_no_size_before_loading(budget, tmp_path, monkeypatch):
    import diffusers

    from flux_small_encoder import load_pipeline

    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=re.escape(f"memory budget {budget!r} {NOT_A_BUDGET}")):
        load_pipeline(str(tmp_path), memory_budget=budget)


def test_plan_model_not_cached_offline_names_the_command_that_fetches_its_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["plan", "--vram", "24", "--model", "someone/absent-flux"]) == 2
    assert one_line_error(capsys) == (
        "error: The configs of the pipeline 'someone/absent-flux' are not in the local Hugging Face cache, and the "
        "Hub could not be reached (offline, or no connection). Fetch them on a connected machine with `hf download "
        "someone/absent-flux --include model_index.json --include '*/config.json'` (a few kB), or plan without "
        "--model for FLUX.1-dev's shipped configs."
    )


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_plan_model_that_is_no_folder_nor_repo_id_says_so(kind, tmp_path, capsys):
    model = tmp_path / "FLUX.1-dev"
    what = "does not exist" if kind == "missing" else "is not a folder"
    if kind == "file":
        model.write_text("")
    assert main(["plan", "--vram", "24", "--model", str(model)]) == 2
    assert one_line_error(capsys) == (
        f"error: '{model}' {what}, and it is not a Hub repo id ('owner/name'): give a diffusers pipeline folder (with "
        "its model_index.json) or a Hub repo id such as black-forest-labs/FLUX.1-dev."
    )


def test_plan_sizes_a_local_pipeline_folder(make_pipe, student, tmp_path, capsys):
    make_pipe().save_pretrained(tmp_path / "pipe")
    student.save_pretrained(tmp_path / "student")
    assert main(["plan", "--vram", "1", "--size", "512", "--model", str(tmp_path / "pipe"), "--encoder",
                 str(tmp_path / "student"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"the configs of {tmp_path / 'pipe'} with {tmp_path / 'student'}, built without weights" in out


def test_plan_refuses_an_encoder_the_transformer_cannot_read(student, tmp_path, capsys):
    student.save_pretrained(tmp_path / "student")  # a tiny student: far narrower than FLUX.1-dev's 4096
    width = student.config.project_out_dim
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["plan", "--vram", "24", "--encoder", str(tmp_path / "student")]) == 2
    assert one_line_error(capsys) == (
        f"error: {tmp_path / 'student'} gives {width}-wide embeddings, but the transformer of FLUX.1-dev's configs "
        "reads 4096-wide ones (joint_attention_dim): it cannot take its T5 slot; plan with an encoder distilled for "
        "this pipeline."
    )


def generate(model, out, *extra):
    return main(["generate", "a cat", "--model", str(model), "--out", str(out), "--steps", "2", "--height", "32",
                 "--width", "32", "--dtype", "float32", "--device", "cpu", *extra])


def test_generate_applies_the_plan_for_its_vram(pipeline_folder, seeded_hub, tmp_path, capsys):
    assert generate(pipeline_folder, tmp_path / "cat.png", "--vram", "1") == 0
    assert re.search(r"memory plan: resident, predicted peak 0\.\d\d GiB of 1\n", capsys.readouterr().out)
    assert np.asarray(Image.open(tmp_path / "cat.png")).shape == (32, 32, 3)


def test_generate_refuses_a_vram_nothing_fits_before_loading_weights(pipeline_folder, seeded_hub, tmp_path, capsys,
                                                                    monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline's weights were loaded")

    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", refuse)
    assert generate(pipeline_folder, tmp_path / "cat.png", "--vram", "0.3") == 2
    assert "no memory recipe fits 0.3 GiB at 32 px" in one_line_error(capsys)
    assert not (tmp_path / "cat.png").exists()


def test_generate_takes_vram_or_offload_not_both(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "a cat", "--vram", "24", "--offload", "--out", str(tmp_path / "cat.png")])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("vram", ["24GiB", "24 GiB", "24576MiB"])
def test_vram_takes_what_parse_budget_takes(vram, capsys):
    """`--vram` takes a unit, as the budget's own messages suggest ('24GiB', '16000MiB'), for plan and generate."""
    assert main(["plan", "--vram", "24"]) == 0
    plain = capsys.readouterr().out
    assert main(["plan", "--vram", vram]) == 0
    assert capsys.readouterr().out == plain
    assert build_parser().parse_args(["generate", "a cat", "--vram", vram]).vram == 24
