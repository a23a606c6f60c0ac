"""`teacher@METHOD`: the pipeline's own T5 encoder, quantized by a quantization library, from the module in memory.

The teacher in memory is what made the reference images, so it is what gets quantized: never files read again by
name, which may hold another teacher by now (a folder retrained in place, a Hub branch that moved, a pipeline whose
`text_encoder_2` was replaced after loading) and may need a revision, a token or a network. optimum-quanto and torchao
quantize a module in place: they get a copy of the teacher that shares its tensors (no second copy of T5-XXL's
9.5 GB; each library puts new tensors in place of the weights it quantizes, leaving the teacher's as they are), and
leave in float the modules transformers would (`left_in_float`), so the result is what loading the teacher with the
method's transformers config gives.
bitsandbytes quantizes only while loading: the teacher is saved to a temporary folder and loaded back through
transformers' `BitsAndBytesConfig`.

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
        quantize: `quantize(teacher, device)`: the quantized encoder on `device`, the teacher left as it was.
    """

    module: str
    extra: str
    needs_cuda: bool
    quantize: Callable[[nn.Module, torch.device], nn.Module]


def _quanto_int8(teacher: nn.Module, device: torch.device) -> nn.Module:
    from optimum.quanto import freeze, qint8, quantize

    encoder = sharing_copy(teacher)
    quantize(encoder, weights=qint8, exclude=sorted(left_in_float(encoder)))
    freeze(encoder)  # int8 weights in place of the float ones
    return encoder.to(device)


def _torchao_int8(teacher: nn.Module, device: torch.device) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    encoder = sharing_copy(teacher).to(device)  # torchao picks its kernels by the weights' device
    kept = left_in_float(encoder)
    quantize_(encoder, Int8WeightOnlyConfig(), filter_fn=lambda module, name: (
        isinstance(module, nn.Linear) and name not in kept))
    return encoder


def _bitsandbytes(**config) -> Callable[[nn.Module, torch.device], nn.Module]:
    def load_quantized(teacher: nn.Module, device: torch.device) -> nn.Module:
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory(prefix="flux-small-encoder-teacher-") as folder:
            teacher.save_pretrained(folder)
            return type(teacher).from_pretrained(
                os.fspath(folder), quantization_config=BitsAndBytesConfig(**config), dtype=teacher.dtype,
                device_map={"": device},
            )

    return load_quantized


# `teacher@NAME` -> its method.
QUANTIZATION_METHODS = {
    "bnb-nf4": QuantizationMethod("bitsandbytes", "bnb", True, _bitsandbytes(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)),
    "bnb-int8": QuantizationMethod("bitsandbytes", "bnb", True, _bitsandbytes(load_in_8bit=True)),
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
    teacher: nn.Module, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """The teacher in memory quantized by method `name`, in eval mode; the teacher itself is left as it was.

    Args:
        teacher: The pipeline's T5 encoder (a transformers model: its class and config make the copy).
        name: A key of `QUANTIZATION_METHODS`.
        dtype: The dtype of the layers left unquantized; default: the teacher's.
        device: Where the quantized encoder runs.

    Raises:
        QuantizationUnavailable: the method cannot run here (`check_method`).
    """
    method = check_method(name, device)
    if dtype is not None and dtype != teacher.dtype:
        teacher = sharing_copy(teacher).to(dtype)
    return method.quantize(teacher, torch.device(device)).eval().requires_grad_(False)


def left_in_float(model: nn.Module) -> set[str]:
    """The modules transformers leaves unquantized when it loads `model` with a quantization config (tied and output
    embeddings, the last layer, `_keep_in_fp32_modules` such as T5's `wo`), by name: the in-memory methods leave the
    same ones, so that `teacher@METHOD` is what loading the teacher with the method's transformers config gives."""
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skipped = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return {name for name, _ in model.named_modules() if name and not should_convert_module(name, skipped)}


def sharing_copy(model: nn.Module) -> nn.Module:
    """A new `type(model)` built from its config that holds `model`'s own tensors (no memory copied): a library may
    then swap its modules and weights without touching `model`, nor any offload hook attached to it.

    Raises:
        QuantizationUnavailable: some of `model`'s tensors are not in memory (offloaded to the meta device).
    """
    state = model.state_dict()
    if any(tensor.device.type == "meta" for tensor in state.values()):
        raise QuantizationUnavailable("the teacher's weights are offloaded (on the meta device), so there is nothing "
                                      "in memory to quantize; compare without sequential CPU offload")
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(state, assign=True)
    return copy.eval()
