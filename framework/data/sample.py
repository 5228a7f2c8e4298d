"""The one sample format every dataset yields, the crop that keeps its parts aligned, and `collate`.

A sample is a dict with every key present (a dataset without some target fills in "nothing here"):

    hq          (3, H, W) float32 in [0, 1]  the clean image
    lq          (3, H, W) float32 in [0, 1]  the degraded image (paired sets and `Degraded` add it)
    corruption  str                           how `lq` was made ("gaussian_noise", "clean", "rain", ...)
    severity    int                           1..5 for synthesised ones, 0 for real degraded data
    label       () int64                      class / identity; IGNORE_LABEL (-100) when the set has none
    mask        (H, W) int64                  per-pixel class; IGNORE_INDEX (255) where unlabelled
    boxes       (N, 4) float32                xyxy in pixels of `hq`
    box_labels  (N,) int64                    class of each box
    box_ignore  (N,) bool                     True for an ignore region (a COCO crowd, a VOC difficult object)
    path        str                           where it came from (file, or "builtin:...")

A task plugin's dataset may add keys of its own. One holding a tensor of the image's size (..., H, W), such
as a depth map, is cropped and resized with the image (bilinearly when floating point, nearest when integer);
any other value is kept as it is. `collate` stacks the tensors and keeps `boxes`, `box_labels`, `box_ignore`,
`path` and `corruption` as lists.

An ignore region (`box_ignore` True) is a box the official evaluations neither ask to be found nor count a
detection on as a false positive: COCO's `iscrowd` annotations, VOC's (and RTTS') `difficult` objects. The
detection mAP passes it to pycocotools as `iscrowd=1`; the detection loss leaves it out of the detector's targets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .io import DataError

IGNORE_INDEX = 255  # `mask` value of unlabelled pixels
IGNORE_LABEL = -100  # `label` of a sample without a class (torch's CrossEntropyLoss ignore_index default)
LIST_KEYS = ("boxes", "box_labels", "box_ignore", "path", "corruption")  # kept as lists by `collate`
# keys `fit_to_size` handles by name; another key holding a (..., H, W) tensor is a plugin's dense target
_KNOWN_KEYS = frozenset(
    ("hq", "lq", "mask", "boxes", "box_labels", "box_ignore", "label", "path", "corruption", "severity")
)

Sample = dict[str, Any]


def make_sample(
    hq: torch.Tensor,
    *,
    lq: torch.Tensor | None = None,
    corruption: str | None = None,
    severity: int | None = None,
    label: int | None = None,
    mask: torch.Tensor | np.ndarray | None = None,
    boxes: torch.Tensor | np.ndarray | None = None,
    box_labels: torch.Tensor | np.ndarray | None = None,
    box_ignore: torch.Tensor | np.ndarray | None = None,
    path: str = "",
) -> Sample:
    """A sample dict with the missing targets filled by their "nothing here" values (`box_ignore`: all False).

    `lq`, `corruption` and `severity` are only set when `lq` is given (`Degraded` adds them otherwise).
    """
    height, width = hq.shape[-2:]
    sample: Sample = {"hq": hq.float()}
    if lq is not None:
        sample["lq"] = lq.float()
        sample["corruption"] = corruption or "unknown"
        sample["severity"] = int(severity or 0)
    sample["label"] = torch.tensor(IGNORE_LABEL if label is None else int(label), dtype=torch.int64)
    if mask is None:
        sample["mask"] = torch.full((height, width), IGNORE_INDEX, dtype=torch.int64)
    else:
        sample["mask"] = torch.as_tensor(mask, dtype=torch.int64)
    sample["boxes"] = torch.as_tensor(
        boxes if boxes is not None else np.zeros((0, 4)), dtype=torch.float32
    ).reshape(-1, 4)
    sample["box_labels"] = torch.as_tensor(
        box_labels if box_labels is not None else np.zeros((0,)), dtype=torch.int64
    ).reshape(-1)
    sample["box_ignore"] = torch.as_tensor(
        box_ignore if box_ignore is not None else np.zeros(len(sample["boxes"])), dtype=torch.bool
    ).reshape(-1)
    if len(sample["box_ignore"]) != len(sample["boxes"]):
        raise ValueError(f"{len(sample['box_ignore'])} box_ignore flags for {len(sample['boxes'])} boxes")
    sample["path"] = path
    return sample


def _resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    out = F.interpolate(
        image[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0].clamp_(0.0, 1.0)


def _resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # nearest keeps class ids (and 255) intact
    return F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0].long()


def _resize_map(value: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A plugin's dense target (..., H, W) resized: bilinearly if floating point, nearest if integer."""
    flat = value.reshape(1, -1, *value.shape[-2:])  # (1, C, H, W)
    if value.is_floating_point():
        out = F.interpolate(flat, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    else:
        out = F.interpolate(flat.float(), size=(height, width), mode="nearest-exact").to(value.dtype)
    return out.reshape(*value.shape[:-2], height, width)


def fit_to_size(sample: Sample, size: int | None, train: bool, rng: np.random.Generator) -> Sample:
    """Crop `hq` (and `lq`, `mask`, `boxes`, and a plugin's (..., H, W) tensors) to `size` x `size`, the same
    window for all of them.

    train: upscale only when the short side is under `size`, then a random `size` window (native resolution).
    otherwise: resize the short side to `size`, then the centre window. `size` None leaves the sample as is.
    Boxes are shifted, clipped to the window and dropped (with their labels and ignore flags) when narrower or
    lower than one pixel.
    """
    if size is None:
        return sample
    hq = sample["hq"]
    height, width = hq.shape[-2:]
    short = min(height, width)
    scale = max(1.0, size / short) if train else size / short
    out = dict(sample)
    boxes = sample["boxes"]
    dense = [
        key for key, value in sample.items()
        if key not in _KNOWN_KEYS and isinstance(value, torch.Tensor) and value.ndim >= 2
        and tuple(value.shape[-2:]) == (height, width)
    ]  # fmt: skip
    if scale != 1.0:
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        out["hq"] = _resize_image(hq, new_h, new_w)
        if "lq" in sample:
            out["lq"] = _resize_image(sample["lq"], new_h, new_w)
        out["mask"] = _resize_mask(sample["mask"], new_h, new_w)
        for key in dense:
            out[key] = _resize_map(sample[key], new_h, new_w)
        boxes = boxes * torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
        height, width = new_h, new_w
    if train:
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - size + 1))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    window = (slice(None), slice(top, top + size), slice(left, left + size))
    out["hq"] = out["hq"][window].contiguous()
    if "lq" in out:
        out["lq"] = out["lq"][window].contiguous()
    out["mask"] = out["mask"][window[1:]].contiguous()
    for key in dense:
        out[key] = out[key][..., top : top + size, left : left + size].contiguous()
    if len(boxes):
        boxes = (boxes - torch.tensor([left, top, left, top], dtype=torch.float32)).clamp(0.0, float(size))
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1.0) & ((boxes[:, 3] - boxes[:, 1]) >= 1.0)
        out["boxes"] = boxes[keep]
        out["box_labels"] = sample["box_labels"][keep]
        if "box_ignore" in sample:
            out["box_ignore"] = sample["box_ignore"][keep]
    return out


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Batch samples: tensors stacked, ints made a tensor, `LIST_KEYS` (and other values) kept as lists."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = list(samples[0])
    for sample in samples[1:]:
        if set(sample) != set(keys):
            raise DataError(
                f"samples of one batch have different keys ({sorted(keys)} vs {sorted(sample)}); "
                "batch datasets of one kind together (wrap HQ-only sets in Degraded)"
            )
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if key in LIST_KEYS:
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(value.shape) for value in values}
            if len(shapes) > 1:
                raise DataError(
                    f"cannot stack {key!r} of shapes {sorted(shapes)} ({values[0].ndim}-d); "
                    "set a crop size in the data config or use batch size 1"
                )
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool | int | float):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
