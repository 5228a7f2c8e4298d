"""Writing a file so that a kill never leaves half of it: checkpoints, training states, images and curves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (one thread): os.umask can only be read by setting it, so reading it while other
# threads write files (restore's writer threads) could leave it at 0 for them, or for good.
_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(temporary_path)`, then rename it over `path`: a kill never leaves half a file.

    The file gets the permissions a plain `open` would give it (mkstemp's are owner-only), so the other
    users and nodes of a shared cluster can read checkpoints as they read any other output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
