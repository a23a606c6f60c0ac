"""Two torch defaults used across the package: which device to run on, and which dtype a precision setting means."""

from __future__ import annotations

import torch

# `mixed_precision` setting (the trainer's config, `cache-teacher`) -> dtype of the frozen models. fp16 is absent on
# purpose: T5 overflows in it.
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16}


def default_device() -> str:
    """`"cuda"` where a CUDA device is available, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen models under a `mixed_precision` setting (`"no"`: float32, `"bf16"`: bfloat16)."""
    try:
        return PRECISION_DTYPES[mixed_precision]
    except KeyError:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} is not one of {', '.join(PRECISION_DTYPES)} (fp16 overflows in T5's "
            "feed-forward; use bf16)."
        ) from None
