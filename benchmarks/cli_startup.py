"""Cold-start wall time of the `flux-small-encoder` command's light paths: `--help`, `--version` and `list`.

Each run is a fresh Python process executing what the console script executes (`from flux_small_encoder.cli import
main; sys.exit(main())`) with this checkout's package, so nothing is imported in advance; `python -c pass` in the same
run is the interpreter's own start-up, the floor. Each figure is the fastest of `--repeats` runs (on a shared
machine the fastest run is the one least disturbed). Goal: every light path under 1 s. `train --help` is shown for
reference: it reads the training config's fields, which imports the training package.

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repeats 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = "import sys; from flux_small_encoder.cli import main; sys.exit(main())"
LIGHT = (["--help"], ["--version"], ["list"])
GOAL_SECONDS = 1.0


def fastest_start(command: list[str], repeats: int) -> float:
    """Fastest wall time of `repeats` fresh runs of `command`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="fresh processes per command; the fastest counts")
    args = parser.parse_args()

    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"{datetime.date.today()}, {machine}: fastest of {args.repeats} fresh processes")
    baseline = fastest_start([sys.executable, "-c", "pass"], args.repeats)
    print(f"{'python -c pass':34s} {baseline:6.3f} s")
    rows = [(argv, True) for argv in LIGHT] + [(["train", "--help"], False)]
    for argv, light in rows:
        seconds = fastest_start([sys.executable, "-c", CONSOLE_SCRIPT, *argv], args.repeats)
        verdict = ("under" if seconds < GOAL_SECONDS else "OVER") + f" the {GOAL_SECONDS:g} s goal" if light else ""
        label = "flux-small-encoder " + " ".join(argv)
        print(f"{label:34s} {seconds:6.3f} s  {seconds / baseline:5.1f}x python  {verdict}".rstrip())


if __name__ == "__main__":
    main()
