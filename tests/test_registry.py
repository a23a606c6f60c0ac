import pytest

from flux_small_encoder import get_pretrained_spec, list_pretrained, load_encoder
from flux_small_encoder.registry import resolve_encoder


def test_registry_names_the_public_checkpoint():
    assert "t5-base-distilled" in list_pretrained()
    spec = get_pretrained_spec("t5-base-distilled")
    assert spec.repo_id == "LifuWang/DistillT5" and spec.revision is None
    assert spec.tokenizer and spec.out_dim == 4096


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="Registered names: t5-base-distilled"):
        get_pretrained_spec("t5-small-distilled")


def test_resolution_order(public_checkpoint, tmp_path, monkeypatch):
    assert resolve_encoder("t5-base-distilled").path == "LifuWang/DistillT5"
    assert resolve_encoder("t5-base-distilled", revision="v2").revision == "v2"
    assert resolve_encoder(public_checkpoint).path == str(public_checkpoint)
    assert resolve_encoder("someone/their-student").path == "someone/their-student"
    # a registry name wins over a folder of the same name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t5-base-distilled").mkdir()
    assert resolve_encoder("t5-base-distilled").spec is not None


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
