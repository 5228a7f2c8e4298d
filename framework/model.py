"""UniRestore: the frozen prior with CFRM, Controller, SC-Tuners and one shared TFA (Figure 2).

Reading order follows the data flow: `encode` (VAE encoder with CFRM in its main path) →
`control` + `unet_forward` (Controller and SC-Tuners on the frozen UNet's skips) → `denoise` (DDIM,
trailing spacing) → `decode` (VAE decoder with the TFA and a task prompt) → `restore` (all of SPEC §1).
Every channel list is read from the loaded prior's configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .modules import CFRM, TFA, Controller, SCTuners, TaskPrompts
from .prior import Prior
from .upsampling import up_decoder_block

SHARED_PROMPT = "shared"


@dataclass
class EncoderOutput:
    latents: torch.Tensor  # (B, latent channels, H/8, W/8), already × scaling_factor
    features: list[torch.Tensor]  # the M tapped encoder features, shallowest first


@dataclass
class _CompiledPass:
    """`compile_restore`'s pass: the model it was made for and torch.compile's mode and function."""

    owner: int  # id of the model it was made for: a copy of a compiled model compiles its own
    mode: str
    function: Callable
    # the batch sizes run so far, per everything else the graph is made for (image size, dtype, device, tasks,
    # steps): a smaller batch runs padded in a larger one's graph
    batches: dict[tuple, set[int]] = field(default_factory=dict)

    def batch_for(self, key: tuple, batch: int) -> int:
        """The batch size to run `batch` images at: `batch` itself, or the smallest larger one already run."""
        run = self.batches.get(key, set())
        return batch if batch in run else min((size for size in run if size > batch), default=batch)

    def forget_from(self, key: tuple, batch: int) -> None:
        """Batches of `batch` images and more no longer fit: smaller ones are not padded up to them."""
        self.batches[key] = {size for size in self.batches.get(key, set()) if size < batch}


def _derive_controller_channels(unet_channels: int, groups: int) -> int:
    # 0.8 × the UNet's first width (320 → 256 at SD scale), kept a multiple of the norm groups.
    return max(groups, round(0.8 * unet_channels / groups) * groups)


class UniRestore(nn.Module):
    """The UniRestore model. The prior's modules are frozen and stay in eval mode."""

    def __init__(self, prior: Prior, config: ModelConfig | None = None, tasks: Sequence[str] = ("pir",)):
        super().__init__()
        self.config = config or ModelConfig()
        self.config.validate()
        self.prior_identity = prior.identity()
        self.vae = prior.vae
        self.unet = prior.unet
        self.scheduler = prior.scheduler
        # Each step count's timesteps as Python ints, read once here: `denoise` then reads no tensor's value,
        # so a compiled restore is one graph (reading them there broke it at every call).
        self._step_timesteps = {}
        for count in range(1, 5):
            self.scheduler.set_timesteps(count)
            self._step_timesteps[count] = tuple(int(t) for t in self.scheduler.timesteps.tolist())
        self.register_buffer("empty_prompt_embeds", prior.empty_prompt_embeds.clone(), persistent=False)
        self.native_size = self.config.native_size or prior.native_size
        self.size_multiple = prior.size_multiple

        vae_channels = list(self.vae.config.block_out_channels)
        # Taps: the outputs of every encoder down block but the last, after their downsamplers (M = 3 at SD).
        self.num_taps = len(vae_channels) - 1
        self.encoder_channels = vae_channels[: self.num_taps]
        reversed_channels = vae_channels[::-1]
        decoder_inputs = [reversed_channels[max(i - 1, 0)] for i in range(self.num_taps)]
        blocks = self.config.cfrm_blocks_for(self.num_taps)
        self.config = replace(self.config, cfrm_blocks=blocks)  # checkpoints record the counts built
        self.cfrm = CFRM(self.encoder_channels, num_blocks=blocks, groups=self.config.cfrm_groups)

        unet_channels = list(self.unet.config.block_out_channels)
        groups = self.unet.config.norm_num_groups
        width = self.config.controller_channels or _derive_controller_channels(unet_channels[0], groups)
        levels = len(unet_channels)
        self.controller = Controller(
            in_channels=self.unet.config.in_channels,
            model_channels=width,
            channel_mult=tuple(1 if i < levels // 2 else 2 for i in range(levels)),
            num_res_blocks=2,
            attention_levels=tuple(i < levels - 1 for i in range(levels)),
            num_heads=self.config.controller_heads,
            out_channels=width,
            time_embed_dim=4 * width,
            norm_num_groups=groups,
        )
        self.sc_tuners = SCTuners(width, self._unet_skip_channels())

        tfa_encoder_channels = self.encoder_channels[::-1]  # deepest first
        self.tfa = TFA(tfa_encoder_channels, decoder_inputs, prompt_length=self.config.prompt_length)
        self.prompts = TaskPrompts(tfa_encoder_channels[0], prompt_length=self.config.prompt_length)
        for task in tasks:
            self.add_task(task)
        self.train(False)

    # ----------------------------------------------------------------------------------------------
    # bookkeeping

    def _unet_skip_channels(self) -> list[int]:
        """Channels of the UNet's skip connections, in the order its down path produces them."""
        channels = [self.unet.conv_in.out_channels]
        for block in self.unet.down_blocks:
            channels += [resnet.out_channels for resnet in block.resnets]
            if getattr(block, "downsamplers", None):
                channels += [downsampler.out_channels for downsampler in block.downsamplers]
        return channels

    def components(self) -> dict[str, nn.Module]:
        """The trainable parts, each saved under its own name."""
        return {
            "cfrm": self.cfrm,
            "controller": self.controller,
            "sc_tuners": self.sc_tuners,
            "tfa": self.tfa,
            "prompts": self.prompts,
        }

    @property
    def tasks(self) -> list[str]:
        return self.prompts.names()

    def add_task(self, task: str) -> None:
        """A new task adds one zero-initialised prompt and nothing else."""
        name = SHARED_PROMPT if self.config.shared_prompt else task
        if name not in self.prompts:
            self.prompts.add(name)

    def latent_shape(self, images: torch.Tensor) -> tuple[int, int, int, int]:
        """(B, c, h, w) of the latents of padded images (B, 3, H, W): one latent cell per 2^taps pixels."""
        factor = 2**self.num_taps
        batch, _, height, width = images.shape
        return batch, self.vae.config.latent_channels, height // factor, width // factor

    def prompt_for(self, task: str) -> torch.Tensor:
        return self.prompts(SHARED_PROMPT if self.config.shared_prompt else task)

    def train(self, mode: bool = True) -> UniRestore:
        super().train(mode)
        # The prior is frozen: its dropout and norms never switch to training behaviour.
        self.vae.eval()
        self.unet.eval()
        return self

    def _run(self, module, *args):
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    # ----------------------------------------------------------------------------------------------
    # encode: VAE encoder with the CFRM in its main path

    def encode(
        self,
        images: torch.Tensor,
        use_cfrm: bool | None = None,
        sample_posterior: bool | None = None,
        generator: torch.Generator | None = None,
        posterior_noise: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode images in [0, 1] (B, 3, H, W); H and W multiples of the VAE factor.

        With `sample_posterior`, the latent is drawn from the posterior with `posterior_noise` (the latents'
        shape) if given, else with noise from `generator`.
        """
        use_cfrm = self.config.use_cfrm if use_cfrm is None else use_cfrm
        sample_posterior = self.config.sample_posterior if sample_posterior is None else sample_posterior
        encoder = self.vae.encoder
        sample = encoder.conv_in(images * 2 - 1)  # (B, c0, H, W)
        features = []
        for i, down_block in enumerate(encoder.down_blocks):
            if i == self.num_taps:
                # The latent loss must never reach the CFRM: cut the main path before the last down block.
                sample = sample.detach()
            sample = down_block(sample)  # (B, c_i, H/2^(i+1), W/2^(i+1)) for tapped levels
            if i < self.num_taps:
                if use_cfrm:
                    sample = self._run(self.cfrm.levels[i], sample)
                features.append(sample)
        sample = encoder.mid_block(sample)
        sample = encoder.conv_norm_out(sample)
        sample = encoder.conv_act(sample)
        moments = encoder.conv_out(sample)  # (B, 8, H/8, W/8)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        if sample_posterior:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = _randn_like(mean, generator) if posterior_noise is None else posterior_noise.to(mean)
            latents = mean + std * noise
        else:
            latents = mean
        latents = latents * self.vae.config.scaling_factor  # (B, c, H/8, W/8)
        return EncoderOutput(latents=latents, features=features)

    # ----------------------------------------------------------------------------------------------
    # control + denoise: Controller and SC-Tuners on the frozen UNet

    def control(self, latents: torch.Tensor, timesteps: torch.Tensor | int) -> dict[int, torch.Tensor]:
        """Controller features of the degraded latent, keyed by spatial width."""
        return self._run(self.controller, latents, self._timesteps(timesteps, latents))

    def _timesteps(self, timesteps: torch.Tensor | int, sample: torch.Tensor) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        return timesteps.expand(sample.shape[0])

    def unet_forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor | int, control: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """The frozen UNet, block by block, with every skip connection edited by its SC-Tuner."""
        unet = self.unet
        timesteps = self._timesteps(timesteps, latents)
        context = self.empty_prompt_embeds.to(latents.dtype).expand(latents.shape[0], -1, -1)
        embedding = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=timesteps))
        sample = unet.conv_in(latents)  # (B, c0, h, w)
        skips = [sample]
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, residuals = self._run_unet_block(block, sample, embedding, context)
            else:
                sample, residuals = self._run_unet_block(block, sample, embedding, None)
            skips.extend(residuals)
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, embedding, encoder_hidden_states=context)
            else:
                sample = unet.mid_block(sample, embedding)
        skips = self.sc_tuners(skips, control)
        for i, block in enumerate(unet.up_blocks):
            residuals = tuple(skips[-len(block.resnets) :])
            skips = skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if i < len(unet.up_blocks) - 1 else None
            kwargs = {
                "hidden_states": sample,
                "temb": embedding,
                "res_hidden_states_tuple": residuals,
                "upsample_size": upsample_size,
            }
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = context
            sample = block(**kwargs)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)  # (B, c, h, w)

    def _run_unet_block(self, block, sample, embedding, context):
        kwargs = {"encoder_hidden_states": context} if context is not None else {}
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(
                lambda s, e: block(hidden_states=s, temb=e, **kwargs), sample, embedding, use_reentrant=False
            )
        return block(hidden_states=sample, temb=embedding, **kwargs)

    def predict_original(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor | int, model_output: torch.Tensor
    ) -> torch.Tensor:
        """The clean-latent estimate ẑ0 from the UNet's output at `timesteps` (ε or v prediction)."""
        timesteps = self._timesteps(timesteps, noisy_latents).long()
        alphas = self.scheduler.alphas_cumprod.to(noisy_latents.device)[timesteps]
        alpha = alphas.sqrt().view(-1, 1, 1, 1).to(noisy_latents.dtype)
        sigma = (1 - alphas).sqrt().view(-1, 1, 1, 1).to(noisy_latents.dtype)
        if self.scheduler.config.prediction_type == "v_prediction":
            return alpha * noisy_latents - sigma * model_output
        return (noisy_latents - sigma * model_output) / alpha

    def denoise(
        self,
        latents: torch.Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDIM with trailing spacing from the degraded latent noised to t = 999; returns the clean latent.

        `noise` (the latents' shape) fixes the starting noise, e.g. one crop of a whole image's noise per tile.
        """
        steps = self.config.denoise_steps if steps is None else steps
        if not 1 <= steps <= 4:
            raise ValueError(f"denoise steps={steps}: must be 1 to 4")
        self.scheduler.set_timesteps(steps)  # the step's state (its stride); the timesteps are read below
        step_timesteps = self._step_timesteps[steps]
        timesteps = torch.tensor(step_timesteps, device=latents.device)
        if noise is None:
            noise = _randn_like(latents, generator)
        sample = self.scheduler.add_noise(latents, noise, timesteps[:1])  # (B, c, h, w), almost pure noise
        # DDIM's step indexes its CPU noise schedule by the timestep and branches on it: given a GPU tensor, it
        # would wait for the GPU at every step (and break a compiled graph there); an int costs nothing.
        for t, step_t in zip(timesteps, step_timesteps, strict=True):
            control = self.control(latents, t)
            model_output = self.unet_forward(sample, t, control)
            sample = self.scheduler.step(model_output, step_t, sample).prev_sample
        return sample

    # ----------------------------------------------------------------------------------------------
    # decode: VAE decoder with the TFA and a task prompt

    def decode(
        self, latents: torch.Tensor, features: Sequence[torch.Tensor] | None, task: str | None
    ) -> torch.Tensor:
        """Decode latents to images in [0, 1] (unclamped), fusing `features` through the TFA with `task`'s prompt.

        With the TFA switched off (or `features` None) this is the prior's plain decoder.
        """
        return self.decode_tasks(latents, features, [task])[0]

    def decode_tasks(
        self, latents: torch.Tensor, features: Sequence[torch.Tensor] | None, tasks: Sequence[str | None]
    ) -> list[torch.Tensor]:
        """Decode the same latents and features once per task in `tasks`: one (B, 3, H, W) image batch each.

        The decoder runs on the K tasks' copies stacked in one batch, and what does not depend on the prompt
        (the decoder up to the first TFA layer, the TFA's projections of the encoder features) runs once.
        """
        decoder = self.vae.decoder
        z = latents / self.vae.config.scaling_factor
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        sample = decoder.conv_in(z)  # (B, C, h, w)
        sample = decoder.mid_block(sample, None)
        use_tfa = self.config.use_tfa and features is not None
        copies = len(tasks) if use_tfa else 1  # the plain decoder's output is the same for every task
        prompt = None
        if use_tfa:
            if any(task is None for task in tasks):
                raise ValueError("decode with the TFA needs a task; give one of " + ", ".join(self.tasks))
            batch = sample.shape[0]
            prompt = torch.cat(
                [self.prompt_for(task).to(sample.dtype).unsqueeze(0).expand(batch, -1, -1) for task in tasks]
            )  # (K·B, T, D0), task-major
            if copies > 1:
                sample = sample.repeat(copies, 1, 1, 1)  # (K·B, C, h, w)
        for i, up_block in enumerate(decoder.up_blocks):
            if use_tfa and i < self.num_taps:
                feature = features[self.num_taps - 1 - i]  # deepest first; (B, ...), shared by the K copies
                sample, prompt = self._run(self.tfa.layers[i], sample, feature, prompt)
            sample = up_decoder_block(up_block, sample)  # diffusers' block, its upsampler in 4/9 of the work
        sample = decoder.conv_norm_out(sample)
        sample = decoder.conv_act(sample)
        sample = decoder.conv_out(sample)  # (K·B, 3, H, W) in about [-1, 1]
        images = (sample + 1) / 2
        if copies == 1:
            return [images] * len(tasks)
        return list(images.chunk(copies))

    # ----------------------------------------------------------------------------------------------
    # restore: SPEC §1 end to end

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Resize the short side up to the native size, reflect-pad right/bottom to the size multiple."""
        height, width = images.shape[-2:]
        short = min(height, width)
        if short < self.native_size:
            scale = self.native_size / short
            size = (max(self.native_size, round(height * scale)), max(self.native_size, round(width * scale)))
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
            images = images.clamp(0, 1)
        resized = tuple(images.shape[-2:])
        multiple = self.size_multiple
        pad_h = math.ceil(resized[0] / multiple) * multiple - resized[0]
        pad_w = math.ceil(resized[1] / multiple) * multiple - resized[1]
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect")
        return images, resized, (height, width)

    def postprocess(
        self, images: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]
    ) -> torch.Tensor:
        images = images[..., : resized[0], : resized[1]]
        if tuple(resized) != tuple(original):
            images = F.interpolate(images, size=original, mode="bicubic", align_corners=False, antialias=True)
        return images.clamp(0, 1)

    def forward_padded(
        self,
        images: torch.Tensor,
        task: str,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """encode → denoise → decode on images whose size is already a valid multiple.

        The pass runs in the model's dtype (a model cast to bf16 runs in bf16 throughout); the output has the
        images' dtype.
        """
        return self.forward_padded_tasks(images, [task], steps=steps, generator=generator, noise=noise)[0]

    def forward_padded_tasks(
        self,
        images: torch.Tensor,
        tasks: Sequence[str],
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        posterior_noise: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """`forward_padded` for several prompts at once: one encode and denoise, then one decode per task
        (`decode_tasks`: stacked in one batch). Returns one output per task, as each would be alone.
        `noise` and `posterior_noise` fix the noise that `generator` would draw (see `encode`, `denoise`).
        After `compile_restore`, passes without gradients run compiled (the noise drawn first, as here), and a
        batch smaller than one already run at its size runs in that batch's graph, its last image repeated."""
        compiled = self.__dict__.get("_compiled_pass")
        if compiled is None or torch.is_grad_enabled():
            return self._padded_pass(images, tuple(tasks), steps, generator, noise, posterior_noise)
        if compiled.owner != id(self):  # a copy of a compiled model: its own pass, not the original's
            self.compile_restore(compiled.mode)
            compiled = self.__dict__["_compiled_pass"]
        like = images.new_empty(self.latent_shape(images), dtype=self.vae.dtype)
        posterior_noise, noise = self._draw_noise(like, generator, posterior_noise, noise)
        batch = images.shape[0]
        key = (
            tuple(images.shape[1:]),
            images.dtype,
            images.device,
            tuple(tasks),
            self.config.denoise_steps if steps is None else steps,
        )
        run = compiled.batch_for(key, batch)
        if run > batch:  # e.g. a run's smaller last batch: no new graph (minutes) for a few images
            # the padding rows copy the last image and its noise: the real images' noise is the one drawn above
            images, noise, posterior_noise = (
                None if x is None else torch.cat([x, x[-1:].expand(run - batch, *x.shape[1:])])
                for x in (images, noise, posterior_noise)
            )
        if images.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs are no longer read
        try:
            outputs = compiled.function(images, tuple(tasks), steps, None, noise, posterior_noise)
        except torch.OutOfMemoryError:
            compiled.forget_from(key, run)  # the callers' retries with fewer images then run them unpadded
            raise
        compiled.batches.setdefault(key, set()).add(run)
        # CUDA graphs reuse their output memory at the next call: the caller's copies are its own
        return [out[:batch].clone() for out in outputs]

    def _draw_noise(self, like: torch.Tensor, generator, posterior_noise=None, noise=None) -> tuple:
        """(posterior sample's noise or None, denoising noise) of latents shaped `like`: those not given drawn
        from `generator` in the order a pass draws them (the posterior sample's first)."""
        if posterior_noise is None and self.config.sample_posterior:
            posterior_noise = _randn_like(like, generator)
        return posterior_noise, _randn_like(like, generator) if noise is None else noise

    def compile_restore(self, mode: str | None = None) -> None:
        """Run restores (passes without gradients) through `torch.compile`: one graph per image size, batch,
        task list and step count, compiled at its first call (minutes at sd-turbo scale; a few times faster after:
        see BENCHMARKS.md). A batch smaller than one already run at its size, task list and step count (a run's
        last batch) runs padded in that batch's graph instead of compiling its own. `mode`: torch.compile's, by
        default `reduce-overhead` (CUDA graphs) on a GPU."""
        if mode is None:
            mode = "reduce-overhead" if next(self.cfrm.parameters()).device.type == "cuda" else "default"
        compiled = torch.compile(self._padded_pass, mode=mode, dynamic=False)
        self.__dict__["_compiled_pass"] = _CompiledPass(id(self), mode, compiled)

    def _padded_pass(
        self,
        images: torch.Tensor,
        tasks: tuple[str, ...],
        steps: int | None,
        generator: torch.Generator | None,
        noise: torch.Tensor | None,
        posterior_noise: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        dtype = self.vae.dtype
        encoded = self.encode(images.to(dtype), generator=generator, posterior_noise=posterior_noise)
        noise = None if noise is None else noise.to(dtype)
        latents = self.denoise(encoded.latents, steps=steps, generator=generator, noise=noise)
        features = encoded.features if self.config.use_tfa else None
        # tasks that share a prompt (UniRestore-SP) share one decode
        prompts = [SHARED_PROMPT if self.config.shared_prompt else task for task in tasks]
        unique = list(dict.fromkeys(prompts))
        decoded = dict(zip(unique, self.decode_tasks(latents, features, unique), strict=True))
        return [decoded[prompt].to(images.dtype) for prompt in prompts]

    @torch.no_grad()
    def restore(
        self,
        images: torch.Tensor,
        task: str = "pir",
        steps: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> torch.Tensor:
        """Restore a batch of images in [0, 1] (B, 3, H, W) of any size for `task`; returns [0, 1], same size.

        Images whose padded side exceeds `tile_size` pixels (0 or None: never) are restored tile by tile
        (`framework/tiling.py`), so memory is bounded by the tile, not the image. `generator` may be one per
        image: each image then gets the noise it would get restored alone, whatever else is in the batch.
        """
        return self.restore_tasks(images, [task], steps, generator, tile_size, tile_overlap)[task]

    @torch.no_grad()
    def restore_tasks(
        self,
        images: torch.Tensor,
        tasks: Sequence[str] = ("pir",),
        steps: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """`restore` for several prompts at once, {task: restored images}: the encoder, Controller and UNet
        run once and only the decoder once per task (the paper's one model for viewers and machines, at about
        the cost of one restore plus a decoder per extra task). Each output is the one `restore` gives alone.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"restore expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"restore expects float images in [0, 1], got {images.dtype}: pass images.float() / 255"
            )
        tasks = list(dict.fromkeys(tasks))
        if not tasks:
            raise ValueError("restore_tasks needs at least one task")
        if self.config.use_tfa:
            for task in tasks:
                self.prompt_for(task)  # fail before any work when a task has no prompt
        per_image = generator is not None and not isinstance(generator, torch.Generator)
        if per_image and len(generator) != images.shape[0]:
            raise ValueError(f"restore got {len(generator)} generators for {images.shape[0]} images")
        if images.shape[0] == 0:
            return {task: images.clone() for task in tasks}
        padded, resized, original = self.preprocess(images.clamp(0, 1))
        if tile_size and max(padded.shape[-2:]) > tile_size:
            from .tiling import tiled_forward

            if per_image:
                parts = [
                    tiled_forward(self, one[None], tasks, tile_size, tile_overlap, steps=steps, generator=g)
                    for one, g in zip(padded, generator, strict=True)
                ]  # per image, one output per task
                restored = [torch.cat(outputs) for outputs in zip(*parts, strict=True)]
            else:
                restored = tiled_forward(
                    self, padded, tasks, tile_size, tile_overlap, steps=steps, generator=generator
                )
        elif per_image:
            shape = (1, *self.latent_shape(padded)[1:])
            like = padded.new_empty(shape, dtype=self.vae.dtype)
            # drawn as the single-generator path draws them: the posterior sample's noise (if any), then the
            # denoising noise
            draws = [self._draw_noise(like, g) for g in generator]
            posterior_noise = torch.cat([p for p, _ in draws]) if self.config.sample_posterior else None
            noise = torch.cat([n for _, n in draws])
            restored = self.forward_padded_tasks(
                padded, tasks, steps=steps, noise=noise, posterior_noise=posterior_noise
            )
        else:
            restored = self.forward_padded_tasks(padded, tasks, steps=steps, generator=generator)
        return {
            task: self.postprocess(out, resized, original) for task, out in zip(tasks, restored, strict=True)
        }


def _randn_like(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU generator serves a GPU model too)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
