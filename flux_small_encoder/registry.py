"""Named distilled encoders, one small record each, and how an `encoder` argument resolves to weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .paths import CHECKPOINT_FILE_SUFFIXES, not_a_regular_file

if TYPE_CHECKING:
    import torch

    from .modeling import DistilledT5EncoderModel


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a named distilled encoder lives and what it was distilled for.

    Args:
        name: The short name users pass to `patch_encoder` and `load_pipeline`.
        repo_id: Hub repository holding `config.json` and `model.safetensors`.
        revision: Branch, tag or commit to load; `None` means the repository's default branch.
        tokenizer: Where the matching tokenizer lives (the checkpoint ships none): the teacher's T5 v1.1 tokenizer.
        teacher: The encoder it replaces.
        base_model: The T5 checkpoint the student started from, `None` where the record does not know it.
        out_dim: Width of its embeddings (the teacher's width).
        license: The license stated by the checkpoint's authors, `None` where the record does not know it.
        description: One line for `flux-small-encoder list`.
    """

    name: str
    repo_id: str
    revision: str | None = None
    tokenizer: str = "google/t5-v1_1-xxl"
    teacher: str = "google/t5-v1_1-xxl"
    base_model: str | None = None
    out_dim: int = 4096
    license: str | None = None
    description: str = ""


_REGISTRY: dict[str, PretrainedSpec] = {
    spec.name: spec
    for spec in (
        PretrainedSpec(
            name="t5-base-distilled",
            repo_id="LifuWang/DistillT5",
            base_model="google/flan-t5-base",  # the reference trainer's default `--pretrained_model`
            description=(
                "T5-Base student (0.11 B encoder + 0.02 B projector) distilled from FLUX.1-dev's T5-XXL by "
                "vision-based distillation (arXiv 2503.19897); see the Hub repo's card for its license."
            ),
        ),
    )
}


def list_pretrained() -> list[str]:
    """The names of the registered distilled encoders, sorted."""
    return sorted(_REGISTRY)


def get_pretrained_spec(name: str) -> PretrainedSpec:
    """The record of a registered encoder; a `KeyError` that lists the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        names = ", ".join(list_pretrained())
        raise KeyError(f"No registered encoder named {name!r}. Registered names: {names}.") from None


# What `save_pretrained` of a T5 tokenizer may write beside the model.
TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model", "added_tokens.json",
]
# What a distilled encoder needs from its repo: `fetch_encoder` (and so `hub.download`) fetches only these.
MODEL_FILES = [
    "config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES,
]

# Keyword arguments of `from_pretrained` that say where and how to fetch files, whatever is fetched: they apply to the
# encoder (and its tokenizer) as well as to the pipeline they were given for.
HUB_KWARGS = ("token", "cache_dir", "local_files_only")


def hub_kwargs(kwargs: dict) -> dict:
    """The entries of `kwargs` that are about fetching files (`HUB_KWARGS`)."""
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


def is_repo_id(name: str | None) -> bool:
    """Whether `name` is a valid Hub repo id of the form `owner/name` (a bare name or a path is not)."""
    if not name or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_pipeline_source(model: str | os.PathLike, label: str) -> None:
    """Raise `FileNotFoundError` unless `model` is a folder or a Hub repo id: a diffusers pipeline could come from it.

    Args:
        model: A `--model` argument: a pipeline folder or a Hub repo id.
        label: How the message names it (`--model PATH`, `'PATH'`).
    """
    name = os.fspath(model)
    if not os.path.isdir(name) and (os.path.lexists(name) or not is_repo_id(name)):
        what = "is not a folder" if os.path.lexists(name) else "does not exist"
        raise FileNotFoundError(
            f"{label} {what}, and it is not a Hub repo id ('owner/name'): give a diffusers pipeline folder (with its "
            "model_index.json) or a Hub repo id such as black-forest-labs/FLUX.1-dev."
        )


@dataclass(frozen=True)
class ResolvedEncoder:
    """Where an `encoder` argument points: a local folder (or file), or a Hub repo (and revision) to load from.

    Args:
        path: The local path, or the Hub repo id.
        revision: The Hub revision; always `None` for a local path.
        spec: The registry record, for a registry name.
        local: Whether `path` is a local path: only then is it read from the disk, never from a folder that happens
            to have a repo id's name.
    """

    path: str
    revision: str | None = None
    spec: PretrainedSpec | None = None
    local: bool = False


def resolve_encoder(
    encoder: str | os.PathLike, revision: str | None = None, *, files: bool = False
) -> ResolvedEncoder:
    """Resolve an `encoder` argument, the one way every function and command does: a registry name, a local path, or
    a Hub repo id.

    A path that exists is the local path, as in `from_pretrained`: `runs/s1/final` or `ckpt/model.pth` is read from
    the disk even though it has the shape of a repo id. Only a registry name that is also a local path
    (`t5-base-distilled/` in the working folder) is refused as ambiguous, as timm's `parse_model_name` refuses one,
    rather than loading different weights in different places: `./NAME` (or an `os.PathLike`) means the local path.
    Anything that is none of the three raises a `ValueError` that lists the registered names.

    Args:
        encoder: A registry name (`list_pretrained()`), a folder written by `save_pretrained`, or a Hub repo id.
        revision: Hub branch, tag or commit (overrides a registry record's); refused for a local path, which has none.
        files: Also accept a single weight file (`.safetensors`, `.pth`, ...), as `info` and `convert` do. Elsewhere a
            file is refused with the `convert` command that makes a folder of it.

    Raises:
        TypeError: `encoder` is not a string or a path.
        ValueError: the name is ambiguous or unknown, or a local path is not a saved encoder or is given a revision.
        FileNotFoundError: a checkpoint file name (`.safetensors`, `.pth`, ...) that does not exist.
    """
    if not isinstance(encoder, (str, os.PathLike)):
        raise TypeError(
            f"An encoder is named by a registry name ({', '.join(list_pretrained())}), a folder written by "
            f"`save_pretrained` or a Hub repo id ('owner/name'), not by {type(encoder).__name__}"
            + (f" {encoder!r}" if isinstance(encoder, (int, float, bytes)) else "")
            + ". patch_encoder and load_pipeline also take a DistilledT5EncoderModel; a plain T5 encoder has no "
            "projector to the pipeline's width (`flux-small-encoder convert` reads other checkpoint layouts)."
        )
    name = os.fsdecode(encoder)
    if not os.path.lexists(name):
        return _resolve_name(name, revision)
    if isinstance(encoder, str) and name in _REGISTRY:
        raise ValueError(
            f"{name!r} is both a registered encoder and a local path: pass ./{name} for the local one, or move it out "
            "of the way (or run from another folder) to load the registered encoder."
        )
    if revision is not None:
        raise ValueError(
            f"{name!r} is a local path, which has no revisions: leave the revision out, or pass the Hub repo id to "
            f"load revision {revision!r}."
        )
    if os.path.isdir(name):
        config = os.path.join(name, "config.json")
        if kind := not_a_regular_file(config):
            found = "holds no config.json" if kind == "missing" else f"holds a config.json that is {kind}, not a file"
            raise ValueError(
                f"The folder {name!r} {found}: it is not a saved encoder. Point to the folder that `save_pretrained` "
                "wrote (config.json + model.safetensors)."
            )
        return ResolvedEncoder(name, local=True)
    if kind := not_a_regular_file(name):
        raise ValueError(
            f"{name!r} is {kind}, not a folder or a file: point to the folder that `save_pretrained` wrote."
        )
    if not files:
        raise ValueError(
            f"{name!r} is a single file: convert it first (`flux-small-encoder convert {name} OUT/`), then pass the "
            "folder OUT/."
        )
    return ResolvedEncoder(name, local=True)


def _resolve_name(name: str, revision: str | None) -> ResolvedEncoder:
    """A name that is no local path: a registry name, else a Hub repo id."""
    if name in _REGISTRY:
        spec = _REGISTRY[name]
        return ResolvedEncoder(spec.repo_id, revision if revision is not None else spec.revision, spec)
    if name.endswith(CHECKPOINT_FILE_SUFFIXES):
        raise FileNotFoundError(f"No such file: {name!r}.")
    if is_repo_id(name):
        return ResolvedEncoder(name, revision)
    raise ValueError(
        f"Cannot resolve encoder {name!r}: it is not a registered name, an existing folder, or a Hub repo id "
        f"('owner/name'). Registered names: {', '.join(list_pretrained())}."
    )


def fetch_encoder(resolved: ResolvedEncoder, allow_patterns: list[str] = MODEL_FILES, **snapshot_kwargs) -> str:
    """The local path of a resolved encoder: its own, or its repo's `allow_patterns` (by default `MODEL_FILES`) fetched
    into the Hugging Face cache (`snapshot_download`, to which `snapshot_kwargs` go: `cache_dir`, `local_files_only`,
    `token`, ...)."""
    if resolved.local:
        return resolved.path
    from huggingface_hub import snapshot_download

    return snapshot_download(
        resolved.path, revision=resolved.revision, allow_patterns=allow_patterns, **snapshot_kwargs
    )


def load_encoder(
    encoder: str | os.PathLike | ResolvedEncoder,
    *,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    **from_pretrained_kwargs,
) -> DistilledT5EncoderModel:
    """Load a distilled encoder by registry name, local folder or Hub repo id, refusing incomplete weights.

    The files are fetched first (only `MODEL_FILES`), and the config is checked against the names and
    shapes in the safetensors headers before any model is built: a config that asks for more than the weights hold
    (a million layers, a huge width) is refused in a moment instead of exhausting the machine.

    Args:
        encoder: A name from `list_pretrained()`, a folder written by `save_pretrained`, or a Hub repo id (or what
            `resolve_encoder` made of one, which `revision` does not change).
        dtype: Load in this dtype (T5's `wo` stays in float32 under float16, as in transformers).
        revision: Hub branch, tag or commit; overrides the registry's revision.
        from_pretrained_kwargs: Passed to `from_pretrained` (`token`, `cache_dir`, `local_files_only`, ...).

    Raises:
        ValueError: the config does not describe the weights, the checkpoint lacks weights the model needs, or holds
            weights it does not use.
        OSError: the files cannot be found (offline with nothing cached, a wrong repo id); the message names the repo.
    """
    from .checkpoint import read_checkpoint, resolve_config
    from .modeling import DistilledT5EncoderModel

    resolved = encoder if isinstance(encoder, ResolvedEncoder) else resolve_encoder(encoder, revision)
    where = f"{resolved.path!r}" + (f" at revision {resolved.revision!r}" if resolved.revision else "")
    try:
        folder = fetch_encoder(resolved, **hub_kwargs(from_pretrained_kwargs))
        resolve_config(read_checkpoint(folder, load_tensors=False))
        model, report = DistilledT5EncoderModel.from_pretrained(
            folder, dtype=dtype, output_loading_info=True, **from_pretrained_kwargs
        )
    except OSError as error:
        raise OSError(f"Cannot load the encoder {where}: {error}") from error
    model.config.name_or_path = resolved.path  # the repo id, not the cache folder it was read from
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    problems = {kind: sorted(report[kind]) for kind in kinds if report[kind]}
    if problems:
        raise ValueError(
            f"The checkpoint at {resolved.path!r} does not match DistilledT5EncoderModel: {problems}. It is not a "
            "distilled encoder in the DistillT5 layout; convert it first (`flux-small-encoder convert`)."
        )
    return model
