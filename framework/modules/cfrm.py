"""CFRM: the Complementary Feature Restoration Module (paper section 3.2, SPEC section 2).

One level per tapped VAE-encoder feature. A level restores its feature in place (same shape in and out);
the encoder puts the result back into its main path and also hands it to the decoder's TFA.
"""

from collections.abc import Sequence

import torch
from torch import nn

from .nafblock import NAFBlock


class AdaptiveBlock(nn.Module):
    """The paper's four steps on a `channels`-channel feature, with d = 4 * channels split into `groups` groups.

    1. Feature enhancement: 1x1 conv c -> d, GroupNorm(groups, d), grouped 3x3 conv, GELU.
    2. Intra-group channel attention: global average pool -> grouped 1x1 conv -> multiply.
    3. Inter-group channel integration: global average pool -> 1x1 conv d -> groups, one weight per group
       shared by that group's channels -> multiply.
    4. Feature recovery: 1x1 conv d -> c, add the block's input, then one more NAFBlock.

    The attention weights are used as they come (no activation), as in NAFNet's simplified channel attention.
    """

    def __init__(self, channels: int, groups: int = 16):
        super().__init__()
        expanded = 4 * channels
        if expanded % groups != 0:
            raise ValueError(
                f"AdaptiveBlock needs 4 * channels divisible by groups; got channels={channels} "
                f"(4 * channels = {expanded}) and groups={groups}"
            )
        self.groups = groups

        self.conv_in = nn.Conv2d(channels, expanded, kernel_size=1)
        self.norm = nn.GroupNorm(groups, expanded)
        self.conv_group = nn.Conv2d(expanded, expanded, kernel_size=3, padding=1, groups=groups)
        self.act = nn.GELU()

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.intra_attention = nn.Conv2d(expanded, expanded, kernel_size=1, groups=groups)
        self.inter_attention = nn.Conv2d(expanded, groups, kernel_size=1)

        self.conv_out = nn.Conv2d(expanded, channels, kernel_size=1)
        self.nafblock = NAFBlock(channels)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        residual = sample  # (B, c, H, W)

        # 1. feature enhancement
        hidden = self.conv_in(sample)  # (B, 4c, H, W)
        hidden = self.norm(hidden)
        hidden = self.conv_group(hidden)  # (B, 4c, H, W)
        hidden = self.act(hidden)

        # 2. intra-group channel attention
        intra = self.intra_attention(self.pool(hidden))  # (B, 4c, 1, 1)
        hidden = hidden * intra

        # 3. inter-group channel integration
        inter = self.inter_attention(self.pool(hidden))  # (B, groups, 1, 1)
        inter = inter.repeat_interleave(hidden.shape[1] // self.groups, dim=1)  # (B, 4c, 1, 1)
        hidden = hidden * inter

        # 4. feature recovery
        hidden = self.conv_out(hidden)  # (B, c, H, W)
        hidden = hidden + residual
        return self.nafblock(hidden)  # (B, c, H, W)


class CFRMLevel(nn.Module):
    """One CFRM level: NAFBlock x `num_blocks`, then the AdaptiveBlock. Shape in == shape out."""

    def __init__(self, channels: int, num_blocks: int, groups: int = 16):
        super().__init__()
        self.nafblocks = nn.Sequential(*[NAFBlock(channels) for _ in range(num_blocks)])
        self.adaptive = AdaptiveBlock(channels, groups=groups)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.nafblocks(sample)  # (B, c, H, W)
        return self.adaptive(sample)  # (B, c, H, W)


class CFRM(nn.Module):
    """The CFRM levels, one per tapped encoder feature, shallowest first.

    Args:
        channels: channels of each tapped feature, shallowest first (SD VAE: 128, 256, 512).
        num_blocks: NAFBlocks before each level's adaptive block (the release: 1, 1, 9).
        groups: groups of the adaptive block's expanded (4c) features.

    The encoder calls `levels[i]` inside its main path; `forward` is for using all levels at once.
    """

    def __init__(self, channels: Sequence[int], num_blocks: Sequence[int] = (1, 1, 9), groups: int = 16):
        super().__init__()
        if len(channels) != len(num_blocks):
            raise ValueError(
                f"CFRM needs one num_blocks entry per level; got channels={list(channels)} "
                f"and num_blocks={list(num_blocks)}"
            )
        self.levels = nn.ModuleList(
            CFRMLevel(level_channels, level_blocks, groups=groups)
            for level_channels, level_blocks in zip(channels, num_blocks, strict=True)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Restore `features[i]` with level i; returns the restored features in the same order."""
        if len(features) != len(self.levels):
            raise ValueError(f"CFRM has {len(self.levels)} levels but got {len(features)} features")
        return [level(feature) for level, feature in zip(self.levels, features, strict=True)]
