"""SC-Tuners: the Controller's maps edited into the frozen UNet's skip connections (SPEC section 4).

SCEdit's CSC-Tuner with the Controller as the hint source. The tuner needs the skip itself, which the
additive-residual arguments of diffusers' UNet cannot express, so the UNet is run block by block and its
skips are passed through `SCTuners` between the mid block and the up path.
"""

from collections.abc import Sequence

import torch
from torch import nn


class SCTuner(nn.Module):
    """Edit one skip connection s (B, channels, h, w) with a control map (B, control_channels, h, w):

    p  = proj(control)
    s' = s + p + MLP(s + p)        MLP = 1x1 conv -> GELU -> 1x1 conv, `channels` wide
    """

    def __init__(self, control_channels: int, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(control_channels, channels, kernel_size=1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=1),
        )

    def forward(self, skip: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        hidden = skip + self.proj(control)  # (B, channels, h, w)
        return hidden + self.mlp(hidden)  # (B, channels, h, w)


class SCTuners(nn.Module):
    """One SCTuner per UNet skip connection, in the UNet's order (SD 2.1: [320] * 4 + [640] * 3 + [1280] * 5).

    Each skip takes the control map of its own spatial width.
    """

    def __init__(self, control_channels: int, skip_channels: Sequence[int]):
        super().__init__()
        self.tuners = nn.ModuleList(SCTuner(control_channels, channels) for channels in skip_channels)

    def forward(self, skips: Sequence[torch.Tensor], control: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Return the edited skips, in order; `control` is the Controller's output (keyed by width)."""
        if len(skips) != len(self.tuners):
            raise ValueError(
                f"SCTuners holds {len(self.tuners)} tuners but got {len(skips)} skip connections"
            )
        edited = []
        for index, (tuner, skip) in enumerate(zip(self.tuners, skips, strict=True)):
            width = skip.shape[-1]
            if width not in control:
                raise KeyError(
                    f"no control map of width {width} for skip connection {index} "
                    f"(shape {tuple(skip.shape)}); control widths available: {sorted(control)}"
                )
            edited.append(tuner(skip, control[width]))  # (B, c_skip, h, w)
        return edited
