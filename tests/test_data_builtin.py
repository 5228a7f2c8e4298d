"""Built-in data: scenes whose labels, masks and boxes agree; photos; determinism; disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unirestore.framework.data.builtin import (
    CLASS_NAMES,
    NUM_CLASSES,
    NUM_SEG_CLASSES,
    PHOTOS,
    SPLIT_PHOTOS,
    BuiltinPhotos,
    BuiltinScenes,
    coco_annotations,
    dead_leaves,
    load_photo,
)
from unirestore.framework.data.sample import IGNORE_LABEL, collate


def test_photos_all_load_offline():
    for name in PHOTOS:
        photo = load_photo(name)
        assert (
            photo.ndim == 3
            and photo.shape[2] == 3
            and photo.dtype == np.uint8
            and min(photo.shape[:2]) >= 256
        )
    splits = [set(photos) for photos in SPLIT_PHOTOS.values()]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])


@pytest.mark.parametrize("size", [32, 96, 200])
def test_scene_labels_masks_and_boxes_agree(size):
    dataset = BuiltinScenes("train", size=size, length=40, seed=3)
    seen = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["hq"].shape == (3, size, size) and sample["hq"].dtype == torch.float32
        assert sample["mask"].shape == (size, size) and sample["mask"].dtype == torch.int64
        assert sample["boxes"].dtype == torch.float32 and sample["box_labels"].dtype == torch.int64
        hq, mask = sample["hq"].numpy(), sample["mask"].numpy()  # numpy: many tiny checks, no thread pool
        boxes, labels = sample["boxes"].numpy(), sample["box_labels"].tolist()
        assert 0 <= hq.min() and hq.max() <= 1 and 0 <= mask.min() and mask.max() < NUM_SEG_CLASSES
        assert len(boxes) == len(labels) >= 1
        covered = np.zeros(mask.shape, dtype=bool)
        areas = []
        for (x1, y1, x2, y2), cls in zip(boxes.astype(int).tolist(), labels, strict=True):
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            inside = mask[y1:y2, x1:x2] == cls + 1
            # the box is tight: its object touches all four sides
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y1:y2, x1:x2] |= inside
            areas.append(int(inside.sum()))
        # every object pixel lies in a box of its class
        assert np.array_equal(covered, mask > 0)
        assert int(sample["label"]) == labels[int(np.argmax(areas))]
        # the dominant object is clearly the largest: the classification label is unambiguous
        assert max(areas) > 1.5 * (sorted(areas)[-2] if len(areas) > 1 else 0)
        seen.add(int(sample["label"]))
    assert len(seen) >= NUM_CLASSES - 2


def test_classes_differ_in_colour():
    """Each class has its own colour: the mean colour of its pixels identifies it."""
    dataset = BuiltinScenes("val", size=64, length=60)
    means = {c: [] for c in range(NUM_CLASSES)}
    for index in range(len(dataset)):
        sample = dataset[index]
        for c in range(NUM_CLASSES):
            pixels = sample["hq"][:, sample["mask"] == c + 1]
            if pixels.shape[1] > 20:
                means[c].append(pixels.mean(dim=1))
    centres = torch.stack([torch.stack(v).mean(0) for v in means.values() if v])
    distances = torch.cdist(centres, centres) + torch.eye(len(centres))
    assert len(centres) >= NUM_CLASSES - 1 and distances.min() > 0.1
    assert len(CLASS_NAMES) == NUM_CLASSES and NUM_SEG_CLASSES == NUM_CLASSES + 1


def test_deterministic_per_split_seed_index_and_splits_differ():
    a, b = BuiltinScenes("train", 64, seed=1), BuiltinScenes("train", 64, seed=1)
    assert torch.equal(a[5]["hq"], b[5]["hq"]) and torch.equal(a[5]["mask"], b[5]["mask"])
    assert not torch.equal(a[5]["hq"], a[6]["hq"])
    assert not torch.equal(a[5]["hq"], BuiltinScenes("train", 64, seed=2)[5]["hq"])
    assert not torch.equal(a[5]["hq"], BuiltinScenes("val", 64, seed=1)[5]["hq"])
    assert BuiltinPhotos("test", 64)[3]["path"].endswith(("stereo_motorcycle", "stereo_motorcycle_right"))
    with pytest.raises(ValueError, match="known: train, val, test"):
        BuiltinScenes("training")


def test_photos_and_collate():
    photos = BuiltinPhotos("train", size=80, length=4)
    batch = collate([photos[i] for i in range(4)])
    assert batch["hq"].shape == (4, 3, 80, 80) and batch["mask"].shape == (4, 80, 80)
    assert (batch["label"] == IGNORE_LABEL).all() and (batch["mask"] == 255).all()
    assert isinstance(batch["boxes"], list) and batch["boxes"][0].shape == (0, 4)
    scenes = collate([BuiltinScenes(size=64)[i] for i in range(3)])
    assert scenes["label"].shape == (3,) and len(scenes["boxes"]) == 3 and len(scenes["path"]) == 3


def test_coco_form():
    sample = BuiltinScenes(size=64)[0]
    annotations = coco_annotations(sample, image_id=7)
    assert len(annotations) == len(sample["boxes"])
    x, y, w, h = annotations[0]["bbox"]
    assert [x, y, x + w, y + h] == sample["boxes"][0].tolist()
    assert annotations[0]["category_id"] == int(sample["box_labels"][0]) + 1


def test_dead_leaves_are_deterministic_varied_images():
    photos = SPLIT_PHOTOS["train"]
    first = dead_leaves(48, np.random.default_rng(3), photos)
    assert first.shape == (48, 48, 3) and first.dtype == np.uint8
    assert np.array_equal(first, dead_leaves(48, np.random.default_rng(3), photos))
    assert not np.array_equal(first, dead_leaves(48, np.random.default_rng(4), photos))
    # many shapes of many colours, not a flat canvas
    assert len(np.unique(first.reshape(-1, 3), axis=0)) > 50 and first.std() > 10


def test_train_photos_mix_in_dead_leaves_and_evaluation_splits_do_not():
    train = BuiltinPhotos("train", size=32, length=200)
    paths = [train[i]["path"] for i in range(200)]
    leaves = sum(path.startswith("builtin:leaves/train/") for path in paths)
    assert 60 < leaves < 140  # TRAIN_LEAVES_SHARE = 0.5
    assert BuiltinPhotos("train", size=32, leaves=0.0)[0]["path"].startswith("builtin:photos/")
    assert BuiltinPhotos("train", size=32, leaves=1.0)[0]["path"].startswith("builtin:leaves/")
    for split in ("val", "test"):
        assert not any(BuiltinPhotos(split, size=32)[i]["path"].startswith("builtin:leaves") for i in range(50))
    with pytest.raises(ValueError, match="leaves must be a share"):
        BuiltinPhotos("train", leaves=1.5)
