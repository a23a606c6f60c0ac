"""Which scaled-dot-product attention kernels the trainer's forward and backward passes may use.

PyTorch's cuDNN attention backend fails in the backward pass of FLUX's transformer on Hopper GPUs (H100, H200) with
`Expected mha_graph.execute(handle, variant_pack, workspace_ptr.get()).is_good() to be true`. The default, `auto`,
leaves it out: flash, memory-efficient and math attention remain, and PyTorch picks the fastest that fits each call.
The kernels of a backward pass are those its forward pass chose, so the trainer enters this context around forwards.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# `attention_backend` setting -> the kernels allowed; `None` leaves PyTorch's own choice (cuDNN included).
ATTENTION_KERNELS: dict[str, tuple[SDPBackend, ...] | None] = {
    "auto": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "flash": (SDPBackend.FLASH_ATTENTION,),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION,),
    "math": (SDPBackend.MATH,),
    "cudnn": (SDPBackend.CUDNN_ATTENTION,),
    "default": None,
}

_NAMES = {
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "efficient",
    SDPBackend.MATH: "math",
    SDPBackend.CUDNN_ATTENTION: "cudnn",
}


def attention_kernels(backend: str) -> contextlib.AbstractContextManager:
    """A context in which `torch.nn.functional.scaled_dot_product_attention` uses only the kernels `backend` allows.

    Args:
        backend: An `attention_backend` setting (a key of `ATTENTION_KERNELS`).
    """
    kernels = _kernels(backend)
    return contextlib.nullcontext() if kernels is None else sdpa_kernel(list(kernels))


def describe_attention(backend: str) -> str:
    """The kernels `backend` allows, as recorded in the metrics: `"flash+efficient+math"`, or `"default"`."""
    kernels = _kernels(backend)
    return "default" if kernels is None else "+".join(_NAMES[kernel] for kernel in kernels)


def enabled_kernels() -> dict[str, bool]:
    """The kernels PyTorch may pick right now (the global flags that `sdpa_kernel` sets, on every device type)."""
    flags = torch.backends.cuda
    return {
        "flash": flags.flash_sdp_enabled(),
        "efficient": flags.mem_efficient_sdp_enabled(),
        "math": flags.math_sdp_enabled(),
        "cudnn": flags.cudnn_sdp_enabled(),
    }


def _kernels(backend: str) -> tuple[SDPBackend, ...] | None:
    try:
        return ATTENTION_KERNELS[backend]
    except KeyError:
        raise ValueError(
            f"attention_backend={backend!r} is not one of {', '.join(ATTENTION_KERNELS)}."
        ) from None
