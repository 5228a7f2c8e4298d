"""The training loop: a short `run_step` and hooks around it (detectron2's `train_loop.py` pattern).

Order of events for every optimiser step:

1. `run_step`: for each of `grad_accum` micro-batches, seed the global RNGs from (seed, step, micro,
   rank), draw the batch, compute the stage's loss terms (under autocast where asked), stop on a
   non-finite total, backward; then the optimiser and the one-cycle scheduler step once.
2. every hook's `after_step`, in the order given: by default `Progress` (bar), `MetricLogger` (MLflow),
   `Checkpointer` (last.safetensors + last.state.pt), `Validator` (metrics, `on_validation`), then the
   caller's own hooks. A hook that raises stops the run after the work of the hooks before it.

`before_train` runs in the same order before the first step; `after_train` only when the last step is
done (a failed run writes nothing more: its last good checkpoint stays as it was); `close` always.

Ctrl-C or SIGTERM (a cluster's preemption) while the steps run asks for a stop: the step in progress
finishes (under DDP: the step whose vote on a finite loss first carries the request, so that all processes
stop at the same step), and then every hook's `after_interrupt` runs instead of its `after_step`
(`Checkpointer` saves that step) and the trainer raises `TrainingInterrupted`. A second Ctrl-C or SIGTERM interrupts at once, the save in progress included.

The data stream is a pure function of the step (`TaskStream`): resuming from a checkpoint at step k
reproduces steps k+1.. exactly as the uninterrupted run did them.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Self

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import ConfigError, TrainConfig


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step and the loss terms."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a whole step, which was saved, or the final evaluation of a
    saved training; `signal` is the signal's number (a process stopped by another's vote says SIGINT)."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.signal = signal_number


# --------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 when launched plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_agree(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether `flag` is true in every process (a collective: every process must call it)."""
        return self.all_agree_each((flag,), device)[0]

    def all_agree_each(self, flags: Sequence[bool], device: torch.device | str = "cpu") -> tuple[bool, ...]:
        """For each of `flags`, whether it is true in every process, in one collective."""
        if not self.enabled:
            return tuple(flags)
        votes = torch.tensor([0.0 if flag else 1.0 for flag in flags], device=device)
        torch.distributed.all_reduce(votes)
        return tuple(vote == 0.0 for vote in votes.tolist())


def launch_position() -> Distributed:
    """This process's place in a torchrun launch, read from its environment (no process group is joined)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def launch_device(position: Distributed, device_name: str) -> torch.device:
    """`device_name` (checked); under torchrun, this process's own GPU (LOCAL_RANK) when a GPU is asked for."""
    device = resolve_device(device_name)
    if position.enabled and device.type == "cuda":
        return torch.device("cuda", position.local_rank)
    return device


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    position = launch_position()
    device = launch_device(position, device_name)
    if position.enabled:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return position, device


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when there is one), `cpu`, `cuda` or `cuda:N`; a device this machine lacks is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}': unirestore runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name}: this machine has no CUDA device; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one (step, micro-batch, rank, ...) from the run's seed."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------------
# The data stream


@dataclass(frozen=True)
class BatchPlan:
    """Which samples micro-batch `micro` of step `step` reads (picked in the main process)."""

    step: int
    micro: int
    task: str
    # Index of this micro-batch among all micro-batches of `task` so far (all ranks draw the same task).
    number: int


class TaskStream:
    """The training data of a stage as a pure function of the step.

    Each micro-batch holds one task. The task of (step, micro) is drawn from a generator seeded with
    (seed, step, micro), with P(task) ∝ its dataset's length (a `WeightedConcat` already counts its
    datasets' weights) × `task_weights`. Inside a task, position p of the stream (p = number × batch ×
    world + rank × batch + i) reads index perm_e[p mod N] of epoch e = p div N, where perm_e is a fixed
    permutation of (seed, task, e) and the dataset is moved to epoch e (`set_epoch`) before reading, so
    crops and degradations differ from epoch to epoch. The data position (micro-batches drawn per task)
    is saved with every checkpoint.
    """

    def __init__(
        self,
        datasets: Mapping[str, Dataset],
        batch_size: int,
        grad_accum: int,
        seed: int,
        task_weights: Mapping[str, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not datasets:
            raise ValueError("TaskStream needs at least one task dataset")
        self.tasks = list(datasets)
        self.datasets = dict(datasets)
        self.sizes = {task: len(dataset) for task, dataset in self.datasets.items()}
        empty = [task for task, size in self.sizes.items() if size == 0]
        if empty:
            raise ValueError(f"the training data of task(s) {', '.join(empty)} is empty")
        weights = np.array([self.sizes[t] * float((task_weights or {}).get(t, 1.0)) for t in self.tasks])
        self.probabilities = weights / weights.sum()
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.rank, self.world_size = rank, world_size
        self._epochs: dict[str, int] = {}

    def task_of(self, step: int, micro: int) -> str:
        if len(self.tasks) == 1:
            return self.tasks[0]
        rng = np.random.default_rng([self.seed, step, micro])
        return self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]

    def plans(self, start_step: int, stop_step: int, position: Mapping[str, int]) -> Iterator[BatchPlan]:
        """The micro-batch plans of steps start_step+1 .. stop_step, from the data position `position`."""
        counts = {task: int(position.get(task, 0)) for task in self.tasks}
        for step in range(start_step + 1, stop_step + 1):
            for micro in range(self.grad_accum):
                task = self.task_of(step, micro)
                yield BatchPlan(step, micro, task, counts[task])
                counts[task] += 1

    @staticmethod
    @lru_cache(maxsize=8)
    def _permutation(seed: int, task: str, epoch: int, size: int) -> np.ndarray:
        return np.random.default_rng([seed, zlib.crc32(task.encode()), epoch]).permutation(size)

    def samples(self, plan: BatchPlan) -> list[dict]:
        dataset, size = self.datasets[plan.task], self.sizes[plan.task]
        first = (plan.number * self.world_size + self.rank) * self.batch_size
        samples = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, size)
            if self._epochs.get(plan.task) != epoch and hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            self._epochs[plan.task] = epoch
            samples.append(dataset[int(self._permutation(self.seed, plan.task, epoch, size)[offset])])
        return samples


class _PlannedBatches(Dataset):
    """Map-style view of a `TaskStream` whose "indices" are `BatchPlan`s: DataLoader workers load whole
    collated batches in parallel while the plan order stays fixed by the main process."""

    def __init__(self, stream: TaskStream, collate: Callable[[list[dict]], dict]):
        self.stream = stream
        self.collate = collate

    def __len__(self) -> int:  # not used: the sampler decides
        return 1 << 62

    def __getitem__(self, plan: BatchPlan) -> tuple[BatchPlan, dict]:
        batch = self.collate(self.stream.samples(plan))
        batch["task"] = plan.task
        return plan, batch


class _PlanSampler(Sampler):
    def __init__(self, plans: Iterator[BatchPlan]):
        self._plans = plans

    def __iter__(self):
        return self._plans


def _keep(item):
    return item


def batch_iterator(
    stream: TaskStream,
    collate: Callable[[list[dict]], dict],
    start_step: int,
    stop_step: int,
    position: Mapping[str, int],
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[BatchPlan, dict]]:
    """(plan, batch) for every micro-batch of steps start_step+1 .. stop_step, in order; with `pin_memory`
    (training on a GPU), the workers' batches come in page-locked memory, so `move_to` copies them to the
    GPU without blocking.

    `close()` the result when done with it: it stops the DataLoader workers at once. (Left to the garbage
    collector, a stage's workers outlive it, and a later fork copies their iterator into the new workers.)
    """
    plans = stream.plans(start_step, stop_step, position)
    if num_workers == 0:
        view = _PlannedBatches(stream, collate)
        return (view[plan] for plan in plans)
    loader = DataLoader(
        _PlannedBatches(stream, collate),
        sampler=_PlanSampler(plans),
        batch_size=None,
        collate_fn=_keep,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2,
        pin_memory=pin_memory,
        worker_init_fn=ignore_interrupts,
    )
    return _closing(iter(loader))


def ignore_interrupts(worker_id: int = 0) -> None:
    """A DataLoader worker leaves Ctrl-C and SIGTERM to the main process (a terminal sends Ctrl-C to the whole
    process group, a Slurm preemption SIGTERM to every process of the job): a worker killed by one first
    would be reported as a worker failure instead of an interruption, and the stop's last step would lack
    its data. The main process stops the workers when it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _closing(iterator: Iterator) -> Iterator:
    """`iterator` as a generator whose `close()` drops it (a DataLoader iterator stops its workers when dropped)."""
    yield from iterator  # closing the generator drops its frame, and with it the iterator


def move_to(batch: dict, device: torch.device) -> dict:
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {key: move(value) for key, value in batch.items()}


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule


def effective_batch(config: TrainConfig, world_size: int = 1) -> int:
    return config.batch_size * config.grad_accum * world_size


def scaled_lr(config: TrainConfig, world_size: int = 1, prior: str = "", stage: int = 1) -> float:
    """The peak lr for `prior` and `stage` × √(effective batch / reference batch) (1e-4 at 64 in the release)."""
    scale = math.sqrt(effective_batch(config, world_size) / config.lr_reference_batch)
    return config.peak_lr(prior, stage) * scale


def build_optimizer(groups: list[dict], lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, steps: int, pct_start: float, **options):
    """torch's OneCycleLR over `steps` (at least 2), safe for a warm-up of exactly one step (e.g. 0.1 of 10
    steps), where OneCycleLR divides by zero: a hair less gives the intended schedule, the peak at step 0."""
    total = max(steps, 2)
    if math.isclose(pct_start * total, 1.0):
        pct_start = (1 - 1e-6) / total
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total, pct_start=pct_start, **options
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int, lr: float):
    """One cycle, stepped per iteration: warm-up share `warmup`, cosine, from lr / div_factor."""
    return one_cycle(
        optimizer,
        lr,
        steps,
        config.warmup,
        anneal_strategy="cos",
        div_factor=config.div_factor,
        final_div_factor=config.final_div_factor,
        cycle_momentum=False,  # AdamW's betas stay fixed
    )


# --------------------------------------------------------------------------------------------------
# Trainer and hooks


class HookBase:
    """A hook sees the trainer (`self.trainer`) after each step: `trainer.step`, `trainer.terms`."""

    trainer: Trainer

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def after_interrupt(self) -> None:
        """Instead of `after_step`, after the step at which the processes agreed to stop (Ctrl-C, SIGTERM)."""

    def close(self) -> None:
        """Release what the hook holds (a live display); called after the stage, whatever happened."""


class _SignalHandlers:
    """While entered, in the main thread: Ctrl-C and SIGTERM call `_handle`; the handlers before are put back on
    leaving. A signal ignored when entering (a run started with nohup) stays ignored; in another thread (a sweep's
    trial) nothing is caught."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(number) not in (signal.SIG_IGN, None):
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame) -> None:
        raise NotImplementedError

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class StopRequest(_SignalHandlers):
    """The first Ctrl-C or SIGTERM is noted in `signal` (the trainer stops after the step in progress), a second
    one raises KeyboardInterrupt at once. A stop noted but never `taken` (it came after the last step's vote) is
    delivered on leaving, as before."""

    def __init__(self):
        super().__init__()
        self.taken = False

    def _handle(self, number: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = number

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        if self.signal is not None and not self.taken and exc_info[0] is None:
            signal.raise_signal(self.signal)


class SignalInterrupts(_SignalHandlers):
    """Ctrl-C and SIGTERM raise KeyboardInterrupt at once, and `signal` notes which (by default SIGTERM ends the
    process without a word, its MLflow run left running)."""

    def _handle(self, number: int, frame) -> None:
        self.signal = number
        raise KeyboardInterrupt


def flushing_subnormals() -> bool:
    """Whether this thread counts floats below float32's normal range as zero (`torch.set_flush_denormal`)."""
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Training counts floats below float32's normal range as zero, and restores the setting after: on some
    CPUs arithmetic on them is many times slower, and stage 2's gradients reach them (BENCHMARKS.md). It is the
    calling thread's setting (and that of the CPU threads torch starts later): on one torch thread, as a stage
    runs beside a DataLoader worker on 2 cores, that is all of the work; the `unirestore` command sets it before
    torch starts any thread."""
    was = flushing_subnormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


class Trainer:
    """Runs one stage from `start_step` to `max_steps` (steps are counted from 1)."""

    def __init__(
        self,
        loss: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        data: Iterator[tuple[BatchPlan, dict]],
        *,
        stage: str,
        start_step: int,
        max_steps: int,
        config: TrainConfig,
        device: torch.device,
        distributed: Distributed,
        position: Mapping[str, int] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        hooks: Sequence[HookBase] = (),
        seed: int = 0,
    ):
        self.loss, self.optimizer, self.scheduler, self.data = loss, optimizer, scheduler, data
        self.stage, self.step, self.max_steps = stage, start_step, max_steps
        self.config, self.device, self.distributed, self.scaler = config, device, distributed, scaler
        self.position = dict(position or {})
        self.seed = seed
        self.terms: dict[str, float] = {}
        self.step_seconds = 0.0
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.trainer = self
        self._stop: StopRequest | None = None
        self._stop_agreed = False  # a process asked to stop, as the last vote said

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> None:
        with subnormals_flushed():
            self._train()

    def _train(self) -> None:
        try:
            for hook in self.hooks:
                hook.before_train()
            with StopRequest() as stop:
                self._stop = stop
                while self.step < self.max_steps:
                    self.run_step()
                    # one process decides alone; several stop at the step whose vote first carried the request
                    if self._stop_agreed if self.distributed.enabled else stop.signal is not None:
                        stop.taken = True
                        for hook in self.hooks:
                            hook.after_interrupt()
                        raise TrainingInterrupted(
                            f"{self.stage} stopped at step {self.step} of {self.max_steps}", stop.signal or signal.SIGINT
                        )
                    for hook in self.hooks:
                        hook.after_step()
            for hook in self.hooks:
                hook.after_train()
        finally:
            for hook in self.hooks:
                hook.close()

    def run_step(self) -> None:
        started = time.perf_counter()
        step, accum = self.step + 1, self.config.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(accum):
            plan, batch = next(self.data)
            torch.manual_seed(step_seed(self.seed, step, micro, self.distributed.rank))
            sync = micro == accum - 1 or not isinstance(self.loss, torch.nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.loss.no_sync():
                with autocast(self.config.precision, self.device):
                    terms = self.loss(move_to(batch, self.device))
                total = sum(terms.values())
                values = {key: float(value.detach()) for key, value in terms.items()}
                finite = math.isfinite(float(total.detach()))
                # Every process votes, so that all stop together rather than wait for a diverged one's gradients;
                # the same collective carries a Ctrl-C or SIGTERM (no second synchronisation per step).
                running = self._stop is None or self._stop.signal is None
                agreed_finite, agreed_running = self.distributed.all_agree_each((finite, running), self.device)
                self._stop_agreed = self._stop_agreed or not agreed_running
                if not agreed_finite:
                    where = "in another process"
                    if not finite:
                        where = "(" + ", ".join(f"{key}={value:.4g}" for key, value in values.items()) + ")"
                    raise TrainingDiverged(f"{self.stage}: loss is not finite at step {step} {where}")
                scaled = total / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            self.position[plan.task] = plan.number + 1
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value / accum
            sums["loss/total"] = sums.get("loss/total", 0.0) + float(total.detach()) / accum
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.terms = sums
        self.step = step
        self.step_seconds = time.perf_counter() - started


class Progress(HookBase):
    """A rich progress bar with the step rate, the ETA and the current loss."""

    def __init__(self, description: str, enabled: bool = True):
        self.description = description
        self.enabled = enabled
        self._progress = None
        self._task = None

    def before_train(self) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        from ..console import make_console

        self._progress = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} steps/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"),
            transient=False,
            console=make_console(),
        )
        self._progress.start()
        trainer = self.trainer
        self._task = self._progress.add_task(
            self.description, total=trainer.max_steps, completed=trainer.step, rate="-", loss=""
        )

    def after_step(self) -> None:
        if self._progress is None:
            return
        seconds = self.trainer.step_seconds
        rate = f"{1.0 / seconds:.2f}" if seconds > 0 else "-"
        loss = f"loss {self.trainer.terms.get('loss/total', float('nan')):.4f}"
        self._progress.update(self._task, completed=self.trainer.step, rate=rate, loss=loss)

    def after_train(self) -> None:
        self.close()

    def after_interrupt(self) -> None:
        self.after_step()
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class MetricLogger(HookBase):
    """Logs the loss terms (mean since the last log), the learning rate and steps/s every `every` steps."""

    def __init__(self, log: Callable[[dict, int], None], every: int, prefix: str):
        self.log, self.every, self.prefix = log, every, prefix
        self._sums: dict[str, float] = {}
        self._count = 0
        self._seconds = 0.0

    def after_step(self, last: bool = False) -> None:
        trainer = self.trainer
        for key, value in trainer.terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        self._seconds += trainer.step_seconds
        if last or trainer.step % self.every == 0 or trainer.step == trainer.max_steps:
            metrics = {key: value / self._count for key, value in self._sums.items()}
            metrics[f"{self.prefix}/loss_total"] = metrics.pop("loss/total")
            metrics[f"{self.prefix}/lr"] = trainer.lr
            metrics[f"{self.prefix}/steps_per_second"] = self._count / max(self._seconds, 1e-9)
            self.log(metrics, trainer.step)
            self._sums, self._count, self._seconds = {}, 0, 0.0

    def after_interrupt(self) -> None:
        self.after_step(last=True)  # the steps since the last log, which a resumed stage does not replay


class Checkpointer(HookBase):
    """Calls `save(done)` every `every` steps, at the step where an interruption stops, and once after the
    last step (done=True)."""

    def __init__(self, save: Callable[[bool], None], every: int):
        self.save, self.every = save, every

    def after_step(self) -> None:
        if self.trainer.step % self.every == 0 and self.trainer.step < self.trainer.max_steps:
            self.save(False)

    def after_interrupt(self) -> None:
        self.save(False)  # at the last step too: the resumed stage then validates and saves it as done

    def after_train(self) -> None:
        self.save(True)


class Validator(HookBase):
    """Calls `validate(step)` every `every` steps (0: never during the stage) and after the last step."""

    def __init__(self, validate: Callable[[int], None], every: int):
        self.validate, self.every = validate, every

    def after_step(self) -> None:
        step = self.trainer.step
        if self.every and step % self.every == 0 and step < self.trainer.max_steps:
            self.validate(step)

    def after_train(self) -> None:
        self.validate(self.trainer.step)


class CallbackHook(HookBase):
    """A hook from a plain function `fn(trainer)` called after every step."""

    def __init__(self, fn: Callable[[Trainer], None]):
        self.fn = fn

    def after_step(self) -> None:
        self.fn(self.trainer)
