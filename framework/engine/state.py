"""Periodic training checkpoints that a killed run resumes from exactly.

A stage folder holds two files, written together (`atomic_write_together`: both temporaries, then both
renames, which Ctrl-C and SIGTERM wait for):

- `last.safetensors`: the model checkpoint (`save_checkpoint`: the trainable parts, every component);
- `last.state.pt`: optimiser, scheduler, gradient scaler, RNG states, the step and the data position,
  written with `torch.save` and read with `torch.load(weights_only=True)` (tensors and plain containers).

The state file names the step of the model file it belongs to; a pair whose steps disagree (a SIGKILL or a
power cut between the two renames) is reported instead of resumed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, checkpoint_writer, load_components, read_checkpoint
from ..files import atomic_write_together
from ..model import UniRestore

MODEL_FILE = "last.safetensors"
STATE_FILE = "last.state.pt"
STATE_FORMAT = "unirestore-train/1"


@dataclass
class TrainingState:
    """Everything besides the weights that an exact resume needs."""

    stage: str
    step: int
    total_steps: int
    done: bool = False
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    # Micro-batches drawn so far from each task's dataset (see trainer.TaskStream).
    data_position: dict[str, int] = field(default_factory=dict)
    mlflow_run_id: str = ""


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, Python) in a weights_only-loadable form."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    folder: Path, model: UniRestore, state: TrainingState, extra: dict | None = None
) -> Path:
    """Write `last.safetensors` and `last.state.pt` into `folder`, together; returns the model file."""
    metadata = {"stage": state.stage, "step": state.step, **(extra or {})}
    payload = {"format": STATE_FORMAT, **state.__dict__}
    writes = {
        folder / MODEL_FILE: checkpoint_writer(model, extra=metadata),
        folder / STATE_FILE: lambda temporary: torch.save(payload, temporary),
    }
    return atomic_write_together(writes)[0]


def has_training_state(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def read_training_state(folder: Path) -> TrainingState:
    """The state file of `folder`, with one-line errors for a missing, corrupt or mismatched pair."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no training state {path}; nothing to resume (run without --resume)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (unpickling fails in many ways; each means an unusable file)
        first = str(error).splitlines()[0].split(". ")[0][:160] if str(error) else type(error).__name__
        raise CheckpointError(
            f"training state {path} is corrupt ({first}); its optimiser state is lost, so the stage restarts: "
            f"delete {folder} and run again with --resume"
        ) from None
    if not isinstance(payload, dict) or payload.pop("format", None) != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a unirestore training state; delete it to restart the stage")
    try:
        state = TrainingState(**payload)
    except TypeError as error:
        raise CheckpointError(f"training state {path} has unexpected contents ({error})") from None
    _, metadata = read_checkpoint(folder / MODEL_FILE)
    model_step = metadata["extra"].get("step")
    if model_step != state.step:
        raise CheckpointError(
            f"{folder}: {MODEL_FILE} is at step {model_step} but {STATE_FILE} at step {state.step} "
            "(the run was killed while saving); delete the stage folder to restart the stage"
        )
    return state


def load_training_weights(folder: Path, model: UniRestore) -> None:
    """Load every component of `last.safetensors` into `model` (which already has the same prompts)."""
    tensors, metadata = read_checkpoint(folder / MODEL_FILE)
    load_components(model, tensors, metadata["path"])
