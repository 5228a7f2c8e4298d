"""The data config: which datasets feed each task, with what weight, and how HQ-only sets are degraded.

```yaml
size: 256                 # crop side (null: full images, batch size 1; absent: the run's crop size)
seed: 0
degradation:              # optional; these are the release's defaults
  corruptions: [clean, imagenet_c]   # names and groups, read as `--corruption` reads them (see below)
  severity: null          # fixed 1..5, or null to draw with severity_probs
  severity_probs: [0.05, 0.25, 0.40, 0.25, 0.05]
  rescale: true
tasks:
  pir:
    - {type: hq_folder, root: /data/DIV2K/DIV2K_train_HR, weight: 1, splits: [train]}
    - {type: hq_folder, root: /data/DIV2K/DIV2K_valid_HR, splits: [val, test]}
  cls:
    - {type: image_folder, root: /data/imagenet/train, weight: 0.2, splits: [train]}
    - {type: image_folder, root: /data/imagenet/val, splits: [val, test]}
  seg: [{type: cityscapes, root: /data/cityscapes, weight: 10}]   # its own train / val folders
```

Every entry has `type` and the common keys `weight` (repeat factor, see `compose.WeightedConcat`), `splits`
(the splits the entry serves, e.g. [train] for a training folder and [val, test] for a held-out one; default:
all), `split` (pins the split the dataset class reads; default: the one being built), `degrade` (HQ-only
sets: add `lq`; default true), `corruption` / `severity` (this entry's own degradation); the other keys are
the dataset class's own arguments (`root`, `lq_dir`, `beta`, ...; see `DATASET_TYPES`). Unknown types and
keys, missing required keys and values of the wrong type fail at parse time with the file, the key and the
valid choices; so does a type whose samples lack what its task reads (an `hq_folder` under `cls` has no
labels: the types' `sample_keys` against the task's). A relative path in the file (`root`, `labels`,
`images`, ...: the keys a dataset class types as a `Path`) is read from the file's own folder, not from the
working directory, so the file works from wherever a run starts.

`corruptions` (and an entry's `corruption`) takes the words `unirestore degrade --corruption` and
`unirestore eval --corruption` take, meaning the same names (`degrade.parse_corruptions`): a degradation
name, `imagenet_c` (the 15 ImageNet-C corruptions), `all` (every registered degradation, the unseen
benchmarks' synthesisers included), or a list of them. The default is the release's mix, clean + imagenet_c.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset

from ..config import did_you_mean
from ..degrade import SEVERITY_PROBS, TRAIN_CORRUPTIONS, Degrader, parse_corruptions
from .adapters import (
    ACDC,
    RESIDE,
    RTTS,
    Cityscapes,
    COCODetection,
    FoggyCityscapes,
    GoPro,
    HQFolder,
    ImageFolder,
    PairedFolder,
)
from .builtin import BuiltinPhotos, BuiltinScenes
from .compose import Degraded, WeightedConcat
from .io import DataError

# type name -> dataset class; its constructor's arguments other than split/size/seed are the entry's keys
DATASET_TYPES: dict[str, type[Dataset]] = {
    "hq_folder": HQFolder,
    "paired_folder": PairedFolder,
    "gopro": GoPro,
    "reside": RESIDE,
    "image_folder": ImageFolder,
    "cityscapes": Cityscapes,
    "foggy_cityscapes": FoggyCityscapes,
    "acdc": ACDC,
    "coco": COCODetection,
    "rtts": RTTS,
    "builtin_scenes": BuiltinScenes,
    "builtin_photos": BuiltinPhotos,
}
_BUILDER_ARGS = ("split", "size", "seed")  # given by the builder, not by the entry (except `split`)
SPLITS = ("train", "val", "test")


@dataclass
class DegradationConfig:
    corruptions: list[str] = field(default_factory=lambda: list(TRAIN_CORRUPTIONS))  # names drawn uniformly
    severity: int | None = None  # fixed severity 1..5; None draws one with severity_probs
    severity_probs: list[float] = field(default_factory=lambda: list(SEVERITY_PROBS))  # P(severity = 1..5)
    rescale: bool = (
        True  # corrupt at a random lower resolution (short side in [size/4, size)), then resize back
    )


@dataclass
class DatasetEntry:
    type: str  # a key of DATASET_TYPES
    weight: float = 1.0  # repeat factor per epoch (0.2: a fifth of the set, 10: ten views of each image)
    split: str | None = None  # pin this set's split; None: the split being built
    # The splits this entry serves (train, val, test); None: every split. A training folder listed with
    # [train] and a held-out one with [val, test] keep evaluation off the training images.
    splits: list[str] | None = None
    degrade: bool = True  # HQ-only sets: add `lq` with the degrader (False: `hq` only)
    corruption: list[str] | None = None  # this entry's degradation names (default: the config's)
    severity: int | None = None  # this entry's fixed severity (default: the config's)
    options: dict[str, Any] = field(default_factory=dict)  # the dataset class's own arguments


@dataclass
class DataConfig:
    # Crop side; None keeps full images; 0 (the key absent) follows the run: train.crop_size, else the prior's
    # native size. A train.crop_size set for the run takes precedence over the file's.
    size: int | None = 0
    seed: int = 0  # base seed of crops and degradations
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    tasks: dict[str, list[DatasetEntry]] = field(default_factory=dict)  # task name -> its datasets


# --------------------------------------------------------------------------------------------------
# Parsing


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` checked against (and lightly converted to) `annotation`; DataError naming `where` otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except DataError as error:
                errors.append(error)
        raise (
            errors[0]
            if len(errors) == 1
            else DataError(f"{where}: {value!r} is not {_type_name(annotation)}")
        )
    if origin in (tuple, list):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise DataError(f"{where}: expected a list, got {value!r}")
        item_type = typing.get_args(annotation)[0] if typing.get_args(annotation) else Any
        coerced = [_coerce(item, item_type, f"{where}[{k}]") for k, item in enumerate(items)]
        return tuple(coerced) if origin is tuple else coerced
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Path and isinstance(value, str | os.PathLike):
        return Path(value).expanduser()
    raise DataError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def register_dataset_type(name: str, cls: type[Dataset] | None = None):
    """Make `cls` a data-config `type`; as a decorator: `@register_dataset_type("nyu_depth")`.

    A task plugin registers the dataset types its data needs when its module is imported (a config naming
    a type not known yet loads the plugins first). The constructor's arguments other than split / size / seed
    become the entry's keys, checked as the built-in types' are. A name already taken raises.
    """

    def wrap(dataset_cls: type[Dataset]) -> type[Dataset]:
        taken = DATASET_TYPES.get(name)
        if taken is not None and taken is not dataset_cls:
            raise ValueError(
                f"dataset type {name!r} is registered twice ({taken.__module__}.{taken.__qualname__} and "
                f"{dataset_cls.__module__}.{dataset_cls.__qualname__}); rename one"
            )
        DATASET_TYPES[name] = dataset_cls
        return dataset_cls

    return wrap(cls) if cls is not None else wrap


def dataset_options(type_name: str) -> dict[str, inspect.Parameter]:
    """The entry keys of a dataset type (its constructor's arguments minus split/size/seed)."""
    cls = DATASET_TYPES[type_name]
    params = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in params.items() if name != "self" and name not in _BUILDER_ARGS}


_COMMON = {f.name: f for f in fields(DatasetEntry) if f.name not in ("type", "options")}


def _is_path(annotation: Any) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)


def _under(base: Path, value: str | Path) -> str | Path:
    """`value` (`~` expanded) read from the folder `base` when relative; the same type back."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else Path(os.path.normpath(base / path))  # `../images` named plainly
    return path if isinstance(value, Path) else str(path)


def _parse_entry(raw: Any, where: str, base: Path | None = None) -> DatasetEntry:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a mapping like {{type: hq_folder, root: ...}}, got {raw!r}")
    if "type" not in raw:
        raise DataError(f"{where}: missing key 'type'; valid types: {', '.join(DATASET_TYPES)}")
    type_name = raw["type"]
    if type_name not in DATASET_TYPES:
        from ..registry import load_tasks

        load_tasks()  # task plugins register their dataset types when they are imported
    if type_name not in DATASET_TYPES:
        from ..registry import broken_plugins

        broken = "; ".join(f"{name}: {error}" for name, error in broken_plugins().items())
        raise DataError(
            f"{where}.type: unknown dataset type {type_name!r}; valid: {', '.join(DATASET_TYPES)}"
            + (f" (task plugins that failed to load: {broken})" if broken else "")
        )
    where = f"{where} ({type_name})"
    options = dataset_options(type_name)
    try:
        hints = typing.get_type_hints(DATASET_TYPES[type_name].__init__)
    except (NameError, TypeError, AttributeError):  # a plugin annotation that does not resolve: values as written
        hints = {}
    common_hints = typing.get_type_hints(DatasetEntry)
    entry = DatasetEntry(type=type_name)
    for key, value in raw.items():
        if key == "type":
            continue
        if key in _COMMON:
            if key == "corruption":
                try:
                    value = list(parse_corruptions(_coerce(value, list[str], f"{where}.corruption")))
                except ValueError as error:
                    raise DataError(f"{where}.corruption: {error}") from None
            else:
                value = _coerce(value, common_hints[key], f"{where}.{key}")
            setattr(entry, key, value)
        elif key in options:
            value = _coerce(value, hints.get(key, Any), f"{where}.{key}")
            if base is not None and _is_path(hints.get(key)) and isinstance(value, str | Path):
                value = _under(base, value)
            entry.options[key] = value
        else:
            valid = ["type", *_COMMON, *options]
            closest = did_you_mean(key, valid)
            raise DataError(f"{where}: unknown key {key!r};{closest} valid keys: {', '.join(valid)}")
    missing = [
        n for n, p in options.items() if p.default is inspect.Parameter.empty and n not in entry.options
    ]
    if missing:
        raise DataError(f"{where}: missing required key(s) {', '.join(missing)}")
    if entry.split is not None and entry.split not in SPLITS:
        raise DataError(f"{where}.split: unknown split {entry.split!r}; valid: {', '.join(SPLITS)}")
    for name in entry.splits or ():
        if name not in SPLITS:
            raise DataError(f"{where}.splits: unknown split {name!r}; valid: {', '.join(SPLITS)}")
    if entry.splits == []:
        raise DataError(f"{where}.splits: empty; list the splits this set serves, or drop the key for all")
    if not entry.weight > 0:
        raise DataError(f"{where}.weight: must be positive, got {entry.weight}")
    if entry.severity is not None and entry.severity not in (1, 2, 3, 4, 5):
        raise DataError(f"{where}.severity: must be 1..5 or null, got {entry.severity}")
    return entry


def _parse_degradation(raw: Any, where: str) -> DegradationConfig:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a mapping, got {raw!r}")
    config = DegradationConfig()
    hints = typing.get_type_hints(DegradationConfig)
    for key, value in raw.items():
        if key not in hints:
            closest = did_you_mean(key, hints)
            raise DataError(f"{where}: unknown key {key!r};{closest} valid keys: {', '.join(hints)}")
        value = _coerce(value, hints[key], f"{where}.{key}")
        if key == "corruptions":
            try:
                value = list(parse_corruptions(value))
            except ValueError as error:
                raise DataError(f"{where}.corruptions: {error}") from None
        setattr(config, key, value)
    try:  # the Degrader checks names, severity and probabilities
        _degrader(config, None, None, 0)
    except ValueError as error:
        raise DataError(f"{where}: {error}") from None
    return config


def _missing_keys(type_name: str, needed: tuple[str, ...], degrade: bool = True) -> list[str]:
    """The keys of `needed` that samples of `type_name` lack; none where the type does not declare its
    `sample_keys` (a plugin's may not)."""
    gives = getattr(DATASET_TYPES[type_name], "sample_keys", None)
    if gives is None:
        return []
    gives = {*gives, "lq"} if degrade else set(gives)  # `Degraded` adds lq to HQ-only sets
    return [key for key in needed if key not in gives]


def _check_serves(task: str, entries: list[DatasetEntry], where: str) -> None:
    """Refuse an entry whose type cannot give `task` what it reads: it would train on nothing and score 0
    accuracy, or a NaN mIoU, without a word."""
    from ..registry import get_task_class

    needed = tuple(get_task_class(task).sample_keys)
    for k, entry in enumerate(entries):
        missing = _missing_keys(entry.type, needed, entry.degrade)
        if missing:
            if missing == ["lq"]:  # an HQ-only set with degrade: false
                fix = "drop degrade: false, which leaves out the lq the degrader adds"
            else:
                serving = [
                    name for name, cls in DATASET_TYPES.items()
                    if getattr(cls, "sample_keys", None) is not None and not _missing_keys(name, needed)
                ]  # fmt: skip
                fix = f"use a type that gives them: {', '.join(serving)}"
            raise DataError(
                f"{where}[{k}] ({entry.type}): this type cannot serve task '{task}', its samples have no "
                f"{', '.join(missing)}; {fix}"
            )


def parse_data_config(raw: Any, source: str = "<data config>", base: str | os.PathLike | None = None) -> DataConfig:
    """A `DataConfig` from a parsed YAML mapping; `source` (the file) prefixes every error message, and
    relative paths in it are read from the folder `base` (None: left as they are, for the working directory)."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a mapping with keys size, seed, degradation, tasks")
    config = DataConfig()
    valid = [f.name for f in fields(DataConfig)]
    for key, value in raw.items():
        where = f"{source}: {key}"
        if key == "size":
            config.size = _coerce(value, int | None, where)
            if config.size is not None and config.size < 32:
                raise DataError(f"{where}: must be at least 32 (or null for full images), got {config.size}")
        elif key == "seed":
            config.seed = _coerce(value, int, where)
        elif key == "degradation":
            config.degradation = _parse_degradation(value, where)
        elif key == "tasks":
            if not isinstance(value, dict) or not value:
                raise DataError(f"{where}: expected a mapping of task name -> list of datasets")
            from ..registry import UnknownTaskError, resolve_task_name

            for task, entries in value.items():
                try:
                    task = resolve_task_name(str(task))  # an alias keys its task's entries
                except UnknownTaskError as error:
                    raise DataError(f"{where}.{task}: {error}") from None
                if task in config.tasks:
                    raise DataError(f"{where}.{task}: listed twice (by its name and an alias); keep one")
                if isinstance(entries, dict):
                    entries = [entries]
                if not isinstance(entries, list) or not entries:
                    raise DataError(f"{where}.{task}: expected a non-empty list of datasets")
                config.tasks[str(task)] = [
                    _parse_entry(e, f"{where}.{task}[{k}]", None if base is None else Path(base))
                    for k, e in enumerate(entries)
                ]
                _check_serves(task, config.tasks[task], f"{where}.{task}")
        else:
            closest = did_you_mean(key, valid)
            raise DataError(f"{where}: unknown key {key!r};{closest} valid keys: {', '.join(valid)}")
    return config


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Read and validate a data config YAML file; relative paths in it are read from its own folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        from ..config import yaml_syntax_error

        raise DataError(yaml_syntax_error(path, error)) from None
    return parse_data_config(raw, str(path), base=path.absolute().parent)


def check_entries(
    config: DataConfig, tasks: list[str], source: str = "<data config>", builtin_types: dict | None = None
) -> None:
    """Raise a `DataError` naming the first of `tasks` the file lists no datasets for, or the first entry
    whose `root` is not a folder or whose `labels` file is missing (a cheap check made before a run starts; the datasets themselves are built,
    and their files listed, later).

    A task the file leaves out is an error, not the built-in scenes: at a real prior's scale that would
    train and score the task on toy data, with nothing in the table to say so. The built-in sets stay
    available by naming them (`builtin_types`: task -> the built-in set the message suggests).
    """
    for task in tasks:
        if task not in config.tasks:
            builtin = (builtin_types or {}).get(task, "builtin_scenes")
            alternative = f", or `{task}: [{{type: {builtin}}}]` for the built-in data" if builtin else ""
            raise DataError(
                f"{source} lists no datasets for task {task!r} (it lists {', '.join(config.tasks) or 'none'}); "
                f"add them under tasks.{task}{alternative}"
            )
        for k, entry in enumerate(config.tasks[task]):
            root = entry.options.get("root")
            if root is not None and not Path(root).expanduser().is_dir():
                raise DataError(
                    f"{source}: tasks.{task}[{k}] ({entry.type}): root {root} is not a folder; "
                    "fix the path in the data config (it must exist and hold the data)"
                )
            labels = entry.options.get("labels")
            if labels is not None and not Path(labels).expanduser().is_file():
                raise DataError(
                    f"{source}: tasks.{task}[{k}] ({entry.type}): labels file {labels} not found; "
                    "fix the path in the data config"
                )


def training_images_in_test(
    config: DataConfig, tasks: list[str], source: str = "<data config>", split: str = "test"
) -> list[str]:
    """One message per entry of `tasks` that serves training and `split` alike from the same files (a folder
    of images without `splits`): the final table (test) or a sweep's objective (val) would score images the
    model trained on."""
    scored = {"test": "the final table", "val": "the sweep's objective"}.get(split, f"the {split} split")
    messages = []
    for task in tasks:
        for k, entry in enumerate(config.tasks.get(task, [])):
            serves = set(entry.splits or SPLITS)
            if entry.split is None and {"train", split} <= serves and not getattr(
                DATASET_TYPES.get(entry.type), "reads_split", True
            ):
                where = entry.options.get("root", entry.type)
                messages.append(
                    f"{source}: tasks.{task}[{k}] ({entry.type} {where}) serves training and the {split} split "
                    f"alike, so {scored} scores images the model trained on; give it splits: [train] and list "
                    "a held-out set with splits: [val, test]"
                )
    return messages


# --------------------------------------------------------------------------------------------------
# Building


def _derive(seed: int, *keys: int) -> int:
    """A seed for one part (an entry, its degrader) from the base seed: parts never share random streams."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _degrader(
    config: DegradationConfig, corruption: list[str] | None, severity: int | None, seed: int
) -> Degrader:
    return Degrader(
        corruptions=corruption or config.corruptions,
        severity=severity if severity is not None else config.severity,
        severity_probs=config.severity_probs,
        rescale=config.rescale,
        seed=seed,
    )


def build_dataset(
    entry: DatasetEntry,
    split: str,
    size: int | None,
    seed: int = 0,
    degradation: DegradationConfig | None = None,
) -> Dataset:
    """One entry's dataset; HQ-only sets come wrapped in `Degraded` unless `entry.degrade` is false."""
    from ..registry import builtin_dataset_types

    cls = DATASET_TYPES[entry.type]
    split = entry.split or split
    options = dict(entry.options)
    if size is None and entry.type in builtin_dataset_types():
        raise DataError(f"{entry.type}: generated data needs a size; set `size` in the data config")
    try:
        dataset = cls(split=split, size=size, seed=_derive(seed, 0), **options)
    except DataError:
        raise
    except ValueError as error:  # a value the class itself refuses, e.g. builtin_photos leaves: 2
        raise DataError(f"{entry.type}: {error}; fix it in the data config") from None
    if entry.degrade:
        degrader = _degrader(
            degradation or DegradationConfig(), entry.corruption, entry.severity, _derive(seed, 1)
        )
        dataset = Degraded(dataset, degrader)
    return dataset


def build_task_dataset(
    entries: list[DatasetEntry],
    split: str,
    size: int | None,
    seed: int = 0,
    degradation: DegradationConfig | None = None,
    task: str = "",
) -> WeightedConcat:
    """One task's datasets mixed by their weights (a `WeightedConcat`); every sample has every key. `task`
    names the entries in messages."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not entries:
        raise DataError("build_task_dataset needs at least one dataset entry")
    serving = [(k, e) for k, e in enumerate(entries) if e.splits is None or split in e.splits]
    if not serving:
        where = f"tasks.{task}" if task else "this task"
        raise DataError(
            f"no dataset of {where} serves the {split} split (each lists other `splits`); add a held-out "
            f"set with splits: [{split}]"
        )
    datasets = [build_dataset(e, split, size, _derive(seed, k), degradation) for k, e in serving]
    # weights mix the training sets; a held-out split scores each of its images once
    weights = [e.weight if split == "train" else 1.0 for _, e in serving]
    return WeightedConcat(datasets, weights, seed=_derive(seed, len(entries)))


def build_task_datasets(
    config: DataConfig, split: str = "train", run_size: int = 256
) -> dict[str, WeightedConcat]:
    """Every task's dataset for `split`, task name -> `WeightedConcat` (crops of `run_size` where the config
    gives no size)."""
    size = run_size if config.size == 0 else config.size
    return {
        task: build_task_dataset(
            entries, split, size, _derive(config.seed, zlib.crc32(task.encode())), config.degradation, task
        )
        for task, entries in config.tasks.items()
    }
