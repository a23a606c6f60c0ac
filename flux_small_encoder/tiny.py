"""Tiny random FLUX components, built in code with no download: for the tests, the demo and the `tiny` training run.

Shapes follow diffusers' own `get_dummy_components` for FLUX; the tokenizers are built from a small vocabulary here
instead of being fetched from the Hub.
"""

from __future__ import annotations

import string

import torch

from .configuration import DistilledT5Config
from .modeling import DistilledT5EncoderModel

JOINT_ATTENTION_DIM = 32
T5_VOCAB_SIZE = 320  # above the tiny T5 tokenizer's 237 ids: 3 specials + 134 pieces + 100 sentinels
_WORDS = (
    "a an the of and with on in at that says cat dog sign red blue green yellow cube sphere left right above below "
    "two three four small large photo painting board hello world text holding wooden metal glass"
).split()


def tiny_t5_tokenizer():
    """A T5 (SentencePiece-style Unigram) tokenizer over a few words and single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in _WORDS]
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)


def tiny_clip_tokenizer():
    """A CLIP (byte-level BPE) tokenizer whose vocabulary is the 256 byte symbols, with and without `</w>`."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [f"{s}</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_config(**overrides):
    from transformers import T5Config

    fields = dict(
        vocab_size=T5_VOCAB_SIZE, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )
    return T5Config(**{**fields, **overrides})


def tiny_teacher(seed: int = 0):
    """A tiny random `T5EncoderModel` standing in for T5-XXL (its width is the transformer's joint_attention_dim)."""
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(tiny_t5_config(d_model=JOINT_ATTENTION_DIM, num_layers=3)).eval()


def tiny_student_t5(seed: int = 0):
    """A tiny random `T5EncoderModel` for a student to start from (the `tiny` training config's)."""
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(tiny_t5_config(d_model=32, d_kv=8))


def tiny_student(seed: int = 1, project_out_dim: int = JOINT_ATTENTION_DIM) -> DistilledT5EncoderModel:
    """A tiny random student: a narrower T5 than the teacher plus a projector to `project_out_dim`."""
    torch.manual_seed(seed)
    config = DistilledT5Config(**tiny_t5_config(d_model=16, d_kv=4).to_diff_dict(), project_out_dim=project_out_dim)
    return DistilledT5EncoderModel(config).eval()


def tiny_vae(seed: int = 0, latent_channels: int = 1, flux_style: bool = True):
    """A tiny random `AutoencoderKL` for 32x32 images; `flux_style`: FLUX/SD3's shift and scale, no quant convs."""
    from diffusers import AutoencoderKL

    flux_options = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, **(flux_options if flux_style else {}),
    )


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict:
    """The components of a tiny random `FluxPipeline`, with `tiny_teacher()` as `text_encoder_2`."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    transformer = tiny_flux_transformer(seed, guidance_embeds=guidance_embeds)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=600,
            hidden_act="gelu", projection_dim=32,
        )
    )
    vae = tiny_vae(seed, latent_channels=1)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": tiny_teacher(seed),
        "tokenizer_2": tiny_t5_tokenizer(),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
    }


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A tiny random `FluxPipeline` (32x32 images in a fraction of a second on a CPU)."""
    from diffusers import FluxPipeline

    return FluxPipeline(**tiny_flux_components(seed, guidance_embeds))


# Builders for the compatibility tests and the examples' `--tiny` runs: FLUX variants, ControlNet, Redux, and the other
# T5-conditioned families (Stable Diffusion 3, Chroma, PixArt). A 2-step 32x32 run of each takes well under a second.


def tiny_flux_transformer(
    seed: int = 0, in_channels: int = 4, out_channels: int | None = None, guidance_embeds: bool = True
):
    """A tiny random `FluxTransformer2DModel`; `in_channels=8` serves FluxControl, `12` FluxFill (`out_channels=4`)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT_ATTENTION_DIM,
        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
    ).eval()


def tiny_flux_controlnet(seed: int = 0, num_mode: int | None = None):
    """A tiny random `FluxControlNetModel` for `tiny_flux_transformer()`; `num_mode` makes it a Union ControlNet."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    return FluxControlNetModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=JOINT_ATTENTION_DIM, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True, num_mode=num_mode,
    ).eval()


def tiny_redux_components(seed: int = 0) -> dict:
    """The image-side components of a tiny `FluxPriorReduxPipeline` (SigLIP, its processor, the Redux embedder)."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    image_encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1, image_size=32,
            patch_size=8,
        )
    )
    torch.manual_seed(seed)
    embedder = ReduxImageEncoder(redux_dim=16, txt_in_features=JOINT_ATTENTION_DIM)
    processor = SiglipImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    return {"image_encoder": image_encoder.eval(), "feature_extractor": processor, "image_embedder": embedder.eval()}


def tiny_sd3_components(seed: int = 0) -> dict:
    """The components of a tiny random `StableDiffusion3Pipeline`, with `tiny_teacher()` as `text_encoder_3`.

    The two CLIPs are 8 wide each: SD3 pads their concatenation (16) with zeros up to the T5 width (32).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=JOINT_ATTENTION_DIM, pooled_projection_dim=16, out_channels=4,
    )
    clip_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=2, num_hidden_layers=1, vocab_size=600, hidden_act="gelu", projection_dim=8,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    vae = tiny_vae(seed, latent_channels=4)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer_2": tiny_clip_tokenizer(),
        "text_encoder_3": tiny_teacher(seed),
        "tokenizer_3": tiny_t5_tokenizer(),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
    }


def tiny_chroma_components(seed: int = 0) -> dict:
    """The components of a tiny random `ChromaPipeline`, with `tiny_teacher()` as `text_encoder`."""
    from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=JOINT_ATTENTION_DIM, axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
        approximator_layers=1, approximator_num_channels=16,
    )
    vae = tiny_vae(seed, latent_channels=1)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": tiny_teacher(seed),
        "tokenizer": tiny_t5_tokenizer(),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
    }


def tiny_pixart_components(seed: int = 0) -> dict:
    """The components of a tiny random PixArt pipeline (`PixArtSigmaPipeline` or `PixArtAlphaPipeline`)."""
    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=JOINT_ATTENTION_DIM, in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    vae = tiny_vae(seed, latent_channels=4, flux_style=False)
    return {
        "scheduler": DDIMScheduler(),
        "text_encoder": tiny_teacher(seed),
        "tokenizer": tiny_t5_tokenizer(),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
    }
