"""Folders of noise photos for the restore and eval tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_photos(folder: Path, sizes: dict[str, tuple[int, int]], seed: int, broken: str | None = None) -> Path:
    """`folder` (made) with one PNG of uniform noise per name, (height, width) each, and with `broken` the name
    of a file with an image suffix that is no image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (height, width) in sizes.items():
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    if broken is not None:
        (folder / broken).write_bytes(b"broken")
    return folder
