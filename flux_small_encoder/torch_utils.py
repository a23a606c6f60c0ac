"""torch defaults used across the package: which device to run on, which dtype a precision setting means, and the
default dtype of modules being built."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# `mixed_precision` setting (the trainer's config, `cache-teacher`) -> dtype of the frozen models. fp16 is absent on
# purpose: T5 overflows in it.
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16}


def default_device() -> str:
    """`"cuda"` where a CUDA device is available, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in `dtype` inside the block (`torch.set_default_dtype`), and put the previous default back."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def as_dtype(dtype: torch.dtype | str | None, argument: str = "dtype") -> torch.dtype | None:
    """`dtype` as a torch dtype: a `torch.dtype` as it is, or its name (`"bfloat16"`, `"torch.bfloat16"`); `None` stays
    `None`.

    Args:
        dtype: The dtype, or its name.
        argument: The argument's name, for the message.

    Raises:
        TypeError / ValueError: `dtype` is neither a floating-point torch dtype nor the name of one.
    """
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    found = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else None
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return found
    message = (
        f"{argument}={dtype!r} is not a floating-point torch dtype: pass one such as torch.bfloat16, or its name "
        "('bfloat16', 'float16', 'float32')."
    )
    raise ValueError(message) if isinstance(dtype, (str, torch.dtype)) else TypeError(message)


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen models under a `mixed_precision` setting (`"no"`: float32, `"bf16"`: bfloat16)."""
    try:
        return PRECISION_DTYPES[mixed_precision]
    except KeyError:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} is not one of {', '.join(PRECISION_DTYPES)} (fp16 overflows in T5's "
            "feed-forward; use bf16)."
        ) from None
