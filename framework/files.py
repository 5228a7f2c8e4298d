"""Writing a file so that a kill never leaves half of it: checkpoints, training states, images and curves."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the kernel tells it (Linux: /proc/self/status);
    elsewhere set and put back under a lock. Writer threads (restore's) call this: setting it to 0 even
    briefly would let a file or folder made meanwhile be world-writable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(temporary_path)`, then rename it over `path`: a kill never leaves half a file.

    The file gets the permissions a plain `open` would give it (mkstemp's are owner-only), so the other
    users and nodes of a shared cluster can read checkpoints as they read any other output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a short temporary name: a file name near the 255-byte limit must not fail for its temporary's sake
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
