"""The candidates of a comparison: checked against the pipeline before any image is made, then loaded one at a time.

A candidate is what `patch_encoder` accepts (a registry name, a folder, a Hub repo id, a `DistilledT5EncoderModel`),
`teacher` (the pipeline's own encoder) or `teacher@METHOD` (the teacher quantized, `quantize.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

TEACHER = "teacher"


@dataclass
class Candidate:
    """An encoder to compare: `kind` is `teacher`, `quantized` (`teacher@METHOD`) or `distilled`."""

    name: str
    encoder: nn.Module
    kind: str


@dataclass
class Skipped:
    """A candidate that cannot run here, and why."""

    name: str
    reason: str


def check_candidates(
    pipe, encoders: Mapping[str, str | os.PathLike | nn.Module], *, token: str | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Refuse, before any image is made, a candidate that cannot serve this pipeline, or a comparison none of whose
    candidates can run here.

    Names are resolved; `teacher@METHOD` must name a method; a distilled encoder's config (from its folder, checked
    against its safetensors headers, or its Hub repo's `config.json`: never its weights) must give the width the
    transformer reads and cover the pipeline's tokenizer (`check_compatible`). A quantization method whose library or
    hardware is missing is skipped later with its reason, but when every candidate is such a method there is nothing to
    compare.

    Raises:
        ValueError: an unknown name or method, an encoder that does not fit the pipeline, or no candidate that can run.
        OSError: an encoder's config cannot be read (offline with nothing cached, a private repo without a token).
    """
    from ..modeling import DistilledT5EncoderModel
    from ..patching import check_compatible
    from ..registry import resolve_encoder
    from .quantize import QuantizationUnavailable, check_method

    unavailable = []
    for name, encoder in encoders.items():
        if isinstance(encoder, nn.Module):
            student = encoder if isinstance(encoder, DistilledT5EncoderModel) else None
        elif os.fspath(encoder) == TEACHER:
            continue
        elif os.fspath(encoder).startswith(f"{TEACHER}@"):
            try:
                check_method(os.fspath(encoder).partition("@")[2], device)
            except QuantizationUnavailable as reason:
                unavailable.append(f"{name} ({reason})")
            continue
        else:
            with torch.device("meta"):  # the config's model, without weights: what `check_compatible` reads
                student = DistilledT5EncoderModel(_encoder_config(resolve_encoder(encoder), token))
        if student is not None:
            try:
                check_compatible(pipe, student)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
    if unavailable and len(unavailable) == len(encoders):
        raise ValueError(f"no candidate can run here: {'; '.join(unavailable)}. Install what is named, or add a "
                         "candidate that runs (teacher, a distilled encoder).")


def _encoder_config(resolved, token: str | None):
    """A distilled encoder's config, read without its weights."""
    from huggingface_hub import hf_hub_download

    from ..checkpoint import read_checkpoint, resolve_config
    from ..configuration import DistilledT5Config

    if os.path.isdir(resolved.path):
        return resolve_config(read_checkpoint(resolved.path, load_tensors=False))[0]
    try:
        path = hf_hub_download(resolved.path, "config.json", revision=resolved.revision, token=token)
    except OSError as error:
        raise OSError(f"Cannot read the config of the encoder {resolved.path!r} to check it before comparing: "
                      f"{first_line(error)}") from error
    return DistilledT5Config.from_json_file(path)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def named_candidates(encoders) -> dict[str, str | os.PathLike | nn.Module]:
    """Candidates by the names the report gives them: as given, or a model's `name_or_path`."""
    if isinstance(encoders, Mapping):
        return dict(encoders)
    named = {}
    for number, encoder in enumerate(encoders):
        if not isinstance(encoder, (str, os.PathLike, nn.Module)):
            raise TypeError(
                f"a candidate is a name (teacher, teacher@METHOD, a registry name, a folder, a Hub repo id) or an "
                f"encoder module, not {type(encoder).__name__}."
            )
        if isinstance(encoder, nn.Module):
            named[getattr(encoder, "name_or_path", "") or f"encoder-{number}"] = encoder
        else:
            named[os.fspath(encoder)] = encoder
    return named


def load_candidate(pipe, name: str, encoder: str | os.PathLike | nn.Module, device, *,
                   token: str | None = None) -> Candidate | Skipped:
    """The candidate `encoder`, named `name`, ready to encode on `device` (or why it cannot run here)."""
    from ..patching import check_compatible
    from ..registry import load_encoder
    from .quantize import QuantizationUnavailable, quantized_teacher

    if isinstance(encoder, nn.Module):
        return Candidate(name, encoder.eval(), "distilled")
    spec = os.fspath(encoder)
    if spec == TEACHER:
        return Candidate(name, pipe.text_encoder_2, "teacher")
    if spec.startswith(f"{TEACHER}@"):
        try:
            quantized = quantized_teacher(pipe.text_encoder_2, spec.partition("@")[2], device=device)
        except QuantizationUnavailable as error:
            return Skipped(name, str(error))
        return Candidate(name, quantized, "quantized")
    student = load_encoder(spec, dtype=pipe.transformer.dtype, **({"token": token} if token else {}))
    check_compatible(pipe, student)
    return Candidate(name, student.eval().to(device), "distilled")
