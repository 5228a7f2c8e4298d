"""Metric curves of a stage: the logged values kept beside its checkpoints, and drawn as a PNG.

Every value the run logs to MLflow during a stage (the loss terms, the learning rate, steps/s, the validation
metrics) is also appended to `<stage>/metrics.jsonl`, one JSON object per logged step. The file survives the
run, serves plots and pandas without MLflow, and is cut back to the resumed step when a killed stage resumes,
so the replayed steps are not drawn twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from ..files import atomic_write
from ..plots import panels, save

HISTORY_FILE = "metrics.jsonl"


class MetricHistory:
    """`folder/metrics.jsonl`: lines `{"step": int, "metrics": {name: value}}` in the order they were logged."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / HISTORY_FILE

    def append(self, step: int, metrics: Mapping[str, float]) -> None:
        values = {name: float(value) for name, value in metrics.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as stream:
            stream.write(json.dumps({"step": int(step), "metrics": values}) + "\n")

    def read(self) -> list[dict]:
        """The logged records; a line cut short by a kill is skipped."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("metrics"), dict) and "step" in record:
                records.append(record)
        return records

    def keep_until(self, step: int) -> None:
        """Drop what was logged after `step` (a resumed stage replays those steps)."""
        if not self.path.is_file():
            return
        kept = [record for record in self.read() if record["step"] <= step]
        text = "".join(json.dumps(record) + "\n" for record in kept)
        atomic_write(self.path, lambda temporary: Path(temporary).write_text(text))

    def series(self) -> dict[str, tuple[list[int], list[float]]]:
        """name -> (steps, values), in logged order, non-finite values left out."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for record in self.read():
            for name, value in record["metrics"].items():
                if math.isfinite(value):
                    steps, values = out.setdefault(name, ([], []))
                    steps.append(record["step"])
                    values.append(value)
        return out


def _panel_order(name: str) -> tuple[int, str]:
    # losses first (the total, then the terms), then validation metrics, then the learning rate and speed
    if name.endswith("/loss_total"):
        return 0, name
    if name.startswith("loss/"):
        return 1, name
    if "/val/" in name:
        return 2, name
    return 3, name


def plot_curves(history: MetricHistory, path: str | os.PathLike, title: str) -> Path | None:
    """A PNG with one panel per logged metric against the step; None when nothing was logged yet."""
    series = history.series()
    if not series:
        return None
    names = sorted(series, key=_panel_order)
    figure, axes = panels(len(names), columns=4, width=3.4, height=2.6)
    for axis, name in zip(axes, names, strict=True):
        steps, values = series[name]
        marker = "o" if len(steps) < 20 else None  # a few validation points are easier to read as dots
        axis.plot(steps, values, marker=marker, markersize=3, linewidth=1.2)
        is_loss = name.startswith("loss/") or name.endswith("/loss_total")
        if is_loss and min(values) > 0 and max(values) / min(values) > 20:
            axis.set_yscale("log")
        axis.set_title(name, fontsize=8)
        axis.tick_params(labelsize=7)
        axis.set_xlabel("step", fontsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    return save(figure, path, dpi=110)
