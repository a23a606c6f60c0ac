"""Vision-based distillation of a small T5 encoder from FLUX's T5-XXL (see docs/training.md)."""

from .cache import TeacherCache, write_teacher_cache
from .config import SHIPPED_CONFIGS, PromptSource, TrainingConfig, load_config
from .data import PromptFileError, PromptStream, load_sources, read_prompts
from .distill import NaiveDistillation, Trajectory, VisionDistillation, flux_schedule
from .trainer import DistillationTrainer, TrainingDivergedError, train

__all__ = [
    "SHIPPED_CONFIGS",
    "DistillationTrainer",
    "NaiveDistillation",
    "PromptFileError",
    "PromptSource",
    "PromptStream",
    "TeacherCache",
    "Trajectory",
    "TrainingConfig",
    "TrainingDivergedError",
    "VisionDistillation",
    "flux_schedule",
    "load_config",
    "load_sources",
    "read_prompts",
    "train",
    "write_teacher_cache",
]
