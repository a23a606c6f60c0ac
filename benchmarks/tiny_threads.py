"""Wall time of the tiny training run on one CPU thread (what the `tiny` model source sets) against torch's default
thread count, alone and beside a busy process.

Each run is a fresh Python process training `--config tiny` (400 steps) with this checkout's package; the time is
`train()`'s, the interpreter's and the imports' start excluded. Beside it runs nothing, a busy Python loop (one core
taken), or a torch process multiplying matrices on two threads (another training run, a test suite). Each figure is
the fastest of `--repeats` runs: on a shared machine the fastest run is the one least disturbed. The two-thread runs
beside a busy torch process can take minutes each.

    python benchmarks/tiny_threads.py
    python benchmarks/tiny_threads.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One timed run; argv: the thread mode (`one` or `default`), the output folder.
RUN = """
import dataclasses, sys, time
from flux_small_encoder.training import load_config, models, train
if sys.argv[1] == "default":
    models.BUILT_IN_SOURCES["tiny"] = dataclasses.replace(models.BUILT_IN_SOURCES["tiny"], cpu_threads=None)
start = time.perf_counter()
train(load_config("tiny", [f"output_dir={sys.argv[2]}", "report_to=none"]))
print(time.perf_counter() - start)
"""
BUSY = {
    "nothing": None,
    "a busy Python loop": "while True: pass",
    "torch busy on 2 threads": "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True: a @ a",
}


def timed_run(mode: str, env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run([sys.executable, "-c", RUN, mode, str(Path(folder) / "run")], env=env,
                                capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    print(f"{os.cpu_count()} CPUs; fastest of {args.repeats}\n")
    print("| beside it | one thread | torch's default |\n|---|---|---|")
    for name, code in BUSY.items():
        busy = subprocess.Popen([sys.executable, "-c", code], env=env) if code else None
        try:
            times = {mode: min(timed_run(mode, env) for _ in range(args.repeats)) for mode in ("one", "default")}
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        print(f"| {name} | {times['one']:.1f} s | {times['default']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
