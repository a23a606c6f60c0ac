"""Move distilled encoders to and from the Hugging Face Hub: `push_to_hub` and `download`.

`push_to_hub` stages the files in a temporary folder (the source folder is never written to) and uploads them in one
commit: the safetensors weights, `config.json`, the tokenizer when one is given, and a model card (`model_card`). The
token is only handed to `huggingface_hub`; it is never written to a file or a log.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from .model_card import LIBRARY_NAME, model_card, read_results, read_training_config
from .registry import TOKENIZER_FILES, fetch_encoder, is_repo_id, resolve_encoder

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .modeling import DistilledT5EncoderModel

def push_to_hub(
    model_or_folder: DistilledT5EncoderModel | str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    tokenizer: Any = None,
    license: str | None = None,
    pipeline: str | None = None,
    teacher: str | None = None,
    base_model: str | None = None,
) -> CommitInfo:
    r"""
    Upload a distilled encoder to the Hub in one commit, with a model card, creating the repo if needed.

    The commit holds `config.json`, the safetensors weights, the tokenizer files (from `tokenizer`, or found in the
    folder), and `README.md`: the folder's own card if it has one, else `model_card.model_card(...)`, written from the
    config, the `training_config.yaml` the trainer saved in the folder, and the arguments below.

    Args:
        model_or_folder (`DistilledT5EncoderModel`, `str` or `os.PathLike`):
            A model, or a folder written by `save_pretrained` (such as a trainer's `output_dir/final`).
        repo_id (`str`):
            The Hub repository, `"owner/name"`.
        token (`str`, *optional*):
            A Hub token with write access; defaults to the saved login (`hf auth login`) or `HF_TOKEN`.
        private (`bool`, *optional*, defaults to `False`):
            Create the repository as private (an existing repository keeps its visibility).
        revision (`str`, *optional*):
            The branch to commit to, created from the default branch if missing.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request instead of committing to the branch.
        commit_message (`str`, *optional*):
            The commit message.
        tokenizer (`PreTrainedTokenizerBase` or `str`, *optional*):
            A tokenizer (or a folder / repo id to load one from) to upload with the model. Without it the card tells
            users to use the pipeline's own T5 tokenizer, which is what the distilled encoders are trained with.
        license (`str`, *optional*):
            The license of the weights you publish (a Hub license id such as `"apache-2.0"`). Defaults to `"other"`:
            the weights were distilled through a pipeline whose license (FLUX.1-dev's is non-commercial) may bind them.
        pipeline (`str`, *optional*):
            The pipeline the encoder was distilled for; defaults to the training config's `model`.
        teacher (`str`, *optional*):
            The encoder it replaces; defaults to the training config's `teacher`, else left out of the metadata.
        base_model (`str`, *optional*):
            The Hub id of the T5 it started from; defaults to the config's `base_model_name_or_path` when that is a
            Hub id, else the training config's `student`.

    Returns:
        [`~huggingface_hub.CommitInfo`]: the commit (`.commit_url`, and `.pr_url` with `create_pr=True`).

    Raises:
        ValueError: `repo_id` is not `"owner/name"`, the folder is not a saved encoder (or its weights do not match
            its config, or a file to upload is a symlink out of the folder), or a staged file contains the token.
        ConnectionError: the Hub cannot be reached (offline mode, no connection); nothing was committed.

    Example:
    ```py
    >>> from flux_small_encoder import hub
    >>> hub.push_to_hub("runs/s3/final", "me/flux-t5-small-distilled", private=True)
    ```
    """
    if not is_repo_id(repo_id):
        raise ValueError(
            f"{repo_id!r} is not a Hub repo id: pass 'owner/name', with your user or organisation name as the owner."
        )
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="flux-small-encoder-push-") as staging:
        staging = Path(staging)
        if tokenizer is not None:  # first: it replaces tokenizer files in the folder, never writes through to them
            _stage_tokenizer(tokenizer, staging)
        source = _stage_model(model_or_folder, staging)
        if not (staging / "README.md").exists():
            card = model_card(
                staging, repo_id, training_config=read_training_config(source) if source is not None else None,
                results=read_results(source) if source is not None else None,
                license=license, pipeline=pipeline, teacher=teacher, base_model=base_model,
            )
            card.save(staging / "README.md")
        _refuse_token_in_files(staging, token or get_token())

        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None and not revision.startswith("refs/pr/"):
                try:
                    api.create_branch(repo_id, branch=revision, exist_ok=True)
                except HfHubHTTPError as error:
                    # Without write access a PR is still possible against an existing branch; commit will tell.
                    if not (create_pr and error.response is not None and error.response.status_code == 403):
                        raise
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or f"Upload distilled T5 encoder with {LIBRARY_NAME}",
            )
        except (OfflineModeIsEnabled, *_transport_errors()) as error:
            if isinstance(error, OfflineModeIsEnabled):
                reason, fix = "offline mode is on: HF_HUB_OFFLINE=1", "Unset HF_HUB_OFFLINE"
            else:
                reason, fix = f"{type(error).__name__}: {' '.join(str(error).split())}", "Check the connection"
            raise ConnectionError(
                f"Cannot reach the Hub to push to {repo_id!r} ({reason}); nothing was committed. {fix}, then push "
                "again."
            ) from error


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's "no connection" and "timed out" errors: httpx2's under huggingface_hub 2, httpx's before.

    Their modules are looked up, not imported: huggingface_hub has loaded the one it uses once it sends a request.
    """
    clients = [sys.modules[name] for name in ("httpx2", "httpx") if name in sys.modules]
    return tuple(client.TransportError for client in clients)


def download(
    name_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> str:
    """Fetch a distilled encoder into the Hugging Face cache, only the files it needs, and return its folder.

    Args:
        name_or_repo_id (`str` or `os.PathLike`):
            A name resolved as `patch_encoder` resolves it (`registry.resolve_encoder`): a registry name
            (`list_pretrained()`), a local folder or weight file (returned as it is), or a Hub repo id.
        revision (`str`, *optional*):
            Branch, tag or commit; defaults to the registry record's revision if it has one, else the default branch.
        cache_dir (`str` or `os.PathLike`, *optional*):
            The Hugging Face cache to use instead of the default one.
        local_files_only (`bool`, *optional*, defaults to `False`):
            Use only the cache; never reach the Hub (`HF_HUB_OFFLINE=1` does the same).
        token (`str`, *optional*):
            A token for private or gated repos; defaults to the saved login.

    Returns:
        `str`: a local folder with `config.json`, the safetensors weights, and tokenizer files if the repo has any
        (or the local path given).

    Raises:
        LocalEntryNotFoundError: offline (or `local_files_only`) with the files not cached; the message names the repo
            and the `hf download` command that fetches it.
        FileNotFoundError: a checkpoint file path (`.safetensors`, `.pth`, ...) that does not exist.
        ValueError: what `resolve_encoder` refuses: a name neither registered, a local path, nor a Hub repo id, or a
            registry name that is also a local path.
    """
    resolved = resolve_encoder(name_or_repo_id, revision, files=True)
    if resolved.local:
        return resolved.path
    repo_id, revision = resolved.path, resolved.revision
    try:
        folder = fetch_encoder(
            resolved, cache_dir=cache_dir, local_files_only=local_files_only, token=token, library_name=LIBRARY_NAME
        )
    except LocalEntryNotFoundError:
        raise LocalEntryNotFoundError(not_cached_message(repo_id, revision)) from None
    names = set(os.listdir(folder))
    if "config.json" not in names or not any(name.endswith(".safetensors") for name in names):
        raise LocalEntryNotFoundError(not_cached_message(repo_id, revision, partial=folder))
    return folder


def not_cached_message(
    repo_id: str, revision: str | None = None, partial: str | None = None, what: str = "encoder",
    exclude: str | None = None,
) -> str:
    """Why `repo_id` cannot be loaded offline, and the command that fetches it (without the folder `exclude`: a
    pipeline's own T5 encoder, the 9.5 GB that a distilled encoder replaces)."""
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    if exclude:
        command += f' --exclude "{exclude}/*"'
    state = f"is only partly cached at {partial}" if partial else "is not in the local Hugging Face cache"
    return (
        f"The {what} {repo_id!r} {state}, and the Hub could not be reached (offline mode HF_HUB_OFFLINE=1, "
        f"local_files_only=True, or no connection). Fetch it on a connected machine with `{command}` (log in with "
        "`hf auth login` first for private or gated repos), or pass a local folder."
    )


# --- staging -------------------------------------------------------------------------------------------------------


def _stage_model(model_or_folder, staging: Path) -> Path | None:
    """Put the model's files into `staging`; return the source folder (`None` for a model object)."""
    # Imported here, not above: `download` (and the CLI's `download`) need neither torch nor transformers.
    from .info import describe
    from .modeling import DistilledT5EncoderModel

    if isinstance(model_or_folder, DistilledT5EncoderModel):
        model_or_folder.save_pretrained(staging)
        return None
    if not isinstance(model_or_folder, (str, os.PathLike)):
        raise TypeError(
            f"push_to_hub takes a DistilledT5EncoderModel or a folder, not {type(model_or_folder).__name__}. For a "
            "LoRA-wrapped student, merge it first (`model.merge_and_unload()`)."
        )
    folder = Path(model_or_folder)
    if not (folder / "config.json").is_file():
        inner = [child for child in folder.iterdir() if (child / "config.json").is_file()] if folder.is_dir() else []
        hint = f" It holds {', '.join(map(str, inner))}: pass that." if inner else ""
        raise ValueError(f"{str(folder)!r} is not a folder written by `save_pretrained` (no config.json).{hint}")
    files = model_files(folder)
    describe(folder)  # refuse weights that do not match their config before anything is uploaded
    for path in files:
        if not (staging / path.name).exists():
            _link_or_copy(path, staging / path.name)
    return folder


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a saved encoder folder that `push_to_hub` uploads, and no others.

    They are `config.json`, the weights (`model.safetensors`, or the index and exactly the shards it names), the
    tokenizer files present (`TOKENIZER_FILES`) and `README.md`: an old `model-backup.safetensors` or anything else in
    the folder stays out.

    Raises:
        ValueError: a file to upload is a symlink to something outside the folder, which is never followed (the link
            could publish any file of the machine); or what `checkpoint.weight_files` refuses.
    """
    from .checkpoint import INDEX_NAME, weight_files

    folder = Path(folder)
    weights = weight_files(folder)
    optional = [*([INDEX_NAME] if (folder / INDEX_NAME).is_file() else []), *TOKENIZER_FILES, "README.md"]
    files = [folder / "config.json", *weights, *(folder / name for name in optional if (folder / name).is_file())]
    inside = folder.resolve()
    for path in files:
        target = path.resolve()
        if not target.is_relative_to(inside):
            raise ValueError(
                f"Refusing to upload {str(path)!r}: it is a symlink to {str(target)!r}, outside the folder, and push "
                "uploads only the folder's own files. Copy the file into the folder in place of the link "
                f"(`cp --remove-destination {target} {path}`), then push again."
            )
    return files


def _stage_tokenizer(tokenizer, staging: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    tokenizer.save_pretrained(staging)


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link spares copying large weights when staging is on the same filesystem; nothing writes to staged
    # files after this, so the source cannot be changed through the link.
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copy2(source, target)


def _refuse_token_in_files(staging: Path, token: str | None) -> None:
    if not token:
        return
    for path in staging.iterdir():
        if path.suffix in (".json", ".md", ".yaml", ".txt") and token in path.read_text(errors="ignore"):
            raise ValueError(f"Refusing to upload: {path.name} contains your Hub token. Remove it from the file.")
