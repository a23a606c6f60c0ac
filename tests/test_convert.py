"""Checkpoint conversion: every layout in the wild into our folder and back, exact tensors, safe unpickling."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_small_encoder.checkpoint import infer_config, read_checkpoint
from flux_small_encoder.cli import main
from flux_small_encoder.configuration import DistilledT5Config
from flux_small_encoder.convert import convert, to_comfyui_keys
from flux_small_encoder.info import T5_XXL_WIDTH, describe, fitting_families
from flux_small_encoder.modeling import DistilledT5EncoderModel
from flux_small_encoder.patching import PIPELINE_FAMILIES
from flux_small_encoder.registry import load_encoder
from flux_small_encoder.tiny import tiny_t5_config

STRUCTURE = ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "relative_attention_num_buckets",
             "feed_forward_proj", "project_in_dim", "project_out_dim")


def _assert_same_weights(model: DistilledT5EncoderModel, reference: DistilledT5EncoderModel) -> None:
    expected = reference.state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def _assert_same_files(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key


@pytest.fixture(scope="session")
def saved_student(student, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ours") / "student"
    student.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def relu_student():
    torch.manual_seed(3)
    fields = tiny_t5_config(d_model=24, d_kv=6, num_heads=4, num_layers=3, feed_forward_proj="relu").to_diff_dict()
    return DistilledT5EncoderModel(DistilledT5Config(**fields, project_out_dim=40)).eval()


def test_reference_pth_converts_with_inferred_config(student, tmp_path):
    torch.save(student.state_dict(), tmp_path / "experiment.pth")  # what the reference trainer writes
    convert(tmp_path / "experiment.pth", tmp_path / "out")
    converted = load_encoder(tmp_path / "out")  # refuses missing or unexpected keys
    _assert_same_weights(converted, student)
    for name in STRUCTURE:
        assert getattr(converted.config, name) == getattr(student.config, name), name
    ids = torch.randint(0, 320, (1, 9))
    torch.testing.assert_close(converted(ids)[0], student(ids)[0], atol=0, rtol=0)


def test_pth_from_ddp_with_public_config(student, public_checkpoint, tmp_path):
    state = {f"module.{key}": value for key, value in student.state_dict().items()}
    torch.save(state, tmp_path / "ddp.pth")
    convert(tmp_path / "ddp.pth", tmp_path / "out", config=public_checkpoint / "config.json")
    _assert_same_weights(load_encoder(tmp_path / "out"), student)


def test_inference_reads_relu_ffn_and_widths(relu_student, tmp_path):
    torch.save(relu_student.state_dict(), tmp_path / "relu.pth")
    config = infer_config(read_checkpoint(tmp_path / "relu.pth").shapes)
    for name in STRUCTURE:
        assert getattr(config, name) == getattr(relu_student.config, name), name
    assert not config.is_gated_act


def test_folder_to_comfyui_and_back_is_exact(saved_student, tmp_path):
    convert(saved_student, tmp_path / "comfy.safetensors")
    keys = set(load_file(tmp_path / "comfy.safetensors"))
    assert "shared.weight" in keys and "encoder.block.0.layer.0.SelfAttention.q.weight" in keys
    assert "encoder.final_layer_norm.weight" in keys and "final_projection.3.weight" in keys
    assert not any(key.startswith("encoder.encoder.") for key in keys)

    convert(tmp_path / "comfy.safetensors", tmp_path / "back")
    _assert_same_files(saved_student / "model.safetensors", tmp_path / "back" / "model.safetensors")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads(
        (saved_student / "config.json").read_text()
    )
    convert(tmp_path / "back", tmp_path / "again.safetensors")
    _assert_same_files(tmp_path / "comfy.safetensors", tmp_path / "again.safetensors")


def test_comfyui_file_without_config_and_with_unstripped_embedding(student, tmp_path):
    state = to_comfyui_keys({key: value.clone() for key, value in student.state_dict().items()})
    state["encoder.shared.weight"] = state.pop("shared.weight")  # only `encoder.encoder.` stripped
    save_file(state, tmp_path / "t5base.safetensors")
    assert read_checkpoint(tmp_path / "t5base.safetensors").layout == "comfyui"
    convert(tmp_path / "t5base.safetensors", tmp_path / "out")
    _assert_same_weights(load_encoder(tmp_path / "out"), student)


def test_single_file_with_wrapper_prefix_removed(student, tmp_path):
    state = {key.removeprefix("encoder."): value.clone() for key, value in student.state_dict().items()}
    assert "shared.weight" in state and "encoder.embed_tokens.weight" in state  # T5EncoderModel's own keys
    save_file(state, tmp_path / "DistillT5-F32.safetensors")
    convert(tmp_path / "DistillT5-F32.safetensors", tmp_path / "out")
    _assert_same_weights(load_encoder(tmp_path / "out"), student)


def test_public_checkpoint_normalises_to_save_pretrained_layout(student, public_checkpoint, saved_student, tmp_path):
    convert(public_checkpoint, tmp_path / "out")
    _assert_same_files(tmp_path / "out" / "model.safetensors", saved_student / "model.safetensors")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "distilled_t5"


def test_file_with_both_embedding_copies_keeps_one(student, saved_student, tmp_path):
    state = {key: value.clone() for key, value in student.state_dict().items()}  # shared and embed_tokens both
    assert {"encoder.shared.weight", "encoder.encoder.embed_tokens.weight"} <= state.keys()
    save_file(state, tmp_path / "both.safetensors")
    convert(tmp_path / "both.safetensors", tmp_path / "out")
    _assert_same_files(tmp_path / "out" / "model.safetensors", saved_student / "model.safetensors")

    state["encoder.encoder.embed_tokens.weight"] = state["encoder.encoder.embed_tokens.weight"] + 1
    save_file(state, tmp_path / "differ.safetensors")
    with pytest.raises(ValueError, match="two different input embeddings"):
        convert(tmp_path / "differ.safetensors", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_sharded_folder_reads_every_shard(student, saved_student, tmp_path):
    student.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    info = describe(tmp_path / "sharded")
    assert info.parameters == describe(saved_student).parameters
    assert info.file_size == sum(path.stat().st_size for path in (tmp_path / "sharded").glob("model-*.safetensors"))
    convert(tmp_path / "sharded", tmp_path / "out")
    _assert_same_files(tmp_path / "out" / "model.safetensors", saved_student / "model.safetensors")


def test_public_config_is_read_as_stored(public_checkpoint):
    raw = json.loads((public_checkpoint / "config.json").read_text())
    assert raw["model_type"] == "t5" and raw["architectures"] == ["T5EncoderWithProjection"]
    info = describe(public_checkpoint)
    assert info.config_origin == "stored with it" and info.layout == "distill-t5"
    assert (info.config.num_layers, info.config.d_model, info.config.project_out_dim) == (2, 16, 32)


def test_bfloat16_and_fp32_wo_keep_their_dtypes(student, tmp_path):
    state = {key: value.to(torch.bfloat16) for key, value in student.state_dict().items()}
    state = {key: value.float() if ".wo." in key else value for key, value in state.items()}
    torch.save(state, tmp_path / "mixed.pth")
    convert(tmp_path / "mixed.pth", tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert written["encoder.encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert written["final_projection.0.weight"].dtype == torch.bfloat16
    assert all(torch.equal(written[key], state[key]) for key in written)


class _RunsCode:
    """A pickle whose loading would create a file: what a malicious checkpoint does, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_and_never_runs(student, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": student.state_dict(), "payload": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"GLOBAL io\.open.*Nothing in it was run"):
        convert(tmp_path / "evil.pth", tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    assert main(["info", str(tmp_path / "evil.pth")]) == 2
    assert not marker.exists()


def test_unreadable_pth_is_a_clear_error(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="it is not a complete `torch.save` archive"):
        convert(tmp_path / "garbage.pth", tmp_path / "out")
    torch.save({"x": torch.zeros(3)}, tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:100])
    with pytest.raises(ValueError, match="The file is truncated or damaged"):
        convert(tmp_path / "cut.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_refused_unless_overwrite(saved_student, tmp_path):
    dst = tmp_path / "dst"
    saved_student_files = sorted(path.name for path in saved_student.iterdir())
    convert(saved_student, dst)
    (dst / "model.safetensors").write_bytes(b"an older conversion")
    with pytest.raises(ValueError, match="already exists"):
        convert(saved_student, dst)
    assert (dst / "model.safetensors").read_bytes() == b"an older conversion"

    convert(saved_student, dst, overwrite=True)  # a saved encoder is replaced
    assert sorted(path.name for path in dst.iterdir()) == saved_student_files
    _assert_same_files(dst / "model.safetensors", saved_student / "model.safetensors")
    (tmp_path / "empty").mkdir()
    convert(saved_student, tmp_path / "empty")  # an empty folder is not something to lose
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dst", "empty"]


def test_wrong_config_fails_before_writing_anything(student, saved_student, tmp_path):
    wrong = student.config.to_dict() | {"d_ff": 40}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match=r"other shapes: .*wi_0.weight \[37, 16\] \(config says \[40, 16\]\)"):
        convert(saved_student, tmp_path / "out" / "nested", config=tmp_path / "wrong.json")
    assert not (tmp_path / "out" / "nested").exists()
    assert not list(tmp_path.glob("**/*.partial"))


def test_refuses_pickle_destination_and_foreign_checkpoints(saved_student, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        convert(saved_student, tmp_path / "out.pth")
    save_file({"text_model.embeddings.weight": torch.zeros(2, 2)}, tmp_path / "clip.safetensors")
    with pytest.raises(ValueError, match="not a distilled T5 encoder"):
        convert(tmp_path / "clip.safetensors", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="No such file"):
        convert(tmp_path / "missing.pth", tmp_path / "out")


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle"])
def test_every_pickle_suffix_is_refused_as_destination_and_named_missing_as_source(suffix, saved_student, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        convert(saved_student, tmp_path / f"out{suffix}")
    with pytest.raises(FileNotFoundError, match="No such file"):
        convert(tmp_path / f"missing{suffix}", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_describe_counts_and_fits(student, public_checkpoint):
    info = describe(public_checkpoint)
    unique = {id(p): p.numel() for p in student.parameters()}
    assert info.parameters == sum(unique.values())
    assert info.projector_parameters == sum(p.numel() for p in student.final_projection.parameters())
    assert info.dtypes == {"float32": len(student.state_dict()) - 1}  # the tied embedding is counted once
    assert info.file_size == (public_checkpoint / "model.safetensors").stat().st_size
    assert info.fits == []  # 32 wide: only the tiny test transformer takes it
    assert fitting_families(T5_XXL_WIDTH) == [f"{name} ({slot.encoder})" for name, slot in PIPELINE_FAMILIES.items()]
    assert "Flux (text_encoder_2)" in fitting_families(T5_XXL_WIDTH)


def test_cli_convert_and_info(saved_student, seeded_hub, tmp_path, capsys):
    assert main(["convert", str(saved_student), str(tmp_path / "c.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", str(saved_student), str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "already exists" in err and "Traceback" not in err
    assert main(["convert", str(saved_student), str(tmp_path / "c.safetensors"), "--overwrite"]) == 0

    assert main(["info", "t5-base-distilled"]) == 0  # the seeded Hub cache, offline
    out = capsys.readouterr().out
    assert "2 layers, d_model 16, d_ff 37" in out and "16 -> 32 -> 32" in out
    assert "parameters: 12,368" in out and "float32" in out and "KB" in out
    assert "no stock pipeline" in out
