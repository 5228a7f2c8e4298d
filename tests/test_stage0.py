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


def _prior_tensors(folder):
    from safetensors.torch import load_file

    return {
        f"{part}.{key}": value
        for part in ("vae", "unet")
        for path in sorted((folder / part).glob("*.safetensors"))
        for key, value in load_file(path).items()
    }


def test_stage0_stopped_twice_and_resumed_trains_the_prior_an_uninterrupted_run_trains(tmp_path, monkeypatch):
    """Ctrl-C in the VAE's steps, then SIGTERM in the UNet's: each time the step in progress finishes and is
    saved in the run's folder (the cached prior stays the untrained one, unmarked), and the twice resumed stage
    0 writes bit for bit the prior of an uninterrupted one, then deletes its progress."""
    import json
    import os
    import signal

    from unirestore.framework.engine.state import MODEL_FILE, STATE_FILE
    from unirestore.framework.engine.trainer import TrainingInterrupted
    from unirestore.framework.prior import tiny_prior_path

    config = Stage0Config(vae_steps=6, unet_steps=4, batch_size=2, checkpoint_every=4)
    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "whole"))
    whole = stage0.train_tiny_prior(config, seed=3, progress=False)
    expected = _prior_tensors(whole.folder)
    scaling = json.loads((whole.folder / "vae" / "config.json").read_text())["scaling_factor"]

    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))
    untrained = _prior_tensors(stage0.ensure_tiny_prior())
    checkpoints, batches = tmp_path / "run" / "stage0", stage0._batches

    def signal_at(number: int, draw: int):
        def batches_then_signal(*args):
            for drawn, batch in enumerate(batches(*args), 1):
                if drawn == draw:
                    os.kill(os.getpid(), number)  # noted now: the step drawing this batch finishes first
                yield batch

        return batches_then_signal

    starts, logged = [], []
    # the third batch of the first call (a VAE step), the fifth of the resumed one: step 3 + 5, the UNet's second
    for number, draw, step in ((signal.SIGINT, 3, 3), (signal.SIGTERM, 5, 8)):
        monkeypatch.setattr(stage0, "_batches", signal_at(number, draw))
        with pytest.raises(TrainingInterrupted) as caught:
            stage0.train_tiny_prior(config, seed=3, progress=False, checkpoints=checkpoints, resume=True,
                                    log=lambda metrics, at: logged.append(at), on_start=starts.append)  # fmt: skip
        assert str(caught.value) == f"stage0 stopped at step {step} of 10" and caught.value.signal == number
        assert torch.load(checkpoints / STATE_FILE, weights_only=True)["step"] == step
        assert logged[-1] == step  # the steps since the last log, logged as the stage stops
        assert not stage0.is_trained(tiny_prior_path())
        assert _prior_tensors(tiny_prior_path()).keys() == untrained.keys()
        assert all(torch.equal(value, untrained[key]) for key, value in _prior_tensors(tiny_prior_path()).items())
        assert signal.getsignal(number) in (signal.default_int_handler, signal.SIG_DFL)  # given back
        # the resumed stage 0's batches are drawn anew, from where the saved step left them
        monkeypatch.setattr(stage0, "_batches", batches)
    assert starts == [0, 3]
    result = stage0.train_tiny_prior(config, seed=3, progress=False, checkpoints=checkpoints, resume=True,
                                     on_start=starts.append)  # fmt: skip
    assert result.trained and starts == [0, 3, 8]
    got = _prior_tensors(result.folder)
    assert got.keys() == expected.keys()
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []
    assert json.loads((result.folder / "vae" / "config.json").read_text())["scaling_factor"] == scaling
    assert not (checkpoints / STATE_FILE).exists() and not (checkpoints / MODEL_FILE).exists()


def test_stage0_progress_saved_under_other_settings_is_refused(tmp_path, monkeypatch):
    """A checkpoint resumes only under the settings it was saved with (stage0.* are not among the run's
    compared settings: a trained prior is reused whatever they say); a cut one or one saved under other
    settings is one line saying how to start anew."""
    import os
    import signal

    from unirestore.framework.checkpoint import CheckpointError
    from unirestore.framework.engine.trainer import TrainingInterrupted

    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))
    checkpoints, batches = tmp_path / "run" / "stage0", stage0._batches

    def batches_then_ctrl_c(*args):
        os.kill(os.getpid(), signal.SIGINT)
        yield from batches(*args)

    monkeypatch.setattr(stage0, "_batches", batches_then_ctrl_c)
    config = Stage0Config(vae_steps=4, unet_steps=0, batch_size=2)
    with pytest.raises(TrainingInterrupted, match="stopped at step 1 of 4"):
        stage0.train_tiny_prior(config, progress=False, checkpoints=checkpoints)
    monkeypatch.setattr(stage0, "_batches", batches)
    state = checkpoints / "last.state.pt"
    saved = state.read_bytes()
    state.write_bytes(saved[: len(saved) // 2])  # cut short (a disk that filled up, a copy stopped half way)
    with pytest.raises(CheckpointError, match=r"stage 0's checkpoint in .* cannot be read \(.*\); delete "):
        stage0.train_tiny_prior(config, progress=False, checkpoints=checkpoints, resume=True)
    state.write_bytes(saved)
    refused = r"other settings \(stage0.lr: 0.002 → 0.001\); resume with those, or delete .*last.state.pt"
    with pytest.raises(CheckpointError, match=refused):
        stage0.train_tiny_prior(Stage0Config(vae_steps=4, unet_steps=0, batch_size=2, lr=1e-3), progress=False,
                                checkpoints=checkpoints, resume=True)  # fmt: skip
    # checkpoint_every and force change nothing that is computed
    result = stage0.train_tiny_prior(Stage0Config(vae_steps=4, unet_steps=0, batch_size=2, checkpoint_every=2),
                                     progress=False, checkpoints=checkpoints, resume=True)  # fmt: skip
    assert result.trained
