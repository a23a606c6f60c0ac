"""`compare_encoders`: every candidate encoder against the pipeline's own T5 (the teacher), at the same seeds.

Every candidate is checked first (its name, and its config against the pipeline: width and vocabulary, read without
its weights). Then, for each prompt and seed, the teacher's image is made once (or read from the cache) and the
teacher's predictions along its trajectory are kept. Each candidate in turn is loaded (one that fails to load anyway
becomes a skipped row with its reason), encodes every prompt (timed, its peak memory measured), and its images are
sampled from the same noise with the same schedule and guidance; then every metric is taken against the teacher's
image or embeddings. The trajectory error is the trainer's held-out evaluation (`VisionDistillation.trajectory_errors`,
given the teacher's kept predictions), not a copy of it.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from diffusers.training_utils import free_memory
from torch import nn

from .candidates import TEACHER, Candidate, Skipped, check_candidates, first_line, load_candidate, named_candidates
from .cost import encoder_size, measure_encoding
from .generation import (
    REFERENCE,
    GenerationSettings,
    ImageStore,
    Sampler,
    TeacherImageCache,
    encode,
    frozen_parts_of,
    pipeline_fingerprint,
    pipeline_identity,
)
from .metrics import ClipScorer, LpipsScorer, embedding_metrics, image_metrics, lpips_unavailable
from .ocr import TextReader, character_accuracy, ocr_unavailable
from .prompts import EvalPrompt
from .results import ComparisonResults

logger = logging.getLogger(__name__)


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
    revision: str | None = None,
    token: str | None = None,
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
            Each is checked before any image is made (an unknown name, or a config that does not fit the pipeline, is
            refused); one that fails to load all the same is reported as skipped, with its reason.
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
            Where the teacher's images are cached, keyed by the pipeline's content (`pipeline_fingerprint`), prompt,
            seed and settings: a re-run or a new candidate reuses them. Default: no cache.
        clip (`str`, *optional*):
            A local folder with a transformers `CLIPModel` and its processor, for CLIP scores; none by default.
        ocr (`bool`, *optional*, defaults to `True`):
            OCR the images of prompts that quote text (with rapidocr-onnxruntime; without it, OCR is reported as
            skipped, with the reason).
        model (`str`, *optional*):
            The pipeline's name in reports; default: its Hub id or folder.
        revision (`str`, *optional*):
            The revision the pipeline was loaded at from the Hub: part of the teacher cache's key.
        token (`str`, *optional*):
            A Hub token for candidates in private or gated repos.
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
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number of at least 0, got {guidance}.")
    encoders = named_candidates(encoders)
    settings = GenerationSettings(steps, size, guidance, max_sequence_length)
    sampler = Sampler(parts, settings)
    check_candidates(pipe, encoders, token=token, device=sampler.device)
    cache = None
    if cache_dir is not None:
        fingerprint = pipeline_fingerprint(pipe)
        if fingerprint is None:
            logger.warning("The teacher's images are not cached: some of the pipeline's weights cannot be read "
                           "(offloaded to the meta device, or in a tensor type that cannot be sampled).")
        else:
            cache = TeacherImageCache(cache_dir, fingerprint, revision)
    comparison = Comparison(
        sampler, pipe.text_encoder_2, prompts, list(seeds), batch_size=batch_size,
        model=model or pipeline_identity(pipe), cache=cache,
        clip=ClipScorer(clip, sampler.device) if clip is not None else None, ocr=ocr, progress=progress,
    )
    for name, encoder in encoders.items():
        # Loaded when its turn comes and released after it: one candidate in memory at a time.
        try:
            candidate = load_candidate(pipe, name, encoder, sampler.device, token=token)
        except Exception as error:  # whatever the loading library raises: the other candidates' work is kept
            candidate = Skipped(name, f"failed to load: {type(error).__name__}: {first_line(error)}")
        comparison.add(candidate)
        free_memory()
    return comparison.results


class Comparison:
    """The teacher's embeddings, images and predictions for a set of prompts and seeds, against which candidates are
    scored.

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
        ocr: OCR the images of prompts that quote text (reported as skipped, with the reason, where it cannot run).
        progress: Show progress bars.
    """

    def __init__(self, sampler: Sampler, teacher: nn.Module | Callable, prompts: list[EvalPrompt], seeds: list[int], *,
                 batch_size: int = 1, model: str = "", cache: TeacherImageCache | None = None,
                 clip: ClipScorer | None = None, ocr: bool = True, progress: bool = True):
        self.sampler, self.prompts, self.seeds = sampler, prompts, seeds
        self.batch_size, self.clip, self.progress = max(1, batch_size), clip, progress
        self.results = ComparisonResults(prompts, seeds, sampler.settings, model, ImageStore())
        self.jobs = [(index, seed) for index in range(len(prompts)) for seed in seeds]
        # What can run here is settled before any work.
        self.reader = self.lpips = None
        if ocr and any(prompt.quoted_text for prompt in prompts):
            reason = ocr_unavailable()
            if reason is None:
                self.reader = TextReader()
            else:
                self.results.skip_metric("ocr_accuracy", reason)
        reason = lpips_unavailable()
        if reason is None:
            self.lpips = LpipsScorer(sampler.device)
        else:
            self.results.skip_metric("lpips", reason)
        # The teacher's predictions along each batch's trajectory, made once and read back by every candidate's
        # trajectory error (steps x the latents' size per image: on disk, not in memory).
        self._scratch = tempfile.TemporaryDirectory(prefix="flux-small-encoder-predictions-")
        self._predictions: dict[int, Path] = {}
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

    def _batches(self, description: str) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """The jobs in batches, numbered: the same batches for the teacher and every candidate."""
        from tqdm.auto import tqdm

        with tqdm(total=len(self.jobs), desc=description, unit="image", disable=not self.progress) as bar:
            for number, start in enumerate(range(0, len(self.jobs), self.batch_size)):
                batch = self.jobs[start : start + self.batch_size]
                yield number, batch
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
        for number, batch in self._batches(TEACHER):
            keys = [cache.key(self.prompts[i].text, seed, settings, dtype) for i, seed in batch] if cache else []
            found = [cache.find(key) for key in keys] if cache is not None else [None]
            if all(found):  # else made again (the whole batch, as candidates are sampled) and rewritten
                for job, path in zip(batch, found, strict=True):
                    store.put(REFERENCE, job, path)
            else:
                # The batches candidates are sampled in: the `teacher` candidate's images then match to the bit.
                trajectory, predictions = self._trajectory(batch), []
                images = self.sampler.images(trajectory, trajectory.teacher_embeds, predictions)
                self._keep_predictions(number, predictions)
                for position, job in enumerate(batch):
                    image = images[position]
                    store.put(REFERENCE, job, cache.save(keys[position], image) if cache else image)
            images = torch.stack([store.get(REFERENCE, job) for job in batch])
            scores.update(zip(batch, self._image_scores(batch, images, teacher=True), strict=True))
        return scores

    def _keep_predictions(self, number: int, predictions: list[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = Path(self._scratch.name) / f"{number}.safetensors"
        save_file({str(step): prediction.cpu().contiguous() for step, prediction in enumerate(predictions)}, path)
        self._predictions[number] = path

    def _teacher_predictions(self, number: int, trajectory) -> list[torch.Tensor]:
        """The teacher's prediction at each step of batch `number`'s trajectory: kept from its images, or (when they
        came from the cache) made now, once for all candidates."""
        from safetensors.torch import load_file

        if number not in self._predictions:
            predictions = []
            self.sampler.objective.follow(copy.copy(trajectory), trajectory.teacher_embeds, predictions=predictions)
            self._keep_predictions(number, predictions)
        saved = load_file(self._predictions[number])
        return [saved[str(step)] for step in range(len(saved))]

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
        for number, batch in self._batches(candidate.name):
            indices = [index for index, _ in batch]
            trajectory = self._trajectory(batch)
            images = self.sampler.images(trajectory, embeds[indices])
            teacher_images = torch.stack([self.results.images.get(REFERENCE, job) for job in batch])
            pixels = image_metrics(images.double() / 255, teacher_images.double() / 255)
            if self.lpips is not None:
                pixels["lpips"] = self.lpips(images.float() / 255, teacher_images.float() / 255)
            errors = self.sampler.objective.trajectory_errors(
                copy.copy(trajectory), embeds[indices].to(self.sampler.device, self.sampler.dtype),
                teacher_preds=self._teacher_predictions(number, trajectory),
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
