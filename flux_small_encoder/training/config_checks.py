"""Reading a training config: YAML that refuses a key given twice, and values checked against their type hints.

Each field of `TrainingConfig` (and of `PromptSource`) is checked against its type hint when the config is made, so
a wrong value fails with one line naming the field, the value and what is expected, before anything runs: `int` is a
whole number and never a boolean, `float` a finite number, `list[X]` a list of X, a `Literal` one of its choices.
What YAML reads differently from what was meant is taken as meant where nothing is lost: YAML 1.1 reads `1e-4` and
`1e3` (no dot) as strings, and a whole number written as `1e3` or `2.0` is a whole number.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..paths import not_a_regular_file


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives a key twice; its message says to give each key once."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's `SafeLoader`, refusing a mapping that gives a key twice (`SafeLoader` keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden key by key
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = first_seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader refuses it itself
                    continue
                if first is not key_node:
                    raise DuplicateKeyError(
                        "while constructing a mapping", node.start_mark,
                        f"found the key {key!r} a second time (first on line {first.start_mark.line + 1}): give "
                        "each key once", key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document in `path`, read safely (no `!!python` tags) and refusing duplicate keys.

    Raises:
        ValueError: The file is not valid YAML (or not UTF-8 text); one line naming the file, line and column.
    """
    try:
        with open(path, "rb") as stream:
            return yaml.load(stream, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({error.context})" if error.context else ""
        fix = "" if isinstance(error, DuplicateKeyError) else f"{context}; correct the YAML there"
        raise ValueError(f"{path}{where}: {error.problem}{fix}.") from None
    except yaml.reader.ReaderError as error:  # bytes that are not UTF-8, or a control character ("unicode")
        if error.encoding != "unicode":
            raise ValueError(f"{path}, byte {error.position}: not UTF-8 text ({error.reason}, 0x{error.character:02x})"
                             "; save the config as UTF-8.") from None
        raise ValueError(f"{path}, character {error.position}: a control character ({error.character:#04x}) that "
                         "YAML does not allow; remove it.") from None


def check_output_dir(output_dir: str) -> None:
    """Refuse an `output_dir` that cannot become a folder: it, or the nearest part of it that exists, is no folder."""
    for path in (Path(output_dir), *Path(output_dir).parents):
        if path.is_dir():
            return
        if os.path.lexists(path):
            kind = not_a_regular_file(path) or "a file"
            what = "is" if path == Path(output_dir) else f"is inside {path}, which is"
            raise ValueError(f"output_dir={output_dir} {what} {kind}, not a folder: give a folder (new or one "
                             "of an earlier run) for the run's checkpoints and final/.")


def parse_yaml_value(text: str, where: str) -> Any:
    """One value written in YAML (a `key=value` override's value); `ValueError` naming `where` if it does not parse."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{where}: the value {text!r} is not valid YAML ({problem}).") from None


def check_fields(instance, helps: dict[str, str] | None = None) -> None:
    """Check every field of a dataclass instance against its type hint, in place (see the module docstring).

    Args:
        instance: A dataclass instance (`TrainingConfig`, `PromptSource`).
        helps: Field name -> help text, quoted when a value is not one of a `Literal`'s choices.

    Raises:
        ValueError: One line naming the first field whose value does not fit, the value, and what is expected.
    """
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        help_text = (helps or {}).get(field.name)
        setattr(instance, field.name, check_value(field.name, getattr(instance, field.name), hints[field.name],
                                                  help_text))


def check_value(name: str, value: Any, hint: Any, help_text: str | None = None) -> Any:
    """`value` as the type `hint` declares it (a number read from a string, a path as a string), or `ValueError`.

    Args:
        name: The field's name in messages (`train_data[1].weight` for a nested one).
        value: The value given.
        hint: The field's resolved type hint.
        help_text: The field's help, added to the message when a `Literal` choice is refused.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    refusal = f"{name} must be {describe(hint)}, got {value!r}" + (f" ({help_text})" if help_text else ".")
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        try:
            return check_value(name, value, inner)
        except ValueError:
            raise ValueError(refusal) from None
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        message = f"{name}={value!r} is not one of {', '.join(map(repr, args))}"
        raise ValueError(message + (f" ({help_text})" if help_text else "."))
    if origin is list:
        if value is None:  # `key:` with nothing after it in YAML
            return []
        if not isinstance(value, (list, tuple)):
            raise ValueError(refusal)
        return [check_value(f"{name}[{index}]", item, args[0]) for index, item in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(refusal)
        return value
    if dataclasses.is_dataclass(hint):
        return _dataclass_value(name, value, hint)
    converted = _SCALARS[hint](value)
    if converted is None:
        raise ValueError(refusal)
    return converted


def describe(hint: Any) -> str:
    """What a type hint expects, in words: `list[float]` -> "a list of finite numbers"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args if arg is not type(None)) + " or null"
    if origin is Literal:
        return f"one of {', '.join(map(repr, args))}"
    if origin is list and dataclasses.is_dataclass(args[0]):
        return f"a list whose items are each {describe(args[0])}"
    if origin is list:
        return f"a list of {_PLURALS[args[0]]}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        keys = ", ".join(field.name for field in dataclasses.fields(hint))
        return f"a path or a mapping of {keys}"
    return _WORDS[hint]


def _as_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _as_float(value)  # `1e3` or `2.0`: a whole number, written another way
    return int(number) if number is not None and number.is_integer() else None


def _as_str(value: Any) -> str | None:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return value if isinstance(value, str) else None


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}
_WORDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}
_PLURALS = {int: "whole numbers", float: "finite numbers", str: "strings"}


def _dataclass_value(name: str, value: Any, cls: type) -> Any:
    """A nested dataclass (a `PromptSource`) from an instance, a mapping of its fields, or a path."""
    if isinstance(value, cls):
        return value
    if isinstance(value, (str, Path)):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be {describe(cls)}, got {value!r}.")
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known), key=str)
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}: use {', '.join(known)}.")
    hints = typing.get_type_hints(cls)
    required = [field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING]
    if missing := [key for key in required if key not in value]:
        raise ValueError(f"{name} has no {', '.join(missing)}: give {describe(cls)}, got {value!r}.")
    return cls(**{key: check_value(f"{name}.{key}", item, hints[key]) for key, item in value.items()})
