"""Model checkpoints: only the trainable parts, in one safetensors file, written atomically.

Tensors are stored as `<component>.<parameter>` (cfrm, controller, sc_tuners, tfa, prompts) plus the
prior's stored empty-prompt embedding; the metadata holds the resolved model config, the task list and
the identity of the prior (name, a fingerprint of its configs, for the tiny prior a hash of its weights and,
for a prior read from a folder or by hub id (its snapshot in the Hugging Face cache), the size and hash of each
weight file). Loading onto another prior, or onto other weights of the same one, is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig, from_dict, to_dict
from .files import atomic_write
from .model import UniRestore
from .prior import Prior, PriorError, load_prior

FORMAT = "unirestore/1"
EMBEDDING_KEY = "prior.empty_prompt_embeds"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the fix."""


def state_tensors(model: UniRestore, components: Mapping[str, torch.nn.Module] | None = None) -> dict:
    tensors = {}
    for name, module in (components or model.components()).items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    tensors[EMBEDDING_KEY] = model.empty_prompt_embeds.detach().to("cpu").float().contiguous()
    return tensors


def save_checkpoint(model: UniRestore, path: str | os.PathLike, extra: Mapping[str, object] | None = None) -> Path:
    """Write the model's trainable parts and identity to `path` (a .safetensors file)."""
    return atomic_write(path, checkpoint_writer(model, extra))


def checkpoint_writer(model: UniRestore, extra: Mapping[str, object] | None = None) -> Callable[[str], None]:
    """What `save_checkpoint` writes, as a function of the file to write it to (for `atomic_write_together`)."""
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(to_dict(model.config)),
        "tasks": json.dumps(model.tasks),
        "prior": json.dumps(model.prior_identity),
        "components": json.dumps(sorted(model.components())),
        "extra": json.dumps(dict(extra or {}), default=str),
    }
    tensors = state_tensors(model)
    return lambda temporary: save_file(tensors, temporary, metadata=metadata)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file `path` names: the file itself, or in a folder its `last.safetensors` (a stage's
    folder during training) or else its newest checkpoint (a run folder: the last stage or task added)."""
    path = Path(path)
    if not path.is_dir():
        return path
    candidates = [candidate for candidate in path.glob("*.safetensors") if candidate.is_file()]
    if not candidates:
        raise CheckpointError(f"no .safetensors checkpoint in folder {path}; give the checkpoint file (train first)")
    last = path / "last.safetensors"
    return last if last in candidates else max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and decoded metadata of a checkpoint, with one-line errors for every way it can be unusable."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; give the path of a .safetensors file written by unirestore")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({message}); re-save or pick another") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a unirestore checkpoint (format {raw.get('format')!r}); give one written by unirestore")
    try:
        metadata = {
            "model_config": json.loads(raw["model_config"]),
            "tasks": json.loads(raw["tasks"]),
            "prior": json.loads(raw["prior"]),
            "components": json.loads(raw["components"]),
            "extra": json.loads(raw.get("extra", "{}")),
            "path": str(path),
        }
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} has damaged metadata ({error}); re-save it") from None
    return tensors, metadata


def load_components(model: UniRestore, tensors: Mapping[str, torch.Tensor], path: str, names=None) -> None:
    """Load the named components' tensors into `model`, strictly."""
    for name, module in model.components().items():
        if names is not None and name not in names:
            continue
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state and any(True for _ in module.parameters()):
            raise CheckpointError(f"checkpoint {path} holds no '{name}' weights; it was written by another model")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise CheckpointError(
                f"checkpoint {path}: '{name}' does not fit this model ({first}); "
                "it was trained with another model config or prior"
            ) from None


def extension_problem(metadata: Mapping) -> str | None:
    """Why a task cannot be added to the checkpoint with this metadata by training its prompt alone, or None.

    A prompt acts only through a trained TFA: a checkpoint saved after stage 1 (no prompt trained yet) or one
    that decodes without the TFA (the w/o-TFA ablation) has none.
    """
    path = metadata["path"]
    if not metadata["extra"].get("trained_prompts", metadata["tasks"]):
        return (
            f"{path} was saved after stage 1, before its TFA and prompts were trained; add tasks to the stage-2 "
            "checkpoint (or one that `task add` wrote)"
        )
    if not metadata["model_config"].get("use_tfa", True):
        return f"{path} decodes without the TFA, through which alone a task's prompt acts; add tasks to a model with one"
    return None


def _other_weight_file(recorded: Mapping[str, dict] | None, loaded: Mapping[str, dict] | None) -> str | None:
    """The first weight file of the same name whose size or bytes differ (with both), or None.

    Files of the same name alone are compared: a checkpoint trained on full-precision weights loads onto their
    fp16 variant (the same weights, rounded), and one written before weight files were recorded loads unchecked.
    Bytes are compared by the hash of the whole file, or by the hash of 16 slices of it where the checkpoint
    records that alone (one written before whole files were hashed).
    """
    for name in sorted(set(recorded or {}) & set(loaded or {})):
        before, now = recorded[name], loaded[name]
        digest = "sha256" if "sha256" in before else "sample"
        if before["size"] != now["size"]:
            return f"{name} is {now['size']} bytes, not {before['size']}"
        if before[digest] != now[digest]:
            return f"{name} holds other bytes"
    return None


def prior_problem(metadata: Mapping, identity: Mapping, option: str = "--prior") -> str | None:
    """Why the checkpoint with this metadata does not load onto the prior of `identity` (`Prior.identity()`, or
    `prior.prior_identity` before the prior is loaded), or None. `option` is how the command at hand is given
    another prior (`--prior`, `--set prior=FOLDER`)."""
    recorded = metadata["prior"]
    path = metadata["path"]
    if identity["fingerprint"] != recorded["fingerprint"]:
        fix = (  # the same name with another architecture: a checkpoint from an earlier version of that prior
            "train it again on this one (unirestore train)" if recorded["name"] == identity["name"]
            else "load it with the prior it was trained on"
        )
        return (
            f"checkpoint {path} was trained on prior '{recorded['name']}' (fingerprint {recorded['fingerprint']}), "
            f"not on '{identity['name']}' (fingerprint {identity['fingerprint']}); {fix}"
        )
    if recorded.get("weights") and identity.get("weights") and recorded["weights"] != identity["weights"]:
        return (
            f"checkpoint {path} was trained on other weights of prior '{identity['name']}' "
            f"(weights {recorded['weights']}) than the ones loaded now ({identity['weights']}): stage 0 trained it "
            "again since; set UNIRESTORE_HOME to the cache it was trained with, or train the checkpoint again"
        )
    changed = _other_weight_file(recorded.get("weight_files"), identity.get("weight_files"))
    if changed and recorded["name"] == identity["name"]:  # the weights under that name were replaced since
        if identity["name"] != "tiny" and not Path(identity["name"]).is_absolute():  # a hub id: another revision
            return (
                f"checkpoint {path} was trained on other weights than prior '{identity['name']}' has in the "
                f"Hugging Face cache now ({changed}: another revision of it); give {option} a folder with the "
                "weights it was trained on, or train it again on these"
            )
        return (
            f"checkpoint {path} was trained on other weights than prior '{identity['name']}' holds now "
            f"({changed}); put back the weights it was trained on, or train it again on these"
        )
    if changed:
        return (
            f"checkpoint {path} was trained on the weights of prior '{recorded['name']}', not on those of "
            f"'{identity['name']}' ({changed}); give the folder it was trained on, or a copy of it, with {option}"
        )
    return None


def load_checkpoint(
    path: str | os.PathLike,
    prior: Prior | str | None = None,
    device: str | torch.device = "cpu",
    config_overrides: Mapping[str, object] | None = None,
) -> UniRestore:
    """Rebuild a UniRestore model from a checkpoint, on the prior it names (or `prior`, if it is the same)."""
    tensors, metadata = read_checkpoint(path)
    identity = metadata["prior"]
    embeds = tensors.get(EMBEDDING_KEY)
    if prior is None:
        try:
            prior = load_prior(identity["name"], device=device, empty_prompt_embeds=embeds)
        except PriorError as error:  # trained elsewhere, or the prior moved since
            raise PriorError(
                f"checkpoint {metadata['path']} was trained on prior '{identity['name']}', which does not load "
                f"here ({error}); give --prior with where that prior is now"
            ) from None
    elif isinstance(prior, str):
        prior = load_prior(prior, device=device, empty_prompt_embeds=embeds)
    problem = prior_problem(metadata, prior.identity())
    if problem:
        raise CheckpointError(problem)
    config_dict = dict(metadata["model_config"])
    config_dict.update(config_overrides or {})
    try:
        config = from_dict(ModelConfig, config_dict, source=metadata["path"])
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {metadata['path']}: {error}") from None
    model = UniRestore(prior, config, tasks=[])
    for task in metadata["tasks"]:
        model.prompts.add(task)
    load_components(model, tensors, metadata["path"])
    if embeds is not None:
        model.empty_prompt_embeds.copy_(embeds.to(model.empty_prompt_embeds))
    return model.to(device)
