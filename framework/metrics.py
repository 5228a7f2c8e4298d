"""Evaluation metrics of SPEC §8, as plain functions and as accumulators the task evaluators feed.

- PIR: PSNR and SSIM on RGB in [0, 1] after quantising the prediction (and the target) to 8 bits; SSIM as
  Wang et al.'s reference implementation (Gaussian window 11, σ 1.5, the 5-pixel border not averaged).
  PSNR of identical images is capped at `PSNR_CAP_DB` (100 dB, i.e. the MSE is clamped at 1e-10)
  instead of +inf, so that means over a set stay finite.
- Classification: top-1 accuracy. Segmentation: mIoU (torchmetrics `MulticlassJaccardIndex`, ignore 255,
  macro average over the classes present in the target or the prediction, from the accumulated confusion).
- Detection: COCO mAP@[.5:.95] through pycocotools, computed in memory (no JSON files); ignore regions (COCO
  crowds, VOC difficult objects) are COCO's `iscrowd` annotations there.
- Retrieval: Recall@1 and MAP@R through pytorch-metric-learning's `AccuracyCalculator`, with a cosine
  k-NN written in torch (no faiss).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.functional.classification import multiclass_jaccard_index
from torchmetrics.functional.image import structural_similarity_index_measure

from .data.sample import IGNORE_INDEX

# PSNR of identical images: 10·log10(1 / 1e-10). Any real restoration is far below this.
PSNR_CAP_DB = 100.0
_MSE_FLOOR = 10.0 ** (-PSNR_CAP_DB / 10.0)
# SSIM's Gaussian window (11 pixels, σ 1.5) reaches this far from its centre: the border not averaged.
_SSIM_BORDER = 5


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round images in [0, 1] to the 256 levels an 8-bit file would hold (values stay in [0, 1])."""
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).round() / 255.0


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, 1], both quantised to 8 bits first.

    The MSE is clamped at 1e-10, so identical images give `PSNR_CAP_DB` (100 dB), never +inf.
    """
    prediction, target = quantize_8bit(prediction), quantize_8bit(target)
    mse = (prediction - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(1.0 / mse.clamp(min=_MSE_FLOOR))


def ssim(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [0, 1] (8-bit quantised; Gaussian window 11, σ 1.5).

    As Wang et al.'s reference implementation (and scikit-image with `gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False`) computes it: the mean of the SSIM map over the positions where the whole
    window lies inside the image, so the `_SSIM_BORDER` (5) pixels next to each edge are not averaged
    (recent torchmetrics averages its reflect-padded map there too, which weighs a restoration's border
    artefacts far more than the reference does). An image with a side of 10 pixels or less has no such
    position: its whole map is averaged; one with a side of 5 or less gets a uniform window of 2 · side − 1
    (1 pixel: the luminance term alone).
    """
    prediction, target = quantize_8bit(prediction), quantize_8bit(target)
    side = min(prediction.shape[-2:])
    small = {} if side > 5 else {"gaussian_kernel": False, "kernel_size": 2 * side - 1}
    _, full = structural_similarity_index_measure(
        prediction, target, data_range=1.0, reduction="none", return_full_image=True, **small
    )  # (B, C, H, W)
    if side > 2 * _SSIM_BORDER:
        full = full[..., _SSIM_BORDER:-_SSIM_BORDER, _SSIM_BORDER:-_SSIM_BORDER]
    return full.flatten(1).mean(dim=1)


def accuracy(logits_or_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: (B, K) logits or (B,) predicted labels against (B,) labels; labels < 0 are ignored."""
    predicted = logits_or_labels.argmax(dim=1) if logits_or_labels.ndim == 2 else logits_or_labels
    valid = labels >= 0
    if not bool(valid.any()):
        return 0.0
    return float((predicted[valid] == labels[valid]).float().mean())


# --------------------------------------------------------------------------------------------------
# Accumulators: `update(...)` per batch, `compute()` once.


class ImageQuality:
    """Mean per-image PSNR and SSIM over everything seen."""

    def __init__(self) -> None:
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.count = 0

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add a batch; returns its per-image values, {"psnr": (B,), "ssim": (B,)}."""
        values = {"psnr": psnr(prediction, target), "ssim": ssim(prediction, target)}
        self.psnr_sum += float(values["psnr"].sum())
        self.ssim_sum += float(values["ssim"].sum())
        self.count += prediction.shape[0]
        return values

    def compute(self) -> dict[str, float]:
        count = max(self.count, 1)
        return {"psnr": self.psnr_sum / count, "ssim": self.ssim_sum / count}


class Accuracy:
    """Top-1 accuracy over everything seen (labels < 0 ignored)."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, logits_or_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns (B,) 1.0 where the prediction is right, 0.0 where wrong, NaN where ignored."""
        predicted = logits_or_labels.argmax(dim=1) if logits_or_labels.ndim == 2 else logits_or_labels
        labels = labels.to(predicted.device)
        valid = labels >= 0
        correct = predicted == labels
        self.correct += int(correct[valid].sum())
        self.total += int(valid.sum())
        return torch.where(valid, correct.float(), torch.full_like(correct, float("nan"), dtype=torch.float))

    def compute(self) -> float:
        return self.correct / self.total if self.total else 0.0


class MeanIoU:
    """mIoU from the confusion matrix accumulated over all pixels (ignore index 255)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        # Evaluation runs in one process (rank 0 of a distributed run): a sync would wait for the others forever.
        self.metric = MulticlassJaccardIndex(
            num_classes=num_classes, ignore_index=ignore_index, average="macro", sync_on_compute=False
        )

    def update(self, logits_or_labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`logits_or_labels`: (B, K, H, W) logits or (B, H, W) predicted classes; `target` (B, H, W).

        Returns each image's own mIoU (B,): over the classes in that image's target or prediction. The set's
        mIoU pools the confusion of all pixels first, so it is not the mean of these.
        """
        predicted = logits_or_labels.argmax(dim=1) if logits_or_labels.ndim == 4 else logits_or_labels
        predicted, target = predicted.detach().cpu(), target.detach().cpu()
        self.metric.update(predicted, target)
        return torch.stack([
            multiclass_jaccard_index(one, truth, self.metric.num_classes, average="macro",
                                     ignore_index=self.metric.ignore_index)
            for one, truth in zip(predicted, target, strict=True)
        ]).float()  # fmt: skip

    def compute(self) -> float:
        return float(self.metric.compute())


def mean_iou(logits_or_labels: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """mIoU of one set of predictions (see `MeanIoU`)."""
    metric = MeanIoU(num_classes)
    metric.update(logits_or_labels, target)
    return metric.compute()


# --------------------------------------------------------------------------------------------------
# Detection: COCO mAP in memory.


def coco_map(predictions: Sequence[dict], targets: Sequence[dict]) -> dict[str, float]:
    """COCO mAP@[.5:.95] (`map`) and mAP@.5 (`map50`) through pycocotools, without files.

    predictions: per image, {"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,)}.
    targets: per image, {"boxes": (M, 4) xyxy, "labels": (M,)} and optionally "ignore" (M,) bool (the `boxes`
    / `box_labels` / `box_ignore` of a sample). An ignored box (a COCO crowd region, a VOC difficult object)
    goes to COCOeval as `iscrowd=1`, as in COCO's own ground truth: it is not a box to find (no miss when no
    detection covers it), and a detection matched to it is neither a true nor a false positive. No predicted
    box at all gives 0.0; so does a set without any box to find (pycocotools says -1: undefined, reported as 0
    so that the number stays a plain score).

    COCOeval's ignore is COCO's crowd rule, which differs from the VOC devkit's for difficult objects: (1) the
    overlap with an ignored box is the intersection over the detection's own area, not over the union, so it
    is never lower than the IoU: a detection lying inside a large ignored box is ignored where VOC (IoU > 0.5)
    counts a false positive; (2) a detection is matched to a box to find whenever one reaches the threshold,
    and to an ignored box only otherwise, while VOC takes the best-overlapping box of all, so there a
    detection overlapping a difficult object more than an ordinary one is ignored and leaves the ordinary one
    to be found. Both let any number of detections fall on one ignored box. (The AP itself is COCO's
    101-point interpolation at every threshold, not VOC's 11-point or all-point one.)
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images")
    images, annotations, results, categories = [], [], [], set()
    for image_id, (prediction, target) in enumerate(zip(predictions, targets)):
        images.append({"id": image_id})
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float64).reshape(-1, 4).tolist()
        labels = torch.as_tensor(target.get("labels", target.get("box_labels"))).reshape(-1).tolist()
        ignore = _ignore_flags(target, len(labels))
        for box, label, crowd in zip(boxes, labels, ignore, strict=True):
            width, height = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,  # pycocotools treats id 0 as "no match"
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], width, height],
                    "area": width * height,
                    "iscrowd": int(crowd),
                }
            )
            categories.add(int(label))
        boxes = torch.as_tensor(prediction["boxes"], dtype=torch.float64).reshape(-1, 4).tolist()
        scores = torch.as_tensor(prediction["scores"]).reshape(-1).tolist()
        labels = torch.as_tensor(prediction["labels"]).reshape(-1).tolist()
        for box, score, label in zip(boxes, scores, labels):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": float(score),
                }
            )
            categories.add(int(label))
    if not results or not annotations:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c} for c in sorted(categories)],
        }
        ground_truth.createIndex()
        detections = ground_truth.loadRes(results)
        evaluation = COCOeval(ground_truth, detections, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(float(s), 0.0) for s in evaluation.stats[:2]]
    return {"map": stats[0], "map50": stats[1]}


def _ignore_flags(target: dict, count: int) -> list[bool]:
    """A target's per-box ignore flags ("ignore" or "box_ignore"; none given: no box ignored)."""
    flags = target.get("ignore", target.get("box_ignore"))
    if flags is None:
        return [False] * count
    flags = torch.as_tensor(flags, dtype=torch.bool).reshape(-1).tolist()
    if len(flags) != count:
        raise ValueError(f"{len(flags)} ignore flags for {count} boxes")
    return flags


class DetectionMAP:
    """Collects per-image predictions and targets; `compute()` runs `coco_map` once."""

    def __init__(self) -> None:
        self.predictions: list[dict] = []
        self.targets: list[dict] = []

    def update(
        self,
        predictions: Sequence[dict],
        boxes: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        ignore: Sequence[torch.Tensor] | None = None,
    ):
        """One batch: per image its predictions, its boxes, their labels and (optionally) their ignore flags
        (a sample's `box_ignore`; None: no box ignored)."""
        if ignore is None:
            ignore = [torch.zeros(len(label), dtype=torch.bool) for label in labels]
        for prediction, box, label, flags in zip(predictions, boxes, labels, ignore, strict=True):
            self.predictions.append({k: v.detach().cpu() for k, v in prediction.items()})
            self.targets.append(
                {
                    "boxes": box.detach().cpu(),
                    "labels": label.detach().cpu(),
                    "ignore": flags.detach().cpu().bool(),
                }
            )

    def compute(self) -> dict[str, float]:
        return coco_map(self.predictions, self.targets)

    def per_image(self) -> dict[str, torch.Tensor]:
        """Each image's own mAP and mAP@.5 (its predictions against its boxes alone); NaN for an image
        without a ground-truth box to find (undefined there; ignored boxes are none)."""
        values = {"map": [], "map50": []}
        for prediction, target in zip(self.predictions, self.targets, strict=True):
            alone = coco_map([prediction], [target]) if not target["ignore"].all() else None
            for name, column in values.items():
                column.append(float("nan") if alone is None else alone[name])
        return {name: torch.tensor(column, dtype=torch.float32) for name, column in values.items()}


# --------------------------------------------------------------------------------------------------
# Retrieval.


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Recall@1 and MAP@R of leave-one-out retrieval among (N, D) embeddings by cosine similarity.

    Every embedding is a query against all the others (pytorch-metric-learning's `ref_includes_query`).
    Recall@1 is the fraction whose nearest neighbour shares its label (PML's `precision_at_1`). Queries
    whose label occurs once (no possible match) are left out by PML; none left → 0.0.
    """
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    embeddings = embeddings.detach().float().cpu()
    labels = labels.detach().cpu().reshape(-1)
    if embeddings.shape[0] < 2 or bool((torch.unique(labels, return_counts=True)[1] < 2).all()):
        return {"recall_at_1": 0.0, "map_at_r": 0.0}  # no query has a possible match
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        knn_func=CustomKNN(CosineSimilarity()),
        device=torch.device("cpu"),
    )
    result = calculator.get_accuracy(embeddings, labels, embeddings, labels, ref_includes_query=True)
    clean = {k: (0.0 if v is None or math.isnan(float(v)) else float(v)) for k, v in result.items()}
    return {"recall_at_1": clean["precision_at_1"], "map_at_r": clean["mean_average_precision_at_r"]}


def retrieval_hits(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) 1.0 where a query's nearest other embedding (cosine) shares its label, else 0.0; NaN for a query
    whose label occurs once (no possible match, left out of Recall@1). Their mean over the others is
    `retrieval_metrics`' Recall@1."""
    embeddings = F.normalize(embeddings.detach().float().cpu(), dim=1)
    labels = labels.detach().cpu().reshape(-1)
    hits = torch.full((len(labels),), float("nan"))
    if len(labels) < 2:
        return hits
    similarity = embeddings @ embeddings.T  # (N, N)
    similarity.fill_diagonal_(float("-inf"))  # leave-one-out
    hits = (labels[similarity.argmax(dim=1)] == labels).float()
    _, label_index, label_counts = torch.unique(labels, return_inverse=True, return_counts=True)
    hits[label_counts[label_index] < 2] = float("nan")  # no other image of its class
    return hits


class Retrieval:
    """Collects embeddings and labels; `compute()` gives Recall@1 and MAP@R over the whole set, `per_image()`
    each query's hit (NaN for unlabelled images and labels seen once)."""

    def __init__(self) -> None:
        self.embeddings: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []  # per update: which images had a label

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        keep = (labels >= 0).cpu()
        self.kept.append(keep)
        self.embeddings.append(embeddings.detach().float().cpu()[keep])
        self.labels.append(labels.detach().cpu()[keep])

    def compute(self) -> dict[str, float]:
        if not self.embeddings:
            return {"recall_at_1": 0.0, "map_at_r": 0.0}
        return retrieval_metrics(torch.cat(self.embeddings), torch.cat(self.labels))

    def per_image(self) -> dict[str, torch.Tensor]:
        if not self.kept:
            return {}
        kept = torch.cat(self.kept)
        hits = torch.full((len(kept),), float("nan"))
        hits[kept] = retrieval_hits(torch.cat(self.embeddings), torch.cat(self.labels))
        return {"recall_at_1": hits}
