"""Text rendering: read an image with an offline OCR engine and score it against the text the prompt quotes.

The engine is rapidocr-onnxruntime (`pip install flux-small-encoder[eval]`): its detection and recognition models ship
inside the wheel, so it runs offline on a CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def character_accuracy(expected: str, read: str) -> float:
    """`1 - CER`: one minus the character edit distance between `read` and `expected` over the length of `expected`,
    floored at 0. Case-insensitive, with runs of whitespace made one space (FLUX often draws a word in capitals).

    Example:
    ```py
    >>> character_accuracy("radar", "RADAR")
    1.0
    >>> character_accuracy("radar", "")
    0.0
    ```
    """
    from torchmetrics.functional.text import char_error_rate

    expected, read = (" ".join(text.lower().split()) for text in (expected, read))
    if not expected:
        raise ValueError("there is no expected text to score against.")
    return max(0.0, 1.0 - float(char_error_rate(read, expected)))


class TextReader:
    """Reads the text in images with RapidOCR (one engine per process, built on first use)."""

    def __init__(self):
        self.engine = _engine()

    def read(self, image: torch.Tensor | np.ndarray) -> str:
        """The text found in one image, lines joined by spaces in reading order ('' if none).

        Args:
            image: `(3, height, width)` in `[0, 1]`, or `(height, width, 3)` uint8.
        """
        if isinstance(image, torch.Tensor):
            image = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        boxes, _ = self.engine(np.ascontiguousarray(image))
        if not boxes:
            return ""
        # Each box is (corners, text, confidence); order them top to bottom, then left to right.
        boxes = sorted(boxes, key=lambda box: (round(box[0][0][1] / 8), box[0][0][0]))
        return " ".join(text for _, text, _ in boxes)

    def accuracy(self, image: torch.Tensor | np.ndarray, expected: str) -> float:
        """`character_accuracy` of the text read in `image` against `expected`."""
        return character_accuracy(expected, self.read(image))


INSTALL_HINT = "pip install 'flux-small-encoder[eval]'"


def ocr_unavailable() -> str | None:
    """Why text cannot be read here (rapidocr-onnxruntime missing or broken), or `None`: checked before any work."""
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError as error:
        if error.name == "rapidocr_onnxruntime":
            return f"rapidocr-onnxruntime is not installed ({INSTALL_HINT})"
        return f"rapidocr-onnxruntime cannot be imported: {error} ({INSTALL_HINT})"
    return None


@functools.cache
def _engine():
    reason = ocr_unavailable()
    if reason is not None:
        raise ImportError(f"OCR needs rapidocr-onnxruntime: {reason} (or ocr=False / --no-ocr).")
    from rapidocr_onnxruntime import RapidOCR

    # Detection scales the longer side down to 960 px at most, and never up: RapidOCR's default scales the shorter
    # side up to 736 px, which makes a 32 px test image 736 x 736 and a 72 px banner 3,000 px wide, for nothing.
    return RapidOCR(det_limit_type="max", det_limit_side_len=960)
