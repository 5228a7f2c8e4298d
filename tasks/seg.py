"""Segmentation: restored images must be segmented correctly by frozen segmenters (SPEC §6, §8).

Loss: `ce` (default weight 0.1) = per-pixel cross-entropy of the first segmenter (the DeepLabV3) on the
restored image, ignore index 255.
Metric: mIoU of every segmenter, `miou/deeplab` (primary) and `miou/fcn`.
Models: built-in data → a small torchvision DeepLabV3 (ASPP head) and a small torchvision FCN, trained here
on clean scenes (cached; 9 classes, 0 = background); real data → DeepLabV3-ResNet-50 and FCN-ResNet-50 from
`checkpoints.deeplabv3_resnet50` and `checkpoints.fcn_resnet50` (e.g. trained on Cityscapes' 19 classes).
Anchored to PIR: stage 2 adds the unweighted L1 between the PIR-prompt output and the clean image.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..framework.data.sample import IGNORE_INDEX
from ..framework.registry import register_task
from .base import Evaluator, FrozenModelsTask

KINDS = ("deeplab", "fcn")  # the first drives the loss


class SegmentationEvaluator(Evaluator):
    """mIoU of each segmenter on the restored images (ignore index 255)."""

    def __init__(self, segmenters: dict[str, nn.Module], num_classes: int) -> None:
        from ..framework.metrics import MeanIoU

        self.segmenters = segmenters
        self.miou = {kind: MeanIoU(num_classes) for kind in segmenters}

    @torch.no_grad()
    def update(self, images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        mask = batch["mask"].to(images.device)
        return {
            f"miou/{kind}": self.miou[kind].update(segmenter.to(images.device)(images), mask)
            for kind, segmenter in self.segmenters.items()
        }  # per image: that image's own mIoU

    def compute(self) -> dict[str, float]:
        return {f"miou/{kind}": miou.compute() for kind, miou in self.miou.items()}


@register_task
class SegmentationTask(FrozenModelsTask):
    name = "seg"
    aliases = ("segmentation",)
    description = "Semantic segmentation by frozen DeepLabV3 and FCN segmenters (mIoU)"
    loss_weights: ClassVar[dict[str, float]] = {"ce": 0.1}
    default_beta = 1.0
    metric_names = tuple(f"miou/{kind}" for kind in KINDS)
    anchor_to_pir = True
    # sample keys the losses and the evaluator read
    sample_keys: ClassVar[tuple[str, ...]] = ("hq", "lq", "mask")
    # dataset type used when the data config gives this task none
    builtin_type = "builtin_scenes"
    kinds = KINDS
    real_loader = "load_real_segmenter"

    def num_classes(self) -> int:
        """Classes the segmenters predict (the mIoU's class count): read from the loss segmenter."""
        from ..framework.data.builtin import NUM_SEG_CLASSES

        if self._builtin():
            return NUM_SEG_CLASSES
        network = self.downstream().network
        return network.classifier[-1].out_channels

    def losses(self, restored: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        mask = batch["mask"].to(restored.device)
        logits = self.downstream().to(restored.device)(restored)  # (B, K, H, W)
        if bool((mask != IGNORE_INDEX).any()):
            ce = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX)
        else:  # no labelled pixel: a zero that keeps the graph
            ce = logits.sum() * 0.0
        return {"loss/seg_ce": self.weights["ce"] * ce}

    def evaluator(self) -> Evaluator:
        return SegmentationEvaluator(self.models(), self.num_classes())
