"""Write docs/compatibility.md from the tests marked `@pytest.mark.compat(area, feature)`.

Every row of the table is one such test, with its outcome in this run, so the page claims exactly what the tests
check. Run from the repository root:

    python docs/make_compat_table.py                  # runs the compat tests (about a minute), writes the page
    python docs/make_compat_table.py --collect-only   # lists them without running ("not run" in the table)
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "compatibility.md"

INTRO = """# Compatibility

What works with a pipeline patched by `patch_encoder` / `load_pipeline`. Every row below is a test in `tests/` run on
tiny random models (offline, CPU); the table is written by `docs/make_compat_table.py` from the tests marked
`@pytest.mark.compat`, with each test's outcome in that run. Regenerate it after changing those tests:
`python docs/make_compat_table.py`.
"""

NOTES = """
## Notes

- **Which pipelines.** `PIPELINE_FAMILIES` in `flux_small_encoder/patching.py` maps a pipeline class-name prefix to
  its T5 slot: FLUX.1 (`text_encoder_2`, width `joint_attention_dim`), `FluxPriorRedux` (`text_encoder_2`, width the
  image embedder's `txt_in_features`), Stable Diffusion 3 / 3.5 (`text_encoder_3`, `joint_attention_dim`, 256
  tokens), Chroma (`text_encoder`, `joint_attention_dim`), PixArt-Sigma / Alpha (`text_encoder`, `caption_channels`,
  300 / 120 tokens). A prefix matches whole words only: `Flux2Pipeline` and `Flux2KleinPipeline` (whose text encoder
  is no T5) are refused, not patched. The modular pipelines (`FluxModularPipeline`, ...) are not covered by tests.
- **Width check.** `patch_encoder` refuses a student whose `project_out_dim` differs from the width field above, and
  leaves the pipeline unchanged. The tests also force such a student in and see the stock pipeline fail, so the
  check asks for what the pipeline needs, no more. SD3 concatenates its two CLIPs' embeddings (768 + 1280 = 2048 in
  SD3.5), zero-pads them to the T5 width and stacks them with the T5 tokens, so its transformer's
  `joint_attention_dim` (4096) is the only width the student must match.
- **Attention masks.** Chroma and PixArt pass the tokenizer's mask to the encoder; the student passes it to its T5
  layers, so its embeddings of a prompt do not depend on the padding after it (tested). FLUX and SD3 pass no mask,
  as with T5-XXL.
- **LoRA.** `pipe.load_lora_weights` adapts the transformer and CLIP only, patched or not. LoRA on the student goes
  through `flux_small_encoder.lora` (`load_encoder_lora`, `set_encoder_lora`, `fuse_encoder_lora`,
  `unfuse_encoder_lora`, `unload_encoder_lora`, `save_encoder_lora`) on standard peft adapter folders. FLUX's
  `joint_attention_kwargs={"scale": s}` scales LoRA layers in `text_encoder_2` as well, so it scales a student
  adapter as diffusers scales a T5 one.
- **Kontext.** `FluxKontextPipeline` resizes its input image to a preferred resolution near one megapixel unless
  `_auto_resize=False`, and its output to `max_area`: tiny runs need both (`max_area=32*32`), or they take minutes.
- **All or nothing.** `patch_encoder` loads, checks, casts and places the student before it touches the pipeline: a
  refused student or a failed move (tested with a simulated out-of-memory error) leaves the pipeline as it was and
  still patchable, and a refused student instance keeps its dtype (`tests/test_patching.py`).
- **Offload.** Model CPU offload and group offload are tested with `device="cpu"`: the student gets the pipeline's
  hooks whether offload was enabled before or after patching, the replaced encoder is released, and the image is the
  one without offload. **Sequential CPU offload** enabled before patching is enabled again on the whole pipeline with
  the device it was enabled with, so the student is offloaded like the rest: the test checks the call, the student's
  hooks and its offloaded weights. Running it needs an accelerator: on a CPU accelerate fails moving weights to the
  meta device, for the stock pipeline as for the patched one (the test checks that failure too). On a CUDA machine,
  `test_accelerator_offload` (marked `gpu`, skipped elsewhere) runs model and sequential offload before and after
  patching; it has not been run for this page.
- **torch.compile** of the student runs on CPU (inductor with gcc) and matches eager output; compiling the tiny
  student takes tens of seconds on a 2-core CPU with a cold inductor cache, so that test is marked `slow`.
"""


class _Collector:
    def __init__(self):
        self.rows: dict[str, tuple[str, str]] = {}
        self.outcomes: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            marker = item.get_closest_marker("compat")
            if marker is not None:
                self.rows[item.nodeid] = tuple(marker.args)

    def pytest_runtest_logreport(self, report):
        if report.nodeid not in self.rows:
            return
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped:
            self.outcomes.setdefault(report.nodeid, "skipped")
        elif report.when == "call":
            self.outcomes.setdefault(report.nodeid, "passed")


def build_page(collector: _Collector) -> str:
    versions = ", ".join(f"{name} {version(name)}" for name in ("diffusers", "transformers", "peft", "torch"))
    lines = [INTRO, f"Last generated with {versions}.", ""]
    lines += ["| area | feature | result | test |", "|---|---|---|---|"]
    for nodeid, (area, feature) in sorted(collector.rows.items(), key=lambda row: row[1]):
        outcome = collector.outcomes.get(nodeid, "not run")
        lines.append(f"| {area} | {feature} | {outcome} | `{nodeid}` |")
    return "\n".join(lines) + "\n" + NOTES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect-only", action="store_true", help="list the tests without running them")
    parser.add_argument("--output", type=Path, default=PAGE)
    args = parser.parse_args(argv)

    collector = _Collector()
    options = ["-q", "-m", "compat", "-p", "no:cacheprovider", "--rootdir", str(ROOT), str(ROOT / "tests")]
    code = pytest.main([*options, *(["--collect-only"] if args.collect_only else [])], plugins=[collector])
    if not collector.rows:
        print("no tests marked compat were collected", file=sys.stderr)
        return 1
    args.output.write_text(build_page(collector))
    print(f"wrote {args.output} ({len(collector.rows)} rows)")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
