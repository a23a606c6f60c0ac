"""Share distilled encoders on the Hugging Face Hub: `push_to_hub` with a model card, and `download`.

`push_to_hub` stages the files in a temporary folder (the source folder is never written to) and uploads them in one
commit: the safetensors weights, `config.json`, the tokenizer when one is given, and a model card. The token is only
handed to `huggingface_hub`; it is never written to a file or a log.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from .registry import is_repo_id, resolve_encoder

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .modeling import DistilledT5EncoderModel

LIBRARY_NAME = "flux-small-encoder"
CARD_TAGS = ["flux", "text-encoder", "t5", "distillation", "diffusers", "flux-small-encoder"]
PAPER_URL = "https://arxiv.org/abs/2503.19897"
TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model", "added_tokens.json",
]
# What a distilled encoder needs from its repo: `download` fetches only these, `push_to_hub` uploads only these.
MODEL_FILES = [
    "config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES,
]
# The trainer saves its resolved config as YAML in `output_dir`; its models sit in `output_dir/final` and in
# `output_dir/checkpoint-N/<student>`, so the card looks in the model folder, its parent and its grandparent.
TRAINING_CONFIG_NAMES = ("training_config.yaml", "config.yaml")
TRAINING_CONFIG_DEPTH = 2
# Training-config keys the card reads: the pipeline distilled for, its teacher encoder, the student's starting point.
_PIPELINE_KEYS, _TEACHER_KEYS, _STUDENT_KEYS = ("model", "pipeline"), ("teacher",), ("student", "base_model")
# Kept out of the card: local paths, and anything that could be a credential.
_PRIVATE_KEYS = ("output_dir", "resume_from_checkpoint", "logging_dir", "cache_dir")
_CREDENTIAL_WORDS = ("token", "secret", "password", "key")


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
    folder), and `README.md`: the folder's own card if it has one, else a card written from the config, the training
    config found next to the folder (see `find_training_config`) and the arguments below.

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

    Example:
    ```py
    >>> from flux_small_encoder import hub
    >>> hub.push_to_hub("runs/s3/final", "me/flux-t5-small-distilled", private=True)
    ```
    """
    validate_repo_id(repo_id)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="flux-small-encoder-push-") as staging:
        staging = Path(staging)
        if tokenizer is not None:  # first: it replaces tokenizer files in the folder, never writes through to them
            _stage_tokenizer(tokenizer, staging)
        source = _stage_model(model_or_folder, staging)
        if not (staging / "README.md").exists():
            training_config = find_training_config(source) if source is not None else None
            card = model_card(
                staging, repo_id, training_config=training_config, license=license, pipeline=pipeline,
                teacher=teacher, base_model=base_model,
            )
            card.save(staging / "README.md")
        _refuse_token_in_files(staging, token or get_token())

        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            try:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            except HfHubHTTPError as error:
                # Without write access a PR is still possible against an existing branch; commit will tell otherwise.
                if not (create_pr and error.response is not None and error.response.status_code == 403):
                    raise
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload distilled T5 encoder with {LIBRARY_NAME}",
        )


def download(
    name_or_repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> str:
    """Fetch a distilled encoder into the Hugging Face cache, only the files it needs, and return its folder.

    Args:
        name_or_repo_id (`str`):
            A registry name (`list_pretrained()`), a Hub repo id, or a local folder (returned as it is).
        revision (`str`, *optional*):
            Branch, tag or commit; defaults to the registry's pinned revision, else the default branch.
        cache_dir (`str` or `os.PathLike`, *optional*):
            The Hugging Face cache to use instead of the default one.
        local_files_only (`bool`, *optional*, defaults to `False`):
            Use only the cache; never reach the Hub (`HF_HUB_OFFLINE=1` does the same).
        token (`str`, *optional*):
            A token for private or gated repos; defaults to the saved login.

    Returns:
        `str`: a local folder with `config.json`, the safetensors weights, and tokenizer files if the repo has any.

    Raises:
        LocalEntryNotFoundError: offline (or `local_files_only`) with the files not cached; the message names the repo
            and the `hf download` command that fetches it.
        ValueError: the name is neither registered, a folder, nor a Hub repo id.
    """
    resolved = resolve_encoder(name_or_repo_id, revision)
    if os.path.isdir(resolved.path):
        return resolved.path
    repo_id, revision = resolved.path, resolved.revision
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            allow_patterns=MODEL_FILES, library_name=LIBRARY_NAME,
        )
    except LocalEntryNotFoundError:
        raise LocalEntryNotFoundError(not_cached_message(repo_id, revision)) from None
    names = set(os.listdir(folder))
    if "config.json" not in names or not any(name.endswith(".safetensors") for name in names):
        raise LocalEntryNotFoundError(not_cached_message(repo_id, revision, partial=folder))
    return folder


def find_training_config(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """The trainer's resolved config for a model folder: `training_config.yaml` or `config.yaml` in the folder, its
    parent or its grandparent (the nearest wins), if it parses as a mapping with the trainer's `max_steps` or
    `output_dir` key. `None` if there is none.
    """
    folder = Path(folder).resolve()
    for directory in [folder, *folder.parents][: TRAINING_CONFIG_DEPTH + 1]:
        for name in TRAINING_CONFIG_NAMES:
            path = directory / name
            if not path.is_file():
                continue
            try:
                config = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                continue
            if isinstance(config, dict) and ("max_steps" in config or "output_dir" in config):
                return path, config
    return None


def model_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    training_config: tuple[Path, dict] | None = None,
    license: str | None = None,
    pipeline: str | None = None,
    teacher: str | None = None,
    base_model: str | None = None,
) -> ModelCard:
    """The model card `push_to_hub` writes for a saved encoder folder (see `push_to_hub` for the arguments)."""
    from .convert import describe

    info = describe(folder)
    config = info.config
    trained = training_config[1] if training_config is not None else {}
    pipeline = pipeline or _first(trained, _PIPELINE_KEYS)
    teacher = teacher or _first(trained, _TEACHER_KEYS)
    base_model = _hub_id(
        base_model or _hub_id(getattr(config, "base_model_name_or_path", None)) or _first(trained, _STUDENT_KEYS)
    )
    has_tokenizer = any((Path(folder) / name).exists() for name in TOKENIZER_FILES)

    data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license or "other",
        base_model=base_model,
        tags=list(CARD_TAGS),
        teacher=teacher,
        distilled_for=pipeline,
    )
    t5_shape = (
        f"{config.num_layers} layers, d_model {config.d_model}, d_ff {config.d_ff} ({config.feed_forward_proj}), "
        f"{config.num_heads} heads x {config.d_kv}, vocab {config.vocab_size}"
    )
    parameters = f"{info.parameters:,} (encoder {info.encoder_parameters:,}, projector {info.projector_parameters:,})"
    rows = [
        ("T5 encoder", t5_shape),
        ("projector", f"{config.project_in_dim} -> {config.project_out_dim} -> {config.project_out_dim} (ReLU MLP)"),
        ("parameters", parameters),
        ("weights", ", ".join(info.dtypes)),
        ("replaces", teacher or f"the {config.project_out_dim}-wide T5 encoder of the pipeline"),
        ("distilled for", pipeline or "not recorded"),
        ("started from", base_model or "not recorded"),
        ("fits", ", ".join(info.fits) or f"transformers taking {config.project_out_dim}-wide text embeddings"),
        ("tokenizer", "included" if has_tokenizer else "none: use the pipeline's own T5 tokenizer"),
    ]
    example_pipeline = pipeline or "black-forest-labs/FLUX.1-dev"
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"A small T5 text encoder distilled to replace {teacher or 'the T5-XXL encoder'} of "
        f"{pipeline or 'a FLUX-family pipeline'}: a T5 encoder plus an MLP projector that outputs "
        f"{config.project_out_dim}-wide embeddings, trained by vision-based distillation ([Scaling Down Text "
        f"Encoders of Text-to-Image Diffusion Models]({PAPER_URL})), and shared with `{LIBRARY_NAME}`.",
        "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows),
        "## Usage\n\n```bash\npip install flux-small-encoder\n```\n\n```python\nimport torch\n"
        "from flux_small_encoder import load_pipeline\n\n"
        f'pipe = load_pipeline("{example_pipeline}", encoder="{repo_id}", dtype=torch.bfloat16).to("cuda")\n'
        'image = pipe("a cat holding a sign that says hello").images[0]\n```\n\n'
        f'To swap the encoder of a pipeline you already loaded: `patch_encoder(pipe, "{repo_id}")`. '
        "The weights alone load with `DistilledT5EncoderModel.from_pretrained`.",
    ]
    if trained:
        summary = yaml.safe_dump(_public_summary(trained), sort_keys=False).strip()
        sections.append(
            f"## Training\n\nThe trainer's resolved config (`{training_config[0].name}`), without local paths:\n\n"
            f"```yaml\n{summary}\n```"
        )
    sections.append(
        f"## License\n\n{license or 'Not stated by the uploader'}. These weights were distilled through "
        f"{pipeline or 'a diffusion pipeline'}: check that pipeline's license before using them."
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


# --- staging -------------------------------------------------------------------------------------------------------


def _stage_model(model_or_folder, staging: Path) -> Path | None:
    """Put the model's files into `staging`; return the source folder (`None` for a model object)."""
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
    from .convert import describe

    describe(folder)  # refuse weights that do not match their config before anything is uploaded
    for pattern in [*MODEL_FILES, "README.md"]:
        for path in folder.glob(pattern):
            if not (staging / path.name).exists():
                _link_or_copy(path, staging / path.name)
    return folder


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


# --- card helpers --------------------------------------------------------------------------------------------------


def _first(config: dict, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if isinstance(config.get(key), str) and config[key]:
            return config[key]
    return None


def _hub_id(name: str | None) -> str | None:
    """`name` if it is a Hub repo id, not a local path (the Hub rejects a `base_model` it cannot resolve)."""
    return name if name and not os.path.exists(name) and is_repo_id(name) else None


def _public_summary(value):
    """The training config without local folders or anything that looks like a credential.

    Keys naming local folders or credentials are dropped; any other absolute path, wherever it sits (a prompt file in
    a list of sources, say), keeps only its file name, which says what was used without telling where it lives.
    """
    if isinstance(value, dict):
        return {key: _public_summary(item) for key, item in value.items() if not _private_key(key)}
    if isinstance(value, list):
        return [_public_summary(item) for item in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return os.path.basename(value.rstrip("/\\"))
    return value


def _private_key(key) -> bool:
    words = str(key).lower().replace("-", "_").split("_")
    return key in _PRIVATE_KEYS or any(word in _CREDENTIAL_WORDS for word in words)


def not_cached_message(
    repo_id: str, revision: str | None = None, partial: str | None = None, what: str = "encoder"
) -> str:
    """Why `repo_id` cannot be loaded offline, and the command that fetches it."""
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    state = f"is only partly cached at {partial}" if partial else "is not in the local Hugging Face cache"
    return (
        f"The {what} {repo_id!r} {state}, and the Hub could not be reached (offline mode HF_HUB_OFFLINE=1, "
        f"local_files_only=True, or no connection). Fetch it on a connected machine with `{command}` (log in with "
        "`hf auth login` first for private or gated repos), or pass a local folder."
    )
