"""Where a run's models come from: the frozen FLUX parts, the teacher, the T5 tokenizer and the student.

The config names a model source in `model` (the frozen parts, the T5 tokenizer and, unless `teacher` is set, the
teacher), in `teacher` and in `student`. A name in `BUILT_IN_SOURCES` (`tiny`: tiny random components built in code,
see `flux_small_encoder.tiny`) picks that source; any other name is a Hub repo id or a folder of pretrained weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modeling import DistilledT5EncoderModel
from ..paths import not_a_regular_file
from ..registry import is_repo_id
from .config import TrainingConfig

# What a run reads from the `model` repo, as `hf download --include` patterns, each with a file showing it is cached.
FROZEN_PART_FILES = {
    "transformer/*": "transformer/config.json", "scheduler/*": "scheduler/scheduler_config.json",
    "text_encoder/*": "text_encoder/config.json", "tokenizer/*": "tokenizer/tokenizer_config.json",
    "tokenizer_2/*": "tokenizer_2/tokenizer_config.json", "vae/config.json": "vae/config.json",
}
TEACHER_FILES = {"text_encoder_2/*": "text_encoder_2/config.json"}


@dataclass
class FrozenParts:
    """The pipeline parts that stay frozen: the transformer, its scheduler, CLIP, both tokenizers and, to turn latents
    into images (validation, evaluation), the VAE if it was loaded."""

    transformer: nn.Module
    scheduler: Any
    text_encoder: nn.Module
    tokenizer: Any
    tokenizer_2: Any
    vae_scale_factor: int
    vae: nn.Module | None = None

    @property
    def width(self) -> int:
        """The width of the T5 embeddings the transformer reads (FLUX.1: 4096)."""
        return self.transformer.config.joint_attention_dim

    @classmethod
    def from_pipeline(cls, pipe) -> FrozenParts:
        """The frozen parts of a FLUX pipeline (`FluxPipeline` or one with the same components)."""
        return cls(
            transformer=pipe.transformer, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, vae_scale_factor=pipe.vae_scale_factor,
            vae=getattr(pipe, "vae", None),
        )

    def freeze(self, device: torch.device | str, dtype: torch.dtype) -> FrozenParts:
        """Put the transformer, CLIP and the VAE in eval mode without gradients, on `device`, in `dtype`; returns
        self."""
        for module in (m for m in (self.transformer, self.text_encoder, self.vae) if m is not None):
            module.requires_grad_(False).eval().to(device)
            if module.dtype != dtype:  # diffusers warns on any dtype cast, even to the dtype a model already has
                module.to(dtype)
        return self


@dataclass(frozen=True)
class ModelSource:
    """How the models of a run are built from one kind of name in the config.

    Args:
        frozen_parts: `(config, dtype)` -> the `FrozenParts` of `config.model`.
        teacher: `(config, dtype)` -> the teacher T5 encoder: `config.teacher`, else the pipeline's `text_encoder_2`.
        t5_tokenizer: `config` -> the pipeline's T5 tokenizer (`tokenizer_2`), shared by teacher and student.
        student_t5: `config` -> the T5 encoder a new student starts from: pretrained weights with
            `student_init=t5`, the same architecture with random weights with `student_init=random`.
        cpu_threads: How many threads torch uses on the CPU while a run of this source trains (default: torch's own,
            one per core). Models of a few thousand weights gain nothing from more than one, and on a machine shared
            with other busy processes extra threads mostly wait for each other.
        transformer_width: `config` -> the transformer's `joint_attention_dim` without building it, to check the
            teacher before any model loads; `None` when it is not known (then it is checked once the parts are built).
    """

    frozen_parts: Callable[[TrainingConfig, torch.dtype], FrozenParts]
    teacher: Callable[[TrainingConfig, torch.dtype], nn.Module]
    t5_tokenizer: Callable[[TrainingConfig], Any]
    student_t5: Callable[[TrainingConfig], nn.Module]
    cpu_threads: int | None = None
    transformer_width: Callable[[TrainingConfig], int | None] | None = None


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along a side, from a VAE's config, as `FluxPipeline` computes it (FLUX.1's VAE: 8)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


# --- pretrained weights: a Hub repo id or a folder ------------------------------------------------------------------


def _pretrained_frozen_parts(config: TrainingConfig, dtype: torch.dtype) -> FrozenParts:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel

    name, kwargs = config.model, {"revision": config.revision}
    # The VAE's config gives the latent grid (2 ** (levels - 1) times smaller than the image); its weights are read
    # only when validation images are asked for.
    vae_config = AutoencoderKL.load_config(name, subfolder="vae", **kwargs)
    vae = None
    if config.validation_prompts:
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dtype, **kwargs)
    return FrozenParts(
        transformer=FluxTransformer2DModel.from_pretrained(name, subfolder="transformer", dtype=dtype, **kwargs),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", dtype=dtype, **kwargs),
        tokenizer=AutoTokenizer.from_pretrained(name, subfolder="tokenizer", **kwargs),
        tokenizer_2=_pretrained_t5_tokenizer(config),
        vae_scale_factor=vae_scale_factor(vae_config),
        vae=vae,
    )


def _pretrained_teacher(config: TrainingConfig, dtype: torch.dtype) -> nn.Module:
    from transformers import T5EncoderModel

    if config.teacher:
        return T5EncoderModel.from_pretrained(config.teacher, dtype=dtype)
    return T5EncoderModel.from_pretrained(config.model, subfolder="text_encoder_2", revision=config.revision,
                                          dtype=dtype)


def _pretrained_t5_tokenizer(config: TrainingConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model, subfolder="tokenizer_2", revision=config.revision)


def _pretrained_student_t5(config: TrainingConfig) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    if config.student_init == "random":
        return T5EncoderModel(T5Config.from_pretrained(config.student))
    return T5EncoderModel.from_pretrained(config.student, dtype=torch.float32)


def _pretrained_transformer_width(config: TrainingConfig) -> int | None:
    from diffusers import FluxTransformer2DModel

    try:  # `cache-teacher` needs no transformer: it may not be on this machine
        found = FluxTransformer2DModel.load_config(config.model, subfolder="transformer", revision=config.revision)
    except OSError:
        return None
    return found.get("joint_attention_dim")


PRETRAINED = ModelSource(
    frozen_parts=_pretrained_frozen_parts,
    teacher=_pretrained_teacher,
    t5_tokenizer=_pretrained_t5_tokenizer,
    student_t5=_pretrained_student_t5,
    transformer_width=_pretrained_transformer_width,
)


# --- tiny random components built in code (offline smoke runs and tests) --------------------------------------------


def _tiny_frozen_parts(config: TrainingConfig, dtype: torch.dtype) -> FrozenParts:
    from ..tiny import tiny_flux_components

    parts = tiny_flux_components(seed=0)
    return FrozenParts(
        transformer=parts["transformer"],
        scheduler=parts["scheduler"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        tokenizer_2=parts["tokenizer_2"],
        vae_scale_factor=vae_scale_factor(parts["vae"].config),
        vae=parts["vae"],
    )


def _tiny_teacher(config: TrainingConfig, dtype: torch.dtype) -> nn.Module:
    from ..tiny import tiny_teacher

    return tiny_teacher(seed=0)


def _tiny_t5_tokenizer(config: TrainingConfig):
    from ..tiny import tiny_t5_tokenizer

    return tiny_t5_tokenizer()


def _tiny_student_t5(config: TrainingConfig) -> nn.Module:
    from ..tiny import tiny_student_t5

    return tiny_student_t5(seed=config.seed)  # random whatever `student_init` says: tiny has no pretrained weights


def _tiny_transformer_width(config: TrainingConfig) -> int:
    from ..tiny import JOINT_ATTENTION_DIM

    return JOINT_ATTENTION_DIM


BUILT_IN_SOURCES: dict[str, ModelSource] = {
    "tiny": ModelSource(
        frozen_parts=_tiny_frozen_parts,
        teacher=_tiny_teacher,
        t5_tokenizer=_tiny_t5_tokenizer,
        student_t5=_tiny_student_t5,
        cpu_threads=1,
        transformer_width=_tiny_transformer_width,
    ),
}


def model_source(name: str) -> ModelSource:
    """The built-in source called `name`, else the source of pretrained weights (a Hub repo id or a folder).

    Raises:
        ValueError: `name` is a built-in source and a folder (or file) here: which one is meant is not guessed.
    """
    if name in BUILT_IN_SOURCES and os.path.exists(name):
        raise ValueError(f"{name!r} names both a built-in model source and the folder ./{name} here: write "
                         f"./{name} (or the folder's full path) to use the folder, or run from a directory without a "
                         f"{name!r} folder to use the built-in source.")
    return BUILT_IN_SOURCES.get(name, PRETRAINED)


# --- what the trainer calls -----------------------------------------------------------------------------------------


def check_cached(config: TrainingConfig, *, frozen_parts: bool, teacher: bool, student: bool) -> None:
    """Refuse a path to no folder, or a `model` folder that is no pipeline (`check_model_folders`); then, in offline
    mode, raise `OSError` for the Hub repos of the run that are not cached, with the `hf download` command that
    fetches only what training needs (FLUX's T5-XXL only when the teacher is read from the pipeline).

    Args:
        config: The run's configuration.
        frozen_parts: Check the frozen parts of `model` (and its T5 tokenizer).
        teacher: Check the teacher (`teacher`, else `model`'s `text_encoder_2`).
        student: Check the T5 checkpoint a new student starts from (`student_init` t5 or random).
    """
    from huggingface_hub import constants

    check_model_folders(config, frozen_parts=frozen_parts, teacher=teacher, student=student)
    if not constants.HF_HUB_OFFLINE:
        return
    wanted: dict[tuple[str, str | None], dict[str, str]] = {}
    if frozen_parts or teacher:  # the T5 tokenizer always comes from the pipeline
        files = dict(FROZEN_PART_FILES) if frozen_parts else {"tokenizer_2/*": FROZEN_PART_FILES["tokenizer_2/*"]}
        if frozen_parts and config.validation_prompts:  # validation images need the VAE's weights too
            files = {("vae/*" if key == "vae/config.json" else key): probe for key, probe in files.items()}
        wanted[config.model, config.revision] = files
    if teacher and config.teacher:
        wanted[config.teacher, None] = {"": "config.json"}
    elif teacher:
        wanted[config.model, config.revision].update(TEACHER_FILES)
    if student and config.student_init != "distilled":
        wanted.setdefault((config.student, None), {})[""] = "config.json"
    problems = []
    for (name, revision), files in wanted.items():
        missing = [pattern for pattern, probe in files.items() if not _is_cached(name, probe, revision)]
        if missing:
            include = "".join(f' --include "{pattern}"' for pattern in missing if pattern)
            command = f"hf download {name}" + (f" --revision {revision}" if revision else "") + include
            what = ", ".join(pattern for pattern in missing if pattern) or "config.json"
            problems.append(f"{name} is not in the local Hugging Face cache ({what}): fetch what training needs with "
                            f"`{command}`")
    if problems:
        raise FileNotFoundError(f"the Hub is offline (HF_HUB_OFFLINE=1) and {'; and '.join(problems)}; or give a "
                                "local folder.")


def check_model_folders(config: TrainingConfig, *, frozen_parts: bool, teacher: bool, student: bool) -> None:
    """Refuse, before anything loads, a model name that is a path (absolute, `./`, `../`, `~`, or more than one `/`)
    to no folder, and a `model` folder that is no diffusers pipeline (no `model_index.json`); as `check_cached`.
    """
    names = {"model": config.model} if frozen_parts or teacher else {}  # the T5 tokenizer is the pipeline's
    if teacher and config.teacher:
        names["teacher"] = config.teacher
    if student and config.student_init != "distilled":  # a distilled student is resolved by `load_encoder`
        names["student"] = config.student
    for field, name in names.items():
        if model_source(name) is not PRETRAINED or os.path.isdir(name) or not _is_path(name):
            continue
        if name.startswith("~") and os.path.isdir(os.path.expanduser(name)):
            raise ValueError(f"{field}={name}: ~ is not expanded in model names; give the full path, "
                             f"{os.path.expanduser(name)}.")
        kind = f"it is {not_a_regular_file(name) or 'a file'}, not a folder" if os.path.lexists(name) else (
            "no such folder")
        raise ValueError(f"{field}={name}: {kind}; give a local folder or a Hub repo id.")
    model = names.get("model")  # a folder of only the parts a run reads (tokenizer_2/ always) is taken as it is
    parts = [os.path.join(model or "", part) for part in ("model_index.json", "tokenizer_2")]
    if model and os.path.isdir(model) and not any(os.path.exists(part) for part in parts):
        looks_like = " It holds a config.json: it looks like a single model, such as an encoder (which goes in as " \
            "student or teacher), not a pipeline." if os.path.isfile(os.path.join(model, "config.json")) else ""
        raise ValueError(f"model={model} is not a diffusers pipeline folder: it has no model_index.json.{looks_like} "
                         "Give a FLUX pipeline folder saved with save_pretrained, or a Hub repo id such as "
                         "black-forest-labs/FLUX.1-dev.")


def _is_path(name: str) -> bool:
    """Whether a model name is written as a path, never a Hub repo id (`owner/name`)."""
    return os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1


def _is_cached(name: str, filename: str, revision: str | None) -> bool:
    """Whether `filename` of `name` can be read offline: a built-in source, a local folder or a cached Hub file."""
    from huggingface_hub import try_to_load_from_cache

    if model_source(name) is not PRETRAINED or os.path.isdir(name) or not is_repo_id(name):
        return True  # a built-in source needs no files; a bad path fails with its own message
    return isinstance(try_to_load_from_cache(name, filename, revision=revision), str)


def set_source_threads(config: TrainingConfig) -> None:
    """Set torch's CPU thread count for `config.model`'s source (`tiny`: one; pretrained weights: left as it is)."""
    threads = model_source(config.model).cpu_threads
    if threads:
        torch.set_num_threads(threads)


def load_frozen_parts(config: TrainingConfig, dtype: torch.dtype) -> FrozenParts:
    """The transformer, scheduler, CLIP text encoder and tokenizers of `config.model`."""
    return model_source(config.model).frozen_parts(config, dtype)


def transformer_width(config: TrainingConfig) -> int | None:
    """The width of the T5 embeddings `config.model`'s transformer reads, from its config alone; `None` if unknown."""
    width = model_source(config.model).transformer_width
    return width(config) if width is not None else None


def load_teacher(config: TrainingConfig, dtype: torch.dtype) -> nn.Module:
    """The frozen teacher T5 encoder, in `dtype`: `config.teacher`, else the pipeline's `text_encoder_2`."""
    teacher = model_source(config.teacher or config.model).teacher(config, dtype)
    return teacher.requires_grad_(False).eval().to(dtype)


def load_t5_tokenizer(config: TrainingConfig):
    """The pipeline's T5 tokenizer (`tokenizer_2`), which the teacher and the student share."""
    return model_source(config.model).t5_tokenizer(config)


def teacher_name(config: TrainingConfig) -> str:
    """The teacher's identity, as recorded in (and checked against) a teacher cache."""
    if config.teacher:
        return config.teacher
    revision = f"@{config.revision}" if config.revision else ""
    return f"{config.model}/text_encoder_2{revision}"


def build_student(config: TrainingConfig, width: int) -> DistilledT5EncoderModel:
    """The student in float32, with its projector as wide as the transformer's T5 input.

    `student_init`: `t5` starts from the pretrained T5 encoder `config.student` plus a fresh projector, `random`
    builds the same architecture with random weights, `distilled` loads a distilled encoder to continue from.
    """
    if config.student_init == "distilled":
        from ..registry import load_encoder

        student = load_encoder(config.student, dtype=torch.float32)
        if student.config.project_out_dim != width:
            raise ValueError(f"the student {config.student!r} produces {student.config.project_out_dim}-wide "
                             f"embeddings but the transformer reads {width}.")
        return student
    t5 = model_source(config.student).student_t5(config)
    torch.manual_seed(config.seed)
    student = DistilledT5EncoderModel.from_t5_encoder(t5, width, projector_dropout=config.projector_dropout)
    return student.float()


def add_lora(student: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """Wrap the student in peft adapters made by `LoraConfig(**lora)` (every other weight frozen)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(student, LoraConfig(**lora))


def tokenize_t5(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """T5 token ids exactly as `FluxPipeline._get_t5_prompt_embeds` makes them (padded to `max_length`)."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def clip_pooled_embeds(text_encoder: nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP's pooled embeddings exactly as `FluxPipeline._get_clip_prompt_embeds` makes them."""
    input_ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(input_ids.to(text_encoder.device), output_hidden_states=False).pooler_output
