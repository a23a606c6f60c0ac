"""What one optimizer step of the trainer costs, against a loop shaped like the reference and against the floor.

    python benchmarks/train_step.py                 # CPU, small random models, about a minute
    python benchmarks/train_step.py --size flux --dtype bfloat16 --resolution 512 --tokens 512 --batch-size 1
        # on a GPU: FLUX.1's transformer, T5-XXL and a T5-Base student at their real sizes, random weights

Three loops over the same models, the same trajectory and the same timestep, timed in one run, interleaved:

- trainer:   `DistillationTrainer.training_step` (student forward, teacher prediction without grad, student
             prediction, backward, clip, AdamW), teacher embeddings from the cache (computed once per batch).
- reference: the same step plus a teacher-encoder forward at every timestep, as the reference code does.
- floor:     two transformer forwards (one without grad) and one backward into the embeddings: what any
             vision-based distillation step must pay, with no student, no optimizer and no teacher.

The teacher encoder here is sized so that re-running it shows: about a quarter of a step. At FLUX.1's sizes the
proportion is smaller (T5-XXL's forward on 512 tokens is ~4.9 TFLOP against ~37 TFLOP for one transformer forward at
512 px, so ~3% of a step); there the cache's main gain is not holding 9.5 GB of T5-XXL on every GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch


def build(args):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from flux_small_encoder.modeling import DistilledT5EncoderModel
    from flux_small_encoder.tiny import tiny_t5_config
    from flux_small_encoder.torch_utils import default_device, default_dtype
    from flux_small_encoder.training import DistillationTrainer, load_config, model_source

    dtype = getattr(torch, args.dtype)
    config = load_config("tiny", [
        f"output_dir={tempfile.mkdtemp()}", "report_to=none", "num_eval_prompts=0", "learning_rate=1e-5",
        f"num_inference_steps={args.steps}", f"train_batch_size={args.batch_size}", "lr_scheduler=constant",
        f"max_sequence_length={args.tokens}", f"resolution={args.resolution}",
        f"mixed_precision={'bf16' if dtype == torch.bfloat16 else 'no'}",
    ])
    device = default_device()  # the device the trainer's Accelerator picks
    torch.manual_seed(0)
    # Frozen models are built directly on the device in their dtype (FLUX.1's 12B transformer would take minutes
    # to initialise on a CPU and does not fit in float32 beside T5-XXL).
    with torch.device(device), default_dtype(dtype):
        if args.size == "flux":  # FLUX.1's transformer and T5-XXL's encoder, random weights
            transformer = FluxTransformer2DModel(guidance_embeds=True, pooled_projection_dim=32)
            teacher = T5EncoderModel(tiny_t5_config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24))
        else:
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=32,
                num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12],
                guidance_embeds=True,
            )
            teacher = T5EncoderModel(tiny_t5_config(d_model=256, d_ff=1024, d_kv=32, num_heads=8, num_layers=12))
    with torch.device(device):  # the student trains in float32 (autocast under bf16)
        if args.size == "flux":  # T5-Base, as the public student
            student_t5 = T5EncoderModel(tiny_t5_config(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12))
        else:
            student_t5 = T5EncoderModel(tiny_t5_config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2))
    width = transformer.config.joint_attention_dim
    student = DistilledT5EncoderModel.from_t5_encoder(student_t5, width, projector_dropout=0.0)

    # The benchmark's models go through the trainer's seam, so the step timed is the trainer's own `training_step`;
    # the tiny source gives the scheduler, CLIP and the tokenizers.
    tiny = model_source("tiny").frozen_parts(config, dtype)
    vae_scale_factor = 8 if args.size == "flux" else tiny.vae_scale_factor
    frozen = dataclasses.replace(tiny, transformer=transformer, vae_scale_factor=vae_scale_factor)
    trainer = DistillationTrainer(config, frozen=frozen, teacher=teacher, student=student)
    trainer.setup()
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["small", "flux"], default="small")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="T5 tokens a prompt")
    parser.add_argument("--resolution", type=int, default=32,
                        help="image side in pixels (small: the tiny VAE does not downsample; flux: 8x, as FLUX.1)")
    parser.add_argument("--steps", type=int, default=20, help="timesteps a trajectory")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each loop")
    args = parser.parse_args()

    trainer = build(args)
    trajectory = trainer.make_trajectory(0, 0)
    objective, teacher = trainer.objective, trainer.teacher
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def trainer_step():
        trainer.training_step([trajectory], 1)

    def reference_step():
        with torch.no_grad():  # the reference re-encodes the prompts with the teacher at every timestep
            trajectory.teacher_embeds = teacher(trajectory.input_ids, output_hidden_states=False)[0]
        trainer.training_step([trajectory], 1)

    def floor_step():
        embeds = trajectory.teacher_embeds.detach().clone().requires_grad_()
        with trainer.forward_context():  # the trainer's precision and attention kernels (not cuDNN's on Hopper)
            with torch.no_grad():
                teacher_pred = objective.predict(trajectory, trajectory.teacher_embeds, 1)
            student_pred = objective.predict(trajectory, embeds, 1)
            torch.nn.functional.mse_loss(student_pred.float(), teacher_pred.float()).backward()

    loops = {"trainer (cached teacher)": trainer_step, "reference-shaped": reference_step, "floor": floor_step}
    times = {name: [] for name in loops}
    latents = trajectory.latents.clone()
    for round_ in range(args.repeats + 2):
        for name, step in loops.items():
            trajectory.latents = latents.clone()  # every loop times the same timestep on the same latents
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            if round_ >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)

    # The fastest repeat: the machine's other work only ever adds time.
    best = {name: min(values) for name, values in times.items()}
    with torch.no_grad():
        synchronize()
        start = time.perf_counter()
        teacher(trajectory.input_ids, output_hidden_states=False)
        synchronize()
        teacher_s = time.perf_counter() - start
    live = best["trainer (cached teacher)"] + teacher_s / args.steps
    print(f"device: {trainer.accelerator.device}, dtype {args.dtype}, batch {args.batch_size}, {args.tokens} tokens, "
          f"{trajectory.latents.shape[1]} image tokens, {args.steps} timesteps a batch, threads "
          f"{torch.get_num_threads()}")
    params = {name: sum(p.numel() for p in module.parameters()) / 1e6 for name, module in
              [("transformer", trainer.frozen.transformer), ("teacher", teacher),
               ("student", trainer.accelerator.unwrap_model(trainer.student))]}
    print("parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in params.items()))
    print(f"{'loop':32s} {'s/step':>9s} {'x floor':>8s}")
    for name, seconds in [*best.items(), ("trainer (live teacher, 1/N)", live)]:
        print(f"{name:32s} {seconds:9.4f} {seconds / best['floor']:8.2f}")
    print(f"reference-shaped / trainer: {best['reference-shaped'] / best['trainer (cached teacher)']:.2f}x")


if __name__ == "__main__":
    main()
