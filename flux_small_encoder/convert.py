"""Convert distilled T5 encoder checkpoints between the layouts in the wild and ours, and describe any of them.

Two key layouts exist, whatever the file format:

- `"distill-t5"` (ours): the public `LifuWang/DistillT5` checkpoint, the reference trainer's `.pth` state dicts and
  every folder `save_pretrained` writes. The T5 encoder sits under the wrapper's `encoder.` prefix
  (`encoder.shared.weight`, `encoder.encoder.block.{i}...`), the projector under `final_projection.`.
- `"comfyui"`: the T5 stack one level up (`encoder.encoder.` stripped to `encoder.`), as ComfyUI's DistillT5 loader
  holds it, and as the single-file `DistillT5-F32.safetensors` stores it with the wrapper prefix removed
  (`shared.weight`, `encoder.block.{i}...`, `final_projection.*`).

Files are read as safetensors, or as `.pth` with `torch.load(weights_only=True)`: a pickle that would run code is
refused before any of it runs. Everything written is safetensors, atomically (a temporary sibling, then a rename).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration import DistilledT5Config

OURS = "distill-t5"
COMFYUI = "comfyui"
# Width of T5-XXL's embeddings, the encoder every family in `PIPELINE_FAMILIES` ships with.
T5_XXL_WIDTH = 4096
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# A ComfyUI file carries no config.json; we store ours in the safetensors header so a round trip loses nothing.
CONFIG_METADATA_KEY = "distilled_t5_config"

_SHARED = "encoder.shared.weight"
_EMBED_TOKENS = "encoder.encoder.embed_tokens.weight"
_BLOCK_KEY = re.compile(r"^encoder\.encoder\.block\.(\d+)\.")


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
        path: The checkpoint. Keys may be in either layout; they come back in ours.
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
        raise FileNotFoundError(f"No checkpoint at {str(path)!r}: it is neither a folder nor a file.")

    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        state = _load_pickled_state_dict(path)
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        dtypes = {key: _dtype_name(value.dtype) for key, value in state.items()}
        tensors: dict | None = state
    else:
        if files[0].suffix != ".safetensors":
            raise ValueError(
                f"Cannot read {str(path)!r}: expected a folder, a .safetensors file or a "
                f"{'/'.join(PICKLE_SUFFIXES)} file."
            )
        shapes, dtypes, tensors, metadata = _read_safetensors(files, load_tensors)
        if config is None and CONFIG_METADATA_KEY in metadata:
            config = DistilledT5Config.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))

    layout, renames = _to_our_keys(list(shapes), str(path))
    shapes = {renames[key]: shape for key, shape in shapes.items()}
    dtypes = {renames[key]: dtype for key, dtype in dtypes.items()}
    if tensors is not None:
        tensors = {renames[key]: value for key, value in tensors.items()}
    _drop_tied_copy(shapes, dtypes, tensors, str(path))
    return Checkpoint(str(path), layout, shapes, dtypes, files, config, tensors)


def infer_config(shapes: Mapping[str, tuple[int, ...]], **overrides) -> DistilledT5Config:
    """A config whose dimensions are read off the tensor shapes of a checkpoint in our layout.

    What shapes cannot tell takes T5's defaults: a gated feed-forward is taken as `gated-gelu` (T5 v1.1, the FLUX
    teacher's family) and a plain one as `relu` (the original T5); `relative_attention_max_distance` is 128. Pass a
    config (`convert(..., config=...)`) where a checkpoint differs.

    Args:
        shapes: Tensor name (our layout) -> shape.
        overrides: Config fields to set instead of the inferred ones.
    """
    _require(shapes, (_SHARED, "final_projection.0.weight", "final_projection.3.weight"))
    vocab_size, d_model = shapes[_SHARED]
    layers = sorted({int(match.group(1)) for key in shapes if (match := _BLOCK_KEY.match(key))})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"The checkpoint's T5 blocks are not numbered 0..n-1 (found {layers}): it is incomplete.")
    attention = "encoder.encoder.block.0.layer.0.SelfAttention."
    feed_forward = "encoder.encoder.block.0.layer.1.DenseReluDense."
    _require(shapes, [attention + name for name in ("q.weight", "relative_attention_bias.weight")])
    _require(shapes, [feed_forward + "wo.weight"])
    num_buckets, num_heads = shapes[attention + "relative_attention_bias.weight"]
    inner_dim = shapes[attention + "q.weight"][0]
    gated = feed_forward + "wi_0.weight" in shapes
    d_ff = shapes[feed_forward + ("wi_0.weight" if gated else "wi.weight")][0]
    project_out_dim, project_in_dim = shapes["final_projection.0.weight"]
    if inner_dim % num_heads:
        raise ValueError(f"The attention width {inner_dim} is not a multiple of the {num_heads} heads.")
    fields = dict(
        vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, d_kv=inner_dim // num_heads, num_heads=num_heads,
        num_layers=len(layers), relative_attention_num_buckets=num_buckets,
        feed_forward_proj="gated-gelu" if gated else "relu", project_in_dim=project_in_dim,
        project_out_dim=project_out_dim, architectures=["DistilledT5EncoderModel"],
    )
    return DistilledT5Config(**{**fields, **overrides})


def check_config(config: DistilledT5Config, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise a `ValueError` naming the tensors that `config` does not describe (missing, unexpected, other shape)."""
    from .modeling import DistilledT5EncoderModel

    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in DistilledT5EncoderModel(config).state_dict().items()}
    expected.pop(_EMBED_TOKENS, None)  # tied to the shared embedding, stored once
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


def to_comfyui_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout -> ComfyUI's (`encoder.shared.weight` -> `shared.weight`, `encoder.encoder.` -> `encoder.`)."""
    out = {}
    for key, value in state.items():
        if key == _SHARED:
            out["shared.weight"] = value
        elif key.startswith("encoder.encoder."):
            out[key.removeprefix("encoder.")] = value
        else:
            out[key] = value
    return out


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    config: str | os.PathLike | DistilledT5Config | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint into our folder layout, or (for a `.safetensors` destination) into the ComfyUI file.

    Args:
        src: A folder (ours or the public checkpoint's), a `.safetensors` file in either layout, a reference `.pth`
            state dict, or a registry name / Hub repo id (fetched with `hub.download`).
        dst: A folder to write `config.json` + `model.safetensors` into, or a `.safetensors` file path for ComfyUI
            (the config goes into its header, so converting it back restores it exactly).
        config: A `config.json` path or a config: overrides the one stored with `src`. Without either, the dimensions
            are inferred from the tensor shapes (`infer_config`).
        overwrite: Replace a non-empty `dst`. Without it, an existing destination is refused.

    Returns:
        The path written.

    Raises:
        ValueError: `src` is not a distilled encoder, the config does not describe its tensors, or `dst` exists.
    """
    dst = Path(dst)
    if dst.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"Refusing to write {str(dst)!r}: conversions write safetensors only. Use a folder or a .safetensors path."
        )
    _refuse_existing(dst, overwrite)
    checkpoint = read_checkpoint(_local_source(src))
    resolved = _resolve_config(config, checkpoint)
    check_config(resolved, checkpoint.shapes, checkpoint.source)
    state = {key: value.contiguous() for key, value in checkpoint.tensors.items()}

    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", CONFIG_METADATA_KEY: resolved.to_json_string()}
        _write_atomically(dst, lambda target: save_file(to_comfyui_keys(state), target, metadata=metadata), overwrite)
    else:
        _write_atomically(dst, lambda target: _write_folder(target, state, resolved), overwrite)
    return dst


@dataclass(frozen=True)
class CheckpointInfo:
    """What `flux-small-encoder info` prints about a checkpoint."""

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
        dtypes = ", ".join(f"{name} ({count} tensors)" for name, count in self.dtypes.items())
        fits = self.fits
        fits_line = (
            f"{', '.join(fits)}: the T5-XXL they ship with is {T5_XXL_WIDTH} wide too"
            if fits
            else f"no stock pipeline: they take {T5_XXL_WIDTH}-wide embeddings; this fits a transformer whose "
            f"embedding width (FLUX: joint_attention_dim) is {c.project_out_dim}"
        )
        return "\n".join(
            [
                f"{self.source}",
                f"  layout:     {self.layout} (config {self.config_origin})",
                f"  T5 encoder: {c.num_layers} layers, d_model {c.d_model}, d_ff {c.d_ff} ({c.feed_forward_proj}, "
                f"{gated}), {c.num_heads} heads x d_kv {c.d_kv}, vocab {c.vocab_size}",
                f"  projector:  {c.project_in_dim} -> {c.project_out_dim} -> {c.project_out_dim}",
                f"  parameters: {self.parameters:,} (encoder {self.encoder_parameters:,}, projector "
                f"{self.projector_parameters:,})",
                f"  dtype:      {dtypes}",
                f"  file size:  {_human_size(self.file_size)}",
                f"  fits:       {fits_line}",
            ]
        )


def describe(path: str | os.PathLike) -> CheckpointInfo:
    """Shape, size and dtype of a checkpoint in any layout, reading only the safetensors headers where it can.

    Args:
        path: What `convert` accepts as `src`.
    """
    checkpoint = read_checkpoint(_local_source(path), load_tensors=False)
    config, origin = checkpoint.config, "stored with it"
    if config is None:
        config, origin = infer_config(checkpoint.shapes), "inferred from the tensor shapes"
    check_config(config, checkpoint.shapes, checkpoint.source)
    counts = {key: math.prod(shape) for key, shape in checkpoint.shapes.items()}
    projector = sum(count for key, count in counts.items() if key.startswith("final_projection."))
    dtypes: dict[str, int] = {}
    for name in checkpoint.dtypes.values():
        dtypes[name] = dtypes.get(name, 0) + 1
    return CheckpointInfo(
        source=checkpoint.source,
        layout=checkpoint.layout,
        config=config,
        config_origin=origin,
        encoder_parameters=sum(counts.values()) - projector,
        projector_parameters=projector,
        dtypes=dtypes,
        file_size=sum(file.stat().st_size for file in checkpoint.files),
    )


def fitting_families(width: int) -> list[str]:
    """The pipeline families (`patching.PIPELINE_FAMILIES`) whose stock T5 slot takes `width`-wide embeddings."""
    from .patching import PIPELINE_FAMILIES

    if width != T5_XXL_WIDTH:
        return []
    return [f"{prefix} ({slot.encoder})" for prefix, slot in PIPELINE_FAMILIES.items()]


# --- reading -------------------------------------------------------------------------------------------------------


def _local_source(src: str | os.PathLike) -> Path:
    """A local path as it is; a registry name or Hub repo id fetched (or found in the cache) by `hub.download`."""
    if os.path.exists(src):
        return Path(src)
    if Path(src).suffix in (*PICKLE_SUFFIXES, ".safetensors", ".json"):
        raise FileNotFoundError(f"No such file: {os.fspath(src)!r}.")
    from .hub import download

    return Path(download(os.fspath(src)))


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
    from safetensors import SafetensorError, safe_open

    shapes, dtypes, tensors, metadata = {}, {}, {} if load_tensors else None, {}
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except SafetensorError as error:
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
        text = str(error)
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0].split(". ")[0]
        raise ValueError(
            f"Refusing to load {str(path)!r}: `torch.load(weights_only=True)` accepts tensors and plain containers "
            f"only, and this file holds something else ({reason}). Nothing in it was run: unpickling other "
            "objects can execute arbitrary code. If you trust its author, load it yourself with "
            "`torch.load(path, weights_only=False)`, save the state dict with `safetensors.torch.save_file`, and "
            "convert that file."
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(
            f"Cannot read {str(path)!r} as a PyTorch checkpoint ({error}): is the file complete?"
        ) from None
    if isinstance(state, Mapping) and not _all_tensors(state):
        nested = [key for key in ("state_dict", "model") if isinstance(state.get(key), Mapping)]
        if len(nested) == 1 and _all_tensors(state[nested[0]]):
            state = state[nested[0]]
    if not isinstance(state, Mapping) or not _all_tensors(state):
        kind = type(state).__name__ if not isinstance(state, Mapping) else f"a dict with keys {_few(list(state))}"
        raise ValueError(f"{str(path)!r} holds {kind}, not a state dict of tensors.")
    if state and all(key.startswith("module.") for key in state):  # saved from a DistributedDataParallel wrapper
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def _to_our_keys(keys: list[str], source: str) -> tuple[str, dict[str, str]]:
    """Detect the layout of `keys` and map each to our layout."""
    ours = any(key.startswith("encoder.encoder.") for key in keys)
    comfy = any(key.startswith(("encoder.block.", "encoder.final_layer_norm.")) for key in keys)
    if ours == comfy:
        detail = "both the distill-t5 and the ComfyUI layout" if ours else "no T5 encoder blocks"
        raise ValueError(
            f"{source!r} is not a distilled T5 encoder checkpoint: its keys show {detail} ({_few(sorted(keys))})."
        )
    renames, unknown = {}, []
    for key in keys:
        if ours:
            new = key
        elif key in ("shared.weight", _SHARED):
            new = _SHARED
        elif key.startswith("encoder."):
            new = "encoder." + key
        else:
            new = key
        if not new.startswith(("encoder.encoder.", "final_projection.")) and new != _SHARED:
            unknown.append(key)
        renames[key] = new
    if unknown:
        raise ValueError(f"{source!r} holds tensors a distilled T5 encoder does not have: {_few(unknown)}.")
    return (OURS if ours else COMFYUI), renames


def _drop_tied_copy(shapes: dict, dtypes: dict, tensors: dict | None, source: str) -> None:
    """Keep the tied input embedding once, as `save_pretrained` does, after checking both copies agree."""
    if _EMBED_TOKENS not in shapes:
        return
    if _SHARED not in shapes:
        for mapping in (shapes, dtypes, tensors):
            if mapping is not None:
                mapping[_SHARED] = mapping.pop(_EMBED_TOKENS)
        return
    if tensors is not None and not torch.equal(tensors[_SHARED], tensors[_EMBED_TOKENS]):
        raise ValueError(
            f"{source!r} holds two different input embeddings ({_SHARED} and {_EMBED_TOKENS}); the model ties them, "
            "so one would be silently discarded. Keep the one you mean and drop the other."
        )
    for mapping in (shapes, dtypes, tensors):
        if mapping is not None:
            mapping.pop(_EMBED_TOKENS)


def _resolve_config(config, checkpoint: Checkpoint) -> DistilledT5Config:
    if isinstance(config, DistilledT5Config):
        return config
    if config is None:
        return checkpoint.config or infer_config(checkpoint.shapes)
    raw = json.loads(Path(config).read_text())
    for key in ("model_type", "architectures", "transformers_version"):
        raw.pop(key, None)
    if "project_out_dim" not in raw:  # a plain T5 config: the projector's width comes from the weights
        _require(checkpoint.shapes, ("final_projection.0.weight",), checkpoint.source)
        raw["project_out_dim"] = checkpoint.shapes["final_projection.0.weight"][0]
    resolved = DistilledT5Config.from_dict(raw)
    resolved.architectures = ["DistilledT5EncoderModel"]
    return resolved


# --- writing -------------------------------------------------------------------------------------------------------


def _write_folder(folder: Path, state: dict[str, torch.Tensor], config: DistilledT5Config) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _refuse_existing(dst: Path, overwrite: bool) -> None:
    empty_folder = dst.is_dir() and not any(dst.iterdir())
    if dst.exists() and not empty_folder and not overwrite:
        raise ValueError(
            f"{str(dst)!r} already exists and is not empty: choose another destination, or pass overwrite "
            "(`--overwrite`) to replace it."
        )


def _write_atomically(dst: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Write `dst` (a file or folder) in a hidden sibling folder, then rename it into place; never half a `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        target = staging / dst.name
        write(target)
        previous = staging / "previous"
        if dst.exists():
            _refuse_existing(dst, overwrite)  # again: something may have appeared while writing
            os.replace(dst, previous)
        try:
            os.replace(target, dst)
        except OSError:
            if previous.exists():
                os.replace(previous, dst)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- small helpers -------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _all_tensors(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _require(shapes: Mapping, keys, source: str = "the checkpoint") -> None:
    if missing := [key for key in keys if key not in shapes]:
        raise ValueError(f"{source} lacks {_few(missing)}: it is not a complete distilled T5 encoder.")


def _few(items: list, limit: int = 5) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"
