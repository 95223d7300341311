"""A validated ``create_dataset`` call, handed to the loader of each dataset family."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .augment import Augment
from .errors import DatasetError

__all__ = ["Request", "SPLITS", "FRAMINGS"]

SPLITS = ("train", "test")
FRAMINGS = ("count", "time")


@dataclass(frozen=True)
class Request:
    """What to build. ``augment``: False, True (the dataset's standard training
    recipe) or a callable used instead; ``T``, ``frames`` concern event data only;
    ``limit`` keeps the class-balanced first N items."""

    name: str
    root: Path | None
    split: str
    T: int | None = None
    frames: str = "count"
    size: int | None = None
    augment: bool | Augment = False
    autoaugment: bool = False
    cutout: int = 0
    limit: int | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DatasetError(f"{self.name}: split must be one of {SPLITS}, got {self.split!r}")
        if self.frames not in FRAMINGS:
            raise DatasetError(f"{self.name}: frames must be one of {FRAMINGS}, got {self.frames!r}")
        for key in ("T", "size", "limit"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DatasetError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if not isinstance(self.cutout, int) or self.cutout < 0:
            raise DatasetError(f"{self.name}: cutout must be a non-negative integer, got {self.cutout!r}")
        if not isinstance(self.augment, bool) and not callable(self.augment):
            raise DatasetError(f"{self.name}: augment must be true, false or a callable, got {self.augment!r}")
        if (self.autoaugment or self.cutout) and self.augment is not True:
            raise DatasetError(f"{self.name}: autoaugment and cutout extend the standard recipe: "
                               "they need augment=True")

    def places(self) -> list[tuple[Path | None, str]]:
        """Where to look: ``root`` if given, else ``.data/<name>`` under the current directory."""
        if self.root is not None:
            return [(self.root, "root")]
        return [(Path.cwd() / ".data" / self.name, "default place, root not set")]

    def recipe(self, standard: Callable[[], Augment]) -> Augment | None:
        """The training augmentation: the given callable, ``standard()`` when True, else None."""
        if callable(self.augment):
            return self.augment
        return standard() if self.augment else None
