"""One lifetime for every object that owns kernel resources: close(), `with`, and GC."""

from __future__ import annotations

import contextlib
from typing import Self


class Closing:
    """Mixin for owners of fds or mappings: a context manager that closes on exit, and
    closes on garbage collection too. Subclasses implement an idempotent `close()`."""

    def close(self) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A constructor that failed half-way leaves attributes unset: nothing to close then.
        with contextlib.suppress(AttributeError):
            self.close()
