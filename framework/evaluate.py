"""Evaluation: each task's metric on three inputs, the rows of every table in the paper (SPEC §8):

- `lq`: the degraded image fed straight to the task's evaluator (downstream model, or PSNR vs clean);
- `restored`: the model's output with that task's prompt;
- `hq`: the clean image (the upper bound).

Deterministic: a fixed evaluation set (the first `samples` images of the split, epoch 0) and fixed seeds
for the denoising noise, so two calls on the same weights give the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

INPUTS = ("lq", "restored", "hq")
INPUT_TITLES = {"lq": "LQ", "restored": "restored", "hq": "HQ"}


@dataclass
class EvalTable:
    """results[task][input][metric] = value, plus a few (lq, restored, hq) examples per task."""

    split: str
    samples: int
    results: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    examples: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def flat(self, prefix: str | None = None) -> dict[str, float]:
        """{"<prefix>/<task>/<input>/<metric>": value}; the prefix defaults to the split."""
        prefix = self.split if prefix is None else prefix
        return {
            f"{prefix}/{task}/{source}/{metric}": value
            for task, rows in self.results.items()
            for source, metrics in rows.items()
            for metric, value in metrics.items()
        }

    def rich_table(self, title: str | None = None):
        from rich.table import Table

        sources = [s for s in INPUTS if any(s in rows for rows in self.results.values())]
        table = Table(title=title or f"{self.split} split, {self.samples} images per task")
        table.add_column("task")
        table.add_column("metric")
        for source in sources:
            table.add_column(INPUT_TITLES[source], justify="right")
        for task, rows in self.results.items():
            metrics = list(dict.fromkeys(m for source in sources for m in rows.get(source, {})))
            for metric in metrics:
                cells = [_format(rows.get(source, {}).get(metric)) for source in sources]
                table.add_row(task, metric, *cells)
        return table


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _fixed_batches(dataset, count: int, batch_size: int):
    from .data.sample import collate

    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    count = min(count, len(dataset))
    for start in range(0, count, batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, count))])


def _to(batch: dict, device: torch.device) -> dict:
    return {
        key: value.to(device)
        if isinstance(value, torch.Tensor)
        else [v.to(device) if isinstance(v, torch.Tensor) else v for v in value]
        if isinstance(value, list)
        else value
        for key, value in batch.items()
    }


@torch.no_grad()
def evaluate(
    model,
    tasks: Mapping[str, object] | Sequence[object],
    split: str = "test",
    samples: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    inputs: Sequence[str] = INPUTS,
    examples: int = 4,
    device: torch.device | str | None = None,
) -> EvalTable:
    """Evaluate `model` on each task (Task objects, or a name → Task mapping) for every input in `inputs`.

    A task the model has no prompt for gets only its `lq` and `hq` rows.
    """
    task_list = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    device = torch.device(device) if device is not None else next(model.cfrm.parameters()).device
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise ValueError(f"unknown evaluation input(s) {', '.join(sorted(unknown))}; use {', '.join(INPUTS)}")
    was_training = model.training
    model.eval()
    table = EvalTable(split=split, samples=samples)
    try:
        for task in task_list:
            sources = [
                s for s in inputs if s != "restored" or task.name in model.tasks or model.config.shared_prompt
            ]
            evaluators = {source: task.evaluator() for source in sources}
            kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            generator = torch.Generator(device=device).manual_seed(seed)
            for batch in _fixed_batches(task.dataset(split), samples, batch_size):
                batch = _to(batch, device)
                restored = None
                if "restored" in sources:
                    restored = model.restore(batch["lq"], task=task.name, generator=generator)
                for source in sources:
                    images = {"lq": batch["lq"], "hq": batch["hq"], "restored": restored}[source]
                    evaluators[source].update(images, batch)
                if len(kept) < examples:
                    take = examples - len(kept)
                    shown = restored if restored is not None else batch["lq"]
                    kept += list(zip(batch["lq"][:take].cpu(), shown[:take].cpu(), batch["hq"][:take].cpu()))
            table.results[task.name] = {source: evaluators[source].compute() for source in sources}
            if kept:
                table.examples[task.name] = tuple(torch.stack(column) for column in zip(*kept))
    finally:
        model.train(was_training)
    return table


def before_after_grid(lq: torch.Tensor, restored: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
    """One row per image: LQ | restored | HQ, 2-pixel white gaps; (3, H', W') in [0, 1]."""
    from torchvision.utils import make_grid

    rows = torch.stack([lq, restored, hq], dim=1).flatten(0, 1)  # (3N, 3, H, W), row-major
    return make_grid(rows.clamp(0, 1).float(), nrow=3, padding=2, pad_value=1.0)


def save_grids(table: EvalTable, folder, prefix: str) -> list:
    """Write one before/after grid PNG per task of `table` to `folder`; returns the paths."""
    from pathlib import Path

    from .data.io import save_png

    folder = Path(folder)
    paths = []
    for task, (lq, restored, hq) in table.examples.items():
        path = folder / f"{prefix}-{task}.png"
        save_png(before_after_grid(lq, restored, hq), path)
        paths.append(path)
    return paths
