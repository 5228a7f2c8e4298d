"""Task plugins, one per file, imported explicitly so that registration never depends on import order."""

from . import cls, det, pir, ret, seg  # noqa: F401
