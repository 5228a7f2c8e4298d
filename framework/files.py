"""Writing a file so that a kill never leaves half of it: checkpoints, training states, images and curves."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Mapping
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


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(temporary_path)`, then rename it over `path`: a kill never leaves half a file.

    The file gets the permissions a plain `open` would give it (mkstemp's are owner-only), so the other
    users and nodes of a shared cluster can read checkpoints as they read any other output.
    """
    return atomic_write_together({path: write})[0]


def atomic_write_together(writes: Mapping[str | os.PathLike, Callable[[str], object]]) -> list[Path]:
    """`atomic_write` of files that belong together (a checkpoint and its training state): each `write` fills
    its file's temporary, and only when all are written are they renamed, back to back, with Ctrl-C and
    SIGTERM held until the last rename. An interruption leaves the old files or the new ones, not some of each."""
    targets = [Path(path) for path in writes]
    temporaries: list[str] = []
    try:
        for path, write in zip(targets, writes.values()):
            path.parent.mkdir(parents=True, exist_ok=True)
            # a short temporary name: a file name near the 255-byte limit must not fail for its temporary's sake
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
            os.close(handle)
            temporaries.append(temporary)
            write(temporary)
            os.chmod(temporary, 0o666 & ~_umask())
        with _interruptions_held() if len(targets) > 1 else contextlib.nullcontext():
            for temporary, path in zip(temporaries, targets):
                os.replace(temporary, path)
    finally:
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return targets


@contextlib.contextmanager
def _interruptions_held():
    """Ctrl-C and SIGTERM noted and delivered on leaving, to the handlers they had. Python runs signal handlers
    in the main thread alone, so nothing can interrupt another thread; blocking the signals (pthread_sigmask)
    would not do, as the kernel then hands them to another thread, whose wake-up still interrupts this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        number: signal.signal(number, lambda number, frame: caught.append(number))
        for number in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(number) is not None  # None: a handler set outside Python, which it could not put back
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in caught:
            signal.raise_signal(number)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
