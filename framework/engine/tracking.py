"""MLflow tracking of a training run, through an explicit `MlflowClient` (no global active run, so a sweep
or a notebook that has its own run is left alone).

Every `unirestore train` / `task add` call is one MLflow run holding: the resolved config (`config.json`),
params (stages, tasks, β, prior, steps, batch, the learning rates as scaled, and every config setting under
its `--set` name), per-step loss terms, learning rate and speed of each stage (stage 0's too), periodic
validation metrics, the final table's metrics, before/after image grids (LQ | restored | HQ), metric curves
and the final checkpoints as artifacts, and tags for the stages, tasks, prior and run folder (`task add`:
the source checkpoint and the run that trained it). A sqlite store keeps its artifacts in `mlartifacts/`
beside its database file, shared by every run of every experiment (each under its own run id): deleting one
run folder takes nothing of another run's with it.
A resumed command continues its run, which keeps each (metric, step) point once: MLflow cannot delete a point,
so the steps a resumed stage trains again (from its last checkpoint to where the killed process had logged)
are not logged a second time, and the run keeps the values first logged (the replay's are the same, up to the
speed measured, see `Tracker.log_metrics`).
`Tracker(enabled=False)` (non-zero DDP ranks) does nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

RUN_FILE = "mlflow_run.json"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlartifacts/` beside a sqlite store's database (as
    `mlflow server` keeps them); None (MLflow's own choice) for a file store or a tracking server."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    database = Path(unquote(parsed.path))  # sqlite:////abs/x.db -> /abs/x.db; sqlite:///x.db -> /x.db
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        database = Path(unquote(tracking_uri[len("sqlite:///") :]))  # relative to the working directory
    return (database.resolve().parent / "mlartifacts").as_uri()


def server_problem(tracking_uri: str) -> str:
    """Why the tracking server at an http(s) URI cannot be reached ('' when it answers), asked at once: MLflow
    would retry for minutes."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        return ""  # it answers (a server without /health, or behind a proxy): MLflow's own errors take over
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))
    return ""


def _store_problem(tracking_uri: str) -> str:
    """Why the store at `tracking_uri` cannot hold runs ('' when it can). A sqlite database is looked at, not
    opened (opening creates it, before the command's other input is checked; MLflow retries one that is a folder
    for minutes); another store is opened."""
    if tracking_uri.startswith(("http://", "https://")):
        reason = server_problem(tracking_uri)
        return f"cannot reach the tracking server ({reason})" if reason else ""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///") :])  # sqlite:///relative.db, sqlite:////absolute.db
        blocking = next((p for p in database.parents if p.exists()), None)  # MLflow makes the missing folders
        if blocking is not None and not blocking.is_dir():
            return f"{blocking} is a file, not a folder"
        if database.is_dir():
            return f"{database} is a folder, not a database file"
        if database.is_file() and database.stat().st_size:
            with open(database, "rb") as handle:
                if handle.read(16) != b"SQLite format 3\0":
                    return f"{database} is not an sqlite database"
        return ""
    try:
        Tracker(tracking_uri, "").client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 (an unknown scheme, a file store MLflow refuses, a database it cannot open)
        if type(error).__name__ == "UnsupportedModelRegistryStoreURIException":  # MLflow's name, for tracking too
            return f"MLflow has no store for the scheme '{tracking_uri.split('://')[0]}'"
        first = str(error).strip().split(". ")[0].split("\n")[0]
        return (first or type(error).__name__)[:300]
    return ""


def check_tracking_uri(tracking_uri: str, option: str = "--tracking-uri ") -> None:
    """A tracking URI that cannot hold runs, refused before any work is done (and any folder is made) with a
    `ConfigError` naming it and `option`, how the command takes another (`--tracking-uri `, `--set tracking_uri=`)."""
    from ..config import ConfigError

    problem = _store_problem(tracking_uri)
    if problem:
        raise ConfigError(
            f"MLflow tracking URI {tracking_uri} cannot be used: {problem}; give {option}sqlite:///PATH/mlflow.db "
            f"or {option}http://HOST:PORT (a running mlflow server)"
        )


class Tracker:
    """One MLflow run. Methods are no-ops when disabled."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id = ""
        self._client = None
        self._last_step: dict[str, int] = {}  # per metric, the last step the run holds

    # ----------------------------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            import logging

            from mlflow.tracking import MlflowClient

            # creating a new sqlite store logs its schema migrations at INFO: not news for a user
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=artifact_location(self.tracking_uri))
        except MlflowException:  # another process created it in between
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def start(self, run_name: str, tags: Mapping[str, str], run_id: str = "") -> str:
        """Start a new run, or continue `run_id` (a resumed training or evaluation) when the store still holds
        it, not deleted; the id returned then differs from `run_id`. Continuing reads the last step of each
        metric the run holds, which `log_metrics` does not log again."""
        if not self.enabled:
            return ""
        from mlflow.exceptions import MlflowException

        self.run_id, self._last_step = "", {}
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage != "deleted":  # a deleted run stays in the store, out of sight
                    self._last_step = {
                        key: max(point.step for point in self.client.get_metric_history(run_id, key))
                        for key in run.data.metrics
                    }
                    self.client.update_run(run_id, status="RUNNING")
                    self.run_id = run_id
            except MlflowException:
                self.run_id, self._last_step = "", {}
        if not self.run_id:
            run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=dict(tags))
            self.run_id = run.info.run_id
        self.set_tags(tags)
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    # ----------------------------------------------------------------------------------------------

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled and self.run_id:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def log_config(self, config: dict) -> None:
        if self.enabled and self.run_id:
            self.client.log_dict(self.run_id, config, "config.json")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params are write-once in MLflow: a resumed run re-logs the same values, new keys are added."""
        if not (self.enabled and self.run_id):
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, again: bool = False) -> None:
        """Log `metrics` at `step`, except those the run already holds at this step or a later one: a resumed
        stage trains again the steps from its last checkpoint to where the killed process stopped, and each
        (metric, step) keeps the value first logged. On the CPU the replay is bit-identical (the data, the
        seeds and the optimiser state are restored), so it is the same value, but for the speed
        (`<stage>/steps_per_second`), measured anew; metrics.jsonl and the curves hold the replay's values.
        (Where the checkpoint fell between two logs, `train.checkpoint_every` not a multiple of
        `train.log_every`, the replay's first log averages the steps since the checkpoint alone: the run keeps
        the mean over the whole window, as an uninterrupted run logs it.)
        `again`: log them anyway, new values of a result computed again (an evaluation's unit whose test set
        changed since), which MLflow then shows, the old ones staying in the metric's history."""
        if not (self.enabled and self.run_id and metrics):
            return
        from mlflow.entities import Metric

        step = int(step or 0)
        stamp = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), stamp, step)
            for key, value in metrics.items()
            if again or step > self._last_step.get(key, -1)
        ]
        for start in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start : start + 900])
            for metric in batch[start : start + 900]:
                self._last_step[metric.key] = max(step, self._last_step.get(metric.key, step))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled and self.run_id and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)


def save_run_id(folder: Path, run_id: str) -> None:
    if run_id:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / RUN_FILE, json.dumps({"run_id": run_id}))


def load_run_id(folder: Path) -> str:
    try:
        return json.loads((folder / RUN_FILE).read_text()).get("run_id", "")
    except (OSError, json.JSONDecodeError):
        return ""
