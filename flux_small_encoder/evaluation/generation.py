"""Images from text embeddings, on equal terms for every encoder, and the on-disk cache of the teacher's images.

`Sampler` runs the trainer's own trajectory code (`VisionDistillation.follow`: the transformer's prediction, then the
scheduler's Euler step, along `flux_schedule`), which is FluxPipeline's sampling loop: the same schedule, guidance and
initial noise for every encoder, so two images of a prompt and seed differ only by the embeddings. The noise of seed
`s` is what `FluxPipeline(..., generator=torch.Generator("cpu").manual_seed(s))` draws for one image, so a report's
image is FluxPipeline's own for its prompt, seed and settings (a test checks it bit for bit, batch size 1). What that
means for making one again:

- a distilled candidate's: `flux-small-encoder generate PROMPT --model MODEL --encoder ENCODER --seed s --steps 20
  --height 1024 --width 1024 --guidance 3.5 --dtype bfloat16` with the report's settings (`generate` defaults to 28
  steps, `compare` to 20), on the same device, for a report made with `--batch-size 1` (batched kernels may round
  differently) and the default `--max-sequence-length 512` (`generate` has no such option);
- the teacher's, and the `teacher` and `teacher@METHOD` rows: not with `generate`, which always replaces the T5
  encoder; call `FluxPipeline` with the pipeline's own (or the quantized) `text_encoder_2` and the same settings,
  `max_sequence_length` and generator.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_file
from ..private_api import unpack_latents
from ..training.batch import latent_shape, start_trajectory
from ..training.distill import Trajectory, VisionDistillation, flux_schedule
from ..training.models import FrozenParts, clip_pooled_embeds, tokenize_t5

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """What fixes an image besides its prompt, seed and text embeddings.

    Args:
        steps: Denoising steps.
        size: Height and width in pixels.
        guidance: Guidance scale (FLUX.1-dev's guidance embedding; ignored by transformers without one).
        max_sequence_length: T5 tokens per prompt (the pipeline's `max_sequence_length`).
    """

    steps: int = 20
    size: int = 1024
    guidance: float = 3.5
    max_sequence_length: int = 512


def frozen_parts_of(pipe) -> FrozenParts:
    """The parts of a FLUX pipeline that `Sampler` needs, with its VAE.

    Raises:
        ValueError: the pipeline is not of the FLUX family, or has no T5 encoder (the teacher) or no VAE.
    """
    from ..patching import find_encoder_slot

    slot = find_encoder_slot(pipe)
    if slot.encoder != "text_encoder_2" or not hasattr(pipe, "transformer"):
        raise ValueError(f"{type(pipe).__name__}: comparing encoders needs a FLUX pipeline (FluxPipeline and kin).")
    if getattr(pipe, slot.encoder, None) is None:
        raise ValueError(
            f"the pipeline has no T5 encoder ({slot.encoder} is None): the comparison needs the teacher. Load the "
            f"pipeline with its own {slot.encoder} (not with {slot.encoder}=None or load_pipeline)."
        )
    if getattr(pipe, "vae", None) is None:
        raise ValueError("the pipeline has no VAE: the comparison decodes images. Load the pipeline with its VAE.")
    return FrozenParts(
        transformer=pipe.transformer, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, vae_scale_factor=pipe.vae_scale_factor, vae=pipe.vae,
    )


class Sampler:
    """Embeddings in, `uint8` images out, along FluxPipeline's schedule with the trainer's trajectory code.

    Args:
        parts: The frozen parts, with a VAE.
        settings: Steps, size, guidance, sequence length.
        device: Where latents live; default: where the transformer runs (its offload hook's device, if any).
        dtype: The latents' dtype; default: the transformer's.
        objective: The trainer's objective to sample with (its schedule must be `settings.steps` long at
            `settings.size`); default: a `VisionDistillation` made here.
    """

    def __init__(
        self,
        parts: FrozenParts,
        settings: GenerationSettings,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        objective: VisionDistillation | None = None,
    ):
        from diffusers.utils.torch_utils import get_module_execution_device

        if parts.vae is None:
            raise ValueError("images need the VAE: the frozen parts were loaded without one.")
        self.parts, self.settings = parts, settings
        self.device = torch.device(device) if device is not None else get_module_execution_device(parts.transformer)
        self.dtype = dtype or parts.transformer.dtype
        self.latent_shape = latent_shape(settings.size, parts)
        if objective is None:
            _, height, width = self.latent_shape
            timesteps, sigmas = flux_schedule(parts.scheduler, settings.steps, height * width // 4)
            # Buffers made on the device: `.to()` on the objective would move the transformer, off its offload hooks.
            objective = VisionDistillation(parts.transformer, timesteps.to(self.device), sigmas.to(self.device))
        self.objective = objective

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize_t5(self.parts.tokenizer_2, prompts, self.settings.max_sequence_length)

    @torch.no_grad()
    def start(self, prompts: list[str], seeds: list[int], teacher_embeds: torch.Tensor) -> Trajectory:
        """The trajectories of `prompts[i]` from the noise of `seeds[i]`, at their first timestep."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = torch.cat([
            randn_tensor((1, *self.latent_shape), generator=torch.Generator("cpu").manual_seed(seed),
                         device=self.device, dtype=self.dtype)
            for seed in seeds
        ])
        pooled = clip_pooled_embeds(self.parts.text_encoder, self.parts.tokenizer, prompts)
        return start_trajectory(
            self.parts, prompts, self.tokenize(prompts), teacher_embeds, pooled, noise,
            [self.settings.guidance] * len(prompts), self.device, self.dtype,
        )

    @torch.no_grad()
    def images(
        self, trajectory: Trajectory, embeds: torch.Tensor, predictions: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Sample from the start of `trajectory` (left as it is) with `embeds`; `(batch, 3, size, size)` uint8. Each
        step's prediction is appended to `predictions` when it is given."""
        trajectory = copy.copy(trajectory)
        self.objective.follow(trajectory, embeds.to(self.device, self.dtype), predictions=predictions)
        return self.decode(trajectory.latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> `uint8` images, as FluxPipeline's decode, post-processing and PIL conversion."""
        from diffusers.image_processor import VaeImageProcessor

        vae, size = self.parts.vae, self.settings.size
        latents = unpack_latents(latents, size, size, self.parts.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        images = VaeImageProcessor(vae_scale_factor=self.parts.vae_scale_factor * 2).postprocess(decoded, "pt")
        return (images.float() * 255).round().to(torch.uint8).cpu()


def encode(encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """An encoder's embeddings of token ids, called as FluxPipeline calls `text_encoder_2`."""
    from diffusers.utils.torch_utils import get_module_execution_device

    with torch.no_grad():
        return encoder(input_ids.to(get_module_execution_device(encoder)), output_hidden_states=False)[0]


# The key of the teacher's own images in an `ImageStore` (a candidate may be called `teacher`).
REFERENCE = None
# The teacher image cache's format: bump it when an image comes to depend on something its key does not hold.
CACHE_FORMAT = 2
# Values of each tensor that `pipeline_fingerprint` reads.
SAMPLED_VALUES = 1024


class ImageStore:
    """The images of a comparison, as PNG files in a scratch folder (or the teacher cache), so memory holds none.

    Images are filed by encoder name, `REFERENCE` for the teacher's own (a candidate may be called `teacher`). The
    scratch folder is deleted with the store.
    """

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="flux-small-encoder-compare-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        self.paths: dict[tuple[str | None, int, int], Path] = {}
        self._written = 0

    def put(self, encoder: str | None, job: tuple[int, int], image: torch.Tensor | Path) -> Path:
        """Keep `image` (a `(3, height, width)` uint8 tensor, or the path of a PNG) for `(encoder, (prompt, seed))`."""
        if isinstance(image, torch.Tensor):
            path = self.folder / f"{self._written}.png"
            self._written += 1
            to_pil(image).save(path)
            image = path
        self.paths[(encoder, *job)] = Path(image)
        return Path(image)

    def get(self, encoder: str | None, job: tuple[int, int]) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[(encoder, *job)]) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)

    def path(self, encoder: str | None, job: tuple[int, int]) -> Path:
        return self.paths[(encoder, *job)]


class TeacherImageCache:
    """The teacher's images on disk, one PNG per key, so that a new candidate or a re-run never makes them again.

    The key is the pipeline by content (`pipeline_fingerprint`, and its revision when given), the prompt, the seed, the
    generation settings, the dtype and `CACHE_FORMAT`; the file name holds its hash, and the PNG's text chunk the key
    itself. A path or repo id is no part of it: the same folder holding retrained weights, another revision, or the
    same weights under another path are told apart (or found again) by what they hold.

    Args:
        folder: Where the images live (created when the first one is written).
        pipeline: The pipeline's `pipeline_fingerprint`.
        revision: The pipeline's Hub revision, if it was loaded from the Hub with one.
    """

    def __init__(self, folder: str | os.PathLike, pipeline: str, revision: str | None = None):
        self.folder, self.pipeline, self.revision = Path(folder), pipeline, revision

    def key(self, prompt: str, seed: int, settings: GenerationSettings, dtype: torch.dtype) -> dict:
        return {"format": CACHE_FORMAT, "pipeline": self.pipeline, "revision": self.revision, "prompt": prompt,
                "seed": seed, **asdict(settings), "dtype": str(dtype)}

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.folder / f"teacher-{digest}.png"

    def find(self, key: dict) -> Path | None:
        """The cached image of `key`, or `None` when there is none or it cannot be read: a damaged entry (a truncated
        or overwritten PNG) is logged once, naming the file, and is made again and rewritten by the caller."""
        from PIL import Image

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as error:  # what PIL raises for a damaged file
            logger.warning("The teacher image cache entry %s cannot be read (%s): it is made again and replaced.",
                           path, " ".join(str(error).split()) or type(error).__name__)
            return None
        return path

    def save(self, key: dict, image: torch.Tensor) -> Path:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("flux-small-encoder-key", json.dumps(key, sort_keys=True))
        path = self.path(key)
        with atomic_file(path) as staging:
            to_pil(image).save(staging, format="PNG", pnginfo=info)
        return path


def to_pil(image: torch.Tensor):
    """A `(3, height, width)` uint8 tensor as a PIL image."""
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


def pipeline_identity(pipe) -> str:
    """A pipeline's name in reports: its Hub id or folder (not its identity in the cache: `pipeline_fingerprint`)."""
    return str(pipe.name_or_path) if pipe.name_or_path else "an in-memory pipeline"


def pipeline_fingerprint(pipe) -> str | None:
    """What the teacher's images depend on in `pipe`, by content, read from memory (what runs, wherever it came from):
    the configs of its transformer, VAE and text encoders and, for each of their tensors, its name, dtype, shape and
    about `SAMPLED_VALUES` evenly spaced values; its scheduler's config; its tokenizers' vocabularies.

    Weights that were retrained, fine-tuned, fused with a LoRA or quantized change it; an edit confined to values
    between the samples would not, the price of not hashing gigabytes at every run. Its cost is per tensor, not per
    byte: 1.8 ms for a T5-Base-shaped encoder's 112 tensors on one CPU thread, so some 30 ms for FLUX.1's 1,824.

    Returns:
        The hash, or `None` where some weights cannot be read (offloaded to the meta device, or in a tensor type that
        cannot be sampled): the teacher's images are then not cached.
    """
    digest = hashlib.sha256()
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        digest.update(f"{name}:{json.dumps(_plain_config(module), sort_keys=True, default=str)}".encode())
        for key, tensor in sorted(module.state_dict().items() if isinstance(module, nn.Module) else ()):
            if tensor.device.type == "meta":
                return None
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            try:
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // SAMPLED_VALUES)].float().cpu()
            except (RuntimeError, NotImplementedError, TypeError):
                return None
            digest.update(sample.numpy().tobytes())
    digest.update(json.dumps(_plain_config(pipe.scheduler), sort_keys=True, default=str).encode())
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()) if tokenizer is not None else None).encode())
    return digest.hexdigest()


def _plain_config(component) -> dict | None:
    """A component's config without the keys that name where it was loaded from or by which library version."""
    config = getattr(component, "config", None)
    if config is None:
        return None
    config = dict(config) if isinstance(config, dict) else config.to_dict()
    return {key: value for key, value in config.items() if not key.startswith("_") and not key.endswith("_version")}
