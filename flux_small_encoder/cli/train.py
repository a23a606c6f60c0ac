"""`train` and `cache-teacher`: distilling a student, and precomputing the teacher's embeddings for it."""

from __future__ import annotations

import argparse
import os

from . import options


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "train",
        help="distil a small T5 encoder from FLUX's T5-XXL (vision-based distillation with step following)",
        examples=[
            "--config tiny output_dir=/tmp/tiny-run",
            "--config stage1-compbench data_root=path/to/prompts output_dir=runs/s1",
            "--config stage1-compbench --num-processes 8 output_dir=runs/s1",
            "--config runs/s1/config.yaml resume_from_checkpoint=latest",
        ],
        run=run_train,
        details=_config_help,
    )
    options.add_config(parser)
    parser.add_argument(
        "--num-processes", type=options.positive_int, default=None,
        help="start this many processes (one a GPU) through `accelerate launch --multi_gpu`",
    )

    parser = options.add_command(
        subparsers, "cache-teacher",
        help="precompute the teacher's embeddings of a config's prompts, so training never loads T5-XXL",
        examples=[
            "--config stage1-compbench --out cache/s1 data_root=path/to/prompts\n"
            "  then: flux-small-encoder train --config stage1-compbench teacher_cache=cache/s1",
        ],
        run=run_cache_teacher,
    )
    options.add_config(parser)
    parser.add_argument("--out", default=None, help="cache folder to create (default: the config's teacher_cache)")
    options.add_dtype(parser, choices=("bfloat16", "float32"), default=None,
                      help="storage dtype (default: bfloat16 with mixed_precision=bf16, else float32)")
    parser.add_argument("--batch-size", type=options.positive_int, default=16, help="prompts per teacher call")
    options.add_device(parser)

    parser = options.add_command(
        subparsers, "verify-cache",
        help="check every shard of a teacher cache against its checksums (reads the whole cache)",
        examples=["cache/s1"],
        run=run_verify_cache,
    )
    parser.add_argument("folder", help="a teacher cache written by cache-teacher")


def _config_help() -> str:
    """The shipped configs and every config field with its default and help (imported only for `train --help`)."""
    import dataclasses
    import textwrap

    from ..training.config import SHIPPED_CONFIGS, TrainingConfig

    lines = [
        "or start the processes yourself:",
        "  accelerate launch --multi_gpu --num_processes 8 -m flux_small_encoder.training --config stage1-compbench",
        "",
        f"shipped configs: {', '.join(SHIPPED_CONFIGS)}",
        "fields (set in the YAML file or as key=value):",
    ]
    for field in dataclasses.fields(TrainingConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        lines.append(f"  {field.name} (default: {default!r})")
        lines += textwrap.wrap(field.metadata.get("help", ""), 112, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> None:
    if args.num_processes and args.num_processes > 1:
        from ..training.launch import launch_training

        launch_training(args.config, args.overrides, args.num_processes)
        return

    from ..training import load_config, train

    final = train(load_config(args.config, args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"student saved to {final} (load it with patch_encoder(pipe, {str(final)!r}))")


def run_cache_teacher(args: argparse.Namespace) -> None:
    from ..training import cache_teacher, load_config

    folder = cache_teacher(
        load_config(args.config, args.overrides), args.out, dtype=options.resolve_dtype(args.dtype),
        batch_size=args.batch_size, device=options.resolve_device(args.device),
    )
    print(f"wrote the teacher embeddings to {folder}")


def run_verify_cache(args: argparse.Namespace) -> None:
    from ..training import verify_teacher_cache

    cache = verify_teacher_cache(args.folder)
    print(f"{args.folder}: every shard matches its checksums ({len(cache)} prompts)")
