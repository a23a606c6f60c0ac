"""How much a replacement encoder costs in image fidelity against the pipeline's own T5-XXL (see docs/evaluation.md).

The public names load on first use.

    prompts.py     named prompt sets shipped in the package, prompt files, quoted text
    generation.py  images from embeddings with the trainer's trajectory code; the teacher image cache
    metrics.py     PSNR, SSIM, LPIPS, embedding cosine and MSE, CLIP score
    ocr.py         text read from images and its character accuracy
    cost.py        parameters, bytes, encode time and peak memory
    quantize.py    `teacher@METHOD`: the teacher in memory, quantized by a quantization library
    candidates.py  the candidates, checked against the pipeline before any image, then loaded one at a time
    compare.py     `compare_encoders`
    results.py     `ComparisonResults`: records, summaries
    report.py      index.html, results.json, images, heat maps, grids
"""

from __future__ import annotations

from ..lazy import lazy_exports

# Public name -> the module that defines it.
_PUBLIC = {
    "Comparison": "compare", "compare_encoders": "compare",
    "GenerationSettings": "generation", "Sampler": "generation", "TeacherImageCache": "generation",
    "ClipScorer": "metrics", "embedding_metrics": "metrics", "image_metrics": "metrics",
    "TextReader": "ocr", "character_accuracy": "ocr",
    "PROMPT_SETS": "prompts", "EvalPrompt": "prompts", "load_eval_prompts": "prompts", "quoted_text": "prompts",
    "QUANTIZATION_METHODS": "quantize", "quantized_teacher": "quantize",
    "ComparisonResults": "results",
}

__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
