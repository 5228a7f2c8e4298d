"""Typed configuration: dataclasses are the schema, YAML files are instances.

Every key is checked against the schema when it is read: an unknown key or a value of the wrong type
fails at once with a one-line :class:`ConfigError` that names the key, the source and the valid keys.
`--set a.b=c` overrides go through the same check.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, stated in one line with the fix."""


@dataclass
class ModelConfig:
    """The UniRestore modules around the frozen prior (SPEC §2–5)."""

    # NAFBlocks before the adaptive block at each CFRM level (the release: 1, 1, 9).
    cfrm_blocks: list[int] = field(default_factory=lambda: [1, 1, 9])
    # Groups l of the adaptive block (the paper: 16).
    cfrm_groups: int = 16
    # Controller width; 0 derives it from the UNet (0.8 × its first width: 256 at SD scale).
    controller_channels: int = 0
    # Attention heads in the Controller's first three levels.
    controller_heads: int = 4
    # Prompt length T of each task prompt (the paper: 1).
    prompt_length: int = 1
    # Ablations (Table 4/5): vanilla encoder features, plain decoder, one prompt shared by all tasks.
    use_cfrm: bool = True
    use_tfa: bool = True
    shared_prompt: bool = False
    # DDIM steps at inference, trailing spacing (1 to 4).
    denoise_steps: int = 1
    # Short side images are resized up to; 0 derives it from the prior (UNet sample size × VAE factor).
    native_size: int = 0
    # Use a posterior sample instead of its mode for the degraded latent.
    sample_posterior: bool = False
    # Recompute activations of the trainable modules in the backward pass (saves memory at 512²).
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if not 1 <= self.denoise_steps <= 4:
            raise ConfigError(f"model.denoise_steps={self.denoise_steps}: must be 1 to 4")
        if self.prompt_length < 1:
            raise ConfigError(f"model.prompt_length={self.prompt_length}: must be at least 1")
        if any(n < 0 for n in self.cfrm_blocks):
            raise ConfigError(f"model.cfrm_blocks={self.cfrm_blocks}: block counts must be >= 0")


# --------------------------------------------------------------------------------------------------
# Generic strict conversion between dicts and dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: unsupported value {value!r} in {source}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} in {source}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} in {source}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} in {source}")
        key_type, value_type = args if args else (Any, Any)
        return {
            _coerce(k, key_type, key, source): _coerce(v, value_type, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r} in {source}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r} in {source}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r} in {source}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r} in {source}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type, data: dict, source: str = "config", prefix: str = "") -> Any:
    """Build the dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping in {source}, got {type(data).__name__}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_:
            raise ConfigError(
                f"unknown key '{full}' in {source}; valid keys here: {', '.join(sorted(types_))}"
            )
        kwargs[key] = _coerce(value, types_[key], full, source)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def to_dict(instance: Any) -> dict:
    """A plain, JSON-safe dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(instance)))


def apply_overrides(instance: Any, overrides: list[str], source: str = "--set") -> Any:
    """Return a copy of `instance` with `key.path=value` overrides applied and checked.

    Values are read as YAML scalars (`true`, `3`, `1e-4`, `[1, 2]`); a key into a dict field may name a
    new entry (`train.beta.det=0.5`).
    """
    data = to_dict(instance)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} '{item}': expected key=value, e.g. model.denoise_steps=2")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"{source} '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        cls = type(instance)
        node = data
        for depth, key in enumerate(keys):
            where = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if cls is not None and dataclasses.is_dataclass(cls):
                types_ = _field_types(cls)
                if key not in types_:
                    raise ConfigError(
                        f"unknown key '{where}' in {source}; valid keys here: {', '.join(sorted(types_))}"
                    )
                tp = types_[key]
                cls = tp if dataclasses.is_dataclass(tp) else None
            elif not isinstance(node, dict):
                raise ConfigError(f"{source} '{item}': '{keys[depth - 1]}' is not a mapping")
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{source} '{item}': '{where}' is not a mapping")
    return from_dict(type(instance), data, source=source)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; give an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
