"""Files and inputs no one can use against the package (issue 9): each bad input is refused with one line that names
the problem and the fix (exit status 2 from the CLI), before anything is built, loaded or written, and nothing is lost.

`push` is tested in test_hub.py, beside its Hub stand-ins.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from flux_small_encoder import checkpoint, load_encoder, patch_encoder, registry
from flux_small_encoder.checkpoint import INDEX_NAME
from flux_small_encoder.cli import main
from flux_small_encoder.convert import convert
from flux_small_encoder.modeling import DistilledT5EncoderModel
from flux_small_encoder.tiny import tiny_student, tiny_teacher

from .conftest import seed_hub_cache
from .test_cli import one_line_error

FIX_CONFIG_FILE = (
    "Correct the file, or leave it out and convert the weights alone (`flux-small-encoder convert model.safetensors "
    "OUT/` reads the sizes off the tensor shapes)."
)
FIX_STORED_CONFIG = (
    "Correct the config stored with it (its config.json), or convert the weight file alone: `flux-small-encoder "
    "convert WEIGHTS OUT/` infers the dimensions from the tensor shapes."
)


def cli_error(argv: list[str], capsys) -> str:
    """The one line a refused command printed, asserting exit status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    return one_line_error(capsys)


def contents(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (`None` for a folder or a dangling link): what must survive a refusal
    unchanged."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


@pytest.fixture
def saved(student, tmp_path) -> Path:
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.fixture
def no_model_is_built(monkeypatch):
    """Fail the test if anything builds a `DistilledT5EncoderModel` (even on the meta device)."""

    def refuse(self, config):
        raise AssertionError(f"a model was built for a config with num_layers={config.num_layers}")

    monkeypatch.setattr(DistilledT5EncoderModel, "__init__", refuse)


@pytest.fixture
def no_pipeline_is_loaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the input was checked")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", refuse)


# --- files that are not what their names say: said as they are ------------------------------------------------------


def test_weights_that_are_no_regular_file_are_named_as_what_they_are(saved, make_pipe, capsys):
    weights = saved / "model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    expected = (
        f"'{weights}' is a character device (a symlink to /dev/zero), not a file: fetch or copy the weights again."
    )
    assert cli_error(["info", str(saved)], capsys) == f"error: {expected}"
    with pytest.raises(ValueError) as refused:
        patch_encoder(make_pipe(), saved)
    assert str(refused.value) == expected


def test_a_config_that_is_a_pipe_is_named_as_one_and_never_opened(saved, capsys):
    (saved / "config.json").unlink()
    os.mkfifo(saved / "config.json")  # opening it to read would block until someone writes
    assert cli_error(["info", str(saved)], capsys) == (
        f"error: The folder '{saved}' holds a config.json that is a named pipe (FIFO), not a file: it is not a saved "
        "encoder. Point to the folder that `save_pretrained` wrote (config.json + model.safetensors)."
    )
    os.mkfifo(saved.parent / "weights.safetensors")
    assert cli_error(["convert", str(saved.parent / "weights.safetensors"), str(saved.parent / "out")], capsys) == (
        f"error: '{saved.parent / 'weights.safetensors'}' is a named pipe (FIFO), not a folder or a file: point to "
        "the folder that `save_pretrained` wrote."
    )


def test_a_missing_shard_is_named(student, tmp_path, capsys):
    folder = tmp_path / "sharded"
    student.save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert cli_error(["info", str(folder)], capsys) == (
        f"error: '{folder / INDEX_NAME}' names the shard '{shard.name}', which the folder does not hold: fetch or "
        "copy it again, or re-save the model."
    )


# --- a config that asks for more than the weights hold (item 11) ----------------------------------------------------


def test_info_refuses_a_million_layers_before_building_anything(saved, no_model_is_built, capsys):
    edit_config(saved, num_layers=1_000_000)
    assert cli_error(["info", str(saved)], capsys) == (
        f"error: The config does not describe the weights of '{saved}': it says num_layers=1000000 but the weights "
        f"hold 2 T5 blocks. {FIX_STORED_CONFIG}"
    )


def test_load_encoder_refuses_a_million_layers_before_building_anything(saved, no_model_is_built):
    edit_config(saved, num_layers=1_000_000)
    with pytest.raises(ValueError, match="it says num_layers=1000000 but the weights hold 2 T5 blocks"):
        load_encoder(saved)


def test_load_encoder_checks_a_hub_repo_before_building_anything(saved, no_model_is_built):
    edit_config(saved, num_layers=1_000_000)
    seed_hub_cache("someone/huge-config", {name: saved / name for name in ("config.json", "model.safetensors")})
    with pytest.raises(ValueError, match="it says num_layers=1000000 but the weights hold 2 T5 blocks"):
        load_encoder("someone/huge-config")


def test_patch_encoder_refuses_a_million_layers_and_leaves_the_pipeline(saved, make_pipe, monkeypatch):
    pipe = make_pipe()
    teacher = pipe.text_encoder_2
    edit_config(saved, num_layers=1_000_000)
    with pytest.raises(ValueError, match="it says num_layers=1000000 but the weights hold 2 T5 blocks"):
        patch_encoder(pipe, saved)
    assert pipe.text_encoder_2 is teacher


def test_config_wider_than_the_weights_is_refused_before_loading(saved, monkeypatch):
    monkeypatch.setattr(DistilledT5EncoderModel, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded"))
    edit_config(saved, d_model=100_000, project_in_dim=100_000)
    with pytest.raises(ValueError, match=r"SelfAttention.k.weight \[16, 16\] \(config says \[16, 100000\]\)"):
        load_encoder(saved)


# --- .pth files that expand, are damaged, or hold views (items 11 and 15) -------------------------------------------


def _deflated_copy(source: Path, target: Path) -> Path:
    """`source` re-zipped with compressed records: what a small file that expands to a large one looks like."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as compressed:
        for record in original.infolist():
            compressed.writestr(record.filename, original.read(record.filename))
    return target


def test_pth_that_expands_beyond_its_size_is_refused_before_unpickling(tmp_path, monkeypatch, capsys):
    torch.save({"encoder.shared.weight": torch.zeros(1_000_000)}, tmp_path / "plain.pth")  # 3.8 MB of zeros
    bomb = _deflated_copy(tmp_path / "plain.pth", tmp_path / "bomb.pth")
    assert bomb.stat().st_size < 50_000

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load ran")

    monkeypatch.setattr(torch, "load", refuse)
    line = cli_error(["info", str(bomb)], capsys)
    size = f"{bomb.stat().st_size / 1024:.1f} KB"
    assert line == (
        f"error: Refusing to load '{bomb}': its records would expand to 3.8 MB from a {size} file (`torch.save` "
        "stores them uncompressed). Nothing was unpacked; if the file is yours, save the state dict again with "
        "`torch.save` or `safetensors.torch.save_file`."
    )


def test_pth_whose_views_describe_more_than_it_stores_is_refused(student, tmp_path, capsys):
    state = {key: value.clone() for key, value in student.state_dict().items()}
    view = torch.zeros(1, 16).expand(320, 16)  # 64 bytes stored, 20 KB once copied
    state["encoder.shared.weight"] = state["encoder.encoder.embed_tokens.weight"] = view
    torch.save(state, tmp_path / "views.pth")
    line = cli_error(["convert", str(tmp_path / "views.pth"), str(tmp_path / "out")], capsys)
    assert line.startswith(f"error: Refusing to load '{tmp_path / 'views.pth'}': its tensors describe ")
    assert line.endswith(
        "(views that repeat the same storage). Save each tensor whole (`.contiguous()`) and try again."
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["random bytes", "flipped byte"])
def test_damaged_pth_is_reported_as_damaged_not_as_unsafe(damage, student, tmp_path, capsys):
    path = tmp_path / "student.pth"
    torch.save(student.state_dict(), path)
    data = bytearray(path.read_bytes())
    if damage == "random bytes":
        data = bytearray(os.urandom(len(data)))
        expected = (
            f"error: Cannot read '{path}': it is not a complete `torch.save` archive (File is not a zip file). The "
            "file is truncated or damaged (fetch or copy it again), or was saved by PyTorch before 1.6, whose format "
            "is not read here (load it with that PyTorch and save it again)."
        )
    else:
        position = data.index(b"collections")  # inside the pickle: it would ask for a global that does not exist
        data[position] = ord("X")
        expected = (
            f"error: Cannot read '{path}': its record 'student/data.pkl' does not match its checksum, so the file is "
            "damaged. Fetch or copy it again."
        )
    path.write_bytes(bytes(data))
    line = cli_error(["info", str(path)], capsys)
    assert line == expected
    assert "weights_only=False" not in line  # no advice to unpickle it


# --- convert --overwrite (item 12) ----------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_model(saved, tmp_path, capsys):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "src").mkdir()
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "config.json").write_text("{}")
    before = contents(project)
    assert cli_error(["convert", str(saved), str(project), "--overwrite"], capsys) == (
        f"error: Refusing to replace '{project}': it holds .git, src, which a saved encoder does not. --overwrite "
        "replaces only an empty folder or one holding a distilled encoder and nothing else (config.json, weights, "
        "tokenizer files, README.md, training_config.yaml); choose another destination, or move what you want to keep "
        "out of it first."
    )
    assert contents(project) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["project", "student"]  # no staging left behind


def test_overwrite_refuses_another_kind_of_model(saved, tmp_path, capsys):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    (other / "model.safetensors").write_bytes(b"someone's weights")
    before = contents(other)
    assert cli_error(["convert", str(saved), str(other), "--overwrite"], capsys) == (
        f"error: Refusing to replace '{other}': its config.json is not a distilled encoder's (no project_out_dim); "
        "choose another destination, or move what you want to keep out of it first."
    )
    assert contents(other) == before


def test_overwrite_refuses_a_file_where_the_folder_would_go(saved, tmp_path):
    notes = tmp_path / "notes"
    notes.write_text("mine")
    with pytest.raises(ValueError, match=r"it is a file, and the destination of a folder conversion is a folder"):
        convert(saved, notes, overwrite=True)
    assert notes.read_text() == "mine"


def test_overwrite_refuses_a_file_that_is_not_safetensors_where_the_comfyui_file_would_go(saved, tmp_path, capsys):
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes, misnamed")
    assert cli_error(["convert", str(saved), str(notes), "--overwrite"], capsys) == (
        f"error: Refusing to replace '{notes}': it is not a safetensors file (its header does not parse), so it "
        "holds no weights --overwrite may replace; choose another destination, or move what you want to keep out of "
        "it first."
    )
    assert notes.read_text() == "my notes, misnamed"
    comfy = tmp_path / "comfy.safetensors"
    convert(saved, comfy)
    convert(saved, comfy, overwrite=True)  # a safetensors file is replaced


def test_overwrite_replaces_a_trainers_final_folder(saved, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(saved, final)
    (final / "training_config.yaml").write_text("max_steps: 10\n")
    (final / "README.md").write_text("# my encoder\n")
    convert(saved, final, overwrite=True)
    assert sorted(path.name for path in final.iterdir()) == ["config.json", "model.safetensors"]


# --- a sharded index that points outside its folder (item 13) -------------------------------------------------------


@pytest.fixture
def sharded(student, tmp_path) -> Path:
    folder = tmp_path / "sharded"
    student.save_pretrained(folder, max_shard_size="20KB")
    return folder


def _point_a_shard_outside(folder: Path, where: str) -> tuple[Path, str]:
    """Move the first shard out of `folder` and make the index name it there; return the moved file and its name."""
    index = json.loads((folder / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    moved = folder.parent / shard
    (folder / shard).rename(moved)
    name = f"../{shard}" if where == "relative" else str(moved)
    index["weight_map"] = {key: name if value == shard else value for key, value in index["weight_map"].items()}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return moved, name


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_index_naming_a_shard_outside_the_folder_is_refused(where, sharded, tmp_path, monkeypatch, capsys):
    moved, name = _point_a_shard_outside(sharded, where)
    opened, safe_open = [], checkpoint.safe_open

    def recording_safe_open(path, **kwargs):
        opened.append(Path(path))
        return safe_open(path, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", recording_safe_open)
    expected = (
        f"'{sharded / INDEX_NAME}' names '{name}' as a shard, which is not a file of its own folder: refused, nothing "
        "was read from it. Re-save the model, or correct the index's weight_map."
    )
    assert cli_error(["info", str(sharded)], capsys) == f"error: {expected}"
    assert cli_error(["convert", str(sharded), str(tmp_path / "out")], capsys) == f"error: {expected}"
    with pytest.raises(ValueError) as refused:
        load_encoder(sharded)
    assert str(refused.value) == expected
    assert moved not in opened and not (tmp_path / "out").exists()


# --- config.json values (item 14) -----------------------------------------------------------------------------------


NOT_AN_OBJECT = 'not an object of config fields ({"d_model": ..., ...})'
FEED_FORWARD = (
    "feed_forward_proj must be an activation of transformers' ACT2FN, alone or as 'gated-ACT' (such as 'relu' or "
    "'gated-gelu'), not 'weird-thing'"
)
BAD_CONFIGS = {
    "negative": ({"d_model": -16}, "is invalid: d_model must be a whole number above 0, not -16"),
    "fraction": ({"num_heads": 2.5}, "is invalid: num_heads must be a whole number above 0, not 2.5"),
    "text": ({"num_layers": "2"}, "is invalid: num_layers must be a whole number above 0, not '2'"),
    "zero": ({"vocab_size": 0}, "is invalid: vocab_size must be a whole number above 0, not 0"),
    "dropout": ({"dropout_rate": 5}, "is invalid: dropout_rate must be a probability from 0 to 1, not 5"),
    "activation": ({"feed_forward_proj": "weird-thing"}, f"is invalid: {FEED_FORWARD}"),
    "not json": (
        "{not json", "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    ),
    "list": ("[1, 2]", f"holds a JSON list, {NOT_AN_OBJECT}"),
    "null": ("null", f"holds null, {NOT_AN_OBJECT}"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "is nested too deeply to be a config"),
}


def _break_config(folder: Path, case: str) -> str:
    """Break the config.json in `folder` as `case` says; return what the refusal says of it."""
    changes, problem = BAD_CONFIGS[case]
    if isinstance(changes, str):
        (folder / "config.json").write_text(changes)
    else:
        edit_config(folder, **changes)
    return problem


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_values_are_one_line(case, saved, tmp_path, make_pipe, capsys):
    expected = f"The config.json of '{saved}' {_break_config(saved, case)}. {FIX_CONFIG_FILE}"
    before = contents(tmp_path)
    for argv in (
        ["info", str(saved)], ["convert", str(saved), str(tmp_path / "out")], ["push", str(saved), "me/encoder"],
        ["plan", "--vram", "24", "--encoder", str(saved)],
    ):
        assert cli_error(argv, capsys) == f"error: {expected}", argv[0]
    for load in (load_encoder, lambda folder: patch_encoder(make_pipe(), folder)):
        with pytest.raises(ValueError) as refused:
            load(saved)
        assert str(refused.value) == expected
    assert contents(tmp_path) == before


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_given_to_convert_is_one_line(case, student, tmp_path, capsys):
    torch.save(student.state_dict(), tmp_path / "experiment.pth")
    (tmp_path / "given").mkdir()
    (tmp_path / "given" / "config.json").write_text(json.dumps(student.config.to_dict()))
    problem = _break_config(tmp_path / "given", case)
    config = tmp_path / "given" / "config.json"
    argv = ["convert", str(tmp_path / "experiment.pth"), str(tmp_path / "out"), "--config", str(config)]
    assert cli_error(argv, capsys) == (
        f"error: The config '{config}' {problem}. Pass the config.json the checkpoint was trained with."
    )
    assert not (tmp_path / "out").exists()


# --- generate (item 14) ---------------------------------------------------------------------------------------------


FLUX = "black-forest-labs/FLUX.1-dev"


def generate_args(model: Path | str, encoder: Path | str, out: Path) -> list[str]:
    return ["generate", "a cat", "--model", str(model), "--encoder", str(encoder), "--out", str(out), "--steps", "2",
            "--height", "32", "--width", "32", "--dtype", "float32", "--device", "cpu"]


def test_generate_truncated_weights_fail_before_the_pipeline_loads(saved, tmp_path, no_pipeline_is_loaded, capsys):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = cli_error(generate_args("black-forest-labs/FLUX.1-dev", saved, tmp_path / "cat.png"), capsys)
    assert line.startswith(f"error: Cannot read '{weights}' as safetensors (")
    assert line.endswith("): is the file complete? Fetch or copy it again.")
    assert not (tmp_path / "cat.png").exists()


def test_generate_plain_t5_folder_fails_before_the_pipeline_loads(tmp_path, no_pipeline_is_loaded, capsys):
    tiny_teacher().save_pretrained(tmp_path / "t5")
    assert cli_error(generate_args("black-forest-labs/FLUX.1-dev", tmp_path / "t5", tmp_path / "cat.png"), capsys) == (
        f"error: '{tmp_path / 't5'}' is a plain T5 checkpoint, not a distilled encoder (its config has no "
        "project_out_dim). Build a student from it with `DistilledT5EncoderModel.from_t5_encoder(path, "
        "project_out_dim=...)`."
    )


def test_generate_wrong_width_student_is_one_line(pipeline_folder, tmp_path, capsys):
    tiny_student(project_out_dim=24).save_pretrained(tmp_path / "wide")
    capsys.readouterr()
    assert main(generate_args(pipeline_folder, tmp_path / "wide", tmp_path / "cat.png")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (  # earlier lines: the loaders' progress bars
        "error: The encoder produces 24-wide embeddings but FluxTransformer2DModel expects joint_attention_dim=32. "
        "Use an encoder distilled for this transformer (project_out_dim=32)."
    )
    assert not (tmp_path / "cat.png").exists()


@pytest.mark.parametrize("kind", ["empty folder", "encoder folder"])
def test_generate_model_that_is_not_a_pipeline_is_refused_first(kind, saved, tmp_path, no_pipeline_is_loaded, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(registry, "load_encoder", lambda *args, **kwargs: pytest.fail("the encoder was loaded"))
    model = saved if kind == "encoder folder" else tmp_path / "empty"
    model.mkdir(exist_ok=True)
    looks_like = " It holds a config.json: a single model, such as an encoder (which goes to --encoder)."
    looks_like = looks_like if kind == "encoder folder" else ""
    assert cli_error(generate_args(model, saved, tmp_path / "cat.png"), capsys) == (
        f"error: --model {model} is not a diffusers pipeline folder: it has no model_index.json.{looks_like} Pass a "
        "folder saved with the pipeline's save_pretrained, or a Hub repo id such as black-forest-labs/FLUX.1-dev."
    )


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_generate_model_that_is_no_folder_nor_repo_id_is_refused_first(kind, saved, tmp_path, no_pipeline_is_loaded,
                                                                       capsys, monkeypatch):
    monkeypatch.setattr(registry, "load_encoder", lambda *args, **kwargs: pytest.fail("the encoder was loaded"))
    model = tmp_path / "no" / "FLUX.1-dev"
    if kind == "file":
        model.parent.mkdir()
        model.write_text("")
    what = "does not exist" if kind == "missing" else "is not a folder"
    assert cli_error(generate_args(model, saved, tmp_path / "cat.png"), capsys) == (
        f"error: --model {model} {what}, and it is not a Hub repo id ('owner/name'): give a diffusers pipeline folder "
        "(with its model_index.json) or a Hub repo id such as black-forest-labs/FLUX.1-dev."
    )


def test_generate_out_into_a_missing_folder_fails_before_loading(saved, tmp_path, no_pipeline_is_loaded, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(registry, "load_encoder", lambda *args, **kwargs: pytest.fail("the encoder was loaded"))
    out = tmp_path / "absent" / "cat.png"
    assert cli_error(generate_args("black-forest-labs/FLUX.1-dev", saved, out), capsys) == (
        f"error: the folder of --out {out} does not exist: create {out.parent} first, or choose another --out."
    )


# --- what generate and demo write, and where they run: refused before anything loads -------------------------------


def _out_case(case: str, tmp_path: Path) -> tuple[Path, str]:
    """An `--out` that cannot be an image, and the one line that refuses it."""
    if case == "folder":
        out = tmp_path / "images"
        out.mkdir()
        return out, f"--out {out} is a folder: give an image file, such as {out / 'image.png'}."
    if case == "dangling symlink":
        out = tmp_path / "cat.png"
        gone = tmp_path / "gone.png"
        out.symlink_to(gone)
        return out, f"--out {out} is a symlink to {gone}, which does not exist: remove the link, or choose another " \
            "--out."
    if case == "missing folder":
        out = tmp_path / "absent" / "cat.png"
        return out, f"the folder of --out {out} does not exist: create {out.parent} first, or choose another --out."
    out = tmp_path / ("cat.xyz" if case == "unknown extension" else "cat")
    what = "the extension .xyz" if case == "unknown extension" else "no extension"
    return out, f"--out {out} has {what}, which PIL writes no image format for: end it with .png (or .jpg, .webp)."


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if an encoder, a pipeline or the demo's tiny pipeline is loaded or built."""
    from flux_small_encoder import tiny

    def refuse(*args, **kwargs):
        raise AssertionError("something was loaded before the input was checked")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(registry, "load_encoder", refuse)
    monkeypatch.setattr(tiny, "tiny_flux_pipeline", refuse)


@pytest.mark.parametrize("command", ["generate", "demo"])
@pytest.mark.parametrize("case", ["folder", "dangling symlink", "missing folder", "unknown extension", "no extension"])
def test_out_that_cannot_be_an_image_is_refused_before_loading(case, command, saved, tmp_path, nothing_loads, capsys):
    out, refusal = _out_case(case, tmp_path)
    argv = ["demo", "--out", str(out)] if command == "demo" else generate_args(FLUX, saved, out)
    before = contents(tmp_path)
    assert cli_error([*argv, "--overwrite"], capsys) == f"error: {refusal}"
    assert contents(tmp_path) == before


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_while_writing_the_image_leaves_the_old_one_or_none(existing, tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "demo.png"
    if existing:
        out.write_bytes(b"the old image")
    save = Image.Image.save

    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half an image")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err  # earlier lines: the demo's progress bars
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: [Errno 28] No space left on device (raised in ")
    assert (out.read_bytes() == b"the old image") if existing else not out.exists()
    assert [path.name for path in tmp_path.iterdir()] == (["demo.png"] if existing else [])
    monkeypatch.setattr(Image.Image, "save", save)
    assert main(["demo", "--out", str(out), *(["--overwrite"] if existing else [])]) == 0  # the rerun is not refused
    assert Image.open(out).size == (32, 32)


DEVICES = {
    "bogus": "--device bogus is not a torch device: write it as cuda, cuda:1, mps or cpu.",
    "cuda:x": "--device cuda:x is not a torch device: write it as cuda, cuda:1, mps or cpu.",
    "cuda:2": "--device cuda:2: torch sees 2 CUDA device(s) here, numbered from 0; pass --device cpu, or leave "
              "--device out.",
    "mps": f"--device mps: no MPS device is available to torch {torch.__version__} here; pass --device cpu, or leave "
           "--device out.",
    "meta": f"--device meta: no META device is available to torch {torch.__version__} here; pass --device cpu, or "
            "leave --device out.",
}


@pytest.mark.parametrize("command", ["generate", "cache-teacher"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_device_torch_cannot_use_is_refused_before_loading(device, command, saved, tmp_path, nothing_loads,
                                                             monkeypatch, capsys):
    from flux_small_encoder import training

    monkeypatch.setattr(training, "cache_teacher", lambda *args, **kwargs: pytest.fail("the teacher was loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two CUDA devices, no MPS
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    argv = (
        [*generate_args(FLUX, saved, tmp_path / "cat.png")[:-2], "--device", device] if command == "generate"
        else ["cache-teacher", "--config", "tiny", "--out", str(tmp_path / "cache"), "--device", device]
    )
    assert cli_error(argv, capsys) == f"error: {DEVICES[device]}"


@pytest.mark.parametrize("side, nearest", [("33", "32 or 48"), ("1000", "992 or 1008"), ("8", "16")])
def test_generate_refuses_a_size_flux_would_silently_change(side, nearest, saved, tmp_path, nothing_loads, capsys):
    for option in ("--height", "--width"):
        with pytest.raises(SystemExit) as exit_info:
            main([*generate_args(FLUX, saved, tmp_path / "cat.png"), option, side])
        assert exit_info.value.code == 2
        assert f"argument {option}: {side} is not a multiple of 16, which FLUX needs: use {nearest}" in (
            capsys.readouterr().err
        )


def test_generate_refuses_offload_without_an_accelerator(saved, tmp_path, nothing_loads, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refusal = (
        "error: --offload moves each model to an accelerator only while it runs, and torch sees none here "
        "(--device cpu): leave --offload out."
    )
    argv = generate_args(FLUX, saved, tmp_path / "cat.png")
    assert cli_error([*argv, "--offload"], capsys) == refusal  # --device cpu
    assert cli_error([*argv[:-2], "--offload"], capsys) == refusal  # no --device, and no CUDA


# --- the offline hint for a pipeline (item 16) ----------------------------------------------------------------------


def test_offline_pipeline_hint_leaves_out_its_t5(saved, tmp_path, capsys):
    capsys.readouterr()
    assert main(generate_args("black-forest-labs/FLUX.1-dev", saved, tmp_path / "cat.png")) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: the libraries' offline warnings
    assert last_line == (
        "error: The pipeline 'black-forest-labs/FLUX.1-dev' is not in the local Hugging Face cache, and the Hub could "
        "not be reached (offline mode HF_HUB_OFFLINE=1, local_files_only=True, or no connection). Fetch it on a "
        'connected machine with `hf download black-forest-labs/FLUX.1-dev --exclude "text_encoder_2/*"` (log in with '
        "`hf auth login` first for private or gated repos), or pass a local folder."
    )


def test_what_the_offline_hint_fetches_is_enough_to_generate(pipeline_folder, saved, tmp_path):
    # The cache `hf download someone/tiny-flux --exclude "text_encoder_2/*"` leaves: every file but the T5's.
    files = {str(path.relative_to(pipeline_folder)): path for path in pipeline_folder.rglob("*") if path.is_file()}
    assert not any(name.startswith("text_encoder_2/") for name in files)
    seed_hub_cache("someone/tiny-flux", files)
    out = tmp_path / "cat.png"
    assert main(generate_args("someone/tiny-flux", saved, out)) == 0
    assert Image.open(out).size == (32, 32)


# --- the demo's threads (item 18, the demo's part) ------------------------------------------------------------------


def test_demo_runs_on_one_thread_and_gives_the_others_back(tmp_path, monkeypatch):
    threads_while_generating, generate = [], FluxPipeline.__call__

    def call(self, *args, **kwargs):
        threads_while_generating.append(torch.get_num_threads())
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", call)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--out", str(tmp_path / "demo.png")]) == 0
        assert threads_while_generating == [1]
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(threads)
