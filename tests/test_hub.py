"""Hub helpers: what `push_to_hub` hands huggingface_hub (mocked at `HfApi`), and `download` through a seeded cache."""

import inspect
import json
import logging
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects

from flux_small_encoder import hub, model_card
from flux_small_encoder.cli import main
from flux_small_encoder.tiny import tiny_t5_tokenizer

from .conftest import FAKE_COMMIT, seed_hub_cache

TOKEN = "hf_TESTsecretTOKEN0123456789"


def _bound_fake(name: str, calls: dict, answer):
    """A stand-in for `HfApi.<name>` that takes exactly the real method's arguments: a misspelt or missing argument
    raises the `TypeError` the real call would, instead of being swallowed by `**kwargs`."""
    signature = inspect.signature(getattr(HfApi, name))

    def fake(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        del arguments["self"]
        calls[name].append({**arguments, "token": self.token} if name == "create_repo" else arguments)
        return answer(arguments)

    return fake


def _upload_answer(calls):
    def answer(arguments):
        folder = Path(arguments["folder_path"])
        calls["upload_folder"][-1]["files"] = {path.name: path.read_bytes() for path in folder.iterdir()}
        repo_id = arguments["repo_id"]
        pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if arguments.get("create_pr") else None
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{FAKE_COMMIT}", pr_url=pr_url)

    return answer


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace the HfApi calls that reach the Hub; record their arguments and what the staged folder held."""
    calls = {"create_repo": [], "create_branch": [], "upload_folder": []}
    answers = {
        "create_repo": lambda arguments: SimpleNamespace(repo_id=arguments["repo_id"]),
        "create_branch": lambda arguments: None,
        "upload_folder": _upload_answer(calls),
    }
    for name, answer in answers.items():
        monkeypatch.setattr(HfApi, name, _bound_fake(name, calls, answer))
    return calls


def test_fakes_refuse_arguments_the_real_methods_do_not_take(hub_calls):
    api = HfApi()
    with pytest.raises(TypeError, match="commit_mesage"):
        api.upload_folder(repo_id="me/tiny", folder_path=".", commit_mesage="typo")
    with pytest.raises(TypeError, match="folder_path"):
        api.upload_folder(repo_id="me/tiny")
    with pytest.raises(TypeError):
        api.create_branch("me/tiny", "v1")  # `branch` is keyword-only
    assert hub_calls == {"create_repo": [], "create_branch": [], "upload_folder": []}


@pytest.fixture
def trainer_run(student, tmp_path) -> Path:
    """A trainer's output_dir: the final student folder, holding the resolved config the trainer saves with it."""
    config = {
        "model": "black-forest-labs/FLUX.1-dev",
        "teacher": "google/t5-v1_1-xxl",
        "student": "google/flan-t5-base",
        "max_steps": 50000,
        "learning_rate": 1e-4,
        "num_inference_steps": 20,
        "output_dir": str(tmp_path / "runs" / "s1"),
        "teacher_cache": "runs/teacher-cache",
        "hub_token": TOKEN,
        "data": {"prompts": "compbench", "cache_dir": "/home/someone/cache"},
        "train_data": [{"path": "/home/someone/prompts/color_train.txt", "repeat": 1.0}],  # the trainer's shape
    }
    run = tmp_path / "runs" / "s1"
    student.save_pretrained(run / "final")
    (run / "final" / "training_config.yaml").write_text(yaml.safe_dump(config))
    return run


def _card(upload) -> ModelCard:
    return ModelCard(upload["files"]["README.md"].decode())


def _assert_no_token(upload, *texts):
    assert all(TOKEN.encode() not in content for content in upload["files"].values())
    assert all(TOKEN not in text for text in texts)


def test_push_folder_uploads_one_commit_with_card(trainer_run, hub_calls, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    commit = hub.push_to_hub(trainer_run / "final", "me/flux-t5-tiny", token=TOKEN, private=True)

    (create,) = hub_calls["create_repo"]
    assert create == {"repo_id": "me/flux-t5-tiny", "token": TOKEN, "private": True, "exist_ok": True}
    assert hub_calls["create_branch"] == []
    (upload,) = hub_calls["upload_folder"]
    assert upload["repo_id"] == "me/flux-t5-tiny" and upload["revision"] is None and upload["create_pr"] is False
    assert set(upload["files"]) == {"config.json", "model.safetensors", "README.md"}  # no training_config.yaml
    assert upload["files"]["model.safetensors"] == (trainer_run / "final" / "model.safetensors").read_bytes()
    assert commit.commit_url.endswith(FAKE_COMMIT)

    card = _card(upload)
    assert card.data.library_name == "flux-small-encoder"
    assert {"flux", "text-encoder", "distillation"} <= set(card.data.tags)
    assert card.data.license == "other"
    assert card.data.base_model == "google/flan-t5-base"
    assert card.data.teacher == "google/t5-v1_1-xxl"
    assert card.data.distilled_for == "black-forest-labs/FLUX.1-dev"
    assert 'load_pipeline("black-forest-labs/FLUX.1-dev", encoder="me/flux-t5-tiny"' in card.text
    assert "2 layers, d_model 16" in card.text and "16 -> 32 -> 32" in card.text
    assert "max_steps: 50000" in card.text and "num_inference_steps: 20" in card.text
    assert "output_dir" not in card.text and "/home/someone" not in card.text and "hub_token" not in card.text
    assert "path: color_train.txt" in card.text  # which file, not where it lives
    assert "compbench" in card.text

    out = capsys.readouterr()
    _assert_no_token(upload, out.out, out.err, caplog.text)
    assert sorted(path.name for path in (trainer_run / "final").iterdir()) == [
        "config.json", "model.safetensors", "training_config.yaml",
    ]


def test_push_model_with_tokenizer_revision_and_pr(student, hub_calls):
    commit = hub.push_to_hub(
        student, "me/tiny", tokenizer=tiny_t5_tokenizer(), revision="v1", create_pr=True, license="apache-2.0",
        commit_message="first weights", base_model="/not/a/hub/id",
    )
    assert hub_calls["create_branch"] == [{"repo_id": "me/tiny", "branch": "v1", "exist_ok": True}]
    (upload,) = hub_calls["upload_folder"]
    assert upload["revision"] == "v1" and upload["create_pr"] is True
    assert upload["commit_message"] == "first weights"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= set(upload["files"])
    card = _card(upload)
    assert card.data.license == "apache-2.0"
    assert card.data.base_model is None  # a local path is not a Hub id: left out rather than rejected by the Hub
    assert "| tokenizer | included |" in card.text
    assert "## Training" not in card.text  # no trainer config for a model object
    assert commit.pr_url.endswith("/discussions/1")


def test_given_tokenizer_replaces_the_folders_without_touching_it(student, tmp_path, hub_calls):
    folder = tmp_path / "model"
    student.save_pretrained(folder)
    old = tiny_t5_tokenizer()
    old.model_max_length = 77
    old.save_pretrained(folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    hub.push_to_hub(folder, "me/tiny", tokenizer=tiny_t5_tokenizer())
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    (upload,) = hub_calls["upload_folder"]
    assert b'"model_max_length": 512' in upload["files"]["tokenizer_config.json"]


def test_existing_card_is_kept(student, tmp_path, hub_calls):
    student.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    hub.push_to_hub(tmp_path / "model", "me/tiny")
    (upload,) = hub_calls["upload_folder"]
    assert upload["files"]["README.md"] == b"---\nlicense: mit\n---\n# My own card\n"


def test_token_in_a_file_is_refused_before_anything_is_sent(student, tmp_path, hub_calls):
    student.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text(f"token: {TOKEN}\n")
    with pytest.raises(ValueError, match="README.md contains your Hub token"):
        hub.push_to_hub(tmp_path / "model", "me/tiny", token=TOKEN)
    assert hub_calls == {"create_repo": [], "create_branch": [], "upload_folder": []}


def test_push_refuses_what_is_not_a_saved_model(trainer_run, tmp_path, hub_calls):
    with pytest.raises(ValueError, match=r"no config.json\)\. It holds .*final: pass that"):
        hub.push_to_hub(trainer_run, "me/tiny")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((trainer_run / "final" / "config.json").read_text())
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is the file complete"):
        hub.push_to_hub(tmp_path / "broken", "me/tiny")
    assert hub_calls["upload_folder"] == []


# --- what push uploads: exactly the model's files, never through a symlink out of the folder (issue 9, item 10) ----


def test_push_uploads_only_the_files_the_model_needs(trainer_run, hub_calls):
    final = trainer_run / "final"
    shutil.copy(final / "model.safetensors", final / "model-backup.safetensors")  # an old backup beside the weights
    (final / "notes.txt").write_text("not for the Hub")
    hub.push_to_hub(final, "me/tiny")
    (upload,) = hub_calls["upload_folder"]
    assert set(upload["files"]) == {"config.json", "model.safetensors", "README.md"}


def test_push_uploads_exactly_the_shards_the_index_names(student, tmp_path, hub_calls):
    folder = tmp_path / "sharded"
    student.save_pretrained(folder, max_shard_size="20KB")
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    stale = folder / f"model-00009-of-0000{len(shards)}.safetensors"  # left over from an earlier save
    shutil.copy(folder / sorted(shards)[0], stale)
    hub.push_to_hub(folder, "me/tiny")
    (upload,) = hub_calls["upload_folder"]
    assert set(upload["files"]) == {"config.json", "model.safetensors.index.json", "README.md", *shards}


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_push_never_follows_a_symlink_out_of_the_folder(name, student, tmp_path, hub_calls, capsys):
    folder = tmp_path / "model"
    student.save_pretrained(folder)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if name == "model.safetensors":
        (folder / name).rename(outside)  # the weights are valid: only where they live is wrong
    else:
        outside.write_text('{"secret": "a file the folder points to"}')
    (folder / name).symlink_to(outside)
    expected = (
        f"Refusing to upload '{folder / name}': it is a symlink to '{outside}', outside the folder, and push uploads "
        f"only the folder's own files. Copy the file into the folder in place of the link (`cp --remove-destination "
        f"{outside} {folder / name}`), then push again."
    )
    with pytest.raises(ValueError) as refused:
        hub.push_to_hub(folder, "me/tiny")
    assert str(refused.value) == expected
    capsys.readouterr()
    assert main(["push", str(folder), "me/tiny"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert hub_calls == {"create_repo": [], "create_branch": [], "upload_folder": []}


def test_push_without_a_network_is_one_line(student, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    student.save_pretrained(tmp_path / "model")
    with socket.socket() as closed:  # bound, never listening: every connection to it is refused at once
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        capsys.readouterr()
        assert main(["push", str(tmp_path / "model"), "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(
        "error: Cannot reach the Hub to push to 'me/tiny' (ConnectError: "
    )
    assert err.endswith("); nothing was committed. Check the connection, then push again.\n")


def test_push_offline_is_one_line(student, tmp_path, capsys):
    student.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert main(["push", str(tmp_path / "model"), "me/tiny"]) == 2  # the session runs with HF_HUB_OFFLINE=1
    assert capsys.readouterr().err == (
        "error: Cannot reach the Hub to push to 'me/tiny' (offline mode is on: HF_HUB_OFFLINE=1); nothing was "
        "committed. Unset HF_HUB_OFFLINE, then push again.\n"
    )


def test_cli_push(trainer_run, hub_calls, capsys):
    args = ["push", str(trainer_run / "final"), "me/tiny", "--private", "--token", TOKEN, "--license", "apache-2.0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"https://huggingface.co/me/tiny/commit/{FAKE_COMMIT}" in out and TOKEN not in out
    assert hub_calls["create_repo"][0]["private"] is True
    _assert_no_token(hub_calls["upload_folder"][0])


def test_download_registry_name_through_seeded_cache(seeded_hub):
    folder = hub.download("t5-base-distilled")
    assert Path(folder) == seeded_hub
    assert {"config.json", "model.safetensors"} <= set(p.name for p in Path(folder).iterdir())
    assert hub.download("LifuWang/DistillT5", local_files_only=True) == folder


def test_download_fetches_only_the_model_files(seeded_hub, monkeypatch):
    seen = {}
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)  # looked up there when fetching
    hub.download("t5-base-distilled")
    assert seen["repo_id"] == "LifuWang/DistillT5"
    repo_files = ["config.json", "model.safetensors", "README.md", "DistillT5-F32.safetensors", "experiment.pth",
                  "pytorch_model.bin", "tokenizer.json", "spiece.model", "model-00001-of-00002.safetensors",
                  "model.safetensors.index.json", "images/sample.png"]
    fetched = set(filter_repo_objects(repo_files, allow_patterns=seen["allow_patterns"]))
    assert fetched == {"config.json", "model.safetensors", "tokenizer.json", "spiece.model",
                       "model-00001-of-00002.safetensors", "model.safetensors.index.json"}


def test_download_revision_and_local_folder(public_checkpoint, tmp_path):
    commit = "f" * 40
    files = {name: public_checkpoint / name for name in ("config.json", "model.safetensors")}
    snapshot = seed_hub_cache("me/pinned", files, revision="v1", commit=commit)
    assert Path(hub.download("me/pinned", revision="v1")) == snapshot
    assert hub.download(str(public_checkpoint)) == str(public_checkpoint)
    weights = public_checkpoint / "model.safetensors"
    assert hub.download(weights) == str(weights)  # a local file is a checkpoint too (`convert`, `info`)
    with pytest.raises(FileNotFoundError, match="No such file"):
        hub.download(tmp_path / "absent.pth")


def test_offline_without_cache_names_repo_and_command(tmp_path, capsys):
    with pytest.raises(LocalEntryNotFoundError, match=r"'someone/absent'.*`hf download someone/absent`"):
        hub.download("someone/absent")
    with pytest.raises(LocalEntryNotFoundError, match="hf download someone/absent --revision v2"):
        hub.download("someone/absent", revision="v2")

    assert main(["download", "someone/absent"]) == 2
    err = capsys.readouterr().err
    # huggingface_hub's error type, with the package's own message: printed as written, no type name in front
    assert err.startswith("error: The encoder 'someone/absent' is not in the local Hugging Face cache"), err
    assert "hf download someone/absent" in err and "Traceback" not in err


def test_partial_cache_is_an_error(public_checkpoint):
    seed_hub_cache("me/partial", {"config.json": public_checkpoint / "config.json"}, commit="e" * 40)
    with pytest.raises(LocalEntryNotFoundError, match="only partly cached"):
        hub.download("me/partial")


def test_cli_download_prints_folder(seeded_hub, capsys):
    assert main(["download", "t5-base-distilled"]) == 0
    assert capsys.readouterr().out.strip() == str(seeded_hub)


def test_card_reads_only_the_training_config_inside_the_pushed_folder(trainer_run, student, hub_calls):
    beside = {"model": "someone/other-pipeline", "teacher": "someone/other-teacher", "max_steps": 1}
    (trainer_run / "training_config.yaml").write_text(yaml.safe_dump(beside))  # the run's, not this folder's
    student.save_pretrained(trainer_run / "checkpoint-10" / "student")
    hub.push_to_hub(trainer_run / "checkpoint-10" / "student", "me/tiny")
    card = _card(hub_calls["upload_folder"][0])
    assert "distilled_for" not in card.data.to_dict() and "teacher" not in card.data.to_dict()
    assert "someone/other" not in card.text and "## Training" not in card.text


def test_unreadable_training_config_is_refused_before_anything_is_sent(trainer_run, hub_calls):
    config = trainer_run / "final" / "training_config.yaml"
    config.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ValueError, match=r"training_config.yaml holds a list, not the trainer's config.*README.md"):
        hub.push_to_hub(trainer_run / "final", "me/tiny")
    config.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="training_config.yaml is not valid YAML"):
        hub.push_to_hub(trainer_run / "final", "me/tiny")
    assert hub_calls == {"create_repo": [], "create_branch": [], "upload_folder": []}


def test_push_refuses_a_bad_repo_id_before_anything_is_sent(trainer_run, hub_calls):
    for repo_id in ("flux-t5-tiny", "me/flux t5", str(trainer_run)):
        with pytest.raises(ValueError, match="is not a Hub repo id: pass 'owner/name'"):
            hub.push_to_hub(trainer_run / "final", repo_id)
    assert hub_calls == {"create_repo": [], "create_branch": [], "upload_folder": []}


def test_card_text_comes_from_the_template(trainer_run, tmp_path, monkeypatch):
    final = trainer_run / "final"
    shipped = model_card.model_card(final, "me/tiny")
    assert "| projector | 16 -> 32 -> 32 (ReLU MLP) |" in shipped.text

    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n\nOur words on {{ repo_id }}, {{ config.num_layers }} layers.\n")
    monkeypatch.setattr(model_card, "TEMPLATE_PATH", template)
    card = model_card.model_card(final, "me/tiny", license="mit")
    assert card.text.strip() == "Our words on me/tiny, 2 layers."
    assert card.data.license == "mit" and card.data.library_name == "flux-small-encoder"


def test_card_holds_no_local_path_or_token(trainer_run, tmp_path):
    final = trainer_run / "final"
    card = model_card.model_card(final, "me/tiny", training_config=model_card.read_training_config(final))
    text = str(card)
    assert "max_steps: 50000" in text and "path: color_train.txt" in text  # the config did reach the card
    for private in (TOKEN, "hub_token", str(tmp_path), "/home/someone", "runs/teacher-cache", "output_dir"):
        assert private not in text, private
