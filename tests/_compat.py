"""Shared pieces of the compatibility tests: test images and a probe on the student's calls."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIZE = 32


def sample_image(seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sample_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    return Image.fromarray(mask)


class CallRecorder:
    """Records the output shape of every forward call of a module (here: the student inside a pipeline), and whether
    an attention mask was passed."""

    def __init__(self, module: torch.nn.Module):
        self.shapes: list[tuple] = []
        self.masks: list[bool] = []
        self._handle = module.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        self.shapes.append(tuple(output[0].shape))
        self.masks.append(kwargs.get("attention_mask") is not None)

    def close(self):
        self._handle.remove()
