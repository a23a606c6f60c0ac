"""Read a distilled T5 encoder checkpoint in any layout, find the config that describes it, and describe it.

Two key layouts exist, whatever the file format:

- `"distill-t5"` (ours): the public `LifuWang/DistillT5` checkpoint, the reference trainer's `.pth` state dicts and
  every folder `save_pretrained` writes. The T5 encoder sits under the wrapper's `encoder.` prefix
  (`encoder.shared.weight`, `encoder.encoder.block.{i}...`), the projector under `final_projection.`.
- `"comfyui"`: the T5 stack one level up (`encoder.encoder.` stripped to `encoder.`), as ComfyUI's DistillT5 loader
  holds it, and as the single-file `DistillT5-F32.safetensors` stores it with the wrapper prefix removed
  (`shared.weight`, `encoder.block.{i}...`, `final_projection.*`).

Safetensors are read from a folder (sharded or not) or a file, `.pth` with `torch.load(weights_only=True)`: a pickle
that would run code is refused before any of it runs. Local paths only (`hub.download` fetches a registry name or a
Hub repo id); writing is `convert`'s job.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .configuration import DistilledT5Config
from .modeling import DistilledT5EncoderModel
from .patching import PIPELINE_FAMILIES

OURS = "distill-t5"
COMFYUI = "comfyui"
# Width of T5-XXL's embeddings, the encoder every family in `PIPELINE_FAMILIES` ships with.
T5_XXL_WIDTH = 4096
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# A ComfyUI file carries no config.json; `convert` stores ours in the safetensors header so a round trip loses nothing.
CONFIG_METADATA_KEY = "distilled_t5_config"

SHARED_KEY = "encoder.shared.weight"
EMBED_TOKENS_KEY = "encoder.encoder.embed_tokens.weight"  # tied to SHARED_KEY; transformers stores only that one
_BLOCK_KEY = re.compile(r"^encoder\.encoder\.block\.(\d+)\.")
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64",
}


@dataclass
class Checkpoint:
    """A checkpoint read into our key layout.

    Args:
        source: Where it was read from.
        layout: The layout it was stored in (`"distill-t5"` or `"comfyui"`).
        shapes: Tensor name (our layout) -> shape.
        dtypes: Tensor name (our layout) -> dtype name.
        files: The weight files read, for their size.
        config: The config stored with it (`config.json` or the safetensors header), `None` if it has none.
        tensors: The tensors in our layout; `None` when only the headers were read.
    """

    source: str
    layout: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    files: list[Path] = field(default_factory=list)
    config: DistilledT5Config | None = None
    tensors: dict[str, torch.Tensor] | None = None


def read_checkpoint(path: str | os.PathLike, *, load_tensors: bool = True) -> Checkpoint:
    """Read a folder written by `save_pretrained` (or the public checkpoint), a `.safetensors` file or a `.pth` file.

    Args:
        path: The checkpoint, a local folder or file. Keys may be in either layout; they come back in ours.
        load_tensors: Read the tensors, not only their shapes (`.pth` files are always read whole).

    Raises:
        ValueError: the file is not a state dict of a distilled T5 encoder, or is a pickle that would run code.
        FileNotFoundError: nothing is at `path`.
    """
    path = Path(path)
    if path.is_dir():
        files, config = _folder_weight_files(path), DistilledT5Config.from_pretrained(path)
    elif path.is_file():
        files, config = [path], None
    else:
        raise FileNotFoundError(
            f"No checkpoint at {str(path)!r}: it is neither a folder nor a file. For a registry name or a Hub repo "
            "id, fetch it first (`hub.download`)."
        )

    metadata = {}
    if path.suffix in PICKLE_SUFFIXES:
        tensors = _load_pickled_state_dict(path)
        shapes = {key: tuple(value.shape) for key, value in tensors.items()}
        dtypes = {key: str(value.dtype).removeprefix("torch.") for key, value in tensors.items()}
    elif files[0].suffix == ".safetensors":
        shapes, dtypes, tensors, metadata = _read_safetensors(files, load_tensors)
    else:
        raise ValueError(
            f"Cannot read {str(path)!r}: expected a folder, a .safetensors file or a {'/'.join(PICKLE_SUFFIXES)} file."
        )
    if config is None and CONFIG_METADATA_KEY in metadata:
        config = DistilledT5Config.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))

    layout, renames = _to_our_keys(list(shapes), str(path))
    if tensors is not None:
        _check_tied_copies(tensors, renames, str(path))
        tensors = _renamed(tensors, renames)
    return Checkpoint(str(path), layout, _renamed(shapes, renames), _renamed(dtypes, renames), files, config, tensors)


def infer_config(shapes: Mapping[str, tuple[int, ...]], **overrides) -> DistilledT5Config:
    """A config whose dimensions are read off the tensor shapes of a checkpoint in our layout.

    What shapes cannot tell takes T5's defaults: a gated feed-forward is taken as `gated-gelu` (T5 v1.1, the FLUX
    teacher's family) and a plain one as `relu` (the original T5); `relative_attention_max_distance` is 128. Pass a
    config (`convert(..., config=...)`) where a checkpoint differs.

    Args:
        shapes: Tensor name (our layout) -> shape.
        overrides: Config fields to set instead of the inferred ones.
    """
    attention = "encoder.encoder.block.0.layer.0.SelfAttention."
    feed_forward = "encoder.encoder.block.0.layer.1.DenseReluDense."
    bias, query, wo = attention + "relative_attention_bias.weight", attention + "q.weight", feed_forward + "wo.weight"
    _require(shapes, (SHARED_KEY, "final_projection.0.weight", "final_projection.3.weight", bias, query, wo))
    layers = sorted({int(match.group(1)) for key in shapes if (match := _BLOCK_KEY.match(key))})
    if layers != list(range(len(layers))):
        raise ValueError(f"The checkpoint's T5 blocks are not numbered 0..n-1 (found {layers}): it is incomplete.")
    vocab_size, d_model = shapes[SHARED_KEY]
    num_buckets, num_heads = shapes[bias]
    inner_dim = shapes[query][0]
    if inner_dim % num_heads:
        raise ValueError(f"The attention width {inner_dim} is not a multiple of the {num_heads} heads.")
    gated = feed_forward + "wi_0.weight" in shapes
    d_ff = shapes[feed_forward + ("wi_0.weight" if gated else "wi.weight")][0]
    project_out_dim, project_in_dim = shapes["final_projection.0.weight"]
    fields = dict(
        vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, d_kv=inner_dim // num_heads, num_heads=num_heads,
        num_layers=len(layers),
        relative_attention_num_buckets=num_buckets, feed_forward_proj="gated-gelu" if gated else "relu",
        project_in_dim=project_in_dim, project_out_dim=project_out_dim, architectures=["DistilledT5EncoderModel"],
    )
    return DistilledT5Config(**{**fields, **overrides})


def check_config(config: DistilledT5Config, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise a `ValueError` naming the tensors that `config` does not describe (missing, unexpected, other shape)."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in DistilledT5EncoderModel(config).state_dict().items()}
    expected.pop(EMBED_TOKENS_KEY, None)
    problems = []
    if missing := sorted(expected.keys() - shapes.keys()):
        problems.append(f"missing {_few(missing)}")
    if unexpected := sorted(shapes.keys() - expected.keys()):
        problems.append(f"unexpected {_few(unexpected)}")
    mismatched = [
        f"{key} {list(shapes[key])} (config says {list(expected[key])})"
        for key in sorted(shapes.keys() & expected.keys())
        if shapes[key] != expected[key]
    ]
    if mismatched:
        problems.append(f"other shapes: {_few(mismatched)}")
    if problems:
        raise ValueError(
            f"The config does not describe the weights of {source!r}: {'; '.join(problems)}. Pass the config the "
            "checkpoint was trained with, or none to infer the dimensions from the tensor shapes."
        )


def resolve_config(
    checkpoint: Checkpoint, config: str | os.PathLike | DistilledT5Config | None = None
) -> tuple[DistilledT5Config, str]:
    """The config of `checkpoint`, checked against every tensor, and where it came from.

    Args:
        checkpoint: What `read_checkpoint` returned.
        config: A config, or a `config.json` path (ours, or a plain T5 one: the projector's width then comes from the
            weights). Without it, the config stored with the checkpoint, else one inferred from the tensor shapes.

    Returns:
        The config, and `"given"`, `"stored with it"` or `"inferred from the tensor shapes"`.

    Raises:
        ValueError: the config does not describe the checkpoint's tensors.
    """
    if isinstance(config, DistilledT5Config):
        resolved, origin = config, "given"
    elif config is not None:
        resolved, origin = _config_from_json(Path(config), checkpoint), "given"
    elif checkpoint.config is not None:
        resolved, origin = checkpoint.config, "stored with it"
    else:
        resolved, origin = infer_config(checkpoint.shapes), "inferred from the tensor shapes"
    check_config(resolved, checkpoint.shapes, checkpoint.source)
    return resolved, origin


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
            "file size": _human_size(self.file_size),
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


# --- reading -------------------------------------------------------------------------------------------------------


def _folder_weight_files(folder: Path) -> list[Path]:
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"The folder {str(folder)!r} holds no config.json: point to a folder written by `save_pretrained`, or to "
            "the weight file itself."
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ValueError(
        f"The folder {str(folder)!r} holds no model.safetensors. Pickled weights are not read from folders: convert "
        "the .pth file itself (`flux-small-encoder convert FILE.pth OUT/`)."
    )


def _read_safetensors(files: list[Path], load_tensors: bool):
    shapes, dtypes, tensors, metadata = {}, {}, {} if load_tensors else None, {}
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except (SafetensorError, FileNotFoundError) as error:
            raise ValueError(f"Cannot read {str(file)!r} as safetensors ({error}): is the file complete?") from None
        with handle:
            metadata.update(handle.metadata() or {})
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                shapes[key] = tuple(tensor_slice.get_shape())
                dtypes[key] = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), tensor_slice.get_dtype())
                if load_tensors:
                    tensors[key] = handle.get_tensor(key)
    return shapes, dtypes, tensors, metadata


def _load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch says what it refused after "WeightsUnpickler error:", e.g. "Unsupported global: GLOBAL io.open ...".
        reason = str(error).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0].split(". ")[0]
        raise ValueError(
            f"Refusing to load {str(path)!r}: `torch.load(weights_only=True)` accepts tensors and plain containers "
            f"only, and this file holds something else ({reason}). Nothing in it was run: unpickling other "
            "objects can execute arbitrary code. If you trust its author, load it yourself with "
            "`torch.load(path, weights_only=False)`, save the state dict with `safetensors.torch.save_file`, and "
            "convert that file."
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"Cannot read {str(path)!r} as a PyTorch file ({error}): is the file complete?") from None
    if isinstance(state, Mapping) and not _all_tensors(state):
        nested = [key for key in ("state_dict", "model") if isinstance(state.get(key), Mapping)]
        if len(nested) == 1 and _all_tensors(state[nested[0]]):
            state = state[nested[0]]
    if not isinstance(state, Mapping) or not _all_tensors(state):
        kind = type(state).__name__ if not isinstance(state, Mapping) else f"a dict with keys {_few(list(state))}"
        raise ValueError(f"{str(path)!r} holds {kind}, not a state dict of tensors.")
    if all(key.startswith("module.") for key in state):  # saved from a DistributedDataParallel wrapper
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def _to_our_keys(keys: list[str], source: str) -> tuple[str, dict[str, str | None]]:
    """Detect the layout of `keys` and map each to our layout (`None`: a tied copy to drop)."""
    ours = any(key.startswith("encoder.encoder.") for key in keys)
    comfy = any(key.startswith(("encoder.block.", "encoder.final_layer_norm.")) for key in keys)
    if ours == comfy:
        detail = "both the distill-t5 and the ComfyUI layout" if ours else "no T5 encoder blocks"
        raise ValueError(
            f"{source!r} is not a distilled T5 encoder checkpoint: its keys show {detail} ({_few(sorted(keys))})."
        )
    renames, unknown = {}, []
    for key in keys:
        if ours or key.startswith("final_projection."):
            new = key
        elif key in ("shared.weight", SHARED_KEY):
            new = SHARED_KEY
        else:
            new = "encoder." + key
        if not new.startswith(("encoder.encoder.", "final_projection.")) and new != SHARED_KEY:
            unknown.append(key)
        renames[key] = new
    if unknown:
        raise ValueError(f"{source!r} holds tensors a distilled T5 encoder does not have: {_few(unknown)}.")
    # The input embedding is tied: keep it once, under the name `save_pretrained` stores it as.
    if embed := next((key for key, new in renames.items() if new == EMBED_TOKENS_KEY), None):
        renames[embed] = None if SHARED_KEY in renames.values() else SHARED_KEY
    return (OURS if ours else COMFYUI), renames


def _check_tied_copies(tensors: Mapping[str, torch.Tensor], renames: Mapping[str, str | None], source: str) -> None:
    copies = [tensors[key] for key, new in renames.items() if new in (SHARED_KEY, None)]
    if len(copies) == 2 and not torch.equal(*copies):
        raise ValueError(
            f"{source!r} holds two different input embeddings ({SHARED_KEY} and {EMBED_TOKENS_KEY}); the model ties "
            "them, so one would be silently discarded. Keep the one you mean and drop the other."
        )


def _renamed(mapping: Mapping, renames: Mapping[str, str | None]) -> dict:
    return {renames[key]: value for key, value in mapping.items() if renames[key] is not None}


def _config_from_json(path: Path, checkpoint: Checkpoint) -> DistilledT5Config:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read the config {str(path)!r} ({error}): pass a config.json file.") from None
    for key in ("model_type", "architectures", "transformers_version"):
        raw.pop(key, None)
    if "project_out_dim" not in raw:  # a plain T5 config: the projector's width comes from the weights
        _require(checkpoint.shapes, ("final_projection.0.weight",), checkpoint.source)
        raw["project_out_dim"] = checkpoint.shapes["final_projection.0.weight"][0]
    return DistilledT5Config.from_dict({**raw, "architectures": ["DistilledT5EncoderModel"]})


# --- small helpers -------------------------------------------------------------------------------------------------


def _all_tensors(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _require(shapes: Mapping, keys, source: str = "the checkpoint") -> None:
    if missing := [key for key in keys if key not in shapes]:
        raise ValueError(f"{source} lacks {_few(missing)}: it is not a complete distilled T5 encoder.")


def _few(items: list, limit: int = 5) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _human_size(size: float) -> str:
    if size < 1024:
        return f"{size} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"
