"""Evaluation prompts: the named sets shipped in the package, prompt files, and the text a prompt asks to render.

A prompt spec is a named set (`compbench-val`, `commontext-test`), or a path to a `.txt`, `.json`, `.jsonl` or `.csv`
file (read by the trainer's `read_prompts`); `SPEC:N` takes a seeded sample of `N` of its prompts. Every prompt keeps
a category for the summaries: the file stem (the CompBench category for `compbench-val`, `commontext` for
`commontext-test`, the name of a user's file).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# Named set -> its folder under `flux_small_encoder/data/prompts/` (see the README there for source and license).
PROMPT_SETS = {"compbench-val": "compbench-val", "commontext-test": "commontext-test"}
# Text between straight quotes: 'hello' or "hello". An apostrophe inside a word (a cat's sign) opens no quote.
_QUOTED = re.compile(r"""(?<![A-Za-z0-9])(['"])(.+?)\1(?![A-Za-z0-9])""")


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt.

    Args:
        text: The prompt.
        category: The group it is summarised in (a file stem).
        source: The spec it came from (`compbench-val:40`, `my_prompts.txt`).
    """

    text: str
    category: str
    source: str

    @property
    def quoted_text(self) -> str | None:
        """The text the prompt asks to render (`quoted_text(self.text)`)."""
        return quoted_text(self.text)


def quoted_text(prompt: str) -> str | None:
    """The text in quotes in `prompt` (several quotes are joined with a space), or `None` if it quotes nothing.

    Example:
    ```py
    >>> quoted_text("A sign reading 'radar'.")
    'radar'
    ```
    """
    found = [match.group(2).strip() for match in _QUOTED.finditer(prompt)]
    return " ".join(text for text in found if text) or None


def load_eval_prompts(specs: str | list[str], seed: int = 0) -> list[EvalPrompt]:
    """The prompts of one or more specs, in order, without repeating a prompt.

    Args:
        specs: Prompt specs, as a list or comma-separated: a named set (`PROMPT_SETS`), a prompt file, and either
            followed by `:N` for a seeded sample of `N` prompts.
        seed: The seed of the samples.

    Raises:
        ValueError: a spec names neither a set nor a file, a file cannot be read, or no prompt is left.
    """
    if isinstance(specs, str):
        specs = [spec for spec in specs.split(",")]
    prompts, seen = [], set()
    for spec in (spec.strip() for spec in specs):
        if not spec:
            continue
        for prompt in _load_spec(spec, seed):
            if prompt.text not in seen:
                seen.add(prompt.text)
                prompts.append(prompt)
    if not prompts:
        raise ValueError(
            f"no prompts in {', '.join(specs) or 'an empty list'}: give a named set ({', '.join(PROMPT_SETS)}) or a "
            "prompt file (.txt, .json, .jsonl, .csv) that holds at least one prompt."
        )
    return prompts


def _load_spec(spec: str, seed: int) -> list[EvalPrompt]:
    name, count = _split_count(spec)
    if name in PROMPT_SETS:
        folder = Path(str(resources.files("flux_small_encoder") / "data" / "prompts" / PROMPT_SETS[name]))
        files = sorted(path for path in folder.iterdir() if path.suffix in (".txt", ".json"))
    elif os.path.isfile(name):
        files = [Path(name)]
    else:
        raise ValueError(
            f"no prompt set or file {name!r}: use one of {', '.join(PROMPT_SETS)} (add :N for a sample of N), or a "
            ".txt/.json/.jsonl/.csv file of prompts."
        )
    from ..training.data import read_prompts

    prompts = [EvalPrompt(text, path.stem, spec) for path in files for text in read_prompts(path)]
    if count is not None and count < len(prompts):
        # Sampled by index, then put back in file order so categories stay together.
        picked = sorted(random.Random(seed).sample(range(len(prompts)), count))
        prompts = [prompts[index] for index in picked]
    return prompts


def _split_count(spec: str) -> tuple[str, int | None]:
    """`"compbench-val:40"` -> `("compbench-val", 40)`; a spec without a numeric `:N` suffix is a name or path."""
    name, colon, count = spec.rpartition(":")
    if colon and count.isdigit() and name:
        if int(count) < 1:
            raise ValueError(f"{spec}: the sample size after ':' must be at least 1.")
        return name, int(count)
    return spec, None
