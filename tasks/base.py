"""The task contract. A task owns its datasets, its frozen downstream model(s), its loss terms and its
metric; the engine owns everything else. One task per file in `tasks/`, registered with
`@register_task`; a third-party package registers its own through the `unirestore.tasks` entry points.

The sample format every dataset yields (see `unirestore.framework.data`):
`hq` (3, H, W) clean in [0, 1]; `lq` (3, H, W) degraded; and, by task, `label` (), `mask` (H, W) with 255
ignored, `boxes` (N, 4) xyxy pixels, `box_labels` (N,) and `box_ignore` (N,) (True: an ignore region, a COCO
crowd or VOC difficult object). A collated batch stacks tensors and keeps `boxes` / `box_labels` / `box_ignore`
as lists. A task's own dataset type may add keys of its own (`edges`, `saliency`): a (..., H, W) tensor of
the image's size is cropped and resized with it (`framework/data/sample.py`); the task lists the keys it reads
in `sample_keys`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class TaskContext:
    """What a task needs to know about the run it is part of."""

    # Per-task dataset entries from a data config (see framework/data/config.py); None means built-in data.
    data: Any = None
    # Training / evaluation crop size in pixels.
    size: int = 64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    # Cache folder for built-in downstream models; None: UNIRESTORE_HOME/downstream
    # (`framework.downstream.downstream_home(home)` resolves it).
    home: Path | None = None
    # Local checkpoints of real downstream models, by model name (e.g. {"resnet50": "/ckpt/r50.pth"}).
    checkpoints: dict[str, str] = field(default_factory=dict)
    # A `DegradationConfig` that replaces the datasets' degradation (evaluation of one corruption alone).
    degradation: Any = None
    # The side a real detector sees the images at (RunConfig.detector_size); None: `size`.
    detector_size: int | None = None


class Evaluator:
    """Accumulates a task's metric over batches: `update(images, batch)`, then `compute()`.

    `update` may also return the batch's per-image values, {metric name: (B,) tensor} (PSNR per image, 1/0
    for a right/wrong class): `unirestore eval` writes them to eval_images.csv. A metric whose per-image
    values need the whole set (a retrieval query's hit needs every other image), or are costly to compute
    per batch (each image's own mAP), gives them from `per_image()` after the last update instead,
    {metric: (N,) tensor} in update order (NaN: not scored); values of both kinds join in one row per image,
    the batch ones first. None from both: no per-image values. The first per-image metric is the one eval's
    summary (on how many images a prompt beat LQ) and its worse-than-LQ grid go by.
    """

    def update(self, images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def per_image(self) -> dict[str, torch.Tensor] | None:
        return None


class Task:
    """Base class of every task. Subclasses set the class attributes and implement the four methods."""

    # Registry name, as used on the command line (`--tasks pir,seg,cls`).
    name: ClassVar[str] = ""
    # Other names the command line accepts for it (`task add detection`); checkpoints and configs keep `name`.
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # Default weights of the task's loss terms (SPEC §6), overridable by config; names become metric keys.
    loss_weights: ClassVar[dict[str, float]] = {}
    # Default β of the task in the stage-2 total (Eq. 5/6).
    default_beta: ClassVar[float] = 1.0
    # Metric names the evaluator returns; the first is the task's primary metric (the sweeps' objective).
    metric_names: ClassVar[tuple[str, ...]] = ()
    # Metrics where lower is better (an error or a distance: "mae", "abs_rel"), among `metric_names` and the
    # per-image values; every other one is higher-better. `runs compare` marks their lowest value best, and
    # `eval` counts and draws an image whose value rose above LQ's as one the restoration made worse.
    lower_is_better: ClassVar[tuple[str, ...]] = ()
    # Add the unweighted L1 between the PIR-prompt output and the clean image for this task's samples.
    anchor_to_pir: ClassVar[bool] = False
    # Dataset type the task trains and evaluates on with built-in data (`builtin_scenes`, `builtin_photos`, or
    # a generated type of the task's own, registered with `register_dataset_type`: it is built with `split`,
    # `size`, `seed` and, if its constructor takes one, `length`, and its samples get `lq` from the degrader;
    # a data config that names it is built-in data too, `_builtin()` True); None: the task has no built-in
    # data, and a run of it needs a data config that lists its datasets.
    builtin_type: ClassVar[str | None] = None
    # Fewest samples per batch the loss needs (a metric loss compares each image with the others).
    min_batch_size: ClassVar[int] = 1
    # Sample keys the losses and the evaluator read: a data config refuses, when it is read, an entry whose
    # dataset type does not give them (see `FileDataset.sample_keys`).
    sample_keys: ClassVar[tuple[str, ...]] = ("hq", "lq")

    def __init__(self, context: TaskContext | None = None, loss_weights: dict[str, float] | None = None):
        self.context = context or TaskContext()
        unknown = set(loss_weights or {}) - set(self.loss_weights)
        if unknown:
            raise ValueError(
                f"task '{self.name}' has no loss term(s) {', '.join(sorted(unknown))}; "
                f"its terms are: {', '.join(sorted(self.loss_weights))}"
            )
        self.weights = {**self.loss_weights, **(loss_weights or {})}

    def dataset(self, split: str, degrade: bool = True) -> Dataset:
        """The task's dataset for `split` ('train', 'val', 'test') in the common sample format: the data
        config's entries for the task, or its built-in data.

        `degrade=False`: the same images, clean, with no degradation drawn (HQ-only sets give no `lq`; a
        paired set keeps the `lq` it reads from its files), e.g. for `prepare` to train a downstream model of
        the task's own on clean images without paying for corruptions it would throw away."""
        from ..framework.downstream import context_dataset

        return context_dataset(self.context, self.name, split, self.builtin_type, degrade=degrade)

    def downstream(self) -> nn.Module | None:
        """The frozen downstream model the task loss uses (None for PIR). Built or loaded once, cached; the
        engine calls `prepare()` first. Frozen for good: a network of your own wrapped in
        `framework.downstream.FrozenNetwork` stays in eval mode whatever module holds it, with no parameter
        gradients. Real checkpoints come from `context.checkpoints` (`--set downstream_checkpoints.KEY=PATH`;
        `framework.downstream.checkpoint_path` names the key to set when it is missing)."""
        return None

    def _builtin(self) -> bool:
        """True when the task runs on built-in data here (so it uses the built-in downstream models)."""
        from ..framework.downstream import context_is_builtin

        return context_is_builtin(self.context, self.name)

    def prepare(self, force: bool = False, steps: int | None = None) -> None:
        """Before a run starts: build, load or check what the task needs (its downstream models), so that a
        missing checkpoint stops the run at once. Nothing by default. `train`, `task add`, `eval`, sweep trials
        and `downstream train` call it before `losses`, `evaluator` or `downstream` are used; `force` (from
        `downstream train --force`) rebuilds a cached model, `steps` is a training budget (None: your default).
        A model of your own that trains here caches under `framework.downstream.downstream_home(context.home)`
        (UNIRESTORE_HOME/downstream), in a file named after what it depends on (the crop size, the data); it
        reads clean training images from `self.dataset("train", degrade=False)`."""

    def builtin_specs(self) -> list:
        """The built-in downstream models `prepare` trains and caches for this run (none with real data).
        The engine trains the uncached ones in a second process while stages 0 and 1 run."""
        return []

    def _train_builtin(self, force: bool, steps: int | None) -> bool:
        """Train and cache each model of `builtin_specs` that has no cache (every one with `force`);
        True when one was trained, so the caller drops the models it holds."""
        from ..framework import downstream

        trained = False
        for spec in self.builtin_specs():
            if force or downstream.read_record(spec, self.context.home) is None:
                downstream.builtin_model(spec, home=self.context.home, force=True, steps=steps)
                trained = True
        return trained

    def losses(self, restored: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Weighted loss terms on the restored images (B, 3, H, W) in [0, 1], keyed `loss/<task>_<term>`."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        """A fresh metric accumulator for this task."""
        raise NotImplementedError


class FrozenModelsTask(Task):
    """A task judged by several frozen downstream models of different kinds (e.g. ResNet and ViT).

    Built-in data: small models of each kind trained here on clean scenes and cached; real data: the
    models loaded from `context.checkpoints` by `real_loader` (a function name in framework/downstream.py).
    The first kind drives the loss; every kind is evaluated.
    """

    # Model kinds, the first one driving the loss.
    kinds: ClassVar[tuple[str, ...]] = ()
    # Name of the framework.downstream function loading a real model: loader(kind, checkpoints).
    real_loader: ClassVar[str] = ""

    def __init__(self, context: TaskContext | None = None, loss_weights: dict[str, float] | None = None):
        super().__init__(context, loss_weights)
        self._models: dict[str, nn.Module] | None = None

    def prepare(self, force: bool = False, steps: int | None = None) -> None:
        """Train and cache the built-in models (skipped when cached, unless `force`); with real data,
        check that the checkpoints load."""
        if not self._builtin():
            self.models()
        elif self._train_builtin(force, steps):
            self._models = None

    def builtin_specs(self) -> list:
        from ..framework import downstream

        if not self._builtin():
            return []
        return [downstream.builtin_spec(kind, self.context.size) for kind in self.kinds]

    def models(self) -> dict[str, nn.Module]:
        """Every frozen model, by kind (built or loaded once)."""
        if self._models is None:
            from ..framework import downstream

            context = self.context
            if self._builtin():
                self._models = {
                    kind: downstream.builtin_model(
                        downstream.builtin_spec(kind, context.size), home=context.home, device=context.device
                    )
                    for kind in self.kinds
                }
            else:
                load = getattr(downstream, self.real_loader)
                self._models = {kind: load(kind, context.checkpoints).to(context.device) for kind in self.kinds}
        return self._models

    def downstream(self) -> nn.Module:
        return self.models()[self.kinds[0]]
