"""The distilled T5-Base student against a T5-XXL-shaped teacher: parameters, bf16 bytes, latency, ratios.

Both encoders have random weights (the shapes are what cost time and memory). Unless `--full` is given, the teacher is
timed with 1 and 3 layers and extrapolated to its 24 (the relative-attention bias is computed in the first layer only,
so layers 2-3 stand for layers 2-24); the output says so. Each timing is the fastest of `--repeats` calls after a
warm-up: on a shared machine the fastest call is the one least disturbed. Also measures the overhead of
`DistilledT5EncoderModel` over a bare `T5EncoderModel` followed by the same projector (goal: under 3%).

    python benchmarks/encoder.py                 # CPU, float32, about two minutes on 2 cores
    python benchmarks/encoder.py --device cuda --dtype bfloat16 --full
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import T5Config, T5EncoderModel

from flux_small_encoder import DistilledT5Config, DistilledT5EncoderModel

XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24)
BASE = dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12)
COMMON = dict(vocab_size=32128, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def timed(fn, repeats: int, device: str) -> float:
    """Fastest of `repeats` calls after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def xxl_seconds(ids, layers: int, args) -> float:
    """Forward seconds of a T5-XXL-shaped encoder with `layers` layers (built, timed, then freed)."""
    config = T5Config(**COMMON, **{**XXL, "num_layers": layers})
    model = T5EncoderModel(config).to(args.device, args.dtype).eval()
    return timed(lambda: model(ids), args.repeats, args.device)


def teacher_seconds(ids, args) -> tuple[float, str]:
    """Seconds for a 24-layer T5-XXL encoder forward, measured or extrapolated from 1 and 3 layers."""
    if args.full:
        return xxl_seconds(ids, XXL["num_layers"], args), "measured"
    one, three = xxl_seconds(ids, 1, args), xxl_seconds(ids, 3, args)
    per_layer = (three - one) / 2
    total = one + (XXL["num_layers"] - 1) * per_layer
    return total, f"extrapolated: 1 layer {one:.3f} s, +{per_layer:.3f} s/layer"


def overhead(student: DistilledT5EncoderModel, ids, args) -> tuple[float, float]:
    """Median seconds of the patched model and of a bare T5EncoderModel + projector, same weights, interleaved."""
    bare_t5, projector = student.encoder, student.final_projection
    patched, bare = [], []
    for _ in range(args.overhead_repeats):
        patched.append(timed(lambda: student(ids, output_hidden_states=False)[0], 1, args.device))
        bare.append(timed(lambda: projector(bare_t5(ids).last_hidden_state), 1, args.device))
    return statistics.median(patched), statistics.median(bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[77, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overhead-repeats", type=int, default=30)
    parser.add_argument("--full", action="store_true", help="time all 24 teacher layers instead of extrapolating")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    with torch.device("meta"):
        teacher_params = count(T5EncoderModel(T5Config(**COMMON, **XXL)))
    config = DistilledT5Config(**COMMON, **BASE, project_out_dim=XXL["d_model"])
    student = DistilledT5EncoderModel(config).to(args.device, args.dtype).eval()
    encoder_params, projector_params = count(student.encoder), count(student.final_projection)
    student_params = encoder_params + projector_params

    print(f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads, random weights, batch 1")
    print(
        f"teacher T5-XXL encoder: {teacher_params / 1e9:.3f} B parameters, {teacher_params * 2 / 1e9:.2f} GB in bf16"
    )
    print(
        f"student T5-Base + projector: {encoder_params / 1e9:.3f} B + {projector_params / 1e9:.3f} B = "
        f"{student_params / 1e9:.3f} B parameters, {student_params * 2 / 1e9:.2f} GB in bf16"
    )
    print(f"parameters ratio teacher/student: {teacher_params / student_params:.1f}x\n")
    print(f"{'tokens':>6} | {'teacher s':>9} | {'student s':>9} | {'speed-up':>8} | teacher timing")
    with torch.inference_mode():
        for length in args.lengths:
            ids = torch.randint(0, COMMON["vocab_size"], (1, length), device=args.device)
            teacher, how = teacher_seconds(ids, args)
            small = timed(lambda ids=ids: student(ids), args.repeats, args.device)
            print(f"{length:>6} | {teacher:>9.3f} | {small:>9.3f} | {teacher / small:>7.1f}x | {how}")

        ids = torch.randint(0, COMMON["vocab_size"], (1, 77), device=args.device)
        patched, bare = overhead(student, ids, args)
    print(
        f"\npatched-model overhead at 77 tokens: DistilledT5EncoderModel {patched * 1e3:.2f} ms vs bare "
        f"T5EncoderModel + projector {bare * 1e3:.2f} ms: {100 * (patched / bare - 1):+.1f}% (goal: under 3%)"
    )


if __name__ == "__main__":
    main()
