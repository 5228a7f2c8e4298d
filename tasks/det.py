"""Detection (the paper's extension task): restored images must be detected well by a frozen RetinaNet.

Loss: RetinaNet's own terms on the restored image, `classification` (focal loss) and `box` (box
regression), default weights 0.1 each (the scale of the other downstream tasks' terms). The detector runs
in train mode to return losses, with its weights frozen and every normalisation layer in eval mode.
Ignore regions (a sample's `box_ignore`) are no training targets: COCO crowds, as detectron2's and
torchvision's COCO training leaves them out; RTTS difficult objects, as `skip_difficult` always did
(`skip_difficult: false` makes them ordinary boxes).
Metric: COCO mAP@[.5:.95] (`map`, primary) and mAP@.5 (`map50`) through pycocotools, ignore regions passed as
COCO's crowd annotations (neither to find nor a false positive); per image, its own mAP against its own boxes.
Models: built-in data → a small torchvision RetinaNet (FPN on a small conv body) trained here on clean scenes
(cached); real data → torchvision RetinaNet-ResNet-50-FPN from `checkpoints.retinanet_resnet50_fpn`, or a
detectron2 model (`checkpoints.detectron2_config` and `detectron2_weights`, `framework/d2_detector.py`). With
a COCO detector (torchvision's 91 ids, detectron2's 80 contiguous classes), dataset labels are mapped to its
classes (RTTS by class name, COCO by category id).
Any other detector joins through the `Detector` protocol: `task.use_detector(my_adapter)`.
Anchored to PIR (a choice): a frozen network's loss alone can be satisfied by images a person would not
accept; in stage 3, where only this task's prompt trains, the anchor carries no gradient and may be skipped.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..framework.downstream import Detector
from ..framework.registry import register_task
from .base import Evaluator, Task

__all__ = ["DetectionEvaluator", "DetectionTask", "Detector", "coco_label_map"]

# torchvision's COCO label space (91 indices, 0 = background) for the RTTS class names.
COCO_IDS = {"person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "motorbike": 4, "bus": 6}
COCO_NUM_CLASSES = 91
# The 80 COCO category ids in order: detectron2's COCO models number them 0..79 (contiguous).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def _find_attribute(dataset, name: str):
    """`name` of the first dataset inside `dataset` (through `WeightedConcat.datasets`, `Degraded.dataset`)."""
    stack = [dataset]
    while stack:
        current = stack.pop(0)
        if hasattr(current, name):
            return getattr(current, name)
        stack.extend(getattr(current, "datasets", []))
        if hasattr(current, "dataset"):
            stack.append(current.dataset)
    return None


def coco_label_map(num_classes: int, category_ids, class_names) -> torch.Tensor | None:
    """dataset label → class of a COCO detector with `num_classes` (91: torchvision's COCO ids, 80:
    detectron2's contiguous 0..79), from the dataset's COCO `category_ids` or else its `class_names` (RTTS);
    None where neither names COCO classes (the dataset's own labels are then the detector's)."""
    if category_ids is not None:
        coco_ids = list(category_ids)
    elif class_names is not None and all(name.lower() in COCO_IDS for name in class_names):
        coco_ids = [COCO_IDS[name.lower()] for name in class_names]
    else:
        return None
    if num_classes != COCO_NUM_CLASSES:
        if not all(i in COCO_CATEGORY_IDS for i in coco_ids):
            return None
        coco_ids = [COCO_CATEGORY_IDS.index(i) for i in coco_ids]
    return torch.as_tensor(coco_ids, dtype=torch.long)


class DetectionEvaluator(Evaluator):
    """COCO mAP of the detector's predictions on the restored images (labels mapped back to the dataset's)."""

    def __init__(self, detector: Detector, label_map: torch.Tensor | None) -> None:
        from ..framework.metrics import DetectionMAP

        self.detector = detector
        self.inverse = None
        if label_map is not None:  # detector label -> dataset label, -1 where the dataset has no such class
            self.inverse = torch.full((int(label_map.max()) + 1,), -1, dtype=torch.long)
            self.inverse[label_map] = torch.arange(len(label_map))
        self.map = DetectionMAP()

    @torch.no_grad()
    def update(self, images: torch.Tensor, batch: dict) -> None:
        if isinstance(self.detector, nn.Module):
            self.detector.to(images.device)
        predictions = []
        for prediction in self.detector.predict(images):
            prediction = {k: v.detach().cpu() for k, v in prediction.items()}
            if self.inverse is not None:
                labels = prediction["labels"].long()
                known = labels < len(self.inverse)
                mapped = torch.full_like(labels, -1)
                mapped[known] = self.inverse[labels[known]]
                keep = mapped >= 0
                prediction = {"boxes": prediction["boxes"][keep], "scores": prediction["scores"][keep],
                              "labels": mapped[keep]}  # fmt: skip
            predictions.append(prediction)
        self.map.update(predictions, batch["boxes"], batch["box_labels"], batch.get("box_ignore"))

    def compute(self) -> dict[str, float]:
        return self.map.compute()

    def per_image(self) -> dict[str, torch.Tensor]:
        """Each image's own mAP (NaN without a ground-truth box), for eval_images.csv."""
        return self.map.per_image()


@register_task
class DetectionTask(Task):
    name = "det"
    aliases = ("detection",)
    description = "Object detection by a frozen detector: RetinaNet, or a detectron2 model (COCO mAP)"
    loss_weights: ClassVar[dict[str, float]] = {"classification": 0.1, "box": 0.1}
    default_beta = 1.0
    metric_names = ("map", "map50")
    anchor_to_pir = True
    # sample keys the losses and the evaluator read
    sample_keys: ClassVar[tuple[str, ...]] = ("hq", "lq", "boxes", "box_labels")
    # dataset type used when the data config gives this task none
    builtin_type = "builtin_scenes"

    def __init__(self, context=None, loss_weights=None):
        super().__init__(context, loss_weights)
        self._detector: Detector | None = None
        # dataset label -> detector label (None: the same space); set it with `use_detector` if needed
        self.label_map: torch.Tensor | None = None
        self._label_map_resolved = False

    def use_detector(self, detector: Detector, label_map: torch.Tensor | None = None) -> None:
        """Use `detector` (anything with `losses` / `predict`, e.g. a model of another library) instead of the
        built-in or torchvision one; `label_map[dataset_label]` = detector label (None: same labels)."""
        if not isinstance(detector, Detector):
            raise TypeError(f"{type(detector).__name__} does not implement Detector (losses, predict)")
        self._detector = detector
        self.label_map = None if label_map is None else torch.as_tensor(label_map, dtype=torch.long)
        self._label_map_resolved = True

    def prepare(self, force: bool = False, steps: int | None = None) -> None:
        """Train and cache the built-in RetinaNet (skipped when cached, unless `force`); with real data,
        check that the checkpoint loads."""
        if not self._builtin():
            self.downstream()
        elif self._train_builtin(force, steps):
            self._detector = None

    def builtin_specs(self) -> list:
        from ..framework import downstream

        return [downstream.builtin_spec("retinanet", self.context.size)] if self._builtin() else []

    def downstream(self) -> Detector:
        if self._detector is None:
            from ..framework import downstream

            context = self.context
            if self._builtin():
                spec = downstream.builtin_spec("retinanet", context.size)
                self._detector = downstream.builtin_model(spec, home=context.home, device=context.device)
            else:
                detector = downstream.load_real_detector(context.checkpoints, context.detector_size or context.size)
                self._detector = detector.to(context.device)
        return self._detector

    def _labels(self) -> torch.Tensor | None:
        """The dataset → detector label map, resolved once (identity for built-in data)."""
        if not self._label_map_resolved:
            self._label_map_resolved = True
            detector = self.downstream()
            head = getattr(
                getattr(getattr(detector, "network", None), "head", None), "classification_head", None
            )
            num_classes = getattr(detector, "num_classes", getattr(head, "num_classes", None))
            if not self._builtin() and num_classes in (COCO_NUM_CLASSES, len(COCO_CATEGORY_IDS)):
                dataset = self.dataset("test")
                category_ids = _find_attribute(dataset, "category_ids")
                names = _find_attribute(dataset, "class_names")
                self.label_map = coco_label_map(num_classes, category_ids, names)
        return self.label_map

    def losses(self, restored: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        label_map = self._labels()
        ignore = batch.get("box_ignore")
        if ignore is None:  # a batch made without the flags: every box is an object
            ignore = [torch.zeros(len(labels), dtype=torch.bool) for labels in batch["box_labels"]]
        targets = []
        for boxes, labels, ignored in zip(batch["boxes"], batch["box_labels"], ignore, strict=True):
            keep = ~ignored.bool().to(boxes.device)  # ignore regions are no targets (module docstring)
            boxes, labels = boxes[keep], labels.long()[keep.to(labels.device)]
            labels = labels if label_map is None else label_map[labels.cpu()]
            targets.append({"boxes": boxes.to(restored.device).float(), "labels": labels.to(restored.device)})
        detector = self.downstream()
        if isinstance(detector, nn.Module):
            detector.to(restored.device)
        raw = detector.losses(restored, targets)
        return {f"loss/det_{term}": self.weights[term] * raw[term] for term in self.loss_weights}

    def evaluator(self) -> Evaluator:
        return DetectionEvaluator(self.downstream(), self._labels())
