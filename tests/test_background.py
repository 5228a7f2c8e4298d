"""A job in a second process: its result comes back, its error is re-raised with what it was doing, a
process that dies is reported with its exit code, and cancel stops one still running."""

import operator
import os
import time

import pytest
import torch

from unirestore.framework.background import BackgroundError, BackgroundJob


def test_background_jobs_return_fail_die_and_cancel():
    # Started together: each spawned process imports the package once, in parallel.
    adding = BackgroundJob("adding", operator.add, 2, 3)
    dividing = BackgroundJob("dividing", operator.truediv, 1, 0)
    exiting = BackgroundJob("exiting", os._exit, 3)
    sleeping = BackgroundJob("sleeping", time.sleep, 120)
    assert adding.result() == 5
    with pytest.raises(BackgroundError, match="dividing failed in the background process: ZeroDivisionError"):
        dividing.result()
    with pytest.raises(BackgroundError, match=r"exiting: the background process died \(exit code 3\)"):
        exiting.result()
    assert not sleeping.done()
    start = time.perf_counter()
    sleeping.cancel()
    assert time.perf_counter() - start < 30
    assert not sleeping._process.is_alive()
    adding.cancel()  # a finished job: nothing to stop, no error


def test_a_job_with_threads_takes_them_from_this_process_until_it_ends():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        job = BackgroundJob("counting threads", torch.get_num_threads, threads=1)
        assert torch.get_num_threads() == 1  # the second process works: this one keeps the rest
        assert job.result() == 1  # ... and that one ran with its own
        assert torch.get_num_threads() == 2
        job = BackgroundJob("sleeping", time.sleep, 120, threads=1)
        job.cancel()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
