"""Prompt batches and their trajectories: which prompts, noise and guidance each sample of a step gets.

Everything random is a function of `(seed, position)`: the prompts at a position of the stream, the noise and the
guidance of each prompt. So a resumed run continues bit for bit, and N processes see the prompts and noise that one
process with an N times larger batch would.
"""

from __future__ import annotations

import torch
from torch import nn

from ..private_api import latent_image_ids, pack_latents
from .cache import TeacherCache
from .config import TrainingConfig
from .distill import Trajectory
from .models import FrozenParts, clip_pooled_embeds, tokenize_t5


def micro_batch_positions(
    config: TrainingConfig, group: int, micro: int, process_index: int = 0, num_processes: int = 1
) -> range:
    """The stream positions of micro-batch `micro` of batch `group` on process `process_index`.

    Micro-batches of all processes tile the stream in order, so `num_processes` processes with batch `b` take the
    positions that one process with batch `num_processes * b` takes.
    """
    size = config.train_batch_size
    start = ((group * config.gradient_accumulation_steps + micro) * num_processes + process_index) * size
    return range(start, start + size)


def latent_shape(resolution: int, frozen: FrozenParts) -> tuple[int, int, int]:
    """`(channels, height, width)` of the unpacked latents of a `resolution`-pixel square image, as FluxPipeline."""
    side = 2 * (resolution // (frozen.vae_scale_factor * 2))
    return frozen.transformer.config.in_channels // 4, side, side


class TrajectoryMaker:
    """Builds trajectories at their first timestep: tokens, teacher embeddings, pooled embeddings, noise, guidance.

    Args:
        config: The run's configuration (seed, guidance grid, `max_sequence_length`, `zero_pooled_embeds`).
        frozen: The frozen parts (tokenizers, CLIP, the transformer's config).
        teacher: The teacher T5 encoder, or a `TeacherCache` of its embeddings.
        device: Where the trajectories live.
        dtype: The dtype of the frozen models (embeddings and latents are cast to it).
    """

    def __init__(
        self, config: TrainingConfig, frozen: FrozenParts, teacher: nn.Module | TeacherCache, device, dtype
    ):
        self.config, self.frozen, self.teacher = config, frozen, teacher
        self.device, self.dtype = device, dtype
        self.latent_shape = latent_shape(config.resolution, frozen)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize_t5(self.frozen.tokenizer_2, prompts, self.config.max_sequence_length)

    @torch.no_grad()
    def teacher_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings of token ids, from the cache or in chunks of `train_batch_size`."""
        if isinstance(self.teacher, TeacherCache):
            return self.teacher(input_ids).to(self.device, self.dtype)
        chunks = input_ids.split(self.config.train_batch_size)
        embeds = [self.teacher(chunk.to(self.device), output_hidden_states=False)[0] for chunk in chunks]
        return torch.cat(embeds).to(self.dtype)

    def make_trajectory(
        self,
        prompts: list[str],
        positions: range | list[int],
        *,
        guidance: float | None = None,
        teacher_embeds: torch.Tensor | None = None,
        eval_noise: bool = False,
    ) -> Trajectory:
        """The trajectory of `prompts` at stream `positions`, at its first timestep.

        Args:
            prompts: The prompts.
            positions: Their positions in the stream (or in the held-out set), which fix their noise and guidance.
            guidance: One guidance value for every prompt; default: each drawn from `config.guidance_scales`.
            teacher_embeds: Precomputed teacher embeddings (the evaluation's); default: computed here.
            eval_noise: Draw the held-out evaluation's noise, independent of the training noise.
        """
        cfg, device = self.config, self.device
        input_ids = self.tokenize(prompts)
        if teacher_embeds is None:
            teacher_embeds = self.teacher_embeds(input_ids)
        transformer_config = self.frozen.transformer.config
        if cfg.zero_pooled_embeds:
            pooled = torch.zeros(len(prompts), transformer_config.pooled_projection_dim)
        else:
            pooled = clip_pooled_embeds(self.frozen.text_encoder, self.frozen.tokenizer, prompts)
        noise, scales = [], []
        for position in positions:
            # Each prompt's noise and guidance depend on (seed, position) only.
            generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + position) * 2 + int(eval_noise))
            noise.append(torch.randn(self.latent_shape, generator=generator))
            index = torch.randint(len(cfg.guidance_scales), (1,), generator=generator).item()
            scales.append(cfg.guidance_scales[index] if guidance is None else guidance)
        return start_trajectory(
            self.frozen, prompts, input_ids, teacher_embeds, pooled, torch.stack(noise), scales, device, self.dtype
        )


def start_trajectory(
    frozen: FrozenParts,
    prompts: list[str],
    input_ids: torch.Tensor,
    teacher_embeds: torch.Tensor,
    pooled: torch.Tensor,
    noise: torch.Tensor,
    guidance: list[float],
    device,
    dtype: torch.dtype,
) -> Trajectory:
    """A trajectory at its first timestep, from unpacked noise `(batch, channels, height, width)` (what
    `TrajectoryMaker` and the evaluation's sampler share). `guidance` is ignored by transformers without guidance
    embeddings."""
    batch, channels, height, width = noise.shape
    latents = pack_latents(noise, batch, channels, height, width)
    has_guidance = frozen.transformer.config.guidance_embeds  # FLUX.1-dev's guidance distillation; schnell has none
    return Trajectory(
        prompts=prompts,
        input_ids=input_ids.to(device),
        teacher_embeds=teacher_embeds.to(device, dtype),
        pooled_embeds=pooled.to(device, dtype),
        latents=latents.to(device, dtype),
        latent_ids=latent_image_ids(batch, height // 2, width // 2, device, dtype),
        guidance=torch.tensor(guidance, device=device, dtype=torch.float32) if has_guidance else None,
    )
