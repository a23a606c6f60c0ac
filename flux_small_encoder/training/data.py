"""Prompt files in, a deterministic stream of prompts out.

Every file is read and checked at start-up, so a malformed line fails the run before any model is loaded, with the
file and line in the message. The stream is a pure function of `(seed, position)`: a resumed run, or a run on more
processes, sees exactly the prompts an uninterrupted single-process run would.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import random
from pathlib import Path

from .config import PromptSource, TrainingConfig

DEFAULT_COLUMN = "prompt"


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and line."""


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Read the prompts of one file, skipping blank ones.

    Args:
        path: `.txt` (one prompt a line), `.json` (a list of strings, or of objects with `column`), `.jsonl` (one
            string or object a line) or `.csv` (a header row; prompts in `column`).
        column: The field of objects / the CSV column holding the prompt (default `prompt`).
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found.")
    suffix = path.suffix.lower()
    column = column or DEFAULT_COLUMN
    if suffix not in (".txt", ".json", ".jsonl", ".csv"):
        raise PromptFileError(f"{path}: unknown prompt file type {suffix!r}: use .txt, .json, .jsonl or .csv.")
    text = _read_text(path)
    if suffix == ".txt":
        prompts = text.splitlines()
    elif suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}:{error.lineno}: invalid JSON ({error.msg}).") from None
        if not isinstance(items, list):
            raise PromptFileError(f"{path}:1: expected a JSON list of prompts, got a {type(items).__name__}.")
        prompts = [_prompt_of(item, column, path, f"item {index}") for index, item in enumerate(items)]
    elif suffix == ".jsonl":
        prompts = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{path}:{line_number}: invalid JSON ({error.msg}).") from None
            prompts.append(_prompt_of(item, column, path, f"line {line_number}"))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if column not in (reader.fieldnames or []):
            raise PromptFileError(
                f"{path}:1: no column {column!r} (columns: {reader.fieldnames}); set `column` in the source."
            )
        prompts = [row[column] or "" for row in reader]
    return [prompt.strip() for prompt in prompts if prompt and prompt.strip()]


def _read_text(path: Path) -> str:
    """The file's text, or `PromptFileError` naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}): a prompt file must be "
                              "UTF-8 text; save it as UTF-8.") from None


def _prompt_of(item, column: str, path: Path, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get(column), str):
        return item[column]
    raise PromptFileError(
        f"{path}, {where}: expected a prompt string or an object with a {column!r} string, got {item!r}."
    )


def expand_source(source: PromptSource) -> list[Path]:
    """The files of a source (its path may be a glob), sorted; an empty glob is an error."""
    if glob.has_magic(source.path):
        paths = sorted(Path(p) for p in glob.glob(source.path))
        if not paths:
            raise PromptFileError(f"{source.path}: the pattern matches no file.")
        return paths
    return [Path(source.path)]


def load_sources(sources: list[PromptSource], seed: int = 0) -> list[str]:
    """Read and mix prompt sources into one list, by repeat factors or by weights.

    With weights, each source's share of the mix is its weight over the sum, and the mix is as long as all sources
    together. A fractional repeat adds a seeded random part of one more copy.
    """
    if not sources:
        return []
    if any(s.weight is not None for s in sources) and not all(s.weight is not None for s in sources):
        raise ValueError("give `weight` to every prompt source or to none (use `repeat` otherwise).")
    per_source = []
    for source in sources:
        prompts = [p for path in expand_source(source) for p in read_prompts(path, source.column)]
        if not prompts:
            raise PromptFileError(f"{source.path}: no prompts (only blank lines).")
        per_source.append(prompts)
    if sources[0].weight is not None:
        total = sum(len(p) for p in per_source)
        weight_sum = sum(s.weight for s in sources)
        repeats = [total * s.weight / weight_sum / len(p) for s, p in zip(sources, per_source, strict=True)]
    else:
        repeats = [s.repeat for s in sources]
    rng = random.Random(seed)
    mixed = []
    for prompts, repeat in zip(per_source, repeats, strict=True):
        if repeat < 0:
            raise ValueError(f"repeat must be positive, got {repeat}.")
        whole, fraction = int(repeat), repeat - int(repeat)
        mixed += prompts * whole
        mixed += rng.sample(prompts, math.floor(fraction * len(prompts)))
    return mixed


def load_prompts(config: TrainingConfig) -> tuple[list[str], list[str]]:
    """The run's training and held-out prompts: `eval_data` sampled, else `num_eval_prompts` held out of the training
    prompts (and then absent from them)."""
    train = load_sources(config.train_data, seed=config.seed)
    if not train:
        raise ValueError("train_data gives no prompts: " + (
            "its repeats take none of them; raise repeat (1 takes each prompt once)." if config.train_data else
            "it names no prompt file; give train_data (in the YAML config, or as train_data=[prompts.txt])."))
    if config.eval_data:
        return train, sample_prompts(load_sources(config.eval_data, seed=config.seed), config.num_eval_prompts,
                                     config.seed)
    if config.num_eval_prompts:
        return split_eval(train, config.num_eval_prompts, seed=config.seed)
    return train, []


def split_eval(prompts: list[str], count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold `count` distinct prompts out of `prompts`: returns (train, eval), with no eval prompt left in train."""
    distinct = sorted(set(prompts))
    if count >= len(distinct):
        raise ValueError(f"cannot hold out {count} of {len(distinct)} distinct prompts: lower num_eval_prompts or "
                         "give eval_data.")
    held_out = random.Random(seed).sample(distinct, count)
    excluded = set(held_out)
    return [p for p in prompts if p not in excluded], held_out


def sample_prompts(prompts: list[str], count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts drawn with a seed (all of them if there are fewer)."""
    distinct = sorted(set(prompts))
    return random.Random(seed).sample(distinct, min(count, len(distinct)))


class PromptStream:
    """An endless, reshuffled-every-epoch sequence of prompts, addressed by position.

    Position `i` is prompt `permutation_e[i % n]` of epoch `e = i // n`, where each epoch's permutation depends only
    on the seed. Batches are slices of positions, so any process can find its prompts without talking to the others.
    """

    def __init__(self, prompts: list[str], seed: int = 0):
        if not prompts:
            raise ValueError("no training prompts.")
        self.prompts = prompts
        self.seed = seed
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, start: int, count: int) -> list[str]:
        return [self[position] for position in range(start, start + count)]

    def __getitem__(self, position: int) -> str:
        epoch, index = divmod(position, len(self.prompts))
        if epoch != self._epoch:
            self._order = list(range(len(self.prompts)))
            random.Random(self.seed * 100_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self.prompts[self._order[index]]
