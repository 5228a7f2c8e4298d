"""Retrieval: restored images must embed next to clean images of their class, for a frozen embedding model.

Loss: `metric` (default weight 0.1) = pytorch-metric-learning's `MultiSimilarityLoss` between the
embeddings of the restored images (queries) and of the clean images of the same batch (references), by
class label: every restored image has at least one positive (its own clean image), so the loss is never
vacuous even for a batch of distinct classes. Samples without a label (-100) are left out.
Metric: leave-one-out retrieval among the restored test images by cosine similarity, `recall_at_1`
(primary) and `map_at_r` (pytorch-metric-learning's AccuracyCalculator with a torch k-NN, no faiss); per
image, whether the query's nearest neighbour is of its class.
Models: built-in data → a small timm ResNet embedder (32-d, L2-normalised) trained here on clean scenes
with a multi-similarity loss and miner (cached); real data → the pooled features of ResNet-50 from
`downstream_checkpoints.resnet50` (e.g. CUB retrieval with ImageNet features; the data config's
`class_range` gives CUB's class-disjoint protocol, classes [0, 100] to train and [100, 200] to test).
Anchored to PIR (a choice, as for detection): the metric loss alone does not ask for a natural image.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..framework.registry import register_task
from .base import Evaluator, Task


class RetrievalEvaluator(Evaluator):
    """Embeds every restored image; `compute` runs leave-one-out Recall@1 and MAP@R on the whole set."""

    def __init__(self, embedder: nn.Module) -> None:
        from ..framework.metrics import Retrieval

        self.embedder = embedder
        self.retrieval = Retrieval()

    @torch.no_grad()
    def update(self, images: torch.Tensor, batch: dict) -> None:
        self.retrieval.update(self.embedder.to(images.device)(images), batch["label"])

    def compute(self) -> dict[str, float]:
        return self.retrieval.compute()

    def per_image(self) -> dict[str, torch.Tensor]:
        """Each query's leave-one-out hit (1/0; NaN for a label seen once), for eval_images.csv."""
        return self.retrieval.per_image()


@register_task
class RetrievalTask(Task):
    name = "ret"
    aliases = ("retrieval",)
    description = "Image retrieval with a frozen embedding model (Recall@1, MAP@R)"
    loss_weights: ClassVar[dict[str, float]] = {"metric": 0.1}
    default_beta = 1.0
    metric_names = ("recall_at_1", "map_at_r")
    anchor_to_pir = True
    # sample keys the losses and the evaluator read
    sample_keys: ClassVar[tuple[str, ...]] = ("hq", "lq", "label")
    # dataset type used when the data config gives this task none
    builtin_type = "builtin_scenes"
    # One image alone has no other class to be told apart from: the loss is zero and the prompt never learns.
    min_batch_size = 2

    def __init__(self, context=None, loss_weights=None):
        super().__init__(context, loss_weights)
        self._embedder: nn.Module | None = None
        self._loss = None

    def prepare(self, force: bool = False, steps: int | None = None) -> None:
        """Train and cache the built-in embedder (skipped when cached, unless `force`); with real data,
        check that the checkpoint loads."""
        if not self._builtin():
            self.downstream()
        elif self._train_builtin(force, steps):
            self._embedder = None

    def builtin_specs(self) -> list:
        from ..framework import downstream

        return [downstream.builtin_spec("embedder", self.context.size)] if self._builtin() else []

    def downstream(self) -> nn.Module:
        if self._embedder is None:
            from ..framework import downstream

            context = self.context
            if self._builtin():
                spec = downstream.builtin_spec("embedder", context.size)
                self._embedder = downstream.builtin_model(spec, home=context.home, device=context.device)
            else:
                self._embedder = downstream.load_real_embedder(context.checkpoints).to(context.device)
        return self._embedder

    def losses(self, restored: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        if self._loss is None:
            from pytorch_metric_learning.losses import MultiSimilarityLoss

            self._loss = MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
        embedder = self.downstream().to(restored.device)
        labels = batch["label"].to(restored.device)
        keep = labels >= 0
        embeddings = embedder(restored)  # (B, D)
        if not bool(keep.any()):  # no labelled sample: a zero that keeps the graph
            return {"loss/ret_metric": embeddings.sum() * 0.0}
        with torch.no_grad():
            references = embedder(batch["hq"].to(restored.device, restored.dtype))[keep]  # (B', D)
        loss = self._loss(embeddings[keep], labels[keep], ref_emb=references, ref_labels=labels[keep])
        return {"loss/ret_metric": self.weights["metric"] * loss}

    def evaluator(self) -> Evaluator:
        return RetrievalEvaluator(self.downstream())
