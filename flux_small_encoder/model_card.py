"""The model card of a distilled encoder: huggingface_hub's `ModelCard` rendered from `templates/model_card.md`.

The card's metadata is a `ModelCardData` (library, license, base model, tags, teacher, pipeline); its text is the
shipped Jinja template, filled from the checkpoint (`info.describe`) and, for a folder the trainer saved, from
the `training_config.yaml` it wrote there, without local paths or anything that looks like a credential. A folder that
holds the `results.json` of `flux-small-encoder compare` also gets its figures as `model-index` evaluation results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .provenance import TRAINING_CONFIG_NAME
from .registry import is_repo_id

LIBRARY_NAME = "flux-small-encoder"
CARD_TAGS = ("flux", "text-encoder", "t5", "distillation", "diffusers", "flux-small-encoder")
PAPER_URL = "https://arxiv.org/abs/2503.19897"
# The report of `flux-small-encoder compare` (or the trainer's `fidelity/`), read from the model folder.
RESULTS_NAME = "results.json"
# Metrics of a comparison that go into `model-index`, as `compare` names them.
CARD_METRICS = ("psnr", "ssim", "embedding_cosine", "trajectory_error", "ocr_accuracy", "clip_score")
# The card's text: a Jinja template rendered by `ModelCard.from_template`, shipped as package data.
TEMPLATE_PATH = resources.files(__package__) / "templates" / "model_card.md"
# Training-config keys the card reads: the pipeline distilled for, its teacher encoder, the student's starting point.
_PIPELINE_KEYS, _TEACHER_KEYS, _STUDENT_KEYS = ("model", "pipeline"), ("teacher",), ("student", "base_model")
# Kept out of the card: local paths, and anything that could be a credential.
_PRIVATE_KEYS = ("output_dir", "resume_from_checkpoint", "logging_dir", "cache_dir", "teacher_cache", "data_root")
_CREDENTIAL_WORDS = ("token", "secret", "password", "key")


def model_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    training_config: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    license: str | None = None,
    pipeline: str | None = None,
    teacher: str | None = None,
    base_model: str | None = None,
) -> ModelCard:
    """The model card `hub.push_to_hub` writes for a saved encoder folder.

    Args:
        folder: A folder written by `save_pretrained` (its config, weights and tokenizer files are described).
        repo_id: The Hub repository the card is for (its title and usage snippet).
        training_config: The trainer's resolved config (`read_training_config`); its `model`, `teacher` and `student`
            fill what the arguments below leave out, and a summary without local paths goes into the card.
        results: A comparison's `results.json` (`read_results`): its figures for this encoder become the card's
            `model-index` (task, prompt sets, metrics, the teacher compared against) and a table in its text.
        license: A Hub license id; defaults to `"other"` (the weights were distilled through a pipeline whose license
            may bind them).
        pipeline: The pipeline the encoder was distilled for.
        teacher: The encoder it replaces.
        base_model: The Hub id of the T5 it started from; defaults to the config's `base_model_name_or_path`, else the
            training config's `student`. Anything that is not a Hub repo id (a local path) is left out.
    """
    from .info import describe  # here: `hub.download` imports this module and needs no torch

    info = describe(folder)
    trained = dict(training_config or {})
    pipeline = pipeline or _first(trained, _PIPELINE_KEYS)
    teacher = teacher or _first(trained, _TEACHER_KEYS)
    base_model = _hub_id(
        base_model or _hub_id(getattr(info.config, "base_model_name_or_path", None)) or _first(trained, _STUDENT_KEYS)
    )
    fidelity = _fidelity(results) if results else None
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license or "other",
        base_model=base_model,
        tags=list(CARD_TAGS),
        teacher=teacher,
        distilled_for=pipeline,
        model_name=repo_id.split("/")[-1] if fidelity else None,
        eval_results=fidelity["eval_results"] if fidelity else None,
    )
    summary = yaml.safe_dump(_public_summary(trained), sort_keys=False).strip() if trained else None
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        repo_id=repo_id,
        config=info.config,
        info=info,
        has_tokenizer=(Path(folder) / "tokenizer_config.json").is_file(),  # what every tokenizer's save writes
        training_summary=summary,
        stated_license=license,
        paper_url=PAPER_URL,
        fidelity=fidelity,
    )


def read_training_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The trainer's resolved config saved in a model folder (`training_config.yaml`), `None` if it has none.

    Args:
        folder: The model folder; nothing outside it is read (a run's other folders describe other models).

    Raises:
        ValueError: the file is not a YAML mapping.
    """
    path = Path(folder) / TRAINING_CONFIG_NAME
    if not path.is_file():
        return None
    fix = "Fix or delete it, or put your own README.md into the folder to skip the generated card."
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML ({error}). {fix}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not the trainer's config (a mapping). {fix}")
    return config


def read_results(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The comparison report's data saved in a model folder (`results.json`), `None` if it has none.

    Raises:
        ValueError: the file is not the JSON object `compare` writes.
    """
    path = Path(folder) / RESULTS_NAME
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}). Write it again with `flux-small-encoder compare`, "
                         "or remove it from the folder.") from None
    if not isinstance(results, dict) or not {"summary", "encoders"} <= set(results):
        raise ValueError(f"{path} is not the results.json of `flux-small-encoder compare` (no summary or encoders).")
    return results


def _fidelity(results: Mapping[str, Any]) -> dict[str, Any]:
    """This encoder's figures in a comparison: the one distilled candidate it holds (teacher rows are references)."""
    names = [entry["encoder"] for entry in results["encoders"] if entry.get("kind") == "distilled"]
    if len(names) != 1:
        raise ValueError(f"the folder's {RESULTS_NAME} compares {len(names)} distilled encoders ({', '.join(names)}), "
                         "so it is not clear which one this folder holds: keep a results.json of a comparison of this "
                         "encoder alone (teacher rows may stay).")
    stats = results["summary"][names[0]]["metrics"]
    teacher = _public_summary(results.get("model", "the teacher"))
    prompt_sets = "+".join(_public_summary(source) for source in results.get("prompt_sets", [])) or "prompts"
    labels = {name: meta.get("label", name) for name, meta in results.get("metrics", {}).items()}
    metrics = [metric for metric in CARD_METRICS if metric in stats]
    eval_results = [
        EvalResult(
            task_type="text-to-image", task_name="Fidelity to the teacher text encoder", dataset_type=prompt_sets,
            dataset_name=prompt_sets, metric_type=metric, metric_value=float(f"{stats[metric]['mean']:.4g}"),
            metric_name=f"{labels.get(metric, metric)} vs the T5 encoder of {teacher} (flux-small-encoder compare)",
        )
        for metric in metrics
    ]
    table = [(labels.get(metric, metric), stats[metric]) for metric in metrics]
    return {"eval_results": eval_results, "table": table, "teacher": teacher, "prompt_sets": prompt_sets,
            "settings": results.get("settings", {}), "seeds": results.get("seeds", [])}


def _first(config: Mapping, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if isinstance(config.get(key), str) and config[key]:
            return config[key]
    return None


def _hub_id(name: str | None) -> str | None:
    """`name` if it is a Hub repo id, not a local path (the Hub rejects a `base_model` it cannot resolve)."""
    return name if name and not os.path.exists(name) and is_repo_id(name) else None


def _public_summary(value):
    """The training config without local folders or anything that looks like a credential.

    Keys naming local folders or credentials are dropped; any other absolute path, wherever it sits (a prompt file in
    a list of sources, say), keeps only its file name, which says what was used without telling where it lives.
    """
    if isinstance(value, dict):
        return {key: _public_summary(item) for key, item in value.items() if not _private_key(key)}
    if isinstance(value, list):
        return [_public_summary(item) for item in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return os.path.basename(value.rstrip("/\\"))
    return value


def _private_key(key) -> bool:
    words = str(key).lower().replace("-", "_").split("_")
    return key in _PRIVATE_KEYS or any(word in _CREDENTIAL_WORDS for word in words)
