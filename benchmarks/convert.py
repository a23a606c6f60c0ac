"""Time `describe` and `convert` on a checkpoint of the T5-Base student's real shape (random weights, float32).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/convert.py [WORKDIR] [--repeat N]

Writes about 2 GB under WORKDIR (a temporary folder by default) and removes it afterwards. Each step runs `--repeat`
times; the fastest run is printed, with the slowest beside it (disk caches make the first run of a step slower).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from flux_small_encoder import DistilledT5Config, DistilledT5EncoderModel
from flux_small_encoder.convert import convert
from flux_small_encoder.info import describe

# The public T5-Base student's shape, as its config.json on the Hub (`LifuWang/DistillT5`) gives it: flan-t5-base's
# 12 layers, d_model 768, d_ff 2048, gated-gelu, 12 heads x 64, vocabulary 32128, and a projector to 4096.
T5_BASE_STUDENT = dict(
    vocab_size=32128, d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, feed_forward_proj="gated-gelu",
    project_out_dim=4096,
)


def timed(label: str, fn, repeat: int):
    """Run `fn` `repeat` times; print the fastest and slowest wall time; return the last result."""
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    print(f"{label}: {min(seconds):.2f} s (slowest {max(seconds):.2f} s, {repeat} runs)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", nargs="?", help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per step (default: 3)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="convert-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    )
    try:
        torch.manual_seed(0)
        model = DistilledT5EncoderModel(DistilledT5Config(**T5_BASE_STUDENT))
        model.save_pretrained(root / "ours")
        torch.save(model.state_dict(), root / "experiment.pth")  # the reference trainer's format
        del model

        print(timed("info (describe a folder, headers only)", lambda: describe(root / "ours"), args.repeat).summary())
        steps = {
            "convert .pth -> folder (config inferred)": (root / "experiment.pth", root / "a"),
            "convert folder -> ComfyUI file": (root / "ours", root / "comfy.safetensors"),
            "convert ComfyUI file -> folder": (root / "comfy.safetensors", root / "b"),
        }
        for label, (src, dst) in steps.items():
            timed(label, lambda src=src, dst=dst: convert(src, dst, overwrite=True), args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
