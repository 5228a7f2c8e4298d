"""Stage 0's pieces that decide what the tiny prior learns first: the VAE's reconstruction loss."""

import pytest
import torch
import torch.nn.functional as F

from unirestore.framework.config import ConfigError, RunConfig, apply_overrides
from unirestore.framework.engine.stage0 import _reconstruction_loss


def test_chroma_weight_zero_is_plain_rgb_l1():
    a, b = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(_reconstruction_loss(a, b, 0.0), F.l1_loss(a, b))


def test_chroma_weight_scales_colour_errors_only():
    clean = torch.zeros(1, 3, 8, 8)
    grey = clean + 0.2  # a luma error: the same shift on R, G and B has no chroma
    red = clean.clone()
    red[:, 0] += 0.2  # a colour error
    for weight in (1.0, 4.0):
        assert _reconstruction_loss(grey, clean, weight) == pytest.approx(0.2, abs=1e-6)
    chroma = 0.2 * (0.168736 + 0.5)  # |Cb| + |Cr| of a pure red error of 0.2
    extra = _reconstruction_loss(red, clean, 4.0) - _reconstruction_loss(red, clean, 1.0)
    assert extra == pytest.approx(3 * chroma, abs=1e-6)


def test_negative_chroma_weight_is_refused():
    with pytest.raises(ConfigError, match="chroma_weight"):
        apply_overrides(RunConfig(), ["stage0.chroma_weight=-1"])
