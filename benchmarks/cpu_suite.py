"""Every CPU benchmark of the package in one run, written into docs/benchmarks.md: the single source of the figures the
README and the other docs quote.

Each benchmark runs in a fresh process, one after another (never two at once), on one thread (`OMP_NUM_THREADS=1`,
as the package's tiny work and tests run; `tiny_threads.py` sets its own), and its output is kept verbatim. With
`--update-docs`, the output goes into docs/benchmarks.md between `<!-- cpu-suite:start -->` and `<!-- cpu-suite:end
-->`, each benchmark's part between `<!-- cpu-suite:NAME -->` and `<!-- /cpu-suite:NAME -->`; the same-named regions
in README.md and docs/*.md are rewritten from it, so a figure the docs quote can only come from this run
(`tests/test_docs.py` checks they agree).

    python benchmarks/cpu_suite.py                       # print only (about 15 minutes on 2 cores)
    python benchmarks/cpu_suite.py --update-docs         # and write the docs
    python benchmarks/cpu_suite.py --only convert cli_startup --update-docs
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE = DOCS / "benchmarks.md"
START, END = "<!-- cpu-suite:start -->", "<!-- cpu-suite:end -->"


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...] = ()
    what: str = ""


BENCHMARKS = (
    Benchmark("encoder", "encoder.py", (), "the T5-Base student against a T5-XXL-shaped encoder, float32"),
    Benchmark("train_step", "train_step.py", ("--repeats", "10"),
              "one optimizer step of the trainer against the reference-shaped loop and the floor"),
    Benchmark("tiny_run", "tiny_run.py", ("--plot", "docs/tiny-learning-curve.png"),
              "the shipped `tiny` config end to end, and its learning curve"),
    Benchmark("convert", "convert.py", (), "info and conversions of a T5-Base-shaped checkpoint (494 MB)"),
    Benchmark("cli_startup", "cli_startup.py", (), "cold start of the command's light paths"),
    Benchmark("compare", "compare.py", (), "what the fidelity metrics and report add per 1024x1024 image pair"),
    Benchmark("tiny_threads", "tiny_threads.py", ("--repeats", "2"),
              "the tiny run on one thread against torch's default, alone and beside a busy process"),
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = ", ".join(f"{name} {version(name)}" for name in ("torch", "diffusers", "transformers"))
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, {versions}"


def run(benchmark: Benchmark) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / benchmark.script), *benchmark.args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{benchmark.script} failed (exit status {result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout.strip(), time.perf_counter() - start


def region(benchmark: Benchmark, output: str, date: str) -> str:
    """The part of the page for one benchmark: what it measures, its command, its output, verbatim."""
    command = " ".join(["python", f"benchmarks/{benchmark.script}", *benchmark.args])
    return (
        f"<!-- cpu-suite:{benchmark.name} -->\n"
        f"`{command}` ({benchmark.what}; run of {date}, one thread):\n\n```\n{output}\n```\n"
        f"<!-- /cpu-suite:{benchmark.name} -->"
    )


def regions(text: str) -> dict[str, str]:
    """The `cpu-suite:NAME` regions of a Markdown text, by name."""
    pattern = re.compile(r"<!-- cpu-suite:([\w-]+) -->.*?<!-- /cpu-suite:\1 -->", re.DOTALL)
    return {match.group(1): match.group(0) for match in pattern.finditer(text)}


def copy_regions(source: dict[str, str], text: str) -> str:
    """`text` with each of its `cpu-suite:NAME` regions replaced by the same-named one of `source`."""
    pattern = re.compile(r"<!-- cpu-suite:([\w-]+) -->.*?<!-- /cpu-suite:\1 -->", re.DOTALL)
    return pattern.sub(lambda match: source.get(match.group(1), match.group(0)), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], help="run only these")
    parser.add_argument("--update-docs", action="store_true", help="write docs/benchmarks.md and the quoting docs")
    args = parser.parse_args()
    date = datetime.date.today().isoformat()
    page = PAGE.read_text()
    if START not in page or END not in page:
        raise SystemExit(f"{PAGE} has no {START} ... {END} region to write into.")
    head, rest = page.split(START, 1)
    current, tail = rest.split(END, 1)
    kept = regions(current)
    for benchmark in BENCHMARKS:
        if args.only and benchmark.name not in args.only:
            continue
        print(f"== {benchmark.name}: {benchmark.what}", flush=True)
        output, seconds = run(benchmark)
        print(f"{output}\n({seconds:.0f} s)\n", flush=True)
        kept[benchmark.name] = region(benchmark, output, date)
    if not args.update_docs:
        return
    header = (f"Measured with `python benchmarks/cpu_suite.py --update-docs` on {machine()}; the machine is shared, "
              "so every timing is the fastest of several repeats and the ratios are taken within one run. Each part "
              "says the date of the run that wrote it.")
    body = "\n\n".join(kept[b.name] for b in BENCHMARKS if b.name in kept)
    PAGE.write_text(f"{head}{START}\n{header}\n\n{body}\n{END}{tail}")
    for doc in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        if doc != PAGE and regions(doc.read_text()):
            doc.write_text(copy_regions(kept, doc.read_text()))
            print(f"updated {doc.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
