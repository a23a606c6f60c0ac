"""A FLUX LoRA (transformer and CLIP) on a pipeline patched with a small distilled text encoder, optionally with a
LoRA adapter on the student itself.

    python examples/lora_flux.py --lora alvdansen/frosting_lane_flux --prompt "a cupcake shop" --out shop.png
    python examples/lora_flux.py --lora my/flux-lora --student-lora ./runs/lora/adapter --student-lora-weight 0.8
    python examples/lora_flux.py --tiny                # tiny random models and LoRAs, offline, seconds on a CPU
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

from flux_small_encoder import load_pipeline, patch_encoder
from flux_small_encoder.cli.options import check_out, save_image
from flux_small_encoder.lora import fuse_encoder_lora, load_encoder_lora


def tiny_setup(folder: str):
    """A tiny patched FluxPipeline, a random FLUX LoRA and a random student LoRA (both saved in `folder`)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model

    from flux_small_encoder.tiny import tiny_flux_components, tiny_student

    pipe = patch_encoder(FluxPipeline(**tiny_flux_components()), tiny_student())
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    adapted = inject_adapter_in_model(config, copy.deepcopy(pipe.transformer))
    FluxPipeline.save_lora_weights(f"{folder}/flux-lora", transformer_lora_layers=get_peft_model_state_dict(adapted))
    config = LoraConfig(r=4, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"], init_lora_weights=False)
    get_peft_model(tiny_student(), config).save_pretrained(f"{folder}/student-lora")
    return pipe, f"{folder}/flux-lora", f"{folder}/student-lora"


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--encoder", default="t5-base-distilled", help="registry name, folder or Hub repo id")
    parser.add_argument("--lora", help="a FLUX LoRA: Hub repo id, folder or .safetensors file")
    parser.add_argument("--lora-weight", type=float, default=1.0)
    parser.add_argument("--student-lora", help="a peft adapter folder (or Hub repo) trained on the student")
    parser.add_argument("--student-lora-weight", type=float, default=1.0)
    parser.add_argument("--fuse", action="store_true", help="fuse the LoRAs into the weights (faster inference)")
    parser.add_argument("--prompt", default="a red cube on a blue sphere, studio photo")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lora.png", help="where to write the PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--offload", action="store_true", help="model CPU offload, for GPUs under ~32 GB")
    parser.add_argument("--tiny", action="store_true", help="tiny random models and LoRAs: checks the wiring, offline")
    args = parser.parse_args(argv)
    try:
        check_out(args)  # before any model loads: an image that could not be written is refused first
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.lora is None and not args.tiny:
        parser.error("--lora is required (or pass --tiny)")

    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            pipe, args.lora, args.student_lora = tiny_setup(scratch)
            args.steps, args.height, args.width = 2, 32, 32
        else:
            pipe = load_pipeline(args.model, encoder=args.encoder, dtype=torch.bfloat16)

        # Transformer and CLIP LoRAs load exactly as on a stock pipeline; the student is not touched by them.
        pipe.load_lora_weights(args.lora, adapter_name="style")
        pipe.set_adapters("style", args.lora_weight)
        if args.student_lora:
            load_encoder_lora(pipe, args.student_lora, adapter_name="student", weight=args.student_lora_weight)
        if args.fuse:
            pipe.fuse_lora()
            if args.student_lora:
                fuse_encoder_lora(pipe)
        if not args.tiny:
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
