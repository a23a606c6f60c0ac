"""`teacher@METHOD`: the pipeline's own T5 encoder, loaded again through a quantization library's transformers config.

Each method is an optional extra: `pip install flux-small-encoder[quanto]` (runs on a CPU), `[torchao]`, `[bnb]`
(bitsandbytes: CUDA only). A method whose library or hardware is missing is skipped with its reason, never silently.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class QuantizationMethod:
    """One way of quantizing the teacher.

    Args:
        module: The library's import name.
        extra: The `flux-small-encoder` extra that installs it.
        needs_cuda: Whether it runs only on CUDA devices.
        config: Makes the transformers quantization config.
    """

    module: str
    extra: str
    needs_cuda: bool
    config: Callable[[], object]


def _bnb_nf4():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _bnb_int8():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())  # torchao 0.18 refuses the old string names


def _quanto_int8():
    from transformers import QuantoConfig

    return QuantoConfig(weights="int8")


# `teacher@NAME` -> its method.
QUANTIZATION_METHODS = {
    "bnb-nf4": QuantizationMethod("bitsandbytes", "bnb", True, _bnb_nf4),
    "bnb-int8": QuantizationMethod("bitsandbytes", "bnb", True, _bnb_int8),
    "torchao-int8": QuantizationMethod("torchao", "torchao", False, _torchao_int8),
    "quanto-int8": QuantizationMethod("optimum.quanto", "quanto", False, _quanto_int8),
}


class QuantizationUnavailable(RuntimeError):
    """A quantization method cannot run here; the message says why and what would fix it."""


def check_method(name: str, device: torch.device | str) -> QuantizationMethod:
    """The method called `name`, if it can run on `device`.

    Raises:
        ValueError: no method has that name.
        QuantizationUnavailable: its library is not installed, or it needs CUDA and `device` is not a CUDA device.
    """
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"teacher@{name}: no such quantization method; use one of "
                         f"{', '.join('teacher@' + known for known in QUANTIZATION_METHODS)}.")
    method = QUANTIZATION_METHODS[name]
    if importlib.util.find_spec(method.module.split(".")[0]) is None or (
        "." in method.module and importlib.util.find_spec(method.module) is None
    ):
        raise QuantizationUnavailable(
            f"{method.module} is not installed (pip install 'flux-small-encoder[{method.extra}]')"
        )
    if method.needs_cuda and torch.device(device).type != "cuda":
        raise QuantizationUnavailable(f"{method.module} needs a CUDA device; this comparison runs on {device}")
    return method


def quantized_teacher(
    teacher: nn.Module,
    name: str,
    *,
    source: str | None = None,
    subfolder: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The teacher quantized by method `name`, loaded with transformers' `from_pretrained(quantization_config=...)`.

    Args:
        teacher: The pipeline's T5 encoder (its class loads the quantized copy; it is saved to a temporary folder
            first when `source` is not given).
        name: A key of `QUANTIZATION_METHODS`.
        source: The pipeline's Hub id or folder, to read the teacher's weights from instead of saving them.
        subfolder: The teacher's subfolder in `source` (`text_encoder_2`).
        dtype: The dtype of the layers left unquantized; default: the teacher's.
        device: Where the quantized encoder runs.

    Raises:
        QuantizationUnavailable: the method cannot run here (`check_method`).
    """
    method = check_method(name, device)
    kwargs = {"quantization_config": method.config(), "dtype": dtype or teacher.dtype, "device_map": {"": device}}
    if source is not None:
        return type(teacher).from_pretrained(source, subfolder=subfolder, **kwargs).eval()
    with tempfile.TemporaryDirectory(prefix="flux-small-encoder-teacher-") as folder:
        teacher.save_pretrained(folder)
        return type(teacher).from_pretrained(os.fspath(folder), **kwargs).eval()
