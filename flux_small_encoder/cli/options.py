"""Options shared by several commands, declared once: same names, same help, same checks everywhere.

Nothing here imports torch at module level: `--help` must stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

PROG = "flux-small-encoder"
TRACEBACK_HELP = "on an error, show the full Python traceback"


def add_command(
    subparsers,
    name: str,
    *,
    help: str,
    examples: list[str],
    run: Callable[[argparse.Namespace], None],
    details: Callable[[], str] | None = None,
) -> argparse.ArgumentParser:
    """Add the subcommand `name`, whose help ends with its examples.

    Args:
        subparsers: What `ArgumentParser.add_subparsers` returned.
        name: The subcommand.
        help: One line for the command list (and the subcommand's own description).
        examples: Argument lines after `flux-small-encoder NAME`, one example each.
        run: The function that runs the command on the parsed arguments.
        details: More help text, computed only when `--help` is asked for (it may import heavier modules).
    """
    epilog = "examples:\n" + "\n".join(f"  {PROG} {name} {example}".rstrip() for example in examples)
    parser = subparsers.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + ".", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter, add_help=details is None,
    )
    if details is not None:
        parser.add_argument("-h", "--help", action=_HelpWithDetails, details=details)
    # Also accepted after the command; SUPPRESS keeps the value given before it.
    parser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=TRACEBACK_HELP)
    parser.set_defaults(func=run)
    return parser


class _HelpWithDetails(argparse.Action):
    """`-h/--help` that appends text computed at that moment to the parser's epilog."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, *, details, help="show this help message and exit"):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.details = details

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = f"{parser.epilog}\n\n{self.details()}"
        parser.print_help()
        parser.exit()


def positive_int(text: str) -> int:
    """An argparse `type`: a whole number above zero."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def guidance_scale(text: str) -> float:
    """An argparse type: a guidance scale, a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of at least 0, got {text}")
    return value


# The largest image side taken: FLUX is trained up to about 2 megapixels (such as 1408x1408), and a side far beyond
# that only runs out of memory after the pipeline has loaded.
MAX_IMAGE_SIDE = 8192
# Seeds from 0 to 2**63 - 1: torch.Generator.manual_seed takes up to 2**64 - 1 and maps negative seeds onto that
# range (-1 is 2**64 - 1), so a seed stays one name for one noise, and an int64 everywhere it is kept.
SEED_LIMIT = 2**63


def image_side(text: str) -> int:
    """An argparse `type`: an image height or width in pixels, a multiple of 16 as FLUX needs (8 for the VAE, 2 for
    packing latents into tokens), FLUX would silently resize any other; and at most `MAX_IMAGE_SIDE`."""
    value = positive_int(text)
    if value % 16:
        lower, upper = value // 16 * 16, (value // 16 + 1) * 16
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise argparse.ArgumentTypeError(f"{text} is not a multiple of 16, which FLUX needs: use {nearest}")
    if value > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(f"{text} px is too large a side: FLUX is trained up to about 2 megapixels "
                                         f"(1024x1024 is typical); use at most {MAX_IMAGE_SIDE}")
    return value


def prompt(text: str) -> str:
    """An argparse `type`: a prompt, refused when the shell passed bytes that are not UTF-8 text (Python keeps them as
    lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(text[error.start]) - 0xDC00 if 0xDC80 <= ord(text[error.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else "a lone surrogate"
        raise argparse.ArgumentTypeError(
            f"the prompt {text!r} is not valid UTF-8 text ({what} at character {error.start}): pass the prompt in "
            "UTF-8 (set the terminal or the file it comes from to UTF-8, or convert it with iconv -t UTF-8)"
        ) from None
    return text


def seed(text: str) -> int:
    """An argparse `type`: a seed, a whole number from 0 to `SEED_LIMIT - 1`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give a seed such as 0") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is out of range: a seed is a whole number from 0 to "
                                         f"{SEED_LIMIT - 1} (2**63 - 1)")
    return value


def seed_list(text: str) -> list[int]:
    """An argparse `type`: comma-separated seeds (`0,1`), each a `seed`, none empty or given twice."""
    parts = [part.strip() for part in text.split(",")]
    if "" in parts:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item: give seeds separated by single commas, such as "
                                         "0,1")
    values = [seed(part) for part in parts]
    if twice := sorted({value for value in values if values.count(value) > 1}):
        raise argparse.ArgumentTypeError(f"{text!r} gives the seed {', '.join(map(str, twice))} more than once: each "
                                         "seed makes the same images again; give each once")
    return values


def memory_budget(text: str) -> float:
    """An argparse `type`: a memory budget as `parse_budget` reads it (`24`, `24GiB`, `16000MiB`), in GiB."""
    from ..messages import parse_budget

    try:
        return parse_budget(text) / 2**30
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).rstrip(".")) from None


def check_offload(offload: bool, device: str) -> None:
    """Refuse `--offload` on the CPU, where there is no accelerator to move each model to: called before any model
    loads, by every command that takes `--offload`."""
    if offload and device == "cpu":
        raise ValueError("--offload moves each model to an accelerator only while it runs, and torch sees none here "
                         "(--device cpu): leave --offload out.")


# --- Hub ------------------------------------------------------------------------------------------------------------


def add_token(parser: argparse.ArgumentParser, purpose: str = "for private or gated repos") -> None:
    """`--token`: a Hub token; huggingface_hub's default (HF_TOKEN or the saved login) when left out."""
    parser.add_argument("--token", help=f"Hub token {purpose} (default: HF_TOKEN or the `hf auth login` token)")


def add_revision(parser: argparse.ArgumentParser, help: str = "branch, tag or commit") -> None:
    """`--revision` of a Hub repository."""
    parser.add_argument("--revision", help=help)


# --- output files ---------------------------------------------------------------------------------------------------


def add_out(parser: argparse.ArgumentParser, *, default: str, help: str) -> None:
    """`--out FILE` and `--overwrite`; `check_out` refuses an existing file unless `--overwrite` is given."""
    parser.add_argument("--out", default=default, help=help)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def check_out(args: argparse.Namespace) -> None:
    """Refuse an image `--out` that cannot be written, or would replace a file without `--overwrite`: called before
    any model loads (by the commands and the examples), so nothing is computed only to be thrown away.

    Args:
        args: The parsed arguments, with `out` (the image file) and `overwrite`.

    Raises:
        FileExistsError: `--out` exists and `--overwrite` is not given.
        FileNotFoundError: its folder does not exist.
        ValueError: it is a folder or a dangling symlink, or PIL writes no image format with its extension.
        PermissionError: its folder cannot be written to.
    """
    out = args.out
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder: give an image file, such as {os.path.join(out, 'image.png')}.")
    if os.path.islink(out) and not os.path.exists(out):
        raise ValueError(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist: remove the link, or "
                         "choose another --out.")
    image_format(out)
    if os.path.lexists(out) and not args.overwrite:
        raise FileExistsError(f"{out} already exists: choose another --out, or pass --overwrite to replace it.")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder of --out {out} does not exist: create {folder} first, or choose "
                                "another --out.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: the folder {folder} is not writable by you; choose another --out.")


def image_format(path: str) -> str:
    """The image format PIL writes for `path`'s extension (`"PNG"` for `cat.png`).

    Raises:
        ValueError: PIL writes no format with that extension (or there is none).
    """
    from PIL import Image

    extension = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format not in Image.SAVE:
        what = f"the extension {extension}" if extension else "no extension"
        raise ValueError(f"--out {path} has {what}, which PIL writes no image format for: end it with .png (or .jpg, "
                         ".webp).")
    return image_format


def save_image(image, args: argparse.Namespace) -> None:
    """Write `image` (a PIL image) to `args.out` atomically: a full disk or a kill leaves no partial image, and
    `--overwrite` replaces the old one only once the new one is complete."""
    from ..atomic import atomic_file

    with atomic_file(args.out, overwrite=args.overwrite) as staging:
        image.save(staging, format=image_format(args.out))


# --- torch settings -------------------------------------------------------------------------------------------------


def add_device(parser: argparse.ArgumentParser) -> None:
    """`--device`; `resolve_device` gives the default."""
    parser.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)")


def resolve_device(device: str | None) -> str:
    """The device to run on: `device` as given, once torch knows it and it is available here, else
    `torch_utils.default_device()`. Called before any model loads.

    Raises:
        ValueError: `device` is not a torch device, or none of its kind (or not that index) is available here.
    """
    import torch

    from ..torch_utils import default_device

    if device is None:
        return default_device()
    fix = "pass --device cpu, or leave --device out"
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device} is not a torch device: write it as cuda, cuda:1, mps or cpu.") from None
    if kind.type == "cpu":
        return device
    # torch.cuda, torch.xpu, ... say whether their devices are here; MPS says so in torch.backends.
    module = getattr(torch, kind.type, None)
    is_available = getattr(torch.backends.mps if kind.type == "mps" else module, "is_available", None)
    if is_available is None or not is_available():
        raise ValueError(f"--device {device}: no {kind.type.upper()} device is available to torch "
                         f"{torch.__version__} here; {fix}.")
    device_count = getattr(module, "device_count", None)
    count = device_count() if device_count is not None else None
    if kind.index is not None and count is not None and kind.index >= count:
        raise ValueError(f"--device {device}: torch sees {count} {kind.type.upper()} device(s) here, numbered from 0; "
                         f"{fix}.")
    return device


def add_dtype(parser: argparse.ArgumentParser, *, choices: tuple[str, ...], default: str | None, help: str) -> None:
    """`--dtype`, a torch dtype by name; `resolve_dtype` turns it into the dtype."""
    parser.add_argument("--dtype", default=default, choices=choices, help=help)


def resolve_dtype(name: str | None):
    """The torch dtype named `name` (`"bfloat16"` -> `torch.bfloat16`), `None` for `None`."""
    import torch

    return None if name is None else getattr(torch, name)


# --- training configs -----------------------------------------------------------------------------------------------


def add_config(parser: argparse.ArgumentParser) -> None:
    """`--config NAME_OR_YAML` and the `key=value` overrides that win over it."""
    parser.add_argument("--config", required=True, help="a shipped config name or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config fields that win over the file")
