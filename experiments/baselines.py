"""Baselines the paper compares against, at the benchmark's scale: NAFNet (Chen et al., ECCV 2022).

A U-shaped stack of NAFBlocks: strided-conv downsampling, pixel-shuffle upsampling, additive skips and a
global residual, trained for PIR alone; the downstream models then read its output, as in Tables 1–3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unirestore.framework.modules import NAFBlock


class NAFNet(nn.Module):
    """NAFNet(width, encoder_blocks, middle_blocks, decoder_blocks) on images in [0, 1]."""

    def __init__(
        self,
        width: int = 16,
        encoder_blocks: Sequence[int] = (1, 1, 2),
        middle_blocks: int = 2,
        decoder_blocks: Sequence[int] = (1, 1, 1),
    ):
        super().__init__()
        if len(encoder_blocks) != len(decoder_blocks):
            raise ValueError("NAFNet needs as many decoder levels as encoder levels")
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.ending = nn.Conv2d(width, 3, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = (nn.ModuleList() for _ in range(4))
        channels = width
        for count in encoder_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(channels) for _ in range(count)]))
            self.downs.append(nn.Conv2d(channels, 2 * channels, 2, stride=2))
            channels *= 2
        self.middle = nn.Sequential(*[NAFBlock(channels) for _ in range(middle_blocks)])
        for count in decoder_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(channels, 2 * channels, 1, bias=False), nn.PixelShuffle(2)))
            channels //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(channels) for _ in range(count)]))
        self.multiple = 2 ** len(encoder_blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.multiple, (-width) % self.multiple
        sample = nn.functional.pad(images, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else images
        residual = sample
        sample = self.intro(sample * 2 - 1)  # (B, w, H, W)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            sample = encoder(sample)
            skips.append(sample)
            sample = down(sample)  # (B, 2c, H/2, W/2)
        sample = self.middle(sample)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            sample = decoder(up(sample) + skip)
        sample = residual + self.ending(sample) / 2  # predicts a correction in [0, 1] units
        return sample[..., :height, :width]
