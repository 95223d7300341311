"""The one exception every data problem raises, and the search for a dataset's folder.

A missing, truncated or corrupted dataset file ends in a single-line
``DatasetError`` that names the file (or every place looked) and says where the
official files come from; the CLI prints the message and exits with code 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, TypeVar

__all__ = ["DatasetError", "locate"]

Found = TypeVar("Found")


class DatasetError(ValueError):
    """A dataset is missing, laid out wrongly, truncated or corrupted (one-line message)."""


def locate(
    what: str,
    places: Sequence[tuple[Path | None, str]],
    probe: Callable[[Path], Found | None],
    hint: str,
) -> Found:
    """Return ``probe(folder)`` for the first place where it is not None.

    ``places`` are ``(folder, description)`` pairs in search order; a folder of
    None (an unset environment variable) is only reported. Raises one
    DatasetError listing every place looked and ``hint`` (how to get the files).
    """
    for folder, _ in places:
        if folder is not None and folder.is_dir():
            found = probe(folder)
            if found is not None:
                return found
    looked = "; ".join(_describe(folder, desc) for folder, desc in places)
    raise DatasetError(f"{what} not found; looked in: {looked}. {hint}")


def _describe(folder: Path | None, desc: str) -> str:
    if folder is None:
        return desc
    return f"{folder} ({desc})" if desc else str(folder)
