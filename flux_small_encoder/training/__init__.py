"""Vision-based distillation of a small T5 encoder from FLUX's T5-XXL (see docs/training.md).

    config.py         TrainingConfig: YAML + `key=value` overrides, checked from its type hints
    data.py           prompt files in, a deterministic prompt stream out
    models.py         where the frozen parts, the teacher and the student come from (model sources)
    batch.py          prompt batches and their trajectories (tokens, teacher embeddings, noise, guidance)
    distill.py        the objectives, as `nn.Module`s returning `{"loss", ...}`
    trainer.py        the loop: setup, train, evaluate, log, save
    checkpointing.py  checkpoint files, pruning and resume
    cache.py          precomputed teacher embeddings
    launch.py         `accelerate launch` on several processes
"""

from .cache import TeacherCache, cache_teacher, write_teacher_cache
from .config import SHIPPED_CONFIGS, PromptSource, TrainingConfig, load_config
from .data import PromptFileError, PromptStream, load_sources, read_prompts
from .distill import NaiveDistillation, Trajectory, VisionDistillation, flux_schedule
from .launch import TrainingLaunchError, launch_command, launch_training
from .models import BUILT_IN_SOURCES, FrozenParts, ModelSource, model_source
from .trainer import DistillationTrainer, TrainingDivergedError, train

__all__ = [
    "BUILT_IN_SOURCES",
    "SHIPPED_CONFIGS",
    "DistillationTrainer",
    "FrozenParts",
    "ModelSource",
    "NaiveDistillation",
    "PromptFileError",
    "PromptSource",
    "PromptStream",
    "TeacherCache",
    "TrainingConfig",
    "TrainingDivergedError",
    "TrainingLaunchError",
    "Trajectory",
    "VisionDistillation",
    "cache_teacher",
    "flux_schedule",
    "launch_command",
    "launch_training",
    "load_config",
    "load_sources",
    "model_source",
    "read_prompts",
    "train",
    "write_teacher_cache",
]
