"""Teacher embeddings computed once per prompt and stored in safetensors shards, so training never loads T5-XXL.

Entries are keyed by a hash of the prompt's token ids, which fix the prompt, the tokenizer and the max length
together: a cache made with another tokenizer or length simply has no entry for the ids a run asks for. The folder's
`index.json` records which teacher wrote it, and a run with another teacher refuses the cache.

Size: `max_sequence_length x 4096 x 2` bytes a prompt in bfloat16 (4 MiB at 512 tokens, 630 KiB at 77).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_folder
from ..torch_utils import default_device, precision_dtype
from .config import TrainingConfig
from .data import load_sources
from .models import load_t5_tokenizer, load_teacher, teacher_name, tokenize_t5

INDEX_NAME = "index.json"


def cache_key(input_ids: torch.Tensor) -> str:
    """The key of one prompt: a hash of its token ids (one row)."""
    return hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:40]


class TeacherCache:
    """Read access to a cache folder written by `write_teacher_cache`.

    Args:
        folder: The cache folder.
        teacher: If given, the teacher the run distils from; a cache written by another teacher is refused.
    """

    def __init__(self, folder: str | os.PathLike, teacher: str | None = None):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a teacher cache (no {INDEX_NAME}); write one with "
                                    "`flux-small-encoder cache-teacher`.")
        self.index = json.loads(index_path.read_text())
        if teacher is not None and self.index["teacher"] != teacher:
            raise ValueError(f"the teacher cache {self.folder} was written by teacher {self.index['teacher']!r}, "
                             f"but this run distils from {teacher!r}: write a new cache or point `teacher` at it.")
        self._handles = [safe_open(self.folder / name, framework="pt") for name in self.index["shards"]]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, input_ids: torch.Tensor) -> bool:
        return cache_key(input_ids) in self._where

    def check_covers(self, prompts: list[str], tokenize: Callable[[list[str]], torch.Tensor]) -> None:
        """Raise `ValueError` if any of `prompts` (tokenized by `tokenize`, as training does) is not cached."""
        distinct = list(dict.fromkeys(prompts))
        missing = [p for p, ids in zip(distinct, tokenize(distinct), strict=True) if ids not in self]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(distinct)} prompts are not in the teacher cache {self.folder} (first: "
                f"{missing[0]!r}): write the cache with the same config (`flux-small-encoder cache-teacher`)."
            )

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The cached embeddings of a batch of token ids, `(batch, seq, width)`, in the cache's dtype, on the CPU."""
        keys = [cache_key(row) for row in input_ids]
        missing = sum(key not in self._where for key in keys)
        if missing:
            raise KeyError(f"{missing} of {len(keys)} prompts are not in the teacher cache {self.folder} (written for "
                           f"max_sequence_length={self.index['max_sequence_length']}): re-run cache-teacher with "
                           "this run's prompts and settings.")
        return torch.stack([self._where[key].get_tensor(key) for key in keys])


@torch.no_grad()
def write_teacher_cache(
    folder: str | os.PathLike,
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    prompts: list[str],
    *,
    teacher: str,
    max_sequence_length: int,
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 16,
    shard_size: int = 2048,
    progress: bool = True,
) -> Path:
    """Encode every distinct prompt once with the teacher and write the embeddings into safetensors shards.

    The folder is written under a temporary name and renamed when complete, so an interrupted run leaves no
    half cache; an existing folder is refused rather than overwritten.

    Args:
        folder: Where the cache goes (must not exist).
        encode: Token ids -> teacher embeddings (`teacher(ids, output_hidden_states=False)[0]`).
        tokenize: Prompts -> token ids, exactly as training tokenizes.
        prompts: The prompts (duplicates are encoded once).
        teacher: The teacher's name, recorded in the index and checked by `TeacherCache`.
        max_sequence_length: Recorded in the index (the ids already carry it).
        dtype: Storage dtype (bfloat16 halves float32's size; float32 keeps the teacher's output exactly).
        batch_size: Prompts per teacher call.
        shard_size: Prompts per shard file.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists: give a new folder for the teacher cache (nothing was overwritten).")
    with atomic_folder(folder) as staging:
        distinct = list(dict.fromkeys(prompts))
        shards, pending, seen = [], {}, set()

        def flush():
            name = f"embeddings-{len(shards):05d}.safetensors"
            save_file(pending, staging / name, metadata={"format": "pt"})
            shards.append(name)
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
            "teacher": teacher, "max_sequence_length": max_sequence_length, "dtype": str(dtype).removeprefix("torch."),
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
    """
    out = out or config.teacher_cache
    if not out:
        raise ValueError("no folder for the teacher cache: give `out` (--out), or set teacher_cache in the config.")
    if Path(out).exists():
        raise FileExistsError(f"{out} exists: give a new folder for the teacher cache (nothing was overwritten).")
    prompts = load_sources(config.train_data + config.eval_data, seed=config.seed) + config.validation_prompts
    model_dtype = precision_dtype(config.mixed_precision)
    device = device or default_device()
    teacher = load_teacher(config, model_dtype).to(device)
    tokenizer = load_t5_tokenizer(config)
    return write_teacher_cache(
        out,
        encode=lambda ids: teacher(ids.to(device), output_hidden_states=False)[0],
        tokenize=lambda batch: tokenize_t5(tokenizer, batch, config.max_sequence_length),
        prompts=prompts,
        teacher=teacher_name(config),
        max_sequence_length=config.max_sequence_length,
        dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype or model_dtype,
        batch_size=batch_size,
    )
