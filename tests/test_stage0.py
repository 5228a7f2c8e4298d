"""Stage 0's pieces that decide what the tiny prior learns first: the VAE's reconstruction loss and crops."""

import pytest
import torch
import torch.nn.functional as F

from unirestore.framework.config import ConfigError, RunConfig, Stage0Config, apply_overrides
from unirestore.framework.engine import stage0
from unirestore.framework.engine.stage0 import _reconstruction_loss, _vae_crop


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


def test_vae_crop_side_is_checked_against_the_vae_factor():
    assert _vae_crop(0, 64, 4) == 64  # 0: whole images
    assert _vae_crop(64, 64, 4) == 64
    assert _vae_crop(32, 64, 4) == 32
    for bad in (30, 4):  # not a multiple of the factor; under two latent pixels
        with pytest.raises(ConfigError, match="vae_crop"):
            _vae_crop(bad, 64, 4)
    with pytest.raises(ConfigError, match="vae_crop"):
        apply_overrides(RunConfig(), ["stage0.vae_crop=-8"])


def test_stage0_trains_the_vae_on_crops_and_scales_latents_on_whole_images(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path))
    seen: list[tuple[int, int]] = []
    load = stage0.load_prior

    def spying_load(*args, **kwargs):
        prior = load(*args, **kwargs)
        prior.vae.encoder.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
        return prior

    monkeypatch.setattr(stage0, "load_prior", spying_load)
    config = Stage0Config(vae_steps=2, unet_steps=0, batch_size=2, vae_crop=32)
    result = stage0.train_tiny_prior(config, progress=False)
    assert result.trained
    assert seen[:2] == [(32, 32), (32, 32)]  # the two training steps
    assert seen[2:] and set(seen[2:]) == {(64, 64)}  # the scaling factor: whole images


def test_a_failed_swap_leaves_the_untrained_prior_in_place(tmp_path, monkeypatch):
    """Stage 0 writes the trained prior beside the cached one and swaps it in; if the swap fails half way,
    the cached prior is put back rather than lost."""
    import os

    class Part:
        def to(self, device):
            return self

        def save_pretrained(self, folder):
            os.makedirs(folder)
            (tmp_path / "unused").touch()

    folder = tmp_path / "tiny"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(stage0.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        stage0._write(folder, Part(), Part(), {"steps": 1})
    assert (folder / "model_index.json").read_text() == "{}" and (folder / "scheduler").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "unused"]  # nothing half-written left beside it
