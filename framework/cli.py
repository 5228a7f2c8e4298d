"""The `unirestore` command line: a thin typer layer that parses options and calls the library.

    unirestore train [--tasks pir,seg,cls] [--stage 0|1|2|all] [--prior tiny|PATH|HUB_ID] [--data builtin|FILE]
                     [--steps N] [--batch-size B] [--beta pir=1,seg=0.1] [--config FILE] [--set key=value ...]
                     [--resume] [--output DIR] [--tracking-uri URI]
    unirestore task add NAME [--from CKPT] [--steps N] ...
    unirestore task list [--output DIR]
    unirestore restore IMAGES... --task pir --ckpt CKPT --out DIR
    unirestore downstream train --task cls [--force]
    unirestore degrade SRC DST [--corruption NAME,...|imagenet_c|all] [--severity 1-5] [--seed S]

A problem the user can fix (unknown task, unknown or wrong-typed `--set`, missing prior, missing or corrupt
checkpoint, unusable data) ends with exit code 2 and one line on stderr; a diverged training with exit code 1.
Heavy modules are imported inside the commands, so `--help` and `task list` stay quick.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from .config import PRESET_TRAIN, RELEASE_TRAIN  # stdlib and yaml alone: the defaults the help texts name

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="UniRestore: one image-restoration model for human viewers and downstream vision models.",
)  # fmt: skip
task_app = typer.Typer(no_args_is_help=True, help="Add tasks to a trained model; list the known tasks.")
downstream_app = typer.Typer(
    no_args_is_help=True, help="Built-in downstream models (classifier, segmenter, ...)."
)
app.add_typer(task_app, name="task")
app.add_typer(downstream_app, name="downstream")


def _version(value: bool) -> None:
    if value:
        import importlib.metadata

        import diffusers
        import torch

        version = importlib.metadata.version("unirestore")
        typer.echo(f"unirestore {version} (torch {torch.__version__}, diffusers {diffusers.__version__})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the versions and exit."),
    ] = False,
) -> None:
    """UniRestore: one image-restoration model for human viewers and downstream vision models."""


# --------------------------------------------------------------------------------------------------
# Errors: one line, exit code 2 (user-fixable) or 1 (the run failed)


# A full disk, a quota, a read-only or forbidden place: the machine's state, not a bug, so one line too.
_WRITE_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM))
# An output path through a file (out/a.png/x) or onto a folder: the path given is wrong, not the disk.
_PATH_ERRNOS = frozenset((errno.ENOTDIR, errno.EISDIR, errno.EEXIST))


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .prior import PriorError
    from .registry import UnknownTaskError

    errors: list[type[BaseException]] = [ConfigError, PriorError, CheckpointError, UnknownTaskError]
    with contextlib.suppress(ImportError):
        from .data.io import DataError

        errors.append(DataError)
    with contextlib.suppress(ImportError):
        from .downstream import DownstreamError

        errors.append(DownstreamError)
    with contextlib.suppress(ImportError):
        from .sweep import SweepError  # ray is imported by the sweeps alone, not by this module

        errors.append(SweepError)
    return tuple(errors)


def _first_line(message: str) -> str:
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Original Traceback"):
        # raised in a DataLoader worker: torch re-raises it here as "Caught DataError in DataLoader worker
        # process 0." and the worker's traceback, whose last line is the error itself ("DataError: ...")
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else "failed"


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {_first_line(message)}", err=True)
    raise typer.Exit(code)


# What to do when the device runs out of memory, by kind of command.
TRAINING_OOM = (
    "lower --batch-size (or --set train.batch_size=N, with train.grad_accum to keep the effective batch), or "
    "set train.precision=bf16 or model.gradient_checkpointing=true; it continues from its last checkpoint "
    "with --resume"
)


def _worker_ran_out(text: str) -> bool:
    """A DataLoader worker killed (a bus error: /dev/shm full) or unable to share a batch with this process."""
    if "DataLoader worker" not in text:
        return False
    return any(sign in text for sign in ("shared memory", "Bus error", "exited unexpectedly", "No space left"))


TRAINING_INTERRUPTED = "what was saved is whole: the same command with --resume continues from the last checkpoint"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's preemption, `kill`), raised as Ctrl-C is while `_terminate_as_interrupt` holds."""

    signal = signal.SIGTERM


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While entered, in the main thread: SIGTERM raises `Terminated`, so that the command ends as on Ctrl-C
    (its MLflow run ended KILLED, not left running) instead of dying at once; exit 143. A SIGTERM ignored when
    entering (a run started with nohup) stays ignored."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) in (
        signal.SIG_IGN, None,
    ):  # fmt: skip
        yield
        return

    def terminate(number, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _errors(out_of_memory: str = TRAINING_OOM, interrupted: str = ""):
    """User errors as one line and exit 2; a full disk or the device's memory running out as one line naming
    the fix (`out_of_memory`) and exit 1; Ctrl-C as one line (`interrupted`: how to go on) and exit 130
    (`Terminated`, SIGTERM: 143); a training that stopped at a step it saved as its own line and 128 + the
    signal (130, SIGTERM 143); anything else as a traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt as interruption:
        if type(interruption).__name__ == "TrainingInterrupted":  # by name: torch need not be loaded to tell
            typer.echo(f"interrupted: {interruption}", err=True)
            raise typer.Exit(128 + interruption.signal) from None
        typer.echo(f"interrupted{'; ' + interrupted if interrupted else ''}", err=True)
        raise typer.Exit(128 + getattr(interruption, "signal", signal.SIGINT)) from None
    except Exception as error:
        import torch

        from .engine.trainer import TrainingDiverged

        if isinstance(error, TrainingDiverged):
            _fail(str(error), 1)
        if type(error).__name__ == "SweepInterrupted":  # Ctrl-C reached Ray's driver first: an interruption
            _fail(str(error), 130)
        if isinstance(error, torch.OutOfMemoryError):
            first = str(error).strip().split(". ")[0].split("\n")[0]  # "CUDA out of memory" and what it tried
            _fail(f"out of memory: {first}; {out_of_memory}", 1)
        if isinstance(error, _user_errors()):
            _fail(str(error), 2)
        if type(error).__module__ in ("torch._dynamo.exc", "torch._inductor.exc"):  # only with --compile
            cause = getattr(error, "inner_exception", None) or error.__cause__ or error  # the backend's own
            _fail(
                f"torch.compile failed: {_first_line(str(cause))}; run without --compile (compiling needs a C++ "
                "compiler on the CPU, Triton on a GPU)",
                1,
            )
        if isinstance(error, RuntimeError) and _worker_ran_out(str(error)):
            _fail(
                f"a DataLoader worker failed: {_first_line(str(error))} (its memory or the shared memory /dev/shm, which a container keeps small, ran out); raise "
                "the shared memory (docker run --shm-size 8g) or read the data in this process: eval --workers 0, "
                "--set train.num_workers=0 for training (which continues with --resume)",
                1,
            )
        if isinstance(error, OSError) and error.errno in _PATH_ERRNOS and error.filename:
            _fail(
                f"cannot write {error.filename}: {error.strerror} (a file stands where a folder is needed, or the "
                "other way round); give --out / --output a folder path",
                2,
            )
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            # what was written before stays whole: checkpoints and images are written whole or not at all
            where = f" {error.filename}" if error.filename else ""
            _fail(
                f"cannot write{where}: {error.strerror}; free space or write elsewhere (--output, --out), then run "
                "again (train and task add continue from their last checkpoint with --resume)",
                1,
            )
        raise


# --------------------------------------------------------------------------------------------------
# Options shared by the training commands


ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="A RunConfig YAML file (see experiments/configs).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.lr=2e-4 (repeatable)."),
]
DataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="builtin or a data-config YAML file, whose relative paths are read from its folder (default: --config's, "
        "or builtin).",
    ),
]
OutputOption = Annotated[str | None, typer.Option("--output", help="Run folder (default: runs/unirestore).")]
CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Compile the restoration (torch.compile): minutes at the first batch of each image size, then about "
        "5x faster on a GPU (BENCHMARKS.md); pays when many images share a size, or with tiles.",
    ),
]
TrainCompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Compile what stages 2 and 3 decode from (the frozen encoder, CFRM, Controller and UNet; torch.compile, "
        "the same random draws): minutes at the first step, then faster steps (BENCHMARKS.md). Sets train.compile.",
    ),
]
TrackingOption = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)."),
]


PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # --precision of restore and eval


def _check_precision(precision: str, device) -> None:
    from .config import ConfigError

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16: the CPU runs fp16 weights many times slower than fp32; use bf16")


def _digest(path: Path) -> str:
    """A checkpoint's identity: the start of its contents' SHA-256 (a retrained file at the same path differs)."""
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def _check_seed(seed: int) -> None:
    from .config import ConfigError

    if not -(2**63) <= seed < 2**64:
        raise ConfigError(f"--seed {seed}: give a seed from 0 to 2**64 - 1")


def _make_folder(folder: Path, option: str) -> None:
    """Create the output folder now, so that one that cannot be made stops the command before any work."""
    from .config import ConfigError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{option} {folder}: cannot create this folder ({error.strerror or error}); give a folder you can write to"
        ) from None


def _check_output_file(path: Path, option: str) -> None:
    """Make the folder of an output file and write a scratch file there now, as `atomic_write` will, so that
    a path that cannot be written stops the command before any work, not after it."""
    import tempfile

    from .config import ConfigError

    try:
        if path.is_dir():
            raise ConfigError(f"{option} {path} is a folder; give a file path, e.g. {path / 'compare.png'}")
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ConfigError(f"{option} {path}: {blocking} is a file, not a folder; give a path in a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(prefix=".unirestore-", suffix=".tmp", dir=path.parent)
        os.close(handle)
        os.unlink(scratch)
    except OSError as error:
        raise ConfigError(
            f"{option} {path}: cannot write in {path.parent} ({error.strerror or error}); give a path you can "
            "write to"
        ) from None


def _cast(model, precision: str) -> None:
    """Weights cast once (no per-op casts, half the memory traffic); channels_last convs are faster in half
    precision (3 % on the CPU at sd-turbo scale). Inputs and outputs stay fp32."""
    import torch

    if PRECISIONS[precision]:
        model.to(dtype=getattr(torch, PRECISIONS[precision]), memory_format=torch.channels_last)


def _parse_pairs(text: str, option: str) -> dict[str, str]:
    from .config import ConfigError

    pairs = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"{option} '{item}': expected task=value pairs, e.g. {option} pir=1,seg=0.1")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


def _build_config(config_file: Path | None, overrides: list[str]):
    from .config import apply_overrides, load_run_config

    config = load_run_config(config_file)
    return apply_overrides(config, overrides) if overrides else config


def _stages(text: str) -> tuple[int, ...]:
    from .config import ConfigError

    if text.strip() == "all":
        return (0, 1, 2)
    try:
        stages = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        stages = ()
    if not stages or any(s not in (0, 1, 2) for s in stages):
        raise ConfigError(f"--stage {text}: use 0, 1, 2, a list such as 1,2, or all")
    return stages


def _latest_checkpoint(folder: Path) -> Path:
    """The newest checkpoint in the run folder (`task add` without --from)."""
    from .checkpoint import CheckpointError, resolve_checkpoint

    if not (folder.is_dir() and any(p.is_file() for p in folder.glob("*.safetensors"))):
        raise CheckpointError(f"no trained checkpoint in {folder}; give one with --from CKPT (train first)")
    return resolve_checkpoint(folder)


# --------------------------------------------------------------------------------------------------
# train


def _check_tasks(run_config) -> None:
    """Tasks by their registered names (aliases replaced); a β, loss weight or task weight keyed by a task that
    does not exist is a typo: say so before training."""
    from .registry import UnknownTaskError, known_tasks, parse_task_list, task_key

    run_config.tasks = parse_task_list(list(run_config.tasks))
    known = known_tasks()
    for key in ("beta", "loss_weights", "task_weights"):
        weights = {task_key(name): value for name, value in getattr(run_config.train, key).items()}
        for name in weights:
            if name not in known:
                raise UnknownTaskError(
                    f"train.{key} names unknown task '{name}'; known tasks: {', '.join(known)}"
                )
        setattr(run_config.train, key, weights)


_STEPS_HELP = (
    f"Steps of stages 1 and 2 (default: {PRESET_TRAIN['stage1_steps']} and {PRESET_TRAIN['stage2_steps']} on the "
    f"tiny prior, the release's {RELEASE_TRAIN['stage1_steps']} and {RELEASE_TRAIN['stage2_steps']} on another)."
)
_BATCH_HELP = (
    f"Samples per micro-batch (default: {PRESET_TRAIN['batch_size']} on the tiny prior, the release's "
    f"{RELEASE_TRAIN['batch_size']} on another)."
)


@app.command()
def train(
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Comma-separated tasks, e.g. pir,seg,cls.")
    ] = None,
    stage: Annotated[str, typer.Option("--stage", help="0 (tiny prior), 1, 2, a list (1,2) or all.")] = "all",
    prior: Annotated[
        str | None, typer.Option("--prior", help="tiny, a diffusers folder or a hub id.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="builtin or a data-config YAML file, whose relative paths are read from its folder."),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help=_STEPS_HELP)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help=_BATCH_HELP)] = None,
    beta: Annotated[
        str | None, typer.Option("--beta", help="β per task, e.g. pir=1,seg=0.1,cls=0.1.")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --output where it stopped.")
    ] = False,
    output: OutputOption = None,
    tracking_uri: TrackingOption = None,
    compile_: TrainCompileOption = False,
) -> None:
    """Train UniRestore: the tiny prior (stage 0), then stages 1 and 2; print the evaluation table."""
    with _errors(interrupted=TRAINING_INTERRUPTED):
        overrides = []
        if tasks is not None:  # "pir,,seg" as "pir,seg"; an empty list is reported by the config check
            overrides.append(f"tasks=[{','.join(part.strip() for part in tasks.split(',') if part.strip())}]")
        if prior is not None:
            overrides.append(f"prior={prior}")
        if data is not None:
            overrides.append(f"data={data}")
        if steps is not None:
            overrides += [f"train.stage1_steps={steps}", f"train.stage2_steps={steps}"]
        if batch_size is not None:
            overrides.append(f"train.batch_size={batch_size}")
        for task, value in _parse_pairs(beta or "", "--beta").items():
            overrides.append(f"train.beta.{task}={value}")
        if output is not None:
            overrides.append(f"output={output}")
        if tracking_uri is not None:
            overrides.append(f"tracking_uri={tracking_uri}")
        if compile_:
            overrides.append("train.compile=true")
        run_config = _build_config(config, overrides + list(set_ or []))
        chosen = _stages(stage)
        _check_tasks(run_config)
        from .engine import train as train_run

        result = train_run(run_config, stages=chosen, resume=resume)
        typer.echo(f"checkpoint: {result.checkpoint}")
        if result.run_id:
            typer.echo(f"MLflow run: {result.run_id} ({run_config.tracking_uri})")


# --------------------------------------------------------------------------------------------------
# task add / task list


@task_app.command("add")
def task_add(
    name: Annotated[str, typer.Argument(help="The task to add, e.g. det.")],
    source: Annotated[
        Path | None,
        typer.Option("--from", help="Checkpoint to start from (default: the newest in --output)."),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Steps of stage 3.")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="β of the new task.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted `task add`.")] = False,
    output: OutputOption = None,
    tracking_uri: TrackingOption = None,
    prior: Annotated[str | None, typer.Option("--prior", help="The prior, if it moved since training.")] = None,
    data: DataOption = None,
    compile_: TrainCompileOption = False,
) -> None:
    """Add a task to a trained model by training its prompt alone (stage 3); old tasks stay bit-identical."""
    with _errors(interrupted=TRAINING_INTERRUPTED):
        from .registry import resolve_task_name

        name = resolve_task_name(name)
        overrides = []
        if steps is not None:
            if steps < 1:
                from .config import ConfigError

                raise ConfigError(f"--steps {steps}: the new prompt needs at least 1 training step")
            overrides.append(f"train.stage3_steps={steps}")
        if beta is not None:
            overrides.append(f"train.beta.{name}={beta}")
        if data is not None:
            overrides.append(f"data={data}")
        if output is not None:
            overrides.append(f"output={output}")
        if tracking_uri is not None:
            overrides.append(f"tracking_uri={tracking_uri}")
        if compile_:
            overrides.append("train.compile=true")
        run_config = _build_config(config, overrides + list(set_ or []))
        checkpoint = source or _latest_checkpoint(Path(run_config.output))
        if Path(checkpoint).is_dir() or source is None:  # a folder: say which of its files is the source
            from .checkpoint import resolve_checkpoint

            typer.echo(f"from checkpoint {resolve_checkpoint(checkpoint)}", err=True)
        from .engine import add_task

        result = add_task(run_config, checkpoint, name, resume=resume, prior=prior)
        typer.echo(f"checkpoint: {result.checkpoint}")


def _checkpoint_header(path: Path) -> tuple[list[str], dict] | None:
    """(tasks with a prompt, what training recorded: stage, trained prompts, MLflow run) from a checkpoint's
    metadata alone (its tensors are not read), or None."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return json.loads(metadata.get("tasks", "[]")), json.loads(metadata.get("extra", "{}"))
    except Exception:  # noqa: BLE001 (not a readable unirestore checkpoint: not listed)
        return None


def _checkpoint_prompts(path: Path) -> tuple[list[str], list[str]] | None:
    """(tasks with a prompt, tasks whose prompt was trained) from a checkpoint's metadata, or None."""
    header = _checkpoint_header(path)
    if header is None:
        return None
    tasks, extra = header
    return tasks, list(extra.get("trained_prompts", tasks))


@task_app.command("list")
def task_list(
    output: Annotated[Path, typer.Option("--output", help="Folder searched for checkpoints.")] = Path("runs"),
) -> None:
    """Every known task, where it comes from, and the checkpoints under --output with a trained prompt for it."""
    with _errors():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from .registry import broken_plugins, get_task_class, known_tasks, task_source, unimported_task_files

        holders: dict[str, list[str]] = {}
        if output.is_dir():
            for path in sorted(output.rglob("*.safetensors")):
                if path.name == "last.safetensors" or "mlartifacts" in path.parts:
                    continue
                found = _checkpoint_prompts(path)
                for task in found[1] if found else []:
                    holders.setdefault(task, []).append(str(path.relative_to(output)))
        table = Table(title=f"tasks (checkpoints searched under {output})")
        for column in ("task", "from", "description", "checkpoints with a trained prompt"):
            table.add_column(column)
        for name in known_tasks():
            source = task_source(name)
            where = "built-in" if source.startswith("unirestore.tasks") else source
            task_cls = get_task_class(name)
            description = getattr(task_cls, "description", "")
            aliases = getattr(task_cls, "aliases", ())
            if aliases:
                description += "; also " + ", ".join(f"'{alias}'" for alias in aliases)
            cells = (name, where, description, "\n".join(holders.get(name, [])) or "-")
            table.add_row(*map(escape, cells))  # paths and descriptions are data, not rich markup
        console = Console()
        console.print(table)
        from .data.config import DATASET_TYPES

        types = [name if cls.__module__.startswith("unirestore.") else f"{name} ({cls.__module__})"
                 for name, cls in DATASET_TYPES.items()]  # fmt: skip
        console.print(f"data-config dataset types: {escape(', '.join(types))}", highlight=False)
        for plugin, problem in broken_plugins().items():
            console.print(f"[yellow]plugin {plugin} failed to load:[/yellow] {problem}")
        for path in unimported_task_files():
            console.print(f"[yellow]{path} is not imported in tasks/__init__.py:[/yellow] its tasks are not "
                          "registered; add it to the import there")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# restore


@app.command()
def restore(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="Whose prompt decodes the output (pir: for viewers); several, e.g. pir,seg,cls: one image each, "
            "in OUT/<task>/, from one encode and denoise.",
        ),
    ] = "pir",
    ckpt: Annotated[
        Path, typer.Option("--ckpt", help="A trained checkpoint (.safetensors), or a run folder: its newest.")
    ] = Path("runs/unirestore"),
    out: Annotated[Path, typer.Option("--out", help="Output folder (PNG files).")] = Path("restored"),
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps, 1 to 4.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of each image's denoising noise.")] = 0,
    tile_size: Annotated[
        int,
        typer.Option(
            "--tile-size",
            help="Restore images larger than this many pixels a side tile by tile (memory bounded by the tile); "
            "0: always whole.",
        ),
    ] = 1024,
    precision: Annotated[
        str,
        typer.Option(
            "--precision", help="fp32, bf16 or (GPU) fp16 weights: bf16 is 1.8× faster on a CPU with AVX512-BF16."
        ),
    ] = "fp32",
    prior: Annotated[str | None, typer.Option("--prior", help="The prior, if it moved since training.")] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Restore up to this many same-size images at once (GPU throughput).")
    ] = 1,
    side_by_side: Annotated[
        bool,
        typer.Option(
            "--side-by-side", help="Also write OUT/side-by-side/<name>.png: the input, then each task's output."
        ),
    ] = False,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing",
            help="Leave out images whose output is already written (to go on after an interruption; outputs are "
            "written whole or not at all).",
        ),
    ] = False,
    compile_: CompileOption = False,
) -> None:
    """Restore images with a trained checkpoint; unreadable files are reported and skipped (exit status 1)."""
    with _errors(
        out_of_memory="give a smaller --tile-size, --batch-size 1 or --precision bf16",
        interrupted="the images written are whole: the same command with --skip-existing restores the rest",
    ):
        from rich.markup import escape

        from .checkpoint import load_checkpoint, resolve_checkpoint
        from .config import ConfigError
        from .console import make_console
        from .engine.trainer import launch_device, launch_position
        from .evaluate import check_prompts, image_bar
        from .inference import SIDE_BY_SIDE, already_restored, collect_images, restore_files
        from .registry import task_key

        # `segmentation` → `seg`; a name the checkpoint lacks is reported below
        tasks = list(dict.fromkeys(task_key(part.strip()) for part in task.split(",") if part.strip()))
        if not tasks:
            raise ConfigError(f"--task '{task}': give a task, e.g. pir, or several, e.g. pir,seg,cls")
        console = make_console(stderr=True)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder for the restored PNGs")
        _check_seed(seed)
        if tile_size < 0:
            raise ConfigError(f"--tile-size {tile_size}: give a tile side in pixels, or 0 to restore whole images")
        if steps is not None and not 1 <= steps <= 4:
            raise ConfigError(f"--steps {steps}: give 1 to 4 denoising steps")
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: give at least 1")
        # Under torchrun each process restores every world-th image on its own GPU; no process group is needed.
        position = launch_position()
        world, rank = position.world_size, position.rank
        torch_device = launch_device(position, device)
        _check_precision(precision, torch_device)
        # one task writes OUT/<name>: an input folder named side-by-side must not land on the rows' folder
        reserved = [SIDE_BY_SIDE] if side_by_side and len(tasks) == 1 else []
        files, problems, renamed = collect_images(list(images), out, reserved)
        if not files:  # before the model loads: nothing to restore is a mistake in the command
            raise ConfigError(f"no image to restore: {'; '.join(problems) or 'no inputs'}")
        ckpt = resolve_checkpoint(ckpt)  # a run folder: its newest checkpoint
        model = load_checkpoint(ckpt, prior=prior, device=torch_device)
        check_prompts(model, tasks, ckpt)
        _make_folder(out, "--out")
        trained = (_checkpoint_prompts(ckpt) or (None, None))[1] if rank == 0 else None  # noted once
        if trained == []:
            console.print(
                f"[yellow]note[/yellow] {escape(str(ckpt))} was saved after stage 1: no TFA or prompt is trained "
                "yet, so it is not the finished model; the stage-2 checkpoint (or that of `task add`) is"
            )
        elif trained and model.config.use_tfa and not model.config.shared_prompt:
            for name in (name for name in tasks if name not in trained):
                console.print(
                    f"[yellow]note[/yellow] the '{escape(name)}' prompt of {escape(str(ckpt))} was never trained; "
                    f"train it with `unirestore task add {escape(name)} --from {escape(str(ckpt))}`"
                )
        if world > 1:  # shared before --skip-existing looks, so the processes never split the work differently
            files = files[rank::world]
            if rank > 0:  # what concerns the inputs as a whole is the first process's to report
                problems, renamed = [], []
        # what each output records of how it was restored: --skip-existing keeps only outputs made so
        settings = {"checkpoint": _digest(ckpt), "precision": precision, "seed": seed, "steps": steps,
                    "tile_size": tile_size}  # fmt: skip
        if skip_existing:
            done, stale = already_restored(files, out, tasks, side_by_side, settings)
            files = [item for item in files if item not in done]
            if done:
                console.print(f"{len(done)} image(s) already restored in {escape(str(out))}: left as they are")
            if stale:
                console.print(
                    f"{len(stale)} image(s) in {escape(str(out))} were restored with other settings (checkpoint, "
                    "task, seed, steps, tile size or precision): restoring them again"
                )
        for problem in problems:
            console.print(f"[yellow]skipped[/yellow] {escape(problem)}")
        for rename in renamed:
            console.print(f"[cyan]renamed[/cyan] {escape(rename)}")
        if 0 < tile_size < model.size_multiple:
            raise ConfigError(
                f"--tile-size {tile_size}: a tile must be at least {model.size_multiple} pixels for this prior; "
                "give a larger one, or 0 to restore whole images"
            )
        _cast(model, precision)
        if compile_:
            model.compile_restore()
        done = [0]

        def count(images: int) -> None:
            done[0] += images
            advance(images)

        try:
            with image_bar("restoring", len(files), enabled=rank == 0, console=console) as advance:
                report = restore_files(
                    model, files, out, tasks, seed=seed, steps=steps, tile_size=tile_size, batch_size=batch_size,
                    side_by_side=side_by_side, advance=count, settings=settings,
                    on_skip=lambda message: console.print(f"[yellow]skipped[/yellow] {escape(message)}"),
                )  # fmt: skip
        except KeyboardInterrupt:
            console.print(f"{done[0]} of {len(files)} image(s) done")
            raise
        where = out if len(tasks) == 1 else f"{out}/<task> for {', '.join(tasks)}"
        if side_by_side:
            where = f"{where} (side by side with the input in {out / SIDE_BY_SIDE})"
        skipped = len(problems) + len(report.skipped)
        share = f" (process {rank} of {world}: one image in {world})" if world > 1 else ""
        typer.echo(f"restored {report.written} image(s) to {where}; {skipped} skipped{share}")
        if skipped:  # the good files are written; the exit status still says that some were not
            raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# downstream, degrade


@downstream_app.command("train")
def downstream_train(
    task: Annotated[str, typer.Option("--task", help="The task whose downstream model to build, e.g. cls.")],
    force: Annotated[bool, typer.Option("--force", help="Retrain even when a cached model exists.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    data: DataOption = None,
) -> None:
    """Train (or load from the cache) a task's built-in downstream model; with real data, check that its
    checkpoints load (a task plugin's `prepare` may train its own model on the data config's training set)."""
    with _errors():
        from .engine import build_tasks
        from .engine.trainer import resolve_device
        from .prior import prior_native_size
        from .registry import resolve_task_name

        task = resolve_task_name(task)
        # a task without built-in data is told to give --data: the option must exist here too
        run_config = _build_config(config, ([f"data={data}"] if data is not None else []) + list(set_ or []))
        size = run_config.train.crop_size or prior_native_size(run_config.prior)
        built = build_tasks(run_config, [task], resolve_device(run_config.train.device), size)[task]
        from ..tasks.base import Task

        prepare = getattr(built, "prepare", None)
        if not callable(prepare) or getattr(type(built), "prepare", None) is Task.prepare:  # the base's: nothing
            typer.echo(f"task '{task}' has no downstream model to train")
            return
        prepare(force=force)
        typer.echo(f"downstream model of '{task}' ready")


@app.command()
def degrade(
    src: Annotated[Path, typer.Argument(help="Folder of clean images.")],
    dst: Annotated[Path, typer.Argument(help="Output folder.")],
    corruption: Annotated[
        str,
        typer.Option(
            "--corruption",
            help="A degradation name, a list, imagenet_c (the 15 ImageNet-C ones) or all (every registered one).",
        ),
    ] = "all",
    severity: Annotated[
        int | None, typer.Option("--severity", help="1 to 5 (default: drawn per image).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the draws.")] = 0,
    workers: Annotated[
        int, typer.Option("--workers", help="Processes (e.g. one per CPU core); the files written are the same.")
    ] = 1,
) -> None:
    """Write a degraded copy of a folder of images (ImageNet-C corruptions and the unseen-benchmark ones)."""
    with _errors(interrupted="the images written are whole; run it again to write the rest"):
        from .degrade import degrade_command

        degrade_command(src, dst, corruption=corruption, severity=severity, seed=seed, workers=workers)


# --------------------------------------------------------------------------------------------------
# eval, runs compare, sweep

runs_app = typer.Typer(no_args_is_help=True, help="Compare tracked runs (MLflow).")
sweep_app = typer.Typer(no_args_is_help=True, help="Ray Tune sweeps: β weights, prompt-only extension.")
app.add_typer(runs_app, name="runs")
app.add_typer(sweep_app, name="sweep")


@app.command("eval")
def eval_(
    ckpt: Annotated[
        Path, typer.Option("--ckpt", help="A trained checkpoint (.safetensors), or a run folder: its newest.")
    ],
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated tasks, e.g. pir,cls,seg.")] = "pir,seg,cls",
    data: DataOption = None,
    corruption: Annotated[
        str | None,
        typer.Option(
            "--corruption",
            help="Evaluate per degradation: a name, a list, imagenet_c (the 15 ImageNet-C ones) or all (every "
            "registered one).",
        ),
    ] = None,
    severity: Annotated[int | None, typer.Option("--severity", help="1 to 5 with --corruption (default 3).")] = None,
    prompts: Annotated[
        str | None, typer.Option("--prompts", help="Prompts to restore with (default: each task's own and pir).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Test images per task; 0: all of them.")] = 32,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Folder for eval.csv / .json / .md, per-image eval_images.csv and eval_gains.png, grids/, and "
            "partial/ and mlflow_run.json (what --resume reads back).",
        ),
    ] = Path("runs/eval"),
    prior: Annotated[str | None, typer.Option("--prior", help="The prior, if it moved since training.")] = None,
    tracking_uri: TrackingOption = None,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment.")] = "unirestore-eval",
    config: ConfigOption = None,
    set_: SetOption = None,
    tile_size: Annotated[
        int, typer.Option("--tile-size", help="Restore test images larger than this a side tile by tile; 0: whole.")
    ] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Test images restored at once.")] = 8,
    precision: Annotated[
        str, typer.Option("--precision", help="fp32, bf16 or (GPU) fp16 weights for the restoration.")
    ] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Read back the (degradation, task) results an interrupted run of the same command saved in "
            "OUT/partial, and evaluate only the rest, in the same MLflow run (its id in OUT/mlflow_run.json).",
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Processes that read and degrade the test images ahead of the restoration (default: none on "
            "the CPU, where the restoration uses every core; beside a GPU, up to 8 of the cores).",
        ),
    ] = None,
    compile_: CompileOption = False,
) -> None:
    """The paper's tables for a checkpoint: LQ, HQ and restored rows per task (and per corruption).

    Real data needs the real downstream models: give the run's config (--config, e.g. the run folder's
    config.yaml) or --set downstream_checkpoints.resnet50=PATH and the like."""
    with (
        _errors(
            out_of_memory=f"give a smaller --batch-size (now {batch_size}) or --tile-size (now {tile_size})",
            interrupted="the same command with --resume keeps the results saved so far and evaluates the rest",
        ),
        contextlib.ExitStack() as held,  # the --out folder's lock, once the command's input is checked
    ):
        from rich.console import Console

        from .checkpoint import load_checkpoint, resolve_checkpoint
        from .config import ConfigError, to_dict
        from .degrade import parse_corruptions
        from .engine import (
            _absolute_paths,
            _check_data,
            _check_held_out_data,
            _prepare,
            build_tasks,
            run_folder_lock,
        )
        from .engine.tracking import check_tracking_uri
        from .engine.trainer import setup_distributed
        from .evaluate import check_prompts, evaluate_checkpoint, log_evaluation, tracked_evaluation
        from .registry import parse_task_list

        names = parse_task_list(tasks)
        prompt_names = parse_task_list(prompts) if prompts else None
        corruptions = None
        if corruption is not None:
            try:
                corruptions = parse_corruptions(corruption)
            except ValueError as error:
                raise ConfigError(f"--corruption: {error}") from None
        if severity is not None and not 1 <= severity <= 5:
            raise ConfigError(f"--severity {severity}: give 1 to 5")
        if severity is not None and corruption is None:  # it would be ignored: the table would not say so
            raise ConfigError(
                f"--severity {severity} is the strength of --corruption; give --corruption NAME (or all) with it"
            )
        if samples < 0:
            raise ConfigError(f"--samples {samples}: give a number of test images per task, or 0 for all of them")
        if tile_size < 0:
            raise ConfigError(f"--tile-size {tile_size}: give a tile side in pixels, or 0 to restore whole images")
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: give at least 1")
        if workers is not None and workers < 0:
            raise ConfigError(f"--workers {workers}: give 0 (read in this process) or more")
        existing = next((p for p in (out, *out.parents) if p.exists()), None)  # found now, not after the evaluation
        if existing is not None and not existing.is_dir():
            raise ConfigError(f"--out {out}: {existing} is a file; give a folder for the tables and grids")
        run_config = _build_config(config, list(set_ or []))
        run_config.tasks = names
        data_unset = data is None and config is None
        if data is not None:
            run_config.data = data
        data = run_config.data
        _check_data(run_config, names, training=False)
        # Under torchrun each process evaluates its share of the (degradation, task) units on its own GPU; the
        # first then reads them all back from OUT/partial and writes the tables.
        distributed, torch_device = setup_distributed(device)  # the model, and the downstream models beside it
        _check_precision(precision, torch_device)
        if distributed.main:  # before the model loads and --out is made: the run is started only then
            check_tracking_uri(tracking_uri or run_config.tracking_uri)
        ckpt = resolve_checkpoint(ckpt)  # a run folder: its newest checkpoint (results and resume name the file)
        model = load_checkpoint(ckpt, prior=prior, device=torch_device)
        check_prompts(model, names + (prompt_names or []), ckpt)  # before any downstream model is trained
        _cast(model, precision)  # the downstream models stay in fp32
        if compile_:
            model.compile_restore()
        if distributed.main and data_unset and data == "builtin" and model.prior_identity["name"] != "tiny":
            saved = next((f for f in (Path(ckpt).parent / "config.yaml", Path(ckpt).parent.parent / "config.yaml")
                          if f.is_file()), None)  # fmt: skip
            Console(stderr=True).print(
                f"[yellow]note[/yellow]: evaluating a checkpoint of prior '{model.prior_identity['name']}' on the "
                f"built-in data; for the data and downstream models its run used, add --config "
                f"{saved or 'with the run config'}",
                highlight=False, soft_wrap=True,
            )
        task_objects = build_tasks(run_config, names, next(model.cfrm.parameters()).device, model.native_size)
        # before --out is made, so that bad input leaves no folder behind: the real test sets build and the
        # real downstream models load (built-in ones are trained once, by the first process, and cached)
        _check_held_out_data(task_objects, ("test",))
        _prepare(task_objects, distributed)
        # two evaluations in one --out would overwrite each other's partial results and tables
        held.enter_context(run_folder_lock(out, distributed.main, user="eval", option="--out"))
        stat = Path(ckpt).stat()
        data_file = Path(str(data))
        identity = {  # what makes results saved by another run the same as this one's
            "checkpoint_bytes": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns, "data": str(data),
            "data_mtime_ns": data_file.stat().st_mtime_ns if data_file.is_file() else None, "precision": precision,
        }  # fmt: skip
        settings = {
            "prompts": prompt_names, "corruptions": corruptions, "severity": severity, "samples": samples or None,
            "batch_size": batch_size, "grids_folder": out / "grids", "tile_size": tile_size or None,
            "partial_folder": out / "partial", "identity": identity,
        }  # fmt: skip
        if workers is None:  # the cores this machine's processes share, one kept for each process itself
            here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine
            workers = 0 if torch_device.type == "cpu" else max(0, min(8, (os.cpu_count() or 1) // here - 1))
        checkpoint = Path(ckpt).resolve()
        resolved = _absolute_paths(run_config)
        prior_name = model.prior_identity["name"]
        tags = {"unirestore.tasks": ",".join(names), "unirestore.prior": prior_name,
                "unirestore.source": str(checkpoint)}  # fmt: skip
        trained_in = (_checkpoint_header(checkpoint) or ([], {}))[1].get("run_id")
        if trained_in:  # the run that trained the checkpoint: its curves, config and checkpoints
            tags["unirestore.source_run"] = trained_in
        params = {"checkpoint": str(checkpoint), "tasks": ",".join(names),
                  "prompts": ",".join(prompt_names or ["default"]), "data": resolved.data, "prior": prior_name,
                  "precision": precision,
                  "corruption": corruption or "default", "severity": (severity or 3) if corruption else "",
                  "samples": samples or "all", "tile_size": tile_size}  # fmt: skip
        # The MLflow run is open while the units are evaluated, each unit's metrics logged as it finishes, and
        # its id kept in --out for --resume to continue it. A run folder holds several checkpoints: the run is
        # named after both; the store is the one --config names (the training's, say) unless --tracking-uri is
        # given, as `train` and `task add` take it.
        tracking = tracked_evaluation(
            out, tracking_uri=tracking_uri or run_config.tracking_uri, experiment=experiment,
            run_name=f"eval-{checkpoint.parent.name}/{checkpoint.stem}", params=params, tags=tags,
            config=to_dict(resolved), resume=resume, enabled=distributed.main,
            say=lambda line: typer.echo(f"note: {line}", err=True),
        )  # fmt: skip
        with _terminate_as_interrupt(), tracking as tracker:
            evaluated = False  # by this process: the unreadable files' count is logged anew

            def on_unit(metrics: dict[str, float], fresh: bool) -> None:
                nonlocal evaluated
                evaluated = evaluated or fresh
                # a unit read back was logged by the interrupted process unless it stopped in between
                tracker.log_metrics(metrics, 0, again=fresh)

            report = evaluate_checkpoint(
                model, task_objects, str(ckpt), progress=distributed.main, resume=resume,
                shard=(distributed.rank, distributed.world_size), workers=workers, on_unit=on_unit, **settings,
            )  # fmt: skip
            if distributed.enabled:
                units = list(dict.fromkeys(f"{label}/{task}" for label, task, _ in report.rows))
                evaluated_here = ", ".join(unit for unit in units if unit not in report.resumed) or "nothing"
                typer.echo(f"process {distributed.rank} of {distributed.world_size} evaluated {evaluated_here}")
                if report.resumed:
                    typer.echo(f"process {distributed.rank} read back from {out / 'partial'}: "
                               f"{', '.join(report.resumed)}")  # fmt: skip
                if report.retested:
                    typer.echo(f"process {distributed.rank} evaluated again, their test set changed since "
                               f"{out / 'partial'} was saved: {', '.join(report.retested)}")  # fmt: skip
                distributed.barrier()
                if not distributed.main:
                    return
                # every unit, the other processes' logged as they are read back
                report = evaluate_checkpoint(model, task_objects, str(ckpt), resume=True, on_unit=on_unit, **settings)
                report.resumed = []  # each process said above what it read back
            if report.resumed:
                typer.echo(f"read back from {out / 'partial'} (evaluated before): {', '.join(report.resumed)}")
            if report.retested:
                typer.echo(f"evaluated again, their test set changed since {out / 'partial'} was saved: "
                           f"{', '.join(report.retested)}")  # fmt: skip
            files = report.write(out)
            Console().print(report.rich_table())
            for line in report.improved():  # how many images each prompt helped: a mean can hide a split
                typer.echo(line)
            log_evaluation(tracker, report, files, again=evaluated)
        named = f" ({', '.join(report.skipped[:3])}{', ...' if report.skipped_files > 3 else ''})" if report.skipped else ""
        typer.echo(f"wrote {', '.join(str(p) for p in files)}; unreadable files skipped: {report.skipped_files}{named}")


@runs_app.command("compare")
def runs_compare(
    experiment: Annotated[str | None, typer.Option("--experiment", help="MLflow experiment (default: all).")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="Metric to show (repeatable).")] = None,
    filter_: Annotated[str, typer.Option("--filter", help='MLflow filter, e.g. "params.stages = \'2\'".')] = "",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG bar chart of the metrics.")] = None,
    curves: Annotated[
        Path | None,
        typer.Option("--curves", help="Write a PNG of each --metric's history, one line per run (training curves)."),
    ] = None,
    per_image: Annotated[
        bool,
        typer.Option(
            "--per-image",
            help="Eval runs (and training runs, by their final table) image by image against the newest shown "
            "with a value for a --metric: on how many test images each restored row is above or below it, with "
            "the sign test.",
        ),
    ] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Runs side by side with their key params and metrics, the best per column marked."""
    with _errors():
        from rich.console import Console

        from .compare import (
            CompareError,
            compare_runs,
            paired_per_image,
            plot_comparison,
            plot_histories,
            render_paired,
            render_table,
        )
        from .config import _default_tracking_uri

        if curves is not None and not metric:
            _fail("--curves draws the history of each --metric; give one, e.g. --metric stage2/loss_total", 2)
        figures = {option: path for option, path in (("--plot", plot), ("--curves", curves)) if path is not None}
        for option, path in figures.items():
            _check_output_file(path, option)
        try:
            comparison = compare_runs(tracking_uri or _default_tracking_uri(), experiment, metric, filter_)
        except CompareError as error:
            _fail(str(error), 2)
        Console(width=200).print(render_table(comparison, title=experiment or "all experiments"))
        unwritten = False
        for option, path in figures.items():
            try:
                if option == "--plot":
                    typer.echo(f"plot: {plot_comparison(comparison, path)}")
                else:
                    typer.echo(f"curves: {plot_histories(tracking_uri or _default_tracking_uri(), comparison, path)}")
            except OSError as error:  # the folder checked above changed since: the other outputs still come
                typer.echo(f"error: {option} {path}: cannot write it ({error.strerror or error}); give another path", err=True)
                unwritten = True
        if per_image:
            try:
                paired = paired_per_image(tracking_uri or _default_tracking_uri(), comparison)
            except CompareError as error:
                _fail(str(error), 2)
            Console(width=200).print(render_paired(paired))
        if unwritten:
            raise typer.Exit(1)


SweepFrom = Annotated[Path, typer.Option("--from", help="The checkpoint to start from.")]
GpusPerTrial = Annotated[
    float | None,
    typer.Option("--gpus-per-trial", help="GPUs each trial holds (default: 1 where the cluster has GPUs, else 0)."),
]
CpusPerTrial = Annotated[float, typer.Option("--cpus-per-trial", help="CPU cores each trial holds.")]
RayAddress = Annotated[str | None, typer.Option("--address", help="An existing Ray cluster.")]
SweepResume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep.")]


@sweep_app.command("beta")
def sweep_beta(
    source: SweepFrom,
    tasks: Annotated[str, typer.Option("--tasks", help="Tasks of stage 2.")] = "pir,seg,cls",
    num_samples: Annotated[int, typer.Option("--num-samples", help="Trials.")] = 8,
    search: Annotated[str, typer.Option("--search", help="random or grid.")] = "random",
    scheduler: Annotated[str, typer.Option("--scheduler", help="asha or none.")] = "asha",
    ranges: Annotated[str | None, typer.Option("--ranges", help="β ranges, e.g. seg=0.01:1,cls=0.01:1.")] = None,
    gpus_per_trial: GpusPerTrial = None,
    cpus_per_trial: CpusPerTrial = 1.0,
    address: RayAddress = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Stage-2 steps per trial (default: train.stage2_steps for the prior).")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", help="Sweep folder (default: runs/sweep-beta).")] = None,
    resume: SweepResume = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    data: DataOption = None,
) -> None:
    """Sweep the stage-2 β weights with Ray Tune; write the best trial's run config to OUTPUT/best.yaml.

    best.yaml holds the winner's tasks, its β and the settings given here (--config, --set, --data, --steps).
    Train it anew (stages 0, 1, 2): unirestore train --config OUTPUT/best.yaml --output DIR
    Its stage 2 alone, as the trial: copy the --from checkpoint to DIR/stage1.safetensors and add --stage 2."""
    with _errors(interrupted="the same command with --resume continues the sweep"):
        from .registry import parse_task_list
        from .sweep import parse_ranges
        from .sweep import sweep_beta as run_sweep

        run_config = _build_config(config, ([f"data={data}"] if data is not None else []) + list(set_ or []))
        # prints its summary: the trials, the best β, best.yaml and the best checkpoint
        run_sweep(
            source, parse_task_list(tasks), config=run_config, num_samples=num_samples, search=search,
            scheduler=scheduler, beta_ranges=parse_ranges(ranges) if ranges else None,
            gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, address=address, steps=steps,
            output=output, resume=resume,
        )  # fmt: skip


@sweep_app.command("extend")
def sweep_extend(
    source: SweepFrom,
    tasks: Annotated[str, typer.Option("--tasks", help="New tasks, e.g. det,ret.")] = "det",
    num_samples: Annotated[int, typer.Option("--num-samples", help="Trials per task (over the lr).")] = 1,
    gpus_per_trial: GpusPerTrial = None,
    cpus_per_trial: CpusPerTrial = 1.0,
    address: RayAddress = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Stage-3 steps per trial.")] = None,
    output: Annotated[str | None, typer.Option("--output", help="Sweep folder (default: runs/sweep-extend).")] = None,
    resume: SweepResume = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    data: DataOption = None,
) -> None:
    """Add new tasks by prompt alone, one Ray trial (or more) per task; merge the best prompts."""
    with _errors(interrupted="the same command with --resume continues the sweep"):
        from .registry import parse_task_list
        from .sweep import sweep_extend as run_extend

        run_config = _build_config(config, ([f"data={data}"] if data is not None else []) + list(set_ or []))
        # prints its summary: the trials and the merged checkpoint
        run_extend(
            source, parse_task_list(tasks), config=run_config, num_samples=num_samples,
            gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, address=address, steps=steps,
            output=output, resume=resume,
        )  # fmt: skip


def main() -> None:
    # Idle OpenMP threads sleep instead of spinning: on a small, shared CPU spinning threads slow
    # training down many times over. Must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import sys

    import torch

    # Values below float32's normal range count as zero: on some CPUs arithmetic on them is many times slower,
    # and stage 2's gradients reach them (3x fewer steps/s on a 2-core Xeon; BENCHMARKS.md).
    torch.set_flush_denormal(True)

    try:  # typer ≥ 0.20 raises the errors of the click it vendors; older ones raise click's own
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as error:  # the help is already printed
        sys.exit(error.exit_code)
    except click_errors.UsageError as error:
        # A mistyped command, option or value is a user error like the others: one line, exit 2.
        command = error.ctx.command_path if error.ctx else "unirestore"
        print(f"error: {error.format_message().rstrip('.')}; see `{command} --help`", file=sys.stderr)
        sys.exit(error.exit_code)
    except click_errors.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
