"""Typed configuration: dataclasses are the schema, YAML files are instances.

Every key is checked against the schema when it is read: an unknown key or a value of the wrong type
fails at once with a one-line :class:`ConfigError` that names the key, the source, the closest valid key (a
typo's "did you mean") and the valid keys.
`--set a.b=c` overrides go through the same check.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, stated in one line with the fix."""


# Per tapped encoder level, shallowest first, at Stable Diffusion's three levels (the release).
RELEASE_CFRM_BLOCKS = (1, 1, 9)
RELEASE_CFRM_LEVEL_WEIGHTS = (0.1, 0.1, 0.01)


def per_level(value: list | None, release: tuple, levels: int, key: str) -> list:
    """`value` checked against a VAE with `levels` tapped levels, or when unset the release's values: as they
    are for three levels; otherwise the deepest level's value at the deepest level and the shallowest's above."""
    if value is None:
        return list(release) if levels == len(release) else [release[0]] * (levels - 1) + [release[-1]]
    if len(value) != levels:
        raise ConfigError(
            f"{key}={list(value)} has {len(value)} entries but the prior's VAE encoder has {levels} tapped "
            f"levels; give {levels} values, or leave {key} unset for the default"
        )
    return list(value)


@dataclass
class ModelConfig:
    """The UniRestore modules around the frozen prior (SPEC §2–5)."""

    # NAFBlocks before the adaptive block at each tapped encoder level, shallowest first. Unset: the release's
    # 1, 1, 9 for Stable Diffusion's three levels; for another VAE, 9 at the deepest and 1 at the others.
    cfrm_blocks: list[int] | None = None
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
        if any(n < 0 for n in self.cfrm_blocks or ()):
            raise ConfigError(f"model.cfrm_blocks={self.cfrm_blocks}: block counts must be >= 0")

    def cfrm_blocks_for(self, levels: int) -> list[int]:
        """`cfrm_blocks` for a VAE encoder with `levels` tapped levels (the default when unset)."""
        return per_level(self.cfrm_blocks, RELEASE_CFRM_BLOCKS, levels, "model.cfrm_blocks")


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


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """` did you mean 'PREFIX.CHOICE'?` for the choice closest to a mistyped `name`, or "" where none is
    close: an unknown key's message puts it before the list of valid keys, which can be long."""
    close = difflib.get_close_matches(str(name), [str(choice) for choice in choices], n=1)
    return f" did you mean '{prefix}{close[0]}'?" if close else ""


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
            closest = did_you_mean(key, types_, f"{prefix}." if prefix else "")
            valid = ", ".join(sorted(types_))
            raise ConfigError(f"unknown key '{full}' in {source};{closest} valid keys here: {valid}")
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
                    closest = did_you_mean(key, types_, "".join(f"{k}." for k in keys[:depth]))
                    valid = ", ".join(sorted(types_))
                    raise ConfigError(f"unknown key '{where}' in {source};{closest} valid keys here: {valid}")
                tp = types_[key]
                cls = tp if dataclasses.is_dataclass(tp) else None
                if last and cls is not None and not isinstance(value, dict):
                    raise ConfigError(
                        f"{source} '{item}': '{where}' is a section, not a value; set its keys, e.g. "
                        f"{where}.{min(_field_types(cls))}=..."
                    )
            elif not isinstance(node, dict):
                raise ConfigError(f"{source} '{item}': '{keys[depth - 1]}' is not a mapping")
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{source} '{item}': '{where}' is not a mapping")
    return from_dict(type(instance), data, source=source)


def yaml_syntax_error(path, error: yaml.YAMLError) -> str:
    """One line for a file YAML cannot parse: the file and the line (PyYAML's own message spans several)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{path}: not valid YAML{where}; fix the syntax"


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; give an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(yaml_syntax_error(path, error)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# --------------------------------------------------------------------------------------------------
# Training


PRECISIONS = ("fp32", "bf16", "fp16")
DECODER_INPUTS = ("clean_estimate", "inference")


# The release's peak learning rate at a batch of 64, and the tiny preset's per stage: its stages run a few
# hundred steps on a CPU, where 1e-4 would barely move the Controller (measured in BENCHMARKS.md). Stage 1 at
# 8e-3 (2e-3 at the demo's batch of 4) against 4e-3: on 128 test images PIR 17.68 against 17.47 dB, mIoU
# 0.588 / 0.559 against 0.581 / 0.540, accuracy 0.836 / 0.891 against 0.805 / 0.906; 1.6e-2 gained 0.04 dB
# but lost 0.03 mIoU and 0.04 accuracy. Stage 2 (TFA and prompts) at 3.2e-2 against 8e-3, from the same
# stage-1 checkpoint: PIR 18.12 against 17.78 dB, mIoU 0.618 / 0.578 against 0.615 / 0.575, accuracy
# 0.859 / 0.953 against 0.820 / 0.945; 6.4e-2 gave the same PSNR. Stage 3 (one new prompt) at 3.2e-2: the
# paper tables' det mAP 0.289 against 0.239 at 8e-3 (LQ 0.257).
RELEASE_LR = 1e-4
TINY_LR = {1: 8e-3, 2: 3.2e-2, 3: 3.2e-2}
# β of the tiny preset's downstream tasks in stage 2 (each task's own default, 1, on a real prior). β scales a
# task's CE and its PIR-prompt L1 anchor together, so against the PIR samples' 10 × L1 it shifts the TFA towards
# both. From the same stage-1 checkpoint, 128 test images (PIR PSNR; mIoU DeepLab / FCN; accuracy ResNet / ViT):
# β = 1: 17.80, 0.574 / 0.535, 0.789 / 0.891; β = 3: 17.81, 0.580 / 0.546, 0.836 / 0.906; β = 5: 17.86,
# 0.583 / 0.551, 0.844 / 0.922; β = 10: 17.68, 0.579 / 0.543, 0.844 / 0.914; β = 20: 17.51 dB.
TINY_BETA = {"seg": 5.0, "cls": 5.0}
# Settings whose default follows the prior as the learning rate's does: unset (None), they take the tiny preset's
# value on `prior: tiny` (stages of a few hundred steps on a CPU) and the release's on any other prior (SPEC §6;
# experiments/configs/release.yaml states the same values, and a test keeps the two equal). At the release's lr
# the preset's few hundred steps would barely move the modules. `TrainConfig.for_prior` fills them in.
PRESET_TRAIN = {
    # 450 for stages 1 and 2 keep the README main command under 15 minutes on a slow 2-core machine (12–13 min);
    # at lr 4e-3, 500 each gained a little on every task (BENCHMARKS.md, "Known limits").
    "stage1_steps": 450,
    "stage2_steps": 450,
    "batch_size": 4,
    "checkpoint_every": 100,
    "val_every": 0,
    "val_samples": 8,
    "eval_samples": 32,
}
RELEASE_TRAIN = {
    "stage1_steps": 200_000,
    "stage2_steps": 250_000,
    "batch_size": 6,  # per process: 8 GPUs × 6 is the release's effective batch of 48
    "checkpoint_every": 2000,
    "val_every": 5000,
    "val_samples": 64,
    "eval_samples": 500,
}


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of stages 1–3 (SPEC §6). A setting left unset (None) whose default follows
    the prior (the learning rate, β, and those of `PRESET_TRAIN`) takes the tiny preset's value on the tiny
    prior and the release's on any other: `for_prior` fills them in, and a run saves them filled."""

    # Optimiser steps of stage 1 (CFRM, Controller, SC-Tuners). Unset: `PRESET_TRAIN`'s on the tiny prior,
    # `RELEASE_TRAIN`'s on another (as for each setting below that is None by default).
    stage1_steps: int | None = None
    # Optimiser steps of stage 2 (TFA and every task prompt).
    stage2_steps: int | None = None
    # Optimiser steps of stage 3 (one new task's prompt, `unirestore task add`), on every prior (the release
    # names no stage-3 length).
    stage3_steps: int = 200
    # Samples per micro-batch and process.
    batch_size: int | None = None
    # Micro-batches accumulated per optimiser step; effective batch = batch_size × grad_accum × processes.
    grad_accum: int = 1
    # Peak learning rate of every stage at an effective batch of `lr_reference_batch`, scaled by
    # √(effective / reference). Unset: 1e-4 (the release) for a real prior; for the tiny preset (a few hundred
    # steps, not 200k) 8e-3 in stage 1 and 3.2e-2 in stages 2 and 3 (`TINY_LR`).
    lr: float | None = None
    # The effective batch at which `lr` holds unscaled (the release: 64).
    lr_reference_batch: int = 64
    # AdamW weight decay; biases and 1-D parameters (norms, layer scales) never decay.
    weight_decay: float = 0.01
    # Share of each stage's steps spent warming the learning rate up (one-cycle `pct_start`).
    warmup: float = 0.1
    # One-cycle: the schedule starts at lr / div_factor ...
    div_factor: float = 10.0
    # ... and ends at lr / (div_factor × final_div_factor) (torch's default).
    final_div_factor: float = 1e4
    # Training crop side in pixels; 0 uses the data config's `size` if it gives one, else the prior's native size
    # (64 for the tiny prior, 512 for sd-turbo). Set, it wins over the data config's.
    crop_size: int = 0
    # β_k of each task in the stage-2 total Σ β_k L_k (Eq. 5/6); a task not named uses its own default
    # (`TINY_BETA` on the tiny prior).
    beta: dict[str, float] = field(default_factory=dict)
    # Weights of each task's loss terms, e.g. {pir: {l1: 10, mse: 0}}; unnamed terms keep the task default.
    loss_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    # Relative share of steps each task gets, on top of its dataset size (1 when not named).
    task_weights: dict[str, float] = field(default_factory=dict)
    # Weights of the two stage-1 terms, L_CFRM and L_Control.
    stage1_weights: dict[str, float] = field(default_factory=lambda: {"cfrm": 1.0, "control": 1.0})
    # λ_i of L_CFRM per tapped encoder level, shallowest first. Unset: the release's 0.1, 0.1, 0.01 for Stable
    # Diffusion's three levels; for another VAE, 0.01 at the deepest and 0.1 at the others.
    cfrm_level_weights: list[float] | None = None
    # What the stage-2 decoder reads: `inference` (one DDIM step from the noised degraded latent, as at test
    # time) or `clean_estimate` (ẑ0 of the noised clean latent, the release). Inference measured better on the
    # tiny preset (PIR PSNR, BENCHMARKS.md), as SPEC §6 expects.
    decoder_input: str = "inference"
    # Autocast precision of the forward pass: fp32 (none), bf16 or fp16 (fp16 adds a gradient scaler on CUDA).
    precision: str = "fp32"
    # Stages 2 and 3: run what the decoder reads (the frozen encoder, CFRM, Controller and UNet, no gradients)
    # through torch.compile, its random draws as the eager pass makes them. Minutes of compiling at the first
    # step; the decoder and its gradients stay eager.
    compile: bool = False
    # Write last.safetensors + last.state.pt every this many steps (and at the end of each stage).
    checkpoint_every: int | None = None
    # Run the validation metrics every this many steps; 0: only at the end of each stage.
    val_every: int | None = None
    # Validation images per task (a fixed set: the first ones of the val split).
    val_samples: int | None = None
    # Images per task in the final evaluation table (a fixed set: the first ones of the test split).
    eval_samples: int | None = None
    # Log loss terms and learning rate to MLflow every this many steps.
    log_every: int = 10
    # DataLoader worker processes (0: load in the training process). One worker makes the degradations
    # while the model trains; on the CPU the training process then runs one torch thread fewer.
    num_workers: int = 1
    # Seed of everything random: model init, the data stream, noise and timesteps.
    seed: int = 0
    # `auto` (CUDA when there is one), `cpu`, `cuda` or `cuda:N`. Under torchrun each process takes its GPU.
    device: str = "auto"
    # On a GPU, cuDNN times its convolution algorithms for each new shape (the crop size: once) and keeps the
    # fastest; false keeps its default choice, which repeats run to run.
    cudnn_benchmark: bool = True

    def cfrm_weights_for(self, levels: int) -> list[float]:
        """`cfrm_level_weights` for a VAE encoder with `levels` tapped levels (the default when unset)."""
        return per_level(self.cfrm_level_weights, RELEASE_CFRM_LEVEL_WEIGHTS, levels, "train.cfrm_level_weights")

    def beta_for(self, task: str, default: float, prior: str = "") -> float:
        """β of `task`: `beta[task]` when set, else the tiny preset's on the tiny prior, else `default`."""
        if task in self.beta:
            return self.beta[task]
        if prior == "tiny" and task in TINY_BETA:
            return TINY_BETA[task]
        return default

    def peak_lr(self, prior: str = "", stage: int = 1) -> float:
        """`lr`, or when unset the default for `prior` and `stage` (the tiny preset's or the release's)."""
        if self.lr is not None:
            return self.lr
        return TINY_LR[stage] if prior == "tiny" else RELEASE_LR

    def for_prior(self, prior: str) -> TrainConfig:
        """A copy with each unset setting of `PRESET_TRAIN` given its default for `prior`: the tiny preset's on
        the tiny prior, the release's (`RELEASE_TRAIN`) on any other. Set ones stay as they are."""
        defaults = PRESET_TRAIN if prior == "tiny" else RELEASE_TRAIN
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self) -> None:
        for name in ("stage1_steps", "stage2_steps", "stage3_steps", "val_every", "num_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 0")
        for name in (
            "batch_size",
            "grad_accum",
            "lr_reference_batch",
            "checkpoint_every",
            "log_every",
            "val_samples",
            "eval_samples",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr}: must be positive")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"train.warmup={self.warmup}: must be in [0, 1)")
        if self.div_factor <= 0 or self.final_div_factor <= 0:
            raise ConfigError("train.div_factor and train.final_div_factor must be positive")
        if self.crop_size and self.crop_size < 32:
            raise ConfigError(f"train.crop_size={self.crop_size}: must be 0 (native size) or at least 32")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.decoder_input not in DECODER_INPUTS:
            raise ConfigError(
                f"train.decoder_input={self.decoder_input!r}: use one of {', '.join(DECODER_INPUTS)}"
            )
        unknown = set(self.stage1_weights) - {"cfrm", "control"}
        if unknown:
            raise ConfigError(
                f"train.stage1_weights: unknown term(s) {', '.join(sorted(unknown))}; use cfrm, control"
            )
        negative = {task: beta for task, beta in self.beta.items() if beta < 0}
        if negative:
            raise ConfigError(
                f"train.beta={negative}: a task's β must be >= 0 (a negative β would maximise its loss)"
            )
        for task, weights in self.loss_weights.items():
            negative = {term: weight for term, weight in weights.items() if weight < 0}
            if negative:
                raise ConfigError(f"train.loss_weights.{task}={negative}: loss term weights must be >= 0")
        if any(w <= 0 for w in self.task_weights.values()):
            raise ConfigError(f"train.task_weights={self.task_weights}: weights must be positive")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device={self.device!r}: use auto, cpu, cuda or cuda:N")


@dataclass
class Stage0Config:
    """Stage 0, built-in prior only: pretrain the tiny prior's VAE, then its UNet, on built-in images."""

    # Optimiser steps of the VAE (L1 reconstruction + kl_weight × KL). Its reconstruction of the test photos
    # gains ~0.5 dB per 500 steps up to 3000 (whole images: 22.9 dB at 1500, 23.4 at 2000, 24.4 at 3000):
    # the ceiling of every restoration through its latent.
    vae_steps: int = 2000
    # Optimiser steps of the UNet (the denoising loss of the prior's prediction type, on the VAE's latents).
    # 500 steps give a better one-step latent (decoded: 16.99 against 16.36 dB on 128 test images) but not a
    # better table: the README main command with 500 took 2 min longer for PIR 18.04 against 18.12 dB and
    # accuracy / mIoU within 0.02 (BENCHMARKS.md, "What else was tried against the PIR plateau").
    unet_steps: int = 150
    # Images per step.
    batch_size: int = 8
    # Peak AdamW learning rate (5 % warm-up, then a cosine decay to zero).
    lr: float = 2e-3
    # 0: the VAE's reconstruction loss is L1 in RGB; > 0: L1 on luma + this × L1 on chroma (Cb, Cr).
    chroma_weight: float = 0.0
    # The VAE trains on random square crops of this side (0: whole images). The VAE is convolutional: 32²
    # crops of the 64² images train it nearly as well per step (its reconstruction of 128 test photos after
    # 2000 steps: 22.95 dB against 23.14; the main command's table within a few hundredths) at three times
    # the steps per second (BENCHMARKS.md). A multiple of the VAE factor.
    vae_crop: int = 32
    # Weight of the KL term of the VAE loss (summed over the latent, against a per-pixel mean L1): 4e-6 on
    # 32² crops keeps the balance that 1e-6 had on whole 64² images, whose latent holds 4× the elements.
    kl_weight: float = 4e-6
    # Retrain even when the prior folder carries the "trained" marker.
    force: bool = False
    # Steps between the periodic checkpoints of a run (`<output>/stage0/last.*`, from which `--resume`
    # continues stage 0; Ctrl-C and SIGTERM save the step they stop at too). One takes 0.1-0.3 s (21 MB in the
    # UNet's steps, 7 MB in the VAE's), 500 VAE steps ~25 s.
    checkpoint_every: int = 500

    def validate(self) -> None:
        if self.vae_steps < 0 or self.unet_steps < 0:
            raise ConfigError("stage0.vae_steps and stage0.unet_steps must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"stage0.batch_size={self.batch_size}: must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"stage0.lr={self.lr}: must be positive")
        if self.chroma_weight < 0:
            raise ConfigError(f"stage0.chroma_weight={self.chroma_weight}: must be >= 0")
        if self.checkpoint_every < 1:
            raise ConfigError(f"stage0.checkpoint_every={self.checkpoint_every}: must be at least 1")
        if self.vae_crop < 0:
            raise ConfigError(f"stage0.vae_crop={self.vae_crop}: must be 0 (whole images) or a crop side in pixels")


def _default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


@dataclass
class RunConfig:
    """One `unirestore train` run: what to train on, where to write, how to track. YAML files are instances."""

    # The frozen prior: `tiny` (built in, trained by stage 0), a diffusers folder, or a hub id.
    prior: str = "tiny"
    # `builtin` (generated scenes and scikit-image photos) or a data-config YAML file.
    data: str = "builtin"
    # Tasks trained in stage 2, each with its own prompt.
    tasks: list[str] = field(default_factory=lambda: ["pir", "seg", "cls"])
    # Run folder: stage checkpoints, training state, resolved config, image grids, MLflow artifacts.
    output: str = "runs/unirestore"
    # MLflow tracking store; the default is an absolute sqlite file in the working directory.
    tracking_uri: str = field(default_factory=_default_tracking_uri)
    # MLflow experiment name.
    experiment: str = "unirestore"
    # MLflow run name; empty: derived from the output folder.
    run_name: str = ""
    # Local checkpoints of real downstream models by name (e.g. resnet50: /ckpt/r50.pth); built-in data
    # trains small ones instead.
    downstream_checkpoints: dict[str, str] = field(default_factory=dict)
    # The side a real detector (det) sees the images at; None: the data's crop size (the prior's native size
    # for full images). 800 is torchvision's and detectron2's own test size.
    detector_size: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage0: Stage0Config = field(default_factory=Stage0Config)

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks: give at least one task, e.g. tasks: [pir]")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks={self.tasks}: a task is named twice")
        if not self.output:
            raise ConfigError("output: give a run folder")
        if self.detector_size is not None and self.detector_size < 32:
            raise ConfigError(f"detector_size={self.detector_size}: give a side of at least 32 pixels, or null")

    def with_prior_defaults(self) -> RunConfig:
        """A copy whose unset training settings that follow the prior hold their values for `prior`
        (`TrainConfig.for_prior`): what a run trains with, and saves."""
        return dataclasses.replace(self, train=self.train.for_prior(self.prior))


def _lists_datasets(tasks: Any) -> bool:
    """True for a data config's `tasks:` (task -> datasets); a run config's `tasks` is a list of names."""
    return isinstance(tasks, dict) and any(isinstance(entries, list | dict) for entries in tasks.values())


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A `RunConfig` from the defaults, a YAML instance (optional) and `key=value` overrides, all checked."""
    config = RunConfig()
    if path:
        raw = load_yaml(path)
        if isinstance(raw, dict) and ({"size", "degradation"} & set(raw) or _lists_datasets(raw.get("tasks"))):
            # a data config given where a run config goes: the commonest mix-up between the two kinds of file
            raise ConfigError(
                f"{path} is a data config (datasets per task), not a run config; give it as --data {path} "
                f"(or `data: {path}` in a run config such as experiments/configs/release.yaml)"
            )
        config = from_dict(RunConfig, raw, source=str(path))
    return apply_overrides(config, list(overrides or [])) if overrides else config


def dump_yaml(instance: Any) -> str:
    """The resolved config as YAML (keys in schema order), the form saved beside every checkpoint."""
    return yaml.safe_dump(to_dict(instance), sort_keys=False)
