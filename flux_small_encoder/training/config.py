"""The training configuration: one dataclass whose field help is the documentation, filled from YAML and `key=value`.

A run reads a YAML file (a shipped name such as `stage1-compbench`, or a path) for its defaults, then applies
`key=value` overrides from the command line, and saves the resolved configuration as `output_dir/config.yaml` (and as
`training_config.yaml` in every student folder it writes). Every value is checked against its field's type hint
(`config_checks.py`); the allowed values of a choice are its `Literal` type hint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ..atomic import write_text_atomically
from .config_checks import check_fields, check_output_dir, parse_yaml_value, read_yaml
from .lora_block import check_lora, move_flat_lora_keys
from .run_folder import CONFIG_NAME, METRICS_NAME, list_checkpoints

logger = logging.getLogger(__name__)

SHIPPED_CONFIGS = ("tiny", "stage1-compbench", "stage2-commontext", "stage3-mixed")
# diffusers' `SchedulerType`s that `get_scheduler` builds from a config's fields (`piecewise_constant` needs rules).
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
SEED_RANGE = range(2**32)  # NumPy's (accelerate's `set_seed` seeds it too)


@dataclass
class PromptSource:
    """One prompt file of a training or evaluation mix.

    Args:
        path: A `.txt` (one prompt a line), `.json` (a list), `.jsonl` or `.csv` file, or a glob of them
            (`t2i-compbench/*_train.txt`). Relative paths are read from `data_root`; `package:NAME` names a file
            shipped in `flux_small_encoder/data/`.
        column: The field holding the prompt in `.jsonl` objects and `.csv` rows (default `prompt`).
        repeat: How many times the source enters the mix (fractions take a seeded random part of a copy).
        weight: Alternative to `repeat`: the source's share of the mix. Give weights to all sources or none.
    """

    path: str
    column: str | None = None
    repeat: float = 1.0
    weight: float | None = None

    def __post_init__(self):
        check_fields(self)
        if self.repeat <= 0:
            raise ValueError(f"repeat of the prompt source {self.path} must be above 0, got {self.repeat} (to leave "
                             "the source out, remove it).")
        if self.weight is not None and self.weight <= 0:
            raise ValueError(f"weight of the prompt source {self.path} must be positive, got {self.weight} (to leave "
                             "the source out, remove it).")


@dataclass
class TrainingConfig:
    """Everything a distillation run needs. Every field can be set in YAML or overridden as `key=value`."""

    # --- models
    model: str = field(
        default="black-forest-labs/FLUX.1-dev",
        metadata={"help": "FLUX pipeline (Hub repo id or folder) whose transformer, scheduler and CLIP are used, "
                  "frozen, or a built-in model source: `tiny` builds tiny random components in code (offline smoke "
                  "runs and tests)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Revision of `model` on the Hub."})
    teacher: str | None = field(
        default=None,
        metadata={"help": "T5 encoder to distil from (repo id or folder). Default: the pipeline's `text_encoder_2`. "
                  "Not loaded at all when `teacher_cache` covers every prompt."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "Folder of precomputed teacher embeddings written by `flux-small-encoder cache-teacher`. "
                  "Prompts missing from it are an error (nothing is silently recomputed)."},
    )
    student: str = field(
        default="google/flan-t5-base",
        metadata={"help": "What the student starts from: a T5 checkpoint (repo id or folder; the published T5-Base "
                  "student started from google/flan-t5-base), a distilled encoder (registry name, folder or repo id) "
                  "when `student_init=distilled`, or a built-in model source such as `tiny`."},
    )
    student_init: Literal["t5", "random", "distilled"] = field(
        default="t5",
        metadata={"help": "`t5`: the pretrained T5 encoder plus a new projector; `random`: the same architecture "
                  "with random weights; `distilled`: continue from a distilled encoder (for example with LoRA)."},
    )
    projector_dropout: float = field(default=0.1, metadata={"help": "Dropout inside a new student's projector."})

    # --- objective
    objective: Literal["vision", "naive"] = field(
        default="vision",
        metadata={"help": "`vision`: match the transformer's predictions along the teacher's sampling trajectory "
                  "(the paper's method); `naive`: MSE between student and teacher embeddings (its ablation)."},
    )
    num_inference_steps: int = field(
        default=20, metadata={"help": "Steps of the teacher trajectory; each is one optimizer step (vision only)."}
    )
    resolution: int = field(default=512, metadata={"help": "Image height and width the latents stand for."})
    guidance_scales: list[float] = field(
        default_factory=lambda: [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0],
        metadata={"help": "Grid the guidance value of each prompt is drawn from (transformers with guidance "
                  "embeddings only, such as FLUX.1-dev)."},
    )
    max_sequence_length: int = field(
        default=512, metadata={"help": "Tokens per prompt for the T5 tokenizer (padding to this length)."}
    )
    zero_pooled_embeds: bool = field(
        default=False,
        metadata={"help": "Give the transformer zeros instead of CLIP's pooled embedding, as the reference code did. "
                  "Off by default: inference uses the real one."},
    )

    # --- data
    train_data: list[PromptSource] = field(
        default_factory=list, metadata={"help": "Training prompt sources (a list of {path, column, repeat, weight})."}
    )
    eval_data: list[PromptSource] = field(
        default_factory=list,
        metadata={"help": "Held-out prompt sources. When empty, `num_eval_prompts` prompts are held out of "
                  "`train_data` instead."},
    )
    data_root: str | None = field(
        default=None,
        metadata={"help": "Folder that relative prompt paths are read from. Default: the folder of the YAML file, "
                  "or the current directory for the shipped configs."},
    )
    num_eval_prompts: int = field(default=32, metadata={"help": "Prompts used by the held-out evaluation."})

    # --- optimisation
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps to train for."})
    train_batch_size: int = field(default=4, metadata={"help": "Prompts per device per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches (each following its own trajectory) whose gradients make one optimizer "
                  "step at each timestep."},
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay."})
    lr_scheduler: LRScheduler = field(
        default="constant",
        metadata={"help": "The learning rate schedule, by its diffusers `get_scheduler` name: constant, "
                  "constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial."},
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the learning rate schedule."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the student's gradient norm to this (0: off)."})
    mixed_precision: Literal["no", "bf16"] = field(
        default="no",
        metadata={"help": "`bf16` runs the frozen models in bfloat16 and the student under autocast; `no` is "
                  "float32 throughout. fp16 is refused: T5 overflows in it."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the transformer's activations in backward to save memory."}
    )
    attention_backend: Literal["auto", "flash", "efficient", "math", "cudnn", "default"] = field(
        default="auto",
        metadata={"help": "Attention kernels of the forward and backward passes: `auto` (flash, memory-efficient "
                  "or math, whichever fits; not cuDNN, whose backward pass fails on Hopper GPUs), one kernel "
                  "(`flash`, `efficient`, `math`, `cudnn`), or `default` (PyTorch's choice, cuDNN included)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data order, the noise, the guidance and the init."})

    # --- LoRA
    lora: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "peft `LoraConfig` arguments for adapters on the student, e.g. `{r: 8, lora_alpha: 8}`; "
                  "`use_dora`, `use_rslora`, `target_modules` (default: T5's q, k, v, o, wi_0, wi_1, wo) and "
                  "`modules_to_save: [final_projection]` (train the projector fully) work as in peft. Empty: train "
                  "every weight. On the command line: `lora.r=8 lora.use_dora=true`."},
    )

    # --- outputs
    output_dir: str = field(default="runs/distill", metadata={"help": "Where checkpoints, metrics and final/ go."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Write a checkpoint every this many steps."})
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only this many most recent checkpoints (null or 0: all)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or `latest` for the newest one in `output_dir`. Saved configs record "
                  "null: each checkpoint's trainer_state.json names the checkpoints its run resumed from."},
    )
    eval_steps: int = field(default=250, metadata={"help": "Run the held-out evaluation every this many steps."})
    eval_guidance_scale: float = field(default=3.5, metadata={"help": "Guidance of the evaluation trajectories."})
    validation_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompts whose teacher and student images are saved (`output_dir/validation/step-N.png`) "
                  "and logged to TensorBoard every `validation_steps`, with their PSNR/SSIM. Empty: no validation "
                  "(and the VAE is not loaded). With validation on, the fidelity report of the held-out prompts is "
                  "written to `output_dir/fidelity/` at the end of the run."},
    )
    validation_seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "Seeds of the validation images (one per prompt and seed)."}
    )
    validation_steps: int = field(default=500, metadata={"help": "Make validation images every this many steps."})
    report_to: Literal["auto", "tensorboard", "none"] = field(
        default="auto", metadata={"help": "`tensorboard`, `none`, or `auto` (TensorBoard when it is installed)."}
    )

    def __post_init__(self):
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        helps = {f.name: f.metadata["help"] for f in dataclasses.fields(self)}
        check_fields(self, helps)
        for name in ("model", "student", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty ({helps[name]})")
        check_output_dir(self.output_dir)
        for name in ("max_steps", "train_batch_size", "gradient_accumulation_steps", "num_inference_steps",
                     "checkpointing_steps", "eval_steps", "max_sequence_length", "validation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.validation_prompts and not self.validation_seeds:
            raise ValueError("validation_seeds must hold at least one seed when validation_prompts are given.")
        for name, seed in [("seed", self.seed), *(("validation_seeds", seed) for seed in self.validation_seeds)]:
            if seed not in SEED_RANGE:
                raise ValueError(f"{name} must be between 0 and 2**32 - 1, got {seed}.")
        if not self.guidance_scales:
            raise ValueError("guidance_scales must hold at least one value.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        for name in ("lr_warmup_steps", "weight_decay", "max_grad_norm", "adam_epsilon", "num_eval_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}.")
        for name in ("adam_beta1", "adam_beta2", "projector_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 0 and below 1, got {getattr(self, name)}.")
        if (self.checkpoints_total_limit or 0) < 0:
            raise ValueError(f"checkpoints_total_limit must be at least 1, or 0 / null to keep every checkpoint; got "
                             f"{self.checkpoints_total_limit}.")
        if self.resolution < 16 or self.resolution % 16:
            lower = self.resolution // 16 * 16
            nearest = f"{lower} or {lower + 16}" if lower >= 16 else "16"
            raise ValueError(f"resolution={self.resolution} is not a multiple of 16, which FLUX's latents need "
                             f"(8 pixels a latent, 2x2 latents a token): use {nearest}.")
        self.lora = check_lora(self.lora)
        if self.lora and self.student_init == "random":
            raise ValueError("LoRA on a randomly initialised student makes no sense: drop the lora block or set "
                             "student_init=t5 / distilled.")

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps each batch of prompts gives: one per timestep for `vision`, one for `naive`."""
        return self.num_inference_steps if self.objective == "vision" else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, folder: str | os.PathLike, name: str = CONFIG_NAME) -> Path:
        """Write the resolved configuration to `folder/name` (default `config.yaml`), atomically.

        `resume_from_checkpoint` is saved as null: the file is itself a valid `--config`, and a run started from it
        must not resume again from the checkpoint this one resumed from (give `resume_from_checkpoint=latest`).
        """
        values = {**self.to_dict(), "resume_from_checkpoint": None}
        return write_text_atomically(Path(folder) / name, yaml.safe_dump(values, sort_keys=False))


def config_path(name_or_path: str | os.PathLike) -> Path:
    """The YAML file of a shipped config name (`tiny`, `stage1-compbench`, ...) or of a path."""
    if str(name_or_path) in SHIPPED_CONFIGS:
        return Path(str(resources.files("flux_small_encoder") / "configs" / f"{name_or_path}.yaml"))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no config {str(name_or_path)!r}: give a YAML file or one of the shipped names "
            f"{', '.join(SHIPPED_CONFIGS)}."
        )
    return path


def load_config(name_or_path: str | os.PathLike, overrides: list[str] | dict[str, Any] = ()) -> TrainingConfig:
    """Read a YAML config (a shipped name or a path) and apply `key=value` overrides on top.

    Values of overrides are parsed as YAML, so `max_steps=100`, `zero_pooled_embeds=true` and
    `guidance_scales=[3.5]` have the types you expect; `lora.r=8` sets one entry of the `lora` block. Relative
    prompt paths are resolved against the YAML file's directory (the current directory for a shipped config), or
    `data_root` when set (a relative `data_root` against the current directory), and become absolute. The flat
    `lora_*` keys of earlier versions are moved into the `lora` block, with a `FutureWarning` naming the new spelling.

    Args:
        name_or_path: A shipped config name or a YAML file.
        overrides: `key=value` strings, or a dict, that win over the file.
    """
    path = config_path(name_or_path)
    values = read_yaml(path) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a training config must be a YAML mapping of field names to values.")
    overrides = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    for key, value in overrides.items():
        head, dot, tail = key.partition(".")
        if dot:  # `lora.r=8`: one entry of a mapping field
            current = values.get(head) or {}
            if not isinstance(current, dict):
                raise ValueError(f"override {key}: {head} is not a mapping, so it has no entry {tail!r}.")
            values[head] = {**current, tail: value}
        else:
            values[key] = value
    move_flat_lora_keys(values)
    if "output_dir" not in overrides and (run_folder := _run_folder_of(path)) is not None:
        if Path(str(values.get("output_dir"))).resolve() != run_folder.resolve():
            logger.warning(f"{path} was written for output_dir={values.get('output_dir')}; it sits in that run's "
                           f"folder, moved or copied, so the run goes on there: {run_folder}.")
        values["output_dir"] = str(run_folder)
    default_root = Path.cwd() if str(name_or_path) in SHIPPED_CONFIGS else path.parent
    data_root = values.get("data_root")  # anything but a path is refused with the config, below
    given_root = isinstance(data_root, str) and bool(data_root)
    # Absolute, so that the run's saved config.yaml reads the same prompts from any folder, and reading it again (a
    # resume) does not put `data_root` in front of paths that already start with it.
    root = Path(os.path.expanduser(data_root if given_root else default_root)).absolute()
    if given_root:
        values["data_root"] = str(root)
    _resolve_paths(values, root)
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown} (in {path} or the overrides); see `flux-small-encoder "
                         "train --help` for the fields.")
    return TrainingConfig(**values)


def _run_folder_of(path: Path) -> Path | None:
    """The run folder that a run's own `config.yaml` sits in (with its checkpoints or metrics), else `None`.

    A run's config trains into the folder it sits in, not the one it was written for, so that a moved or copied run
    resumes where it is.
    """
    if path.name != CONFIG_NAME:
        return None
    folder = path.parent
    return folder if list_checkpoints(folder) or (folder / METRICS_NAME).is_file() else None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["max_steps=10", "output_dir=/tmp/x"]` -> `{"max_steps": 10, "output_dir": "/tmp/x"}`."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value.")
        key = key.strip()
        if key in _string_fields():  # paths, names and choices stay strings even where YAML reads a number (`no`)
            overrides[key] = None if value in ("", "~", "null", "Null", "NULL") else value  # YAML's nulls
        else:
            overrides[key] = parse_yaml_value(value, f"override {key}") if value else None
    return overrides


def _string_fields() -> set[str]:
    """Fields whose values are strings: plain, optional, or a `Literal` of strings."""
    names = set()
    for name, hint in typing.get_type_hints(TrainingConfig).items():
        origin = typing.get_origin(hint)
        if origin is Literal:
            args = typing.get_args(hint)
        elif origin in (typing.Union, types.UnionType):  # `str | None`
            args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        else:
            args = [hint]
        if all(arg is str or isinstance(arg, str) for arg in args):
            names.add(name)
    return names


def _resolve_paths(values: dict[str, Any], base: Path) -> None:
    for key in ("train_data", "eval_data"):
        if key not in values or values[key] is None:
            continue
        if isinstance(values[key], (str, dict)):
            values[key] = [values[key]]
        if not isinstance(values[key], list):
            continue  # refused with the config, naming what is expected
        resolved = []
        for source in values[key]:
            source = {"path": source} if isinstance(source, str) else source
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source = {**source, "path": _resolve_path(source["path"], base)}
            resolved.append(source)
        values[key] = resolved


def _resolve_path(path: str, base: Path) -> str:
    if path.startswith("package:"):
        return str(resources.files("flux_small_encoder") / "data" / path.removeprefix("package:"))
    expanded = Path(os.path.expanduser(path))
    return str(expanded if expanded.is_absolute() else (base / expanded))
