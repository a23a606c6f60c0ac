"""What a checkpoint is, from its headers: T5 shape, projector widths, parameters, dtypes, size, and the pipelines it
fits. `flux-small-encoder info` prints it; `hub.push_to_hub` and the model card use it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass

from .checkpoint import read_checkpoint, resolve_config
from .configuration import DistilledT5Config
from .messages import human_size
from .patching import PIPELINE_FAMILIES

# Width of T5-XXL's embeddings, the encoder every family in `PIPELINE_FAMILIES` ships with.
T5_XXL_WIDTH = 4096


@dataclass(frozen=True)
class CheckpointInfo:
    """What `describe` finds out about a checkpoint, and `flux-small-encoder info` prints."""

    source: str
    layout: str
    config: DistilledT5Config
    config_origin: str
    encoder_parameters: int
    projector_parameters: int
    dtypes: dict[str, int]
    file_size: int

    @property
    def parameters(self) -> int:
        return self.encoder_parameters + self.projector_parameters

    @property
    def fits(self) -> list[str]:
        return fitting_families(self.config.project_out_dim)

    def summary(self) -> str:
        """A few readable lines."""
        c = self.config
        gated = "gated" if c.is_gated_act else "not gated"
        fits = (
            f"{', '.join(self.fits)}: the T5-XXL they ship with is {T5_XXL_WIDTH} wide too"
            if self.fits
            else f"no stock pipeline: they take {T5_XXL_WIDTH}-wide embeddings; this fits a transformer whose "
            f"embedding width (FLUX: joint_attention_dim) is {c.project_out_dim}"
        )
        rows = {
            "layout": f"{self.layout} (config {self.config_origin})",
            "T5 encoder": f"{c.num_layers} layers, d_model {c.d_model}, d_ff {c.d_ff} ({c.feed_forward_proj}, "
            f"{gated}), {c.num_heads} heads x d_kv {c.d_kv}, vocab {c.vocab_size}",
            "projector": f"{c.project_in_dim} -> {c.project_out_dim} -> {c.project_out_dim}",
            "parameters": f"{self.parameters:,} (encoder {self.encoder_parameters:,}, projector "
            f"{self.projector_parameters:,})",
            "dtype": ", ".join(f"{name} ({count} tensors)" for name, count in self.dtypes.items()),
            "file size": human_size(self.file_size),
            "fits": fits,
        }
        return "\n".join([self.source, *(f"  {label + ':':<11} {value}" for label, value in rows.items())])


def describe(path: str | os.PathLike) -> CheckpointInfo:
    """Shape, size and dtype of a local checkpoint in any layout, reading only the safetensors headers where it can.

    Args:
        path: A folder, a `.safetensors` file or a `.pth` file (`hub.download` turns a registry name or a Hub repo
            id into a folder).

    Raises:
        ValueError: what `read_checkpoint` and `resolve_config` refuse.
        FileNotFoundError: nothing is at `path`.
    """
    checkpoint = read_checkpoint(path, load_tensors=False)
    config, origin = resolve_config(checkpoint)
    counts = {key: math.prod(shape) for key, shape in checkpoint.shapes.items()}
    projector = sum(count for key, count in counts.items() if key.startswith("final_projection."))
    return CheckpointInfo(
        source=checkpoint.source,
        layout=checkpoint.layout,
        config=config,
        config_origin=origin,
        encoder_parameters=sum(counts.values()) - projector,
        projector_parameters=projector,
        dtypes=dict(Counter(checkpoint.dtypes.values())),
        file_size=sum(file.stat().st_size for file in checkpoint.files),
    )


def fitting_families(width: int) -> list[str]:
    """The pipeline families (`patching.PIPELINE_FAMILIES`) whose stock T5 slot takes `width`-wide embeddings."""
    if width != T5_XXL_WIDTH:
        return []
    return [f"{prefix} ({slot.encoder})" for prefix, slot in PIPELINE_FAMILIES.items()]
