"""Real datasets read from local paths, each in the layout it has on disk, all yielding the common sample.

| class             | layout under `root`                                                            | gives      |
|-------------------|--------------------------------------------------------------------------------|------------|
| `HQFolder`        | image files, recursively (DIV2K, Flickr2K, OST, CUB images, noise test sets)  | hq         |
| `PairedFolder`    | `.../<lq_dir>/x.png` <-> `.../<hq_dir>/x.png` (Rain100L, UHDSnow, noise sets)  | hq, lq     |
| `GoPro`           | `<seq>/blur/*.png` <-> `<seq>/sharp/*.png`                                     | hq, lq     |
| `RESIDE`          | `hazy/0001_0.8_0.2.jpg` -> `clear/0001.png` (several hazy per clear)           | hq, lq     |
| `ImageFolder`     | `<class>/**/*.jpg`, classes = sorted sub-folders (ImageNet, CUB)                | hq, label  |
| `Cityscapes`      | `leftImg8bit/<split>/<city>/*_leftImg8bit.png` + `gtFine/...` label ids        | hq, mask   |
| `FoggyCityscapes` | `leftImg8bit_foggy/<split>/<city>/*_foggy_beta_<b>.png` + `gtFine/...`         | hq, lq, mask |
| `ACDC`            | `rgb_anon/<cond>/<split>/<seq>/*_rgb_anon.png` + `gt/..._gt_labelTrainIds.png` | hq, lq, mask |
| `COCODetection`   | `<split><year>/` images + `annotations/instances_<split><year>.json`          | hq, boxes  |
| `RTTS`            | `JPEGImages/`, `Annotations/*.xml` (VOC), optional `ImageSets/Main/<split>.txt` | hq, lq, boxes |

Sets without a clean counterpart of a real degraded image (ACDC, RTTS, FoggyCityscapes without
`leftImg8bit/`) give `hq` = `lq`. HQ-only sets get their `lq` from `compose.Degraded`.

Common behaviour (`FileDataset`): files are listed at construction, decoded lazily. An image that cannot
be decoded is warned about once and replaced by the next readable sample (so a batch stays whole); a
dataset with no readable image, a missing label file or a label map of the wrong size is a `DataError`
naming the file. Indices past `len()` wrap around with fresh crop randomness (`WeightedConcat` uses this
for repeats). Crops follow `sample.fit_to_size`: random in the "train" split, centred otherwise.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import (
    IMAGE_EXTENSIONS,
    DataError,
    UnreadableImage,
    check_same_size,
    list_images,
    load_label_map,
    load_rgb,
    report_bad_file,
)
from .sample import IGNORE_INDEX, Sample, fit_to_size, make_sample

# The 19 Cityscapes evaluation classes, in train-id order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
# Cityscapes label id -> train id (ids not listed map to 255).
_CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.int64)
for _id, _train_id in _CITYSCAPES_TRAIN_IDS.items():
    CITYSCAPES_ID_TO_TRAIN_ID[_id] = _train_id
FOGGY_BETAS = (0.005, 0.01, 0.02)  # the Fog1..3 subsets, light to dense
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
RTTS_CLASSES: tuple[str, ...] = ("person", "bicycle", "car", "motorbike", "bus")
SPLITS = ("train", "val", "test")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: folder not found; expected {what}")
    return path


def _train_ids(label_ids: np.ndarray) -> np.ndarray:
    return CITYSCAPES_ID_TO_TRAIN_ID[np.clip(label_ids, 0, 255)]


def _clean_train_ids(train_ids: np.ndarray) -> np.ndarray:
    return np.where((train_ids >= 0) & (train_ids < len(CITYSCAPES_CLASSES)), train_ids, IGNORE_INDEX)


class FileDataset(Dataset):
    """Base of the adapters: `records` listed at construction, samples loaded lazily by `load(i)`.

    Subclasses set `self.records` in `index()` and implement `load(i) -> Sample` (full-size), raising
    `UnreadableImage` for an image that cannot be decoded (that sample is then skipped) and `DataError`
    for anything that must stop the run (a missing label file, a mask of the wrong size).
    """

    # True where the class reads different files for each split (Cityscapes' leftImg8bit/<split>); False where
    # `root` is the whole set whatever the split (a folder of images), so one entry serving both training and
    # the test split would score the training images.
    reads_split: ClassVar[bool] = False
    # The sample keys this class fills with real values (the "gives" column above); a data config refuses an
    # entry of this type under a task that reads a key it lacks. None: not declared, so not checked.
    sample_keys: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, root: str | Path, split: str = "train", size: int | None = 256, seed: int = 0):
        if split not in SPLITS:
            raise DataError(f"{root}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.root = Path(root)
        self.split, self.size, self.seed = split, size, seed
        self.epoch = 0
        self._bad: dict[int, UnreadableImage] = {}  # record -> why it cannot be read
        self.records: list = []
        self.index()
        if not self.records:
            raise DataError(
                f"{self.root}: no samples found for {type(self).__name__} (images: "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); check the path and the layout"
            )
        self._probe()

    def index(self) -> None:
        raise NotImplementedError

    def load(self, i: int) -> Sample:
        raise NotImplementedError

    def _probe(self) -> None:
        """Decode samples in order until one works: a folder of only bad files fails here, not mid-training."""
        first_error: UnreadableImage | None = None
        for i in range(len(self.records)):
            try:
                self.load(i)
                return
            except UnreadableImage as error:
                report_bad_file(error)
                self._bad[i] = error
                first_error = first_error or error
        raise DataError(
            f"{self.root}: none of the {len(self.records)} image file(s) can be read "
            f"(e.g. {first_error}); check that the folder holds valid images"
        )

    def set_epoch(self, epoch: int) -> None:
        """Make random crops differ from epoch to epoch (call before creating the DataLoader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        count = len(self.records)
        for step in range(count):
            i = (index + step) % count
            if i in self._bad:
                if self.split != "train":
                    raise self._bad[i]
                continue
            try:
                sample = self.load(i)
            except UnreadableImage as error:
                report_bad_file(error)
                self._bad[i] = error
                if self.split != "train":
                    raise  # a held-out image is skipped, not replaced by the next one (scored twice)
                continue
            rng = np.random.default_rng([self.seed, self.epoch, index])
            return fit_to_size(sample, self.size, self.split == "train", rng)
        raise DataError(
            f"{self.root}: no readable image left (all {count} failed to decode); check the folder"
        )


# --------------------------------------------------------------------------------------------------
# Restoration


class HQFolder(FileDataset):
    """Clean images under `root`, recursively (DIV2K, Flickr2K, OST, ...); wrap in `Degraded` for `lq`."""

    sample_keys = ("hq",)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | None = 256,
        seed: int = 0,
        recursive: bool = True,
    ):
        self.recursive = recursive
        super().__init__(root, split, size, seed)

    def index(self) -> None:
        self.records = list_images(self.root, self.recursive)

    def load(self, i: int) -> Sample:
        path = self.records[i]
        return make_sample(load_rgb(path), path=str(path))


class PairedFolder(FileDataset):
    """Degraded / clean pairs: every image under a folder named `lq_dir` pairs with the image of the same
    name under the sibling folder `hq_dir` (at any depth: `input/x.png` <-> `target/x.png`, or GoPro's
    `<seq>/blur/x.png` <-> `<seq>/sharp/x.png`).

    Args:
        lq_dir, hq_dir: the folder names of the degraded and clean images.
        match: "stem" (same file name, any extension) or "prefix" (the clean stem is the degraded stem up to
            the first `separator`: RESIDE's `0001_0.8_0.2.jpg` -> `0001.png`).
        lq_prefix, hq_prefix: name prefixes dropped before matching (Rain100L's `rain-001` / `norain-001`).
        corruption: the `corruption` value of the samples (e.g. "rain").
    Images of different sizes: a clean image larger on both sides is centre-cropped, else the degraded one
    is resized to the clean one. A degraded image without a clean partner is a `DataError`.
    """

    sample_keys = ("hq", "lq")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | None = 256,
        seed: int = 0,
        lq_dir: str = "input",
        hq_dir: str = "target",
        match: str = "stem",
        separator: str = "_",
        lq_prefix: str = "",
        hq_prefix: str = "",
        corruption: str = "paired",
    ):
        if match not in ("stem", "prefix"):
            raise DataError(f"{root}: match must be 'stem' or 'prefix', got {match!r}")
        self.lq_dir, self.hq_dir, self.match, self.separator = lq_dir, hq_dir, match, separator
        self.lq_prefix, self.hq_prefix, self.corruption = lq_prefix, hq_prefix, corruption
        super().__init__(root, split, size, seed)

    def _key(self, stem: str, prefix: str, degraded: bool) -> str:
        if prefix and stem.startswith(prefix):
            stem = stem[len(prefix) :]
        if degraded and self.match == "prefix":
            stem = stem.split(self.separator, 1)[0]
        return stem

    def index(self) -> None:
        files = list_images(self.root)
        clean: dict[tuple[tuple[str, ...], str], Path] = {}
        degraded: list[tuple[Path, tuple[str, ...], str]] = []
        for path in files:
            parts = path.relative_to(self.root).parts[:-1]
            if self.hq_dir in parts:
                at = len(parts) - 1 - parts[::-1].index(self.hq_dir)
                folder = parts[:at] + ("*",) + parts[at + 1 :]
                clean.setdefault((folder, self._key(path.stem, self.hq_prefix, False)), path)
            elif self.lq_dir in parts:
                at = len(parts) - 1 - parts[::-1].index(self.lq_dir)
                folder = parts[:at] + ("*",) + parts[at + 1 :]
                degraded.append((path, folder, self._key(path.stem, self.lq_prefix, True)))
        if not degraded:
            found = sorted(
                {p.relative_to(self.root).parts[0] for p in files if len(p.relative_to(self.root).parts) > 1}
            )
            raise DataError(
                f"{self.root}: no images under a folder named {self.lq_dir!r} (top-level folders: "
                f"{', '.join(found) or 'none'}); set lq_dir / hq_dir to this dataset's folder names"
            )
        for path, folder, key in degraded:
            partner = clean.get((folder, key))
            if partner is None:
                where = Path(self.root, *[self.hq_dir if part == "*" else part for part in folder])
                raise DataError(
                    f"{path}: no clean partner named {self.hq_prefix}{key}.* in {where}; "
                    "add it, delete the degraded image, or check hq_dir / match / the prefixes"
                )
            self.records.append((path, partner))

    def load(self, i: int) -> Sample:
        lq_path, hq_path = self.records[i]
        lq, hq = load_rgb(lq_path), load_rgb(hq_path)
        if lq.shape != hq.shape:
            (lh, lw), (hh, hw) = lq.shape[-2:], hq.shape[-2:]
            if hh >= lh and hw >= lw:  # a border around the clean image (RESIDE indoor): centre-crop it
                top, left = (hh - lh) // 2, (hw - lw) // 2
                hq = hq[:, top : top + lh, left : left + lw]
            else:
                lq = torch.nn.functional.interpolate(lq[None], size=(hh, hw), mode="bicubic", antialias=True)[
                    0
                ]
                lq = lq.clamp(0, 1)
        return make_sample(hq, lq=lq, corruption=self.corruption, severity=0, path=str(lq_path))


class GoPro(PairedFolder):
    """GoPro deblurring: `<seq>/blur/*.png` <-> `<seq>/sharp/*.png` (point `root` at `train/` or `test/`)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | None = 256,
        seed: int = 0,
        lq_dir: str = "blur",
        hq_dir: str = "sharp",
        corruption: str = "motion_real",
    ):
        super().__init__(root, split, size, seed, lq_dir=lq_dir, hq_dir=hq_dir, corruption=corruption)


class RESIDE(PairedFolder):
    """RESIDE dehazing: `hazy/<id>_<A>_<beta>.<ext>` -> `clear/<id>.<ext>` (SOTS: set `hq_dir: gt`)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | None = 256,
        seed: int = 0,
        lq_dir: str = "hazy",
        hq_dir: str = "clear",
        corruption: str = "haze_real",
    ):
        super().__init__(
            root, split, size, seed, lq_dir=lq_dir, hq_dir=hq_dir, match="prefix", corruption=corruption
        )


# --------------------------------------------------------------------------------------------------
# Classification


@lru_cache(maxsize=1)
def _imagenet_indices() -> dict[str, int]:
    """ImageNet-1k synset -> class index, in the order every ImageNet classifier uses (timm's table)."""
    from timm.data import ImageNetInfo

    return {name: index for index, name in enumerate(ImageNetInfo().label_names())}


class ImageFolder(FileDataset):
    """Class = sub-folder of `root` (sorted names, label = position), images found recursively in each.

    Sub-folders named by ImageNet-1k synsets (n01440764, ...) get their ImageNet-1k index as the label, so that
    a subset of ImageNet (ImageNet-100, ten classes for a quick run) is scored right by a 1000-way classifier;
    for the full set the two numberings are the same.

    `class_range: [first, last]` keeps the classes at sorted positions first..last-1 (labels stay the positions
    in the whole folder): CUB's retrieval protocol trains on classes [0, 100] and tests on [100, 200].

    `labels: FILE` reads a flat folder instead, ImageNet's validation set as distributed: a CSV file (Kaggle's
    LOC_val_solution.csv) whose rows name an image (its file name, with or without the extension) and its
    class, the first word of the second column (a synset such as n01751748, a class index, or a name). Classes
    are then numbered as folders would be; an image without a row stops the run, rows without an image (a
    subset of the folder) are left out; a first row that names no image is a header.
    """

    sample_keys = ("hq", "label")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | None = 256,
        seed: int = 0,
        class_range: list[int] | None = None,
        labels: str | Path | None = None,
    ):
        self.class_range = class_range
        self.labels = labels
        super().__init__(root, split, size, seed)

    def index(self) -> None:
        if self.labels is not None:
            images = list_images(self.root)
            classes = self._read_labels(images)
        else:
            _require_dir(self.root, "one sub-folder of images per class")
            folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not folders:
                raise DataError(
                    f"{self.root}: no class sub-folders; expected <root>/<class name>/<images>, or for a flat "
                    "folder (ImageNet's validation set as distributed) add labels: <a CSV file of image, class>"
                )
            classes = {name: list_images(self.root / name) for name in folders}
        indices = self.labels is not None and all(name.isdigit() for name in classes)  # the labels file's own
        names = sorted(classes, key=int) if indices else sorted(classes)
        self.total_classes = max(map(int, names), default=-1) + 1 if indices else len(names)
        positions = range(len(names))
        if self.class_range is not None:
            if len(self.class_range) != 2 or not 0 <= self.class_range[0] < self.class_range[1] <= len(names):
                raise DataError(
                    f"{self.root}: class_range {self.class_range} must be [first, last] with "
                    f"0 <= first < last <= {len(names)} (its number of classes)"
                )
            positions = range(*self.class_range)
        self.class_names = [names[i] for i in positions]
        imagenet = _imagenet_indices()
        self.imagenet_labels = all(name in imagenet for name in self.class_names)
        others = [name for name in self.class_names if name not in imagenet]
        if not self.imagenet_labels and len(others) < len(self.class_names):
            # a stray folder (__MACOSX) or a mistyped synset would silently renumber every class by position
            where = f"rows of {self.labels}" if self.labels is not None else f"sub-folders of {self.root}"
            raise DataError(
                f"{self.root}: {len(self.class_names) - len(others)} classes are ImageNet synsets but {len(others)} "
                f"{where} are not (e.g. {others[0]!r}); remove or correct them, so that every class keeps its "
                "ImageNet index"
            )
        for position in positions:
            name = names[position]
            label = imagenet[name] if self.imagenet_labels else int(name) if indices else position
            self.records.extend((path, label) for path in classes[name])

    def _read_labels(self, images: list[Path]) -> dict[str, list[Path]]:
        """{class: its images, in file order} from the `labels` CSV."""
        import csv

        path = Path(self.labels).expanduser()
        if not path.is_file():
            raise DataError(f"{self.root}: labels file {path} not found; give the CSV of image names and classes")
        by_name = {}
        for image in images:
            by_name[image.name] = by_name[image.stem] = image
        label_of: dict[Path, str] = {}
        try:
            with path.open(newline="") as handle:
                rows = list(csv.reader(handle))
        except (UnicodeDecodeError, csv.Error) as error:
            raise DataError(
                f"{path}: not a CSV text file ({type(error).__name__}); give the CSV of image names and classes"
            ) from None
        for number, row in enumerate(rows, start=1):
            if not row or not row[0].strip():
                continue
            image = by_name.get(row[0].strip())
            if image is None:
                continue  # a header, or an image not in this folder
            words = row[1].split() if len(row) > 1 else []
            if not words:
                raise DataError(f"{path}:{number}: no class after the image name; each row is: image, class")
            label_of[image] = words[0]
        unlabelled = [image for image in images if image not in label_of]
        if unlabelled:
            raise DataError(
                f"{self.root}: {len(unlabelled)} of {len(images)} images have no row in {path} (e.g. "
                f"{unlabelled[0].name}); give the labels file of this folder"
            )
        classes: dict[str, list[Path]] = defaultdict(list)
        for image in images:
            classes[label_of[image]].append(image)
        return classes

    @property
    def num_classes(self) -> int:
        return 1000 if self.imagenet_labels else self.total_classes

    def load(self, i: int) -> Sample:
        path, label = self.records[i]
        return make_sample(load_rgb(path), label=label, path=str(path))


# --------------------------------------------------------------------------------------------------
# Segmentation


class Cityscapes(FileDataset):
    """Cityscapes fine annotations mapped to the 19 train ids (others 255).

    Images `leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`, labels `gtFine/<split>/<city>/<name>_gtFine_
    labelTrainIds.png` when present, else `..._gtFine_labelIds.png` (mapped). A missing label file is a
    `DataError` at construction. The split "test" reads `val`: the test labels are not public.
    """

    class_names = CITYSCAPES_CLASSES
    image_dir, image_suffix = "leftImg8bit", "_leftImg8bit"
    reads_split = True
    sample_keys = ("hq", "mask")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | None = 256,
        seed: int = 0,
        labels_root: str | Path | None = None,
    ):
        self.labels_root = Path(labels_root) if labels_root else Path(root)
        # The test split's labels are not public (its gtFine files are placeholders): test reads val, as the
        # paper's tables do.
        super().__init__(root, "val" if split == "test" else split, size, seed)

    def _label_path(self, city: str, base: str) -> tuple[Path, bool]:
        folder = self.labels_root / "gtFine" / self.split / city
        train_ids = folder / f"{base}_gtFine_labelTrainIds.png"
        if train_ids.is_file():
            return train_ids, True
        label_ids = folder / f"{base}_gtFine_labelIds.png"
        if not label_ids.is_file():
            raise DataError(
                f"{label_ids}: label file missing (nor {train_ids.name}); restore gtFine/{self.split} "
                "or remove the image"
            )
        return label_ids, False

    def _images(self) -> list[tuple[Path, str, str]]:
        """(image path, city, base name) for every image of the split."""
        folder = _require_dir(
            self.root / self.image_dir / self.split,
            f"{self.image_dir}/{self.split}/<city>/*{self.image_suffix}.png",
        )
        found = []
        for path in list_images(folder):
            name = path.stem
            if self.image_suffix in name:
                found.append((path, path.parent.name, name[: name.index(self.image_suffix)]))
        return found

    def index(self) -> None:
        for path, city, base in self._images():
            label, is_train_ids = self._label_path(city, base)
            self.records.append((path, label, is_train_ids))

    def _mask(self, label: Path, is_train_ids: bool, image: torch.Tensor) -> torch.Tensor:
        raw = load_label_map(label)
        check_same_size(image, raw, label)
        return torch.from_numpy(_clean_train_ids(raw) if is_train_ids else _train_ids(raw))

    def load(self, i: int) -> Sample:
        path, label, is_train_ids = self.records[i]
        hq = load_rgb(path)
        return make_sample(hq, mask=self._mask(label, is_train_ids, hq), path=str(path))


class FoggyCityscapes(Cityscapes):
    """Foggy Cityscapes: `leftImg8bit_foggy/<split>/<city>/<name>_leftImg8bit_foggy_beta_<beta>.png`.

    `beta` picks one density (0.005, 0.01, 0.02: the paper's Fog1..3) or None for all three. Labels come from
    `gtFine` (as Cityscapes). `hq` is the clear `leftImg8bit` image when that folder exists, else the foggy one.
    """

    image_dir, image_suffix = "leftImg8bit_foggy", "_leftImg8bit_foggy_beta_"
    sample_keys = ("hq", "lq", "mask")

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        size: int | None = 256,
        seed: int = 0,
        beta: float | None = None,
        labels_root: str | Path | None = None,
        clear_root: str | Path | None = None,
    ):
        if beta is not None and not any(math.isclose(beta, b) for b in FOGGY_BETAS):
            raise DataError(f"{root}: beta must be one of {FOGGY_BETAS} or None (all), got {beta}")
        self.beta = beta
        self.clear_root = Path(clear_root) if clear_root else Path(root)
        super().__init__(root, split, size, seed, labels_root=labels_root)

    def index(self) -> None:
        clear_folder = self.clear_root / "leftImg8bit" / self.split
        paired = clear_folder.is_dir()
        for path, city, base in self._images():
            beta = float(path.stem.rsplit("_", 1)[-1])
            if self.beta is not None and not math.isclose(beta, self.beta):
                continue
            label, is_train_ids = self._label_path(city, base)
            clear = clear_folder / city / f"{base}_leftImg8bit.png" if paired else None
            if clear is not None and not clear.is_file():
                raise DataError(
                    f"{clear}: clear image missing for {path.name}; restore it or drop clear_root"
                )
            self.records.append((path, label, is_train_ids, clear, beta))

    def load(self, i: int) -> Sample:
        path, label, is_train_ids, clear, beta = self.records[i]
        lq = load_rgb(path)
        hq = load_rgb(clear) if clear is not None else lq.clone()
        mask = self._mask(label, is_train_ids, lq)
        return make_sample(hq, lq=lq, corruption=f"fog_beta_{beta:g}", severity=0, mask=mask, path=str(path))


class ACDC(FileDataset):
    """ACDC adverse conditions: `rgb_anon/<condition>/<split>/<seq>/<name>_rgb_anon.png` with
    `gt/<condition>/<split>/<seq>/<name>_gt_labelTrainIds.png`. Real degraded images: `hq` = `lq`.

    `conditions`: some of fog, night, rain, snow; None takes every condition present on disk.
    """

    class_names = CITYSCAPES_CLASSES
    reads_split = True
    sample_keys = ("hq", "lq", "mask")

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        size: int | None = 256,
        seed: int = 0,
        conditions: tuple[str, ...] | None = None,
    ):
        if isinstance(conditions, str):
            conditions = (conditions,)
        unknown = [c for c in conditions or () if c not in ACDC_CONDITIONS]
        if unknown or conditions == ():
            raise DataError(
                f"{root}: unknown ACDC condition(s) {unknown}; use some of {', '.join(ACDC_CONDITIONS)}"
            )
        self.conditions = tuple(conditions) if conditions else None
        super().__init__(root, "val" if split == "test" else split, size, seed)  # test labels are not public

    def index(self) -> None:
        conditions = self.conditions or tuple(
            c for c in ACDC_CONDITIONS if (self.root / "rgb_anon" / c / self.split).is_dir()
        )
        if not conditions:
            raise DataError(
                f"{self.root / 'rgb_anon'}: no <condition>/{self.split} folder "
                f"(conditions: {', '.join(ACDC_CONDITIONS)}); check the root and split"
            )
        for condition in conditions:
            folder = self.root / "rgb_anon" / condition / self.split
            _require_dir(folder, f"rgb_anon/{condition}/{self.split}/<sequence>/*_rgb_anon.png")
            for path in list_images(folder):
                if not path.stem.endswith("_rgb_anon"):
                    continue
                base = path.stem[: -len("_rgb_anon")]
                label = (
                    self.root
                    / "gt"
                    / condition
                    / self.split
                    / path.parent.name
                    / f"{base}_gt_labelTrainIds.png"
                )
                if not label.is_file():
                    raise DataError(
                        f"{label}: label file missing for {path.name}; restore gt/{condition}/{self.split}"
                    )
                self.records.append((path, label, condition))

    def load(self, i: int) -> Sample:
        path, label, condition = self.records[i]
        image = load_rgb(path)
        raw = load_label_map(label)
        check_same_size(image, raw, label)
        mask = torch.from_numpy(_clean_train_ids(raw))
        return make_sample(
            image, lq=image.clone(), corruption=condition, severity=0, mask=mask, path=str(path)
        )


# --------------------------------------------------------------------------------------------------
# Detection


class COCODetection(FileDataset):
    """COCO instances: boxes xywh -> xyxy, category ids -> contiguous labels 0..C-1 (sorted by id),
    zero-size boxes dropped. Crowd annotations (`iscrowd` 1) are kept as ignore regions (`box_ignore`), as
    COCO's evaluation keeps them: a detection on one is no false positive, and they are no training target.

    Default layout: images `<root>/<split><year>/`, annotations `<root>/annotations/instances_<split><year>.json`
    (or give `images` / `annotations`). `category_ids[label]` is the original COCO id, `class_names[label]`
    its name. `skip_empty` drops images without boxes (crowd regions alone count as none: nothing to learn). An
    image the annotations list but the folder lacks is reported and skipped like an unreadable one (a
    `DataError` when none of them is there).
    """

    reads_split = True
    sample_keys = ("hq", "boxes", "box_labels")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | None = 256,
        seed: int = 0,
        year: int = 2017,
        images: str | Path | None = None,
        annotations: str | Path | None = None,
        skip_empty: bool = False,
    ):
        coco_split = "val" if split == "test" else split  # COCO's test images have no annotations
        self.images = Path(images) if images else Path(root) / f"{coco_split}{year}"
        self.annotations = (
            Path(annotations)
            if annotations
            else Path(root) / "annotations" / f"instances_{coco_split}{year}.json"
        )
        self.skip_empty = skip_empty
        super().__init__(root, split, size, seed)

    def index(self) -> None:
        if not self.annotations.is_file():
            raise DataError(
                f"{self.annotations}: annotation file missing; set `annotations` to instances_*.json"
            )
        _require_dir(self.images, "the COCO images of this split")
        try:
            data = json.loads(self.annotations.read_text())
            categories = sorted(data["categories"], key=lambda c: c["id"])
            images = data["images"]
            annotations = data.get("annotations", [])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{self.annotations}: not a COCO instances file ({error!r})") from error
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [c["name"] for c in categories]
        to_label = {cid: label for label, cid in enumerate(self.category_ids)}
        per_image: dict[int, list[tuple[list[float], int, bool]]] = defaultdict(list)
        for ann in annotations:
            try:
                x, y, w, h = (float(value) for value in ann["bbox"])
                category, image_id = ann["category_id"], ann["image_id"]
            except (KeyError, TypeError, ValueError) as error:  # no or a malformed bbox, category or image
                raise DataError(
                    f"{self.annotations}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r} is not a "
                    f"COCO box ({type(error).__name__}: {error}); each needs bbox [x, y, w, h], category_id, image_id"
                ) from None
            if w <= 0 or h <= 0:
                continue
            if category not in to_label:
                raise DataError(f"{self.annotations}: annotation {ann.get('id')} has unknown category {category}")
            crowd = bool(ann.get("iscrowd", 0))
            per_image[image_id].append(([x, y, x + w, y + h], to_label[category], crowd))
        missing: list[Path] = []
        for image in sorted(images, key=lambda im: im.get("id", -1)):
            if "id" not in image or "file_name" not in image:
                raise DataError(f"{self.annotations}: image entry {image!r:.120} lacks its id or file_name")
            objects = per_image.get(image["id"], [])
            if self.skip_empty and all(crowd for _, _, crowd in objects):  # no box, or crowd regions alone
                continue
            path = self.images / image["file_name"]
            if not path.is_file():
                missing.append(path)
                continue
            boxes = np.asarray([box for box, _, _ in objects], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray([label for _, label, _ in objects], dtype=np.int64)
            crowd = np.asarray([ignore for _, _, ignore in objects], dtype=bool)
            self.records.append((path, boxes, labels, crowd, image["id"]))
        if missing and not self.records:
            raise DataError(
                f"{self.images}: none of the {len(missing)} images {self.annotations.name} lists is here (e.g. "
                f"{missing[0].name}); set `images` to their folder"
            )
        for path in missing:  # skipped as an unreadable image is: counted, the others go on
            report_bad_file(UnreadableImage(path, f"missing, though {self.annotations.name} lists it"))

    def load(self, i: int) -> Sample:
        path, boxes, labels, crowd, _image_id = self.records[i]
        return make_sample(load_rgb(path), boxes=boxes, box_labels=labels, box_ignore=crowd, path=str(path))


class RTTS(FileDataset):
    """RTTS (RESIDE real-world task-driven testing set): real hazy images with VOC XML boxes of 5 classes.

    `JPEGImages/<id>.png|jpg`, `Annotations/<id>.xml`; `ImageSets/Main/<split>.txt` selects ids when it
    exists (one it lists without an image is skipped as an unreadable image is), else every image is used.
    VOC's 1-based inclusive pixel boxes become xyxy pixel edges (xmin - 1, ymin - 1, xmax, ymax). Labels index
    `RTTS_CLASSES`. Real degraded images: `hq` = `lq`.

    `skip_difficult` (default true): objects marked `<difficult>1` are ignore regions (`box_ignore`), as the
    VOC devkit evaluates them: missing one costs nothing and a detection on one is neither a true nor a false
    positive (see `metrics.coco_map` for how pycocotools' crowd rule, used for this, differs from VOC's);
    they are no training target either. False: they are ordinary objects, to be found like the others.
    """

    class_names = RTTS_CLASSES
    sample_keys = ("hq", "lq", "boxes", "box_labels")

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        size: int | None = 256,
        seed: int = 0,
        skip_difficult: bool = True,
    ):
        self.skip_difficult = skip_difficult
        super().__init__(root, split, size, seed)

    def index(self) -> None:
        images = {
            p.stem: p
            for p in list_images(_require_dir(self.root / "JPEGImages", "JPEGImages/ (RTTS images)"))
        }
        _require_dir(self.root / "Annotations", "Annotations/ (VOC XML files)")
        listing = self.root / "ImageSets" / "Main" / f"{self.split}.txt"
        if listing.is_file():
            listed = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
            ids = [i for i in listed if i in images]
            missing = [i for i in listed if i not in images]
            if missing and not ids:
                raise DataError(
                    f"{listing}: none of the {len(missing)} images it lists is in JPEGImages/ (e.g. {missing[0]}); "
                    "set `root` to the RTTS folder"
                )
            for image_id in missing:  # skipped as an unreadable image is: counted, the others go on
                report_bad_file(
                    UnreadableImage(self.root / "JPEGImages" / image_id, f"missing, though {listing.name} lists it")
                )
        else:
            ids = sorted(images)
        for image_id in ids:
            xml = self.root / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                raise DataError(f"{xml}: annotation file missing for {images[image_id].name}; restore it")
            self.records.append((images[image_id], xml))

    def _objects(self, xml: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The boxes (N, 4), labels (N,) and ignore flags (N,) of one annotation file."""
        try:
            tree = ET.parse(xml)
        except ET.ParseError as error:
            raise DataError(f"{xml}: not valid XML ({error}); restore the annotation file") from error
        boxes, labels, ignore = [], [], []
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip().lower()
            if name not in RTTS_CLASSES:
                raise DataError(f"{xml}: unknown class {name!r}; RTTS classes are {', '.join(RTTS_CLASSES)}")
            box = obj.find("bndbox")
            if box is None:
                raise DataError(f"{xml}: an object {name!r} has no <bndbox>")
            x1, y1, x2, y2 = (float(box.findtext(tag) or "nan") for tag in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))
            labels.append(RTTS_CLASSES.index(name))
            ignore.append(self.skip_difficult and (obj.findtext("difficult") or "0").strip() == "1")
        return (
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            np.asarray(ignore, dtype=bool),
        )

    def load(self, i: int) -> Sample:
        path, xml = self.records[i]
        image = load_rgb(path)
        boxes, labels, ignore = self._objects(xml)
        return make_sample(
            image,
            lq=image.clone(),
            corruption="haze_real",
            severity=0,
            boxes=boxes,
            box_labels=labels,
            box_ignore=ignore,
            path=str(path),
        )
