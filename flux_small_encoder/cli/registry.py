"""`list`: the registered distilled encoders."""

from __future__ import annotations

import argparse

from . import options


def register(subparsers) -> None:
    options.add_command(subparsers, "list", help="list the registered distilled encoders", examples=[""], run=run_list)


def run_list(args: argparse.Namespace) -> None:
    from ..registry import get_pretrained_spec, list_pretrained

    for name in list_pretrained():
        spec = get_pretrained_spec(name)
        revision = spec.revision or "default branch"
        print(f"{name}\n  repo: {spec.repo_id} ({revision})\n  replaces: {spec.teacher} ({spec.out_dim} wide)")
        print(f"  tokenizer: {spec.tokenizer}\n  license: {spec.license or 'see the repo card'}")
        print(f"  {spec.description}")
