"""`convert` and `info`: checkpoints in other layouts, and what a checkpoint holds."""

from __future__ import annotations

import argparse

from . import options


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "convert",
        help="convert a .pth / ComfyUI / single-file checkpoint into a folder, or a folder into a ComfyUI file",
        examples=["ckpt/experiment.pth out/ --config config.json", "out/ DistillT5-comfyui.safetensors"],
        run=run_convert,
    )
    parser.add_argument("src", help="folder, .safetensors file, .pth state dict, registry name or repo id")
    parser.add_argument("dst", help="a folder (config.json + model.safetensors), or a .safetensors path for ComfyUI")
    parser.add_argument("--config", help="config.json describing the weights (default: stored with SRC, or inferred)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")

    parser = options.add_command(
        subparsers, "info",
        help="T5 shape, projector widths, parameters, dtype, size and fitting pipelines of a checkpoint",
        examples=["t5-base-distilled", "ckpt/experiment.pth"],
        run=run_info,
    )
    parser.add_argument("encoder", help="folder, .safetensors or .pth file, registry name or Hub repo id")


def run_convert(args: argparse.Namespace) -> None:
    from ..convert import convert
    from ..info import describe

    written = convert(args.src, args.dst, config=args.config, overwrite=args.overwrite)
    print(f"wrote {written}\n{describe(written).summary()}")


def run_info(args: argparse.Namespace) -> None:
    from ..hub import download
    from ..info import describe

    print(describe(download(args.encoder)).summary())
