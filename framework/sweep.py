"""Ray Tune sweeps over the training engine: β weights of stage 2, and prompt-only extension jobs (stage 3).

`sweep_beta` (`unirestore sweep beta`) runs stage 2 once per trial, every trial from the same stage-1
checkpoint and with its own β_k (log-uniform per task, or a log-spaced grid). Each validation is reported
to Tune, and ASHA stops the weak trials early on one combined objective:

    objective = Σ_k w_k · (m_k − LQ_k) / gap_k,      gap_k = HQ_k − LQ_k

with m_k the task's primary metric (PSNR, accuracy, mIoU, ...) on the restored validation images, and
LQ_k / HQ_k the same metric on the degraded and on the clean images: the LQ and HQ rows of the engine's
evaluation, computed once on the driver before any trial starts and handed to every trial. PIR's HQ row
is the clean image scored against itself (PSNR capped at 100 dB), not a reachable target, so PIR's gap is
`CAPPED_GAP` (10 dB) unless `gaps` says otherwise. The best trial's run config (its tasks, β and the
sweep's other settings) is written as a YAML file that `unirestore train --config FILE` reads.

`sweep_extend` (`unirestore sweep extend`) trains each new task's prompt alone (stage 3, the engine's
`add_task`) in one or more trials per task over the learning rate, one GPU each where there are GPUs,
and merges the best prompt of each task into one checkpoint. Prompts are independent (stage 3 changes
nothing else), so the merge equals adding the tasks one after another.

Sweep folder (`output`, default `runs/sweep-beta` or `runs/sweep-extend`):

    sweep.json             what was swept, and the trials' config (a resumed sweep must match both)
    mlflow_run.json        the parent MLflow run
    tune/                  Ray Tune's experiment state (`Tuner.restore` resumes from it)
    trials/<trial_id>/     each trial's run folder in the engine's layout, plus `timing.json` and
                           `outcome.json` (Tune's final verdict on the trial, written on the driver)
    best.yaml              β sweep: the best trial's tasks, β and settings, a run config
    merged.safetensors     extension: the source checkpoint plus every task's best prompt
    results.json           every trial's parameters, last metrics, checkpoint, MLflow run; the timing
    objective.png          each trial's objective against the step

MLflow: the sweep is a parent run (named after the sweep folder, tagged `unirestore.sweep_parent`: its
settings, the base config, the best trial's values, results.json and objective.png); each trial is a
nested child run (tags `mlflow.parentRunId` and `unirestore.sweep`, named `<parent>-<trial id>`) that the
engine itself logs into (params, loss terms, validation metrics, grids), plus the sweep's params
(`sweep.*`) and the objective. The tracking database, the experiment and the parent run are created on
the driver before any trial starts (trials creating a new sqlite database at once crash). Every run is
ended: a trial ends its own run in a `finally`, and the driver reconciles every child run with Tune's
verdict at the end (a trial ASHA stopped early: FINISHED, tagged `unirestore.stopped_early`; a trial that
failed after its retries: FAILED; an interrupted sweep: KILLED).

From one machine to a cluster, the same code:

- Without `address`, a local Ray instance sized to this machine (every CPU and GPU, no dashboard) is
  started and shut down at the end. With `address` (`auto`, or `HEAD_IP:6379` from a node of the cluster),
  `ray.init(address=...)` joins a running cluster. Ray is shut down only by the call that started it.
- Every path (source checkpoint, sweep folder, prior and data given as paths, downstream checkpoints, a
  sqlite tracking store) is made absolute on the driver, and trials never use their working directory
  (`RAY_CHDIR_TO_TRIAL_DIR=0`). The `UNIRESTORE_*` variables of the driver are set in every trial.
- On a cluster, every node must see the same files at the same paths: the source checkpoint, the data
  (the data config and its datasets), the sweep folder, and `UNIRESTORE_HOME` (the trained tiny prior and
  the built-in downstream models) must sit on storage every node mounts (NFS or similar). Use an MLflow
  tracking server (`tracking_uri: http://HOST:5000`) rather than a sqlite file, and install unirestore
  in the same environment on every node.
- A trial asking for more GPUs (or CPUs) than any node has fails at once with a `SweepError`
  (checked against `ray.cluster_resources()` before `Tuner.fit`), instead of waiting forever.
- A failed trial is retried `max_failures` times; each attempt resumes the trial's run folder from its
  last checkpoint (the engine's exact resume) and continues its MLflow run, which keeps each (metric, step)
  point once (the objective's too: the steps validated again are not logged again). A sweep stopped with Ctrl+C
  raises `SweepInterrupted`; `resume=True` (`--resume`, same `--output`) continues it with
  `Tuner.restore(..., resume_errored=True)`: finished trials are kept, the others resume where their
  checkpoints left them.
- Trials reuse their worker processes (`reuse_actors`), so torch and the engine are imported once per
  worker rather than once per trial.

Timing: `SweepTiming` records the wall time of the whole call and the time spent inside the trials'
training and evaluation functions (the engine's `train` / `add_task`, less the time blocked in
`tune.report`), as the union of those intervals over trials that run side by side. What is left once the
driver's own evaluation and merge are also taken out is Ray's overhead: starting Ray, starting a worker
process per trial (and importing torch in it), scheduling, result handling, shutdown.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig, from_dict, to_dict
from .files import atomic_write_text

SEARCHES = ("random", "grid")
SCHEDULERS = ("asha", "none")
# PIR's gap (dB) when its HQ row sits at the PSNR cap (the clean image against itself).
CAPPED_GAP = 10.0
# Environment of the driver that every trial gets (the cache folder, the downstream training budget, ...).
_PROPAGATED_PREFIXES = ("UNIRESTORE_",)
_PROPAGATED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TIMING_FILE = "timing.json"


class SweepError(ValueError):
    """A sweep cannot run as asked; the message says why and what to change, in one line."""


class SweepInterrupted(SweepError):
    """The sweep was stopped (Ctrl+C) before every trial ended; `resume=True` continues it."""


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class TrialRecord:
    """One trial, as the sweep's table shows it."""

    trial_id: str
    # "TERMINATED" (ran to its end, or stopped early by the scheduler), "ERROR" (failed after its retries)
    # or "INTERRUPTED" (the sweep was stopped before the trial ended: `--resume` continues it).
    status: str
    # What was sampled: {"beta.pir": 1.0, ...} or {"task": "det", "lr": 3e-4}.
    params: dict[str, Any]
    # The last validated step, and the objective and primary metrics measured there.
    step: int
    objective: float | None
    metrics: dict[str, float]
    # The model checkpoint written at that step (None when the trial wrote none).
    checkpoint: Path | None
    run_id: str
    stopped_early: bool
    # Seconds inside the engine's training and evaluation functions (every attempt together).
    work_seconds: float
    error: str = ""


@dataclass
class SweepTiming:
    """Where the sweep's wall time went (see the module docstring)."""

    wall_seconds: float
    # Union over trials of the intervals spent inside training / evaluation.
    trial_seconds: float
    # The same intervals summed over trials (more than `trial_seconds` when trials run side by side).
    trial_seconds_summed: float
    # The driver's own work: LQ/HQ baseline evaluation, merging prompts.
    driver_seconds: float
    # Part of the overhead, summed over trials: from entering the trial function to the start of the work
    # (importing the engine, torch and diffusers in a fresh worker process; opening the MLflow run).
    trial_setup_seconds: float = 0.0

    @property
    def overhead_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.trial_seconds - self.driver_seconds)

    @property
    def overhead_share(self) -> float:
        return self.overhead_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "overhead_seconds": self.overhead_seconds,
            "overhead_share": self.overhead_share,
        }


@dataclass
class BetaSweepResult:
    """What `sweep_beta` produced."""

    folder: Path
    beta: dict[str, float]  # the best trial's β
    config_file: Path  # best.yaml: the best trial's run config (`unirestore train --config`)
    checkpoint: Path  # the best trial's stage-2 checkpoint
    best: TrialRecord
    trials: list[TrialRecord]
    # baseline[task] = {"lq": {metric: value}, "hq": {...}} on the validation set.
    baseline: dict[str, dict[str, dict[str, float]]]
    run_id: str  # the parent MLflow run
    timing: SweepTiming


@dataclass
class ExtendSweepResult:
    """What `sweep_extend` produced."""

    folder: Path
    checkpoint: Path  # the merged checkpoint
    best: dict[str, TrialRecord]  # the best trial of each new task
    trials: list[TrialRecord]
    baseline: dict[str, dict[str, dict[str, float]]]
    run_id: str
    timing: SweepTiming


# --------------------------------------------------------------------------------------------------
# Command-line helpers


def parse_ranges(text: str | None) -> dict[str, tuple[float, float]]:
    """`pir=1:1,seg=0.01:1` → {"pir": (1.0, 1.0), "seg": (0.01, 1.0)} (a single value fixes it)."""
    from .registry import task_key
    ranges: dict[str, tuple[float, float]] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        low, colon, high = value.partition(":")
        try:
            if not name.strip() or (colon and not high.strip()):  # "=1:2", "seg=1:" (a half-written range)
                raise ValueError(item)
            bounds = (float(low), float(high or low))
        except ValueError:
            raise SweepError(f"range '{item}': expected task=LOW:HIGH, e.g. seg=0.01:1") from None
        key = task_key(name.strip())
        if key in ranges:
            raise SweepError(f"range '{item}': {key} is given twice; give each task one range")
        ranges[key] = bounds
    return ranges


def parse_weights(text: str | None) -> dict[str, float]:
    """`pir=1,seg=2` → {"pir": 1.0, "seg": 2.0}."""
    from .registry import task_key
    weights: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        try:
            weights[task_key(name.strip())] = float(value)
        except ValueError:
            raise SweepError(f"weight '{item}': expected task=NUMBER, e.g. seg=2") from None
    return weights


# --------------------------------------------------------------------------------------------------
# The objective


def primary_metric(task: str) -> str:
    from .registry import get_task_class

    names = get_task_class(task).metric_names
    if not names:
        raise SweepError(f"task '{task}' declares no metric_names; a sweep cannot score it")
    return names[0]


def task_gaps(baseline: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Mapping[str, str],
              gaps: Mapping[str, float] | None = None) -> dict[str, float]:  # fmt: skip
    """The LQ→HQ gap of each task's primary metric; `gaps` overrides; a capped PSNR row gets CAPPED_GAP. A
    metric the task declares lower-better (an error) has a negative gap, so that a gain is still positive: a
    measured one is so already, and a given size or the raw-difference fallback is negated."""
    from .metrics import PSNR_CAP_DB
    from .registry import lower_is_better

    result = {}
    for task, metric in metrics.items():
        sign = -1.0 if lower_is_better(task, metric) else 1.0
        if gaps and task in gaps:
            result[task] = sign * float(gaps[task])
            continue
        lq, hq = baseline[task]["lq"][metric], baseline[task]["hq"][metric]
        if metric == "psnr" and hq >= PSNR_CAP_DB - 1e-6:
            result[task] = CAPPED_GAP
        elif abs(hq - lq) < 1e-6:  # a downstream model that cannot tell clean from degraded: raw difference
            result[task] = sign
        else:
            result[task] = hq - lq
    return result


def objective(values: Mapping[str, float], baseline: Mapping[str, Mapping[str, Mapping[str, float]]],
              metrics: Mapping[str, str], weights: Mapping[str, float],
              gaps: Mapping[str, float]) -> tuple[float, dict[str, float]]:  # fmt: skip
    """Σ_k w_k (m_k − LQ_k) / gap_k over the tasks of `metrics`; returns it and each task's gain."""
    gains = {}
    for task, metric in metrics.items():
        gains[task] = (values[task] - baseline[task]["lq"][metric]) / gaps[task]
    return sum(weights.get(task, 1.0) * gain for task, gain in gains.items()), gains


# --------------------------------------------------------------------------------------------------
# Ray


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """Join `address`, or start a local Ray sized to this machine; shut down only what this started.

    Yields True when this call started (and will stop) Ray.
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        ray.init(
            num_cpus=cpus, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=True
        )
    try:
        yield True
    finally:
        ray.shutdown()


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """Fail at once when no node of the cluster can hold one trial; returns the cluster's resources."""
    import ray

    total = ray.cluster_resources()
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive", True)]
    most_gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    most_cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    if gpus_per_trial > most_gpus:
        where = (
            "this machine has" if len(nodes) <= 1 else f"the largest of the cluster's {len(nodes)} nodes has"
        )
        raise SweepError(
            f"--gpus-per-trial {gpus_per_trial:g} but {where} {most_gpus:g} GPU(s) "
            f"(cluster total {total.get('GPU', 0.0):g}); use --gpus-per-trial 0 to run on CPUs, "
            "or --address of a cluster with GPUs"
        )
    if cpus_per_trial > most_cpus:
        raise SweepError(
            f"--cpus-per-trial {cpus_per_trial:g} but the largest node has {most_cpus:g} CPU(s); ask for fewer"
        )
    return total


def _trial_dirname(trial) -> str:
    return trial.trial_id


OUTCOME_FILE = "outcome.json"


def _write_outcome(trials: str, trial_id: str, status: str | None) -> None:
    path = Path(trials) / trial_id / OUTCOME_FILE
    if status is None:
        path.unlink(missing_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"status": status}))


def _outcome_recorder(trials: Path):
    """A Tune callback that writes each trial's final status, as Tune decides it on the driver, to
    `trials/<id>/outcome.json`: TERMINATED (ran to its end, or stopped by the scheduler) or ERROR (failed
    after its retries). A trial left without one was interrupted. (Built here because importing
    ray.tune takes a second; Tune keeps it with the experiment, so a restored sweep records too.)"""
    from ray.tune import Callback

    class OutcomeRecorder(Callback):
        def __init__(self, folder: str):
            self.folder = folder

        def on_trial_start(self, iteration, trials, trial, **info):
            _write_outcome(self.folder, trial.trial_id, None)

        def on_trial_complete(self, iteration, trials, trial, **info):
            _write_outcome(self.folder, trial.trial_id, "TERMINATED")

        def on_trial_error(self, iteration, trials, trial, **info):
            _write_outcome(self.folder, trial.trial_id, "ERROR")

    return OutcomeRecorder(str(trials))


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------
# Inside a trial (a Ray worker process)


class _TrialTimer:
    """Wall-clock intervals spent working, appended to `timing.json` (kept across retries), and the setup
    of each attempt: from entering the trial function to the start of the work (imports, MLflow)."""

    def __init__(self, path: Path, entered: float):
        self.path = path
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        self.segments = saved.get("segments", [])
        self.setup = [*saved.get("setup", []), [entered, time.time()]]
        self._since: float | None = None

    def resume(self) -> None:
        self._since = time.time()

    def pause(self) -> None:
        if self._since is not None:
            self.segments.append([self._since, time.time()])
            self._since = None
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps({"segments": self.segments, "setup": self.setup}))
            os.replace(temporary, self.path)


def _link_source(source: Path, target: Path) -> None:
    """Make `target` (the stage-1 checkpoint the engine's stage 2 starts from) point at `source`."""
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source)
    except OSError:  # a filesystem without symlinks
        import shutil

        shutil.copyfile(source, target)


def _engine_run_folder(output: Path, kind: str, task: str = "") -> Path:
    """Where the engine keeps the MLflow run id of a call: the run folder for `train`, the stage folder
    for `add_task`. A resumed call continues the run named there."""
    return output if kind == "beta" else output / f"stage3-{task}"


def _child_run(job: dict, output: Path, trial_id: str, params: Mapping[str, Any]):
    """The trial's MLflow run, nested under the sweep's, as a `Tracker`: created once, then continued by
    retries, by a resumed sweep and by the engine, which is called with `resume=True` and so continues the run
    named in `output`. Continued, it logs no (metric, step) point the run already holds, as the engine's
    tracker does: a retried or resumed trial validates again the steps after its last checkpoint."""
    from .engine.tracking import Tracker, load_run_id, save_run_id

    tracker = Tracker(job["tracking_uri"], job["experiment"])
    tags = {"mlflow.parentRunId": job["parent_run_id"], "unirestore.sweep": job["kind"],
            "unirestore.trial_id": trial_id}  # fmt: skip
    save_run_id(output, tracker.start(f"{job['name']}-{trial_id}", tags, run_id=load_run_id(output)))
    tracker.log_params({f"sweep.{key}": value for key, value in params.items()})
    return tracker


def _run_trial(params: dict, job: dict) -> None:
    """One trial: stage 2 with the sampled β (`job["kind"] == "beta"`), or stage 3 of one new task with
    the sampled learning rate ("extend"). Reports each validation to Tune; ends its MLflow run."""
    entered = time.time()
    from ray import tune

    os.environ.update(job["env"])
    from .engine import add_task, train

    trial_id = tune.get_context().get_trial_id()
    output = Path(job["trials"]) / trial_id
    output.mkdir(parents=True, exist_ok=True)
    config = from_dict(RunConfig, job["config"], source="sweep")
    config.output, config.run_name = str(output), f"{job['name']}-{trial_id}"
    if job["kind"] == "beta":
        beta = {task: float(value) for task, value in params["beta"].items()}
        config.train.beta = {**config.train.beta, **beta}
        flat_params = {f"beta.{task}": value for task, value in beta.items()}
        tasks, prefix = list(job["tasks"]), "stage2/val"
        # The engine's stage 2 starts from <run folder>/stage1.safetensors: the sweep's source goes there.
        _link_source(Path(job["source"]), output / "stage1.safetensors")

        def call(on_validation):
            return train(config, stages=(2,), resume=True, on_validation=on_validation, progress=False)
    else:
        task = params["task"]
        config.train.lr = float(params["lr"])
        flat_params = {"task": task, "lr": config.train.lr}
        tasks, prefix = [task], f"stage3-{task}/val"

        def call(on_validation):
            return add_task(
                config, job["source"], task, resume=True, on_validation=on_validation, progress=False
            )

    # Always resume=True: a retry continues the trial's last checkpoint, and the engine continues the child
    # run created here (named in its run folder) instead of starting a run of its own, outside the sweep.
    metrics = {task: job["metrics"][task] for task in tasks}
    tracker = _child_run(job, _engine_run_folder(output, job["kind"], tasks[0]), trial_id, flat_params)
    timer = _TrialTimer(output / TIMING_FILE, entered)
    stopped = False

    def on_validation(step: int, values: Mapping[str, float]) -> None:
        nonlocal stopped
        primary = {
            task: float(values[f"{prefix}/{task}/restored/{metric}"]) for task, metric in metrics.items()
        }
        score, gains = objective(primary, job["baseline"], metrics, job["weights"], job["gaps"])
        logged = {"sweep/objective": score, **{f"sweep/gain/{task}": gain for task, gain in gains.items()}}
        tracker.log_metrics({key: value for key, value in logged.items() if math.isfinite(value)}, step)
        report = {"step": step, "objective": score, **{f"{t}/{metrics[t]}": v for t, v in primary.items()},
                  **{f"gain/{task}": gain for task, gain in gains.items()}}  # fmt: skip
        timer.pause()
        try:
            tune.report(report)
        except SystemExit:  # the scheduler stopped this trial: Tune ends the training thread here
            stopped = True
            raise
        finally:
            timer.resume()

    status = "FAILED"
    timer.resume()
    try:
        call(on_validation)
        status = "FINISHED"
    except SystemExit:
        status = "FINISHED" if stopped else "KILLED"
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        timer.pause()
        with contextlib.suppress(Exception):  # the driver reconciles the run's status in any case
            tracker.end(status)


# --------------------------------------------------------------------------------------------------
# On the driver


def _absolute_config(config: RunConfig) -> RunConfig:
    """A copy with every path absolute, so that trials do not depend on their working directory."""
    config = from_dict(RunConfig, to_dict(config), source="config")
    if config.prior != "tiny" and Path(config.prior).expanduser().exists():
        config.prior = str(Path(config.prior).expanduser().resolve())
    if config.data != "builtin":
        config.data = str(Path(config.data).expanduser().resolve())
    config.downstream_checkpoints = {
        name: str(Path(path).expanduser().resolve()) for name, path in config.downstream_checkpoints.items()
    }
    prefix = "sqlite:///"
    if config.tracking_uri.startswith(prefix) and not config.tracking_uri[len(prefix) :].startswith("/"):
        config.tracking_uri = prefix + str(Path(config.tracking_uri[len(prefix) :]).resolve())
    elif "://" not in config.tracking_uri:
        config.tracking_uri = str(Path(config.tracking_uri).expanduser().resolve())
    return config


def _check_source(source: str | Path) -> tuple[Path, dict]:
    from .checkpoint import CheckpointError, read_checkpoint

    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise SweepError(
            f"checkpoint not found: {path}; give --from a .safetensors file written by unirestore"
        )
    try:
        _, metadata = read_checkpoint(path)
    except CheckpointError as error:
        raise SweepError(str(error)) from None
    return path, metadata


def _source_prior(config: RunConfig, metadata: dict) -> None:
    """The trials' prior: the config's when it names one, else (`tiny`, the default) the prior the source
    checkpoint was trained on, as `task add`, `eval` and `restore` take it. The defaults that depend on the
    prior (learning rate, β, the step counts and batch size of `PRESET_TRAIN`) then follow the prior the trials
    train on; the latter are filled in here, so that the trial length and validation set follow it too.

    Before Ray starts, from the prior's configs and weight files alone: a prior folder that has moved since the
    checkpoint was trained, and a prior the checkpoint does not load onto, are refused (each trial would fail)."""
    from .checkpoint import prior_problem
    from .prior import prior_identity

    recorded = metadata["prior"]["name"]
    if config.prior == "tiny":
        config.prior = recorded
    if config.prior == recorded and Path(recorded).is_absolute() and not Path(recorded).exists():
        raise SweepError(
            f"checkpoint {metadata['path']} was trained on prior folder {recorded}, which is not there any more; "
            "if it has moved, give its new place with --set prior=FOLDER"
        )
    problem = prior_problem(metadata, prior_identity(config.prior), option="--set prior=FOLDER")
    if problem:
        raise SweepError(problem)
    config.train = config.train.for_prior(config.prior)


def _check_tasks(tasks: str | Sequence[str]) -> list[str]:
    from .registry import UnknownTaskError, parse_task_list

    try:
        return parse_task_list(tasks if isinstance(tasks, str) else list(tasks))
    except UnknownTaskError as error:
        raise SweepError(str(error)) from None


def _check_range(name: str, low: float, high: float) -> tuple[float, float]:
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise SweepError(
            f"{name} range {low:g}:{high:g}: need 0 < LOW <= HIGH (values are sampled log-uniformly)"
        )
    return low, high


def _check_common(
    num_samples: int, gpus_per_trial: float | None, cpus_per_trial: float, max_failures: int
) -> None:
    if num_samples < 1:
        raise SweepError(f"--num-samples {num_samples}: need at least 1")
    if gpus_per_trial is not None and gpus_per_trial < 0:
        raise SweepError(f"--gpus-per-trial {gpus_per_trial:g}: must be >= 0")
    if cpus_per_trial <= 0:
        raise SweepError(f"--cpus-per-trial {cpus_per_trial:g}: must be positive")
    if max_failures < -1:
        raise SweepError(f"max_failures={max_failures}: use -1 (retry forever), 0 (never) or a count")


def _check_inputs(config: RunConfig, tasks: Sequence[str]) -> None:
    """Before Ray starts: the data config and its roots, the validation sets the trials are scored on, and
    the real downstream models the tasks load, at the trials' crop size (a task plugin's `prepare` may train
    and cache a model of its own for that size, which the trials then find)."""
    import torch
    from rich.markup import escape

    from .console import make_console
    from .data.config import training_images_in_test
    from .engine import _check_data, _check_downstream, _check_held_out_data, _data_config, build_tasks
    from .prior import prior_native_size

    _check_data(config, list(tasks))
    size = config.train.crop_size or prior_native_size(config.prior)  # the configs alone: no weights are read
    _check_held_out_data(build_tasks(config, list(tasks), torch.device("cpu"), size), splits=("val",))
    _check_downstream(config, list(tasks), size)
    data = _data_config(config)
    for message in training_images_in_test(data, list(tasks), str(config.data), "val") if data else []:
        make_console(stderr=True).print(f"[yellow]note[/yellow]: {escape(message)}")


def _check_folder(folder: Path, spec: dict, config: RunConfig, resume: bool) -> bool:
    """Before Ray starts: True when `folder` holds a Tune experiment to restore. A sweep there is refused
    without `resume`, and with it when the settings differ from those it saved: its trials would each
    refuse to resume their run folders (the engine's check), one by one, inside Ray."""
    from ray import tune

    tune_folder = folder / "tune"
    saved = folder / "sweep.json"
    exists = tune_folder.is_dir() and tune.Tuner.can_restore(str(tune_folder))
    if exists and not resume:
        raise SweepError(
            f"sweep folder {folder} already holds a sweep; add --resume to continue it, or give another --output"
        )
    if exists and saved.is_file():
        changed = _resume_changes(json.loads(saved.read_text()), {**spec, "config": to_dict(config)})
        if changed:
            raise SweepError(
                f"--resume of {folder} with other settings than its sweep's ({'; '.join(changed[:6])}); resume "
                f"with the same options (saved in {saved}), or give another --output for a new sweep"
            )
    return exists


def _resume_changes(saved: dict, current: dict) -> list[str]:
    """'setting: saved → current' for each setting that differs. The trials' config is compared as the engine
    compares a resumed run's, but for the tracking store and experiment, which hold the sweep's runs; a
    sweep.json written before it held the config is compared on the sweep's options alone."""
    from .engine import _OPERATIONAL, _flatten

    ignored = _OPERATIONAL - {"tracking_uri", "experiment"}

    def settings(spec: dict) -> dict:
        options = {key: value for key, value in spec.items() if key != "config"}
        config = _flatten(spec["config"]) if "config" in saved else {}
        return {**options, **{key: value for key, value in config.items()
                              if key not in ignored and not key.startswith("stage0.")}}  # fmt: skip

    before, after = settings(saved), settings(current)
    return [f"{key}: {before.get(key)} → {after.get(key)}" for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]  # fmt: skip


def _baseline(
    config: RunConfig, source: Path, tasks: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """Each task's LQ and HQ rows on the validation set the trials validate on (built once, here). Builds
    the downstream models first, so that trials read them from the cache instead of each training them."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu")
    rows = _lq_hq_rows(config, source, tasks, device)
    if device.type == "cuda":  # the trials, other processes on the same GPUs, get the memory the models took
        torch.cuda.empty_cache()
    return rows


def _lq_hq_rows(config: RunConfig, source: Path, tasks: Sequence[str], device) -> dict:
    """`_baseline`'s evaluation; the models it loads are gone when it returns."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .engine import build_tasks
    from .evaluate import evaluate
    from .prior import load_prior

    try:
        prior = load_prior(config.prior, device=device)
        model = load_checkpoint(source, prior=prior, device=device)
    except (CheckpointError, ValueError) as error:
        raise SweepError(str(error)) from None
    objects = build_tasks(config, list(tasks), device, config.train.crop_size or model.native_size)
    for task in objects.values():
        prepare = getattr(task, "prepare", None)
        if callable(prepare):
            prepare()
    train_config = config.train
    table = evaluate(model, objects, split="val", samples=train_config.val_samples, batch_size=train_config.batch_size,
                     seed=train_config.seed, inputs=("lq", "hq"), device=device)  # fmt: skip
    return {task: {"lq": dict(rows["lq"]), "hq": dict(rows["hq"])} for task, rows in table.results.items()}


def _trial_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key.startswith(_PROPAGATED_PREFIXES) or key in _PROPAGATED
    }


def _read_segments(folder: Path, key: str = "segments") -> list[list[float]]:
    try:
        return json.loads((folder / TIMING_FILE).read_text()).get(key, [])
    except (OSError, json.JSONDecodeError):
        return []


def _check_interrupted(records: Sequence[TrialRecord], folder: Path) -> None:
    unfinished = [record.trial_id for record in records if record.status == "INTERRUPTED"]
    if unfinished:
        raise SweepInterrupted(
            f"sweep interrupted with {len(unfinished)} of {len(records)} trial(s) unfinished; "
            f"continue it with --resume --output {folder}"
        )


def _first_error(records: Sequence[TrialRecord], folder: Path) -> str:
    errors = [record.error for record in records if record.error]
    first = f" (first error: {errors[0]})" if errors else ""
    return f"{first}; see {folder / 'tune'}"


def _union_seconds(segments: Sequence[Sequence[float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(segments):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _records(results, trials: Path, kind: str, steps: int) -> list[TrialRecord]:
    """One record per Tune result; checkpoint = the model file written at the last validated step."""
    from .engine.tracking import load_run_id

    records = []
    for result in results:
        trial_id = Path(result.path).name
        folder = trials / trial_id
        last = dict(result.metrics or {})
        config = dict(result.config or {})
        if kind == "beta":
            params = {f"beta.{task}": float(value) for task, value in config.get("beta", {}).items()}
            stage = "stage2"
        else:
            params = {"task": config.get("task", ""), "lr": float(config.get("lr", float("nan")))}
            stage = f"stage3-{params['task']}"
        step = int(last.get("step", 0))
        final, periodic = folder / f"{stage}.safetensors", folder / stage / "last.safetensors"
        checkpoint = final if final.is_file() and step >= steps else periodic if periodic.is_file() else None
        skipped = {"step", "objective"}
        metrics = {key: float(value) for key, value in last.items()
                   if "/" in key and not key.startswith(("gain/", "config/")) and key not in skipped
                   and isinstance(value, (int, float))}  # fmt: skip
        try:
            status = json.loads((folder / OUTCOME_FILE).read_text())["status"]
        except (OSError, json.JSONDecodeError, KeyError):
            status = "INTERRUPTED"
        error = ""
        if status == "ERROR" and result.error is not None:
            text = str(result.error).strip()
            error = text.splitlines()[-1][:300] if text else type(result.error).__name__
        segments = _read_segments(folder)
        records.append(TrialRecord(
            trial_id=trial_id, status=status, params=params, step=step,
            objective=float(last["objective"]) if "objective" in last else None, metrics=metrics,
            checkpoint=checkpoint, run_id=load_run_id(_engine_run_folder(folder, kind, params.get("task", ""))),
            # stopped by the scheduler, at the last validation too (below the cutoff there): no final checkpoint
            # and evaluation, so its run lacks the test metrics the others have
            stopped_early=status == "TERMINATED" and (step < steps or not final.is_file()),
            work_seconds=sum(stop - start for start, stop in segments), error=error,
        ))  # fmt: skip
    return sorted(records, key=lambda record: record.trial_id)


def _reconcile_runs(tracking_uri: str, parent_run_id: str, records: Sequence[TrialRecord]) -> None:
    """Give every child run of the sweep its final status (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    wanted = {record.run_id: record for record in records if record.run_id}
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    for run in children:
        record = wanted.get(run.info.run_id)
        if record is None or record.status == "INTERRUPTED":
            status = "KILLED" if run.info.status == "RUNNING" or record is not None else run.info.status
        else:
            status = "FAILED" if record.status == "ERROR" else "FINISHED"
            if record.stopped_early:
                client.set_tag(run.info.run_id, "unirestore.stopped_early", "true")
        if run.info.status != status:
            client.set_terminated(run.info.run_id, status=status)


def sweep_run_name(kind: str, folder: Path) -> str:
    """The parent run's name: the sweep folder's (`sweep-beta` for the default `runs/sweep-beta`), after
    `sweep-<kind>-` where the folder's name does not already say which sweep it is."""
    return folder.name if folder.name.startswith(f"sweep-{kind}") else f"sweep-{kind}-{folder.name}"


def _spec_params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep's settings as MLflow params, written as the command line takes them (`pir,seg,cls`,
    `seg=0.01:1`) and as the trials' own params are (`tasks`: `pir,seg,cls`), not as JSON."""
    params = dict(spec)
    params["tasks"] = ",".join(spec["tasks"])
    if "ranges" in spec:
        params["ranges"] = ",".join(f"{task}={low}:{high}" for task, (low, high) in spec["ranges"].items())
    if "lr_range" in spec:
        params["lr_range"] = "{}:{}".format(*spec["lr_range"])
    return params


@dataclass
class _Session:
    """One sweep call on the driver: Ray, the sweep folder, the parent MLflow run, the trials' records."""

    kind: str
    config: RunConfig
    folder: Path
    gpus: float
    cpus: float
    restore: bool
    tracker: Any
    name: str  # the parent run's name; each trial's run is named `<name>-<trial id>`
    records: list[TrialRecord] = field(default_factory=list)
    driver_seconds: float = 0.0


@contextlib.contextmanager
def _session(kind: str, config: RunConfig, folder: Path, spec: dict, *, resume: bool, address: str | None,
             cpus_per_trial: float, gpus_per_trial: float | None) -> Iterator[_Session]:  # fmt: skip
    """The sweep folder checked, Ray (joined or started), a fail-fast resource check, the sweep's settings
    saved, then the parent MLflow run (creating the tracking database and the experiment before any trial);
    on the way out, every child run gets its final status and the parent run ends (FINISHED, FAILED, or
    KILLED when interrupted)."""
    from .engine.tracking import Tracker, load_run_id, save_run_id

    restore = _check_folder(folder, spec, config, resume)
    with ray_session(address):
        gpus = _resolve_gpus(gpus_per_trial)
        check_resources(cpus_per_trial, gpus)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "sweep.json", json.dumps({**spec, "config": to_dict(config)}, indent=2))
        tracker = Tracker(config.tracking_uri, config.experiment)
        # Not the trials' `unirestore.sweep`: a filter on that selects the trials alone, runs that compare column
        # by column (the README's `runs compare --filter`), without this one's row of other metrics.
        tags = {"unirestore.sweep_parent": kind, "unirestore.tasks": ",".join(spec["tasks"]),
                "unirestore.prior": config.prior}  # fmt: skip
        name = config.run_name or sweep_run_name(kind, folder)
        run_id = tracker.start(name, tags, run_id=load_run_id(folder) if resume else "")
        save_run_id(folder, run_id)
        tracker.log_config(to_dict(config))
        tracker.log_params({**_spec_params(spec), "prior": config.prior, "data": config.data, "gpus_per_trial": gpus,
                            "cpus_per_trial": cpus_per_trial})  # fmt: skip
        session = _Session(kind, config, folder, gpus, cpus_per_trial, restore, tracker, name)
        status = "FAILED"
        try:
            yield session
            status = "FINISHED"
        except (KeyboardInterrupt, SweepInterrupted):
            status = "KILLED"
            raise
        finally:
            with contextlib.suppress(Exception):
                _reconcile_runs(config.tracking_uri, run_id, session.records)
            tracker.end(status)


def _run_trials(session: _Session, source: Path, tasks: Sequence[str], space: dict, *, num_samples: int,
                scheduler, seed: int, max_failures: int, show: bool, steps: int,
                weights: Mapping[str, float] | None = None, gaps: Mapping[str, float] | None = None) -> dict:  # fmt: skip
    """The LQ/HQ baseline on the driver, then the trials (`Tuner.fit`, or `Tuner.restore` of the folder's
    experiment); fills `session.records` and returns the baseline and the gaps the objective used."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    config, folder = session.config, session.folder
    started = time.time()
    baseline = _baseline(config, source, tasks)
    session.driver_seconds += time.time() - started
    metrics = {task: primary_metric(task) for task in tasks}
    task_gap = task_gaps(baseline, metrics, gaps)
    job = {
        "kind": session.kind,
        "name": session.name,
        "config": to_dict(_trial_config(config, session.gpus)),
        "source": str(source),
        "trials": str(folder / "trials"),
        "tasks": list(tasks),
        "metrics": metrics,
        "baseline": baseline,
        "weights": dict(weights or {}),
        "gaps": task_gap,
        "tracking_uri": config.tracking_uri,
        "experiment": config.experiment,
        "parent_run_id": session.tracker.run_id,
        "env": _trial_environment(),
    }
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, job=job), {"cpu": session.cpus, "gpu": session.gpus}
    )
    with _environment(RAY_CHDIR_TO_TRIAL_DIR="0"):
        if session.restore:
            tuner = tune.Tuner.restore(str(folder / "tune"), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    num_samples=num_samples,
                    search_alg=BasicVariantGenerator(random_state=seed),
                    scheduler=scheduler,
                    trial_dirname_creator=_trial_dirname,
                    # A worker process runs trial after trial: torch and the engine are imported once.
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=str(folder),
                    verbose=1 if show else 0,
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    callbacks=[_outcome_recorder(folder / "trials")],
                ),
            )
        results = tuner.fit()
    session.records[:] = _records(results, folder / "trials", session.kind, steps)
    _check_interrupted(session.records, folder)
    return {"baseline": baseline, "gaps": task_gap}


def _plot_objectives(session: _Session, path: Path) -> Path | None:
    """A PNG of each trial's objective against the step as its run logged it, one line per trial (a panel per
    task of an extension sweep): the sweep at a glance in its parent run. None when no trial logged one."""
    from .plots import panels, save

    client, lines = session.tracker.client, {}
    for record in session.records:
        history = client.get_metric_history(record.run_id, "sweep/objective") if record.run_id else []
        if history:
            history = sorted(history, key=lambda metric: (metric.step, metric.timestamp))
            values = ", ".join(f"{key.split('.')[-1]}={_cell(value)}" for key, value in record.params.items()
                               if key != "task")  # fmt: skip
            label = f"{record.trial_id.rsplit('_', 1)[-1]}: {values}"
            lines.setdefault(str(record.params.get("task", "")), []).append((label, history))
    if not lines:
        return None
    figure, axes = panels(len(lines), columns=3, width=4.6, height=3.4)
    for axis, (task, trials) in zip(axes, lines.items()):
        for label, history in trials:
            axis.plot([m.step for m in history], [m.value for m in history], marker="o" if len(history) < 20 else None,
                      markersize=3, linewidth=1.2, label=label)  # fmt: skip
        axis.set_title(f"{session.name}: objective {task}".strip(), fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    return save(figure, path, dpi=110)


def _resolve_gpus(gpus_per_trial: float | None) -> float:
    """None: one GPU per trial where the cluster has GPUs, else none."""
    if gpus_per_trial is not None:
        return float(gpus_per_trial)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0.0) >= 1 else 0.0


def _trial_config(config: RunConfig, gpus: float) -> RunConfig:
    """The trials' config: on the CPU when they get no GPU (a GPU node's other GPUs are not theirs)."""
    config = from_dict(RunConfig, to_dict(config), source="config")
    if gpus == 0 and config.train.device == "auto":
        config.train.device = "cpu"
    return config


def _write_results(folder: Path, records: Sequence[TrialRecord], timing: SweepTiming, extra: dict) -> Path:
    def plain(record: TrialRecord) -> dict:
        data = asdict(record)
        data["checkpoint"] = str(record.checkpoint) if record.checkpoint else None
        return data

    path = folder / "results.json"
    atomic_write_text(
        path, json.dumps({**extra, "trials": [plain(r) for r in records], "timing": timing.as_dict()}, indent=2)
    )
    return path


# --------------------------------------------------------------------------------------------------
# Public API


def sweep_beta(
    source: str | Path,
    tasks: str | Sequence[str] = ("pir", "seg", "cls"),
    *,
    config: RunConfig | None = None,
    num_samples: int = 8,
    search: str = "random",
    scheduler: str = "asha",
    beta_ranges: Mapping[str, tuple[float, float]] | None = None,
    weights: Mapping[str, float] | None = None,
    gaps: Mapping[str, float] | None = None,
    steps: int | None = None,
    val_every: int | None = None,
    reduction_factor: float = 2.0,
    gpus_per_trial: float | None = None,
    cpus_per_trial: float = 1.0,
    address: str | None = None,
    output: str | Path | None = None,
    resume: bool = False,
    max_failures: int = 1,
    seed: int = 0,
    show: bool = True,
) -> BetaSweepResult:
    """Search stage 2's β weights from the stage-1 checkpoint `source` (see the module docstring).

    `config` is the base RunConfig (prior, data, tracking, train settings); each trial overrides its
    `train.beta` with the sampled values. `beta_ranges[task] = (low, high)` (log-uniform; low == high fixes
    it) default to [β₀/10, 10·β₀] around each task's default β₀. `search="grid"` takes `num_samples`
    log-spaced values per task and runs every combination. `steps` (default `train.stage2_steps`) and
    `val_every` (default steps/4) set the trial length and the validation / ASHA rung interval.
    `weights[task]` weigh the tasks in the objective (default 1); `gaps[task]` replace measured gaps.
    `gpus_per_trial=None` gives each trial one GPU where the cluster has GPUs.
    """
    started = time.time()
    config = _absolute_config(config or RunConfig())
    names = _check_tasks(tasks)
    if search not in SEARCHES:
        raise SweepError(f"--search {search!r}: use one of {', '.join(SEARCHES)}")
    if scheduler not in SCHEDULERS:
        raise SweepError(f"--scheduler {scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    _check_common(num_samples, gpus_per_trial, cpus_per_trial, max_failures)  # the options, then the files
    from .engine.tracking import check_tracking_uri

    check_tracking_uri(config.tracking_uri, "--set tracking_uri=")
    source_path, metadata = _check_source(source)
    _source_prior(config, metadata)
    _check_inputs(config, names)
    steps = int(steps if steps is not None else config.train.stage2_steps)
    if steps < 1:
        raise SweepError(f"--steps {steps}: need at least 1")
    val_every = int(val_every if val_every is not None else max(1, steps // 4))
    if not 1 <= val_every <= steps:
        raise SweepError(f"val_every={val_every}: must be between 1 and --steps ({steps})")
    if reduction_factor <= 1:
        raise SweepError(f"reduction_factor={reduction_factor:g}: must be above 1")
    ranges = _beta_ranges(names, beta_ranges, config)
    for name in [*(weights or {}), *(gaps or {})]:
        if name not in names:
            raise SweepError(
                f"objective weight or gap for '{name}', which is not swept; the tasks are {', '.join(names)}"
            )
    if any(not gap > 0 for gap in (gaps or {}).values()):
        raise SweepError(f"gaps {dict(gaps)}: each must be positive")
    if metadata["extra"].get("stage") not in (None, "stage1"):
        from rich.markup import escape

        from .console import make_console

        make_console(stderr=True).print(
            f"[yellow]note[/yellow]: {escape(str(source_path))} is a {metadata['extra'].get('stage')} checkpoint; "
            "each trial fine-tunes its TFA and prompts instead of training them from the start (give a "
            "stage1.safetensors)"
        )

    from ray import tune

    config.tasks = list(names)
    config.train.stage2_steps = steps
    config.train.val_every = val_every
    config.train.checkpoint_every = val_every  # a checkpoint at every validated step: the best one exists
    folder = Path(output or "runs/sweep-beta").expanduser().resolve()
    spec = {"kind": "beta", "source": str(source_path), "tasks": names, "search": search, "scheduler": scheduler,
            "num_samples": num_samples, "ranges": {t: list(r) for t, r in ranges.items()}, "steps": steps,
            "val_every": val_every, "seed": seed}  # fmt: skip

    with _session("beta", config, folder, spec, resume=resume, address=address, cpus_per_trial=cpus_per_trial,
                  gpus_per_trial=gpus_per_trial) as session:  # fmt: skip
        if search == "grid":
            values = {t: _log_grid(low, high, num_samples) for t, (low, high) in ranges.items()}
            space = {"beta": {t: tune.grid_search(v) if len(v) > 1 else v[0] for t, v in values.items()}}
        else:
            space = {
                "beta": {
                    t: tune.loguniform(low, high) if low < high else low for t, (low, high) in ranges.items()
                }
            }
        asha = None
        if scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # stop_last_trials=False: reaching the last step is no reason to stop a trial before it writes its
            # final checkpoint and evaluation (a trial below the cutoff there is still stopped).
            asha = ASHAScheduler(time_attr="step", metric="objective", mode="max", max_t=steps, grace_period=val_every,
                                 reduction_factor=reduction_factor, stop_last_trials=False)  # fmt: skip
        found = _run_trials(session, source_path, names, space, num_samples=num_samples if search == "random" else 1,
                            scheduler=asha, seed=seed, max_failures=max_failures, show=show, steps=steps,
                            weights=weights, gaps=gaps)  # fmt: skip
        records = session.records
        scored = [r for r in records if r.objective is not None and r.checkpoint is not None]
        if not scored:
            raise SweepError(f"no trial of the sweep reached a validation{_first_error(records, folder)}")
        # Objectives are compared at the last step: a trial stopped early is not better for having trained
        # less, so the best is taken among the trials that ran to the end where there are any.
        finished = [r for r in scored if r.step >= steps and r.status == "TERMINATED"]
        best = max(finished or scored, key=lambda r: r.objective)
        beta = {key.split(".", 1)[1]: value for key, value in best.params.items()}
        config_file = _write_beta_config(folder / "best.yaml", config, beta, best, source_path)
        timing = _timing(started, records, folder / "trials", session.driver_seconds)
        _write_results(folder, records, timing, {"best": best.trial_id, "beta": beta, **found,
                                                 "checkpoint": str(best.checkpoint)})  # fmt: skip
        tracker = session.tracker
        tracker.log_metrics({"sweep/best_objective": best.objective, "sweep/trials": len(records),
                             "sweep/wall_seconds": timing.wall_seconds, "sweep/overhead_share": timing.overhead_share,
                             **{f"sweep/best_beta/{t}": v for t, v in beta.items()}})  # fmt: skip
        tracker.set_tags(
            {"unirestore.best_trial": best.trial_id, "unirestore.best_checkpoint": str(best.checkpoint)}
        )
        tracker.log_artifact(config_file)
        tracker.log_artifact(folder / "results.json")
        objectives = _plot_objectives(session, folder / "objective.png")
        if objectives is not None:
            tracker.log_artifact(objectives)
    result = BetaSweepResult(folder=folder, beta=beta, config_file=config_file, checkpoint=best.checkpoint, best=best,
                             trials=records, baseline=found["baseline"], run_id=tracker.run_id, timing=timing)  # fmt: skip
    if show:
        print_summary(result)
    return result


def sweep_extend(
    source: str | Path,
    tasks: str | Sequence[str],
    *,
    config: RunConfig | None = None,
    num_samples: int = 1,
    lr_range: tuple[float, float] | None = None,
    steps: int | None = None,
    val_every: int | None = None,
    gpus_per_trial: float | None = None,
    cpus_per_trial: float = 1.0,
    address: str | None = None,
    output: str | Path | None = None,
    resume: bool = False,
    max_failures: int = 1,
    seed: int = 0,
    show: bool = True,
) -> ExtendSweepResult:
    """Add the new `tasks` to the model of `source`: `num_samples` stage-3 trials per task, learning rates
    log-uniform in `lr_range` (default: the run's peak lr fixed), then the best prompt of each task (by its
    primary validation metric) merged into `<output>/merged.safetensors`, in the order of `tasks`.
    """
    started = time.time()
    config = _absolute_config(config or RunConfig())
    names = _check_tasks(tasks)
    _check_common(num_samples, gpus_per_trial, cpus_per_trial, max_failures)  # the options, then the files
    from .engine.tracking import check_tracking_uri

    check_tracking_uri(config.tracking_uri, "--set tracking_uri=")
    source_path, metadata = _check_source(source)
    _source_prior(config, metadata)
    present = [task for task in names if task in metadata["tasks"]]
    if present:
        raise SweepError(
            f"{source_path} already has a prompt for {', '.join(present)}; extend it with other tasks"
        )
    if metadata["model_config"].get("shared_prompt"):
        raise SweepError(
            f"{source_path} uses one prompt shared by all tasks; it cannot be extended task by task"
        )
    from .checkpoint import extension_problem

    problem = extension_problem(metadata)
    if problem:
        raise SweepError(problem)
    _check_inputs(config, names)
    default_lr = config.train.peak_lr(config.prior, stage=3)
    low, high = _check_range("--lr", *(lr_range or (default_lr, default_lr)))
    steps = int(steps if steps is not None else config.train.stage3_steps)
    if steps < 1:
        raise SweepError(f"--steps {steps}: need at least 1")
    val_every = int(val_every if val_every is not None else steps)
    if not 1 <= val_every <= steps:
        raise SweepError(f"val_every={val_every}: must be between 1 and --steps ({steps})")

    from ray import tune

    config.train.stage3_steps = steps
    config.train.val_every = val_every
    config.train.checkpoint_every = val_every
    folder = Path(output or "runs/sweep-extend").expanduser().resolve()
    spec = {"kind": "extend", "source": str(source_path), "tasks": names, "num_samples": num_samples,
            "lr_range": [low, high], "steps": steps, "val_every": val_every, "seed": seed}  # fmt: skip

    with _session("extend", config, folder, spec, resume=resume, address=address, cpus_per_trial=cpus_per_trial,
                  gpus_per_trial=gpus_per_trial) as session:  # fmt: skip
        space = {"task": tune.grid_search(names), "lr": tune.loguniform(low, high) if low < high else low}
        found = _run_trials(session, source_path, names, space, num_samples=num_samples, scheduler=None, seed=seed,
                            max_failures=max_failures, show=show, steps=steps)  # fmt: skip
        records = session.records
        best: dict[str, TrialRecord] = {}
        for task in names:
            done = [r for r in records if r.params["task"] == task and r.objective is not None
                    and r.status == "TERMINATED" and r.checkpoint is not None and r.step >= steps]  # fmt: skip
            if not done:
                failed = [r for r in records if r.params["task"] == task]
                raise SweepError(f"no trial of task '{task}' finished{_first_error(failed, folder)}")
            best[task] = max(done, key=lambda r: r.objective)
        merging = time.time()
        merged = merge_prompts(source_path, {task: record.checkpoint for task, record in best.items()},
                               folder / "merged.safetensors")  # fmt: skip
        session.driver_seconds += time.time() - merging
        timing = _timing(started, records, folder / "trials", session.driver_seconds)
        _write_results(folder, records, timing, {"best": {t: r.trial_id for t, r in best.items()}, **found,
                                                 "checkpoint": str(merged)})  # fmt: skip
        tracker = session.tracker
        tracker.log_metrics({"sweep/trials": len(records), "sweep/wall_seconds": timing.wall_seconds,
                             "sweep/overhead_share": timing.overhead_share,
                             **{f"sweep/best_lr/{t}": r.params["lr"] for t, r in best.items()},
                             **{f"sweep/best_objective/{t}": r.objective for t, r in best.items()}})  # fmt: skip
        tracker.set_tags({"unirestore.merged_checkpoint": str(merged)})
        tracker.log_artifact(folder / "results.json")
        objectives = _plot_objectives(session, folder / "objective.png")
        if objectives is not None:
            tracker.log_artifact(objectives)
    result = ExtendSweepResult(folder=folder, checkpoint=merged, best=best, trials=records, baseline=found["baseline"],
                               run_id=tracker.run_id, timing=timing)  # fmt: skip
    if show:
        print_summary(result)
    return result


def merge_prompts(source: str | Path, prompts: Mapping[str, str | Path], output: str | Path) -> Path:
    """Write the model of `source` plus the prompt of each task of `prompts` (task → a checkpoint holding
    it, e.g. the one `add_task` wrote), added in the order given. Everything else is `source`'s."""
    from .checkpoint import load_checkpoint as load
    from .checkpoint import read_checkpoint, save_checkpoint

    model = load(source)
    _, source_metadata = read_checkpoint(source)
    trained = list(source_metadata["extra"].get("trained_prompts", source_metadata["tasks"]))
    for task, path in prompts.items():
        tensors, _ = read_checkpoint(path)
        key = f"prompts.prompts.{task}"
        if key not in tensors:
            raise SweepError(f"{path} holds no prompt for task '{task}'")
        model.add_task(task)
        model.prompts.prompts[task].data.copy_(tensors[key])
        trained.append(task)
    extra = {
        "stage": "stage3",
        "trained_prompts": trained,
        "merged_from": {t: str(p) for t, p in prompts.items()},
    }
    return save_checkpoint(model, output, extra=extra)


def _beta_ranges(
    names: Sequence[str], given: Mapping[str, tuple[float, float]] | None, config: RunConfig
) -> dict[str, tuple[float, float]]:
    """Each task's (low, high): `given`, else a decade either side of the β the config trains with."""
    from .registry import get_task_class

    given = dict(given or {})
    unknown = [name for name in given if name not in names]
    if unknown:
        raise SweepError(
            f"β range for {', '.join(unknown)}, which is not swept; the tasks are {', '.join(names)}"
        )
    ranges = {}
    for name in names:
        default = float(config.train.beta_for(name, get_task_class(name).default_beta, config.prior))
        low, high = given.get(name, (default / 10, default * 10))
        ranges[name] = _check_range(f"β of '{name}'", low, high)
    return ranges


def _log_grid(low: float, high: float, count: int) -> list[float]:
    if low == high or count == 1:
        return [low] if low == high else [math.sqrt(low * high)]
    step = (math.log(high) - math.log(low)) / (count - 1)
    return [float(f"{math.exp(math.log(low) + i * step):.6g}") for i in range(count)]


def _timing(
    started: float, records: Sequence[TrialRecord], trials: Path, driver_seconds: float
) -> SweepTiming:
    """The sweep's timing; trial intervals are clipped to this call (a resumed sweep counts only its own)."""
    ended = time.time()

    def clipped(key: str) -> list[list[float]]:
        found = [segment for record in records for segment in _read_segments(trials / record.trial_id, key)]
        return [[max(a, started), min(b, ended)] for a, b in found if min(b, ended) > max(a, started)]

    segments = clipped("segments")
    return SweepTiming(
        wall_seconds=ended - started,
        trial_seconds=_union_seconds(segments),
        trial_seconds_summed=sum(stop - start for start, stop in segments),
        driver_seconds=driver_seconds,
        trial_setup_seconds=sum(stop - start for start, stop in clipped("setup")),
    )


# Where a run writes and is tracked: the training of the winner chooses its own.
_PLACE_KEYS = ("output", "tracking_uri", "experiment", "run_name")


def _write_beta_config(path: Path, config: RunConfig, beta: Mapping[str, float], best: TrialRecord,
                       source: Path) -> Path:  # fmt: skip
    """best.yaml: the best trial's run config, as what differs from the defaults (its tasks always): the
    sampled β and the sweep's settings (--config, --set, --data, the trial length). Where to write and
    track is left to the training that reads it with `unirestore train --config best.yaml`."""
    winner = from_dict(RunConfig, to_dict(config), source="sweep")
    winner.train.beta = {**winner.train.beta, **{task: float(value) for task, value in beta.items()}}
    defaults = RunConfig()
    defaults.train = defaults.train.for_prior(winner.prior)  # the values `train` fills in for that prior anyway
    differences = _differences(to_dict(winner), to_dict(defaults))
    fields = {"tasks": list(winner.tasks),
              **{key: value for key, value in differences.items() if key not in (*_PLACE_KEYS, "tasks")}}  # fmt: skip
    header = (
        f"# The best trial of the β sweep in {path.parent}: {best.trial_id}, objective {best.objective:.4f} at "
        f"step {best.step},\n# stage 2 from {source}.\n"
        f"# Train it anew (stages 0, 1, 2):  unirestore train --config {path} --output DIR\n"
        f"# Its stage 2 alone, as the trial: copy {source} to DIR/stage1.safetensors, then\n"
        f"#   unirestore train --config {path} --stage 2 --output DIR\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True))
    try:  # the file must be one `unirestore train --config` accepts
        from .config import load_run_config

        load_run_config(path)
    except ConfigError as error:
        raise SweepError(f"{path}: {error}") from None
    return path


def _differences(values: dict, defaults: dict) -> dict:
    """The entries of `values` that differ from `defaults`; a section (a non-empty dict of defaults) is
    compared key by key, any other value whole."""
    found = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and default:
            value = _differences(value, default)
            if value:
                found[key] = value
        elif value != default:
            found[key] = value
    return found


# --------------------------------------------------------------------------------------------------
# Reporting


def trials_table(trials: Sequence[TrialRecord], best: Sequence[str] = (), title: str | None = None):
    """A rich table of the trials (the best ones starred)."""
    from rich.markup import escape
    from rich.table import Table

    params = list(dict.fromkeys(key for record in trials for key in record.params))
    metrics = list(dict.fromkeys(key for record in trials for key in record.metrics))
    table = Table(title=title)
    for column in ("", "trial", "status", *params, "step", "objective", *metrics, "work s", "MLflow run"):
        table.add_column(escape(column), justify="right" if column not in ("trial", "status", "task") else "left")
    for record in trials:
        status = record.status if not record.stopped_early else "stopped early"
        cells = [escape(_cell(record.params.get(key))) for key in params]  # data, not rich markup
        values = [_cell(record.metrics.get(key)) for key in metrics]
        table.add_row("★" if record.trial_id in best else "", record.trial_id, status, *cells, str(record.step),
                      _cell(record.objective), *values, f"{record.work_seconds:.1f}", record.run_id[:8])  # fmt: skip
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(result: BetaSweepResult | ExtendSweepResult, console=None) -> None:
    from .console import make_console

    console = console or make_console()
    if isinstance(result, BetaSweepResult):
        console.print(trials_table(result.trials, [result.best.trial_id], title=f"β sweep: {result.folder}"))
        console.print(
            f"best β: {', '.join(f'{k}={v:.4g}' for k, v in result.beta.items())}  → {result.config_file} "
            f"(unirestore train --config {result.config_file})"
        )
        console.print(f"best checkpoint: {result.checkpoint}")
    else:
        console.print(trials_table(result.trials, [r.trial_id for r in result.best.values()],
                                   title=f"extension sweep: {result.folder}"))  # fmt: skip
        console.print(f"merged checkpoint: {result.checkpoint} (+ {', '.join(result.best)})")
    for record in result.trials:
        if record.error:
            console.print(f"[red]{record.trial_id} failed[/red]: {record.error}")
    timing = result.timing
    console.print(
        f"wall {timing.wall_seconds:.1f} s: trials working {timing.trial_seconds:.1f} s "
        f"({timing.trial_seconds_summed:.1f} s summed), driver {timing.driver_seconds:.1f} s, "
        f"Ray overhead {timing.overhead_seconds:.1f} s ({100 * timing.overhead_share:.0f} %); "
        f"trials starting up in their worker processes: {timing.trial_setup_seconds:.1f} s summed"
    )
