"""Run comparison: MLflow runs side by side, with their key params and metrics, the best per column marked."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .plots import panels, save

# As the runs log them: `stages` of train and task add, `steps` of a sweep.
KEY_PARAMS = ("stages", "tasks", "beta", "prior", "steps")
# Metrics where lower is better (a part of the name that starts so), besides those a task declares
# (`Task.lower_is_better`); every other is taken as higher-better.
LOWER_IS_BETTER_PREFIXES = ("loss", "lpips", "time", "seconds")


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


def _named_lower(metric: str) -> bool:
    """A loss at any level of the name (loss/cfrm, stage2/loss_total), a time, an LPIPS."""
    return any(part.startswith(LOWER_IS_BETTER_PREFIXES) for part in metric.split("/"))


def _lower_is_better(metric: str) -> bool:
    """`_named_lower`, or a metric its task declares lower-better (a saliency MAE) under a key that names the
    task: test/sal/restored/mae, eval/default/sal/restored_sal/mae, stage3-sal/val/sal/restored/mae."""
    if _named_lower(metric):
        return True
    from .registry import get_task_class, known_tasks

    named = set(known_tasks()) & set(metric.split("/")[:-1])
    return any(metric.endswith(f"/{name}") for task in named for name in get_task_class(task).lower_is_better)


def _local_store(tracking_uri: str) -> Path | None:
    """The file an sqlite URI, or the folder a file URI or plain path, names; None for a server."""
    if tracking_uri.startswith("sqlite:///"):  # sqlite:///relative.db, sqlite:////absolute.db
        return Path(tracking_uri[len("sqlite:///") :])
    if tracking_uri.startswith("file:"):
        return Path(tracking_uri[len("file:") :].removeprefix("//"))
    if "://" not in tracking_uri:
        return Path(tracking_uri)
    return None


def _check_server(tracking_uri: str) -> None:
    """A tracking server that does not answer is named at once (MLflow would retry for minutes)."""
    from .engine.tracking import server_problem

    reason = server_problem(tracking_uri)
    if reason:
        raise CompareError(
            f"cannot reach the tracking server at {tracking_uri} ({reason}); start it (mlflow server) or give "
            "--tracking-uri sqlite:///<path>/mlflow.db"
        )


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
    if store is not None and store.is_file() and "://" not in tracking_uri:
        raise CompareError(f"{tracking_uri} is a file: give a sqlite store as sqlite:///{store.resolve()}")
    if tracking_uri.startswith(("http://", "https://")):
        _check_server(tracking_uri)
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
    except Exception as error:  # noqa: BLE001 (MLflow raises its own exception types for a malformed filter)
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
    else:  # the metrics every run has, losses, times and learning rates left out (a task's MAE stays)
        chosen = sorted(
            m for m in metric_columns
            if not _named_lower(m) and m.rsplit("/", 1)[-1] not in ("lr", "step") and frame[f"metrics.{m}"].notna().all()
        )  # fmt: skip
        if not chosen:
            raise CompareError(
                f"these {len(frame)} runs share no metric; name the ones to compare with --metric (e.g. "
                f"{', '.join(sorted(metric_columns)[:3])})"
            )
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


# --------------------------------------------------------------------------------------------------
# Per image: eval runs against each other on the same test images


PER_IMAGE_ARTIFACT = "eval_images.csv"  # written and logged by `unirestore eval`
# where runs log it: `eval` at the root; train, task add and a sweep's trials under final/, for their final table
PER_IMAGE_FOLDERS = ("", "final")


@dataclass
class PairedResult:
    """One eval run against the reference run on one (degradation, task, restored row, metric)."""

    run: str
    reference: str
    corruption: str
    task: str
    row: str
    metric: str
    above: int  # images where `run` scores higher than `reference`
    below: int
    total: int  # images in both (ties and unscored ones included)
    p_value: float | None  # two-sided sign test over the untied images


def _per_image_artifact(client, run_id: str) -> str | None:
    """Where the run logged its per-image values: an evaluation at the root, a training under final/."""
    for folder in PER_IMAGE_FOLDERS:
        path = f"{folder}/{PER_IMAGE_ARTIFACT}" if folder else PER_IMAGE_ARTIFACT
        if path in {item.path for item in client.list_artifacts(run_id, folder or None)}:
            return path
    return None


def _per_image_values(tracking_uri: str, run_id: str) -> dict[tuple, dict[str, float]] | None:
    """{(corruption, task, image, metric, occurrence): {row: value}} from a run's eval_images.csv; None if absent."""
    import csv
    import tempfile

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    found = _per_image_artifact(client, run_id)
    if found is None:
        return None
    # one small CSV per run: MLflow's download bars would only clutter the table's output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=found, dst_path=folder,
                                                   tracking_uri=tracking_uri)  # fmt: skip
        lines = list(csv.DictReader(Path(path).read_text().splitlines()))
    values, seen = {}, {}
    for line in lines:
        name = (line.pop("corruption"), line.pop("task"), line.pop("image"), line.pop("metric"))
        seen[name] = seen.get(name, -1) + 1  # a file met twice (tiles of one image) keeps both
        values[(*name, seen[name])] = {row: float(value) for row, value in line.items() if value not in ("", None)}
    return values


def paired_per_image(tracking_uri: str, comparison: Comparison) -> list[PairedResult]:
    """Every eval run of `comparison` against the first one listed (the newest), image by image: on how many
    of the test images both scored its restored rows are above or below the reference's, with the sign test.
    Training runs (a sweep's trials, say) take part as eval runs do, with their final table.

    Only runs that logged eval_images.csv and have a value for one of the comparison's metrics take part
    (an evaluation by corruption does not become the reference of a comparison of the default table's
    metric); rows and images are matched by name."""
    from scipy.stats import binomtest

    runs = []
    for row, run_id in zip(comparison.rows, comparison.run_ids, strict=True):
        if all(row[metric] is None for metric in comparison.metrics):
            continue
        values = _per_image_values(tracking_uri, run_id)
        if values is not None:
            runs.append((str(row["run"]), values))
    if len(runs) < 2:
        raise CompareError(
            f"--per-image compares eval runs image by image, and {len(runs)} of the runs shown logged "
            f"{PER_IMAGE_ARTIFACT} and a value for {', '.join(comparison.metrics)}; select two or more "
            "`unirestore eval` runs (--experiment unirestore-eval, --filter, --metric) or training runs"
        )
    (reference_name, reference), others = runs[0], runs[1:]
    results = []
    for name, values in others:
        groups: dict[tuple, list[tuple[float, float]]] = {}
        for key, rows in values.items():
            for row, value in rows.items():
                base = reference.get(key, {}).get(row)
                if row.startswith("restored") and base is not None:
                    groups.setdefault((key[0], key[1], row, key[3]), []).append((value, base))
        for (corruption, task, row, metric), pairs in groups.items():
            scored = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]  # NaN: not scored
            above, below = sum(a > b for a, b in scored), sum(a < b for a, b in scored)
            p_value = binomtest(above, above + below).pvalue if above + below else None
            results.append(PairedResult(name, reference_name, corruption, task, row, metric, above, below,
                                        len(pairs), p_value))  # fmt: skip
    if not results and any(key in reference for _, values in others for key in values):
        rows = "; ".join(f"{name}: {', '.join(_restored_rows(values)) or 'none'}" for name, values in runs)
        raise CompareError(
            f"these eval runs share test images but no restored row ({rows}); select runs restored with the "
            "same prompts (eval --prompts)"
        )
    if not results:
        counts = "; ".join(f"{name}: {_images_of(values)}" for name, values in runs)
        raise CompareError(
            f"no test image is shared between these eval runs ({counts}); select runs evaluated on the same "
            "data, tasks and degradations (--filter)"
        )
    return results


def _images_of(values: dict[tuple, dict[str, float]]) -> str:
    """'8 images (default/pir)': a run's test images and the (degradation, task) units they belong to."""
    images = {key[:3] for key in values}
    units = ", ".join(sorted({f"{corruption}/{task}" for corruption, task, _ in images}))
    return f"{len(images)} image(s) ({units or 'none'})"


def _restored_rows(values: dict[tuple, dict[str, float]]) -> list[str]:
    return sorted({row for rows in values.values() for row in rows if row.startswith("restored")})


def render_paired(results: list[PairedResult]):
    """A rich table of `paired_per_image`'s results."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"per image, against {results[0].reference}") if results else "per image")
    for column in ("run", "degradation", "task", "input", "metric", "above", "below", "images", "sign test p"):
        table.add_column(column, justify="right" if column in ("above", "below", "images", "sign test p") else "left")
    for result in results:
        p_value = "–" if result.p_value is None else f"{result.p_value:.2g}"
        table.add_row(*map(escape, (result.run, result.corruption, result.task, result.row, result.metric)),
                      str(result.above), str(result.below), str(result.total), p_value)  # fmt: skip
    return table
