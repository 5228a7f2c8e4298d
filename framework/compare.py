"""Run comparison: MLflow runs side by side, with their key params and metrics, the best per column marked."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .plots import panels, save

KEY_PARAMS = ("stage", "tasks", "beta", "prior", "steps")
# Metrics where lower is better; every other metric is taken as higher-better.
LOWER_IS_BETTER_PREFIXES = ("loss/", "lpips", "time", "seconds")


class CompareError(ValueError):
    """No runs, an unknown experiment or a bad filter; the message says which."""


@dataclass
class Comparison:
    columns: list[str]  # "run", params, then metrics
    rows: list[dict[str, object]]
    metrics: list[str]
    best: dict[str, object]  # metric → best value
    run_ids: list[str] = field(default_factory=list)  # MLflow run id of each row

    def is_best(self, metric: str, value) -> bool:
        return value is not None and self.best.get(metric) is not None and value == self.best[metric]


def _lower_is_better(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER_PREFIXES)


def _local_store(tracking_uri: str) -> Path | None:
    """The file an sqlite URI, or the folder a file URI or plain path, names; None for a server."""
    if tracking_uri.startswith("sqlite:///"):  # sqlite:///relative.db, sqlite:////absolute.db
        return Path(tracking_uri[len("sqlite:///") :])
    if tracking_uri.startswith("file:"):
        return Path(tracking_uri[len("file:") :].removeprefix("//"))
    if "://" not in tracking_uri:
        return Path(tracking_uri)
    return None


def compare_runs(
    tracking_uri: str,
    experiment: str | None = None,
    metrics: list[str] | None = None,
    filter_string: str = "",
    max_runs: int = 50,
) -> Comparison:
    """Collect runs with `mlflow.search_runs`; metrics default to every metric the runs share but loss terms."""
    import mlflow

    store = _local_store(tracking_uri)
    if store is not None and not store.exists():
        # MLflow would create an empty store here and report no runs: say where the runs are looked for instead.
        raise CompareError(
            f"no tracking store at {store}; run this in the folder you trained in, or give --tracking-uri"
        )
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.tracking.MlflowClient()
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise CompareError(f"no experiment '{experiment}' in {tracking_uri}; experiments: {', '.join(names) or 'none'}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        raise CompareError(f"no experiments in {tracking_uri}; train something first (unirestore train)")
    try:
        frame = mlflow.search_runs(
            experiment_ids=experiment_ids, filter_string=filter_string, max_results=max_runs, order_by=["start_time DESC"]
        )
    except Exception as error:  # MLflow raises its own exception types for a malformed filter
        raise CompareError(f"bad --filter '{filter_string}': {str(error).splitlines()[0]}") from None
    if frame.empty:
        raise CompareError(f"no runs match in {tracking_uri}" + (f" with filter '{filter_string}'" if filter_string else ""))
    metric_columns = [c[len("metrics.") :] for c in frame.columns if c.startswith("metrics.")]
    if metrics:
        missing = [m for m in metrics if m not in metric_columns]
        if missing:
            raise CompareError(
                f"no run has metric(s) {', '.join(missing)}; metrics present: {', '.join(sorted(metric_columns))}"
            )
        chosen = list(metrics)
    else:
        chosen = sorted(m for m in metric_columns if not m.startswith("loss/") and m not in ("lr", "step"))
    params = [p for p in KEY_PARAMS if f"params.{p}" in frame.columns]
    rows, run_ids = [], []
    for _, record in frame.iterrows():
        run_ids.append(record["run_id"])
        name = record.get("tags.mlflow.runName") or record["run_id"][:8]
        row: dict[str, object] = {"run": f"{name} ({record['run_id'][:8]})"}
        for param in params:
            value = record.get(f"params.{param}")
            row[param] = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
        for metric in chosen:
            value = record.get(f"metrics.{metric}")
            row[metric] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        rows.append(row)
    best = {}
    for metric in chosen:
        values = [row[metric] for row in rows if row[metric] is not None]
        if values:
            best[metric] = min(values) if _lower_is_better(metric) else max(values)
    return Comparison(columns=["run", *params, *chosen], rows=rows, metrics=chosen, best=best, run_ids=run_ids)


def render_table(comparison: Comparison, title: str = "runs"):
    """A rich table; the best value of each metric column in bold green with a ★."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for column in comparison.columns:
        table.add_column(escape(column), justify="right" if column in comparison.metrics else "left")
    for row in comparison.rows:
        cells = []
        for column in comparison.columns:
            value = row[column]
            if column in comparison.metrics:
                if value is None:
                    cells.append("–")
                elif comparison.is_best(column, value):
                    cells.append(f"[bold green]{value:.4g} ★[/]")
                else:
                    cells.append(f"{value:.4g}")
            else:
                cells.append(escape(str(value)))  # a run name or parameter is data, not markup
        table.add_row(*cells)
    return table


def plot_comparison(comparison: Comparison, path: str | Path) -> Path:
    """A PNG bar chart: one panel per metric, one bar per run."""
    count = max(1, len(comparison.metrics))
    figure, axes = panels(count, columns=count, width=max(4.0, 3.2 * count) / count, height=3.6)
    labels = [str(row["run"]).split(" (")[0] for row in comparison.rows]
    for axis, metric in zip(axes, comparison.metrics):
        values = [row[metric] if row[metric] is not None else 0.0 for row in comparison.rows]
        colours = ["tab:green" if comparison.is_best(metric, row[metric]) else "tab:blue" for row in comparison.rows]
        axis.bar(range(len(values)), values, color=colours)
        axis.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=7)
        axis.set_title(metric, fontsize=9)
    return save(figure, path, dpi=120)


def plot_histories(tracking_uri: str, comparison: Comparison, path: str | Path) -> Path:
    """A PNG with one panel per metric of `comparison`: its logged history against the step, one line per run
    (training curves side by side, e.g. the trials of a β sweep)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    figure, axes = panels(len(comparison.metrics), columns=3, width=4.2, height=3.2)
    for axis, metric in zip(axes, comparison.metrics):
        for row, run_id in zip(comparison.rows, comparison.run_ids, strict=True):
            history = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
            if not history:
                continue
            steps, values = [m.step for m in history], [m.value for m in history]
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, linewidth=1.2,
                      label=str(row["run"]).split(" (")[0])  # fmt: skip
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if axis.get_lines():
            axis.legend(fontsize=6)
    return save(figure, path, dpi=120)
