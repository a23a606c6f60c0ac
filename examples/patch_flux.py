"""Generate with FLUX.1 using the distilled T5-Base encoder instead of T5-XXL.

    python examples/patch_flux.py --prompt "a cat holding a sign that says hello" --out cat.png
    python examples/patch_flux.py --tiny --out tiny.png      # offline, tiny random models, seconds on a CPU
"""

from __future__ import annotations

import argparse

import torch

from flux_small_encoder import load_pipeline, patch_encoder
from flux_small_encoder.cli.options import check_out, save_image


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--encoder", default="t5-base-distilled", help="registry name, folder or Hub repo id")
    parser.add_argument("--prompt", default="a cat holding a sign that says hello")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="flux.png", help="where to write the PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--offload", action="store_true", help="model CPU offload, for GPUs under ~32 GB")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: checks the wiring, offline")
    args = parser.parse_args(argv)
    try:
        check_out(args)  # before any model loads: an image that could not be written is refused first
    except (OSError, ValueError) as error:
        parser.error(str(error))

    if args.tiny:
        from flux_small_encoder.tiny import tiny_flux_pipeline, tiny_student

        pipe = patch_encoder(tiny_flux_pipeline(), tiny_student())
        args.steps, args.height, args.width = 2, 32, 32
    else:
        # The pipeline loads without T5-XXL (its 9.5 GB are never read) and gets the student instead.
        pipe = load_pipeline(args.model, encoder=args.encoder, dtype=torch.bfloat16)
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
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images[0]
    save_image(image, args)
    print(f"wrote {args.out}")
    return image


if __name__ == "__main__":
    main()
