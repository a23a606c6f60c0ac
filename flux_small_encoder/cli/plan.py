"""`plan`: which memory recipe fits a GPU, for the distilled student and for T5-XXL side by side."""

from __future__ import annotations

import argparse
import textwrap

from . import options

WIDTH = 44


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "plan", help="show the fastest memory recipe that fits a GPU, with the student and with T5-XXL",
        examples=["--vram 24 --size 1024", "--vram 16 --size 768 --all", "--vram 12 --model path/to/FLUX.1-dev"],
        run=run_plan,
    )
    add_vram(parser, required=True)
    parser.add_argument("--size", type=options.positive_int, default=1024,
                        help="image side in pixels, the larger of height and width (default: 1024)")
    parser.add_argument("--model", help="pipeline folder or Hub repo id to size (only its JSON files are read); "
                        "default: FLUX.1-dev's configs, shipped with the package")
    parser.add_argument("--encoder", default="t5-base-distilled", help="the distilled encoder: registry name, "
                        "folder or repo id (only its config.json is read)")
    options.add_dtype(parser, choices=("bfloat16", "float16", "float32"), default="bfloat16",
                      help="dtype the pipeline runs in")
    parser.add_argument("--all", action="store_true", help="also list every recipe's predicted peak")


def add_vram(parser: argparse.ArgumentParser, required: bool) -> None:
    """`--vram GIB`: what the pipeline may allocate on the GPU (shared with `generate`), in GiB once parsed."""
    parser.add_argument(
        "--vram", type=options.memory_budget, required=required, metavar="GIB",
        help="GiB the pipeline may allocate on the GPU (a 24 GB card: 24, less what its display and the CUDA "
             "context take); a unit may follow: 24GiB, 16000MiB",
    )


def run_plan(args: argparse.Namespace) -> None:
    from ..memory import MemoryBudgetError, folder_footprint, parse_budget, plan_memory

    parse_budget(args.vram)  # a budget that is no size (inf, nan, 0) is refused before any config is read
    dtype = options.resolve_dtype(args.dtype)
    columns, plans = {}, {}
    for label, encoder in (("student: " + str(args.encoder), args.encoder), ("T5-XXL: the pipeline's own", None)):
        footprint = folder_footprint(args.model, encoder, dtype=dtype)
        try:
            plans[label] = plan_memory(footprint, args.vram, size=args.size)
        except MemoryBudgetError as error:
            plans[label] = error
    if all(isinstance(plan, MemoryBudgetError) for plan in plans.values()):
        raise min(plans.values(), key=lambda error: error.smallest)
    for label, plan in plans.items():
        columns[label] = _column(plan)

    first = next(plan for plan in plans.values() if not isinstance(plan, MemoryBudgetError))
    print(f"memory plan for {args.size}x{args.size} px in {args.dtype}: {args.vram:g} GiB, of which "
          f"{first.usable / 2**30:.2f} GiB are planned ({first.table.headroom:.0%} kept for the allocator)")
    print("sizes:\n" + "\n".join(f"  {label.split(':')[0]}: {plan.footprint.source}" for label, plan in plans.items()
                                  if not isinstance(plan, MemoryBudgetError)) + "\n")
    rows = ["", "recipe", "predicted peak", "time class"]
    cells = {label: [label, *column[:3]] for label, column in columns.items()}
    for index, row in enumerate(rows):
        wrapped = [textwrap.wrap(cells[label][index], WIDTH) or [""] for label in columns]
        for line in range(max(map(len, wrapped))):
            parts = [cell[line] if line < len(cell) else "" for cell in wrapped]
            print(f"{row if line == 0 else '':16s}" + "".join(f"{part:{WIDTH + 2}s}" for part in parts).rstrip())
    for label, plan in plans.items():
        if not isinstance(plan, MemoryBudgetError):
            print(f"\n{label.split(':')[0]} calls:\n" + "\n".join(f"  {call}" for call in plan.calls()))
    for label, plan in plans.items():
        if not isinstance(plan, MemoryBudgetError) and not plan.measured:
            entry = plan.peak_activation.entry
            print(f"\n{label.split(':')[0]}: the peak's {entry.phase} figure at {args.size} px is estimated, not yet "
                  f"measured on a GPU ({entry.source})")
    if args.all:
        print(f"\n{'every recipe':22s}" + "".join(f"{label.split(':')[0]:>12s}" for label in plans))
        fitting = [plan for plan in plans.values() if not isinstance(plan, MemoryBudgetError)][0]
        for index, prediction in enumerate(fitting.predictions):
            peaks = [_peak_of(plan, index) for plan in plans.values()]
            print(f"{prediction.recipe.name:22s}" + "".join(f"{peak:>12s}" for peak in peaks))


def _column(plan) -> list[str]:
    from ..memory import RECIPES, MemoryBudgetError

    if isinstance(plan, MemoryBudgetError):
        return ["none fits", f"needs at least {plan.smallest / 2**30:.1f} GiB", ""]
    rank = [recipe.name for recipe in RECIPES].index(plan.recipe.name) + 1
    return [plan.recipe.name, f"{plan.chosen.peak / 2**30:.2f} GiB",
            f"{rank} of {len(RECIPES)}: {plan.recipe.time_class}"]


def _peak_of(plan, index: int) -> str:
    from ..memory import MemoryBudgetError

    if isinstance(plan, MemoryBudgetError):
        return "-"
    peak = plan.predictions[index].peak
    return "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"
