"""The `flux-small-encoder` command: one module per command group, and one error boundary around all of them.

Every command runs inside `run_command`: the package's known errors (files missing or not cached, the Hub unreachable,
a bad config, refused input) print as one line, `error: ...`, with exit status 2; anything else prints one line that
names the exception, with exit status 1, and `--traceback` shows where it happened. Command modules import torch,
transformers and diffusers inside their run functions, so `--help`, `--version` and `list` stay fast.

Which errors are the user's to fix cannot be told by their type alone: a `ValueError` or `OSError` is most often bad
input or a missing file, but a library (or a bug) raises them too. So the type decides the exit status (2 for
`KNOWN_ERRORS`), and the origin decides the wording: one that the package raised itself, with a message written for
the user, prints as it is; one that came from anywhere else (PIL, json, huggingface_hub, Python) prints on the same
line with where it came from and the `--traceback` hint, so that a package bug never reads as the user's fault alone.
"""

from __future__ import annotations

import argparse
import linecache
import logging
import re
import sys

from .. import __version__
from ..messages import human_size
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

# Errors that are most often the user's to fix; those the package raises name the problem and the fix. OSError covers
# files missing or in the way (FileNotFoundError, FileExistsError, PermissionError), huggingface_hub's "not cached"
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
    hide_torchvision_fallback_notice()
    return run_command(build_parser().parse_args(argv))


class _TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version because torchvision is absent.

    diffusers' FLUX pipelines import `CLIPImageProcessor` and `SiglipImageProcessor` for their optional image inputs
    (IP-Adapter, Redux); without torchvision, transformers 5 prints two lines about it at every command that loads a
    pipeline, although text-to-image never uses them and the PIL versions work. The library itself leaves the notice
    alone: only the command hides it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


def hide_torchvision_fallback_notice() -> None:
    """Install `_TorchvisionFallbackNotice` on the transformers logger that prints it (once per process)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackNotice())


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
        if (message := out_of_memory(error)) is not None:
            print(f"error: {message}", file=sys.stderr)
            return 2
        if is_known_error(error):
            if raised_by_the_package(error):  # a message written for the user, whatever its type
                print(f"error: {one_line(error)}", file=sys.stderr)
            else:
                print(f"error: {_library_prefix(error)}{one_line(error)} (raised in {_origin(error)}; "
                      f"{_TRACEBACK_HINT})", file=sys.stderr)
            return 2
        print(
            f"error: unexpected {type(error).__name__}: {one_line(error)} ({_TRACEBACK_HINT})",
            file=sys.stderr,
        )
        return 1


_TRACEBACK_HINT = "run again with --traceback to see where it happened"


def is_known_error(error: BaseException) -> bool:
    """Whether `error` is one of the known errors, which are most often the user's to fix (exit status 2).

    A `TypeError` is known only when the package raised it (an argument check); anywhere else it is a bug.
    """
    known = KNOWN_ERRORS + tuple(
        getattr(sys.modules[module], name) for module, name in KNOWN_ERRORS_OF_MODULES.items() if module in sys.modules
    )
    if isinstance(error, known):
        return True
    return isinstance(error, TypeError) and raised_by_the_package(error)


_MEMORY_FIX = ("make the images smaller (--height/--width, or --size), use fewer tokens (--max-sequence-length), or "
               "let a memory plan fit the device (--vram GIB, or --offload)")
_SIZE_ASKED = re.compile(r"tried to allocate ([0-9][0-9.]*)\s*(bytes|[KMGT]i?B)\b", re.IGNORECASE)


def out_of_memory(error: BaseException) -> str | None:
    """The one line for `error` if it is running out of memory (torch's `OutOfMemoryError`, or the CPU allocator's
    RuntimeError), with the size asked for and the fix; `None` for any other error.

    torch is looked up only if it is already imported: an error cannot come from a module that never ran.
    """
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    text = one_line(error)
    if not ((oom_type is not None and isinstance(error, oom_type)) or (isinstance(error, RuntimeError) and any(
            phrase in text.lower() for phrase in ("can't allocate memory", "not enough memory")))):
        return None
    asked = _SIZE_ASKED.search(text)
    if asked is None:
        size = ""
    elif asked.group(2).lower() == "bytes":
        size = f" (tried to allocate {human_size(float(asked.group(1)))})"
    else:
        size = f" (tried to allocate {asked.group(1)} {asked.group(2)})"
    return f"out of memory{size}: {_MEMORY_FIX}."


def raised_by_the_package(error: BaseException) -> bool:
    """Whether a `raise` statement of this package raised `error`: its message was written for the user.

    The innermost frame of its traceback must be the package's, on a line that starts a `raise` statement; an error
    that a call inside the package's code raised (`int("x")`, a library's function) is not.
    """
    last = _innermost(error)
    if last is None or not last.tb_frame.f_globals.get("__name__", "").startswith(_PACKAGE):
        return False
    return linecache.getline(last.tb_frame.f_code.co_filename, last.tb_lineno).lstrip().startswith("raise")


def _innermost(error: BaseException):
    last = error.__traceback__
    while last is not None and last.tb_next is not None:
        last = last.tb_next
    return last


def _origin(error: BaseException) -> str:
    """The module whose code raised `error` (`PIL.Image`, `json.decoder`), else the module of its type."""
    last = _innermost(error)
    return (last.tb_frame.f_globals.get("__name__") if last is not None else None) or type(error).__module__


def _library_prefix(error: BaseException) -> str:
    """`"TypeName: "` for an error of another library (`ConnectError: `, `HfHubHTTPError: `): their messages often do
    not say what failed. Python's and the package's own errors need no prefix."""
    module = type(error).__module__
    return "" if module == "builtins" or module.startswith(_PACKAGE) else f"{type(error).__name__}: "


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (libraries' messages often span several), or its type name if empty."""
    return " ".join(str(error).split()) or type(error).__name__
