"""Image files as every tool reads them (search, tagging, selection maps, captioning).

`find` lists the images of folders and files; `read` loads them, skipping and naming each file
that is not a readable image (a corrupt download, a text file named `.jpg`) so that one bad
file never loses the rest; `report` prints what was skipped, one line per file. An input with
no image at all is a `MissingError` naming it. `load_image` is the one decoder (uint8 RGB).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from e2_jax.errors import DataError, MissingError

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ImageInput = str | os.PathLike | np.ndarray | Any  # Any: a PIL image


def load_image(image: ImageInput) -> np.ndarray:
    """uint8 [H, W, 3] from a path, a PIL image or an array; a missing or unreadable file is
    an error naming it (once)."""
    if isinstance(image, np.ndarray):
        array = image
    else:
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise MissingError(f"no image file {path}")
            try:
                with Image.open(path) as opened:
                    array = np.asarray(opened.convert("RGB"))
            except UnidentifiedImageError:
                raise DataError(f"{path} is not a readable image (not a format PIL can decode)") from None
            except OSError as error:
                reason = " ".join(str(error).replace(repr(str(path)), "").replace(str(path), "").split())
                raise DataError(f"{path} is not a readable image ({reason or type(error).__name__})") from None
        else:
            array = np.asarray(image.convert("RGB"))
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise DataError(f"an image must be uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array[..., :3])


def find(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The image files (by suffix, sorted) under each folder of `inputs`, and each file given
    as it is; none at all is an error naming what was searched."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        elif item.exists():
            found.append(item)
        else:
            raise MissingError(f"no image file or folder {item}")
    if not found:
        raise MissingError(f"no image ({', '.join(SUFFIXES)}) in {', '.join(map(str, items)) or 'the input'}")
    return found


@dataclasses.dataclass
class Read:
    images: list[np.ndarray]
    paths: list[Path]  # of `images`
    skipped: list[str]  # "path is not a readable image (why)", one per file


def read(paths: Sequence[str | os.PathLike]) -> Read:
    """Every readable image of `paths`; the others skipped and named."""
    out = Read([], [], [])
    for path in paths:
        try:
            out.images.append(load_image(path))
            out.paths.append(Path(path))
        except (DataError, MissingError) as error:
            out.skipped.append(str(error))
    return out


def report(summary: str, skipped: Sequence[str], file=None) -> None:
    """`summary` ('tagged 29 images'), how many files were skipped, and one line per file (stderr)."""
    file = file or sys.stderr
    print(summary + (f"; skipped {len(skipped)} unreadable:" if skipped else ""), file=file, flush=True)
    for line in skipped:
        print(f"  skipped {line}", file=file, flush=True)
