"""The results of a comparison: one record per (encoder, prompt, seed), the encoders' costs, summaries, and images.

The data comes first (`to_json`, written as `results.json`); `save` adds the views (`report.py`).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict
from pathlib import Path

from .generation import GenerationSettings, ImageStore
from .metrics import HIGHER_IS_BETTER, METRIC_LABELS, PSNR_CAP_DB, RANKING_METRIC
from .prompts import EvalPrompt

WORST_PROMPTS = 5
NOTES = {
    "psnr": f"PSNR in dB on 8-bit images, capped at {PSNR_CAP_DB:g} dB (identical images read {PSNR_CAP_DB:g})",
    "ssim": "SSIM (torchmetrics, Gaussian window 11, data range 1) on 8-bit images scaled to [0, 1]",
    "lpips": "LPIPS with AlexNet (torchmetrics): a learned perceptual distance, 0 for identical images",
    "embedding_cosine": "cosine of the whole (tokens x width) T5 embedding, padding included, against the teacher's",
    "trajectory_error": "MSE of the transformer's predictions with candidate vs teacher embeddings along the "
    "teacher's trajectory, averaged over steps: the trainer's eval_error",
    "ocr_accuracy": "1 - character error rate of the OCR'd text against the quoted text, case-insensitive, floored "
    "at 0 (prompts that quote text only)",
    "clip_score": "100 * max(cosine(image, prompt), 0) with the local CLIP model given",
}


class ComparisonResults:
    """What `compare_encoders` measured. `records` holds one dict per (encoder, prompt, seed)."""

    def __init__(self, prompts: list[EvalPrompt], seeds: list[int], settings: GenerationSettings, model: str,
                 images: ImageStore):
        self.prompts, self.seeds, self.settings, self.model, self.images = prompts, seeds, settings, model, images
        self.records: list[dict] = []
        self.encoders: list[dict] = []
        self.skipped: list[dict] = []
        self.reference: dict = {}
        # Metric -> why it was not computed (said in every report instead of leaving it out silently).
        self.skipped_metrics: dict[str, str] = {}
        self._indices = {prompt.text: index for index, prompt in enumerate(prompts)}

    # --- filled by the comparison -------------------------------------------------------------------------------

    def add_reference(self, size: dict, cost: dict) -> None:
        self.reference = {"encoder": "teacher", "kind": "reference", **size, **cost}

    def add_encoder(self, name: str, kind: str, size: dict, cost: dict) -> None:
        self.encoders.append({"encoder": name, "kind": kind, **size, **cost})

    def add_skipped(self, name: str, reason: str) -> None:
        self.skipped.append({"encoder": name, "reason": reason})

    def skip_metric(self, name: str, reason: str) -> None:
        self.skipped_metrics[name] = reason

    def add_record(self, record: dict) -> None:
        self.records.append(record)

    # --- views --------------------------------------------------------------------------------------------------

    @property
    def encoder_names(self) -> list[str]:
        return [encoder["encoder"] for encoder in self.encoders]

    def reference_summary(self) -> dict[str, dict]:
        """The teacher's own OCR accuracy and CLIP score (what a candidate's are measured beside), overall and per
        category."""
        first = self.encoder_names[0] if self.encoders else None
        # Every candidate's records carry the same teacher scores: one candidate's are all of them.
        records = [
            {key.removeprefix("teacher_"): value for key, value in record.items()
             if key == "category" or key.startswith("teacher_")}
            for record in self.records
            if record["encoder"] == first
        ]
        categories = sorted({record["category"] for record in records})
        return {"metrics": _stats(records),
                "categories": {c: _stats([r for r in records if r["category"] == c]) for c in categories}}

    def summary(self) -> dict[str, dict]:
        """Per encoder: each metric's mean, median and worst, overall and per prompt category, and the worst
        prompts (lowest SSIM) first."""
        summary = {}
        for name in self.encoder_names:
            records = [record for record in self.records if record["encoder"] == name]
            categories = sorted({record["category"] for record in records})
            ranked = sorted(records, key=lambda record: record[RANKING_METRIC])
            summary[name] = {
                "metrics": _stats(records),
                "categories": {
                    category: _stats([record for record in records if record["category"] == category])
                    for category in categories
                },
                "worst_prompts": [
                    {key: record[key] for key in ("prompt", "category", "seed", "ssim", "psnr")}
                    for record in ranked[:WORST_PROMPTS]
                ],
            }
        return summary

    def prompt_order(self) -> list[int]:
        """Prompt indices, worst first: by the lowest SSIM any candidate got on any seed of the prompt."""
        worst = {}
        for record in self.records:
            index = self.prompt_index(record["prompt"])
            worst[index] = min(worst.get(index, float("inf")), record[RANKING_METRIC])
        return sorted(range(len(self.prompts)), key=lambda index: (worst.get(index, float("inf")), index))

    def prompt_index(self, text: str) -> int:
        """The position of a prompt in `prompts`."""
        return self._indices[text]

    def to_json(self) -> dict:
        """Everything measured, as `results.json` holds it."""
        return {
            "model": self.model,
            "teacher": f"the T5 encoder of {self.model}",
            "settings": asdict(self.settings),
            "seeds": self.seeds,
            "prompt_sets": sorted({prompt.source for prompt in self.prompts}),
            "metrics": {
                name: {"label": METRIC_LABELS[name], "higher_is_better": HIGHER_IS_BETTER[name],
                       **({"note": NOTES[name]} if name in NOTES else {})}
                for name in METRIC_LABELS
                if any(name in record for record in self.records)
            },
            "skipped_metrics": self.skipped_metrics,
            "reference": {**self.reference, "summary": self.reference_summary()},
            "encoders": self.encoders,
            "skipped": self.skipped,
            "summary": self.summary(),
            "records": self.records,
        }

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the report: `index.html`, `results.json`, the images, difference heat maps and grids.

        Args:
            folder: A new (or empty) folder.
            overwrite: Replace a folder that already holds a report.
        """
        from .report import write_report

        return write_report(self, folder, overwrite=overwrite)


def _stats(records: list[dict]) -> dict[str, dict]:
    stats = {}
    for metric, higher_is_better in HIGHER_IS_BETTER.items():
        values = [record[metric] for record in records if metric in record]
        if values:
            stats[metric] = {
                "mean": statistics.fmean(values),
                "median": statistics.median(values),
                "worst": min(values) if higher_is_better else max(values),
                "count": len(values),
            }
    return stats
