"""Shared pieces of the compatibility tests: test images, a 2-step generation, and a probe on the student's calls."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PROMPT = "a red cube on a blue sphere"
SIZE = 32


def sample_image(seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sample_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    return Image.fromarray(mask)


def generate(pipe, **kwargs) -> np.ndarray:
    """A 2-step 32x32 generation with a fixed seed; `prompt` goes by keyword (Kontext takes `image` first)."""
    kwargs = {
        "prompt": PROMPT, "height": SIZE, "width": SIZE, "num_inference_steps": 2, "max_sequence_length": 48,
        "output_type": "np", "generator": torch.Generator("cpu").manual_seed(0), **kwargs,
    }
    return pipe(**kwargs).images


class CallRecorder:
    """Records the output shape of every forward call of a module (here: the student inside a pipeline)."""

    def __init__(self, module: torch.nn.Module):
        self.shapes: list[tuple] = []
        self.masks: list[bool] = []
        self._handle = module.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        self.shapes.append(tuple(output[0].shape))
        self.masks.append(kwargs.get("attention_mask") is not None)

    def close(self):
        self._handle.remove()
