"""The `flux-small-encoder` command: one module per command group, and one error boundary around all of them.

Every command runs inside `run_command`: the package's known errors (files missing or not cached, the Hub unreachable,
a bad config, refused input) print as one line, `error: ...`, with exit status 2; anything else prints one line that
names the exception, with exit status 1, and `--traceback` shows where it happened. Command modules import torch,
transformers and diffusers inside their run functions, so `--help`, `--version` and `list` stay fast.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import checkpoints, compare, generate, hub, options, plan, registry, train

COMMAND_GROUPS = (registry, generate, plan, train, compare, hub, checkpoints)
_PACKAGE = __name__.rpartition(".")[0] + "."

EPILOG = """examples:
  flux-small-encoder list
  flux-small-encoder demo --out demo.png
  flux-small-encoder generate "a cat holding a sign that says hello" --model black-forest-labs/FLUX.1-dev \\
      --encoder t5-base-distilled --out cat.png
  flux-small-encoder plan --vram 24 --size 1024
  flux-small-encoder train --config tiny output_dir=/tmp/tiny-run
  flux-small-encoder compare --model black-forest-labs/FLUX.1-dev --encoders teacher,t5-base-distilled --out report/
  flux-small-encoder push runs/s3/final me/my-encoder
  flux-small-encoder info t5-base-distilled

errors print one line and exit with status 2 when they are yours to fix (a missing file, a repo not cached offline,
a bad config or argument), 1 when they are unexpected; add --traceback to any command to see where one happened.
"""

# Errors whose message is written for the user: it names the problem and the fix. OSError covers files missing or in
# the way (FileNotFoundError, FileExistsError, PermissionError), huggingface_hub's "not cached"
# (LocalEntryNotFoundError), offline mode (OfflineModeIsEnabled) and HTTP errors (HfHubHTTPError), a failed launch
# (ChildProcessError) and a full disk; ValueError covers bad configs and refused input (PromptFileError,
# HFValidationError, JSON that does not parse).
KNOWN_ERRORS = (OSError, ValueError)

# Known errors of modules too heavy to import just for this check, looked up only once their module is imported: an
# error cannot come from a module that never ran. The network's (no connection, a timeout) come from huggingface_hub's
# HTTP client: httpx2 from huggingface_hub 2, httpx before.
KNOWN_ERRORS_OF_MODULES = {
    "yaml": "YAMLError",
    "httpx2": "TransportError",
    "httpx": "TransportError",
    "flux_small_encoder.training.trainer": "TrainingDivergedError",
}


def main(argv: list[str] | None = None) -> int:
    """Run the `flux-small-encoder` command line and return its exit status.

    Args:
        argv: The arguments after the program name (default: `sys.argv[1:]`).
    """
    return run_command(build_parser().parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    """The `flux-small-encoder` parser with every command group's subcommands."""
    parser = argparse.ArgumentParser(
        prog="flux-small-encoder",
        description="Small distilled T5 text encoders for FLUX: run, train, share.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--traceback", action="store_true", help=options.TRACEBACK_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command inside the error boundary and return the exit status: 0 done, 1 unexpected error, 2 known
    error (see `is_known_error`), 130 interrupted. With `args.traceback`, errors propagate as Python reports them."""
    if args.traceback:
        return args.func(args) or 0
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if is_known_error(error):
            print(f"error: {_library_prefix(error)}{one_line(error)}", file=sys.stderr)
            return 2
        print(
            f"error: unexpected {type(error).__name__}: {one_line(error)} (run again with --traceback to see where "
            "it happened)",
            file=sys.stderr,
        )
        return 1


def is_known_error(error: BaseException) -> bool:
    """Whether `error` is one of the package's known errors, whose message tells the user what to fix.

    A `TypeError` is known only when the package raised it (an argument check); anywhere else it is a bug.
    """
    known = KNOWN_ERRORS + tuple(
        getattr(sys.modules[module], name) for module, name in KNOWN_ERRORS_OF_MODULES.items() if module in sys.modules
    )
    if isinstance(error, known):
        return True
    return isinstance(error, TypeError) and _raised_by_the_package(error)


def _raised_by_the_package(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is library code of this package (not the CLI's own)."""
    last = error.__traceback__
    if last is None:
        return False
    while last.tb_next is not None:
        last = last.tb_next
    module = last.tb_frame.f_globals.get("__name__", "")
    return module.startswith(_PACKAGE) and not (module == __name__ or module.startswith(f"{__name__}."))


def _library_prefix(error: BaseException) -> str:
    """`"TypeName: "` for an error of another library (`ConnectError: `, `HfHubHTTPError: `): their messages often do
    not say what failed. Python's and the package's own errors need no prefix."""
    module = type(error).__module__
    return "" if module == "builtins" or module.startswith(_PACKAGE) else f"{type(error).__name__}: "


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (libraries' messages often span several), or its type name if empty."""
    return " ".join(str(error).split()) or type(error).__name__
