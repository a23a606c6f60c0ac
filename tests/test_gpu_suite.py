"""benchmarks/gpu_suite.py: its `--small` run on a CPU (the suite's own code path), and the report it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flux_small_encoder.memory import ActivationTable

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def load_report_module():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_suite(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SUITE), *argv], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_the_small_run_measures_every_kind_of_scenario_each_in_its_own_process(tmp_path):
    only = ["encoders", "patch", "recipe-student-tiled_decode", "recipe-t5-model_cpu_offload", "train-512-b1-cache",
            "activations-512"]
    completed = run_suite("--small", "--out", str(tmp_path), "--only", *only)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["plan", *only]  # the plan runs first: the caps depend on it
    assert all(r["status"] == "ok" for r in results.values()), {n: r["status"] for n, r in results.items()}
    assert len({r["pid"] for r in results.values()}) == len(results)
    # Each kind measured what the report needs.
    predictions = results["plan"]["predictions"]
    assert set(predictions) == {"student", "t5"} and len(predictions["t5"]["recipes"]) == 6
    assert results["encoders"]["encoders"]["t5"]["batch16_ms"] > 0
    recipe = results["recipe-student-tiled_decode"]
    assert recipe["calls"][-1] == "pipe.vae.enable_tiling()" and recipe["steps_timed"] == 2
    assert set(recipe["seconds"]) == {"encode", "denoise", "decode"} and recipe["image_s"] > 0
    assert results["train-512-b1-cache"]["attention_backend"] == "auto"
    markdown = (tmp_path / "results.md").read_text()
    assert "| student | tiled_decode | no cap |" in markdown and "| 512 px, batch 1 | teacher cache |" in markdown
    assert not (tmp_path / "activations.json").exists()  # nothing to write without device memory readings


def test_past_its_time_budget_the_suite_starts_nothing(tmp_path):
    completed = run_suite("--small", "--out", str(tmp_path), "--only", "encoders", "--budget-s", "0")
    assert completed.returncode == 0, completed.stderr
    statuses = [r["status"] for r in json.loads((tmp_path / "results.json").read_text())["results"]]
    assert statuses == ["skipped: past the suite's 0 s budget"] * 2


def gpu_like_results() -> list[dict]:
    env = {"device": "NVIDIA H200", "torch": "2.11.0", "diffusers": "0.42.1", "transformers": "5.24.0",
           "profile": "flux", "device_memory_gib": 139.8}

    def recipe(encoder, name, cap, peak, image_s, weights=22.8, phases=None):
        return {"name": f"recipe-{encoder}-{name}", "kind": "recipe", "encoder": encoder, "recipe": name,
                "status": "ok", "cap_gib": cap, "predicted_peak_gib": peak * 1.02, "measured_peak_gib": peak,
                "measured_gib": phases or {"decode": peak}, "weights_on_device_gib": weights, "image_s": image_s,
                "step_s": image_s / 20, "environment": env}

    chosen = {"24": "tiled_decode", "16": "transformer_fp8", "12": "group_offload"}
    return [
        {"name": "plan", "kind": "plan", "status": "ok", "environment": env,
         "predictions": {"student": {"chosen": chosen}, "t5": {"chosen": {**chosen, "24": "t5_streamed",
                                                                          "16": "group_offload"}}}},
        recipe("student", "tiled_decode", 24, 23.4, 3.7, phases={"decode": 23.4, "denoise": 23.3}),
        recipe("student", "resident", None, 25.2, 3.7, phases={"encode": 22.9, "denoise": 23.3, "decode": 25.2}),
        recipe("t5", "model_cpu_offload", 24, 22.7, 31.3),
        recipe("t5", "t5_streamed", 24, 23.2, 4.4),
        recipe("t5", "resident", None, 33.8, 3.6),  # faster, but it does not fit 24 GiB
        {"name": "activations-512", "kind": "activations", "side": 512, "status": "ok", "environment": env,
         "activations_gib": {"encode": 0.12, "denoise": 0.17, "decode": 0.6, "decode_tiled": 0.6}},
    ]


def test_the_ratios_compare_the_student_at_24_gib_with_t5_xxl_within_24_gib():
    report = load_report_module()
    summary = report.summarize(gpu_like_results())
    assert summary["t5_model_offload_over_student"] == pytest.approx(31.3 / 3.7)
    assert summary["t5_fastest_at_24"] == {"recipe": "t5_streamed", "image_s": 4.4}
    assert summary["t5_fastest_over_student"] == pytest.approx(4.4 / 3.7)
    assert summary["chosen"]["t5"]["24"] == {"recipe": "t5_streamed", "image_s": 4.4}
    assert summary["chosen"]["student"]["16"] == {"recipe": "transformer_fp8", "image_s": None}  # not run
    assert [e["error"] for e in summary["predicted_vs_measured"]] == pytest.approx([0.02] * 5)


def test_the_measured_activation_table_loads_as_the_package_s(tmp_path):
    report = load_report_module()
    table = report.activation_table(gpu_like_results(), report.load_shipped_table())
    path = tmp_path / "activations.json"
    path.write_text(json.dumps(table))
    loaded = ActivationTable.load(path)
    assert {e.status for e in loaded.entries} == {"measured"}
    assert loaded.lookup("decode", 1024).entry.gib == pytest.approx(25.2 - 22.8, abs=1e-3)
    assert loaded.lookup("decode_tiled", 1024).entry.gib == pytest.approx(23.4 - 22.8, abs=1e-3)
    assert loaded.lookup("decode", 512).entry.gib == 0.6 and loaded.lookup("encode", 512).entry.gib == 0.12
    assert [e.size for e in loaded.entries if e.phase == "decode_tiled"] == [1024]  # 512 px is one tile
    assert report.activation_table(gpu_like_results()[:1], report.load_shipped_table()) is None


def test_the_tables_go_between_the_markers_of_the_docs(tmp_path):
    report = load_report_module()
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n{report.DOCS_START}\nto be measured\n{report.DOCS_END}\n\nafter\n")
    report.update_docs(docs, "| a table |\n")
    assert docs.read_text() == f"# Benchmarks\n\n{report.DOCS_START}\n| a table |\n{report.DOCS_END}\n\nafter\n"
    (tmp_path / "other.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- gpu-suite:start -->"):
        report.update_docs(tmp_path / "other.md", "x")
    assert report.DOCS_START in (ROOT / "docs" / "benchmarks.md").read_text()
