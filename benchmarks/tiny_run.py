"""The shipped `tiny` training config end to end, as a user runs it: wall time, steps, and how far the held-out error
falls; also redraws the learning curve (`--plot`, needs matplotlib: `pip install ".[plot]"`).

    python benchmarks/tiny_run.py
    python benchmarks/tiny_run.py --plot docs/tiny-learning-curve.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="also draw the learning curve into this PNG")
    args = parser.parse_args()
    plot = args.plot.resolve() if args.plot else None
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        command = [sys.executable, "-m", "flux_small_encoder.cli", "train", "--config", "tiny", f"output_dir={run}"]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        held_out = [r["eval_error"] for r in records if "eval_error" in r]
        print(f"flux-small-encoder train --config tiny: {len(steps)} steps in {wall:.1f} s wall (imports included), "
              f"{steps[-1]['elapsed_s']:.1f} s of training")
        print(f"held-out error {held_out[0]:.2g} -> {held_out[-1]:.2g}: {held_out[0] / held_out[-1]:.1f}x lower")
        if plot is not None:
            draw = [sys.executable, str(ROOT / "benchmarks" / "plot_metrics.py"), str(run / "metrics.jsonl"),
                    str(plot)]
            subprocess.run(draw, check=True, stdout=subprocess.DEVNULL)
            print(f"learning curve: {plot.relative_to(ROOT) if plot.is_relative_to(ROOT) else plot}")


if __name__ == "__main__":
    main()
