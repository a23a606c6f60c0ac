"""Vision-based distillation of a small T5 encoder from FLUX's T5-XXL (see docs/training.md).

The public names load on first use: `train --help` reads the config without importing torch.

    config.py         TrainingConfig: YAML + `key=value` overrides
    config_checks.py  every config value checked against its type hint; YAML without duplicate keys
    data.py           prompt files in, a deterministic prompt stream out
    models.py         where the frozen parts, the teacher and the student come from (model sources)
    model_checks.py   the teacher checked from its files, and the models handed in, before they cost anything
    batch.py          prompt batches and their trajectories (tokens, teacher embeddings, noise, guidance)
    distill.py        the objectives, as `nn.Module`s returning `{"loss", ...}`
    trainer.py        the loop: setup, train, evaluate, log, save
    held_out.py       the held-out evaluation
    checkpointing.py  checkpoint files, pruning and resume (what a resume may change)
    state.py          the trainer's state in a checkpoint, without pickle
    files.py          files read back: safetensors that are whole, names that stay in their folder
    run_folder.py     output_dir: one run at a time, leftovers of killed runs, set-aside branches, metrics.jsonl
    cache.py          precomputed teacher embeddings
    fingerprint.py    the teacher's identity by content, for the cache
    launch.py         `accelerate launch` on several processes
"""

from __future__ import annotations

from ..lazy import lazy_exports

# Public name -> the module that defines it.
_PUBLIC = {
    "TeacherCache": "cache", "cache_teacher": "cache", "verify_teacher_cache": "cache", "write_teacher_cache": "cache",
    "SHIPPED_CONFIGS": "config", "PromptSource": "config", "TrainingConfig": "config", "load_config": "config",
    "PromptFileError": "data", "PromptStream": "data", "load_sources": "data", "read_prompts": "data",
    "NaiveDistillation": "distill", "Trajectory": "distill", "VisionDistillation": "distill",
    "flux_schedule": "distill",
    "TrainingLaunchError": "launch", "launch_command": "launch", "launch_training": "launch",
    "BUILT_IN_SOURCES": "models", "FrozenParts": "models", "ModelSource": "models", "model_source": "models",
    "DistillationTrainer": "trainer", "TrainingDivergedError": "trainer", "train": "trainer",
    "DiskFullError": "run_folder", "RunFolderInUseError": "run_folder",
}

__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
