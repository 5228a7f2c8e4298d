"""The figures the project writes (metric curves, run comparisons): a grid of panels, saved whole."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .files import atomic_write


def panels(count: int, columns: int, width: float, height: float):
    """(figure, axes): `count` panels of `width` x `height` inches in rows of at most `columns`; the grid's
    unused cells are hidden."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(1, count)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for axis in grid.flat[count:]:
        axis.set_visible(False)
    return figure, list(grid.flat[:count])


def save(figure, path: str | os.PathLike, dpi: int) -> Path:
    """Lay `figure` out, write it as a PNG (never half a file) and free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=dpi, format="png"))
    finally:
        plt.close(figure)
