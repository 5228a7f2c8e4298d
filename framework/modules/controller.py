"""The Controller: a time-aware encoder of the degraded latent, trained from scratch (SPEC section 3).

Not a ControlNet copy of the UNet: a smaller StableSR-style encoder built from diffusers' own UNet blocks.
Its outputs, one per resolution, feed the SC-Tuners that edit the frozen UNet's skip connections.
"""

from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import AttnDownBlock2D, DownBlock2D, UNetMidBlock2D
from torch import nn


class Controller(nn.Module):
    """Encode the degraded latent `z_lq` at timestep t into one control map per resolution.

    Args:
        in_channels: latent channels (4 for SD).
        model_channels: channels of the first level; the sinusoidal time embedding has this width too.
        channel_mult: per-level multiplier of `model_channels`; a downsampler sits between levels.
        num_res_blocks: resnet blocks (each followed by self-attention where enabled) per level.
        attention_levels: per level, whether its resnets are followed by self-attention.
        num_heads: attention heads everywhere (head dim = channels // num_heads).
        out_channels: channels of every control map (what the SC-Tuners project from).
        time_embed_dim: width of the time embedding given to every resnet.
        norm_num_groups: GroupNorm groups of resnets and attention.

    The second conv of every resnet block and the output projection of every attention are zero-initialised,
    so a fresh Controller's blocks are identities and its maps are the output heads' shortcuts of the
    (downsampled) `conv_in` features, independent of the timestep.
    """

    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 256,
        channel_mult: Sequence[int] = (1, 1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[bool] = (True, True, True, False),
        num_heads: int = 4,
        out_channels: int = 256,
        time_embed_dim: int = 1024,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        if len(attention_levels) != len(channel_mult):
            raise ValueError(
                f"Controller needs one attention_levels entry per level; got channel_mult={list(channel_mult)} "
                f"and attention_levels={list(attention_levels)}"
            )
        eps = 1e-5
        level_channels = [model_channels * mult for mult in channel_mult]

        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(model_channels, time_embed_dim)

        self.conv_in = nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1)

        self.down_blocks = nn.ModuleList()
        block_in = model_channels
        for level, (channels, use_attention) in enumerate(zip(level_channels, attention_levels, strict=True)):
            is_last = level == len(level_channels) - 1
            if use_attention:
                block = AttnDownBlock2D(
                    in_channels=block_in,
                    out_channels=channels,
                    temb_channels=time_embed_dim,
                    num_layers=num_res_blocks,
                    resnet_eps=eps,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=channels // num_heads,
                    downsample_type=None if is_last else "conv",
                )
            else:
                block = DownBlock2D(
                    in_channels=block_in,
                    out_channels=channels,
                    temb_channels=time_embed_dim,
                    num_layers=num_res_blocks,
                    resnet_eps=eps,
                    resnet_groups=norm_num_groups,
                    add_downsample=not is_last,
                )
            self.down_blocks.append(block)
            block_in = channels

        self.mid_block = UNetMidBlock2D(
            in_channels=level_channels[-1],
            temb_channels=time_embed_dim,
            resnet_eps=eps,
            resnet_groups=norm_num_groups,
            attention_head_dim=level_channels[-1] // num_heads,
        )

        # one head per level; the last level's is applied to the mid-block output
        self.heads = nn.ModuleList(
            ResnetBlock2D(
                in_channels=channels,
                out_channels=out_channels,
                temb_channels=time_embed_dim,
                groups=norm_num_groups,
                eps=eps,
            )
            for channels in level_channels
        )

        for module in self.modules():
            if isinstance(module, ResnetBlock2D):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
            elif isinstance(module, Attention):
                nn.init.zeros_(module.to_out[0].weight)
                nn.init.zeros_(module.to_out[0].bias)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor | int) -> dict[int, torch.Tensor]:
        """Control maps of `sample` (B, in_channels, h, w) at `timesteps` (an int, a 0-d tensor, or (1,) / (B,)).

        Returns a dict keyed by each map's spatial width, e.g. {64, 32, 16, 8} for a 64x64 latent; every map is
        (B, out_channels, h_l, w_l). Odd sizes round up at each downsampler (h_l = ceil(h_{l-1} / 2)), exactly as
        in the UNet, so the keys match the widths of the UNet's skip connections.
        """
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timesteps, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        if timesteps.shape[0] not in (1, batch):
            raise ValueError(f"timesteps has {timesteps.shape[0]} entries for a batch of {batch}")
        timesteps = timesteps.expand(batch)  # (B,)

        # the sinusoid is computed in float32; match the network's dtype afterwards
        time_embedding = self.time_proj(timesteps).to(sample.dtype)  # (B, model_channels)
        time_embedding = self.time_embedding(time_embedding)  # (B, time_embed_dim)

        hidden = self.conv_in(sample)  # (B, model_channels, h, w)

        level_outputs = []
        for block in self.down_blocks:
            hidden, states = block(hidden, time_embedding)  # hidden: after the downsampler, if any
            if block.downsamplers is not None:
                # states ends with the downsampled map; the entry before it is the level's own resolution
                level_outputs.append(states[-2])  # (B, c_l, h_l, w_l)

        hidden = self.mid_block(hidden, time_embedding)  # (B, c_last, h_last, w_last)
        level_outputs.append(hidden)

        control = {}
        for head, feature in zip(self.heads, level_outputs, strict=True):
            width = feature.shape[-1]
            if width in control:
                raise ValueError(
                    f"Controller outputs two maps of width {width} (input width {sample.shape[-1]} is too small "
                    f"for {len(self.heads)} levels); use a latent at least {2 ** (len(self.heads) - 1)} wide"
                )
            control[width] = head(feature, time_embedding)  # (B, out_channels, h_l, w_l)
        return control
