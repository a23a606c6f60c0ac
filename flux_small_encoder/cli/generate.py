"""`generate` and `demo`: an image from a pipeline patched with a distilled encoder."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager

from . import options, plan


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "generate", help="generate an image with a pipeline patched with a distilled encoder",
        examples=[
            '"a red cube" --model black-forest-labs/FLUX.1-dev --out cube.png',
            '"a red cube" --model path/to/FLUX.1-schnell --encoder path/to/my-student --steps 4 --guidance 0',
            '"a red cube" --vram 16 --out cube.png   # the fastest memory recipe that fits (see `plan`)',
        ],
        run=run_generate,
    )
    parser.add_argument("prompt", type=options.prompt)
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev", help="pipeline repo id or folder")
    parser.add_argument("--encoder", default="t5-base-distilled", help="registry name, folder or repo id")
    options.add_out(parser, default="image.png", help="where to write the PNG")
    parser.add_argument("--steps", type=options.positive_int, default=28, help="denoising steps")
    parser.add_argument("--guidance", type=options.guidance_scale, default=3.5, help="guidance scale")
    parser.add_argument("--height", type=options.image_side, default=1024, help="image height, a multiple of 16")
    parser.add_argument("--width", type=options.image_side, default=1024, help="image width, a multiple of 16")
    parser.add_argument("--seed", type=options.seed, default=0, help="seed of the initial noise, 0 to 2**63 - 1")
    options.add_dtype(parser, choices=("bfloat16", "float16", "float32"), default="bfloat16",
                      help="dtype of the pipeline and the encoder")
    options.add_device(parser)
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--offload", action="store_true", help="enable model CPU offload (needs an accelerator)")
    plan.add_vram(memory, required=False)

    parser = options.add_command(
        subparsers, "demo", help="offline smoke run: tiny random FLUX, patched with a tiny student, writes an image",
        examples=["--out demo.png"], run=run_demo,
    )
    options.add_out(parser, default="demo.png", help="where to write the PNG")
    parser.add_argument("--prompt", type=options.prompt, default="a cat holding a sign that says hello")


def run_generate(args: argparse.Namespace) -> None:
    from ..registry import resolve_encoder

    # Refusals first, before the slow imports and loads.
    options.check_out(args)
    _check_pipeline_folder(args.model)
    resolved = resolve_encoder(args.encoder)
    device = options.resolve_device(args.device)
    options.check_offload(args.offload, device)
    dtype = options.resolve_dtype(args.dtype)

    import torch
    from diffusers import FluxPipeline

    from ..memory import parse_budget

    if args.vram is not None:
        parse_budget(args.vram)

    from ..patching import find_encoder_slot, patch_encoder
    from ..registry import load_encoder

    if args.vram is not None:  # from the configs alone: a budget nothing fits is refused before any weight loads
        from ..memory import folder_footprint, plan_memory

        try:
            footprint = folder_footprint(args.model, args.encoder, dtype=dtype)
        except OSError:
            footprint = None  # configs out of reach: loading below reports why, with the command that fetches them
        if footprint is not None:
            plan_memory(footprint, args.vram, size=max(args.height, args.width))

    # The encoder first: it is small and checked before the pipeline's gigabytes are read.
    with _fetch_hint(None if resolved.local else resolved.path, "encoder"):
        student = load_encoder(resolved, dtype=dtype)
    with _fetch_hint(args.model, "pipeline", exclude=find_encoder_slot(FluxPipeline).encoder):
        pipe = FluxPipeline.from_pretrained(args.model, text_encoder_2=None, dtype=dtype)
    patch_encoder(pipe, student, dtype=dtype)
    if args.vram is not None:
        memory_plan = plan_memory(pipe, args.vram, size=max(args.height, args.width))
        memory_plan.apply(pipe, device)
        print(f"memory plan: {memory_plan.recipe.name}, predicted peak {memory_plan.chosen.peak / 2**30:.2f} GiB of "
              f"{args.vram:g}")
    elif args.offload:
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
    options.save_image(image, args)
    print(f"wrote {args.out}")


def _check_pipeline_folder(model: str) -> None:
    """Refuse a `--model` that is neither a diffusers pipeline folder nor a Hub repo id, before any weight is read,
    saying what it looks like instead."""
    from ..registry import check_pipeline_source

    check_pipeline_source(model, f"--model {model}")
    if not os.path.isdir(model) or os.path.isfile(os.path.join(model, "model_index.json")):
        return
    looks_like = (
        " It holds a config.json: a single model, such as an encoder (which goes to --encoder)."
        if os.path.isfile(os.path.join(model, "config.json")) else ""
    )
    raise FileNotFoundError(
        f"--model {model} is not a diffusers pipeline folder: it has no model_index.json.{looks_like} Pass a folder "
        "saved with the pipeline's save_pretrained, or a Hub repo id such as black-forest-labs/FLUX.1-dev."
    )


@contextmanager
def _fetch_hint(repo: str | None, what: str, exclude: str | None = None):
    """A Hub repo that is not cached while offline is re-raised with the command that fetches it (without the folder
    `exclude`); `None` or a local folder: nothing to fetch."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from ..errors import causes

    try:
        yield
    except OSError as error:
        not_cached = any(isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for cause in causes(error))
        if repo is None or os.path.isdir(repo) or not not_cached:
            raise
        from ..hub import not_cached_message

        raise OSError(not_cached_message(repo, what=what, exclude=exclude)) from error


def run_demo(args: argparse.Namespace) -> None:
    options.check_out(args)
    import torch

    from ..patching import patch_encoder
    from ..tiny import tiny_flux_pipeline, tiny_student

    start = time.perf_counter()
    with _one_thread():
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
    options.save_image(image, args)
    print(
        f"tiny FLUX patched: text_encoder_2 is now {type(pipe.text_encoder_2).__name__} "
        f"({student_params:,} parameters, was {teacher_params:,})\n"
        f"wrote {args.out} ({image.width}x{image.height}) in {time.perf_counter() - start:.1f} s"
    )


@contextmanager
def _one_thread():
    """Run tiny work on one thread: spreading kernels this small over every core only adds contention, and on a busy
    machine turns seconds into minutes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
