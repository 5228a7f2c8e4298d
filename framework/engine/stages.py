"""The training stages of SPEC §6. A stage declares what trains and which loss terms apply; the engine
enforces it (`apply_stage`): `requires_grad` is on for exactly the declared parameters, the optimiser holds
only those, and only they can change.

- stage 1: CFRM, Controller, SC-Tuners; L_CFRM + L_Control (`stage1_losses`), data of every task.
- stage 2: the TFA and every task prompt; Σ β_k L_k (`task_losses`, PIR anchor on), one task per batch.
- stage 3: one new task's prompt only; that task's loss and data alone, no PIR anchor.

(Stage 0, pretraining the tiny prior itself, is not a stage of the UniRestore model: see `stage0.py`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import RunConfig
from ..model import UniRestore
from .losses import compiled_decoder_inputs, decoder_inputs, stage1_losses, task_losses


@dataclass(frozen=True)
class Stage:
    """What one stage trains, on which data, with which loss."""

    number: int
    # Folder and checkpoint name in the run folder (`stage1`, `stage2`, `stage3-det`).
    name: str
    # Trainable parameters, as prefixes of `<component>.<parameter>` names (`cfrm`, `prompts.prompts.det`).
    trainable: tuple[str, ...]
    # `stage1` (L_CFRM + L_Control) or `tasks` (the per-task losses of stage 2/3).
    loss: str
    # Tasks whose training data feeds the stage.
    tasks: tuple[str, ...]
    # Add the PIR anchor (L1 of the PIR-prompt output) to anchored tasks' batches.
    anchor: bool
    # The TrainConfig field holding the stage's number of steps.
    steps_field: str
    # DDP must tolerate parameters without a gradient (the prompts of the tasks absent from a batch).
    unused_parameters: bool = False

    def steps(self, config: RunConfig) -> int:
        return int(getattr(config.train, self.steps_field))


def stage1(tasks: Sequence[str]) -> Stage:
    return Stage(
        1, "stage1", ("cfrm", "controller", "sc_tuners"), "stage1", tuple(tasks), False, "stage1_steps"
    )


def stage2(tasks: Sequence[str]) -> Stage:
    return Stage(2, "stage2", ("tfa", "prompts"), "tasks", tuple(tasks), True, "stage2_steps", True)


def stage3(task: str) -> Stage:
    return Stage(3, f"stage3-{task}", (f"prompts.prompts.{task}",), "tasks", (task,), False, "stage3_steps")


def named_parameters(model: UniRestore) -> dict[str, nn.Parameter]:
    """Every parameter of the model's components, as `<component>.<parameter>` (the checkpoint's names)."""
    return {
        f"{component}.{name}": parameter
        for component, module in model.components().items()
        for name, parameter in module.named_parameters()
    }


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def apply_stage(model: UniRestore, stage: Stage) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze exactly the stage's parameters; returns them by name, in order."""
    model.requires_grad_(False)
    parameters = named_parameters(model)
    trainable = {}
    for prefix in stage.trainable:
        found = {name: p for name, p in parameters.items() if _matches(name, prefix)}
        if not found:
            raise ValueError(f"{stage.name} trains '{prefix}' but the model has no such parameters")
        trainable.update(found)
    for parameter in trainable.values():
        parameter.requires_grad_(True)
    model.train(True)  # the prior's modules stay in eval mode (UniRestore.train)
    return trainable


def check_stage(model: UniRestore, stage: Stage) -> None:
    """Fail when anything outside the stage's set would receive gradients (the prior included)."""
    allowed = {
        id(p)
        for name, p in named_parameters(model).items()
        if any(_matches(name, q) for q in stage.trainable)
    }
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in allowed:
            raise RuntimeError(f"{stage.name}: parameter {name} is trainable but not part of the stage")


def _decays(name: str, parameter: nn.Parameter) -> bool:
    """Weight matrices and kernels decay; biases and vectors do not, whatever their shape: a task prompt
    (1, D), a NAFBlock's per-channel scales (1, C, 1, 1) and a norm's weight (C,) are all one-dimensional."""
    return sum(size > 1 for size in parameter.shape) > 1 and not name.endswith(".bias")


def parameter_groups(trainable: Mapping[str, nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and kernels, none on biases and 1-D parameters."""
    decay = [p for name, p in trainable.items() if _decays(name, p)]
    plain = [p for name, p in trainable.items() if not _decays(name, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class StageLoss(nn.Module):
    """The stage's loss as a module: `forward(batch)` returns the named, weighted terms.

    A module so that DistributedDataParallel can wrap it (DDP synchronises gradients of what its forward
    ran). Randomness (timesteps, noise, posterior samples) comes from the global generators, which the
    trainer seeds from (seed, step) before every micro-batch.
    """

    def __init__(self, model: UniRestore, stage: Stage, tasks: Mapping[str, object], config: RunConfig):
        super().__init__()
        self.model = model
        self.stage = stage
        self.tasks = dict(tasks)
        self.train_config = config.train
        self.prior = config.prior
        self.cfrm_level_weights = config.train.cfrm_weights_for(model.num_taps)  # once, not per step
        self.decoder_inputs = compiled_decoder_inputs() if config.train.compile else decoder_inputs

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        config = self.train_config
        if self.stage.loss == "stage1":
            return stage1_losses(
                self.model, batch["hq"], batch["lq"], config.stage1_weights, self.cfrm_level_weights
            )
        task = self.tasks[batch["task"]]
        latents, features = self.decoder_inputs(self.model, batch["hq"], batch["lq"], mode=config.decoder_input)
        beta = config.beta_for(task.name, task.default_beta, self.prior)
        return task_losses(self.model, task, batch, latents, features, beta, anchor=self.stage.anchor)
