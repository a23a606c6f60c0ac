"""Public names that load on first use, so importing a package costs no torch, transformers or diffusers import.

A package lists its public names and the submodule defining each, and takes its module-level `__getattr__` and
`__dir__` (PEP 562) from `lazy_exports`; the first access imports the submodule and keeps the value.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, public: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, whose name `name` lives in its submodule `public[name]`.

    Example:
    ```py
    >>> __getattr__, __dir__ = lazy_exports(__name__, {"DistilledT5EncoderModel": "modeling"})
    ```
    """

    def __getattr__(name: str):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{public[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__
