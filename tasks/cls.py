"""Classification: restored images must be classified correctly by frozen classifiers (SPEC §6, §8).

Loss: `ce` (default weight 0.1) = cross-entropy of the first classifier (the ResNet) on the restored image,
resized and normalised for it inside its wrapper. Samples without a label (-100) are ignored.
Metric: top-1 accuracy of every classifier, `acc/resnet` (primary) and `acc/vit`.
Models: built-in data → a small timm ResNet and a small timm ViT trained here on clean scenes (cached);
real data → ResNet-50 and ViT-B/16 from `checkpoints.resnet50` and `checkpoints.vit_base_patch16_224`.
Anchored to PIR: stage 2 adds the unweighted L1 between the PIR-prompt output and the clean image.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..framework.data.sample import IGNORE_LABEL
from ..framework.registry import register_task
from .base import Evaluator, FrozenModelsTask

KINDS = ("resnet", "vit")  # the first drives the loss


class ClassificationEvaluator(Evaluator):
    """Top-1 accuracy of each classifier on the restored images."""

    def __init__(self, classifiers: dict[str, nn.Module]) -> None:
        from ..framework.metrics import Accuracy

        self.classifiers = classifiers
        self.accuracy = {kind: Accuracy() for kind in classifiers}

    @torch.no_grad()
    def update(self, images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        labels = batch["label"].to(images.device)
        return {
            f"acc/{kind}": self.accuracy[kind].update(classifier.to(images.device)(images), labels)
            for kind, classifier in self.classifiers.items()
        }  # per image: 1 right, 0 wrong

    def compute(self) -> dict[str, float]:
        return {f"acc/{kind}": accuracy.compute() for kind, accuracy in self.accuracy.items()}


@register_task
class ClassificationTask(FrozenModelsTask):
    name = "cls"
    aliases = ("classification",)
    description = "Image classification by frozen ResNet and ViT classifiers (top-1 accuracy)"
    loss_weights: ClassVar[dict[str, float]] = {"ce": 0.1}
    default_beta = 1.0
    metric_names = tuple(f"acc/{kind}" for kind in KINDS)
    anchor_to_pir = True
    # sample keys the losses and the evaluator read
    sample_keys: ClassVar[tuple[str, ...]] = ("hq", "lq", "label")
    # dataset type used when the data config gives this task none
    builtin_type = "builtin_scenes"
    kinds = KINDS
    real_loader = "load_real_classifier"

    def losses(self, restored: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        labels = batch["label"].to(restored.device)
        logits = self.downstream().to(restored.device)(restored)  # (B, K)
        if bool((labels >= 0).any()):
            ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL)
        else:  # no labelled sample: a zero that keeps the graph
            ce = logits.sum() * 0.0
        return {"loss/cls_ce": self.weights["ce"] * ce}

    def evaluator(self) -> Evaluator:
        return ClassificationEvaluator(self.models())
