"""The metrics of a candidate encoder against the teacher, per image and per prompt.

Pixels are compared with torchmetrics (PSNR, SSIM, and LPIPS where its network is on this machine) on `[0, 1]`
images; embeddings with the cosine and the mean squared error of the whole `(tokens, width)` embedding (padding
included: the transformer reads it, there is no mask); prompt adherence with a local CLIP model. Which way each metric
is better is in `HIGHER_IS_BETTER`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..training.distill import per_sample_mse

# PSNR of identical images is infinite: it is reported capped here, so that results.json stays plain JSON. Two 8-bit
# images differing in more than a handful of values read below it.
PSNR_CAP_DB = 100.0
# Metric -> whether higher is better. The summaries' "worst" is the minimum or the maximum accordingly. Records also
# carry the teacher's own `teacher_ocr_accuracy` and `teacher_clip_score`, summarised as the reference's.
HIGHER_IS_BETTER = {
    "psnr": True,
    "ssim": True,
    "lpips": False,
    "embedding_cosine": True,
    "embedding_mse": False,
    "trajectory_error": False,
    "trajectory_relative_error": False,
    "ocr_accuracy": True,
    "clip_score": True,
}
# The metric that orders prompts from worst to best in summaries and reports.
RANKING_METRIC = "ssim"
# Shown in reports, in this order, when present.
METRIC_LABELS = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "lpips": "LPIPS (AlexNet)",
    "embedding_cosine": "embedding cosine",
    "embedding_mse": "embedding MSE",
    "trajectory_error": "trajectory error",
    "trajectory_relative_error": "relative trajectory error",
    "ocr_accuracy": "OCR char. accuracy",
    "clip_score": "CLIP score",
}


def image_metrics(images: torch.Tensor, references: torch.Tensor) -> dict[str, list[float]]:
    """PSNR (dB, capped at `PSNR_CAP_DB`) and SSIM of each image against its reference.

    Args:
        images: `(batch, 3, height, width)` images in `[0, 1]`.
        references: The teacher's images, the same shape.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    # float32, channels-last: SSIM's Gaussian window is a depthwise convolution, about 50x faster so on a CPU than in
    # float64 and 4x faster than channels-first (0.18 s for a 1024 px pair on one thread, benchmarks/compare.py).
    images, references = (x.float().contiguous(memory_format=torch.channels_last) for x in (images, references))
    psnr = peak_signal_noise_ratio(images.double(), references.double(), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(images, references, data_range=1.0, reduction="none")
    return {"psnr": psnr.clamp(max=PSNR_CAP_DB).tolist(), "ssim": ssim.tolist()}


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot run here without downloading anything, or `None` when it can.

    torchmetrics ships LPIPS's linear layers; its AlexNet backbone comes from torchvision, with ImageNet weights that
    torchvision downloads on first use. Here they must already be in torch's hub cache: nothing is downloaded.
    """
    if importlib.util.find_spec("torchvision") is None:
        return ("torchvision is not installed (LPIPS takes its AlexNet from it: pip install the torchvision release "
                "built for your torch)")
    try:
        from torchvision.models import AlexNet_Weights
    except (ImportError, RuntimeError, OSError) as error:  # a torchvision built for another torch fails on import
        return f"torchvision cannot be imported: {error}"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(AlexNet_Weights.DEFAULT.url)
    if not weights.is_file():
        return (f"the AlexNet weights LPIPS needs are not at {weights}, and nothing is downloaded here: fetch them "
                "once with python -c \"import torchvision; torchvision.models.alexnet(weights='DEFAULT')\"")
    return None


class LpipsScorer:
    """LPIPS (torchmetrics' `LearnedPerceptualImagePatchSimilarity`, AlexNet): 0 for identical images, higher the
    more they differ to a human eye. Build it only where `lpips_unavailable()` is `None`.

    Args:
        device: Where the network runs.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True)
        self.metric.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, references: torch.Tensor) -> list[float]:
        """The LPIPS of each `[0, 1]` image `(batch, 3, height, width)` against its reference."""
        self.metric.update(images.float().to(self.device), references.float().to(self.device))
        scores = self.metric.compute()
        self.metric.reset()
        return scores.reshape(-1).double().tolist()


def embedding_metrics(embeds: torch.Tensor, teacher_embeds: torch.Tensor) -> dict[str, list[float]]:
    """Cosine similarity and mean squared error of each prompt's embedding against the teacher's.

    Args:
        embeds: `(batch, tokens, width)` embeddings of a candidate.
        teacher_embeds: The teacher's, the same shape.
    """
    cosine = F.cosine_similarity(embeds.double().flatten(1), teacher_embeds.double().flatten(1), dim=1)
    mse = per_sample_mse(embeds, teacher_embeds)
    return {"embedding_cosine": cosine.clamp(-1, 1).tolist(), "embedding_mse": mse.tolist()}


_CLIP_FIX = ("give a local CLIP model folder such as openai/clip-vit-large-patch14 downloaded with hf download (a "
             "CLIPModel and its processor)")


def check_clip_folder(path: str | os.PathLike) -> None:
    """Refuse a `--clip` folder that does not hold a CLIP model, from its config.json alone (model_type "clip"),
    before anything loads: transformers would print a long load report, then fail on the processor.

    Raises:
        FileNotFoundError: no such folder, or it has no config.json.
        ValueError: its config.json is not a CLIP model's (or not a model's config at all).
    """
    import json

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--clip {path}: no such folder; {_CLIP_FIX}.")
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--clip {path} is not a CLIP model: it has no config.json; {_CLIP_FIX}.")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        model_type = None  # not a model's config: refused below
    if model_type != "clip":
        raise ValueError(f"--clip {path} is not a CLIP model (its config says model_type {model_type!r}): "
                         f"{_CLIP_FIX}.")


class ClipScorer:
    """CLIP score, `100 * max(cos(image, text), 0)` (as torchmetrics' `CLIPScore` defines it), with a local model.

    torchmetrics' `CLIPScore` loads only a few Hub names and, under transformers 5, fails on the model's outputs: the
    transformers `CLIPModel` is called directly instead.

    Args:
        path: A folder holding a transformers `CLIPModel` and its processor (`save_pretrained` of both).
        device: Where the model runs.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        check_clip_folder(path)
        self.model = CLIPModel.from_pretrained(path).eval().to(device)
        self.processor = AutoProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        """The score of each `[0, 1]` image `(batch, 3, height, width)` against its prompt."""
        inputs = self.processor(
            text=prompts, images=list(images.float().cpu()), return_tensors="pt", padding=True, truncation=True,
            do_rescale=False,
        ).to(self.device)
        outputs = self.model(**inputs)
        cosine = F.cosine_similarity(outputs.image_embeds.double(), outputs.text_embeds.double(), dim=-1)
        return (100 * cosine.clamp(min=0)).tolist()
