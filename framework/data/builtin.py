"""Built-in data that needs no download: the demo's and the tests' datasets.

`BuiltinPhotos`: random crops of the RGB photos that ship inside scikit-image (restoration); on the train
split, half the samples are dead-leaves images instead (`dead_leaves`), coloured and textured from the split's
photos: six photos are too few to learn restoration from, and the dead-leaves model (occluding shapes with
power-law sizes) has the edge and scale statistics of natural images in endless variety.
`BuiltinScenes`: procedurally drawn scenes at any resolution: a photo crop as background (contrast
lowered so objects stand out) and 1 to `max_objects` objects of `NUM_CLASSES` shape classes, each with
its own shape and its own colour or texture. One scene carries all targets at once:

- `label`: the class of the largest object (one object is always drawn much larger than the others);
- `mask`: 0 = background, 1..K = object class + 1 (so `NUM_SEG_CLASSES` = K + 1); objects never overlap;
- `boxes` / `box_labels`: the tight box (xyxy, pixel edges) of every object's pixels, labels 0..K-1.
  `coco_annotations(sample)` gives the same boxes in COCO form.

Splits are fixed and disjoint twice over: each split draws its photos from its own set (train: astronaut,
coffee, rocket, hubble_deep_field, immunohistochemistry, colorwheel; val: chelsea, retina; test: the two
views of stereo_motorcycle), and from its own random stream: sample `index` of split `split` is a pure
function of (seed, split, index), in any process.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from .sample import Sample, make_sample

CLASS_NAMES: tuple[str, ...] = ("disk", "square", "triangle", "ring", "cross", "star", "hexagon", "diamond")
NUM_CLASSES = len(CLASS_NAMES)
NUM_SEG_CLASSES = NUM_CLASSES + 1  # mask 0 is the background

# scikit-image photos that load offline (others download and fail here); "_right" is the right stereo view.
PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field",
    "immunohistochemistry", "colorwheel", "stereo_motorcycle", "stereo_motorcycle_right",
)  # fmt: skip
SPLIT_PHOTOS: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel"),
    "val": ("chelsea", "retina"),
    "test": ("stereo_motorcycle", "stereo_motorcycle_right"),
}
SPLITS = tuple(SPLIT_PHOTOS)
_STREAM = {"scenes": 1, "photos": 2}  # keeps the two datasets' random streams apart
# Share of BuiltinPhotos' train samples that are dead-leaves images (val and test: photos only).
TRAIN_LEAVES_SHARE = 0.5


@cache
def load_photo(name: str) -> np.ndarray:
    """A scikit-image photo as (H, W, 3) uint8 (cached per process)."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"unknown built-in photo {name!r}; known: {', '.join(PHOTOS)}")
    if name.startswith("stereo_motorcycle"):
        left, right, _disparity = skimage.data.stereo_motorcycle()
        photo = right if name.endswith("_right") else left
    else:
        photo = getattr(skimage.data, name)()
    photo = np.ascontiguousarray(photo[:, :, :3], dtype=np.uint8)
    photo.setflags(write=False)
    return photo


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop resized to (size, size, 3) uint8, randomly mirrored.

    The window side is uniform in [min(size, short), min(short, 2 size)]: at native resolution or shrunk
    (sharp), upscaled only when the photo is smaller than `size`.
    """
    height, width = photo.shape[:2]
    short = min(height, width)
    side = int(rng.integers(min(size, short), min(short, 2 * size) + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = photo[top : top + side, left : left + side]
    if side != size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


# --------------------------------------------------------------------------------------------------
# Dead leaves


@cache
def _palette(photos: tuple[str, ...]) -> np.ndarray:
    """(N, 3) float32 colours in [0, 1]: the same number of pixels drawn evenly from each photo."""
    rng = np.random.default_rng(0)
    colours = []
    for name in photos:
        pixels = load_photo(name).reshape(-1, 3)
        colours.append(pixels[rng.choice(len(pixels), 4096, replace=False)])
    return np.concatenate(colours).astype(np.float32) / 255.0


def dead_leaves(
    size: int, rng: np.random.Generator, photos: tuple[str, ...], min_radius: float = 2.0, alpha: float = 3.0
) -> np.ndarray:
    """A (size, size, 3) uint8 dead-leaves image: 2 × size shapes stacked on a plain background.

    Radii follow p(r) ∝ r^-alpha on [min_radius, size / 2] (alpha = 3: scale invariance), shapes are disks,
    ellipses or rectangles at random angles, each with a colour drawn from `photos` and a random linear
    shading; 30 % of the larger ones are filled with a crop of one of `photos` and 20 % with a grating. A
    Gaussian blur of random width (0 to 1 px) stands for the optics.
    """
    colours = _palette(photos)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = colours[rng.integers(len(colours))]
    count, max_radius, power = 2 * size, size / 2, 1.0 - alpha
    radii = (min_radius**power + rng.random(count) * (max_radius**power - min_radius**power)) ** (1 / power)
    centres = rng.uniform(-max_radius / 2, size + max_radius / 2, (count, 2))
    for radius, (cy, cx) in zip(radii, centres):
        y0, y1 = max(0, math.floor(cy - radius)), min(size, math.ceil(cy + radius) + 1)
        x0, x1 = max(0, math.floor(cx - radius)), min(size, math.ceil(cx + radius) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        kind = int(rng.integers(3))
        if kind == 0:  # disk
            mask = dy * dy + dx * dx <= radius * radius
        else:
            angle = rng.uniform(0, math.pi)
            u = math.cos(angle) * dx + math.sin(angle) * dy
            v = math.cos(angle) * dy - math.sin(angle) * dx
            if kind == 1:  # ellipse
                mask = u * u + (v / rng.uniform(0.3, 1.0)) ** 2 <= radius * radius
            else:  # rectangle
                mask = (np.abs(u) <= 0.8 * radius) & (np.abs(v) <= radius * rng.uniform(0.3, 0.8))
        if not mask.any():
            continue
        gradient = rng.normal(0.0, 0.15, 2) / max(radius, 1.0)
        fill = colours[rng.integers(len(colours))] * (1 + gradient[0] * dy + gradient[1] * dx)[..., None]
        if radius > 5 and rng.random() < 0.3:  # photo texture
            side = max(y1 - y0, x1 - x0)
            name = photos[int(rng.integers(len(photos)))]
            fill = random_crop(load_photo(name), side, rng)[: y1 - y0, : x1 - x0].astype(np.float32) / 255.0
        elif radius > 3 and rng.random() < 0.2:  # grating
            frequency, angle = rng.uniform(0.3, 1.5), rng.uniform(0, math.pi)
            fill = fill * (1 + 0.25 * np.sin(frequency * (math.cos(angle) * xx + math.sin(angle) * yy)))[..., None]
        region = canvas[y0:y1, x0:x1]
        region[mask] = fill[mask]
    image = Image.fromarray((np.clip(canvas, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))
    sigma = rng.uniform(0.0, 1.0)
    if sigma > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(sigma))
    return np.asarray(image)


class BuiltinPhotos(Dataset):
    """Random `size` x `size` crops of the split's scikit-image photos (restoration data, HQ only), and on
    the train split dead-leaves images made from those photos.

    Args:
        split: "train", "val" or "test" (disjoint photos, see the module docstring).
        size: output side in pixels.
        length: samples per epoch (the data is generated: any index works).
        seed: base seed; sample `index` depends on (seed, split, index) only.
        photos: override the split's photo list (names from `PHOTOS`).
        leaves: share of samples that are `dead_leaves` images; default `TRAIN_LEAVES_SHARE` on the train
            split, 0 on val and test (the evaluation is on photos).
    """

    reads_split = True  # each split its own photos and random stream
    sample_keys = ("hq",)  # see FileDataset.sample_keys

    def __init__(
        self,
        split: str = "train",
        size: int = 128,
        length: int = 1000,
        seed: int = 0,
        photos: tuple[str, ...] | None = None,
        leaves: float | None = None,
    ):
        _check_split(split)
        if size < 16:
            raise ValueError(f"size must be at least 16, got {size}")
        self.leaves = (TRAIN_LEAVES_SHARE if split == "train" else 0.0) if leaves is None else float(leaves)
        if not 0.0 <= self.leaves <= 1.0:
            raise ValueError(f"leaves must be a share in [0, 1], got {leaves}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.photos = tuple(photos) if photos else SPLIT_PHOTOS[split]
        for name in self.photos:
            if name not in PHOTOS:
                raise ValueError(f"unknown built-in photo {name!r}; known: {', '.join(PHOTOS)}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, _STREAM["photos"], SPLITS.index(self.split), index])
        if self.leaves and rng.random() < self.leaves:
            image, path = dead_leaves(self.size, rng, self.photos), f"builtin:leaves/{self.split}/{index}"
        else:
            name = self.photos[int(rng.integers(len(self.photos)))]
            image = random_crop(load_photo(name), self.size, rng)
            path = f"builtin:photos/{self.split}/{index}/{name}"
        hq = torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255.0
        return make_sample(hq, path=path)


# --------------------------------------------------------------------------------------------------
# Scenes


# Unit-radius outlines (x right, y down); every shape fits in the unit circle, so circles never overlapping
# means shapes never overlapping. "disk" and "ring" are drawn analytically.
def _regular(count: int, start: float, radius: float = 1.0) -> np.ndarray:
    angles = np.deg2rad(start + 360.0 * np.arange(count) / count)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, -90.0), _regular(5, -54.0, 0.45)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


_ARM = 0.3  # half-width of the cross's arms
_OUTLINES: dict[str, np.ndarray] = {
    "square": _regular(4, 45.0),
    "triangle": _regular(3, -90.0),
    "cross": np.array(
        [
            (_ARM, -1),
            (_ARM, -_ARM),
            (1, -_ARM),
            (1, _ARM),
            (_ARM, _ARM),
            (_ARM, 1),
            (-_ARM, 1),
            (-_ARM, _ARM),
            (-1, _ARM),
            (-1, -_ARM),
            (-_ARM, -_ARM),
            (-_ARM, -1),
        ],
        dtype=np.float64,
    ),
    "star": _star(),
    "hexagon": _regular(6, 0.0),
    "diamond": np.array([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)], dtype=np.float64),
}
_RING_INNER = 0.55  # inner radius of "ring" as a fraction of the outer

# (first colour, second colour or None for solid, texture) per class, RGB 0..255
_LOOKS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int] | None, str]] = {
    "disk": ((220, 40, 40), None, "solid"),
    "square": ((40, 80, 225), None, "solid"),
    "triangle": ((40, 185, 60), None, "solid"),
    "ring": ((245, 210, 40), None, "solid"),
    "cross": ((215, 50, 205), None, "solid"),
    "star": ((40, 210, 225), None, "solid"),
    "hexagon": ((245, 140, 30), (70, 35, 10), "stripes"),
    "diamond": ((125, 60, 205), (240, 240, 240), "checker"),
}


def _shape_mask(
    name: str, radius: float, angle: float, cy: float, cx: float, size: int
) -> tuple[np.ndarray, int, int]:
    """A boolean mask of one object over its bounding square, and the square's top-left (row, col)."""
    top, left = max(0, math.floor(cy - radius) - 1), max(0, math.floor(cx - radius) - 1)
    bottom, right = min(size, math.ceil(cy + radius) + 2), min(size, math.ceil(cx + radius) + 2)
    rows = np.arange(top, bottom, dtype=np.float64)[:, None] + 0.5 - cy  # pixel centres
    cols = np.arange(left, right, dtype=np.float64)[None, :] + 0.5 - cx
    if name in ("disk", "ring"):
        distance2 = rows**2 + cols**2
        mask = distance2 <= radius**2
        if name == "ring":
            mask &= distance2 >= (_RING_INNER * radius) ** 2
        return mask, top, left
    from skimage.draw import polygon

    cos, sin = math.cos(angle), math.sin(angle)
    outline = _OUTLINES[name] * radius
    xs = outline[:, 0] * cos - outline[:, 1] * sin + cx - left - 0.5
    ys = outline[:, 0] * sin + outline[:, 1] * cos + cy - top - 0.5
    mask = np.zeros((bottom - top, right - left), dtype=bool)
    rr, cc = polygon(ys, xs, shape=mask.shape)
    mask[rr, cc] = True
    return mask, top, left


def _paint(
    canvas: np.ndarray,
    name: str,
    mask: np.ndarray,
    top: int,
    left: int,
    radius: float,
    angle: float,
    rng: np.random.Generator,
) -> None:
    """Fill the object's pixels on the (H, W, 3) float canvas with its class's colour or texture."""
    first, second, texture = _LOOKS[name]
    gain, shift = rng.uniform(0.85, 1.1), rng.uniform(-15.0, 15.0, 3)
    colour_a = np.clip(np.asarray(first) * gain + shift, 0, 255)
    rr, cc = np.nonzero(mask)
    if texture == "solid":
        canvas[rr + top, cc + left] = colour_a
        return
    colour_b = np.clip(np.asarray(second) * gain + shift, 0, 255)
    period = max(2.0, radius / 2.5)
    u = (rr * math.cos(angle) + cc * math.sin(angle)) / period
    if texture == "stripes":
        pick = (np.floor(u) % 2).astype(bool)
    else:  # checker
        v = (-rr * math.sin(angle) + cc * math.cos(angle)) / period
        pick = ((np.floor(u) + np.floor(v)) % 2).astype(bool)
    canvas[rr + top, cc + left] = np.where(pick[:, None], colour_b, colour_a)


class BuiltinScenes(Dataset):
    """Procedural scenes with a class label, a segmentation mask and boxes (see the module docstring).

    Args:
        split: "train", "val" or "test".
        size: output side in pixels (at least 32).
        length: samples per epoch (the data is generated: any index works).
        seed: base seed; sample `index` depends on (seed, split, index) only.
        max_objects: at most this many objects per scene (one large, the others small).
    """

    class_names = CLASS_NAMES

    reads_split = True  # each split its own photos and random stream
    sample_keys = ("hq", "label", "mask", "boxes", "box_labels")  # see FileDataset.sample_keys

    def __init__(
        self, split: str = "train", size: int = 128, length: int = 1000, seed: int = 0, max_objects: int = 4
    ):
        _check_split(split)
        if size < 32:
            raise ValueError(f"size must be at least 32, got {size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {max_objects}")
        self.split, self.size, self.length, self.seed, self.max_objects = (
            split,
            size,
            length,
            seed,
            max_objects,
        )
        self.photos = SPLIT_PHOTOS[split]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        size = self.size
        rng = np.random.default_rng([self.seed, _STREAM["scenes"], SPLITS.index(self.split), index])
        photo = self.photos[int(rng.integers(len(self.photos)))]
        background = random_crop(load_photo(photo), size, rng).astype(np.float32)
        canvas = background * 0.6 + 0.2 * 255.0  # lower contrast: the objects stand out
        mask = np.zeros((size, size), dtype=np.int64)

        # one large object, then small ones placed where their circles touch nothing
        placed: list[tuple[int, float, float, float]] = []  # (class, radius, cy, cx)
        radius = size * rng.uniform(0.2, 0.3)
        placed.append((int(rng.integers(NUM_CLASSES)), radius, *rng.uniform(radius, size - radius, 2)))
        for _ in range(int(rng.integers(0, self.max_objects))):
            cls, radius = int(rng.integers(NUM_CLASSES)), max(3.0, size * rng.uniform(0.05, 0.09))
            for _try in range(20):
                cy, cx = rng.uniform(radius, size - radius, 2)
                if all(math.hypot(cy - y, cx - x) > radius + r + 2.0 for _c, r, y, x in placed):
                    placed.append((cls, radius, cy, cx))
                    break

        boxes, box_labels, areas = [], [], []
        for cls, radius, cy, cx in placed:
            name = CLASS_NAMES[cls]
            angle = rng.uniform(0.0, 2.0 * math.pi)
            shape, top, left = _shape_mask(name, radius, angle, cy, cx, size)
            if not shape.any():
                continue
            _paint(canvas, name, shape, top, left, radius, angle, rng)
            mask[top : top + shape.shape[0], left : left + shape.shape[1]][shape] = cls + 1
            rows, cols = np.nonzero(shape)
            boxes.append((left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1))
            box_labels.append(cls)
            areas.append(int(shape.sum()))

        image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)  # 8-bit, like a file on disk
        hq = torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255.0
        return make_sample(
            hq,
            label=box_labels[int(np.argmax(areas))],
            mask=torch.from_numpy(mask),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            box_labels=np.asarray(box_labels, dtype=np.int64),
            path=f"builtin:scenes/{self.split}/{index}",
        )


def coco_annotations(sample: Sample, image_id: int = 0) -> list[dict]:
    """A sample's boxes as COCO annotation dicts (bbox [x, y, w, h], category_id = label + 1, area, iscrowd:
    1 for an ignore region, none in the built-in scenes)."""
    annotations = []
    boxes, labels = sample["boxes"].tolist(), sample["box_labels"].tolist()
    ignore = sample.get("box_ignore", torch.zeros(len(boxes), dtype=torch.bool)).tolist()
    for box, label, crowd in zip(boxes, labels, ignore, strict=True):
        x1, y1, x2, y2 = box
        annotations.append(
            {
                "image_id": image_id,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "category_id": int(label) + 1,
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(crowd),
            }
        )
    return annotations
