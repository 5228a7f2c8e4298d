"""The device paths on a CUDA GPU (skipped where there is none): `python -m pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unirestore.framework.cli import _cast, app
from unirestore.framework.config import ModelConfig
from unirestore.framework.model import UniRestore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _restore(model: UniRestore, images: torch.Tensor, noise: torch.Tensor, device: str) -> torch.Tensor:
    model = model.to(device)
    with torch.no_grad():
        return model.forward_padded(images.to(device), "pir", noise=noise.to(device)).float().cpu()


def test_restore_on_the_gpu_matches_the_cpu_and_half_precision_is_close(tiny_prior):
    torch.manual_seed(0)
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"])
    images = torch.rand(2, 3, 64, 64)
    factor = 2 ** (len(tiny_prior.vae.config.block_out_channels) - 1)
    noise = torch.randn(2, tiny_prior.vae.config.latent_channels, 64 // factor, 64 // factor)
    on_cpu = _restore(model, images, noise, "cpu")
    on_gpu = _restore(model, images, noise, "cuda")
    assert (on_gpu - on_cpu).abs().max() < 1e-2  # cuDNN convolutions may use TF32
    for precision in ("bf16", "fp16"):
        half = copy.deepcopy(model).to("cuda")
        _cast(half, precision)  # as `restore --precision` does
        restored = _restore(half, images, noise, "cuda")
        assert torch.isfinite(restored).all() and (restored - on_cpu).abs().mean() < 0.02, precision


def test_train_eval_and_restore_on_the_gpu(tmp_path, monkeypatch):
    """The README's commands with --device cuda at a few steps: every stage runs and writes its files."""
    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNIRESTORE_DOWNSTREAM_STEPS", "3")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny = ["--set", "stage0.vae_steps=2", "--set", "stage0.unet_steps=2", "--set", "train.val_samples=2",
            "--set", "train.device=cuda", "--set", "train.precision=bf16"]  # fmt: skip
    result = runner.invoke(app, ["train", "--tasks", "pir,cls", "--steps", "2", "--batch-size", "2",
                                 "--output", "run", "--tracking-uri", uri, *tiny])  # fmt: skip
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "run" / "stage2.safetensors"
    assert checkpoint.is_file()
    result = runner.invoke(app, ["eval", "--ckpt", str(checkpoint), "--tasks", "pir,cls", "--samples", "2",
                                 "--device", "cuda", "--precision", "bf16", "--out", "eval", "--tracking-uri", uri])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "eval.csv").is_file()
    # beside a GPU the test images are read in worker processes by default: the same table as in this one
    result = runner.invoke(app, ["eval", "--ckpt", str(checkpoint), "--tasks", "pir,cls", "--samples", "2",
                                 "--device", "cuda", "--precision", "bf16", "--out", "eval-0", "--workers", "0",
                                 "--tracking-uri", uri])  # fmt: skip
    assert result.exit_code == 0, result.output
    import csv

    tables = [{(r["task"], r["input"], r["metric"]): float(r["value"])
               for r in csv.DictReader((folder / "eval.csv").read_text().splitlines())}
              for folder in (tmp_path / "eval", tmp_path / "eval-0")]  # fmt: skip
    assert tables[0].keys() == tables[1].keys()
    assert all(abs(tables[0][key] - tables[1][key]) <= 1e-4 * max(1.0, abs(tables[0][key])) for key in tables[0])
    (tmp_path / "photos").mkdir()
    pixels = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photos" / "a.png")
    result = runner.invoke(app, ["restore", "photos", "--ckpt", str(checkpoint), "--task", "pir,cls",
                                 "--device", "cuda", "--precision", "fp16", "--out", "restored"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "restored" / "cls" / "a.png").size == (56, 40)
