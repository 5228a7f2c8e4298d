"""A stand-in for the parts of detectron2 that `framework/d2_detector.py` calls (detectron2 is not on PyPI).

It keeps detectron2's contracts where the adapter depends on them: a model takes a list of dicts with
"image" (3, h, w) in 0-255 in the config's INPUT.FORMAT, "height"/"width" and, in training, "instances"
with `gt_boxes` / `gt_classes` at the image's size; training returns a dict of named losses and needs an
`EventStorage` (detectron2's heads log to it); inference returns [{"instances": Instances}] rescaled to
height × width (`detector_postprocess`); `DetectionCheckpointer._load_model` returns fvcore's
incompatible-keys record; `model_zoo.get_config_file` raises RuntimeError for an unknown name.

The model itself is a toy: it finds red pixels (a fixed 1×1 conv on the normalised red channel) and
reports their bounding box as one object of class `RED_CLASS`.
"""

from __future__ import annotations

import sys
import types
from collections import namedtuple
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

RED_CLASS = 3
_storage: list = []


class Boxes:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def to(self, device):
        return Boxes(self.tensor.to(device))


class Instances:
    def __init__(self, image_size, **fields):
        self.image_size = tuple(image_size)
        for name, value in fields.items():
            setattr(self, name, value)

    def to(self, device):
        fields = {k: v.to(device) for k, v in vars(self).items() if k != "image_size"}
        return Instances(self.image_size, **fields)


class EventStorage:
    def __enter__(self):
        _storage.append(self)
        self.scalars = {}
        return self

    def __exit__(self, *exc):
        _storage.pop()

    def put_scalar(self, name, value):
        self.scalars[name] = value


def get_event_storage():
    assert _storage, "get_event_storage() has to be called inside a 'with EventStorage(...)' context!"
    return _storage[-1]


class CfgNode(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def merge_from_file(self, path: str) -> None:
        with open(path) as file:
            self._merge(yaml.safe_load(file) or {}, self, "")

    @staticmethod
    def _merge(source: dict, target: CfgNode, prefix: str) -> None:
        for key, value in source.items():
            if key not in target:
                raise KeyError(f"Non-existent config key: {prefix}{key}")
            if isinstance(value, dict):
                CfgNode._merge(value, target[key], f"{prefix}{key}.")
            else:
                target[key] = value


def get_cfg() -> CfgNode:
    return CfgNode(
        MODEL=CfgNode(
            DEVICE="cuda", META_ARCHITECTURE="RetinaNet", PIXEL_MEAN=[103.53, 116.28, 123.675],
            PIXEL_STD=[57.375, 57.12, 58.395],
            RETINANET=CfgNode(NUM_CLASSES=80), ROI_HEADS=CfgNode(NUM_CLASSES=80),
        ),
        INPUT=CfgNode(FORMAT="BGR", MIN_SIZE_TEST=800, MAX_SIZE_TEST=1333),
    )  # fmt: skip


class RedFinder(nn.Module):
    """detectron2's meta-architecture calling convention around a red-pixel detector."""

    def __init__(self, cfg: CfgNode):
        super().__init__()
        self.input_format = cfg.INPUT.FORMAT
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
        self.norm = nn.BatchNorm2d(3)  # identity at its initial statistics; must not move in `losses`
        self.score = nn.Conv2d(3, 1, 1)
        red = 2 if self.input_format == "BGR" else 0
        with torch.no_grad():
            self.score.weight.zero_()
            self.score.weight[0, red] = 8.0  # normalised red ~ +2 on pure red, ~ -2 on black
            self.score.weight[0, 2 - red] = -8.0
            self.score.bias.zero_()

    def _objectness(self, image: torch.Tensor) -> torch.Tensor:  # (3, h, w) 0-255 -> (h, w) in (0, 1)
        normalised = (image.to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std
        return torch.sigmoid(self.score(self.norm(normalised[None])))[0, 0]

    @staticmethod
    def _box(mask: torch.Tensor) -> torch.Tensor:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys) == 0:
            return torch.zeros(0, 4)
        return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]

    def forward(self, batched_inputs: list[dict]):
        maps = [self._objectness(x["image"]) for x in batched_inputs]
        if self.training:
            assert "instances" in batched_inputs[0], "Instance annotations are missing in training!"
            storage = get_event_storage()
            cls_terms, box_terms = [], []
            for x, objectness in zip(batched_inputs, maps, strict=True):
                instances = x["instances"].to(self.pixel_mean.device)
                assert instances.image_size == tuple(objectness.shape), "instances not at the image's size"
                target = torch.zeros_like(objectness)
                for x0, y0, x1, y1 in instances.gt_boxes.tensor.round().long().tolist():
                    target[y0:y1, x0:x1] = 1.0
                cls_terms.append(F.binary_cross_entropy(objectness, target))
                found = self._box(objectness.detach() > 0.5)
                gt = instances.gt_boxes.tensor
                box_terms.append(
                    (found - gt).abs().mean() if len(found) and len(gt) else objectness.sum() * 0
                )
            storage.put_scalar("num_images", len(batched_inputs))
            return {"loss_cls": torch.stack(cls_terms).mean(), "loss_box_reg": torch.stack(box_terms).mean()}
        results = []
        for x, objectness in zip(batched_inputs, maps, strict=True):
            h, w = objectness.shape
            box = self._box(objectness > 0.5)
            box = box * torch.tensor([x["width"] / w, x["height"] / h] * 2)  # detector_postprocess
            instances = Instances(
                (x["height"], x["width"]), pred_boxes=Boxes(box), scores=torch.ones(len(box)),
                pred_classes=torch.full((len(box),), RED_CLASS, dtype=torch.long),
            )  # fmt: skip
            results.append({"instances": instances})
        return results


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys", "incorrect_shapes"])


class DetectionCheckpointer:
    def __init__(self, model):
        self.model = model

    def _load_model(self, checkpoint: dict):
        for name, value in checkpoint["model"].items():  # fvcore's _convert_ndarray_to_tensor
            if not isinstance(value, np.ndarray | torch.Tensor):
                raise ValueError(f"Unsupported type found in checkpoint! {name}: {type(value)}")  # noqa: TRY004 (as fvcore)
        state = {k: torch.as_tensor(v) for k, v in checkpoint["model"].items()}
        own = self.model.state_dict()
        incorrect = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                     if k in own and v.shape != own[k].shape]  # fmt: skip
        for name, *_ in incorrect:
            del state[name]
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        return IncompatibleKeys(list(missing), list(unexpected), incorrect)


ZOO = {}  # model-zoo name -> config file path, set by the tests


def get_config_file(name: str) -> str:
    if name not in ZOO:
        raise RuntimeError(f"{name} not available in Model Zoo!")
    return ZOO[name]


@contextmanager
def installed():
    """`import detectron2...` finds this stand-in inside the block."""
    modules = {
        "detectron2": types.ModuleType("detectron2"),
        "detectron2.structures": types.ModuleType("detectron2.structures"),
        "detectron2.utils": types.ModuleType("detectron2.utils"),
        "detectron2.utils.events": types.ModuleType("detectron2.utils.events"),
        "detectron2.config": types.ModuleType("detectron2.config"),
        "detectron2.modeling": types.ModuleType("detectron2.modeling"),
        "detectron2.checkpoint": types.ModuleType("detectron2.checkpoint"),
        "detectron2.model_zoo": types.ModuleType("detectron2.model_zoo"),
    }
    modules["detectron2.structures"].Boxes = Boxes
    modules["detectron2.structures"].Instances = Instances
    modules["detectron2.utils.events"].EventStorage = EventStorage
    modules["detectron2.utils.events"].get_event_storage = get_event_storage
    modules["detectron2.config"].get_cfg = get_cfg
    modules["detectron2.modeling"].build_model = RedFinder
    modules["detectron2.checkpoint"].DetectionCheckpointer = DetectionCheckpointer
    modules["detectron2.model_zoo"].get_config_file = get_config_file
    root = modules["detectron2"]
    for name in ("structures", "utils", "config", "modeling", "checkpoint", "model_zoo"):
        setattr(root, name, modules[f"detectron2.{name}"])
    modules["detectron2.utils"].events = modules["detectron2.utils.events"]
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield sys.modules[__name__]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
