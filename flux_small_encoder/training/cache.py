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
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
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
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
