"""What `gpu_suite.py` makes of its scenarios' results: the issue's ratios, a measured activation table, Markdown.

Pure functions of the results (no torch), so a `results.json` brought back from a GPU renders anywhere:

    python benchmarks/gpu_suite.py --render results/results.json --update-docs docs/benchmarks.md
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS_START, DOCS_END = "<!-- gpu-suite:start -->", "<!-- gpu-suite:end -->"
CAPS_GIB = (12, 16, 24)
NAMES = {"t5": "T5-XXL", "student": "student"}


def summarize(results: list[dict]) -> dict:
    """The plan's choice under each cap, as measured; the issue's two ratios; predicted against measured peaks."""
    by_name = {r["name"]: r for r in results}
    predictions = by_name.get("plan", {}).get("predictions", {})
    recipes = [r for r in results if r["kind"] == "recipe" and r["status"] == "ok"]
    summary = {
        "predicted_vs_measured": [
            {"name": r["name"], "predicted_gib": r["predicted_peak_gib"], "measured_gib": r["measured_peak_gib"],
             "error": r["predicted_peak_gib"] / r["measured_peak_gib"] - 1}
            for r in recipes if r.get("measured_peak_gib")
        ],
        "chosen": {
            encoder: {cap: _measured(by_name, encoder, recipe) for cap, recipe in found["chosen"].items()}
            for encoder, found in predictions.items()
        },
    }
    student = summary["chosen"].get("student", {}).get("24")
    if student and student.get("image_s"):
        offload = by_name.get("recipe-t5-model_cpu_offload", {})
        if offload.get("status") == "ok":
            summary["t5_model_offload_over_student"] = offload["image_s"] / student["image_s"]
        # T5-XXL's recipes that ran within 24 GiB: under a cap of 24 or less, or uncapped with a peak within it.
        within = [r for r in recipes if r["encoder"] == "t5" and _within(r, 24)]
        if within:
            best = min(within, key=lambda r: r["image_s"])
            summary["t5_fastest_at_24"] = {"recipe": best["recipe"], "image_s": best["image_s"]}
            summary["t5_fastest_over_student"] = best["image_s"] / student["image_s"]
    return summary


def activation_table(results: list[dict], shipped: dict) -> dict | None:
    """The measured activations in the shape of the package's `data/activations.json` (`shipped`), or `None` where
    nothing was measured (no GPU)."""
    measured = [r for r in results if r["kind"] == "activations" and r["status"] == "ok"]
    measured += _activations_at_1024(results)
    measured = [r for r in measured if any(v is not None for v in r["activations_gib"].values())]
    if not measured:
        return None
    env = measured[0]["environment"]
    where = (f"benchmarks/gpu_suite.py on {env['device']}, torch {env['torch']}, diffusers {env['diffusers']}: the "
             "phase's peak less the weights on the device")
    entries, encode = [], []
    for result in measured:
        for phase, gib in result["activations_gib"].items():
            if gib is None or (phase == "decode_tiled" and result["side"] <= 512):
                continue  # a 512 px image is one tile
            entry = {"phase": phase, "size": None if phase == "encode" else result["side"], "gib": round(gib, 3),
                     "status": "measured", "source": where}
            (encode if phase == "encode" else entries).append(entry)
    if encode:
        entries.append(max(encode, key=lambda entry: entry["gib"]))
    return {**shipped, "activations": sorted(entries, key=lambda entry: (entry["phase"], entry["size"] or 0))}


def _activations_at_1024(results: list[dict]) -> list[dict]:
    """What the student's resident and tiled-decode generations at 1024 px allocated beyond their weights."""
    by_name = {r["name"]: r for r in results if r["status"] == "ok" and r.get("measured_gib")}
    resident, tiled = by_name.get("recipe-student-resident"), by_name.get("recipe-student-tiled_decode")
    if resident is None:
        return []
    weights = resident["weights_on_device_gib"]
    found = {phase: peak - weights for phase, peak in resident["measured_gib"].items()}
    if tiled is not None and "decode" in tiled["measured_gib"]:
        found["decode_tiled"] = tiled["measured_gib"]["decode"] - tiled["weights_on_device_gib"]
    return [{"side": 1024, "activations_gib": found, "environment": resident["environment"]}]


def render(report: dict) -> str:
    """The Markdown of a report: the setting, then one table per kind of scenario."""
    results, summary = report["results"], report["summary"]
    by_name = {r["name"]: r for r in results}
    sections = [_setting(report), _encoders(by_name, report["tokens"]), _plans(summary), _recipes(results),
                _ratios(summary), _activations(results), _training(results)]
    missing = [r["name"] for r in results if r["status"] != "ok"]
    if missing:
        sections.append(f"Not measured or not ok: {', '.join(missing)} (see `results.json`).\n")
    return "\n".join(section for section in sections if section)


def update_docs(path: Path, markdown: str) -> None:
    """Replace what lies between the suite's markers in `path` with `markdown`."""
    text = path.read_text()
    if DOCS_START not in text or DOCS_END not in text:
        raise SystemExit(f"{path} has no {DOCS_START} ... {DOCS_END} region to fill.")
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_START}\n{markdown}{DOCS_END}{tail}")


def load_shipped_table() -> dict:
    return json.loads((Path(__file__).parents[1] / "flux_small_encoder" / "data" / "activations.json").read_text())


# --- sections -------------------------------------------------------------------------------------------------------


def _setting(report: dict) -> str:
    env = report["environment"]
    device = env.get("device", "an unknown device")
    if env.get("device_memory_gib"):
        device += f" ({env['device_memory_gib']:.0f} GiB)"
    torch = f"torch {env.get('torch')}" + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
    commit = f", commit {report['commit']}" if report.get("commit") else ""
    return (
        f"Measured by `benchmarks/gpu_suite.py` ({report['profile']} profile) on {device}, {torch}, diffusers "
        f"{env.get('diffusers')}, transformers {env.get('transformers')}, {report['date']}{commit}, in "
        f"{report['wall_s']:.0f} s. Random weights, {report['tokens']} T5 tokens, one image a call; s/image is for "
        f"{report['image_steps']} steps: a timed call of {report['timed_steps']} steps plus its median step for the "
        "others. Each scenario ran in a fresh process.\n"
    )


def _encoders(by_name: dict, tokens: int) -> str:
    lines = []
    encoders = by_name.get("encoders", {}).get("encoders")
    if encoders:
        lines += [f"| encoder | weights | {tokens} tokens, batch 1 | batch 16 |", "|---|---|---|---|"]
        lines += [f"| {NAMES[role]} | {_gib(e['gib'])} | {e['batch1_ms']:.1f} ms | {e['batch16_ms']:.1f} ms |"
                  for role, e in encoders.items()]
        lines.append("")
    patch = by_name.get("patch", {})
    if patch.get("status") == "ok":
        lines.append(f"`patch_encoder` on a pipeline holding T5-XXL on the GPU returned {_gib(patch['returned_gib'])} "
                     f"of device memory net of the student it moved in ({_gib(patch['student_gib'])}), in "
                     f"{patch['seconds']:.2f} s.\n")
    return "\n".join(lines)


def _plans(summary: dict) -> str:
    chosen = summary.get("chosen")
    if not chosen:
        return ""
    lines = ["| cap | " + " | ".join(f"{NAMES[e]}: plan's recipe | s/image" for e in chosen) + " |",
             "|---|" + "---|---|" * len(chosen)]
    for cap in map(str, sorted(CAPS_GIB, reverse=True)):
        cells = []
        for encoder in chosen:
            found = chosen[encoder].get(cap) or {}
            cells += [found.get("recipe") or "none fits", _num(found.get("image_s"))]
        lines.append(f"| {cap} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _recipes(results: list[dict]) -> str:
    rows = [r for r in results if r["kind"] == "recipe"]
    if not rows:
        return ""
    lines = ["| encoder | recipe | run under | predicted peak | measured peak | predicted - measured | s/image | "
             "s/step | fits 24 / 16 / 12 GiB | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = r.get("measured_peak_gib")
        error = f"{r['predicted_peak_gib'] / measured - 1:+.1%}" if r["status"] == "ok" and measured else ""
        fits = " / ".join("yes" if _within(r, cap) else "no" for cap in sorted(CAPS_GIB, reverse=True))
        lines.append(
            f"| {NAMES[r['encoder']]} | {r['recipe']} | {_cap(r.get('cap_gib'))} | {_gib(r.get('predicted_peak_gib'))}"
            f" | {_gib(measured)} | {error} | {_num(r.get('image_s'))} | {_num(r.get('step_s'))} | "
            f"{fits if measured else ''} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def _ratios(summary: dict) -> str:
    student = (summary.get("chosen", {}).get("student") or {}).get("24") or {}
    if not student.get("image_s"):
        return ""
    parts = [f"Under a 24 GiB cap the student pipeline runs {student['recipe']} at {student['image_s']:.2f} s/image."]
    if "t5_model_offload_over_student" in summary:
        parts.append(f"T5-XXL with model CPU offload takes {summary['t5_model_offload_over_student']:.2f}x as long "
                     "(goal: at least 5x).")
    if "t5_fastest_over_student" in summary:
        best = summary["t5_fastest_at_24"]
        parts.append(f"T5-XXL's fastest recipe within 24 GiB, {best['recipe']}, takes "
                     f"{summary['t5_fastest_over_student']:.2f}x as long (goal: above 1x).")
    return " ".join(parts) + "\n"


def _activations(results: list[dict]) -> str:
    rows = [r for r in results if r["kind"] == "activations" and r["status"] == "ok"]
    rows += _activations_at_1024(results)
    if not any(v is not None for r in rows for v in r["activations_gib"].values()):
        return ""
    lines = ["| image side | encode | denoise | decode | decode in 512 px tiles |", "|---|---|---|---|---|"]
    for r in rows:
        a = r["activations_gib"]
        lines.append(f"| {r['side']} px | {_gib(a.get('encode'))} | {_gib(a.get('denoise'))} | {_gib(a.get('decode'))}"
                     f" | {_gib(a.get('decode_tiled'))} |")
    return "Allocated beyond the weights (student pipeline, everything on the GPU):\n\n" + "\n".join(lines) + "\n"


def _training(results: list[dict]) -> str:
    rows = [r for r in results if r["kind"] == "train"]
    if not rows:
        return ""
    lines = ["| training step | teacher | s/step | peak | status |", "|---|---|---|---|---|"]
    for r in rows:
        teacher = "T5-XXL on the GPU" if r["teacher"] == "live" else "teacher cache"
        lines.append(f"| {r['side']} px, batch {r['batch']} | {teacher} | {_num(r.get('step_s'))} | "
                     f"{_gib(r.get('peak_gib'))} | {r['status']} |")
    backend = next((r.get("attention_backend") for r in rows if r.get("attention_backend")), None)
    note = f"Attention: `attention_backend={backend}`. " if backend else ""
    return (f"{note}s/step includes the batch's teacher embeddings (or cache reads) spread over its 20 steps.\n\n"
            + "\n".join(lines) + "\n")


# --- helpers --------------------------------------------------------------------------------------------------------


def _measured(by_name: dict, encoder: str, recipe: str | None) -> dict | None:
    if recipe is None:
        return None
    run = by_name.get(f"recipe-{encoder}-{recipe}", {})
    return {"recipe": recipe, "image_s": run.get("image_s") if run.get("status") == "ok" else None}


def _within(run: dict, cap: int) -> bool:
    """Whether a run shows the recipe fits `cap` GiB: it ran under that cap or a smaller one, or uncapped within it."""
    if run.get("status") != "ok" or run.get("measured_peak_gib") is None:
        return False
    ran_under = run.get("cap_gib")
    return ran_under <= cap if ran_under is not None else run["measured_peak_gib"] <= cap


def _cap(cap) -> str:
    return "no cap" if cap is None else f"{cap} GiB cap"


def _gib(value) -> str:
    return "" if value is None else f"{value:.2f} GiB"


def _num(value) -> str:
    return "" if value is None else f"{value:.3g}"
