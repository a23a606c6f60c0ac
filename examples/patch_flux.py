"""Generate with FLUX.1 using the distilled T5-Base encoder instead of T5-XXL.

    python examples/patch_flux.py "a cat holding a sign that says hello" --out cat.png
    python examples/patch_flux.py --tiny --out tiny.png      # offline, tiny random models, seconds on a CPU
"""

from __future__ import annotations

import argparse

import torch

from flux_small_encoder import load_pipeline, patch_encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="a cat holding a sign that says hello")
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--encoder", default="t5-base-distilled")
    parser.add_argument("--out", default="image.png")
    parser.add_argument("--tiny", action="store_true", help="tiny random FLUX and student, no download")
    args = parser.parse_args(argv)

    if args.tiny:
        from flux_small_encoder.tiny import tiny_flux_pipeline, tiny_student

        pipe = patch_encoder(tiny_flux_pipeline(), tiny_student())
        size, steps = 32, 2
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = load_pipeline(args.model, encoder=args.encoder, dtype=torch.bfloat16).to(device)
        size, steps = 1024, 28

    image = pipe(
        args.prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
