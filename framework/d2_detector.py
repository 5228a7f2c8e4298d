"""A detectron2 detector (RetinaNet, Faster R-CNN: the model zoo's YAML-configured ones) as a `Detector`.

Set `downstream_checkpoints.detectron2_config` (a detectron2 YAML config file, or a model-zoo name such as
`COCO-Detection/retinanet_R_50_FPN_3x.yaml`) and `downstream_checkpoints.detectron2_weights` (its local
`model_final_*.pkl` or a `.pth`) and the detection task uses that model instead of torchvision's RetinaNet.
detectron2 is not on PyPI and never required: it is imported here only, when those keys are set.

Weights are read without running pickled code: `.pth` through `torch.load(weights_only=True)` and the
model zoo's `.pkl` through an unpickler that builds numpy arrays and nothing else. A file that leaves any of
the model's weights unset, or sets one with the wrong shape, is refused (detectron2's own loader only logs it).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .downstream import (
    DownstreamError,
    _Frozen,
    _read_state_dict,
    checkpoint_path,
    freeze,
    train_with_frozen_norms,
)

CONFIG_KEY = "detectron2_config"
WEIGHTS_KEY = "detectron2_weights"
INSTALL_HINT = "install it (https://detectron2.readthedocs.io/en/latest/tutorials/install.html)"


class Detectron2Detector(_Frozen):
    """A detectron2 model behind the `Detector` interface (images in [0, 1], boxes in input pixels).

    Each image is resized so that it fits `min_size` on its short side and `max_size` on its long side
    (bilinear, differentiable; the boxes are scaled with it), scaled to 0–255 in the model's `input_format`
    channel order, and given with its own height and width, so detectron2 returns boxes in the input's pixels.

    `losses` runs the model in train mode with every normalisation layer in eval mode, inside an
    `EventStorage` (detectron2's heads log to one), and sums its named terms into the two the task weighs:
    "classification" (every term with `cls` in its name: RetinaNet's `loss_cls`, Faster R-CNN's `loss_cls`
    and `loss_rpn_cls`) and "box" (the others: `loss_box_reg`, `loss_rpn_loc`).
    """

    def __init__(
        self, model: nn.Module, num_classes: int, min_size: int, max_size: int, input_format: str = "BGR"
    ):
        super().__init__()
        if input_format not in ("BGR", "RGB"):
            raise DownstreamError(
                f"detectron2 INPUT.FORMAT {input_format!r} is not supported; use BGR or RGB"
            )
        self.model = model
        self.num_classes = num_classes
        self.min_size, self.max_size = min_size, max_size
        self.input_format = input_format

    def _inputs(
        self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None
    ) -> list[dict[str, Any]]:
        from detectron2.structures import Boxes, Instances

        inputs = []
        for i, image in enumerate(images):  # (3, H, W) in [0, 1], RGB
            height, width = image.shape[-2:]
            scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            pixels = image[None].float() * 255.0
            if size != (height, width):
                pixels = F.interpolate(
                    pixels, size=size, mode="bilinear", antialias=True, align_corners=False
                )
            pixels = pixels[0]  # (3, h, w) in 0-255
            if self.input_format == "BGR":
                pixels = pixels.flip(0)
            item = {"image": pixels, "height": height, "width": width}
            if targets is not None:
                factors = torch.tensor(
                    [size[1] / width, size[0] / height] * 2, device=targets[i]["boxes"].device
                )  # x, y, x, y
                item["instances"] = Instances(
                    size,
                    gt_boxes=Boxes(targets[i]["boxes"].float() * factors),
                    gt_classes=targets[i]["labels"].long(),
                )
            inputs.append(item)
        return inputs

    def losses(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from detectron2.utils.events import EventStorage

        train_with_frozen_norms(self.model)
        try:
            with EventStorage():
                raw = self.model(self._inputs(images, targets))
        finally:
            self.model.eval()
        classification = [value for name, value in raw.items() if "cls" in name]
        box = [value for name, value in raw.items() if "cls" not in name]
        return {"classification": torch.stack(classification).sum(), "box": torch.stack(box).sum()}

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.model.eval()
        outputs = self.model(self._inputs(images))
        return [
            {
                "boxes": output["instances"].pred_boxes.tensor,
                "scores": output["instances"].scores,
                "labels": output["instances"].pred_classes,
            }
            for output in outputs
        ]

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.predict(images)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; any other global is refused."""

    ALLOWED: ClassVar[frozenset] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 2 pickles (the Caffe2-era zoo files) carry raw bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are read")
        return super().find_class(module, name)


def read_weights(path: Path) -> dict[str, Any]:
    """`path` as detectron2's checkpointer wants it: {"model": {name: array or tensor}, ...}."""
    if path.suffix == ".pkl":
        try:
            with path.open("rb") as file:
                data = _ArraysOnly(file, encoding="latin1").load()
        except Exception as error:  # noqa: BLE001 (truncated, corrupt, code in the pickle: the reason is reported)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DownstreamError(f"{path}: not a readable detectron2 .pkl ({reason})") from None
        if not isinstance(data, dict):
            raise DownstreamError(
                f"{path}: holds no weights dict; give a detectron2 model zoo .pkl or a .pth"
            )
        if "model" in data and "__author__" in data:  # detectron2's model zoo: names as the model's
            checkpoint = dict(data)
        else:  # Caffe2 / Detectron1's zoo: names matched and converted as detectron2 does
            blobs = data.get("blobs", data)
            blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
            checkpoint = {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
        if not isinstance(checkpoint["model"], dict):
            raise DownstreamError(f"{path}: its 'model' entry is not a dict of weights")
        checkpoint["model"] = {
            k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in checkpoint["model"].items()
        }
        return checkpoint
    return {"model": _read_state_dict(path), "matching_heuristics": True}  # as detectron2 reads a .pth


def load_detectron2_detector(checkpoints: dict[str, str], image_size: int) -> Detectron2Detector:
    """The detectron2 model of `checkpoints[CONFIG_KEY]` with the weights of `checkpoints[WEIGHTS_KEY]`,
    run at `image_size` as torchvision's RetinaNet is (`min_size = max_size = image_size`)."""
    try:
        from detectron2 import model_zoo
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
    except ImportError:
        raise DownstreamError(
            f"downstream_checkpoints.{CONFIG_KEY} is set but detectron2 is not installed: {INSTALL_HINT}, "
            f"or drop the key to use torchvision's RetinaNet (downstream_checkpoints.retinanet_resnet50_fpn)"
        ) from None
    config = str(checkpoints[CONFIG_KEY])
    if config.endswith(".py"):
        raise DownstreamError(
            f"downstream_checkpoints.{CONFIG_KEY} = {config}: LazyConfig (.py) files are not read; give a YAML "
            "config (the model zoo's COCO-Detection/*.yaml)"
        )
    cfg = get_cfg()
    try:
        file = Path(config).expanduser()
        cfg.merge_from_file(str(file) if file.is_file() else model_zoo.get_config_file(config))
    except RuntimeError:  # model_zoo: no such config
        raise DownstreamError(
            f"downstream_checkpoints.{CONFIG_KEY} = {config}: neither a file nor a detectron2 model-zoo config "
            "(e.g. COCO-Detection/retinanet_R_50_FPN_3x.yaml)"
        ) from None
    except (KeyError, ValueError) as error:  # yacs: an unknown key or a wrong type in the file
        raise DownstreamError(f"{config}: not a detectron2 config ({str(error).splitlines()[0]})") from None
    cfg.MODEL.DEVICE = "cpu"
    weights = checkpoint_path(checkpoints, WEIGHTS_KEY, "detectron2 detector")
    model = build_model(cfg)
    checkpoint = read_weights(weights)  # its own one-line errors
    try:
        incompatible = DetectionCheckpointer(model)._load_model(checkpoint)
    except (ValueError, RuntimeError) as error:  # a non-array value, names that match ambiguously
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DownstreamError(
            f"{weights} does not load into the detectron2 model of {config}: {reason}"
        ) from None
    missing = list(incompatible.missing_keys)
    shapes = [name for name, *_ in incompatible.incorrect_shapes]
    if missing or shapes:
        problem = f"wrong shapes {shapes[:3]}" if shapes else f"missing {missing[:3]}"
        raise DownstreamError(
            f"{weights} does not fit the detectron2 model of {config}: {problem}; give that config's weights"
        )
    heads = cfg.MODEL.RETINANET if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else cfg.MODEL.ROI_HEADS
    num_classes = heads.NUM_CLASSES
    detector = Detectron2Detector(model, int(num_classes), image_size, image_size, cfg.INPUT.FORMAT)
    return freeze(detector)
