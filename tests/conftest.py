"""Shared fixtures: everything offline, every cache in a per-run temporary folder."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Idle OpenMP threads sleep instead of spinning (set before torch loads): on a small shared CPU, spinning
# threads slow small ops many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import signal

import pytest
import torch


def default_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt, even where this process was started with SIGINT ignored (a background
    job of a shell without job control, nohup): the tests that stop training with a real SIGINT need it. Spawned
    processes inherit an ignored SIGINT too, so they call this first."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


default_ctrl_c()


@pytest.fixture(scope="session", autouse=True)
def unirestore_home(tmp_path_factory):
    """A private cache for the tiny prior and downstream models, shared by the whole run."""
    home = os.environ.get("UNIRESTORE_TEST_HOME") or str(tmp_path_factory.mktemp("unirestore-home"))
    os.environ["UNIRESTORE_HOME"] = home
    return home


@pytest.fixture(scope="session")
def tiny_prior(unirestore_home):
    from unirestore.framework.prior import load_prior

    return load_prior("tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
