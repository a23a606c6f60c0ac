"""Teacher embeddings computed once per prompt and stored in safetensors shards, so training never loads T5-XXL.

Entries are keyed by a hash of the prompt's token ids, which fix the prompt, the tokenizer and the max length
together: a cache made with another tokenizer or length simply has no entry for the ids a run asks for. The folder's
`index.json` records which teacher wrote it, by content (`fingerprint.py`): a run whose teacher has other weights
refuses the cache, whatever the teacher's path; the same teacher under another path is accepted. It also records each
shard's size and SHA-256: the sizes are checked whenever the cache is opened (a truncated shard, mapped into memory,
would crash the process with SIGBUS on the first read past its end), the checksums by `verify_teacher_cache`.

Each shard's metadata also holds the SHA-256 of every entry, checked at every read: a flipped bit in a shard of the
right size stops training instead of training on it. That costs one hash of what is read anyway, about 2 ms per
4 MiB entry on one CPU core, once per batch of prompts (a batch gives `num_inference_steps` optimizer steps).
Checking whole shards instead on their first read would read the whole cache at every start, since a shuffled stream
touches every shard within its first batches: 8 GiB a shard, about 4.5 s of hashing each (200 GiB for CommonText).

Size: `max_sequence_length x 4096 x 2` bytes a prompt in bfloat16 (4 MiB at 512 tokens, 616 KiB at 77).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_folder
from ..paths import is_plain_name
from ..torch_utils import default_device, precision_dtype
from .config import TrainingConfig
from .data import load_sources
from .files import described_size
from .fingerprint import TeacherIdentity, teacher_identity
from .model_checks import check_teacher, check_teacher_source
from .models import check_cached, load_t5_tokenizer, load_teacher, teacher_name, tokenize_t5, transformer_width
from .run_folder import writing_into

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT = 3  # 1: the teacher by name only, no shard sizes or checksums; 2: no checksum per entry
TOKENIZE_CHUNK = 4096  # prompts tokenized at a time when checking that the cache covers a run's prompts


def cache_key(input_ids: torch.Tensor) -> str:
    """The key of one prompt: a hash of its token ids (one row)."""
    return hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:40]


class TeacherCache:
    """Read access to a cache folder written by `write_teacher_cache`.

    Args:
        folder: The cache folder.
        teacher: If given, the teacher the run distils from (`fingerprint.teacher_identity(config)`); a cache written
            by a teacher with other weights is refused.

    Raises:
        FileNotFoundError: The folder is not a teacher cache.
        ValueError: The cache was written by another teacher, by an earlier version, or a shard is missing or
            truncated (one line each, naming the fix).
    """

    def __init__(self, folder: str | os.PathLike, teacher: TeacherIdentity | None = None):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a teacher cache (no {INDEX_NAME}); write one with "
                                    "`flux-small-encoder cache-teacher`.")
        try:
            self.index = json.loads(index_path.read_text())
        except ValueError:
            raise ValueError(f"{index_path} is not JSON: the teacher cache is damaged; write it again with "
                             "`flux-small-encoder cache-teacher`.") from None
        if isinstance(self.index, dict) and self.index.get("format") != FORMAT:
            written = self.index.get("format")
            if isinstance(written, int) and written > FORMAT:
                raise ValueError(f"the teacher cache {self.folder} is in format {written}, newer than this version "
                                 f"reads ({FORMAT}): upgrade flux-small-encoder, or write the cache again with "
                                 "`flux-small-encoder cache-teacher`.")
            raise ValueError(f"the teacher cache {self.folder} was written by an earlier version, which recorded no "
                             "teacher fingerprint or checksums to check it by: write it again with "
                             "`flux-small-encoder cache-teacher`.")
        _check_index(self.index, index_path)
        if teacher is not None:
            self._check_teacher(teacher)
        for shard in self.index["shards"]:
            _check_shard(self.folder / shard["file"], shard["size"])
        # Each entry's shard (its path and open handle) and checksum.
        self._where: dict[str, tuple[Path, object, str]] = {}
        for shard in self.index["shards"]:
            path = self.folder / shard["file"]
            handle = safe_open(path, framework="pt")
            digests = handle.metadata() or {}
            if unchecked := [key for key in handle.keys() if key not in digests]:
                raise ValueError(f"teacher cache shard {path} holds no checksum for {len(unchecked)} entries: the "
                                 "cache is damaged; write it again with `flux-small-encoder cache-teacher`.")
            self._where.update({key: (path, handle, digests[key]) for key in handle.keys()})
        if self.index.get("num_prompts", len(self._where)) != len(self._where):
            raise ValueError(f"the teacher cache {self.folder} holds {len(self._where)} entries, but its index says "
                             f"{self.index['num_prompts']}: the cache is damaged; write it again with "
                             "`flux-small-encoder cache-teacher`.")

    @property
    def width(self) -> int | None:
        """The width of the cached embeddings (the teacher's), read from a shard's header; `None` if it is empty."""
        for key, (_, handle, _) in self._where.items():
            return handle.get_slice(key).get_shape()[-1]
        return None

    def check_width(self, width: int) -> None:
        """Raise `ValueError` if the cached embeddings are not `width` wide (the transformer's T5 input)."""
        if self.width not in (None, width):
            raise ValueError(
                f"the teacher cache {self.folder} holds {self.width}-wide embeddings, but the transformer reads "
                f"{width}-wide ones (its joint_attention_dim): write a cache with this pipeline's teacher "
                "(`flux-small-encoder cache-teacher` with the same model and teacher)."
            )

    def _check_teacher(self, teacher: TeacherIdentity) -> None:
        written_by = self.index["teacher"]
        if teacher.fingerprint is None:  # the teacher's weights are not on this machine: only its name can be compared
            if written_by["name"] != teacher.name:
                raise ValueError(
                    f"the teacher cache {self.folder} was written by teacher {written_by['name']!r}; this run's "
                    f"teacher {teacher.name!r} is not on this machine to compare their weights: set teacher to the "
                    "cache's, or write a new cache with `flux-small-encoder cache-teacher`."
                )
            logger.warning(f"the weights of {teacher.name} are not on this machine: the teacher cache {self.folder} "
                           "is trusted by the teacher's name, not checked against its weights.")
        elif written_by["fingerprint"] != teacher.fingerprint:
            other = "the same name but other" if written_by["name"] == teacher.name else "other"
            raise ValueError(
                f"the teacher cache {self.folder} was written by teacher {written_by['name']!r}, and this run's "
                f"teacher {teacher.name!r} has {other} weights (config and weights fingerprint differ): write a new "
                "cache for it with `flux-small-encoder cache-teacher`."
            )

    def verify(self) -> None:
        """Read every shard and check its SHA-256 against the index; raise `ValueError` naming the first that differs.

        It reads the whole cache (gigabytes at real scale); opening the cache checks only the sizes, and each read
        the checksum of the entries it reads.
        """
        for shard in self.index["shards"]:
            if _sha256(self.folder / shard["file"]) != shard["sha256"]:
                raise ValueError(f"teacher cache shard {self.folder / shard['file']} does not match its checksum: "
                                 "the cache is damaged; write it again with `flux-small-encoder cache-teacher`.")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, input_ids: torch.Tensor) -> bool:
        return cache_key(input_ids) in self._where

    def check_covers(self, prompts: list[str], tokenize: Callable[[list[str]], torch.Tensor]) -> None:
        """Raise `ValueError` if any of `prompts` (tokenized by `tokenize`, as training does) is not cached.

        They are tokenized `TOKENIZE_CHUNK` at a time: the paper's 320K prompts at 512 tokens would be 1.3 GB of token
        ids at once.
        """
        distinct = list(dict.fromkeys(prompts))
        missing = []
        for start in range(0, len(distinct), TOKENIZE_CHUNK):
            chunk = distinct[start : start + TOKENIZE_CHUNK]
            missing += [p for p, ids in zip(chunk, tokenize(chunk), strict=True) if ids not in self]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(distinct)} prompts are not in the teacher cache {self.folder} (first: "
                f"{missing[0]!r}): write the cache with the same config (`flux-small-encoder cache-teacher`)."
            )

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The cached embeddings of a batch of token ids, `(batch, seq, width)`, in the cache's dtype, on the CPU.

        Raises:
            KeyError: A prompt is not in the cache.
            ValueError: An entry does not match its checksum (the shard is damaged).
        """
        keys = [cache_key(row) for row in input_ids]
        missing = sum(key not in self._where for key in keys)
        if missing:
            raise KeyError(f"{missing} of {len(keys)} prompts are not in the teacher cache {self.folder} (written for "
                           f"max_sequence_length={self.index['max_sequence_length']}): re-run cache-teacher with "
                           "this run's prompts and settings.")
        embeds = []
        for key in keys:
            path, handle, digest = self._where[key]
            embed = handle.get_tensor(key)
            if _digest(embed) != digest:
                raise ValueError(f"teacher cache shard {path} is damaged: the embeddings of prompt {key} do not match "
                                 "their checksum; write the cache again with `flux-small-encoder cache-teacher`.")
            embeds.append(embed)
        return torch.stack(embeds)


def verify_teacher_cache(folder: str | os.PathLike) -> TeacherCache:
    """Open a teacher cache and check every shard against its SHA-256 (it reads the whole cache); returns it.

    Raises:
        FileNotFoundError: The folder is not a teacher cache.
        ValueError: It was written by an earlier version, or a shard is missing, truncated or does not match its
            checksum (one line naming the shard and the fix).
    """
    cache = TeacherCache(folder)
    cache.verify()
    return cache


@torch.no_grad()
def write_teacher_cache(
    folder: str | os.PathLike,
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    prompts: list[str],
    *,
    teacher: TeacherIdentity,
    max_sequence_length: int,
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 16,
    shard_size: int = 2048,
    progress: bool = True,
) -> Path:
    """Encode every distinct prompt once with the teacher and write the embeddings into safetensors shards.

    The folder is written under a temporary name and renamed when complete, so an interrupted run leaves no
    half cache; an existing folder is refused rather than overwritten. What a killed earlier run left under a
    temporary name is deleted first. Each shard's size and SHA-256 go into the index, read back from the disk.

    Args:
        folder: Where the cache goes (must not exist).
        encode: Token ids -> teacher embeddings (`teacher(ids, output_hidden_states=False)[0]`).
        tokenize: Prompts -> token ids, exactly as training tokenizes.
        prompts: The prompts (duplicates are encoded once).
        teacher: The teacher's identity, recorded in the index and checked by `TeacherCache`.
        max_sequence_length: Recorded in the index (the ids already carry it).
        dtype: Storage dtype (bfloat16 halves float32's size; float32 keeps the teacher's output exactly).
        batch_size: Prompts per teacher call.
        shard_size: Prompts per shard file.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists: give a new folder for the teacher cache (nothing was overwritten).")
    then = "nothing else was changed: free some space, then run cache-teacher again."
    with writing_into(folder.parent, f"the teacher cache {folder}", then), atomic_folder(folder) as staging:
        distinct = list(dict.fromkeys(prompts))
        shards, pending, seen = [], {}, set()

        def flush():
            path = staging / f"embeddings-{len(shards):05d}.safetensors"
            digests = {key: _digest(embed) for key, embed in pending.items()}  # checked at every read
            save_file(pending, path, metadata={"format": "pt", **digests})
            _check_shard(path, described_size(path))  # what reached the disk is what the header describes
            shards.append({"file": path.name, "size": path.stat().st_size, "sha256": _sha256(path)})
            pending.clear()

        for start in tqdm(range(0, len(distinct), batch_size), desc="teacher cache", disable=not progress):
            input_ids = tokenize(distinct[start : start + batch_size])
            embeds = encode(input_ids).to("cpu", dtype)
            for row, embed in zip(input_ids, embeds, strict=True):
                key = cache_key(row)
                if key not in seen:  # prompts that tokenize alike share one entry
                    seen.add(key)
                    pending[key] = embed.contiguous()
            if len(pending) >= shard_size:
                flush()
        if pending:
            flush()
        index = {
            "format": FORMAT, "teacher": {"name": teacher.name, "fingerprint": teacher.fingerprint},
            "max_sequence_length": max_sequence_length, "dtype": str(dtype).removeprefix("torch."),
            "num_prompts": len(seen), "shards": shards,
        }
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return folder


def cache_teacher(
    config: TrainingConfig,
    out: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> Path:
    """Write the teacher embeddings of every prompt of a run (`train_data`, `eval_data`, `validation_prompts`) into a
    cache folder.

    Then `teacher_cache=FOLDER` trains without loading the teacher.

    Args:
        config: The run's configuration: its prompts, `model` / `teacher`, `max_sequence_length`, `mixed_precision`.
        out: The cache folder to create (must not exist); default: `config.teacher_cache`.
        dtype: Storage dtype (`torch.bfloat16`, `"float32"`, ...); default: the dtype `mixed_precision` runs the
            teacher in (bfloat16 under `bf16`, else float32).
        batch_size: Prompts per teacher call.
        device: Where the teacher runs; default: CUDA if available, else the CPU.

    Returns:
        The cache folder.

    Raises:
        ValueError: Neither `out` nor `config.teacher_cache` says where to write.
        PromptFileError: A prompt file is malformed (nothing is loaded or written).
        FileExistsError: The folder exists (nothing is overwritten).
        ValueError: The teacher is a distilled encoder, is not as wide as the transformer's T5 input, or its
            config.json does not describe its weights (checked before they load; see `model_checks.py`).
        DiskFullError: The disk filled up while the cache was written (nothing of it is kept).
    """
    out = out or config.teacher_cache
    if not out:
        raise ValueError("no folder for the teacher cache: give `out` (--out), or set teacher_cache in the config.")
    if Path(out).exists():
        raise FileExistsError(f"{out} exists: give a new folder for the teacher cache (nothing was overwritten).")
    prompts = load_sources(config.train_data + config.eval_data, seed=config.seed) + config.validation_prompts
    check_cached(config, teacher=True, frozen_parts=False, student=False)
    width = transformer_width(config)  # `None` where the transformer is not on this machine: then at training start
    check_teacher_source(config, width)  # from its files, before its weights load
    model_dtype = precision_dtype(config.mixed_precision)
    device = device or default_device()
    teacher = load_teacher(config, model_dtype).to(device)
    check_teacher(teacher, width, f"teacher {teacher_name(config)}")
    tokenizer = load_t5_tokenizer(config)
    return write_teacher_cache(
        out,
        encode=lambda ids: teacher(ids.to(device), output_hidden_states=False)[0],
        tokenize=lambda batch: tokenize_t5(tokenizer, batch, config.max_sequence_length),
        prompts=prompts,
        teacher=teacher_identity(config),
        max_sequence_length=config.max_sequence_length,
        dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype or model_dtype,
        batch_size=batch_size,
    )


def _check_index(index, path: Path) -> None:
    """Raise `ValueError` unless `index` has the shape `write_teacher_cache` writes, its shards files of its folder."""
    shards = index.get("shards") if isinstance(index, dict) else None
    teacher = index.get("teacher") if isinstance(index, dict) else None
    problem = None
    if not isinstance(index, dict):
        problem = f"a JSON {type(index).__name__}, not an object"
    elif not isinstance(teacher, dict) or not isinstance(teacher.get("name"), str):
        problem = "no teacher name"
    elif not isinstance(index.get("max_sequence_length"), int) or not isinstance(shards, list):
        problem = "no max_sequence_length or no list of shards"
    else:
        for shard in shards:
            if not isinstance(shard, dict):
                problem = f"a shard entry {shard!r} is not an object"
            elif not is_plain_name(shard.get("file")):
                problem = f"it names {shard.get('file')!r} as a shard, which is not a file of its own folder"
            elif not isinstance(shard.get("size"), int) or not isinstance(shard.get("sha256"), str):
                problem = f"no size or sha256 for the shard {shard['file']}"
            if problem:
                break
    if problem:
        raise ValueError(f"{path} is not an index as cache-teacher writes it ({problem}): refused, nothing was read "
                         "through it; write the cache again with `flux-small-encoder cache-teacher`.")


def _check_shard(path: Path, size: int | None) -> None:
    """Raise `ValueError` unless `path` has `size` bytes, all that its safetensors header describes."""
    actual = path.stat().st_size if path.is_file() else None
    if actual is None or actual != size or described_size(path) != actual:
        if actual is None:
            state = "missing"
        elif actual == size:
            state = f"damaged (its safetensors header does not describe its {actual} bytes)"
        else:
            state = f"truncated or damaged ({actual} bytes, {size} written)"
        raise ValueError(f"teacher cache shard {path} is {state}: write the cache again with `flux-small-encoder "
                         "cache-teacher`.")


def _digest(tensor: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
