"""Stable Diffusion 3 / 3.5 with a small distilled encoder in `text_encoder_3` (SD3's T5-XXL slot).

SD3.5's transformer reads 4096-wide T5 embeddings (`joint_attention_dim`), as FLUX's does, so a student with
`project_out_dim=4096` fits; `patch_encoder` refuses any other width. A student distilled against FLUX's transformer
was not trained for SD3: judge its images before relying on it, or distil one for SD3.

    python examples/sd3_student.py --model stabilityai/stable-diffusion-3.5-medium --encoder ./my-sd3-student
    python examples/sd3_student.py --tiny              # tiny random models, offline, a second on a CPU
"""

from __future__ import annotations

import argparse

import torch

from flux_small_encoder import load_pipeline, patch_encoder
from flux_small_encoder.cli.options import check_out, save_image


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stabilityai/stable-diffusion-3.5-medium")
    parser.add_argument("--encoder", default="t5-base-distilled", help="registry name, folder or Hub repo id")
    parser.add_argument("--prompt", default="a red cube on a blue sphere, studio photo")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sd3.png", help="where to write the PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--offload", action="store_true", help="model CPU offload, for GPUs under ~24 GB")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: checks the wiring, offline")
    args = parser.parse_args(argv)
    try:
        check_out(args)  # before any model loads: an image that could not be written is refused first
    except (OSError, ValueError) as error:
        parser.error(str(error))

    from diffusers import StableDiffusion3Pipeline

    if args.tiny:
        from flux_small_encoder.tiny import tiny_sd3_components, tiny_student

        pipe = patch_encoder(StableDiffusion3Pipeline(**tiny_sd3_components()), tiny_student())
        args.steps, args.height, args.width = 2, 32, 32
    else:
        # Loaded without its T5-XXL (text_encoder_3=None), then patched with the student.
        pipe = load_pipeline(
            args.model, encoder=args.encoder, pipeline_cls=StableDiffusion3Pipeline, dtype=torch.bfloat16
        )
        if args.offload:
            pipe.enable_model_cpu_offload()
        elif torch.cuda.is_available():
            pipe.to("cuda")
    image = pipe(
        prompt=args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        max_sequence_length=256,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images[0]
    save_image(image, args)
    print(f"wrote {args.out}")
    return image


if __name__ == "__main__":
    main()
