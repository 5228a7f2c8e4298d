"""NAFNet's block (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022), the CFRM's building unit."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map, separately at every pixel, with an affine
    weight and bias per channel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        # F.layer_norm normalises trailing axes, so move channels last and back.
        sample = sample.permute(0, 2, 3, 1)  # (B, H, W, C)
        sample = F.layer_norm(sample, (self.channels,), self.weight, self.bias, self.eps)
        return sample.permute(0, 3, 1, 2)  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them: (B, 2c, H, W) -> (B, c, H, W)."""

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        first, second = sample.chunk(2, dim=1)
        return first * second


class NAFBlock(nn.Module):
    """A NAFNet block on `channels` channels; the output has the input's shape.

    Two residual branches, each scaled by a zero-initialised per-channel factor (beta, gamma), so a fresh
    block is exactly the identity:

        y   = x + beta  * conv3(SCA(SimpleGate(dwconv(conv1(norm1(x))))))
        out = y + gamma * conv5(SimpleGate(conv4(norm2(y))))

    SCA is the simplified channel attention: global average pool -> 1x1 conv (no activation) -> multiply.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = 2 * channels

        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)  # depthwise
        self.gate = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, kernel_size=1))
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=1)

        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.conv5 = nn.Conv2d(channels, channels, kernel_size=1)

        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        hidden = self.norm1(sample)  # (B, c, H, W)
        hidden = self.conv1(hidden)  # (B, 2c, H, W)
        hidden = self.conv2(hidden)  # (B, 2c, H, W)
        hidden = self.gate(hidden)  # (B, c, H, W)
        hidden = hidden * self.sca(hidden)  # (B, c, H, W) * (B, c, 1, 1)
        hidden = self.conv3(hidden)  # (B, c, H, W)
        sample = sample + self.beta * hidden

        hidden = self.norm2(sample)  # (B, c, H, W)
        hidden = self.conv4(hidden)  # (B, 2c, H, W)
        hidden = self.gate(hidden)  # (B, c, H, W)
        hidden = self.conv5(hidden)  # (B, c, H, W)
        return sample + self.gamma * hidden
