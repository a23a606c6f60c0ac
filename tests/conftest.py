"""Offline test kit: tiny random FLUX components built once per session, and a seeded Hugging Face cache.

The whole session runs with `HF_HUB_OFFLINE=1` and a private `HF_HOME`, so every load goes through huggingface_hub's
own cache resolution and nothing can reach (or silently come from) the network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# One thread per process, in this session and in the subprocesses it starts: on a machine shared with other busy
# processes, more threads mostly wait for each other (docs/reliability.md has the numbers).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

_HF_HOME = tempfile.mkdtemp(prefix="fse-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from flux_small_encoder import tiny  # noqa: E402

torch.set_num_threads(1)

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "a cat holding a sign that says hello"


def seed_hub_cache(repo_id: str, files: dict[str, Path], revision: str = "main", commit: str = FAKE_COMMIT) -> Path:
    """Lay files into the session's Hub cache the way huggingface_hub does (blobs, a snapshot, a ref)."""
    repo_dir = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for name, source in files.items():
        blob = repo_dir / "blobs" / f"{commit[:8]}-{name.replace('/', '-')}"
        blob.write_bytes(Path(source).read_bytes())
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(os.path.relpath(blob, target.parent))
    return snapshot


# flan-t5-base's config fields that the public checkpoint's config.json carries over (its student started from it).
FLAN_T5_FIELDS = {
    "classifier_dropout": 0.0, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
    "eos_token_id": 1, "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
    "layer_norm_epsilon": 1e-06, "n_positions": 512, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "tie_word_embeddings": False, "use_cache": True,
    "task_specific_params": {
        "summarization": {"early_stopping": True, "length_penalty": 2.0, "max_length": 200, "min_length": 30,
                          "no_repeat_ngram_size": 3, "num_beams": 4, "prefix": "summarize: "},
        "translation_en_to_de": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                                 "prefix": "translate English to German: "},
    },
}


def write_public_layout(student, folder: Path) -> Path:
    """Write `student` as transformers 4.47's `save_pretrained` wrote the public DistillT5 checkpoint.

    Its config.json is flan-t5-base's with the student's dimensions, `model_type: "t5"`, the reference class in
    `architectures`, the projector widths and 4.47's `torch_dtype` / `transformers_version`. Its model.safetensors
    holds the tied input embedding once, as `encoder.shared.weight` (4.47 dropped `encoder.encoder.embed_tokens`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    c = student.config
    config = {
        "architectures": ["T5EncoderWithProjection"], "model_type": "t5", **FLAN_T5_FIELDS,
        "d_ff": c.d_ff, "d_kv": c.d_kv, "d_model": c.d_model, "feed_forward_proj": c.feed_forward_proj,
        "num_decoder_layers": c.num_layers, "num_heads": c.num_heads, "num_layers": c.num_layers,
        "relative_attention_num_buckets": c.relative_attention_num_buckets, "vocab_size": c.vocab_size,
        "project_in_dim": c.project_in_dim, "project_out_dim": c.project_out_dim,
        "torch_dtype": "float32", "transformers_version": "4.47.0",
    }
    (folder / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    state = {key: value.detach().clone().contiguous() for key, value in student.state_dict().items()}
    del state["encoder.encoder.embed_tokens.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# Tiny components, built once per session. Tests never change these: they take deep copies (`make_pipe`,
# `fresh_student`, `build_pipeline`), so one test's patching, offload hooks or LoRA never leak into another.


@pytest.fixture(scope="session")
def flux_components():
    """Tiny FLUX components."""
    return tiny.tiny_flux_components()


@pytest.fixture(scope="session")
def flux_variant_parts():
    """What the other FLUX pipelines add to `flux_components`: transformers for Control / Fill, ControlNets."""
    return {
        "control_transformer": tiny.tiny_flux_transformer(in_channels=8, out_channels=4),
        "fill_transformer": tiny.tiny_flux_transformer(in_channels=12, out_channels=4),
        "controlnet": tiny.tiny_flux_controlnet(),
        "union_controlnet": tiny.tiny_flux_controlnet(num_mode=4),
    }


@pytest.fixture(scope="session")
def redux_components():
    """The image side of a tiny `FluxPriorReduxPipeline` (SigLIP, its processor, the Redux embedder)."""
    return tiny.tiny_redux_components()


@pytest.fixture(scope="session")
def family_components():
    """Tiny components of the other T5-conditioned families, by builder: SD3, Chroma, PixArt (Sigma and Alpha)."""
    return {
        "sd3": tiny.tiny_sd3_components(),
        "chroma": tiny.tiny_chroma_components(),
        "pixart": tiny.tiny_pixart_components(),
    }


@pytest.fixture
def make_pipe(flux_components):
    """A factory of fresh tiny `FluxPipeline`s (deep copies of the session's components)."""
    from diffusers import FluxPipeline

    def make(**overrides):
        return build_pipeline(FluxPipeline, flux_components, **overrides)

    return make


@pytest.fixture(scope="session")
def student():
    return tiny.tiny_student()


@pytest.fixture
def fresh_student(student):
    """A copy of the session's student: patching adopts the instance it is given (casts it, hooks it for offload)."""
    return copy.deepcopy(student)


@pytest.fixture(scope="session")
def public_checkpoint(student, tmp_path_factory) -> Path:
    """The tiny student in the public layout, in a plain folder."""
    return write_public_layout(student, tmp_path_factory.mktemp("public") / "DistillT5")


@pytest.fixture(scope="session")
def seeded_hub(public_checkpoint) -> Path:
    """The public-layout tiny student cached as `LifuWang/DistillT5`, so `"t5-base-distilled"` resolves offline."""
    files = {name: public_checkpoint / name for name in ("config.json", "model.safetensors")}
    return seed_hub_cache("LifuWang/DistillT5", files)


@pytest.fixture(scope="session")
def pipeline_folder(tmp_path_factory, flux_components) -> Path:
    """A tiny FLUX pipeline saved without its T5 encoder, as `load_pipeline` and `generate --model` take it (read
    only: tests that change a pipeline folder save their own)."""
    from diffusers import FluxPipeline

    folder = tmp_path_factory.mktemp("pipeline") / "tiny-flux"
    build_pipeline(FluxPipeline, flux_components).save_pretrained(folder)
    shutil.rmtree(folder / "text_encoder_2")
    return folder


def build_pipeline(pipeline_cls, components: dict, **overrides):
    """A pipeline of `pipeline_cls` (a class or its name in diffusers) from deep copies of `components`; `overrides`
    replace or add components as they are."""
    import diffusers

    if isinstance(pipeline_cls, str):
        pipeline_cls = getattr(diffusers, pipeline_cls)
    return pipeline_cls(**{**copy.deepcopy(components), **overrides})


def run_pipe(pipe, prompt: str | None = PROMPT, **kwargs):
    """A 2-step 32x32 generation with a fixed seed, as a numpy array (`prompt` goes by keyword: Kontext takes `image`
    first)."""
    kwargs = {
        "height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 48, "output_type": "np",
        "generator": torch.Generator("cpu").manual_seed(0), **kwargs,
    }
    return pipe(prompt=prompt, **kwargs).images
