"""Reading errors: the chain of causes an exception carries."""

from __future__ import annotations

from collections.abc import Iterator


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then what caused it (`raise ... from`), or else what it was raised while handling, down the chain.

    Each exception is yielded once: a chain that loops back on itself (an error re-raised while handling its own
    consequence) ends instead of looping forever.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
