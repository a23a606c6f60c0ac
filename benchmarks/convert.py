"""Time `describe` and `convert` on a checkpoint of the T5-Base student's real shape (random weights, float32).

    PYTHONPATH=. python benchmarks/convert.py [WORKDIR]

Writes about 2 GB under WORKDIR (a temporary folder by default) and removes it afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flux_small_encoder import DistilledT5Config, DistilledT5EncoderModel
from flux_small_encoder.convert import convert, describe

# The public T5-Base student's shape (REFERENCE.md): 12 layers, d_model 768, gated-gelu, projector to 4096.
T5_BASE_STUDENT = dict(
    vocab_size=32128, d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, feed_forward_proj="gated-gelu",
    project_out_dim=4096,
)


def timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"{label}: {time.perf_counter() - start:.2f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", nargs="?", help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="convert-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        torch.manual_seed(0)
        model = DistilledT5EncoderModel(DistilledT5Config(**T5_BASE_STUDENT))
        model.save_pretrained(root / "ours")
        torch.save(model.state_dict(), root / "experiment.pth")  # the reference trainer's format
        del model

        print(timed("info (describe a folder, headers only)", lambda: describe(root / "ours")).summary())
        timed("convert .pth -> folder (config inferred)", lambda: convert(root / "experiment.pth", root / "a"))
        timed("convert folder -> ComfyUI file", lambda: convert(root / "ours", root / "comfy.safetensors"))
        timed("convert ComfyUI file -> folder", lambda: convert(root / "comfy.safetensors", root / "b"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
