"""`compare_encoders`: every candidate encoder against the pipeline's own T5 (the teacher), at the same seeds.

For each prompt and seed the teacher's image is made once (or read from the cache). Each candidate in turn is
loaded, encodes every prompt (timed, its peak memory measured), and its images are sampled from the same noise with
the same schedule and guidance; then every metric is taken against the teacher's image or embeddings. The trajectory
error is the trainer's held-out evaluation (`VisionDistillation.trajectory_errors`), not a copy of it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers.training_utils import free_memory
from torch import nn

from .cost import encoder_size, measure_encoding
from .generation import (
    REFERENCE,
    GenerationSettings,
    ImageStore,
    Sampler,
    TeacherImageCache,
    encode,
    frozen_parts_of,
    pipeline_identity,
)
from .metrics import ClipScorer, embedding_metrics, image_metrics
from .ocr import character_accuracy
from .prompts import EvalPrompt
from .results import ComparisonResults

TEACHER = "teacher"


@dataclass
class Candidate:
    """An encoder to compare: `kind` is `teacher`, `quantized` (`teacher@METHOD`) or `distilled`."""

    name: str
    encoder: nn.Module
    kind: str


@dataclass
class Skipped:
    """A candidate that cannot run here, and why."""

    name: str
    reason: str


def compare_encoders(
    pipe,
    encoders: Sequence[str | os.PathLike | nn.Module] | Mapping[str, str | os.PathLike | nn.Module],
    prompts: Sequence[str | EvalPrompt],
    seeds: Sequence[int] = (0,),
    *,
    steps: int = 20,
    size: int = 1024,
    guidance: float = 3.5,
    max_sequence_length: int = 512,
    batch_size: int = 1,
    cache_dir: str | os.PathLike | None = None,
    clip: str | os.PathLike | None = None,
    ocr: bool = True,
    model: str | None = None,
    progress: bool = True,
) -> ComparisonResults:
    r"""
    Compare text encoders against the pipeline's own T5 encoder (the teacher) on images made at the same seeds.

    Args:
        pipe (`FluxPipeline`):
            A FLUX pipeline holding its T5 encoder: the teacher. Candidates never replace it; the transformer is used
            as it is (on its device, with its offload hooks).
        encoders (`list` or `dict`):
            The candidates: what `patch_encoder` accepts (a registry name, a folder, a Hub repo id, a
            `DistilledT5EncoderModel`), `"teacher"` (the pipeline's own encoder: a self-check, it must score
            perfectly), or `"teacher@METHOD"` (the teacher quantized by a key of `QUANTIZATION_METHODS`; skipped with
            its reason where the method cannot run). A dict names them in the report: `{"mine": "runs/s3/final"}`.
        prompts (`list`):
            Prompts, as strings or `EvalPrompt`s (see `load_eval_prompts`).
        seeds (`list[int]`, *optional*, defaults to `(0,)`):
            One image per prompt and seed; seed `s` draws the noise `FluxPipeline` draws with a CPU generator seeded
            with `s`.
        steps, size, guidance, max_sequence_length:
            The generation settings, the same for every encoder.
        batch_size (`int`, *optional*, defaults to 1):
            Images sampled at once.
        cache_dir (`str`, *optional*):
            Where the teacher's images are cached, keyed by model, prompt, seed and settings: a re-run or a new
            candidate reuses them. Default: no cache.
        clip (`str`, *optional*):
            A local folder with a transformers `CLIPModel` and its processor, for CLIP scores; none by default.
        ocr (`bool`, *optional*, defaults to `True`):
            OCR the images of prompts that quote text (needs rapidocr-onnxruntime).
        model (`str`, *optional*):
            The pipeline's name in cache keys and reports; default: its Hub id or folder, else a fingerprint.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.

    Returns:
        `ComparisonResults`: `.records`, `.summary()`, `.save(folder)`.

    Example:
    ```py
    >>> results = compare_encoders(pipe, ["t5-base-distilled", "teacher@quanto-int8"], ["a red cube"], seeds=[0, 1])
    >>> results.save("report/")
    ```
    """
    parts = frozen_parts_of(pipe)
    prompts = [p if isinstance(p, EvalPrompt) else EvalPrompt(p, "prompts", "prompts") for p in prompts]
    if not prompts:
        raise ValueError("no prompts to compare on: give at least one prompt.")
    if not encoders:
        raise ValueError("no encoders to compare: give at least one candidate (teacher, teacher@METHOD, a name).")
    encoders = _named(encoders)
    _check_names(encoders.values())
    model = model or pipeline_identity(pipe)
    settings = GenerationSettings(steps, size, guidance, max_sequence_length)
    sampler = Sampler(parts, settings)
    comparison = Comparison(
        sampler, pipe.text_encoder_2, prompts, list(seeds), batch_size=batch_size, model=model,
        cache=TeacherImageCache(cache_dir, model) if cache_dir is not None else None,
        clip=ClipScorer(clip, sampler.device) if clip is not None else None, ocr=ocr, progress=progress,
    )
    for name, encoder in encoders.items():
        # Loaded when its turn comes and released after it: one candidate in memory at a time.
        comparison.add(load_candidate(pipe, name, encoder, sampler.device))
        free_memory()
    return comparison.results


class Comparison:
    """The teacher's embeddings and images for a set of prompts and seeds, against which candidates are scored.

    Args:
        sampler: Makes the images.
        teacher: The teacher encoder (a module called as FluxPipeline calls `text_encoder_2`), or a function of token
            ids that returns its embeddings (the trainer's teacher cache); its cost is then not reported.
        prompts: The prompts.
        seeds: The seeds.
        batch_size: Images sampled at once.
        model: The pipeline's name, for the report.
        cache: The teacher's image cache, if any.
        clip: A CLIP scorer, if any.
        ocr: OCR the images of prompts that quote text.
        progress: Show progress bars.
    """

    def __init__(self, sampler: Sampler, teacher: nn.Module | Callable, prompts: list[EvalPrompt], seeds: list[int], *,
                 batch_size: int = 1, model: str = "", cache: TeacherImageCache | None = None,
                 clip: ClipScorer | None = None, ocr: bool = True, progress: bool = True):
        self.sampler, self.prompts, self.seeds = sampler, prompts, seeds
        self.batch_size, self.clip, self.progress = max(1, batch_size), clip, progress
        self.reader = None
        if ocr and any(prompt.quoted_text for prompt in prompts):
            from .ocr import TextReader

            self.reader = TextReader()
        self.results = ComparisonResults(prompts, seeds, sampler.settings, model, ImageStore())
        self.jobs = [(index, seed) for index in range(len(prompts)) for seed in seeds]
        # The teacher: its embeddings (kept on the CPU), its cost, its images and the scores of its images.
        self.teacher_embeds, cost = self._encode(teacher)
        self.results.add_reference(encoder_size(teacher) if isinstance(teacher, nn.Module) else {}, cost)
        self.teacher_scores = self._teacher_images(cache)

    def _encode(self, encoder: nn.Module | Callable) -> tuple[torch.Tensor, dict]:
        input_ids = self.sampler.tokenize([prompt.text for prompt in self.prompts])
        chunks = input_ids.split(self.batch_size)
        run = (lambda chunk: encode(encoder, chunk)) if isinstance(encoder, nn.Module) else encoder
        embeds, cost = measure_encoding(lambda: [run(chunk).cpu() for chunk in chunks], self.sampler.device)
        cost["encode_seconds_per_prompt"] = cost.pop("seconds") / len(self.prompts)
        return torch.cat(embeds), cost

    def _batches(self, description: str) -> Iterator[list[tuple[int, int]]]:
        from tqdm.auto import tqdm

        with tqdm(total=len(self.jobs), desc=description, unit="image", disable=not self.progress) as bar:
            for start in range(0, len(self.jobs), self.batch_size):
                batch = self.jobs[start : start + self.batch_size]
                yield batch
                bar.update(len(batch))

    def _trajectory(self, batch: list[tuple[int, int]]):
        indices = [index for index, _ in batch]
        return self.sampler.start(
            [self.prompts[i].text for i in indices], [seed for _, seed in batch], self.teacher_embeds[indices]
        )

    def _teacher_images(self, cache: TeacherImageCache | None) -> dict[tuple[int, int], dict]:
        """Make (or read from the cache) the teacher's image of every job, and score it for OCR and CLIP."""
        store, settings, dtype = self.results.images, self.sampler.settings, self.sampler.dtype
        scores = {}
        for batch in self._batches(TEACHER):
            keys = [cache.key(self.prompts[i].text, seed, settings, dtype) for i, seed in batch] if cache else []
            if cache is not None and all(cache.path(key).is_file() for key in keys):
                for job, key in zip(batch, keys, strict=True):
                    store.put(REFERENCE, job, cache.path(key))
            else:
                # The batches candidates are sampled in: the `teacher` candidate's images then match to the bit.
                trajectory = self._trajectory(batch)
                images = self.sampler.images(trajectory, trajectory.teacher_embeds)
                for position, job in enumerate(batch):
                    image = images[position]
                    store.put(REFERENCE, job, cache.save(keys[position], image) if cache else image)
            images = torch.stack([store.get(REFERENCE, job) for job in batch])
            scores.update(zip(batch, self._image_scores(batch, images, teacher=True), strict=True))
        return scores

    def _image_scores(self, batch, images: torch.Tensor, teacher: bool = False) -> list[dict]:
        """OCR (prompts quoting text) and CLIP scores of a batch of images."""
        prefix = "teacher_" if teacher else ""
        scores = [{} for _ in batch]
        if self.reader is not None:
            for score, (index, _), image in zip(scores, batch, images, strict=True):
                expected = self.prompts[index].quoted_text
                if expected:
                    read = self.reader.read(image.permute(1, 2, 0).numpy())
                    score[f"{prefix}ocr_text"] = read
                    score[f"{prefix}ocr_accuracy"] = character_accuracy(expected, read)
        if self.clip is not None:
            clip_scores = self.clip(images.float() / 255, [self.prompts[index].text for index, _ in batch])
            for score, value in zip(scores, clip_scores, strict=True):
                score[f"{prefix}clip_score"] = value
        return scores

    def add(self, candidate: Candidate | Skipped) -> None:
        """Score one candidate against the teacher (a skipped one is recorded with its reason)."""
        if isinstance(candidate, Skipped):
            self.results.add_skipped(candidate.name, candidate.reason)
            return
        embeds, cost = self._encode(candidate.encoder)
        self.results.add_encoder(candidate.name, candidate.kind, encoder_size(candidate.encoder), cost)
        per_prompt = embedding_metrics(embeds, self.teacher_embeds)
        for batch in self._batches(candidate.name):
            indices = [index for index, _ in batch]
            trajectory = self._trajectory(batch)
            images = self.sampler.images(trajectory, embeds[indices])
            teacher_images = torch.stack([self.results.images.get(REFERENCE, job) for job in batch])
            pixels = image_metrics(images.double() / 255, teacher_images.double() / 255)
            errors = self.sampler.objective.trajectory_errors(
                copy.copy(trajectory), embeds[indices].to(self.sampler.device, self.sampler.dtype)
            )
            scores = self._image_scores(batch, images)
            for position, (index, seed) in enumerate(batch):
                self.results.images.put(candidate.name, (index, seed), images[position])
                self.results.add_record({
                    "encoder": candidate.name, "prompt": self.prompts[index].text,
                    "category": self.prompts[index].category, "seed": seed,
                    **{name: values[position] for name, values in pixels.items()},
                    **{name: values[index] for name, values in per_prompt.items()},
                    "trajectory_error": float(errors[0][position]),
                    "trajectory_relative_error": float(errors[1][position]),
                    **({"quoted_text": self.prompts[index].quoted_text} if self.prompts[index].quoted_text else {}),
                    **scores[position], **self.teacher_scores[(index, seed)],
                })


def _check_names(encoders) -> None:
    """Refuse a bad candidate name before any image is made."""
    from ..registry import resolve_encoder
    from .quantize import QUANTIZATION_METHODS

    for encoder in encoders:
        if isinstance(encoder, nn.Module) or encoder == TEACHER:
            continue
        name = os.fspath(encoder)
        if name.startswith(f"{TEACHER}@"):
            if name.partition("@")[2] not in QUANTIZATION_METHODS:
                raise ValueError(f"{name}: no such quantization method; use one of "
                                 f"{', '.join(f'{TEACHER}@{method}' for method in QUANTIZATION_METHODS)}.")
        else:
            resolve_encoder(name)


def _named(encoders) -> dict[str, str | os.PathLike | nn.Module]:
    """Candidates by the names the report gives them: as given, or a model's `name_or_path`."""
    if isinstance(encoders, Mapping):
        return dict(encoders)
    named = {}
    for number, encoder in enumerate(encoders):
        if isinstance(encoder, nn.Module):
            named[getattr(encoder, "name_or_path", "") or f"encoder-{number}"] = encoder
        else:
            named[os.fspath(encoder)] = encoder
    return named


def load_candidate(pipe, name: str, encoder: str | os.PathLike | nn.Module, device) -> Candidate | Skipped:
    """The candidate `encoder`, named `name`, ready to encode on `device` (or why it cannot run here)."""
    from ..patching import check_compatible
    from ..registry import load_encoder
    from .quantize import QuantizationUnavailable, quantized_teacher

    if isinstance(encoder, nn.Module):
        return Candidate(name, encoder.eval(), "distilled")
    spec = os.fspath(encoder)
    if spec == TEACHER:
        return Candidate(name, pipe.text_encoder_2, "teacher")
    if spec.startswith(f"{TEACHER}@"):
        source = pipe.name_or_path if pipe.name_or_path and _has_teacher_folder(pipe.name_or_path) else None
        try:
            quantized = quantized_teacher(pipe.text_encoder_2, spec.partition("@")[2], source=source,
                                          subfolder="text_encoder_2" if source else None, device=device)
        except QuantizationUnavailable as error:
            return Skipped(name, str(error))
        return Candidate(name, quantized, "quantized")
    student = load_encoder(spec, dtype=pipe.transformer.dtype)
    check_compatible(pipe, student)
    return Candidate(name, student.eval().to(device), "distilled")


def _has_teacher_folder(name: str) -> bool:
    """A pipeline folder holds `text_encoder_2/`; a Hub id is taken to (the load says otherwise if not)."""
    return not os.path.isdir(name) or os.path.isdir(os.path.join(name, "text_encoder_2"))
