"""One command that measures the package on one GPU: encoders, patch_encoder, every memory recipe, the trainer step.

    python benchmarks/gpu_suite.py --out results          # one H100 / H200: FLUX.1-dev shapes, bf16, random weights
    python benchmarks/gpu_suite.py --small --out /tmp/s   # the same code at tiny sizes on a CPU (a test runs it)
    python benchmarks/gpu_suite.py --render results/results.json --update-docs docs/benchmarks.md

Each scenario runs in a fresh process, forked from a server that imported torch and diffusers but never touched CUDA,
so each starts clean (allocator, caps, fragmentation) and fast. Components are built directly on the GPU in bf16 from
FLUX.1-dev's configs (`flux_small_encoder/data/flux1-dev.json`); the tokenizers are the tiny ones (the shapes are
what cost time and memory: prompts are padded to 512 T5 tokens).

Scenarios, in the order they run (the suite stops starting new ones past `--budget-s`):

- plan: every recipe's predicted peak, for the student and for T5-XXL (`flux_small_encoder.memory`), at 1024 px.
- encoders: bytes and latency of T5-XXL and of the student, 512 tokens, batch 1 and 16.
- patch: the device memory `patch_encoder` returns on a pipeline that holds T5-XXL on the GPU.
- recipe-ENCODER-RECIPE: a 1024 px generation under each recipe, in a process capped with
  `torch.cuda.set_per_process_memory_fraction` at the smallest of 12, 16 and 24 GiB the recipe is predicted to fit
  (uncapped if none): a run that fits a cap fits every larger one. Peak memory and time per phase; s/image for 20 steps
  is the timed call (`--steps`) plus the median step for the steps it did not run.
- activations-SIDE: the student pipeline resident, uncapped, at 512, 768 and 1024 px, whole and tiled decode: what each
  phase allocates beyond the weights, written as `activations.json` in the shape of the package's table.
- train-SIDE-bBATCH-TEACHER: `DistillationTrainer.training_step` at 512 and 1024 px, batch 1 and 4, with the live
  T5-XXL teacher on the GPU or a teacher cache (no T5-XXL), attention as configured by default (`auto`).

Writes `results.json`, `results.md` (the tables docs/benchmarks.md includes, with device, versions and date) and, on a
GPU, `activations.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import gc
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from gpu_report import (
    CAPS_GIB,
    DOCS_END,
    DOCS_START,
    activation_table,
    load_shipped_table,
    render,
    summarize,
    update_docs,
)

# The checkout's package, whatever is installed: this script measures the code beside it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
SIDES = (512, 768, 1024)


@dataclass(frozen=True)
class Profile:
    """The sizes a run of the suite measures at.

    Args:
        name: `flux` (FLUX.1-dev shapes on a GPU) or `small` (tiny shapes on a CPU, for the test).
        device: Where the models run.
        dtype: Their dtype (`bfloat16` or `float32`).
        tokens: T5 tokens a prompt.
        sides: FLUX image side -> the side generated at this profile (the tiny VAE does not downsample).
        timed_steps: Denoising steps of a timed generation.
        image_steps: Steps an image takes (s/image is for this many).
        train_repeats: Timed training steps.
    """

    name: str
    device: str
    dtype: str
    tokens: int
    sides: dict[int, int]
    timed_steps: int
    image_steps: int = 20
    train_repeats: int = 3


def make_profile(small: bool, steps: int) -> Profile:
    if small:
        return Profile("small", "cpu", "float32", 48, {512: 16, 768: 24, 1024: 32}, min(steps, 2), train_repeats=1)
    return Profile("flux", "cuda", "bfloat16", 512, {side: side for side in SIDES}, steps)


def scenarios(profile: Profile) -> list[dict]:
    """Every scenario, in the order they run: the issue's figures first, the refinements last."""
    from_recipe = [("student", name) for name in ("tiled_decode", "transformer_fp8", "group_offload", "resident")]
    from_recipe += [("t5", name) for name in ("model_cpu_offload", "t5_streamed", "transformer_fp8", "group_offload",
                                              "resident", "tiled_decode")]
    from_recipe += [("student", name) for name in ("t5_streamed", "model_cpu_offload")]
    found = [{"name": "plan", "kind": "plan"}, {"name": "encoders", "kind": "encoders"},
             {"name": "patch", "kind": "patch"}]
    found += [{"name": f"recipe-{encoder}-{recipe}", "kind": "recipe", "encoder": encoder, "recipe": recipe}
              for encoder, recipe in from_recipe]
    found += [{"name": f"train-{side}-b{batch}-{teacher}", "kind": "train", "side": side, "batch": batch,
               "teacher": teacher}
              for side, batch, teacher in ((512, 1, "live"), (512, 1, "cache"), (1024, 1, "cache"),
                                           (1024, 1, "live"), (512, 4, "live"), (512, 4, "cache"),
                                           (1024, 4, "cache"), (1024, 4, "live"))]
    # At 1024 px the student's resident and tiled_decode runs measure the same.
    found += [{"name": f"activations-{side}", "kind": "activations", "side": side} for side in SIDES[:-1]]
    return found


# --- the scenarios, each run in its own process ------------------------------------------------------------------


def run_scenario(profile: Profile, scenario: dict, plan: dict | None) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_grad_enabled(scenario["kind"] == "train")
    result = {"environment": environment(profile), "pid": os.getpid()}
    try:
        result.update(KINDS[scenario["kind"]](profile, scenario, plan))
        result.setdefault("status", "ok")
    except torch.cuda.OutOfMemoryError as error:
        result.update(status="out of memory", error=str(error).splitlines()[0][:300], **memory_now(profile))
    return result


def run_plan(profile: Profile, scenario: dict, plan: dict | None) -> dict:
    from flux_small_encoder.memory import RECIPES, plan_memory

    predictions = {}
    for encoder in ("student", "t5"):
        footprint = footprint_of(profile, encoder)
        predicted = plan_memory(footprint, recipe=RECIPES[0].name, size=1024).predictions
        chosen = {f"{cap}": _choice(footprint, cap) for cap in CAPS_GIB}
        predictions[encoder] = {
            "weights_gib": footprint.resident / GiB, "source": footprint.source, "chosen": chosen,
            "recipes": {p.recipe.name: None if p.peak is None else {
                "peak_gib": p.peak / GiB, "phases_gib": {k: v / GiB for k, v in p.phases.items()}
            } for p in predicted},
        }
    return {"predictions": predictions}


def run_encoders(profile: Profile, scenario: dict, plan: dict | None) -> dict:
    import torch

    found = {}
    for role in ("t5", "student"):
        before = allocated(profile)
        model = build(profile, role)
        vocab = model.config.vocab_size
        entry = {"gib": (allocated(profile) - before) / GiB if profile.device == "cuda" else bytes_of(model) / GiB}
        with torch.inference_mode():
            for batch in (1, 16):
                ids = torch.randint(0, vocab, (batch, profile.tokens), device=profile.device)
                entry[f"batch{batch}_ms"] = 1e3 * fastest(profile, lambda ids=ids, model=model: model(ids), repeats=10)
        found[role] = entry
        del model
        release(profile)
    return {"encoders": found}


def run_patch(profile: Profile, scenario: dict, plan: dict | None) -> dict:
    from flux_small_encoder import patch_encoder

    pipe = build_pipeline(profile, "t5")
    student = build(profile, "student", device="cpu")
    before = allocated(profile)
    start = time.perf_counter()
    patch_encoder(pipe, student)
    synchronize(profile)
    seconds = time.perf_counter() - start
    after = allocated(profile)
    return {"returned_gib": (before - after) / GiB, "student_gib": bytes_of(student) / GiB, "seconds": seconds}


def run_recipe(profile: Profile, scenario: dict, plan: dict | None) -> dict:
    from flux_small_encoder.memory import plan_memory

    pipe = build_pipeline(profile, scenario["encoder"])
    memory_plan = plan_memory(pipe, recipe=scenario["recipe"], size=1024)
    memory_plan.apply(pipe, profile.device)
    cap = cap_for(plan, scenario["encoder"], scenario["recipe"]) if profile.device == "cuda" else None
    weights = settle(profile, cap)
    side = profile.sides[1024]
    found = {
        "cap_gib": cap, "weights_on_device_gib": weights / GiB, "calls": memory_plan.calls(profile.device),
        "predicted_peak_gib": memory_plan.chosen.peak / GiB,
        "predicted_gib": {k: v / GiB for k, v in memory_plan.chosen.phases.items()},
    }
    import torch

    meter = PhaseMeter(pipe, profile)
    try:
        generate(pipe, profile, side, steps=1, meter=meter)  # warm-up: kernels, group offloading's order traced
        meter = PhaseMeter(pipe, profile, replacing=meter)
        generate(pipe, profile, side, profile.timed_steps, meter)
    except torch.cuda.OutOfMemoryError as error:
        return {**found, **memory_now(profile), "status": f"out of memory in the {meter.phase} phase",
                "error": str(error).splitlines()[0][:300]}
    meter.close()
    return {**found, **meter.summary(profile.image_steps)}


def run_activations(profile: Profile, scenario: dict, plan: dict | None) -> dict:
    from flux_small_encoder.memory import plan_memory

    pipe = build_pipeline(profile, "student")
    pipe.to(profile.device)
    weights = settle(profile, None)
    side = profile.sides[scenario["side"]]
    generate(pipe, profile, side, steps=1)
    whole = PhaseMeter(pipe, profile)
    generate(pipe, profile, side, steps=2, meter=whole)
    whole.close()
    plan_memory(pipe, recipe="tiled_decode", size=scenario["side"]).apply(pipe, profile.device)
    in_tiles = PhaseMeter(pipe, profile)
    generate(pipe, profile, side, steps=2, meter=in_tiles)
    in_tiles.close()
    beyond = {phase: None if peak is None else (peak - weights) / GiB for phase, peak in whole.peaks.items()}
    tiled_peak = in_tiles.peaks.get("decode")
    beyond["decode_tiled"] = None if tiled_peak is None else (tiled_peak - weights) / GiB
    return {"weights_on_device_gib": weights / GiB, "activations_gib": beyond}


def run_train(profile: Profile, scenario: dict, plan: dict | None) -> dict:
    import torch

    from flux_small_encoder.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer
    from flux_small_encoder.training import DistillationTrainer, FrozenParts, load_config
    from flux_small_encoder.training.cache import write_teacher_cache
    from flux_small_encoder.training.fingerprint import teacher_identity
    from flux_small_encoder.training.models import tokenize_t5

    folder = Path(tempfile.mkdtemp(prefix="gpu-suite-train-"))
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of {n} red cubes on a wooden board" for n in range(8)) + "\n")
    overrides = [
        f"output_dir={folder / 'run'}", "report_to=none", "num_eval_prompts=0", "validation_prompts=[]",
        "num_inference_steps=20",
        f"train_batch_size={scenario['batch']}", f"max_sequence_length={profile.tokens}",
        f"resolution={profile.sides[scenario['side']]}", f"train_data=[{prompts}]", "lr_scheduler=constant",
        f"mixed_precision={'bf16' if profile.dtype == 'bfloat16' else 'no'}",
    ]
    tokenizer_2 = tiny_t5_tokenizer()
    transformer = build(profile, "transformer")
    teacher = None
    if scenario["teacher"] == "cache":
        config = load_config("tiny", overrides)
        width = transformer.config.joint_attention_dim
        write_teacher_cache(
            folder / "cache", lambda ids: torch.randn(len(ids), ids.shape[1], width),
            lambda texts: tokenize_t5(tokenizer_2, texts, profile.tokens), prompts.read_text().splitlines(),
            teacher=teacher_identity(config), max_sequence_length=profile.tokens, progress=False,
        )
        overrides.append(f"teacher_cache={folder / 'cache'}")
    else:
        teacher = build(profile, "t5")
    config = load_config("tiny", overrides)
    frozen = FrozenParts(transformer, scheduler(profile), build(profile, "text_encoder"), tiny_clip_tokenizer(),
                         tokenizer_2, vae_scale_factor=8 if profile.name == "flux" else 1)
    student = build(profile, "student", dtype="float32")  # the student trains in float32, under autocast
    trainer = DistillationTrainer(config, frozen=frozen, teacher=teacher, student=student)
    trainer.setup()
    reset_peak(profile)
    synchronize(profile)
    start = time.perf_counter()
    trajectory = trainer.make_trajectory(0, 0)  # the teacher's embeddings (live or cached), noise, guidance
    synchronize(profile)
    batch_s = time.perf_counter() - start
    latents = trajectory.latents.clone()

    def step():
        trajectory.latents = latents.clone()  # every repeat trains the same timestep on the same latents
        trainer.training_step([trajectory], 1)

    step()  # warm-up
    step_s = fastest(profile, step, repeats=profile.train_repeats)
    return {
        "step_s": step_s + batch_s / config.steps_per_batch, "training_step_s": step_s, "batch_s": batch_s,
        "attention_backend": config.attention_backend, **memory_now(profile),
    }


KINDS = {"plan": run_plan, "encoders": run_encoders, "patch": run_patch, "recipe": run_recipe,
         "activations": run_activations, "train": run_train}


# --- building and measuring -----------------------------------------------------------------------------------------


def build(profile: Profile, role: str, device: str | None = None, dtype: str | None = None):
    """A component with random weights, built where it runs (a 12 B model initialised on a CPU takes minutes)."""
    import torch

    device, dtype = device or profile.device, getattr(torch, dtype or profile.dtype)
    if profile.name == "small":
        from flux_small_encoder import tiny

        makers = {"transformer": tiny.tiny_flux_transformer, "t5": tiny.tiny_teacher, "student": tiny.tiny_student,
                  "text_encoder": lambda: tiny.tiny_flux_components()["text_encoder"], "vae": tiny.tiny_vae}
        module = makers[role]().to(device)
        return (module if module.dtype == dtype else module.to(dtype)).eval()
    from flux_small_encoder.memory.sizes import build_component, reference_specs

    specs = reference_specs()
    spec = {"t5": specs["components"]["text_encoder_2"], "student": specs["students"]["t5-base-distilled"]}.get(
        role, specs["components"].get(role)
    )
    return build_component(spec, dtype=dtype, device=device)


def scheduler(profile: Profile):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if profile.name == "small":
        return FlowMatchEulerDiscreteScheduler()
    from flux_small_encoder.memory.sizes import reference_specs

    return FlowMatchEulerDiscreteScheduler(**reference_specs()["scheduler"]["config"])


def build_pipeline(profile: Profile, encoder: str):
    from diffusers import FluxPipeline

    from flux_small_encoder.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    pipe = FluxPipeline(
        scheduler=scheduler(profile), text_encoder=build(profile, "text_encoder"), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=build(profile, encoder), tokenizer_2=tiny_t5_tokenizer(),
        transformer=build(profile, "transformer"), vae=build(profile, "vae"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def footprint_of(profile: Profile, encoder: str):
    from flux_small_encoder.memory import folder_footprint, pipeline_footprint

    if profile.name == "flux":
        return folder_footprint(None, "t5-base-distilled" if encoder == "student" else None)
    return pipeline_footprint(build_pipeline(profile, encoder))


def generate(pipe, profile: Profile, side: int, steps: int, meter: PhaseMeter | None = None):
    import torch

    if meter is not None:
        meter.enter("encode")
    return pipe(
        "a photo of a red cube on a wooden board", height=side, width=side, num_inference_steps=steps,
        guidance_scale=3.5, max_sequence_length=profile.tokens, output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
        callback_on_step_end=None if meter is None else meter.step_end,
    ).images


class PhaseMeter:
    """Peak memory and seconds of each phase of a pipeline call (encode, denoise, decode), read at its boundaries:
    forward pre-hooks on the text encoders, the transformer and the VAE's decoder, and the step callback."""

    def __init__(self, pipe, profile: Profile, replacing: PhaseMeter | None = None):
        if replacing is not None:
            replacing.close()
            replacing.remove()
        self.profile, self.phase, self.started = profile, None, 0.0
        self.peaks, self.reserved, self.seconds, self.step_ends = {}, {}, {}, []
        roles = {"text_encoder": "encode", "text_encoder_2": "encode", "transformer": "denoise"}
        self.handles = [getattr(pipe, name).register_forward_pre_hook(lambda *_, p=phase: self.enter(p))
                        for name, phase in roles.items()]
        self.handles.append(pipe.vae.decoder.register_forward_pre_hook(lambda *_: self.enter("decode")))

    def enter(self, phase: str) -> None:
        if phase != self.phase:
            self.close()
            self.phase, self.started = phase, time.perf_counter()

    def close(self) -> None:
        if self.phase is None:
            return
        synchronize(self.profile)
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + time.perf_counter() - self.started
        peak = max_allocated(self.profile)
        if peak is not None:
            import torch

            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
            self.reserved[self.phase] = max(self.reserved.get(self.phase, 0), torch.cuda.max_memory_reserved())
        reset_peak(self.profile)
        self.phase = None

    def step_end(self, pipe, index, timestep, callback_kwargs):
        synchronize(self.profile)
        self.step_ends.append(time.perf_counter())
        return callback_kwargs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def summary(self, image_steps: int) -> dict:
        self.remove()
        steps = [b - a for a, b in zip(self.step_ends, self.step_ends[1:], strict=False)]
        step_s = statistics.median(steps) if steps else self.seconds.get("denoise", 0.0)
        image_s = sum(self.seconds.values()) + (image_steps - len(self.step_ends)) * step_s
        measured = {phase: peak / GiB for phase, peak in self.peaks.items()}
        return {
            "measured_gib": measured, "measured_peak_gib": max(measured.values(), default=None),
            "reserved_peak_gib": max(self.reserved.values(), default=0) / GiB or None,
            "seconds": self.seconds, "step_s": step_s, "steps_timed": len(self.step_ends), "image_s": image_s,
        }


def settle(profile: Profile, cap_gib: float | None) -> int:
    """Free what setup left behind, cap the process's device memory at `cap_gib`, reset the peak; return the bytes
    still allocated (the weights on the device)."""
    import torch

    gc.collect()
    if profile.device != "cuda":
        return 0
    torch.cuda.empty_cache()
    if cap_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_gib * GiB / total)
    reset_peak(profile)
    return torch.cuda.memory_allocated()


def cap_for(plan: dict | None, encoder: str, recipe: str) -> float | None:
    """The smallest cap the recipe is predicted to fit (with the table's allocator headroom), else `None`."""
    from flux_small_encoder.memory import ActivationTable

    headroom = ActivationTable.load().headroom
    predicted = (plan or {}).get("predictions", {}).get(encoder, {}).get("recipes", {}).get(recipe)
    if predicted is None:
        return None
    return next((cap for cap in CAPS_GIB if predicted["peak_gib"] <= cap * (1 - headroom)), None)


def _choice(footprint, cap: int) -> str | None:
    from flux_small_encoder.memory import MemoryBudgetError, plan_memory

    try:
        return plan_memory(footprint, cap, size=1024).recipe.name
    except MemoryBudgetError:
        return None


def fastest(profile: Profile, fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        synchronize(profile)
        start = time.perf_counter()
        fn()
        synchronize(profile)
        times.append(time.perf_counter() - start)
    return min(times)


def synchronize(profile: Profile) -> None:
    if profile.device == "cuda":
        import torch

        torch.cuda.synchronize()


def allocated(profile: Profile) -> int:
    import torch

    return torch.cuda.memory_allocated() if profile.device == "cuda" else 0


def max_allocated(profile: Profile) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if profile.device == "cuda" else None


def reset_peak(profile: Profile) -> None:
    if profile.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def release(profile: Profile) -> None:
    gc.collect()
    if profile.device == "cuda":
        import torch

        torch.cuda.empty_cache()


def memory_now(profile: Profile) -> dict:
    import torch

    if profile.device != "cuda":
        return {"peak_gib": None}
    return {"peak_gib": torch.cuda.max_memory_allocated() / GiB,
            "reserved_peak_gib": torch.cuda.max_memory_reserved() / GiB}


def bytes_of(module) -> int:
    from flux_small_encoder.memory import module_footprint

    return module_footprint(module).resident


def environment(profile: Profile) -> dict:
    import diffusers
    import torch
    import transformers

    found = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
             "python": platform.python_version(), "profile": profile.name}
    if profile.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        found.update(device=properties.name, device_memory_gib=properties.total_memory / GiB,
                     cuda=torch.version.cuda)
    else:
        found.update(device=f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    return found


# --- the runner: one fresh process per scenario ---------------------------------------------------------------------


def _child(profile: Profile, scenario: dict, plan: dict | None, connection) -> None:
    try:
        connection.send(run_scenario(profile, scenario, plan))
    except BaseException as error:  # anything else is reported, not lost with the process
        connection.send({"status": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
                                   if str(error) else f"failed: {type(error).__name__}",
                         "traceback": traceback.format_exc()[-3000:]})
    finally:
        connection.close()


# Imported once by the server the scenarios fork from (none of them initialises CUDA).
PRELOAD = [
    "torch", "diffusers", "transformers", "diffusers.pipelines.flux.pipeline_flux",
    "diffusers.models.transformers.transformer_flux", "diffusers.models.autoencoders.autoencoder_kl",
    "transformers.models.t5.modeling_t5", "transformers.models.clip.modeling_clip", "flux_small_encoder.memory",
    "flux_small_encoder.modeling", "flux_small_encoder.tiny", "flux_small_encoder.training.trainer",
]


def run_all(profile: Profile, selected: list[dict], budget_s: float, timeout_s: float, start_method: str,
            progress=lambda results: None) -> list[dict]:
    """Run each scenario in a fresh process, in order, until `budget_s` has passed; `progress(results)` after each."""
    # CUDA must never be initialised in the server the scenarios fork from; NVML answers `is_available()` instead.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    start, results, plan = time.perf_counter(), [], None
    for scenario in selected:
        left = budget_s - (time.perf_counter() - start)
        if left <= 0:
            results.append({**scenario, "status": f"skipped: past the suite's {budget_s:.0f} s budget"})
            continue
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(profile, scenario, plan, sender))
        began = time.perf_counter()
        process.start()
        sender.close()
        limit = min(timeout_s, left + 30)
        result = {"status": f"timed out after {limit:.0f} s"}
        try:
            if receiver.poll(limit):
                result = receiver.recv()
        except EOFError:
            result = {"status": "crashed"}
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        if result.get("status") == "crashed":
            result["status"] = f"crashed (exit code {process.exitcode})"
        result = {**scenario, **result, "wall_s": time.perf_counter() - began}
        if scenario["kind"] == "plan" and result["status"] == "ok":
            plan = result
        results.append(result)
        progress(results)
        print(f"{scenario['name']:32s} {result['status']:24s} {result['wall_s']:6.1f} s", flush=True)
    return results


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for results.json, results.md and activations.json")
    parser.add_argument("--small", action="store_true", help="tiny sizes on a CPU: the same code, in seconds")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="scenarios to run (shell patterns on names); "
                        "`plan` always runs first")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of a timed generation (default: 4)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no scenario after this many seconds")
    parser.add_argument("--timeout-s", type=float, default=150, help="stop a scenario after this many seconds")
    parser.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                        help="how scenario processes start: forked from a server with torch and diffusers imported "
                        "(fast), or spawned afresh (each imports them again)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="render a results.json, run nothing")
    parser.add_argument("--update-docs", type=Path, metavar="MARKDOWN", help="put the tables into this file, between "
                        f"{DOCS_START} and {DOCS_END}")
    args = parser.parse_args(argv)
    profile = make_profile(args.small, args.steps)
    selected = scenarios(profile)
    if args.only:
        selected = [s for s in selected if s["kind"] == "plan" or any(fnmatch.fnmatch(s["name"], p)
                                                                       for p in args.only)]
    if args.list:
        print("\n".join(s["name"] for s in selected))
        return 0
    if args.render:
        report = json.loads(args.render.read_text())
    else:
        if args.out is None:
            parser.error("--out is required to run the suite")
        if profile.device == "cuda" and not _has_cuda():
            parser.error("no CUDA device here: run on a GPU, or pass --small for the CPU run")
        started = time.perf_counter()
        args.out.mkdir(parents=True, exist_ok=True)

        def make_report(results: list[dict]) -> dict:
            report = {
                "profile": profile.name, "date": datetime.date.today().isoformat(), "commit": git_commit(),
                "environment": next((r["environment"] for r in results if "environment" in r), {}),
                "timed_steps": profile.timed_steps, "image_steps": profile.image_steps, "tokens": profile.tokens,
                "wall_s": time.perf_counter() - started, "results": results, "summary": summarize(results),
            }
            # Rewritten after every scenario: a run stopped from outside still leaves what it measured.
            (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str))
            return report

        results = run_all(profile, selected, args.budget_s, args.timeout_s, args.start_method, make_report)
        report = make_report(results)
        table = activation_table(results, load_shipped_table())
        if table is not None:
            (args.out / "activations.json").write_text(json.dumps(table, indent=2) + "\n")
        print(f"suite done in {report['wall_s']:.0f} s; wrote {args.out}")
    markdown = render(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(markdown)
    if args.update_docs:
        update_docs(args.update_docs, markdown)
    if args.render and not args.update_docs and args.out is None:
        sys.stdout.write(markdown)
    failed = [r for r in report["results"] if r["status"].startswith(("failed", "crashed", "timed out"))]
    return 1 if failed else 0


def _has_cuda() -> bool:
    """Asked in another process: this one must not initialise CUDA before the scenarios fork."""
    completed = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    return completed.stdout.strip() == "True"


if __name__ == "__main__":
    sys.exit(main())
