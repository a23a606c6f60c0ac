"""The `flux-small-encoder` command: one function per subcommand, each registered by its `add_*_parser`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager

EPILOG = """examples:
  flux-small-encoder list
  flux-small-encoder demo --out demo.png
  flux-small-encoder generate "a cat holding a sign that says hello" --model black-forest-labs/FLUX.1-dev \\
      --encoder t5-base-distilled --out cat.png
  flux-small-encoder train --config tiny output_dir=/tmp/tiny-run
  flux-small-encoder push runs/s3/final me/my-encoder
  flux-small-encoder info t5-base-distilled
"""


class CLIError(Exception):
    """An error the user can fix: printed as one message, without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flux-small-encoder",
        description="Small distilled T5 text encoders for FLUX: run, train, share.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CLIError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


# --- list ----------------------------------------------------------------------------------------------------------


def add_list_parser(subparsers) -> None:
    parser = subparsers.add_parser("list", help="list the registered distilled encoders")
    parser.set_defaults(func=run_list)


def run_list(args) -> None:
    from .registry import get_pretrained_spec, list_pretrained

    for name in list_pretrained():
        spec = get_pretrained_spec(name)
        revision = spec.revision or "default branch"
        print(f"{name}\n  repo: {spec.repo_id} ({revision})\n  replaces: {spec.teacher} ({spec.out_dim} wide)")
        print(f"  tokenizer: {spec.tokenizer}\n  license: {spec.license or 'see the repo card'}")
        print(f"  {spec.description}")


# --- generate ------------------------------------------------------------------------------------------------------


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an image with a patched pipeline",
        epilog='example: flux-small-encoder generate "a red cube" --model black-forest-labs/FLUX.1-dev --out cube.png',
    )
    parser.add_argument("prompt")
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev", help="pipeline repo id or folder")
    parser.add_argument("--encoder", default="t5-base-distilled", help="registry name, folder or repo id")
    parser.add_argument("--out", default="image.png", help="where to write the PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--offload", action="store_true", help="enable model CPU offload (needs an accelerator)")
    parser.set_defaults(func=run_generate)


def run_generate(args) -> None:
    import torch
    from diffusers import FluxPipeline

    from .patching import patch_encoder
    from .registry import resolve_encoder
    from .torch_utils import default_device

    _refuse_existing_output(args)
    try:
        resolved = resolve_encoder(args.encoder)
    except ValueError as error:
        raise CLIError(error) from None
    dtype = getattr(torch, args.dtype)
    device = args.device or default_device()
    with _missing_files_are_errors(args.model, "pipeline"):
        pipe = FluxPipeline.from_pretrained(args.model, text_encoder_2=None, dtype=dtype)
    with _missing_files_are_errors(resolved.path, "encoder"):
        patch_encoder(pipe, args.encoder, dtype=dtype)
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    image = pipe(
        args.prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images[0]
    image.save(args.out)
    print(f"wrote {args.out}")


def _refuse_existing_output(args) -> None:
    """Never replace a user's file unasked: checked before any model is loaded."""
    if os.path.exists(args.out) and not args.overwrite:
        raise CLIError(f"{args.out} already exists: choose another --out, or pass --overwrite to replace it.")


@contextmanager
def _missing_files_are_errors(repo: str, what: str):
    """Turn "not found / not cached / offline" into a `CLIError` that names the repo and how to fetch it."""
    try:
        yield
    except OSError:
        if os.path.isdir(repo):
            raise
        from .hub import not_cached_message

        raise CLIError(not_cached_message(repo, what=what)) from None


# --- demo ----------------------------------------------------------------------------------------------------------


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline smoke run: tiny random FLUX, patched with a tiny student, writes an image",
        epilog="example: flux-small-encoder demo --out demo.png",
    )
    parser.add_argument("--out", default="demo.png", help="where to write the PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--prompt", default="a cat holding a sign that says hello")
    parser.set_defaults(func=run_demo)


def run_demo(args) -> None:
    import torch

    from .patching import patch_encoder
    from .tiny import tiny_flux_pipeline, tiny_student

    _refuse_existing_output(args)
    start = time.perf_counter()
    pipe = tiny_flux_pipeline()
    teacher_params = sum(p.numel() for p in pipe.text_encoder_2.parameters())
    with tempfile.TemporaryDirectory() as folder:
        # Through the real loading path: save the student, then patch from its folder.
        tiny_student().save_pretrained(folder)
        patch_encoder(pipe, folder)
    student_params = sum(p.numel() for p in pipe.text_encoder_2.parameters())
    image = pipe(
        args.prompt, height=32, width=32, num_inference_steps=2, max_sequence_length=48,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    image.save(args.out)
    print(
        f"tiny FLUX patched: text_encoder_2 is now {type(pipe.text_encoder_2).__name__} "
        f"({student_params:,} parameters, was {teacher_params:,})\n"
        f"wrote {args.out} ({image.width}x{image.height}) in {time.perf_counter() - start:.1f} s"
    )


# --- push / download / convert / info ------------------------------------------------------------------------------


def add_push_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a saved encoder to the Hub with a model card, in one commit",
        epilog="example: flux-small-encoder push runs/s3/final me/flux-t5-small-distilled --private",
    )
    parser.add_argument("folder", help="a folder written by save_pretrained (e.g. a trainer's output_dir/final)")
    parser.add_argument("repo_id", help="the Hub repository, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message")
    parser.add_argument("--tokenizer", help="a tokenizer folder or repo id to upload with the model")
    parser.add_argument("--license", help="Hub license id of the weights (default: other)")
    parser.add_argument("--pipeline", help="the pipeline it was distilled for (default: the training config's)")
    parser.add_argument("--teacher", help="the encoder it replaces (default: the training config's)")
    parser.add_argument("--base-model", help="Hub id of the T5 it started from (default: from its config)")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the saved login)")
    parser.set_defaults(func=run_push)


def run_push(args) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import push_to_hub

    try:
        commit = push_to_hub(
            args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
            create_pr=args.create_pr, commit_message=args.commit_message, tokenizer=args.tokenizer,
            license=args.license, pipeline=args.pipeline, teacher=args.teacher, base_model=args.base_model,
        )
    except (ValueError, TypeError, HfHubHTTPError) as error:
        raise CLIError(error) from None
    print(f"uploaded {args.folder} to {args.repo_id}: {commit.pr_url or commit.commit_url}")


def add_download_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "download",
        help="fetch an encoder's files into the Hugging Face cache and print its folder",
        epilog="example: flux-small-encoder download t5-base-distilled",
    )
    parser.add_argument("encoder", help="registry name or Hub repo id")
    parser.add_argument("--revision", help="branch, tag or commit")
    parser.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    parser.add_argument("--local-files-only", action="store_true", help="use the cache only, never the network")
    parser.add_argument("--token", help="Hub token for private or gated repos")
    parser.set_defaults(func=run_download)


def run_download(args) -> None:
    from .hub import download

    with _user_errors(ValueError, FileNotFoundError):
        print(download(
            args.encoder, revision=args.revision, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
            token=args.token,
        ))


def add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a .pth / ComfyUI / single-file checkpoint into a folder, or a folder into a ComfyUI file",
        epilog="examples:\n  flux-small-encoder convert ckpt/experiment.pth out/ --config config.json\n"
        "  flux-small-encoder convert out/ DistillT5-comfyui.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="folder, .safetensors file, .pth state dict, registry name or repo id")
    parser.add_argument("dst", help="a folder (config.json + model.safetensors), or a .safetensors path for ComfyUI")
    parser.add_argument("--config", help="config.json describing the weights (default: stored with SRC, or inferred)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    parser.set_defaults(func=run_convert)


def run_convert(args) -> None:
    from .convert import convert, describe

    with _user_errors(ValueError, FileNotFoundError):
        written = convert(args.src, args.dst, config=args.config, overwrite=args.overwrite)
        print(f"wrote {written}\n{describe(written).summary()}")


def add_info_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="T5 shape, projector widths, parameters, dtype, size and fitting pipelines of a checkpoint",
        epilog="example: flux-small-encoder info t5-base-distilled",
    )
    parser.add_argument("encoder", help="folder, .safetensors or .pth file, registry name or Hub repo id")
    parser.set_defaults(func=run_info)


def run_info(args) -> None:
    from .convert import describe

    with _user_errors(ValueError, FileNotFoundError):
        print(describe(args.encoder).summary())


@contextmanager
def _user_errors(*kinds: type[Exception]):
    """Errors of `kinds` are the user's to fix (their messages say how): printed as one line, not a traceback."""
    try:
        yield
    except kinds as error:
        raise CLIError(error) from None


# --- train / cache-teacher -----------------------------------------------------------------------------------------

TRAIN_EPILOG = """examples:
  flux-small-encoder train --config tiny output_dir=/tmp/tiny-run
  flux-small-encoder train --config stage1-compbench data_root=path/to/prompts output_dir=runs/s1
  flux-small-encoder train --config stage1-compbench --num-processes 8 output_dir=runs/s1
  accelerate launch --multi_gpu --num_processes 8 -m flux_small_encoder.train --config stage1-compbench ...
  flux-small-encoder train --config runs/s1/config.yaml resume_from_checkpoint=latest

shipped configs: {configs}
fields (set in the YAML file or as key=value):
{fields}
"""


def _config_fields_help() -> str:
    import dataclasses
    import textwrap

    from .training.config import TrainingConfig

    lines = []
    for field in dataclasses.fields(TrainingConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        lines.append(f"  {field.name} (default: {default!r})")
        lines += textwrap.wrap(field.metadata.get("help", ""), 112, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _add_config_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="a shipped config name or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config fields that win over the file")


def _load_training_config(args):
    from .training.config import load_config

    try:
        return load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        raise CLIError(error) from None


def add_train_parser(subparsers) -> None:
    from .training.config import SHIPPED_CONFIGS

    parser = subparsers.add_parser(
        "train",
        help="distil a small T5 encoder from FLUX's T5-XXL (vision-based distillation with step following)",
        epilog=TRAIN_EPILOG.format(configs=", ".join(SHIPPED_CONFIGS), fields=_config_fields_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(parser)
    parser.add_argument(
        "--num-processes", type=int, default=None,
        help="start this many processes (one a GPU) through `accelerate launch --multi_gpu`",
    )
    parser.set_defaults(func=run_train)


def run_train(args) -> None:
    config = _load_training_config(args)  # checked here, before any process starts
    if args.num_processes and args.num_processes > 1:
        import subprocess

        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(args.num_processes), "--num_machines", "1", "--mixed_precision", config.mixed_precision,
            "--dynamo_backend", "no", "-m", "flux_small_encoder.train", "--config", args.config, *args.overrides,
        ]
        code = subprocess.call(command)
        if code:
            raise CLIError(f"training on {args.num_processes} processes failed (exit status {code}); see above.")
        return

    from .training import TrainingDivergedError, train
    from .training.data import PromptFileError

    try:
        final = train(config)
    except (PromptFileError, FileExistsError, FileNotFoundError, TrainingDivergedError) as error:
        raise CLIError(error) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"student saved to {final} (load it with patch_encoder(pipe, {str(final)!r}))")


def add_cache_teacher_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache-teacher",
        help="precompute the teacher's embeddings of a config's prompts, so training never loads T5-XXL",
        epilog="example: flux-small-encoder cache-teacher --config stage1-compbench --out cache/s1 "
        "data_root=path/to/prompts\n  then: flux-small-encoder train --config stage1-compbench teacher_cache=cache/s1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(parser)
    parser.add_argument("--out", default=None, help="cache folder to create (default: the config's teacher_cache)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="storage dtype (default: bfloat16 with mixed_precision=bf16, else float32)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per teacher call")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.set_defaults(func=run_cache_teacher)


def run_cache_teacher(args) -> None:
    import torch

    from .torch_utils import default_device, precision_dtype
    from .training.cache import write_teacher_cache
    from .training.data import PromptFileError, load_sources
    from .training.models import load_t5_tokenizer, load_teacher, teacher_name, tokenize_t5

    config = _load_training_config(args)
    out = args.out or config.teacher_cache
    if not out:
        raise CLIError("give --out FOLDER (or set teacher_cache in the config).")
    try:
        prompts = load_sources(config.train_data + config.eval_data, seed=config.seed)
    except PromptFileError as error:
        raise CLIError(error) from None
    model_dtype = precision_dtype(config.mixed_precision)
    device = args.device or default_device()
    teacher = load_teacher(config, model_dtype).to(device)
    tokenizer = load_t5_tokenizer(config)
    try:
        folder = write_teacher_cache(
            out,
            encode=lambda ids: teacher(ids.to(device), output_hidden_states=False)[0],
            tokenize=lambda batch: tokenize_t5(tokenizer, batch, config.max_sequence_length),
            prompts=prompts,
            teacher=teacher_name(config),
            max_sequence_length=config.max_sequence_length,
            dtype=getattr(torch, args.dtype) if args.dtype else model_dtype,
            batch_size=args.batch_size,
        )
    except FileExistsError as error:
        raise CLIError(error) from None
    print(f"wrote the teacher embeddings of {len(set(prompts))} prompts to {folder}")


SUBCOMMANDS = [
    add_list_parser, add_generate_parser, add_demo_parser,
    add_train_parser, add_cache_teacher_parser,
    add_push_parser, add_download_parser, add_convert_parser, add_info_parser,
]


if __name__ == "__main__":
    sys.exit(main())
