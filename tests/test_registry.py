import re
import shutil
from pathlib import Path

import pytest
import torch

from flux_small_encoder import get_pretrained_spec, list_pretrained, load_encoder
from flux_small_encoder.cli import main
from flux_small_encoder.modeling import DistilledT5EncoderModel
from flux_small_encoder.registry import ResolvedEncoder, is_repo_id, resolve_encoder


def test_registry_names_the_public_checkpoint():
    assert "t5-base-distilled" in list_pretrained()
    spec = get_pretrained_spec("t5-base-distilled")
    assert spec.repo_id == "LifuWang/DistillT5" and spec.revision is None
    assert spec.tokenizer and spec.out_dim == 4096


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="Registered names: t5-base-distilled"):
        get_pretrained_spec("t5-small-distilled")


def test_resolution_order(public_checkpoint):
    assert resolve_encoder("t5-base-distilled").path == "LifuWang/DistillT5"
    assert resolve_encoder("t5-base-distilled", revision="v2").revision == "v2"
    assert resolve_encoder(public_checkpoint).path == str(public_checkpoint)
    assert resolve_encoder(public_checkpoint).local and not resolve_encoder("t5-base-distilled").local
    assert resolve_encoder("someone/their-student").path == "someone/their-student"


def _student_folder(student, folder: Path) -> Path:
    student.save_pretrained(folder)
    return folder


def test_a_registry_name_that_is_also_a_local_folder_is_refused_naming_both_ways(student, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _student_folder(student, tmp_path / "t5-base-distilled")
    refusal = "'t5-base-distilled' is both a registered encoder and a local path: pass ./t5-base-distilled"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        resolve_encoder("t5-base-distilled")
    for explicit in ("./t5-base-distilled", Path("t5-base-distilled"), str(tmp_path / "t5-base-distilled")):
        resolved = resolve_encoder(explicit)  # an explicit path means the folder
        assert resolved.local and resolved.spec is None
        assert Path(resolved.path).resolve() == tmp_path / "t5-base-distilled"


@pytest.mark.parametrize("path", ["LifuWang/DistillT5", "runs/final", "ckpt/model.safetensors"])
def test_a_path_shaped_like_a_repo_id_that_exists_is_the_local_path(path, student, tmp_path, monkeypatch, capsys):
    # As in from_pretrained: what the trainer prints (`patch_encoder(pipe, 'run2/final')`) and the docs' examples
    # (`convert ckpt/experiment.pth out/`) are relative paths with one slash, which are also valid repo ids.
    monkeypatch.chdir(tmp_path)
    folder = _student_folder(student, tmp_path / "saved")
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".safetensors"):
        shutil.copy(folder / "model.safetensors", tmp_path / path)
    else:
        shutil.copytree(folder, tmp_path / path)
    assert is_repo_id(path)
    resolved = resolve_encoder(path, files=True)
    assert resolved == ResolvedEncoder(path, local=True)
    assert main(["info", path]) == 0
    assert "parameters:" in capsys.readouterr().out
    if not path.endswith(".safetensors"):
        assert type(load_encoder(path)) is DistilledT5EncoderModel


@pytest.mark.parametrize("command", ["info", "download", "convert", "plan", "generate"])
def test_every_command_resolves_an_ambiguous_name_the_same_way(command, student, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _student_folder(student, tmp_path / "t5-base-distilled")
    argv = {
        "info": ["info", "t5-base-distilled"],
        "download": ["download", "t5-base-distilled"],
        "convert": ["convert", "t5-base-distilled", "out"],
        "plan": ["plan", "--vram", "24", "--encoder", "t5-base-distilled"],
        "generate": ["generate", "a cat", "--encoder", "t5-base-distilled", "--model", "no/pipeline"],
    }[command]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'t5-base-distilled' is both a registered encoder and a local path: pass ./t5-base-distilled" in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["t5-base-distilled"]
    # `./NAME` is the folder: read (a tiny student, which FLUX.1-dev's transformer, read by `plan`, cannot take)
    expected = 2 if command in ("generate", "plan") else 0
    assert main([*argv[:argv.index("t5-base-distilled")], "./t5-base-distilled",
                 *argv[argv.index("t5-base-distilled") + 1:]]) == expected
    if command == "plan":
        assert "./t5-base-distilled gives 32-wide embeddings" in capsys.readouterr().err


def test_a_registry_name_loads_from_the_hub_even_beside_a_folder_named_like_its_repo(
    student, seeded_hub, tmp_path, monkeypatch
):
    from flux_small_encoder.tiny import tiny_student

    monkeypatch.chdir(tmp_path)
    other = tiny_student(seed=2)
    _student_folder(other, tmp_path / "LifuWang" / "DistillT5")
    loaded = load_encoder("t5-base-distilled")
    assert torch.equal(loaded.final_projection[0].weight, student.final_projection[0].weight)
    assert not torch.equal(loaded.final_projection[0].weight, other.final_projection[0].weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_single_weight_file_is_refused_with_the_command_that_converts_it(suffix, tmp_path):
    file = tmp_path / f"DistillT5{suffix}"
    file.write_bytes(b"weights")
    with pytest.raises(ValueError, match=re.escape(
        f"'{file}' is a single file: convert it first (`flux-small-encoder convert {file} OUT/`), then pass the folder"
    )):
        resolve_encoder(file)
    assert resolve_encoder(file, files=True).path == str(file)  # as `info` and `convert` read it


def test_a_revision_for_a_local_folder_is_refused(public_checkpoint):
    with pytest.raises(ValueError, match="is a local path, which has no revisions: leave the revision out"):
        resolve_encoder(public_checkpoint, revision="v2")


@pytest.mark.parametrize("encoder", [None, 123, b"t5-base-distilled"])
def test_what_is_not_a_name_is_refused_saying_what_is(encoder):
    with pytest.raises(TypeError, match=r"An encoder is named by a registry name \(t5-base-distilled\), a folder"):
        resolve_encoder(encoder)


@pytest.mark.parametrize("bad", ["t5-base", "not/a/repo", "./missing-folder", ""])
def test_anything_else_is_an_error_listing_names(bad):
    with pytest.raises(ValueError, match="Registered names: t5-base-distilled"):
        resolve_encoder(bad)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_encoder(tmp_path)


def test_load_encoder_through_the_hub_cache(seeded_hub):
    model = load_encoder("t5-base-distilled")
    assert model.config.project_out_dim == 32


def test_load_encoder_refuses_incomplete_weights(public_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil_copy = tmp_path / "broken"
    shutil_copy.mkdir()
    (shutil_copy / "config.json").write_text((public_checkpoint / "config.json").read_text())
    state = load_file(public_checkpoint / "model.safetensors")
    del state["final_projection.3.weight"]
    save_file(state, shutil_copy / "model.safetensors")
    with pytest.raises(ValueError, match="final_projection.3.weight"):
        load_encoder(shutil_copy)


def test_missing_repo_offline_names_the_repo():
    with pytest.raises(OSError, match="nobody/absent"):
        load_encoder("nobody/absent")
