"""FLUX ControlNet with a small distilled text encoder in place of T5-XXL.

    python examples/controlnet_flux.py --control-image edges.png --prompt "a castle at dusk" --out castle.png
    python examples/controlnet_flux.py --tiny            # tiny random models, offline, a second on a CPU
"""

from __future__ import annotations

import argparse

import torch

from flux_small_encoder import load_pipeline, patch_encoder
from flux_small_encoder.cli.options import check_out, save_image


def build_pipeline(args):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    if args.tiny:
        from flux_small_encoder.tiny import tiny_flux_components, tiny_flux_controlnet, tiny_student

        pipe = FluxControlNetPipeline(**tiny_flux_components(), controlnet=tiny_flux_controlnet())
        return patch_encoder(pipe, tiny_student())
    controlnet = FluxControlNetModel.from_pretrained(args.controlnet, dtype=torch.bfloat16)
    # The pipeline loads without T5-XXL (its 9.5 GB are never read) and gets the student instead.
    return load_pipeline(
        args.model, encoder=args.encoder, pipeline_cls=FluxControlNetPipeline, controlnet=controlnet,
        dtype=torch.bfloat16,
    )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--encoder", default="t5-base-distilled", help="registry name, folder or Hub repo id")
    parser.add_argument("--controlnet", default="InstantX/FLUX.1-dev-Controlnet-Canny")
    parser.add_argument("--control-image", help="the conditioning image (for the Canny ControlNet: an edge map)")
    parser.add_argument("--conditioning-scale", type=float, default=0.6)
    parser.add_argument("--prompt", default="a red cube on a blue sphere, studio photo")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="controlnet.png", help="where to write the PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--offload", action="store_true", help="model CPU offload, for GPUs under ~32 GB")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: checks the wiring, offline")
    args = parser.parse_args(argv)
    try:
        check_out(args)  # before any model loads: an image that could not be written is refused first
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.control_image is None and not args.tiny:
        parser.error("--control-image is required (or pass --tiny)")

    pipe = build_pipeline(args)
    if args.tiny:
        from PIL import Image

        args.steps, args.height, args.width = 2, 32, 32
        control_image = Image.new("RGB", (32, 32), "white")
    else:
        from diffusers.utils import load_image

        control_image = load_image(args.control_image)
        if args.offload:
            pipe.enable_model_cpu_offload()
        elif torch.cuda.is_available():
            pipe.to("cuda")
    image = pipe(
        prompt=args.prompt,
        control_image=control_image,
        controlnet_conditioning_scale=args.conditioning_scale,
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
