"""The stage losses of SPEC §6, as dicts of named, weighted terms (the names are MLflow metric keys)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..config import RELEASE_CFRM_LEVEL_WEIGHTS, per_level
from ..model import UniRestore

# Timesteps stage 1 draws from: the release favours t = 999, the one used at inference.
STAGE1_TIMESTEPS = (249, 499, 749, 999, 999, 999)
DECODER_INPUTS = ("clean_estimate", "inference")


def _draw_timesteps(count: int, device, generator: torch.Generator | None) -> torch.Tensor:
    source = generator.device if generator is not None else device
    choices = torch.tensor(STAGE1_TIMESTEPS, device=source)
    index = torch.randint(len(choices), (count,), generator=generator, device=source)
    return choices[index].to(device)


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    source = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=source).to(like.device)


def clean_latents(model: UniRestore, clean: torch.Tensor, generator: torch.Generator | None = None):
    """Vanilla-encoder features and the posterior-sampled clean latent h0 (no gradients)."""
    with torch.no_grad():
        return model.encode(clean, use_cfrm=False, sample_posterior=True, generator=generator)


def stage1_losses(
    model: UniRestore,
    clean: torch.Tensor,
    degraded: torch.Tensor,
    weights: Mapping[str, float],
    level_weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """L_CFRM (restored vs clean encoder features) and L_Control (ẑ0 from the noised clean latent vs h0)."""
    target = clean_latents(model, clean, generator)
    restored = model.encode(degraded, use_cfrm=True)  # features with grad; latents cut from the CFRM
    level_weights = per_level(level_weights, RELEASE_CFRM_LEVEL_WEIGHTS, len(restored.features), "level_weights")
    feature_loss = sum(
        weight * F.mse_loss(r.float(), c.float())
        for weight, r, c in zip(level_weights, restored.features, target.features)
    )
    h0 = target.latents
    timesteps = _draw_timesteps(h0.shape[0], h0.device, generator)
    noisy = model.scheduler.add_noise(h0, _noise(h0, generator), timesteps)  # noise on the clean latent
    control = model.control(restored.latents, timesteps)
    estimate = model.predict_original(noisy, timesteps, model.unet_forward(noisy, timesteps, control))
    control_loss = F.mse_loss(estimate.float(), h0.float())
    return {"loss/cfrm": weights["cfrm"] * feature_loss, "loss/control": weights["control"] * control_loss}


@torch.no_grad()
def decoder_inputs(
    model: UniRestore,
    clean: torch.Tensor,
    degraded: torch.Tensor,
    mode: str = "clean_estimate",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What the stage-2 decoder reads: a clean-latent estimate and the restored encoder features.

    `clean_estimate` (the release): ẑ0 from the noised clean latent at a stage-1 timestep.
    `inference`: one DDIM step from the noised degraded latent, exactly as at test time.
    Both are computed once per batch without gradients: the stage-1 modules are frozen in stage 2.
    """
    if mode not in DECODER_INPUTS:
        raise ValueError(f"unknown stage-2 decoder input '{mode}'; use one of {', '.join(DECODER_INPUTS)}")
    restored = model.encode(degraded, use_cfrm=model.config.use_cfrm)
    if mode == "inference":
        latents = model.denoise(restored.latents, generator=generator)
    else:
        h0 = clean_latents(model, clean, generator).latents
        timesteps = _draw_timesteps(h0.shape[0], h0.device, generator)
        noisy = model.scheduler.add_noise(h0, _noise(h0, generator), timesteps)
        control = model.control(restored.latents, timesteps)
        latents = model.predict_original(noisy, timesteps, model.unet_forward(noisy, timesteps, control))
    return latents, restored.features


def compiled_decoder_inputs():
    """`decoder_inputs` under torch.compile (`train.compile`), one graph per batch and crop shape. Its noise and
    timesteps are drawn as the eager pass draws them, from the same generators in the same order (inductor's own
    random numbers would differ from them), so a compiled stage computes what the eager one does, to rounding."""
    return torch.compile(decoder_inputs, dynamic=False, options={"fallback_random": True})


def task_losses(
    model: UniRestore,
    task,
    batch: dict,
    latents: torch.Tensor,
    features: Sequence[torch.Tensor],
    beta: float,
    anchor: bool = True,
) -> dict[str, torch.Tensor]:
    """β_k · L_k for one task's batch: the task's own terms and, for tasks anchored to PIR, the unweighted
    L1 between the PIR-prompt output and the clean image. Both decodes run as one batched pass."""
    features = list(features) if model.config.use_tfa else None
    use_anchor = anchor and task.anchor_to_pir and "pir" in model.prompts and not model.config.shared_prompt
    if use_anchor:
        # One pass decodes both prompts; the prompt-independent part runs once.
        restored, pir_output = model.decode_tasks(latents, features, [task.name, "pir"])
    else:
        restored = model.decode(latents, features, task.name)
    terms = dict(task.losses(restored, batch))
    if use_anchor:
        terms[f"loss/{task.name}_pir_l1"] = F.l1_loss(pir_output.float(), batch["hq"].float())
    return {key: beta * value for key, value in terms.items()}

