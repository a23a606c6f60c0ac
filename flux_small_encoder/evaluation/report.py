"""The report of a comparison, a folder that opens offline: `index.html` (relative links only, no script), the data
(`results.json`), every image, a difference heat map per candidate image, and a grid PNG per candidate.

    index.html                       summary tables, then every prompt (worst first): teacher | candidate | heat map
    results.json                     `ComparisonResults.to_json()`, each record with the paths of its images
    images/ENCODER/pNNNN-sSEED.png   the images (`images/teacher/` the teacher's)
    heatmaps/ENCODER/pNNNN-sSEED.png |teacher - candidate|, averaged over RGB: black 0, white >= HEATMAP_FULL_SCALE
    grids/ENCODER.png                the worst GRID_ROWS images of an encoder: teacher | candidate | heat map
"""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_folder
from .generation import REFERENCE
from .metrics import METRIC_LABELS, RANKING_METRIC

if TYPE_CHECKING:
    from .results import ComparisonResults

# What a report folder holds: name -> whether it is a folder. `--overwrite` replaces a folder holding nothing else.
REPORT_ENTRIES = {"index.html": False, "results.json": False, "images": True, "heatmaps": True, "grids": True}
# The keys by which a results.json is known to be a comparison's.
RESULTS_KEYS = {"model", "settings", "seeds", "encoders", "summary", "records"}
TEMPLATE = "report.html"
# The difference that reads white in a heat map (on [0, 1] pixels): fixed, so maps compare across candidates.
HEATMAP_FULL_SCALE = 0.25
GRID_ROWS = 8
GRID_CELL = 256
# black -> red -> yellow -> white
_HEAT_STOPS = np.array([0.0, 0.33, 0.66, 1.0])
_HEAT_COLORS = np.array([[0, 0, 0], [200, 30, 20], [250, 210, 40], [255, 255, 255]], dtype=float)


def write_report(results: ComparisonResults, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the report of `results` into `folder`, atomically: a reader sees no report or the whole one.

    Args:
        results: What `compare_encoders` returned.
        folder: A new or empty folder.
        overwrite: Replace a folder that already holds a report (never one holding anything else).

    Raises:
        FileExistsError: `folder` holds a report and `overwrite` is not set, or holds other files.
    """
    folder = Path(folder)
    check_report_folder(folder, overwrite)
    with atomic_folder(folder, replace=overwrite) as staging:
        records = _write_images(results, staging)
        data = {**results.to_json(), "records": records}
        (staging / "results.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
        (staging / "index.html").write_text(_render(results, data, records), encoding="utf-8")
    return folder


def check_report_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a report (unless `overwrite`) or anything else: checked before any image is made.

    A report is replaced only when the folder holds nothing but a report's own entries (`REPORT_ENTRIES`, the image
    folders holding PNGs only) and its `results.json` is a comparison's: `--overwrite` replaces the whole folder.
    """
    if folder.is_file():
        raise FileExistsError(f"{folder} is a file: give a folder for the report.")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    keep = "choose a new or empty folder for --out, or move what you want to keep out of it (nothing was written)"
    foreign = _foreign_entries(folder)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{folder} holds {shown}, which a report does not: {keep}.")
    if not _is_results_json(folder / "results.json"):
        raise FileExistsError(f"{folder} holds no results.json written by compare, so it is not a report: {keep}.")
    if not overwrite:
        raise FileExistsError(f"{folder} already holds a report: choose another --out, or pass --overwrite to "
                              "replace it.")


def _foreign_entries(folder: Path) -> list[str]:
    """What in `folder` a report does not hold, as paths relative to it."""
    foreign = []
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or path.name not in REPORT_ENTRIES or path.is_dir() != REPORT_ENTRIES[path.name]:
            foreign.append(path.name + ("/" if path.is_dir() else ""))
        elif path.is_dir():
            foreign += [
                inner.relative_to(folder).as_posix() for inner in sorted(path.rglob("*"))
                if inner.is_symlink() or not (inner.is_dir() or inner.suffix == ".png")
            ]
    return foreign


def _is_results_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and RESULTS_KEYS <= set(data)


def heatmap(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The difference heat map of two `(height, width, 3)` uint8 images, as a uint8 RGB image."""
    difference = np.abs(image.astype(float) - reference.astype(float)).mean(axis=2) / 255
    level = np.clip(difference / HEATMAP_FULL_SCALE, 0, 1)
    channels = [np.interp(level, _HEAT_STOPS, _HEAT_COLORS[:, channel]) for channel in range(3)]
    return np.stack(channels, axis=2).round().astype(np.uint8)


def _write_images(results: ComparisonResults, staging: Path) -> list[dict]:
    """Copy the images in, draw heat maps and grids; returns the records with the paths of their images."""
    from PIL import Image

    store, names = results.images, results.encoder_names
    slugs = _unique_slugs(names)
    for index, seed in {(index, seed) for index in range(len(results.prompts)) for seed in results.seeds}:
        target = staging / _image_path("teacher", index, seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store.path(REFERENCE, (index, seed)), target)
    records = []
    for record in results.records:
        index, seed, name = results.prompt_index(record["prompt"]), record["seed"], record["encoder"]
        image, teacher = (store.get(key, (index, seed)).permute(1, 2, 0).numpy() for key in (name, REFERENCE))
        paths = {
            "image": _image_path(slugs[name], index, seed),
            "teacher_image": _image_path("teacher", index, seed),
            "heatmap": _image_path(slugs[name], index, seed, "heatmaps"),
        }
        for key, array in (("image", image), ("heatmap", heatmap(image, teacher))):
            (staging / paths[key]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(staging / paths[key])
        records.append({**record, **paths})
    for name in names:
        ranked = sorted((r for r in records if r["encoder"] == name), key=lambda r: r[RANKING_METRIC])[:GRID_ROWS]
        if ranked:
            (staging / "grids").mkdir(exist_ok=True)
            _grid(staging, ranked).save(staging / "grids" / f"{slugs[name]}.png")
    return records


def _grid(staging: Path, records: list[dict]):
    """Rows of teacher | candidate | heat map, `GRID_CELL` pixels a cell."""
    from PIL import Image

    grid = Image.new("RGB", (3 * GRID_CELL, len(records) * GRID_CELL), "white")
    for row, record in enumerate(records):
        for column, key in enumerate(("teacher_image", "image", "heatmap")):
            with Image.open(staging / record[key]) as cell:
                grid.paste(cell.convert("RGB").resize((GRID_CELL, GRID_CELL)), (column * GRID_CELL, row * GRID_CELL))
    return grid


def _image_path(encoder_slug: str, index: int, seed: int, kind: str = "images") -> str:
    return f"{kind}/{encoder_slug}/p{index:04d}-s{seed}.png"


def slug(name: str) -> str:
    """A file-name-safe form of an encoder name (`runs/s3/final` -> `runs-s3-final`)."""
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", name).strip("-.") or "encoder"


def _unique_slugs(names: list[str]) -> dict[str, str]:
    slugs, used = {}, {"teacher"}
    for name in names:
        candidate = slug(name) if name != "teacher" else "teacher-candidate"
        base, number = candidate, 2
        while candidate in used:
            candidate, number = f"{base}-{number}", number + 1
        slugs[name] = candidate
        used.add(candidate)
    return slugs


def _render(results: ComparisonResults, data: dict, records: list[dict]) -> str:
    from jinja2 import Environment, select_autoescape

    environment = Environment(autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
    environment.filters["number"] = _number
    template = environment.from_string(
        (resources.files("flux_small_encoder") / "templates" / TEMPLATE).read_text(encoding="utf-8")
    )
    by_job = {(r["encoder"], results.prompt_index(r["prompt"]), r["seed"]): r for r in records}
    prompts = [
        {
            "index": index, "prompt": results.prompts[index],
            "seeds": [
                {"seed": seed, "teacher_image": _image_path("teacher", index, seed),
                 "candidates": [by_job[(name, index, seed)] for name in results.encoder_names]}
                for seed in results.seeds
            ],
        }
        for index in results.prompt_order()
    ]
    shown = [name for name in METRIC_LABELS if name in data["metrics"]]
    grids = {name: f"grids/{encoder_slug}.png" for name, encoder_slug in _unique_slugs(results.encoder_names).items()}
    return template.render(data=data, prompts=prompts, metrics=shown, labels=METRIC_LABELS, grids=grids,
                           cost_rows=_cost_rows(data), full_scale=HEATMAP_FULL_SCALE)


def _cost_rows(data: dict) -> list[dict]:
    """The summary table's cost cells: the teacher (reference) first, then each candidate; `None` where unknown."""

    def scaled(entry: dict, key: str, factor: float) -> float | None:
        return None if entry.get(key) is None else entry[key] * factor

    return [
        {
            "stats": entry["summary"]["metrics"] if entry.get("kind") == "reference"
            else data["summary"][entry["encoder"]]["metrics"],
            "label": f"{entry['encoder']} ({entry.get('kind', 'reference')})",
            "parameters": entry.get("parameters"),
            "megabytes": scaled(entry, "bytes", 1e-6),
            "encode_ms": scaled(entry, "encode_seconds_per_prompt", 1e3),
            "peak_megabytes": scaled(entry, "peak_memory_bytes", 1e-6),
        }
        for entry in [data["reference"], *data["encoders"]]
    ]


def _number(value, digits: int = 4) -> str:
    """Numbers as a report shows them: 4 significant digits, thousands separated."""
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.{digits}g}"
