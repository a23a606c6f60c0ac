"""Write the recipe table of docs/low-vram.md from the memory plans (`flux_small_encoder.memory.plan_memory`).

Each cell is what `flux-small-encoder plan --vram CARD --size SIDE` chooses for FLUX.1-dev in bfloat16, with the
student and with T5-XXL, so the page says exactly what the code does. Run from the repository root after changing the
recipes or the activation table:

    python docs/make_low_vram_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "low-vram.md"
START, END = "<!-- low-vram-table:start -->", "<!-- low-vram-table:end -->"
CARDS_GIB = (8, 12, 16, 24, 48)
SIDES = (512, 768, 1024)


def table() -> str:
    """The Markdown table: one row per card and image side, the chosen recipe and its predicted peak per encoder."""
    from flux_small_encoder.memory import MemoryBudgetError, folder_footprint, plan_memory

    footprints = {"student": folder_footprint(None, "t5-base-distilled"), "T5-XXL": folder_footprint(None)}
    lines = ["| GiB | side | with the student | with T5-XXL |", "|---|---|---|---|"]
    for card in CARDS_GIB:
        for side in SIDES:
            cells = []
            for footprint in footprints.values():
                try:
                    plan = plan_memory(footprint, card, size=side)
                except MemoryBudgetError:
                    cells.append("none fits")
                    continue
                mark = "" if plan.measured else " †"
                cells.append(f"`{plan.recipe.name}` ({plan.chosen.peak / 2**30:.1f}{mark})")
            lines.append(f"| {card} | {side} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def page_with_table(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}{END}{tail}"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    PAGE.write_text(page_with_table(PAGE.read_text()))
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
