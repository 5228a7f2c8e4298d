"""TFA: the Task Feature Adapter and its per-task prompts (paper section 3.3, Eq. 1; SPEC section 5).

One TFA layer sits at the input of each of the VAE decoder's `up_blocks[0..2]` and fuses the CFRM-restored
encoder feature of the same scale into the decoder feature. What it takes from the encoder feature is steered
by a small prompt, one per task, that each layer updates LSTM-style and hands to the next layer.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PromptProjection(nn.Module):
    """The paper's theta: summarise a (B, C, H, W) feature as a (B, T, C) prompt-shaped tensor.

    InstanceNorm2d (no affine) -> 3x3 conv C -> C -> GELU -> 3x3 conv C -> T * C -> global average pool.
    """

    def __init__(self, channels: int, prompt_length: int = 1):
        super().__init__()
        self.prompt_length = prompt_length
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels, prompt_length * channels, kernel_size=3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.project(self.norm(feature))

    def project(self, normalized: torch.Tensor) -> torch.Tensor:
        """Everything after the norm, on `self.norm(feature)` (B, C, H, W)."""
        hidden = self.conv1(normalized)  # (B, C, H, W)
        hidden = self.act(hidden)
        hidden = self.conv2(hidden)  # (B, T*C, H, W)
        hidden = self.pool(hidden)  # (B, T*C, 1, 1)
        return hidden.reshape(normalized.shape[0], self.prompt_length, normalized.shape[1])  # (B, T, C)


class TFALayer(nn.Module):
    """One TFA layer (Eq. 1): encoder feature F (B, C, h, w), decoder feature X (B, D, h, w), prompt P (B, T, C).

        f  = softmax_C(theta_f(F)),  i = softmax_C(theta_i(F))         forget and input gates
        P' = f * P + i * tanh(theta_c(F))                             the prompt update
        o  = tanh(Linear(T*C -> C)(P'))                               channel attention from the prompt
        F' = F + conv1x1(o * conv1x1(F))                              psi, the conditioned tuner
        X' = X + conv1x1(concat[X, F'])                               omega, (D + C) -> D
        next prompt = GELU(Linear(C -> C_next)(P'))                   none after the last layer

    Args:
        channels: C, channels of the encoder feature and width of the incoming prompt.
        decoder_channels: D, channels of the decoder feature.
        next_channels: width of the prompt handed to the next layer; None for the last layer.
        prompt_length: T, prompt tokens.
    """

    def __init__(
        self, channels: int, decoder_channels: int, next_channels: int | None, prompt_length: int = 1
    ):
        super().__init__()
        self.channels = channels
        self.prompt_length = prompt_length

        self.forget_gate = PromptProjection(channels, prompt_length)
        self.input_gate = PromptProjection(channels, prompt_length)
        self.content = PromptProjection(channels, prompt_length)
        self.out_gate = nn.Linear(prompt_length * channels, channels)

        self.tuner_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.tuner_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.fuse = nn.Conv2d(decoder_channels + channels, decoder_channels, kernel_size=1)

        self.prompt_out = None if next_channels is None else nn.Linear(channels, next_channels)

    def forward(
        self, sample: torch.Tensor, feature: torch.Tensor, prompt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fuse `feature` into `sample` under `prompt`; returns (new sample, prompt for the next layer or None).

        `prompt` is (N, T, C) or a task's (T, C) prompt, shared by the whole batch. `sample` holds N = K·B
        samples for K prompts over the same B features (`feature` is (B, C, h, w), K stacked prompt-major): the
        parts that do not depend on the prompt (the three projections and the tuner's input conv) run once.
        """
        batch = sample.shape[0]
        if prompt.shape[-2:] != (self.prompt_length, self.channels):
            raise ValueError(
                f"TFALayer expects a prompt of shape (B, {self.prompt_length}, {self.channels}) or "
                f"({self.prompt_length}, {self.channels}); got {tuple(prompt.shape)}"
            )
        if batch % feature.shape[0]:
            raise ValueError(
                f"TFALayer: {batch} decoder samples are not a whole number of copies of {feature.shape[0]} features"
            )
        copies = batch // feature.shape[0]  # K prompts over the same features
        prompt = prompt.expand(batch, -1, -1)  # (N, T, C)

        # The encoder's downsamplers floor odd sizes while the decoder's upsamplers double, so for inputs that
        # are not a multiple of 8 the two can differ by a pixel; the decoder path keeps its own size.
        if feature.shape[-2:] != sample.shape[-2:]:
            feature = F.interpolate(feature, size=sample.shape[-2:], mode="bilinear", align_corners=False)

        # Eq. 1: the LSTM-like prompt update, gates normalised over the channel axis
        # The three projections' norms hold no parameters, so they are one norm, computed once.
        normalized = self.forget_gate.norm(feature)  # (B, C, h, w)
        forget = self.forget_gate.project(normalized).softmax(dim=-1)  # (B, T, C)
        remember = self.input_gate.project(normalized).softmax(dim=-1)  # (B, T, C)
        content = torch.tanh(self.content.project(normalized))  # (B, T, C)
        hidden = self.tuner_in(feature)  # (B, C, h, w)
        if copies > 1:
            forget, remember, content = (x.repeat(copies, 1, 1) for x in (forget, remember, content))
            feature, hidden = (x.repeat(copies, 1, 1, 1) for x in (feature, hidden))  # (N, C, h, w)
        prompt = forget * prompt + remember * content  # (N, T, C)

        attention = torch.tanh(self.out_gate(prompt.flatten(1)))  # (N, C)

        # psi: a tuner on the encoder feature with channel attention from the prompt
        hidden = hidden * attention[:, :, None, None]
        feature = feature + self.tuner_out(hidden)  # (N, C, h, w)

        # omega: fuse into the decoder feature
        sample = sample + self.fuse(torch.cat([sample, feature], dim=1))  # (N, D, h, w)

        next_prompt = None
        if self.prompt_out is not None:
            next_prompt = F.gelu(self.prompt_out(prompt))  # (N, T, C_next)
        return sample, next_prompt


class TFA(nn.Module):
    """The TFA layers, deepest first: layer i runs at the input of the VAE decoder's `up_blocks[i]`.

    Args:
        encoder_channels: channels of the CFRM features it fuses, deepest first (SD: 512, 256, 128). Layer i's
            prompt is `encoder_channels[i]` wide, so the first prompt (the task prompt) is `encoder_channels[0]`.
        decoder_channels: input channels of `up_blocks[0..]` (SD: 512, 512, 512).
        prompt_length: T, prompt tokens.

    The decoder calls `layers[i](sample, feature, prompt)` between its up blocks, threading the returned prompt.
    """

    def __init__(
        self, encoder_channels: Sequence[int], decoder_channels: Sequence[int], prompt_length: int = 1
    ):
        super().__init__()
        if len(encoder_channels) != len(decoder_channels):
            raise ValueError(
                f"TFA needs as many decoder as encoder channels; got encoder_channels={list(encoder_channels)} "
                f"and decoder_channels={list(decoder_channels)}"
            )
        next_channels = [*encoder_channels[1:], None]
        self.layers = nn.ModuleList(
            TFALayer(channels, decoder, following, prompt_length=prompt_length)
            for channels, decoder, following in zip(
                encoder_channels, decoder_channels, next_channels, strict=True
            )
        )


class TaskPrompts(nn.Module):
    """The learnable task prompts, one zero-initialised (T, dim) tensor per task, by name.

    A new task adds only its prompt (T * dim numbers), so earlier tasks' outputs are untouched.
    """

    def __init__(self, dim: int, prompt_length: int = 1):
        super().__init__()
        self.dim = dim
        self.prompt_length = prompt_length
        self.prompts = nn.ParameterDict()

    def add(self, task: str) -> nn.Parameter:
        """Add a zero prompt for `task` (on the device and dtype of the existing prompts) and return it."""
        if task in self.prompts:
            raise ValueError(f"a prompt for task {task!r} already exists; prompts: {self.names()}")
        if not task or "." in task:
            raise ValueError(f"task name {task!r} must be non-empty and contain no '.'")
        existing = next(iter(self.prompts.values()), None)
        factory = {} if existing is None else {"device": existing.device, "dtype": existing.dtype}
        prompt = nn.Parameter(torch.zeros(self.prompt_length, self.dim, **factory))
        self.prompts[task] = prompt
        return prompt

    def names(self) -> list[str]:
        return list(self.prompts.keys())

    def __contains__(self, task: object) -> bool:
        return task in self.prompts

    def forward(self, task: str) -> torch.Tensor:
        """The (T, dim) prompt of `task`."""
        if task not in self.prompts:
            raise KeyError(f"no prompt for task {task!r}; prompts: {self.names()}")
        return self.prompts[task]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, prompt_length={self.prompt_length}"
