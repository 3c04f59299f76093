"""Cache files written whole or not at all."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def whole_or_nothing(path: Path) -> Iterator[Path]:
    """Yield a partial name beside `path` to write to; it becomes `path` only if the block ends
    without an error, and is removed otherwise.

    The caches hold gigabytes written over minutes: a run stopped halfway (a full disk, Ctrl-C)
    must not leave a truncated file under the name the next run reads."""
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
