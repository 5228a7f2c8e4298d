"""Training: `train` runs stages 0 → 1 → 2 of a `RunConfig`, `add_task` runs stage 3 from a checkpoint.

Both are plain functions without import-time side effects, so a sweep can call them in its trials and
receive validation metrics through `on_validation(step, metrics)`.

Run folder (`config.output`):

    config.yaml                  the resolved config of the last call (its local paths absolute)
    mlflow_run.json              the MLflow run id (a resumed run continues it)
    stage0/                      the tiny prior's stage 0 (stage0.py): its metrics.jsonl, and while it trains
        last.safetensors  last.state.pt    its progress (the trained prior goes to UNIRESTORE_HOME)
    stage1/  stage2/  stage3-<task>/
        last.safetensors         periodic model checkpoint (trainable parts)
        last.state.pt            optimiser, scheduler, RNG states, step, data position
        config.yaml
    stage1.safetensors  stage2.safetensors  stage3-<task>.safetensors     the final checkpoint of each stage
    grids/<stage>-<task>.png     before/after grids (LQ | restored | HQ)
    final/stage2/  final/stage3-<task>/     the final table of that checkpoint as `unirestore eval` writes
                                 its own (eval.md, .csv, .json, each test image's values in eval_images.csv,
                                 eval_gains.png)
    .lock                        held by the training using the folder (a second one stops)
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..background import BackgroundJob, train_builtin_models
from ..checkpoint import CheckpointError, extension_problem, load_checkpoint, read_checkpoint, save_checkpoint
from ..config import ConfigError, RunConfig, dump_yaml, load_yaml, to_dict
from ..evaluate import EvalReport, EvalTable, evaluate, save_grids
from ..files import atomic_write_text
from ..model import UniRestore
from ..prior import load_prior
from ..registry import get_task_class, parse_task_list
from .curves import MetricHistory, plot_curves
from .stages import Stage, StageLoss, apply_stage, check_stage, parameter_groups, stage1, stage2, stage3
from .state import (
    MODEL_FILE,
    TrainingState,
    capture_rng,
    has_training_state,
    load_training_weights,
    read_training_state,
    restore_rng,
    save_training_state,
)
from .tracking import RUN_FILE, Tracker, check_tracking_uri, load_run_id, save_run_id
from .trainer import (
    CallbackHook,
    Checkpointer,
    Distributed,
    HookBase,
    MetricLogger,
    Progress,
    SignalInterrupts,
    TaskStream,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    Validator,
    batch_iterator,
    build_optimizer,
    build_scheduler,
    effective_batch,
    scaled_lr,
    setup_distributed,
    step_seed,
)

__all__ = [
    "CallbackHook",
    "HookBase",
    "RunFolderError",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "add_task",
    "build_tasks",
    "train",
]

# Keys that may differ between a run and its resumption (they do not change what is computed).
_OPERATIONAL = {
    "output",
    "tracking_uri",
    "experiment",
    "run_name",
    "train.num_workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.val_every",
    "train.val_samples",
    "train.eval_samples",
    "train.device",
    "train.compile",
}


class RunFolderError(ConfigError):
    """The run folder holds a run that this call would overwrite (or cannot resume)."""


@dataclass
class TrainResult:
    """What a training call produced."""

    checkpoint: Path  # the final checkpoint of the last stage run (the prior folder after stage 0 alone)
    metrics: dict[str, float]  # final evaluation (`test/<task>/<input>/<metric>`) and the last loss terms
    run_id: str  # the MLflow run
    table: EvalTable | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------------
# Pieces shared by train and add_task


def _crop_size(config: RunConfig, prior) -> int:
    return config.train.crop_size or prior.native_size


def _absolute_path(key: str, value):
    """A path setting (`data`, `prior`, `downstream_checkpoints.<name>`, as `--set` names it) made absolute; a
    prior that names no local file or folder (a hub id, `tiny`) and every other setting stay as they are."""
    if not isinstance(value, str) or value in ("builtin", "tiny"):
        return value
    path = Path(value).expanduser()
    if key == "data" or key.startswith("downstream_checkpoints.") or (key == "prior" and path.exists()):
        return str(path.resolve())
    return value


def _local_path(value: str) -> str:
    """A prior's name, absolute if it names a local folder."""
    return _absolute_path("prior", value)


def _absolute_paths(config: RunConfig) -> RunConfig:
    """`config` with its local paths absolute (the data config, a prior folder, the downstream checkpoints):
    the run folder's config.yaml then names the same files whatever folder a later `eval --config` or
    `--resume` starts from."""
    checkpoints = {
        name: _absolute_path(f"downstream_checkpoints.{name}", path)
        for name, path in config.downstream_checkpoints.items()
    }
    return replace(
        config, data=_absolute_path("data", config.data), prior=_local_path(config.prior), downstream_checkpoints=checkpoints
    )


def _data_config(config: RunConfig):
    """None for built-in data; else the parsed data config (a DataError names what is wrong in the file)."""
    if config.data == "builtin":
        return None
    from ..data.config import load_data_config

    return load_data_config(config.data)


def _check_data(config: RunConfig, names: Sequence[str], training: bool = True) -> None:
    """Before a run (or an evaluation: `training` False) starts: the data config parses, lists every one of
    `names` and the roots of their datasets are folders."""
    batch_size = config.train.for_prior(config.prior).batch_size
    if training:
        for name in names:
            needed = get_task_class(name).min_batch_size
            if batch_size < needed:
                raise ConfigError(
                    f"task '{name}' needs at least {needed} images per batch (its loss compares each image with "
                    f"the others; with {batch_size} it is zero and nothing trains); add "
                    f"--set train.batch_size={needed} (or more)"
                )
    data = _data_config(config)
    if data is None:
        for name in names:
            if get_task_class(name).builtin_type is None:
                raise ConfigError(
                    f"task '{name}' has no built-in data; give --data with a data config that lists its "
                    f"datasets under tasks.{name}"
                )
    else:
        from ..data.config import check_entries

        builtin_types = {name: get_task_class(name).builtin_type for name in names}
        check_entries(data, list(names), source=config.data, builtin_types=builtin_types)
        if training and data.size is None and not config.train.crop_size and batch_size > 1:
            pairs = [name for name in names if get_task_class(name).min_batch_size > 1]
            if pairs:
                raise ConfigError(
                    f"{config.data}: size: null trains on full images, one per batch, but task '{pairs[0]}' needs "
                    "several per batch; give the data config a crop size (e.g. size: 512)"
                )
            raise ConfigError(
                f"{config.data}: size: null trains on full images, one per batch; add --set train.batch_size=1 "
                "(or give the data config a crop size)"
            )


def _check_downstream(config: RunConfig, names: Sequence[str], size: int) -> None:
    """Before a run starts: the real downstream models of `names` load from `downstream_checkpoints`.

    They are first needed when stage 2 starts, so a missing or unfitting checkpoint would otherwise stop a
    run only after all of stage 1. They load on the CPU here and are dropped; built-in ones are not touched.
    """
    if config.data == "builtin":
        return
    for task in build_tasks(config, names, torch.device("cpu"), size).values():
        if not task.builtin_specs():  # real data (or none to load, as for PIR)
            task.prepare()


def _check_held_out_data(tasks: dict, splits: Sequence[str] = ("val", "test")) -> None:
    """Before a run starts: each task's held-out sets build (their files listed, one image read). They are
    first read by stage 2's validation and by the final table, so a flat ImageNet val without its labels
    file or a missing gtFine/val would otherwise stop a run only after all of stage 1. Built-in data always
    builds and is not touched; the training sets are built as the first stage starts."""
    from ..downstream import context_is_builtin

    for name, task in tasks.items():
        if not context_is_builtin(task.context, name):
            for split in splits:
                task.dataset(split)


def build_tasks(config: RunConfig, names: Sequence[str], device: torch.device, size: int) -> dict:
    """Task objects for `names`, with the run's data, crop size, seed, device and loss weights.

    With a data config, each task reads its own entries (a task the file does not list gets built-in data).
    """
    from ...tasks.base import TaskContext

    data = _data_config(config)
    if data is not None and config.train.crop_size and data.size != 0:
        data = replace(data, size=0)  # train.crop_size, set for this run, wins over the data config's size
    tasks = {}
    for name in names:
        cls = get_task_class(name)
        context = TaskContext(
            data=data, size=size, device=device, seed=config.train.seed,
            checkpoints=dict(config.downstream_checkpoints), detector_size=config.detector_size,
        )  # fmt: skip
        try:
            tasks[name] = cls(context, loss_weights=config.train.loss_weights.get(name))
        except ValueError as error:
            raise ConfigError(f"train.loss_weights.{name}: {error}") from None
    return tasks


def _prepare(tasks: dict, distributed: Distributed) -> None:
    """Build or load each task's downstream model (rank 0 first, so the others read its cache)."""

    def prepare_all() -> None:
        for task in tasks.values():
            prepare = getattr(task, "prepare", None)
            if callable(prepare):
                prepare()

    if distributed.main:
        prepare_all()
    distributed.barrier()
    if not distributed.main:
        prepare_all()


@contextmanager
def _tuned_convolutions(device: torch.device, enabled: bool):
    """cuDNN's autotuner on while a stage trains on a GPU (`train.cudnn_benchmark`): the crops keep one shape."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or (enabled and device.type == "cuda")
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextmanager
def _threads_beside_workers(device: torch.device, workers: int):
    """On the CPU, leave a core to each DataLoader worker while a stage trains: OpenMP threads that share
    cores with busy workers wait on each other (on 2 cores, one thread and one worker run stages 1 and 2
    faster than two threads with or without the worker: BENCHMARKS.md)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, threads - workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Run:
    """What the stages of one training call share: config, folder, processes, tracking, hooks, console."""

    def __init__(
        self,
        config: RunConfig,
        output: Path,
        distributed: Distributed,
        device: torch.device,
        tracker: Tracker,
        hooks: Sequence[HookBase],
        on_validation: Callable[[int, dict], None] | None,
        progress: bool,
        resume_command: str,
    ):
        self.config, self.output, self.distributed, self.device = config, output, distributed, device
        self.resume_command = resume_command  # the command that continues this call, named when it is interrupted
        self.tracker, self.hooks, self.on_validation, self.progress = (
            tracker,
            list(hooks),
            on_validation,
            progress,
        )
        self.console = None
        if progress and distributed.main:
            from ..console import make_console

            self.console = make_console()
        self.last_terms: dict[str, float] = {}

    def say(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    def curves_title(self, stage: Stage) -> str:
        return f"{self.output.name}: {stage.name} ({', '.join(stage.tasks)})"

    def log(self, metrics: dict, step: int) -> None:
        if self.distributed.main:
            self.tracker.log_metrics(metrics, step)

    def run_stage(
        self, stage: Stage, model: UniRestore, tasks: dict, resume: bool, trained_prompts: list[str]
    ) -> Path:
        """Train `model` through `stage` (resuming its folder when asked); returns the final checkpoint."""
        config, distributed, device = self.config, self.distributed, self.device
        folder = self.output / stage.name
        final = self.output / f"{stage.name}.safetensors"
        steps = stage.steps(config)
        extra = {"stage": stage.name, "trained_prompts": trained_prompts, "run_id": self.tracker.run_id}
        state = read_training_state(folder) if resume and has_training_state(folder) else None
        if state is not None and state.done:
            load_training_weights(folder, model)
            if distributed.main and not final.is_file():
                save_checkpoint(model, final, extra={**extra, "step": state.step})
            self.say(f"[green]{stage.name}[/green]: already complete ({state.step} steps), skipped")
            return final
        trainable = apply_stage(model, stage)
        check_stage(model, stage)
        lr = scaled_lr(config.train, distributed.world_size, config.prior, stage.number)
        optimizer = build_optimizer(parameter_groups(trainable, config.train.weight_decay), lr)
        scheduler = build_scheduler(optimizer, config.train, steps, lr)
        scaler = None
        if config.train.precision == "fp16" and device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        start, position = 0, {}
        if state is not None:
            load_training_weights(folder, model)
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
            if scaler is not None and state.scaler:
                scaler.load_state_dict(state.scaler)
            restore_rng(state.rng)
            start, position = state.step, state.data_position
            self.say(f"[yellow]{stage.name}[/yellow]: resuming at step {start} of {steps}")
        history = MetricHistory(folder)
        if distributed.main:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "config.yaml", dump_yaml(config))
            history.keep_until(start)  # the steps after the resumed checkpoint are logged again

        def log(metrics: dict, step: int) -> None:
            self.log(metrics, step)
            if distributed.main:
                history.append(step, metrics)

        def draw_curves() -> None:
            path = plot_curves(history, self.output / "curves" / f"{stage.name}.png", self.curves_title(stage))
            if path is not None:
                self.tracker.log_artifact(path, "curves")

        seed = step_seed(config.train.seed, stage.number)
        from ..data.sample import collate

        stream = TaskStream(
            {name: tasks[name].dataset("train") for name in stage.tasks},
            config.train.batch_size, config.train.grad_accum, seed, config.train.task_weights,
            distributed.rank, distributed.world_size,
        )  # fmt: skip
        data = batch_iterator(stream, collate, start, steps, position, config.train.num_workers,
                              pin_memory=device.type == "cuda")  # fmt: skip
        loss = StageLoss(model, stage, tasks, config)
        if distributed.enabled:
            loss = torch.nn.parallel.DistributedDataParallel(
                loss, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=stage.unused_parameters,
            )  # fmt: skip
            # A depthwise conv's weight (C, 1, 3, 3) gets its grad with another stride on the size-1 axis: the
            # same memory layout, which DDP's stride check reports anyway, once per process.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

        trainer: Trainer

        def save(done: bool) -> None:
            if distributed.main:
                training_state = TrainingState(
                    stage=stage.name, step=trainer.step, total_steps=steps, done=done,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else {}, rng=capture_rng(),
                    data_position=dict(trainer.position), mlflow_run_id=self.tracker.run_id,
                )  # fmt: skip
                save_training_state(folder, model, training_state, extra)
            distributed.barrier()

        validation_tasks = (
            stage.tasks if stage.number != 1 else (("pir",) if "pir" in tasks else stage.tasks[:1])
        )

        def validate(step: int) -> None:
            if distributed.main:
                table = evaluate(
                    model, {name: tasks[name] for name in validation_tasks}, split="val",
                    samples=config.train.val_samples, batch_size=config.train.batch_size,
                    seed=config.train.seed, inputs=("restored",), device=device,
                )  # fmt: skip
                metrics = table.flat(f"{stage.name}/val")
                self.tracker.log_metrics(metrics, step)
                history.append(step, metrics)
                draw_curves()
                if step == steps:
                    for path in save_grids(table, self.output / "grids", stage.name):
                        self.tracker.log_artifact(path, "grids")
                if self.on_validation is not None:
                    self.on_validation(step, metrics)
            distributed.barrier()

        hooks = [
            Progress(f"{stage.name} ({', '.join(stage.tasks)})", enabled=self.progress and distributed.main),
            MetricLogger(log, config.train.log_every, stage.name),
            Checkpointer(save, config.train.checkpoint_every),
            Validator(validate, config.train.val_every),
            *self.hooks,
        ]
        trainer = Trainer(
            loss, optimizer, scheduler, data, stage=stage.name, start_step=start, max_steps=steps,
            config=config.train, device=device, distributed=distributed, position=position,
            scaler=scaler, hooks=hooks, seed=seed,
        )  # fmt: skip
        try:
            with _threads_beside_workers(device, config.train.num_workers), _tuned_convolutions(
                device, config.train.cudnn_benchmark
            ):
                trainer.train()
        except TrainingDiverged as error:
            kept = read_training_state(folder).step if has_training_state(folder) else None
            where = (
                f"{folder / 'last.safetensors'} (step {kept})"
                if kept is not None
                else "none for this stage yet"
            )
            raise TrainingDiverged(f"{error}; last good checkpoint: {where}") from None
        except TrainingInterrupted as stop:
            raise TrainingInterrupted(
                f"{stop}, saved in {folder / MODEL_FILE}; continue with: {self.resume_command}", stop.signal
            ) from None
        finally:
            data.close()  # stop this stage's DataLoader workers now, not when the garbage collector runs
        model.requires_grad_(False)
        self.last_terms = dict(trainer.terms)
        if distributed.main:
            save_checkpoint(model, final, extra={**extra, "step": steps})
            self.tracker.log_artifact(final, "checkpoints")
        distributed.barrier()
        return final

    def final_evaluation(self, model: UniRestore, tasks: dict, title: str, checkpoint: Path) -> EvalTable | None:
        """The test table of `checkpoint`: printed, logged as metrics (`test/<task>/<input>/<metric>`), written
        to `final/<checkpoint>/` as `eval` writes its tables (each test image's values and their gains plot
        included) and logged under final/, with the before/after grids.

        Ctrl-C or SIGTERM stops it at once with `TrainingInterrupted`, naming the command that runs it again
        (`--resume` skips the finished stages and evaluates)."""
        if not self.distributed.main:
            return None
        with SignalInterrupts() as interruption:
            try:
                return self._final_table(model, tasks, title, checkpoint)
            except KeyboardInterrupt:
                raise TrainingInterrupted(
                    f"training is complete, saved in {checkpoint}, but its final evaluation was interrupted; run it "
                    f"again with: {self.resume_command}", interruption.signal or signal.SIGINT,
                ) from None

    def _final_table(self, model: UniRestore, tasks: dict, title: str, checkpoint: Path) -> EvalTable:
        config = self.config
        # beside a GPU, the training's DataLoader workers (stopped by now) read and degrade the test images
        workers = config.train.num_workers if self.device.type == "cuda" else 0
        table = evaluate(
            model, tasks, split="test", samples=config.train.eval_samples, batch_size=config.train.batch_size,
            seed=config.train.seed, device=self.device, progress=self.progress, workers=workers,
        )  # fmt: skip
        self.tracker.log_metrics(table.flat(), 0)
        grids = save_grids(table, self.output / "grids", "final")
        grids += save_grids(table, self.output / "grids", "final-worse", which="worse")  # where it hurt most
        for path in grids:
            self.tracker.log_artifact(path, "grids")
        report = EvalReport.from_table(table, str(checkpoint))
        report.grids = grids  # named in eval.md
        folder = self.output / "final" / checkpoint.stem  # a run folder's `task add`s evaluate there too
        for path in report.write(folder):
            self.tracker.log_artifact(path, "final")
        if self.console is not None:
            self.console.print(table.rich_table(title=title))
            self.console.print(f"table and each test image's values: {folder}")
            self.console.print(f"before/after grids: {self.output / 'grids'} (final-worse-*: below their LQ)")
            self.console.print(f"metric curves: {self.output / 'curves'}")
        return table


def _check_folder(output: Path, stage_names: Iterable[str], resume: bool) -> None:
    if resume:
        return
    for name in stage_names:
        if _resumable(output, [name]):
            raise RunFolderError(
                f"run folder {output} already holds {name}; add --resume to continue it, "
                "or give another --output"
            )


def _resumable(output: Path, stage_names: Iterable[str]) -> bool:
    """Whether the run folder holds any of these stages, begun or done."""
    return any(has_training_state(output / name) or (output / f"{name}.safetensors").is_file() for name in stage_names)


def _check_resumed_config(output: Path, config: RunConfig) -> None:
    saved_path = output / "config.yaml"
    if not saved_path.is_file():
        return
    # a run saved before its paths were made absolute: its relative ones are read from here
    saved, current = (
        {key: _absolute_path(key, value) for key, value in _flatten(data).items()}
        for data in (load_yaml(saved_path), to_dict(config))
    )
    changed = sorted(
        k
        for k in set(saved) | set(current)
        if saved.get(k) != current.get(k) and k not in _OPERATIONAL and not k.startswith("stage0.")
    )
    if changed:
        raise RunFolderError(
            f"--resume with a config that differs from the run's ({', '.join(changed[:6])}); "
            f"resume with the options of {saved_path}, or give another --output"
        )


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("beta", "loss_weights", "task_weights"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _start(
    config: RunConfig,
    output: Path,
    folder: Path,
    distributed: Distributed,
    resume: bool,
    tags: dict,
    params: dict,
) -> tuple[Tracker, str]:
    """Start (or, resuming, continue) the MLflow run; `folder` keeps its id and the resolved config. A failure
    here ends the run as failed (not left running). Returns the tracker and the run `folder` named before
    (resuming; '' otherwise), which `_note_new_run` compares with the run started."""
    tracker = Tracker(config.tracking_uri, config.experiment, enabled=distributed.main)
    recorded = load_run_id(folder) if resume and distributed.main else ""
    if distributed.main:
        folder.mkdir(parents=True, exist_ok=True)
        run_name = config.run_name or (output.name if folder == output else f"{output.name}/{folder.name}")
        run_id = tracker.start(run_name, tags, run_id=recorded)
        try:
            save_run_id(folder, run_id)
            atomic_write_text(folder / "config.yaml", dump_yaml(config))
            tracker.log_config(to_dict(config))
            tracker.log_params(params)
        except BaseException:
            tracker.end("FAILED")
            raise
    return tracker, recorded


def _note_new_run(run: _Run, folder: Path, recorded: str) -> None:
    """Say when a resumed call could not continue the MLflow run its folder names (deleted from the store, or
    another tracking URI) and logs to a new one instead."""
    if recorded and run.tracker.run_id and run.tracker.run_id != recorded:
        from rich.markup import escape

        run.say(f"[yellow]note[/yellow]: MLflow run {recorded} ({escape(str(folder / RUN_FILE))}) is no longer in the "
                f"tracking store (deleted, or another --tracking-uri); this training is logged to a new run, "
                f"{run.tracker.run_id}")  # fmt: skip


LOCK_FILE = ".lock"


@contextmanager
def run_folder_lock(output: Path, main: bool = True, user: str = "training", option: str = "--output"):
    """Hold the output folder for this `user` (a training, an eval): a second command writing there stops at
    once (their stages, metric logs, checkpoints or tables would mix), naming the process that holds it and
    the `option` that gives another folder. The lock is the kernel's (flock), so a killed run leaves none
    behind. Temporary files a kill left (a checkpoint cut in half before its rename) are removed once the
    folder is held. Only the main process locks."""
    if not main:
        yield
        return
    import fcntl

    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFolderError(
                f"{output} is in use by another process writing there ({holder}); wait for it to end, or give "
                f"another {option}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{user}, process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        for stale in [*output.glob(".*.tmp"), *output.glob("*/.*.tmp")]:  # atomic_write's, cut by a kill
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _params(config: RunConfig, stages: str, tasks: Sequence[str], world_size: int) -> dict:
    train_config = config.train
    return {
        "stages": stages,
        "tasks": ",".join(tasks),
        "prior": config.prior,
        "data": config.data,
        "beta": ",".join(f"{t}={train_config.beta_for(t, get_task_class(t).default_beta, config.prior)}" for t in tasks),
        "stage1_steps": train_config.stage1_steps,
        "stage2_steps": train_config.stage2_steps,
        "stage3_steps": train_config.stage3_steps,
        "batch_size": train_config.batch_size,
        "effective_batch": effective_batch(train_config, world_size),
        **{f"lr/stage{n}": scaled_lr(train_config, world_size, config.prior, n) for n in (1, 2, 3)},
        "decoder_input": train_config.decoder_input,
        "precision": train_config.precision,
        "seed": train_config.seed,
        **_config_params(config),
    }


# Settings that are MLflow's own (where and under what name the run is tracked), or params above already.
_NOT_PARAMS = {"tracking_uri", "experiment", "run_name", "output", "tasks", "prior", "data"}


def _config_params(config: RunConfig) -> dict[str, str]:
    """Every other setting of the resolved config under its `--set` name (`model.use_tfa`,
    `train.eval_samples`): runs that differ in any of them (an ablation, a larger test set) show it in a
    column of their own and can be filtered on, which config.json alone does not allow."""

    def text(value) -> str:
        if isinstance(value, list):
            return ",".join(map(str, value))
        return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)

    return {key: text(value) for key, value in _flatten(to_dict(config)).items() if key not in _NOT_PARAMS}


def _stage_list(stages: Iterable[int]) -> tuple[int, ...]:
    chosen = tuple(sorted({int(s) for s in stages}))
    if not chosen or any(s not in (0, 1, 2) for s in chosen):
        raise ConfigError(f"stages {list(stages)}: choose among 0, 1, 2 (stage 3 is `task add`)")
    return chosen


# --------------------------------------------------------------------------------------------------
# Public API


def train(
    config: RunConfig,
    stages: Iterable[int] = (0, 1, 2),
    resume: bool = False,
    on_validation: Callable[[int, dict], None] | None = None,
    hooks: Sequence[HookBase] = (),
    progress: bool = True,
) -> TrainResult:
    """Train the stages `stages` of `config` (0: the tiny prior, 1, 2: SPEC §6), then evaluate.

    `resume` continues the stages found in the run folder where their last checkpoint left them (and skips
    finished ones); without it, a run folder that already holds one of these stages is refused.
    `on_validation(step, metrics)` receives each validation's metrics; `hooks` are added after the
    built-in ones in every stage. Raises `TrainingDiverged` when a loss is not finite, and
    `TrainingInterrupted` (its message: where it stopped and the command that continues) when Ctrl-C or
    SIGTERM stopped a stage (stage 0 included), after saving the step it reached, or the final evaluation.
    """
    chosen = _stage_list(stages)
    if chosen == (0,) and config.prior != "tiny":
        raise ConfigError(
            f"--stage 0 trains the built-in tiny prior only; prior '{config.prior}' comes trained: train stages 1 "
            "and 2 on it (--stage 1,2)"
        )
    config = _absolute_paths(config).with_prior_defaults()  # saved filled in: --resume compares those values
    names = parse_task_list(list(config.tasks))
    distributed, device = setup_distributed(config.train.device)
    output = Path(config.output).expanduser().resolve()
    stage_names = [s.name for s in (stage1(names), stage2(names)) if s.number in chosen]
    if 0 in chosen and config.prior == "tiny":
        stage_names.insert(0, "stage0")  # its saved progress, until the trained prior is in place
    _check_folder(output, stage_names, resume)
    if resume:
        _check_resumed_config(output, config)
    if distributed.main:
        check_tracking_uri(config.tracking_uri)
    # The data config and its roots, and a prior other than the tiny one (stage 0 may rewrite that), are
    # checked before anything is started.
    _check_data(config, names)
    prior = load_prior(config.prior, device=device) if config.prior != "tiny" else None
    _check_prior_levels(config, prior)
    if chosen != (0,):
        from ..prior import tiny_native_size

        size = config.train.crop_size or (prior.native_size if prior else tiny_native_size())
        _check_held_out_data(build_tasks(config, names, torch.device("cpu"), size))
        _check_downstream(config, names, size)
    label = ",".join(str(s) for s in chosen)
    tags = {"unirestore.stages": label, "unirestore.tasks": ",".join(names), "unirestore.prior": config.prior,
            "unirestore.output": str(output)}  # fmt: skip
    params = _params(config, label, names, distributed.world_size)
    with run_folder_lock(output, distributed.main):
        _check_folder(output, stage_names, resume)  # again, now that no other run can start here
        tracker, recorded = _start(config, output, output, distributed, resume, tags, params)
        stage_option = ["--stage", label] if chosen != (0, 1, 2) else []
        command = shlex.join(["unirestore", "train", "--config", str(output / "config.yaml"), *stage_option, "--resume"])
        run = _Run(config, output, distributed, device, tracker, hooks, on_validation, progress, command)
        status = "FAILED"
        try:
            _note_new_run(run, output, recorded)
            if resume and not _resumable(output, stage_names):
                run.say(f"[yellow]note[/yellow]: nothing to resume in {output}; starting the run anew")
            _note_training_images_in_test(run, config, names)
            result = _train_stages(run, chosen, names, resume, prior)
            status = "FINISHED"
            return result
        except KeyboardInterrupt as interruption:
            status = "KILLED"
            _end_together(tracker, distributed, interruption)
            raise
        finally:
            tracker.end(status)


def _end_together(tracker: Tracker, distributed: Distributed, interruption: KeyboardInterrupt) -> None:
    """After a stop that every process agreed on, the others wait until the main one has ended the MLflow
    run: torchrun stops all the processes when the first one leaves."""
    if isinstance(interruption, TrainingInterrupted) and distributed.enabled:
        tracker.end("KILLED")
        distributed.barrier()


def _note_training_images_in_test(run: _Run, config: RunConfig, names: Sequence[str]) -> None:
    """Say (not stop) when a data-config entry feeds training and the final table from the same files."""
    data = _data_config(config)
    if data is not None:
        from rich.markup import escape

        from ..data.config import training_images_in_test

        for message in training_images_in_test(data, list(names), source=str(config.data)):
            run.say(f"[yellow]note[/yellow]: {escape(message)}")


def _check_prior_levels(config: RunConfig, prior) -> None:
    """Per-level settings against the prior's VAE before anything trains (stage 0 alone takes minutes)."""
    if prior is not None:
        channels = prior.vae.config.block_out_channels
    else:
        from ..prior import ensure_tiny_prior

        channels = json.loads((ensure_tiny_prior() / "vae" / "config.json").read_text())["block_out_channels"]
    levels = len(channels) - 1
    config.model.cfrm_blocks_for(levels)
    config.train.cfrm_weights_for(levels)


def _train_stages(run: _Run, chosen: tuple[int, ...], names: list[str], resume: bool, prior) -> TrainResult:
    background = _start_downstream(run, names, prior) if chosen != (0,) else None
    try:
        return _run_stages(run, chosen, names, resume, prior, background)
    finally:
        if background is not None:
            background.cancel()


def _start_downstream(run: _Run, names: list[str], prior) -> BackgroundJob | None:
    """Train the uncached built-in downstream models in a second process (single-process runs only):
    stage 0 and stage 1 do not need them, and on a CPU they share the cores well (BENCHMARKS.md)."""
    from ..downstream import read_record
    from ..prior import tiny_native_size

    if run.distributed.enabled:
        return None
    config = run.config
    size = config.train.crop_size or (prior.native_size if prior is not None else tiny_native_size())
    tasks = build_tasks(config, names, run.device, size)
    specs = [
        spec
        for task in tasks.values()
        for spec in getattr(task, "builtin_specs", list)()
        if read_record(spec, task.context.home) is None
    ]
    if not specs:
        return None
    listed = ", ".join(spec.name for spec in specs)
    run.say(f"training the built-in downstream models ({listed}) in a second process")
    what = "training the built-in downstream models"
    return BackgroundJob(what, train_builtin_models, specs, None, threads=max(1, torch.get_num_threads() // 2))


def _run_stages(
    run: _Run,
    chosen: tuple[int, ...],
    names: list[str],
    resume: bool,
    prior,
    background: BackgroundJob | None,
) -> TrainResult:
    config, distributed, device = run.config, run.distributed, run.device
    if 0 in chosen:
        if config.prior != "tiny":
            run.say(f"stage 0 trains the built-in tiny prior only; skipped for prior '{config.prior}'")
        else:
            from .stage0 import train_tiny_prior

            if distributed.main:
                folder = run.output / "stage0"
                history = MetricHistory(folder)

                def log(metrics: dict, step: int) -> None:
                    run.log(metrics, step)
                    history.append(step, metrics)

                def start(step: int) -> None:  # only when it trains: a trained prior is skipped, its history kept
                    history.keep_until(step)  # the steps after the resumed checkpoint are logged again
                    if step:
                        total = config.stage0.vae_steps + config.stage0.unet_steps
                        run.say(f"[yellow]stage0[/yellow]: resuming at step {step} of {total}")

                try:
                    result = train_tiny_prior(config.stage0, config.train.seed, device, log, run.progress,
                                              checkpoints=folder, resume=resume, on_start=start)  # fmt: skip
                except TrainingInterrupted as stop:
                    raise TrainingInterrupted(
                        f"{stop}, saved in {folder / MODEL_FILE}; continue with: {run.resume_command}", stop.signal
                    ) from None
                run.tracker.log_metrics(
                    {k: v for k, v in result.metrics.items() if k.startswith("stage0/")}, 0
                )
                title = f"{run.output.name}: stage 0 (the tiny prior's VAE, then its UNet)"
                curves = plot_curves(history, run.output / "curves" / "stage0.png", title)
                if curves is not None:
                    run.tracker.log_artifact(curves, "curves")
                run.say(f"stage 0: tiny prior {'trained' if result.trained else 'already trained, skipped'} "
                        f"({result.folder})")  # fmt: skip
            distributed.barrier()
    elif config.prior == "tiny":
        from ..prior import tiny_prior_path
        from .stage0 import is_trained

        if not is_trained(tiny_prior_path()):
            run.say("[yellow]warning[/yellow]: the tiny prior is untrained; run stage 0 first (--stage 0)")
    if chosen == (0,):
        from ..prior import tiny_prior_path

        return TrainResult(checkpoint=tiny_prior_path(), metrics={}, run_id=run.tracker.run_id)

    if prior is None:
        prior = load_prior(config.prior, device=device)
    tasks = build_tasks(config, names, device, _crop_size(config, prior))

    def prepare() -> None:
        nonlocal background
        if background is not None:
            if not background.done():
                run.say("waiting for the built-in downstream models (second process) ...")
            seconds = background.result()
            took = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
            run.say(f"built-in downstream models ready: {took}")
            run.log({f"downstream/{name}/seconds": value for name, value in seconds.items()}, 0)
            background = None
        _prepare(tasks, distributed)

    model: UniRestore | None = None
    final = None
    if 1 in chosen:
        if "pir" not in tasks:  # stage 1 validates the first task, which then needs its model
            prepare()
        torch.manual_seed(config.train.seed)
        # Stage 1 trains no TFA (SPEC §6): its model decodes with the prior's plain decoder, in its validation,
        # its final table and its checkpoint, not through the TFA's untrained initial weights.
        model = UniRestore(prior, replace(config.model, use_tfa=False), tasks=names).to(device)
        final = run.run_stage(stage1(names), model, tasks, resume, trained_prompts=[])
    prepare()
    if 2 in chosen:
        # Stage 1 trains neither the TFA nor the prompts: how stage 2 uses them comes from this run's config.
        stage2_model = {key: getattr(config.model, key) for key in ("gradient_checkpointing", "shared_prompt", "use_tfa")}
        if model is None:
            source = run.output / "stage1.safetensors"
            if not source.is_file():
                raise CheckpointError(
                    f"stage 2 starts from {source}, which does not exist; run stage 1 first (--stage 1)"
                )
            model = load_checkpoint(source, prior=prior, device=device, config_overrides=stage2_model)
            for name in names:
                model.add_task(name)
        else:
            model.config = replace(model.config, **stage2_model)
        final = run.run_stage(stage2(names), model, tasks, resume, trained_prompts=list(names))
    table = run.final_evaluation(
        model, tasks, title=f"UniRestore after stage {max(chosen)}: {', '.join(names)}", checkpoint=final
    )
    metrics = {**run.last_terms, **(table.flat() if table else {})}
    return TrainResult(checkpoint=final, metrics=metrics, run_id=run.tracker.run_id, table=table)


def add_task(
    config: RunConfig,
    source_checkpoint: str | Path,
    task: str,
    resume: bool = False,
    on_validation: Callable[[int, dict], None] | None = None,
    hooks: Sequence[HookBase] = (),
    progress: bool = True,
    prior: str | None = None,
) -> TrainResult:
    """Stage 3: add `task` to the model of `source_checkpoint` by training its prompt alone.

    `prior` is where the checkpoint's prior is now, if it moved since training (default: where it was).

    Writes `<output>/stage3-<task>.safetensors`, in which every tensor but the new prompt is identical to
    the source checkpoint's, so the old tasks' outputs do not change.
    """
    get_task_class(task)
    config = _absolute_paths(config)
    distributed, device = setup_distributed(config.train.device)
    output = Path(config.output).expanduser().resolve()
    stage = stage3(task)
    _check_folder(output, [stage.name], resume)
    if distributed.main:
        check_tracking_uri(config.tracking_uri)
    _check_data(config, [task])  # before the checkpoint is read: an unset batch size passes alike on either prior
    _, metadata = read_checkpoint(source_checkpoint)
    # The prompt trains on the checkpoint's prior whatever the config names (by default `tiny`): the defaults
    # that depend on the prior (lr, β, the batch size and the others of `PRESET_TRAIN`), the logged params and
    # the saved config follow that one.
    config = replace(config, train=config.train.for_prior(metadata["prior"]["name"]))
    if task in metadata["tasks"]:
        raise CheckpointError(
            f"{metadata['path']} already has a prompt for '{task}'; add another task or start from a checkpoint without it"
        )
    problem = extension_problem(metadata)
    if problem:
        raise CheckpointError(problem)
    trained = list(metadata["extra"].get("trained_prompts", metadata["tasks"]))
    # Before the run starts: a checkpoint that cannot be used (another prior, other weights) leaves no run behind.
    model = load_checkpoint(source_checkpoint, prior=prior, device=device,
                            config_overrides={"gradient_checkpointing": config.model.gradient_checkpointing})  # fmt: skip
    model.add_task(task)
    config = replace(config, prior=_local_path(model.prior_identity["name"]))
    # The task's downstream model, before the run starts too: a missing or unfitting checkpoint leaves no run.
    tasks = build_tasks(config, [task], device, config.train.crop_size or model.native_size)
    _check_held_out_data(tasks)
    _prepare(tasks, distributed)
    source = str(Path(metadata["path"]).resolve())  # named as given, it would be read from another folder later
    tags = {"unirestore.stages": "3", "unirestore.tasks": task, "unirestore.prior": metadata["prior"]["name"],
            "unirestore.source": source, "unirestore.output": str(output)}  # fmt: skip
    if metadata["extra"].get("run_id"):  # the run that trained the source checkpoint
        tags["unirestore.source_run"] = metadata["extra"]["run_id"]
    params = {**_params(config, "3", [task], distributed.world_size), "source": source}
    with run_folder_lock(output, distributed.main):
        _check_folder(output, [stage.name], resume)  # again, now that no other run can start here
        tracker, recorded = _start(config, output, output / stage.name, distributed, resume, tags, params)
        prior_option = ["--prior", prior] if prior else []
        command = shlex.join(["unirestore", "task", "add", task, "--from", metadata["path"], "--config",
                              str(output / stage.name / "config.yaml"), *prior_option, "--resume"])  # fmt: skip
        run = _Run(config, output, distributed, device, tracker, hooks, on_validation, progress, command)
        status = "FAILED"
        try:
            _note_new_run(run, output / stage.name, recorded)
            if resume and not _resumable(output, [stage.name]):
                run.say(f"[yellow]note[/yellow]: nothing to resume in {output}; adding '{task}' anew")
            _note_training_images_in_test(run, config, [task])
            final = run.run_stage(stage, model, tasks, resume, trained_prompts=[*trained, task])
            table = run.final_evaluation(model, tasks, title=f"UniRestore with '{task}' added", checkpoint=final)
            status = "FINISHED"
            metrics = {**run.last_terms, **(table.flat() if table else {})}
            return TrainResult(checkpoint=final, metrics=metrics, run_id=tracker.run_id, table=table)
        except KeyboardInterrupt as interruption:
            status = "KILLED"
            _end_together(tracker, distributed, interruption)
            raise
        finally:
            tracker.end(status)
