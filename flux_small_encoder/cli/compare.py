"""`compare`: the fidelity report of replacement encoders against a pipeline's own T5 encoder."""

from __future__ import annotations

import argparse
import os
import tempfile

from . import options

TINY_ENCODERS = "teacher,tiny-student,teacher@quanto-int8"
TINY_PROMPTS = "commontext-test:1,compbench-val:3"


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "compare",
        help="compare replacement encoders with a pipeline's own T5 on images at the same seeds, and write a report",
        examples=[
            "--model black-forest-labs/FLUX.1-dev --encoders teacher@bnb-nf4,t5-base-distilled,runs/s3/final "
            "--prompts compbench-val:40,commontext-test:40,my_prompts.txt --seeds 0,1 --steps 20 --size 1024 "
            "--out report/",
            "--tiny --out report/",
        ],
        run=run_compare,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="the pipeline (Hub id or folder), loaded with its own T5 encoder: the teacher")
    source.add_argument("--tiny", action="store_true",
                        help=f"offline: a tiny random FLUX against a tiny student (encoders {TINY_ENCODERS})")
    parser.add_argument("--encoders", help="comma-separated candidates: registry names, folders, Hub ids, `teacher` "
                        "(a self-check: it scores perfectly) and teacher@METHOD (bnb-nf4, bnb-int8, torchao-int8, "
                        "quanto-int8)")
    parser.add_argument("--prompts", help="comma-separated: compbench-val, commontext-test, or a .txt/.json/.jsonl/"
                        ".csv file; NAME:N samples N (default: compbench-val:40,commontext-test:40)")
    parser.add_argument("--seeds", type=options.seed_list, default="0",
                        help="comma-separated seeds, one image per prompt and seed (each 0 to 2**63 - 1, once)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the NAME:N prompt samples")
    parser.add_argument("--steps", type=options.positive_int, help="denoising steps (default 20; --tiny 4)")
    parser.add_argument("--size", type=options.image_side,
                        help="image height and width, a multiple of 16 (default 1024; --tiny 32)")
    parser.add_argument("--guidance", type=options.guidance_scale, default=3.5, help="guidance scale")
    parser.add_argument("--max-sequence-length", type=options.positive_int, help="T5 tokens (default 512; --tiny 32)")
    parser.add_argument("--batch-size", type=options.positive_int, default=1, help="images sampled at once")
    parser.add_argument("--out", default="report", help="the report folder (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds a report and nothing else")
    parser.add_argument("--cache-dir", help="where the teacher's images are cached (default: HF_HOME/"
                        "flux-small-encoder/teacher-images)")
    parser.add_argument("--clip", help="a local folder with a transformers CLIPModel and its processor (CLIP scores)")
    parser.add_argument("--no-ocr", action="store_true", help="skip the OCR of prompts that quote text")
    options.add_dtype(parser, choices=("bfloat16", "float16", "float32"), default=None,
                      help="dtype of the pipeline (default bfloat16; --tiny float32)")
    options.add_device(parser)
    parser.add_argument("--offload", action="store_true", help="enable model CPU offload (needs an accelerator)")
    options.add_revision(parser, help="revision of --model")
    options.add_token(parser)


def run_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..evaluation.prompts import load_eval_prompts
    from ..evaluation.report import check_report_folder

    # Refusals first, before the slow imports and loads.
    check_report_folder(Path(args.out), args.overwrite)
    # An explicitly empty --prompts or --encoders ("") is refused below like ",,,", not taken for the default.
    default_prompts = TINY_PROMPTS if args.tiny else "compbench-val:40,commontext-test:40"
    prompts = load_eval_prompts(default_prompts if args.prompts is None else args.prompts, seed=args.sample_seed)
    seeds = args.seeds
    names = [name.strip() for name in (args.encoders if args.encoders is not None else
                                       TINY_ENCODERS if args.tiny else "").split(",")]
    names = [name for name in names if name]
    if not names:
        raise ValueError("--encoders names no candidate: give at least one (teacher, teacher@METHOD, a registry "
                         "name, a folder or a Hub id).")
    if args.clip is not None:
        from ..evaluation.metrics import check_clip_folder

        check_clip_folder(args.clip)  # before the pipeline loads
    device = options.resolve_device(args.device)
    options.check_offload(args.offload, device)

    import torch

    from ..evaluation import compare_encoders
    from ..evaluation.ocr import ocr_unavailable

    if not args.no_ocr and any(prompt.quoted_text for prompt in prompts) and (reason := ocr_unavailable()):
        print(f"OCR skipped: {reason}", flush=True)  # said before the pipeline loads; the report says it too
    dtype = options.resolve_dtype(args.dtype) or (torch.float32 if args.tiny else torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="flux-small-encoder-compare-") as scratch:
        if args.tiny:
            pipe, encoders = _tiny(names, scratch, dtype)
            model, defaults = "tiny", (4, 32, 32)
        else:
            pipe, encoders = _load(args, dtype), names
            model, defaults = args.model, (20, 1024, 512)
        if args.offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        steps, size, length = (given or default for given, default in
                               zip((args.steps, args.size, args.max_sequence_length), defaults, strict=True))
        results = compare_encoders(
            pipe, encoders, prompts, seeds, steps=steps, size=size, guidance=args.guidance,
            max_sequence_length=length, batch_size=args.batch_size, cache_dir=args.cache_dir or _default_cache(),
            clip=args.clip, ocr=not args.no_ocr, model=model, revision=args.revision, token=args.token,
        )
        results.save(args.out, overwrite=args.overwrite)
    print(_summary_table(results))
    for skipped in results.skipped:
        print(f"skipped {skipped['encoder']}: {skipped['reason']}")
    print(f"wrote {os.path.join(args.out, 'index.html')}")


def _load(args: argparse.Namespace, dtype):
    from diffusers import FluxPipeline

    from .generate import _fetch_hint

    with _fetch_hint(args.model, "pipeline"):
        return FluxPipeline.from_pretrained(args.model, dtype=dtype, revision=args.revision, token=args.token)


def _tiny(names: list[str], scratch: str, dtype):
    """The tiny random FLUX and the candidates, `tiny-student` saved and named by its folder's name."""
    import torch

    from ..tiny import tiny_flux_pipeline, tiny_student

    folder = os.path.join(scratch, "tiny-student")
    tiny_student().save_pretrained(folder)  # through the real loading path
    encoders = {name: (folder if name == "tiny-student" else name) for name in names}
    pipe = tiny_flux_pipeline()
    return (pipe if dtype == torch.float32 else pipe.to(dtype)), encoders


def _default_cache() -> str:
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "flux-small-encoder", "teacher-images")


def _summary_table(results) -> str:
    """One line per encoder: its mean of each metric."""
    from ..evaluation.metrics import METRIC_LABELS

    summary = results.summary()
    metrics = [m for m in ("psnr", "ssim", "embedding_cosine", "trajectory_error", "ocr_accuracy", "clip_score")
               if any(m in stats["metrics"] for stats in summary.values())]
    width = max(len(name) for name in [*summary, "encoder"])
    lines = ["  ".join([f"{'encoder':<{width}}", *(f"{METRIC_LABELS[m]:>18}" for m in metrics)])]
    for name, stats in summary.items():
        cells = [f"{stats['metrics'][m]['mean']:>18.4g}" if m in stats["metrics"] else f"{'-':>18}" for m in metrics]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)
