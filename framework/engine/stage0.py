"""Stage 0, built-in prior only: pretrain the tiny prior so that it is a (small) diffusion prior at all.

1. The VAE: L1 reconstruction + `kl_weight` × KL on clean built-in images (BuiltinPhotos + BuiltinScenes),
   on random `vae_crop`² windows of them (the VAE is convolutional; small windows train it faster per second).
   Its `scaling_factor` is then set to 1 / std of the latents, as Stable Diffusion's was.
2. The UNet: the denoising loss of the prior's prediction type (ε, or v for the tiny preset) on those
   latents, noised at uniform timesteps of the prior's schedule, conditioned on the stored empty-prompt
   embedding (the only condition UniRestore uses).

Both draw from a pool of fresh images (one per sample seen, up to `_POOL_LIMIT`): a small fixed pool is
memorised rather than learnt. The learning rate warms up over 5 % of the steps, then decays along a cosine.

The result is written with `save_pretrained` into a staging folder next to the tiny prior and swapped in
with renames, with a marker file (`stage0.json`); `load_prior("tiny")` then loads the trained prior, and
a later run skips stage 0 (unless `stage0.force`). Until then the cached prior stays the untrained one.

In a run, stage 0's progress is saved in the run folder (`<output>/stage0/`), never in the prior's, every
`stage0.checkpoint_every` steps on its one step axis (the VAE's steps, then the UNet's) and at the step where
Ctrl-C or SIGTERM stops it, as stages 1 to 3 save theirs (`StopRequest`, `TrainingInterrupted`):

- `last.safetensors`: the VAE's and the UNet's weights (`vae.<parameter>`, `unet.<parameter>`);
- `last.state.pt`: the step, the optimiser and schedule of the part in training, the RNG states (the global
  ones and the batches' generator), the latents' scaling factor once the VAE is done, and the settings,
  written with `torch.save` and read with `torch.load(weights_only=True)`.

Both are written together (`atomic_write_together`). A resumed stage 0 takes the steps after the saved one
as the uninterrupted run took them; the pair is deleted once the trained prior is in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError
from ..config import ConfigError, Stage0Config
from ..files import atomic_write_together
from ..prior import ensure_tiny_prior, load_prior
from .state import MODEL_FILE, STATE_FILE, capture_rng, restore_rng
from .trainer import StopRequest, TrainingInterrupted, subnormals_flushed

MARKER = "stage0.json"
PROGRESS_FORMAT = "unirestore-stage0/1"
_POOL_LIMIT = 4096
_COPIED = ("scheduler", "text_encoder", "tokenizer", "model_index.json")


@dataclass
class Stage0Result:
    folder: Path
    trained: bool  # False: skipped, the marker was there
    metrics: dict


def is_trained(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _clean_images(size: int, count: int, seed: int) -> torch.Tensor:
    """`count` clean built-in images, half photo crops, half scenes: (count, 3, size, size) in [0, 1]."""
    from ..data.builtin import BuiltinPhotos, BuiltinScenes

    photos = BuiltinPhotos("train", size=size, length=count, seed=seed, leaves=0.0)
    scenes = BuiltinScenes("train", size=size, length=count, seed=seed)
    images = [photos[i]["hq"] for i in range(count - count // 2)] + [
        scenes[i]["hq"] for i in range(count // 2)
    ]
    return torch.stack(images)


# RGB → (Y, Cb, Cr), ITU-R BT.601.
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def _reconstruction_loss(reconstruction: torch.Tensor, clean: torch.Tensor, chroma_weight: float) -> torch.Tensor:
    """L1 in RGB, or with `chroma_weight` > 0, L1 on luma + chroma_weight × L1 on the two chroma channels.

    A small VAE learns luminance long before colour (colour carries a fraction of the images' variance);
    weighting chroma up lets colour arrive within stage 0's budget.
    """
    if chroma_weight <= 0:
        return F.l1_loss(reconstruction, clean)
    matrix = _YCBCR.to(reconstruction)
    error = torch.einsum("ij,bjhw->bihw", matrix, reconstruction - clean).abs().mean(dim=(0, 2, 3))
    return error[0] + chroma_weight * error[1:].sum()


def _vae_crop(crop: int, size: int, factor: int) -> int:
    """The VAE's training crop side: `crop` (0: the whole `size`), checked against the VAE's factor."""
    if crop == 0 or crop >= size:
        return size
    if crop % factor or crop < 2 * factor:
        raise ConfigError(
            f"stage0.vae_crop={crop}: must be a multiple of the VAE factor {factor} and at least {2 * factor}"
        )
    return crop


def _batches(images: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless random batches with random horizontal flips."""
    while True:
        index = torch.randint(len(images), (batch_size,), generator=generator)
        batch = images[index]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        yield torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)


def _optimizer(module: torch.nn.Module, config: Stage0Config, steps: int):
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        progress = min(1.0, max(0, step - warmup) / max(1, steps - warmup))
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, schedule


class _NoStop:
    """Stands for a `StopRequest` where nothing would be saved (no folder): a signal acts as it did before."""

    signal = None
    taken = False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass


@dataclass
class _Progress:
    """Where stage 0 stands: `step` on its one step axis, and what the part in training needs to go on."""

    step: int = 0
    optimizer: dict | None = None
    schedule: dict | None = None
    rng: dict | None = None
    generator: torch.Tensor | None = None
    scaling: float | None = None  # set once the VAE is done
    finished: dict | None = None  # the metrics of the parts done (the VAE's, once it is)
    last: dict | None = None  # the last loss terms of the part in training


def _settings(config: Stage0Config, seed: int) -> dict:
    """What decides the trained prior: a checkpoint resumes only under the same."""
    operational = ("force", "checkpoint_every")
    settings = {f"stage0.{key}": value for key, value in asdict(config).items() if key not in operational}
    return {**settings, "train.seed": seed}


def _save_progress(folder: Path, vae, unet, progress: _Progress, settings: dict) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"{name}.{key}": value.detach().to("cpu").contiguous()
        for name, module in (("vae", vae), ("unet", unet))
        for key, value in module.state_dict().items()
    }
    metadata = {"format": PROGRESS_FORMAT, "step": str(progress.step)}
    payload = {"format": PROGRESS_FORMAT, "settings": settings, **progress.__dict__}
    atomic_write_together({
        folder / MODEL_FILE: lambda temporary: save_file(tensors, temporary, metadata=metadata),
        folder / STATE_FILE: lambda temporary: torch.save(payload, temporary),
    })  # fmt: skip


def _delete_progress(folder: Path | None) -> None:
    if folder is not None:
        for name in (STATE_FILE, MODEL_FILE):  # the state first: without it, the folder holds nothing to resume
            (folder / name).unlink(missing_ok=True)


def _read_progress(folder: Path, vae, unet, settings: dict) -> _Progress:
    """The progress saved in `folder`, its weights loaded into `vae` and `unet`; one-line errors for a corrupt or
    mismatched pair, or one saved under other settings."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state, weights = folder / STATE_FILE, folder / MODEL_FILE
    anew = f"delete {state} and {weights} to start stage 0 anew"
    try:
        payload = torch.load(state, map_location="cpu", weights_only=True)
        tensors = load_file(weights)
        with safe_open(weights, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 (unpickling and safetensors fail in many ways; each means an unusable file)
        first = str(error).splitlines()[0].split(". ")[0][:160] if str(error) else type(error).__name__
        raise CheckpointError(f"stage 0's checkpoint in {folder} cannot be read ({first}); {anew}") from None
    if not isinstance(payload, dict) or payload.pop("format", None) != PROGRESS_FORMAT:
        raise CheckpointError(f"{state} is not a stage-0 training state; {anew}")
    if metadata.get("format") != PROGRESS_FORMAT or metadata.get("step") != str(payload.get("step")):
        raise CheckpointError(
            f"{folder}: {MODEL_FILE} is at step {metadata.get('step')} but {STATE_FILE} at step {payload.get('step')} "
            f"(the run was killed while saving); {anew}"
        )
    saved = payload.pop("settings", {})
    changed = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
    if changed:
        shown = ", ".join(f"{key}: {saved.get(key)} → {settings.get(key)}" for key in changed)
        raise CheckpointError(
            f"stage 0's checkpoint in {folder} was saved with other settings ({shown}); resume with those, or {anew}"
        )
    try:
        for name, module in (("vae", vae), ("unet", unet)):
            module.load_state_dict({key[len(name) + 1 :]: value for key, value in tensors.items()
                                    if key.startswith(f"{name}.")})  # fmt: skip
        return _Progress(**payload)
    except (RuntimeError, TypeError) as error:
        first = str(error).splitlines()[0][:160]
        raise CheckpointError(f"stage 0's checkpoint in {folder} does not fit this tiny prior ({first}); {anew}") from None


def _loop(
    name: str,
    steps: int,
    step_fn: Callable[[], dict[str, torch.Tensor]],
    module,
    config: Stage0Config,
    log: Callable[[dict, int], None],
    progress: bool,
    offset: int,
    total: int,
    resumed: _Progress,
    stop: StopRequest | _NoStop,
    save: Callable[[_Progress], None] | None,
    finished: dict,
) -> dict[str, float]:
    """Train `module` for its steps after `resumed.step - offset` (0: all of them), logged at `offset + step`;
    `save` (None: nothing is saved) gets the progress every `config.checkpoint_every` steps, and at the step
    where `stop` noted Ctrl-C or SIGTERM, after which `TrainingInterrupted` is raised. `finished`: the
    metrics of the parts done, saved with the progress."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    optimizer, schedule = _optimizer(module, config, steps)
    first = max(resumed.step - offset, 0)
    last: dict[str, float] = {}
    if first > 0:  # resumed within this part
        optimizer.load_state_dict(resumed.optimizer)
        schedule.load_state_dict(resumed.schedule)
        last = dict(resumed.last or {})
    module.train()
    module.requires_grad_(True)
    sums: dict[str, float] = {}  # since the last log: what is logged is the mean, as the other stages log it
    count, window = 0, time.perf_counter()
    columns = (TextColumn(f"[bold]stage 0 {name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} steps/s"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"))  # fmt: skip
    started = time.perf_counter()
    from ..console import make_console

    def flush(step: int) -> None:
        nonlocal sums, count, window
        # the names stages 1 to 3 log too (`<stage>/loss_total`, `/lr`, `/steps_per_second`), so that
        # stage 0's curves and MLflow columns read as theirs; one step axis for the VAE, then the UNet
        seconds = time.perf_counter() - window
        log({**{key: value / count for key, value in sums.items()}, "stage0/lr": schedule.get_last_lr()[0],
             "stage0/steps_per_second": count / max(seconds, 1e-9)}, offset + step)  # fmt: skip
        sums, count, window = {}, 0, time.perf_counter()

    def progress_at(step: int) -> _Progress:
        return _Progress(offset + step, optimizer.state_dict(), schedule.state_dict(), capture_rng(),
                         finished=finished, last=last)  # fmt: skip

    with subnormals_flushed(), RichProgress(*columns, disable=not progress, console=make_console()) as bar:
        task = bar.add_task(name, total=steps, completed=first, rate="-", loss="")
        for step in range(first + 1, steps + 1):
            terms = step_fn()
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise RuntimeError(f"stage 0 ({name}): loss is not finite at step {step}; lower stage0.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            last = {key: float(value.detach()) for key, value in terms.items()}
            for key, value in {**last, "stage0/loss_total": float(loss.detach())}.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            rate = (step - first) / (time.perf_counter() - started)
            bar.update(task, completed=step, rate=f"{rate:.1f}", loss=f"loss {float(loss.detach()):.4f}")
            if stop.signal is not None:
                stop.taken = True
                flush(step)  # the steps since the last log, which the resumed stage does not replay
                save(progress_at(step))
                raise TrainingInterrupted(f"stage0 stopped at step {offset + step} of {total}", stop.signal)
            if step % 50 == 0 or step == steps:
                flush(step)
            # and at stage 0's last step: a kill while the trained prior is written loses none of the steps
            if save is not None and ((offset + step) % config.checkpoint_every == 0 or offset + step == total):
                save(progress_at(step))
    module.eval()
    module.requires_grad_(False)
    return {**last, f"stage0/{name}_seconds": time.perf_counter() - started}


def train_tiny_prior(
    config: Stage0Config,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[dict, int], None] = lambda metrics, step: None,
    progress: bool = True,
    checkpoints: Path | None = None,
    resume: bool = False,
    on_start: Callable[[int], None] = lambda step: None,
) -> Stage0Result:
    """Train the cached tiny prior in place (see the module docstring); skipped when already trained.

    `checkpoints`: the folder its progress is saved in (None: none is saved, and Ctrl-C interrupts at once);
    with `resume`, the progress saved there goes on. `on_start(step)` is called, when it trains, with the step
    it starts after (0: from the start). Raises `TrainingInterrupted` ("stage0 stopped at step k of n") after
    saving the step at which Ctrl-C or SIGTERM stopped it.
    """
    folder = ensure_tiny_prior()
    if is_trained(folder) and not config.force:
        _delete_progress(checkpoints)  # the prior was trained since (by another run): nothing is left to resume
        record = json.loads((folder / MARKER).read_text())
        return Stage0Result(folder, False, record.get("metrics", {}))
    device = torch.device(device)
    settings = _settings(config, seed)
    total = config.vae_steps + config.unet_steps
    with StopRequest() if checkpoints is not None else _NoStop() as stop:  # a signal from here on: the next step's
        prior = load_prior(folder, device=device)  # fresh copies of the weights, and the empty-prompt embedding
        vae, unet, scheduler = prior.vae, prior.unet, prior.scheduler
        size = prior.native_size
        crop = _vae_crop(config.vae_crop, size, prior.vae_scale_factor)  # before any work
        resumed = _Progress()
        if resume and checkpoints is not None and (checkpoints / STATE_FILE).is_file():
            resumed = _read_progress(checkpoints, vae, unet, settings)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        images = _clean_images(
            size, min(_POOL_LIMIT, max(64, max(config.vae_steps, config.unet_steps) * config.batch_size)), seed
        )
        if resumed.rng is not None:  # after the pool is drawn, as the uninterrupted run drew it
            restore_rng(resumed.rng)
            generator.set_state(resumed.generator)
        batches = _batches(images, config.batch_size, generator)
        scaling = resumed.scaling
        on_start(resumed.step)

        def save(progress: _Progress) -> None:
            progress.generator, progress.scaling = generator.get_state(), scaling
            _save_progress(checkpoints, vae, unet, progress, settings)

        saving = save if checkpoints is not None else None

        def vae_step() -> dict[str, torch.Tensor]:
            clean = next(batches)
            if crop < size:  # one random window per batch (the VAE is convolutional), cut before any other work
                top, left = torch.randint(0, size - crop + 1, (2,), generator=generator).tolist()
                clean = clean[..., top : top + crop, left : left + crop]
            clean = clean.to(device) * 2 - 1
            posterior = vae.encode(clean).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            return {
                "loss/vae_l1": _reconstruction_loss(reconstruction, clean, config.chroma_weight),
                "loss/vae_kl": config.kl_weight * posterior.kl().mean(),
            }

        if scaling is None:  # the VAE is not done
            metrics = _loop("vae", config.vae_steps, vae_step, vae, config, log, progress, 0, total, resumed, stop,
                            saving, {})  # fmt: skip
            with torch.no_grad():  # Stable Diffusion's recipe: scale the latents to unit variance
                latents = torch.cat(
                    [vae.encode(chunk.to(device) * 2 - 1).latent_dist.sample() for chunk in images.split(64)]
                )
                scaling = float(f"{1.0 / latents.std().clamp_min(1e-4).item():.5g}")
        else:
            metrics = dict(resumed.finished or {})
        vae.register_to_config(scaling_factor=scaling)
        context = prior.empty_prompt_embeds.to(device)
        steps_total = scheduler.config.num_train_timesteps

        def unet_step() -> dict[str, torch.Tensor]:
            clean = next(batches).to(device) * 2 - 1
            with torch.no_grad():
                latents = vae.encode(clean).latent_dist.sample() * scaling
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, steps_total, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(
                noisy, timesteps, encoder_hidden_states=context.expand(latents.shape[0], -1, -1)
            ).sample
            if scheduler.config.prediction_type == "v_prediction":
                return {"loss/unet_v": F.mse_loss(prediction, scheduler.get_velocity(latents, noise, timesteps))}
            return {"loss/unet_eps": F.mse_loss(prediction, noise)}

        metrics.update(_loop("unet", config.unet_steps, unet_step, unet, config, log, progress, config.vae_steps,
                             total, resumed, stop, saving, dict(metrics)))  # fmt: skip
    metrics["stage0/scaling_factor"] = scaling
    _write(folder, vae, unet, {"config": asdict(config), "seed": seed, "metrics": metrics})
    _delete_progress(checkpoints)
    return Stage0Result(folder, True, metrics)


def _write(folder: Path, vae, unet, record: dict) -> None:
    """Write the trained prior beside `folder`, then swap it in (two renames; the old one is deleted)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-trained-", dir=folder.parent))
    old = folder.parent / f".{folder.name}-old-{os.getpid()}"
    try:
        vae.to("cpu").save_pretrained(staging / "vae")
        unet.to("cpu").save_pretrained(staging / "unet")
        for name in _COPIED:
            source = folder / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            elif source.is_file():
                shutil.copy2(source, staging / name)
        (staging / MARKER).write_text(json.dumps(record, indent=2, default=str))
        os.replace(folder, old)
        try:
            os.replace(staging, folder)
        except BaseException:
            os.replace(old, folder)  # the untrained prior back, rather than none
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
