"""Read a distilled T5 encoder checkpoint in any key layout (`layouts`), and find and check the config that describes
it (`info.describe` sums it up).

Safetensors are read from a folder (sharded or not) or a file, `.pth` by `pickled`: a pickle that would run code is
refused before any of it runs, and a file that would expand beyond its size before it is unpacked. A config is
checked against the tensors' names and shapes before any model is built from it. Local paths only (`hub.download`
fetches a registry name or a Hub repo id); writing is `convert`'s job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .configuration import DistilledT5Config, config_from_dict, parse_config_json, read_config_file
from .layouts import EMBED_TOKENS_KEY, SHARED_KEY, check_tied_copies, renamed, to_our_keys
from .messages import few
from .modeling import DistilledT5EncoderModel
from .paths import PICKLE_SUFFIXES, is_plain_name, not_a_regular_file
from .pickled import load_pickled_state_dict

# A ComfyUI file carries no config.json; `convert` stores ours in the safetensors header so a round trip loses nothing.
CONFIG_METADATA_KEY = "distilled_t5_config"

_BLOCK_KEY = re.compile(r"^encoder\.encoder\.block\.(\d+)\.")
_FIX_GIVEN_CONFIG = (
    "Pass the config the checkpoint was trained with, or none to infer the dimensions from the tensor shapes."
)
_FIX_STORED_CONFIG = (
    "Correct the config stored with it (its config.json), or convert the weight file alone: `flux-small-encoder "
    "convert WEIGHTS OUT/` infers the dimensions from the tensor shapes."
)
_FIX_HEADER_CONFIG = "Pass the config the checkpoint was trained with (`--config config.json`)."
INDEX_NAME = "model.safetensors.index.json"
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
        files, config = weight_files(path), DistilledT5Config.from_pretrained(path)
    elif (kind := not_a_regular_file(path)) is None:
        files, config = [path], None
    elif kind == "missing":
        raise FileNotFoundError(
            f"No checkpoint at {str(path)!r}: it is neither a folder nor a file. For a registry name or a Hub repo "
            "id, fetch it first (`hub.download`)."
        )
    else:
        raise ValueError(f"{str(path)!r} is {kind}, not a checkpoint file or folder: point to the weights themselves.")

    metadata = {}
    if path.suffix in PICKLE_SUFFIXES:
        tensors = load_pickled_state_dict(path)
        shapes = {key: tuple(value.shape) for key, value in tensors.items()}
        dtypes = {key: str(value.dtype).removeprefix("torch.") for key, value in tensors.items()}
    elif files[0].suffix == ".safetensors":
        shapes, dtypes, tensors, metadata = _read_safetensors(files, load_tensors)
    else:
        raise ValueError(
            f"Cannot read {str(path)!r}: expected a folder, a .safetensors file or a {'/'.join(PICKLE_SUFFIXES)} file."
        )
    if config is None and CONFIG_METADATA_KEY in metadata:
        source = f"The config in the header of {str(path)!r}"
        config = config_from_dict(parse_config_json(metadata[CONFIG_METADATA_KEY], source, _FIX_HEADER_CONFIG),
                                  source, _FIX_HEADER_CONFIG)

    layout, renames = to_our_keys(list(shapes), str(path))
    if tensors is not None:
        check_tied_copies(tensors, renames, str(path))
        tensors = renamed(tensors, renames)
    return Checkpoint(str(path), layout, renamed(shapes, renames), renamed(dtypes, renames), files, config, tensors)


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


def check_config(
    config: DistilledT5Config, shapes: Mapping[str, tuple[int, ...]], source: str, fix: str = _FIX_GIVEN_CONFIG
) -> None:
    """Raise a `ValueError` naming the tensors that `config` does not describe (missing, unexpected, other shape),
    ending with `fix`.

    The number of T5 blocks is compared first, before the model is laid out (on the meta device, without memory): a
    config asking for a million layers is refused at once instead of building a million modules.
    """
    blocks = len({match.group(1) for key in shapes if (match := _BLOCK_KEY.match(key))})
    if config.num_layers != blocks:
        raise ValueError(
            f"The config does not describe the weights of {source!r}: it says num_layers={config.num_layers} but the "
            f"weights hold {blocks} T5 blocks. {fix}"
        )
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in DistilledT5EncoderModel(config).state_dict().items()}
    expected.pop(EMBED_TOKENS_KEY, None)
    problems = []
    if missing := sorted(expected.keys() - shapes.keys()):
        problems.append(f"missing {few(missing)}")
    if unexpected := sorted(shapes.keys() - expected.keys()):
        problems.append(f"unexpected {few(unexpected)}")
    mismatched = [
        f"{key} {list(shapes[key])} (config says {list(expected[key])})"
        for key in sorted(shapes.keys() & expected.keys())
        if shapes[key] != expected[key]
    ]
    if mismatched:
        problems.append(f"other shapes: {few(mismatched)}")
    if problems:
        raise ValueError(
            f"The config does not describe the weights of {source!r}: {'; '.join(problems)}. {fix}"
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
    fix = _FIX_STORED_CONFIG if origin == "stored with it" else _FIX_GIVEN_CONFIG
    check_config(resolved, checkpoint.shapes, checkpoint.source, fix)
    return resolved, origin


# --- reading -------------------------------------------------------------------------------------------------------


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder written by `save_pretrained`: the shards its index names, else
    `model.safetensors`.

    Raises:
        ValueError: the folder holds no config.json or no weights, one of them is no regular file (a pipe, a device),
            its index names a shard the folder lacks, or is not one `save_pretrained` writes (such as one naming a
            shard outside the folder, `../x` or `/etc/passwd`: nothing is read from there).
    """
    folder = Path(folder)
    if not _is_file(folder / "config.json", "point to a folder written by `save_pretrained`"):
        raise ValueError(
            f"The folder {str(folder)!r} holds no config.json: point to a folder written by `save_pretrained`, or to "
            "the weight file itself."
        )
    index = folder / INDEX_NAME
    if _is_file(index, "re-save the model, or remove the index if the folder holds a single model.safetensors"):
        shards = [folder / name for name in _shard_names(index)]
        for shard in shards:
            if not _is_file(shard, "fetch or copy it again"):
                raise ValueError(
                    f"{str(index)!r} names the shard {shard.name!r}, which the folder does not hold: fetch or copy it "
                    "again, or re-save the model."
                )
        return shards
    if _is_file(folder / "model.safetensors", "fetch or copy the weights again"):
        return [folder / "model.safetensors"]
    raise ValueError(
        f"The folder {str(folder)!r} holds no model.safetensors. Pickled weights are not read from folders: convert "
        "the .pth file itself (`flux-small-encoder convert FILE.pth OUT/`)."
    )


def _is_file(path: Path, fix: str) -> bool:
    """Whether `path` is a regular file (`False` if it is missing); anything else, such as a pipe or a link to
    /dev/zero, which would block a reader or never end, is refused with `fix`."""
    kind = not_a_regular_file(path)
    if kind not in (None, "missing"):
        raise ValueError(f"{str(path)!r} is {kind}, not a file: {fix}.")
    return kind is None


def _shard_names(index: Path) -> list[str]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{str(index)!r} is not an index as `save_pretrained` writes it ({type(error).__name__}: {error}): "
            "re-save the model, or remove the index if the folder holds a single model.safetensors."
        ) from None
    for name in names:
        if not is_plain_name(name):
            raise ValueError(
                f"{str(index)!r} names {name!r} as a shard, which is not a file of its own folder: refused, nothing "
                "was read from it. Re-save the model, or correct the index's weight_map."
            )
    return names


def _read_safetensors(files: list[Path], load_tensors: bool):
    shapes, dtypes, tensors, metadata = {}, {}, {} if load_tensors else None, {}
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except (SafetensorError, FileNotFoundError) as error:
            raise ValueError(
                f"Cannot read {str(file)!r} as safetensors ({error}): is the file complete? Fetch or copy it again."
            ) from None
        with handle:
            metadata.update(handle.metadata() or {})
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                shapes[key] = tuple(tensor_slice.get_shape())
                dtypes[key] = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), tensor_slice.get_dtype())
                if load_tensors:
                    tensors[key] = handle.get_tensor(key)
    return shapes, dtypes, tensors, metadata


def _config_from_json(path: Path, checkpoint: Checkpoint) -> DistilledT5Config:
    source, fix = f"The config {str(path)!r}", "Pass the config.json the checkpoint was trained with."
    raw = read_config_file(path, source, fix)
    for key in ("model_type", "architectures", "transformers_version"):
        raw.pop(key, None)
    if "project_out_dim" not in raw:  # a plain T5 config: the projector's width comes from the weights
        _require(checkpoint.shapes, ("final_projection.0.weight",), checkpoint.source)
        raw["project_out_dim"] = checkpoint.shapes["final_projection.0.weight"][0]
    return config_from_dict({**raw, "architectures": ["DistilledT5EncoderModel"]}, source, fix)


# --- small helpers -------------------------------------------------------------------------------------------------


def _require(shapes: Mapping, keys, source: str = "the checkpoint") -> None:
    if missing := [key for key in keys if key not in shapes]:
        raise ValueError(f"{source} lacks {few(missing)}: it is not a complete distilled T5 encoder.")
