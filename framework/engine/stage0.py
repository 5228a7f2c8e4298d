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
a later run skips stage 0 (unless `stage0.force`).
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

from ..config import ConfigError, Stage0Config
from ..prior import ensure_tiny_prior, load_prior

MARKER = "stage0.json"
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


def _loop(
    name: str,
    steps: int,
    step_fn: Callable[[], dict[str, torch.Tensor]],
    module,
    config: Stage0Config,
    log: Callable[[dict, int], None],
    progress: bool,
    offset: int,
) -> dict[str, float]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    optimizer, schedule = _optimizer(module, config, steps)
    module.train()
    module.requires_grad_(True)
    last: dict[str, float] = {}
    sums: dict[str, float] = {}  # since the last log: what is logged is the mean, as the other stages log it
    count, window = 0, time.perf_counter()
    columns = (TextColumn(f"[bold]stage 0 {name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} steps/s"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"))  # fmt: skip
    started = time.perf_counter()
    from ..console import make_console

    with RichProgress(*columns, disable=not progress, console=make_console()) as bar:
        task = bar.add_task(name, total=steps, rate="-", loss="")
        for step in range(1, steps + 1):
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
            if step % 50 == 0 or step == steps:
                # the names stages 1 to 3 log too (`<stage>/loss_total`, `/lr`, `/steps_per_second`), so that
                # stage 0's curves and MLflow columns read as theirs; one step axis for the VAE, then the UNet
                seconds = time.perf_counter() - window
                log({**{key: value / count for key, value in sums.items()}, "stage0/lr": schedule.get_last_lr()[0],
                     "stage0/steps_per_second": count / max(seconds, 1e-9)}, offset + step)  # fmt: skip
                sums, count, window = {}, 0, time.perf_counter()
            rate = step / (time.perf_counter() - started)
            bar.update(task, completed=step, rate=f"{rate:.1f}", loss=f"loss {float(loss.detach()):.4f}")
    module.eval()
    module.requires_grad_(False)
    return {**last, f"stage0/{name}_seconds": time.perf_counter() - started}


def train_tiny_prior(
    config: Stage0Config,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[dict, int], None] = lambda metrics, step: None,
    progress: bool = True,
) -> Stage0Result:
    """Train the cached tiny prior in place (see the module docstring); skipped when already trained."""
    folder = ensure_tiny_prior()
    if is_trained(folder) and not config.force:
        record = json.loads((folder / MARKER).read_text())
        return Stage0Result(folder, False, record.get("metrics", {}))
    device = torch.device(device)
    prior = load_prior(folder, device=device)  # fresh copies of the weights, and the empty-prompt embedding
    vae, unet, scheduler = prior.vae, prior.unet, prior.scheduler
    size = prior.native_size
    crop = _vae_crop(config.vae_crop, size, prior.vae_scale_factor)  # before any work
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = _clean_images(
        size, min(_POOL_LIMIT, max(64, max(config.vae_steps, config.unet_steps) * config.batch_size)), seed
    )
    batches = _batches(images, config.batch_size, generator)

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

    metrics = _loop("vae", config.vae_steps, vae_step, vae, config, log, progress, 0)

    with torch.no_grad():  # Stable Diffusion's recipe: scale the latents to unit variance
        latents = torch.cat(
            [vae.encode(chunk.to(device) * 2 - 1).latent_dist.sample() for chunk in images.split(64)]
        )
        scaling = float(f"{1.0 / latents.std().clamp_min(1e-4).item():.5g}")
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

    metrics.update(_loop("unet", config.unet_steps, unet_step, unet, config, log, progress, config.vae_steps))
    metrics["stage0/scaling_factor"] = scaling
    _write(folder, vae, unet, {"config": asdict(config), "seed": seed, "metrics": metrics})
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
