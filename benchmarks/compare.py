"""What `compare` adds per 1024x1024 image pair on a CPU, beside the generation time of the same run.

Times, per teacher/candidate pair of 1024x1024 images: PSNR + SSIM, the embedding metrics (one prompt, 512 x 4096
float32 embeddings, FLUX.1's shape), the trajectory error, OCR of one image (done only for prompts that quote text),
and the report's share (a heat map and two PNG writes).

The trajectory error runs the transformer along the teacher's trajectory with the candidate's embeddings: `--steps`
transformer calls per candidate image, the teacher's own predictions being made once per image (with its image) and
reused by every candidate; without that reuse it would take twice as many. It is transformer work, as generation is,
so its ratio to the generation time carries over to real models: a candidate's image and its trajectory error cost
about two generations. The other metrics are fixed costs per image pair, so their ratio here is an upper bound.

Generation here is a tiny random FLUX (one transformer layer, 32 wide, a 4-level tiny VAE: FLUX's 8x latent grid, so
4,096 image tokens at 1024 px), sampled at 1024 px with `--steps` steps by the comparison's own `Sampler`: it stands
for the generation a comparison runs, far below the real model's cost (FLUX.1-dev's shapes at 1024 px, 20 steps, bf16:
3.63 s an image on one H200).

Each timing is the fastest of `--repeats` calls after a warm-up.

    OMP_NUM_THREADS=1 python benchmarks/compare.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from flux_small_encoder.evaluation.generation import GenerationSettings, Sampler, encode, frozen_parts_of
from flux_small_encoder.evaluation.metrics import embedding_metrics, image_metrics
from flux_small_encoder.evaluation.ocr import TextReader
from flux_small_encoder.evaluation.report import heatmap
from flux_small_encoder.tiny import tiny_flux_components

PROMPT = "a cat holding a sign that says 'tracking'"


def timed(fn, repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def tiny_pipeline_at_flux_scale():
    """The tiny FLUX with a 4-level VAE, so that a 1024 px image is 128 x 128 latents, as with FLUX.1."""
    from diffusers import AutoencoderKL, FluxPipeline

    components = tiny_flux_components()
    torch.manual_seed(0)
    components["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()
    return FluxPipeline(**components)


def text_image(size: int) -> np.ndarray:
    """A `size` x `size` image with a word in it, so that OCR has something to read."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((size // 8, size // 2), "tracking", fill="black",
                               font=ImageFont.load_default(size=size // 16))
    return np.array(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    pipe = tiny_pipeline_at_flux_scale()
    settings = GenerationSettings(steps=args.steps, size=args.size, guidance=3.5, max_sequence_length=512)
    sampler = Sampler(frozen_parts_of(pipe), settings)
    embeds = encode(pipe.text_encoder_2, sampler.tokenize([PROMPT]))
    trajectory = sampler.start([PROMPT], [0], embeds)
    generation = timed(lambda: sampler.images(copy.copy(trajectory), embeds), args.repeats)
    predictions = []  # the teacher's, kept as the comparison keeps them
    teacher = sampler.images(trajectory, embeds, predictions)
    tiny_candidate_embeds = embeds + 0.05 * torch.randn_like(embeds)
    candidate = sampler.images(trajectory, tiny_candidate_embeds)
    objective = sampler.objective

    # Real FLUX.1 shapes for the embeddings: 512 tokens x 4096.
    teacher_embeds = torch.randn(1, 512, 4096)
    candidate_embeds = teacher_embeds + 0.1 * torch.randn(1, 512, 4096)
    pixels = lambda: image_metrics(candidate.double() / 255, teacher.double() / 255)  # noqa: E731
    rows = {
        "PSNR + SSIM": timed(pixels, args.repeats),
        "embedding cosine + MSE (512 x 4096)": timed(lambda: embedding_metrics(candidate_embeds, teacher_embeds),
                                                      args.repeats),
    }
    rows["PSNR + SSIM + embeddings"] = rows["PSNR + SSIM"] + rows["embedding cosine + MSE (512 x 4096)"]
    rows[f"trajectory error ({args.steps} transformer calls, teacher's reused)"] = timed(
        lambda: objective.trajectory_errors(copy.copy(trajectory), tiny_candidate_embeds, teacher_preds=predictions),
        args.repeats,
    )
    rows[f"  the same without the reuse ({2 * args.steps} calls)"] = timed(
        lambda: objective.trajectory_errors(copy.copy(trajectory), tiny_candidate_embeds), args.repeats
    )
    reader, page = TextReader(), text_image(args.size)
    assert reader.read(page) == "tracking", reader.read(page)
    rows["OCR of one image (prompts with quoted text only)"] = timed(lambda: reader.read(page), args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        image, reference = (array[0].permute(1, 2, 0).numpy() for array in (candidate, teacher))

        def report_share():
            Image.fromarray(image).save(Path(folder) / "image.png")
            Image.fromarray(heatmap(image, reference)).save(Path(folder) / "heatmap.png")

        rows["report: heat map + 2 PNG writes"] = timed(report_share, args.repeats)

    print(f"per {args.size}x{args.size} image pair, CPU, {torch.get_num_threads()} thread(s), fastest of "
          f"{args.repeats}:")
    width = max(map(len, rows))
    for name, seconds in rows.items():
        print(f"  {name:<{width}}  {seconds:7.3f} s  ({seconds / generation:6.1%} of the tiny generation)")
    print(f"  {'tiny FLUX generation, ' + str(args.steps) + ' steps':<{width}}  {generation:7.3f} s")
    goal = rows["PSNR + SSIM + embeddings"]
    print(f"goal PSNR + SSIM + embeddings < 0.5 s a pair: {'met' if goal < 0.5 else 'NOT met'} ({goal:.3f} s)")


if __name__ == "__main__":
    main()
