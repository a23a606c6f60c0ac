import shutil

import numpy as np
import pytest
from PIL import Image

from flux_small_encoder.cli import main


def test_list_shows_the_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "t5-base-distilled" in out and "LifuWang/DistillT5" in out and "google/t5-v1_1-xxl" in out


def test_demo_writes_an_image_offline(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    assert "DistilledT5EncoderModel" in capsys.readouterr().out


def test_generate_end_to_end_with_a_local_pipeline(make_pipe, seeded_hub, tmp_path):
    model = tmp_path / "tiny-flux"
    make_pipe().save_pretrained(model)
    shutil.rmtree(model / "text_encoder_2")
    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "--model", str(model), "--encoder", "t5-base-distilled", "--out", str(out),
            "--steps", "2", "--height", "32", "--width", "32", "--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)


@pytest.mark.parametrize("missing", ["model", "encoder"])
def test_generate_offline_names_the_missing_repo(missing, make_pipe, seeded_hub, tmp_path, capsys):
    model = tmp_path / "tiny-flux"
    make_pipe().save_pretrained(model)
    argv = {"model": ["--model", "black-forest-labs/FLUX.1-dev"], "encoder": ["--model", str(model), "--encoder",
            "someone/not-cached"]}[missing]
    assert main(["generate", "a cat", "--dtype", "float32", *argv]) == 1
    err = capsys.readouterr().err
    repo = "black-forest-labs/FLUX.1-dev" if missing == "model" else "someone/not-cached"
    last_line = err.strip().splitlines()[-1]  # earlier lines are the libraries' own offline warnings
    assert last_line.startswith("error: ") and f"hf download {repo}" in last_line


def test_generate_unknown_encoder_lists_names(capsys):
    assert main(["generate", "a cat", "--encoder", "t5-tiny"]) == 1
    assert "Registered names: t5-base-distilled" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_existing_image_is_not_overwritten_unasked(command, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's own file")
    argv = [command, "--out", str(out)] if command == "demo" else [command, "a cat", "--out", str(out)]
    assert main(argv) == 1
    assert out.read_bytes() == b"the user's own file"
    assert "--overwrite" in capsys.readouterr().err


def test_demo_overwrites_when_asked(tmp_path):
    out = tmp_path / "demo.png"
    out.write_bytes(b"old")
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out).size == (32, 32)
