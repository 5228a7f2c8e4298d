"""PIR: perceptual image restoration, the human-viewer task. No downstream model: the loss compares the
restored image with the clean one, the metric is PSNR / SSIM on 8-bit-quantised RGB (SPEC §6, §8).

Loss terms: `l1` (default weight 10, the release) and `mse` (default 0; the paper's text). Select MSE with
`loss_weights={"l1": 0, "mse": 10}`; a term of weight 0 is not computed.
Data: built-in = crops of the scikit-image photos (`builtin_photos`), degraded; real = the `pir` entries of
the data config (DIV2K, Flickr2K, OST as `hq_folder`, paired benchmark sets, ...).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..framework.registry import register_task
from .base import Evaluator, Task


class PIREvaluator(Evaluator):
    """Mean per-image PSNR and SSIM of the restored images against `batch["hq"]`."""

    def __init__(self) -> None:
        from ..framework.metrics import ImageQuality

        self.quality = ImageQuality()

    def update(self, images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return self.quality.update(images, batch["hq"].to(images.device))

    def compute(self) -> dict[str, float]:
        return self.quality.compute()


@register_task
class PIRTask(Task):
    name = "pir"
    aliases = ("restoration",)
    description = "Perceptual image restoration for human viewers (PSNR / SSIM)"
    loss_weights: ClassVar[dict[str, float]] = {"l1": 10.0, "mse": 0.0}
    default_beta = 1.0
    metric_names = ("psnr", "ssim")
    anchor_to_pir = False
    # sample keys the losses and the evaluator read
    sample_keys: ClassVar[tuple[str, ...]] = ("hq", "lq")
    # dataset type used when the data config gives this task none
    builtin_type = "builtin_photos"

    def __init__(self, context=None, loss_weights=None):
        super().__init__(context, loss_weights)
        if not any(weight > 0 for weight in self.weights.values()):
            raise ValueError(f"task 'pir' needs a positive weight on l1 or mse, got {self.weights}")

    def losses(self, restored: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        target = batch["hq"].to(restored.device, restored.dtype)
        terms = {}
        if self.weights["l1"]:
            terms["loss/pir_l1"] = self.weights["l1"] * F.l1_loss(restored, target)
        if self.weights["mse"]:
            terms["loss/pir_mse"] = self.weights["mse"] * F.mse_loss(restored, target)
        return terms

    def evaluator(self) -> Evaluator:
        return PIREvaluator()
