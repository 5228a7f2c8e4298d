"""Work that runs in a second process while the training process does something else.

On a CPU the tiny preset's small ops leave most of a second core idle (two threads run a stage-1 step
little faster than one), so the built-in downstream models, which stage 1 does not need, train in a spawned
process during stages 0 and 1 instead of before them. The two processes split the torch threads: with both
at full count on two cores, each waits on the other's preempted threads and both run about twice as slow
(BENCHMARKS.md).
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch


class BackgroundError(RuntimeError):
    """The background process failed or died; the message names what it was doing."""


def _child(send, fn: Callable[..., Any], args: tuple, threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = (True, fn(*args))
    except BaseException as error:  # noqa: BLE001 - everything goes back to the parent, which re-raises
        summary = "".join(traceback.format_exception_only(type(error), error)).strip()
        result = (False, summary)
    send.send(result)
    send.close()


class BackgroundJob:
    """`fn(*args)` in a spawned process. `result()` waits for it and raises `BackgroundError` if it failed;
    `cancel()` stops it. `fn` and its arguments must be picklable (a module-level function).

    `threads`: the second process's torch threads; this process runs with the rest of its own (at least
    one) until the job's result is taken or the job is cancelled.
    """

    def __init__(self, what: str, fn: Callable[..., Any], *args: Any, threads: int | None = None):
        self.what = what
        context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads running
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_child, args=(send, fn, args, threads), daemon=True, name=what)
        self._process.start()
        send.close()
        self._own_threads = None
        if threads is not None:
            self._own_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, self._own_threads - threads))

    def _release_threads(self) -> None:
        if self._own_threads is not None:
            torch.set_num_threads(self._own_threads)
            self._own_threads = None

    def done(self) -> bool:
        return self._receive.poll()

    def result(self) -> Any:
        self._release_threads()  # waiting here: the second process is the one still working
        try:
            ok, value = self._receive.recv()
        except EOFError:
            self._process.join()
            raise BackgroundError(
                f"{self.what}: the background process died (exit code {self._process.exitcode}); "
                "run the command again, or prepare it alone first (`unirestore downstream train`)"
            ) from None
        self._process.join()
        if not ok:
            raise BackgroundError(f"{self.what} failed in the background process: {value}")
        return value

    def cancel(self) -> None:
        self._release_threads()
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._receive.close()


def train_builtin_models(specs: Sequence[Any], home: Any) -> dict[str, float]:
    """Train and cache each built-in downstream model of `specs` (on the CPU, as `Task.prepare` does);
    returns the seconds each took. Meant for the background process: no progress bars."""
    from . import downstream

    seconds = {}
    for spec in specs:
        start = time.perf_counter()
        downstream.builtin_model(spec, home=home, force=True, progress=False)
        seconds[spec.name] = round(time.perf_counter() - start, 1)
    return seconds
