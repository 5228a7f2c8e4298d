"""The task registry: built-in tasks are imported explicitly, third-party ones come from the
`unirestore.tasks` entry-point group. A broken plugin is reported and skipped, never breaks the others."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable

_TASKS: dict[str, type] = {}
_SOURCES: dict[str, str] = {}
_BROKEN: dict[str, str] = {}
# Other names of a task, e.g. "detection" for "det"; everything downstream uses the registered name.
_ALIASES: dict[str, str] = {}
_LOADED = False


class UnknownTaskError(KeyError):
    """A task name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0])


def register_task(cls: type | None = None, *, source: str | None = None) -> Callable | type:
    """Class decorator: register a task under `cls.name`. A duplicate name raises."""

    def wrap(task_cls: type) -> type:
        name = getattr(task_cls, "name", None)
        if not name or not isinstance(name, str):
            raise TypeError(f"{task_cls.__qualname__} must set a string class attribute `name`")
        if name in _TASKS and _TASKS[name] is not task_cls:
            raise ValueError(
                f"task '{name}' is registered twice ({_SOURCES[name]} and {task_cls.__module__}); rename one"
            )
        aliases = tuple(getattr(task_cls, "aliases", ()))
        for taken in (name, *aliases):
            owner = _ALIASES.get(taken, taken if taken in _TASKS else name)
            if owner != name:
                raise ValueError(f"task '{name}': '{taken}' already names task '{owner}'; rename one")
        _ALIASES.update(dict.fromkeys(aliases, name))
        _TASKS[name] = task_cls
        _SOURCES[name] = source or task_cls.__module__
        return task_cls

    return wrap(cls) if cls is not None else wrap


def load_tasks() -> None:
    """Import the built-in tasks and every installed plugin (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    importlib.import_module("unirestore.tasks")
    for entry_point in importlib.metadata.entry_points(group="unirestore.tasks"):
        try:
            loaded = entry_point.load()
            if isinstance(loaded, type):
                problem = _plugin_problem(loaded)
                if problem:
                    raise TypeError(problem)
                if _TASKS.get(loaded.name) is not loaded:
                    register_task(loaded, source=f"plugin {entry_point.value}")
                _SOURCES[loaded.name] = f"plugin {entry_point.value}"
            else:
                for name, cls in _TASKS.items():
                    if cls.__module__ == getattr(loaded, "__name__", None):
                        _SOURCES[name] = f"plugin {entry_point.value}"
        except Exception as error:  # noqa: BLE001 (a plugin may fail in any way; it must not take the others down)
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            _BROKEN[entry_point.name] = message
            print(  # one line (a warning would add its source line), on every command until it is fixed
                f"warning: task plugin '{entry_point.name}' ({entry_point.value}) is skipped: {message}",
                file=sys.stderr,
            )


def _plugin_problem(cls: type) -> str:
    """Why a plugin's task class cannot be a task, or ''."""
    from ..tasks.base import Task

    name = getattr(cls, "name", None)
    if not name:
        return f"{cls.__name__} has no `name`; give it one, e.g. name = \"edges\""
    if name in _TASKS and _TASKS[name] is not cls:
        return f"its name '{name}' is taken by {_SOURCES.get(name, 'another task')}; give it another name"
    if issubclass(cls, Task) and cls.losses is Task.losses:
        return f"{cls.__name__} defines no losses(restored, batch); a task must say what it trains for"
    return ""


def known_tasks() -> list[str]:
    load_tasks()
    return sorted(_TASKS)


def task_source(name: str) -> str:
    load_tasks()
    return _SOURCES[name]


def broken_plugins() -> dict[str, str]:
    load_tasks()
    return dict(_BROKEN)


def unimported_task_files() -> list[str]:
    """Modules in the `tasks/` folder that `tasks/__init__.py` does not import (`tasks/edges.py`): a file
    dropped there registers nothing until it is imported, and a lookup of its task would only say
    "unknown task"."""
    import pkgutil

    package = importlib.import_module("unirestore.tasks")
    return [
        f"tasks/{module.name}.py"
        for module in pkgutil.iter_modules(package.__path__)
        if not module.ispkg and module.name != "base" and f"{package.__name__}.{module.name}" not in sys.modules
    ]


def _known_listing() -> str:
    aliases: dict[str, list[str]] = {}
    for alias, name in sorted(_ALIASES.items()):
        aliases.setdefault(name, []).append(alias)
    listing = ", ".join(f"{name} ({', '.join(aliases[name])})" if name in aliases else name for name in sorted(_TASKS))
    unimported = unimported_task_files()
    if unimported:
        listing += f" ({', '.join(unimported)} not imported in tasks/__init__.py, so not registered; add it there)"
    return listing


def resolve_task_name(name: str) -> str:
    """The registered name of a task given by its name or an alias (`detection` → `det`)."""
    load_tasks()
    name = _ALIASES.get(name, name)
    if name not in _TASKS:
        raise UnknownTaskError(f"unknown task '{name}'; known tasks: {_known_listing()}")
    return name


def task_key(name: str) -> str:
    """`name` with an alias replaced by its task's registered name; anything else unchanged (for dict keys
    such as `--beta detection=2`, which their own checks report when unknown)."""
    load_tasks()
    return _ALIASES.get(name, name)


def lower_is_better(task: str, metric: str) -> bool:
    """True when `task` declares `metric` lower-better (`Task.lower_is_better`); False for a task not
    registered here (a plugin no longer installed, named in an old run's records)."""
    load_tasks()
    cls = _TASKS.get(_ALIASES.get(task, task))
    return cls is not None and metric in getattr(cls, "lower_is_better", ())


def builtin_dataset_types() -> set[str]:
    """The dataset types of built-in (generated) data: every registered task's `builtin_type` (builtin_scenes,
    builtin_photos, and a plugin's own generated type). An entry of one of them in a data config is built-in
    data, as a task the config leaves out would get: built-in downstream models, and a crop size needed."""
    load_tasks()
    return {cls.builtin_type for cls in _TASKS.values() if getattr(cls, "builtin_type", None)}


def get_task_class(name: str) -> type:
    return _TASKS[resolve_task_name(name)]


def parse_task_list(text: str | list[str]) -> list[str]:
    """`pir,seg,cls` → ['pir', 'seg', 'cls'], each checked against the registry and aliases replaced by
    registered names (`pir,segmentation` → ['pir', 'seg']), order kept, no repeats."""
    names = text if isinstance(text, list) else [t.strip() for t in text.split(",")]
    names = [n for n in names if n]
    if not names:
        known_tasks()
        raise UnknownTaskError(f"no task given; known tasks: {_known_listing()}")
    return list(dict.fromkeys(resolve_task_name(name) for name in names))
