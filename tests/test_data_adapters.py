"""Each real-dataset adapter reads a miniature copy of its on-disk layout, written here to a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unirestore.framework.data.adapters import (
    ACDC,
    CITYSCAPES_CLASSES,
    RESIDE,
    RTTS,
    Cityscapes,
    COCODetection,
    FoggyCityscapes,
    GoPro,
    HQFolder,
    ImageFolder,
    PairedFolder,
)
from unirestore.framework.data.io import BadFileWarning, DataError
from unirestore.framework.data.sample import IGNORE_INDEX, IGNORE_LABEL, collate


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _flat(value: int, height: int = 24, width: int = 32) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def _value(image: torch.Tensor) -> int:
    return round(float(image.mean()) * 255)


def _check_common(sample: dict, size: int | None = None) -> None:
    for key in ("hq", "label", "mask", "boxes", "box_labels", "path"):
        assert key in sample
    assert sample["hq"].dtype == torch.float32 and sample["hq"].shape[0] == 3
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == sample["hq"].shape[1:]
    assert sample["label"].dtype == torch.int64 and sample["label"].ndim == 0
    assert sample["boxes"].dtype == torch.float32 and sample["boxes"].shape[1] == 4
    assert sample["box_labels"].dtype == torch.int64 and len(sample["box_labels"]) == len(sample["boxes"])
    if size is not None:
        assert sample["hq"].shape[1:] == (size, size)
    if "lq" in sample:
        assert sample["lq"].shape == sample["hq"].shape and isinstance(sample["corruption"], str)


def test_hq_folder_recursive_and_crops(tmp_path):
    _save(tmp_path / "0001.png", _flat(10, 40, 60))
    _save(tmp_path / "sub" / "0002.jpg", _flat(20, 50, 50))
    train = HQFolder(tmp_path, split="train", size=32, seed=0)
    assert len(train) == 2
    _check_common(train[0], 32)
    assert "lq" not in train[0] and int(train[0]["label"]) == IGNORE_LABEL and (train[0]["mask"] == 255).all()
    big = HQFolder(tmp_path, split="val", size=64)[0]  # short side 40 -> resized up to 64
    assert big["hq"].shape == (3, 64, 64)
    assert HQFolder(tmp_path, split="val", size=None)[0]["hq"].shape == (3, 40, 60)
    # random crops differ by index (and wrap past the end with fresh randomness), the same on every call
    noisy = tmp_path / "noise"
    _save(noisy / "n.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    crops = HQFolder(noisy, size=16, seed=1)
    assert torch.equal(crops[0]["hq"], crops[0]["hq"]) and not torch.equal(crops[0]["hq"], crops[1]["hq"])


def test_paired_folder_input_target(tmp_path):
    for i, value in enumerate((30, 60)):
        _save(tmp_path / "input" / f"{i}.png", _flat(value))
        _save(tmp_path / "target" / f"{i}.jpg", _flat(value + 100))
    dataset = PairedFolder(tmp_path, split="val", size=None, corruption="rain")
    sample = dataset[1]
    _check_common(sample)
    assert (_value(sample["lq"]), _value(sample["hq"])) == (60, 160)
    assert sample["corruption"] == "rain" and sample["severity"] == 0
    with pytest.raises(DataError, match="no images under a folder named 'lq'.*input, target"):
        PairedFolder(tmp_path, lq_dir="lq", hq_dir="hq")
    _save(tmp_path / "input" / "9.png", _flat(1))
    with pytest.raises(DataError, match=r"9.png: no clean partner named 9\.\*"):
        PairedFolder(tmp_path)


def test_rain100l_prefixes(tmp_path):
    _save(tmp_path / "rainy" / "rain-001.png", _flat(50))
    _save(tmp_path / "norain" / "norain-001.png", _flat(150))
    dataset = PairedFolder(
        tmp_path, size=None, lq_dir="rainy", hq_dir="norain", lq_prefix="rain-", hq_prefix="norain-"
    )
    assert (_value(dataset[0]["lq"]), _value(dataset[0]["hq"])) == (50, 150)


def test_gopro_nested_sequences(tmp_path):
    for seq, value in (("GOPR0372_07_00", 40), ("GOPR0374_11_00", 80)):
        _save(tmp_path / seq / "blur" / "000047.png", _flat(value))
        _save(tmp_path / seq / "sharp" / "000047.png", _flat(value + 1))
    dataset = GoPro(tmp_path, split="test", size=16)
    assert len(dataset) == 2
    for i, value in enumerate((40, 80)):
        sample = dataset[i]
        _check_common(sample, 16)
        assert (_value(sample["lq"]), _value(sample["hq"])) == (value, value + 1)


def test_reside_many_hazy_to_one_clear_and_border_crop(tmp_path):
    clear = _flat(200, 30, 40)
    clear[:3], clear[-3:], clear[:, :3], clear[:, -3:] = 0, 0, 0, 0  # a border the hazy images lack
    _save(tmp_path / "clear" / "0001.png", clear)
    _save(tmp_path / "clear" / "0002.png", _flat(100, 24, 34))
    for name in ("0001_0.8_0.2.jpg", "0001_0.9_0.16.jpg", "0002_1_0.2.jpg"):
        _save(tmp_path / "hazy" / name, _flat(250, 24, 34))
    dataset = RESIDE(tmp_path, split="val", size=None)
    assert len(dataset) == 3
    assert [Path(hq).name for _, hq in dataset.records] == ["0001.png", "0001.png", "0002.png"]
    sample = dataset[0]
    assert sample["hq"].shape == sample["lq"].shape == (3, 24, 34) and _value(sample["hq"]) == 200
    assert sample["corruption"] == "haze_real"


def test_image_folder_classes_are_sorted_subfolders(tmp_path):
    _save(tmp_path / "n02_zebra" / "a.jpg", _flat(10))
    _save(tmp_path / "n01_cat" / "x" / "b.png", _flat(20))
    _save(tmp_path / "n01_cat" / "c.png", _flat(30))
    (tmp_path / "n03_empty").mkdir()
    dataset = ImageFolder(tmp_path, split="val", size=16)
    assert dataset.class_names == ["n01_cat", "n02_zebra", "n03_empty"] and len(dataset) == 3
    labels = [int(dataset[i]["label"]) for i in range(3)]
    assert labels == [0, 0, 1]
    batch = collate([dataset[i] for i in range(3)])
    assert batch["label"].tolist() == [0, 0, 1] and batch["hq"].shape == (3, 3, 16, 16)


def test_image_folder_of_imagenet_synsets_keeps_their_imagenet_indices(tmp_path):
    """A subset of ImageNet (here goldfish and tench's neighbours) must be labelled as a 1000-way classifier
    numbers them, not 0, 1, ... by position, or every accuracy on it is wrong."""
    _save(tmp_path / "subset" / "n01443537" / "a.jpg", _flat(10))  # goldfish: ImageNet index 1
    _save(tmp_path / "subset" / "n01484850" / "b.jpg", _flat(20))  # great white shark: 2
    subset = ImageFolder(tmp_path / "subset", split="val", size=16)
    assert [int(subset[i]["label"]) for i in range(2)] == [1, 2] and subset.num_classes == 1000
    _save(tmp_path / "cub" / "001.Black_footed_Albatross" / "a.jpg", _flat(10))  # CUB: by position
    _save(tmp_path / "cub" / "002.Laysan_Albatross" / "b.jpg", _flat(20))
    cub = ImageFolder(tmp_path / "cub", split="val", size=16)
    assert [int(cub[i]["label"]) for i in range(2)] == [0, 1] and cub.num_classes == 2
    # one stray folder (a zip's __MACOSX) among synsets would renumber every class by position: refused
    _save(tmp_path / "subset" / "__MACOSX" / "._a.jpg", _flat(30))
    with pytest.raises(DataError, match=r"2 classes are ImageNet synsets but 1 sub-folders of .* are not \(e.g. '__MACOSX'\)"):
        ImageFolder(tmp_path / "subset", split="val", size=16)


def _cityscapes(root: Path, split: str = "val", train_ids: bool = False) -> None:
    label = np.zeros((16, 32), np.uint8)
    label[:, :8] = 7  # road -> 0
    label[:, 8:16] = 26  # car -> 13
    label[:, 16:24] = 33  # bicycle -> 18
    label[:, 24:] = 4  # static -> 255
    for city in ("aachen", "ulm"):
        base = f"{city}_000000_000019"
        _save(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", _flat(90, 16, 32))
        _save(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", label)
        _save(root / "gtFine" / split / city / f"{base}_gtFine_color.png", _flat(0, 16, 32))
        if train_ids:
            _save(
                root / "gtFine" / split / city / f"{base}_gtFine_labelTrainIds.png",
                np.full((16, 32), 5, np.uint8),
            )


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    _cityscapes(tmp_path)
    dataset = Cityscapes(tmp_path, split="val", size=None)
    assert len(dataset) == 2 and len(CITYSCAPES_CLASSES) == 19
    sample = dataset[0]
    _check_common(sample)
    assert sample["path"].endswith("aachen_000000_000019_leftImg8bit.png")
    row = sample["mask"][0]
    assert (
        row[:8].eq(0).all() and row[8:16].eq(13).all() and row[16:24].eq(18).all() and row[24:].eq(255).all()
    )
    # a centre crop (columns 8..24) keeps image and mask aligned; a resize keeps class ids intact
    cropped = Cityscapes(tmp_path, split="val", size=16)[0]["mask"][0]
    assert cropped[:8].eq(13).all() and cropped[8:].eq(18).all()
    resized = Cityscapes(tmp_path, split="val", size=32)[0]["mask"]
    assert resized.shape == (32, 32) and set(resized.unique().tolist()) == {13, 18}
    with pytest.raises(DataError, match="leftImg8bit/train"):
        Cityscapes(tmp_path, split="train")


def test_cityscapes_test_split_reads_val_whose_labels_are_public(tmp_path):
    _cityscapes(tmp_path)
    test = Cityscapes(tmp_path, split="test", size=None)
    assert test.split == "val" and len(test) == 2
    assert test[0]["mask"].ne(255).any()


def test_cityscapes_prefers_train_ids(tmp_path):
    _cityscapes(tmp_path, train_ids=True)
    assert Cityscapes(tmp_path, split="val", size=None)[0]["mask"].eq(5).all()


def test_foggy_cityscapes_betas_and_clear_images(tmp_path):
    _cityscapes(tmp_path)
    for city in ("aachen", "ulm"):
        for beta, value in (("0.005", 100), ("0.01", 150), ("0.02", 200)):
            name = f"{city}_000000_000019_leftImg8bit_foggy_beta_{beta}.png"
            _save(tmp_path / "leftImg8bit_foggy" / "val" / city / name, _flat(value, 16, 32))
    everything = FoggyCityscapes(tmp_path, split="val", size=None)
    assert len(everything) == 6
    dense = FoggyCityscapes(tmp_path, split="val", size=None, beta=0.02)
    sample = dense[1]
    _check_common(sample)
    assert len(dense) == 2 and _value(sample["lq"]) == 200 and _value(sample["hq"]) == 90
    assert sample["corruption"] == "fog_beta_0.02" and sample["mask"][0, 0] == 0
    with pytest.raises(DataError, match="beta must be one of"):
        FoggyCityscapes(tmp_path, split="val", beta=0.03)


def test_acdc(tmp_path):
    for condition, value in (("fog", 50), ("night", 10)):
        for split in ("val", "val_ref"):
            base = f"GOPR0475_frame_00004{value % 7}"
            _save(
                tmp_path / "rgb_anon" / condition / split / "GOPR0475" / f"{base}_rgb_anon.png", _flat(value)
            )
            label = np.full((24, 32), 10, np.uint8)
            label[0, 0] = 255
            label[0, 1] = 200  # not a train id -> ignored
            _save(tmp_path / "gt" / condition / split / "GOPR0475" / f"{base}_gt_labelTrainIds.png", label)
    dataset = ACDC(tmp_path, split="val", size=None)
    assert len(dataset) == 2  # the *_ref folders are another split
    sample = dataset[1]
    _check_common(sample)
    assert sample["corruption"] == "night" and torch.equal(sample["lq"], sample["hq"])
    assert (
        sample["mask"][0, 0] == IGNORE_INDEX
        and sample["mask"][0, 1] == IGNORE_INDEX
        and sample["mask"][5, 5] == 10
    )
    assert len(ACDC(tmp_path, split="val", conditions=("fog",))) == 1
    with pytest.raises(DataError, match="unknown ACDC condition"):
        ACDC(tmp_path, conditions=("hail",))


def test_coco_boxes_labels_and_crowd(tmp_path):
    _save(tmp_path / "val2017" / "000000000001.jpg", _flat(70, 40, 60))
    _save(tmp_path / "val2017" / "000000000002.jpg", _flat(80, 40, 60))
    annotations = {
        "images": [{"id": 2, "file_name": "000000000002.jpg"}, {"id": 1, "file_name": "000000000001.jpg"}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [30, 20, 25, 15], "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 3, "bbox": [30, 20, 0, 15], "iscrowd": 0},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [52, 0, 8, 8]},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    dataset = COCODetection(tmp_path, split="val", size=None)
    assert dataset.category_ids == [1, 3, 18] and dataset.class_names == ["person", "car", "dog"]
    sample = dataset[0]
    _check_common(sample)
    assert sample["path"].endswith("000000000001.jpg")
    # the crowd annotation stays, as an ignore region; the zero-width box is dropped
    assert sample["boxes"].tolist() == [[10, 5, 30, 15], [0, 0, 5, 5], [30, 20, 55, 35], [52, 0, 60, 8]]
    assert sample["box_labels"].tolist() == [2, 0, 1, 0]
    assert sample["box_ignore"].tolist() == [False, True, False, False]
    assert len(dataset[1]["boxes"]) == 0 and dataset[1]["box_ignore"].dtype == torch.bool
    assert len(COCODetection(tmp_path, split="val", skip_empty=True)) == 1
    # a centre crop to 40 x 40 shifts boxes by 10 px, clips them to the window, drops the one left empty
    cropped = COCODetection(tmp_path, split="val", size=40)[0]
    assert cropped["boxes"].tolist() == [[0, 5, 20, 15], [20, 20, 40, 35]] and cropped[
        "box_labels"
    ].tolist() == [2, 1]
    assert cropped["box_ignore"].tolist() == [False, False]
    # resizing (short side 40 -> 20) scales them too
    small = COCODetection(tmp_path, split="val", size=20)[0]
    assert small["boxes"].tolist() == [[0, 2.5, 10, 7.5], [10, 10, 20, 17.5]]
    with pytest.raises(DataError, match="annotation file missing"):
        COCODetection(tmp_path, split="train")
    # a malformed annotation (no bbox, a null one, a string one, no category) is named, not a KeyError
    for broken in ({"id": 9, "image_id": 1, "category_id": 1}, {"id": 9, "image_id": 1, "category_id": 1, "bbox": None},
                   {"id": 9, "image_id": 1, "category_id": 1, "bbox": ["a", 1, 2, 3]}, {"id": 9, "image_id": 1, "bbox": [1, 1, 2, 2]}):  # fmt: skip
        (tmp_path / "annotations" / "instances_val2017.json").write_text(
            json.dumps({**annotations, "annotations": [*annotations["annotations"], broken]})
        )
        with pytest.raises(DataError, match=r"instances_val2017.json: annotation 9 is not a COCO box"):
            COCODetection(tmp_path, split="val", size=None)


def _coco_crowd_set(root: Path) -> dict:
    """Two 64 x 96 images: the first has a person [4, 24)² and a crowd of people [30, 60)², the second a crowd
    alone."""
    for name in ("a.jpg", "b.jpg"):
        _save(root / "val2017" / name, _flat(90, 64, 96))
    annotations = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 30, 30], "area": 900, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 1},
        ],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    return annotations


def test_coco_crowd_regions_are_ignored_by_the_map_as_cocoeval_ignores_them(tmp_path):
    """COCO's crowd annotations were dropped, so a detection on a crowd counted as a false positive (mAP 0.5
    here); kept as ignore regions, the mAP is pycocotools' own on the annotation file (1.0)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from unirestore.framework.metrics import DetectionMAP

    _coco_crowd_set(tmp_path)
    dataset = COCODetection(tmp_path, split="val", size=None)
    batch = collate([dataset[0], dataset[1]])
    assert [flags.tolist() for flags in batch["box_ignore"]] == [[False, True], [True]]
    predictions = [
        {"boxes": torch.tensor([[4.0, 4.0, 24.0, 24.0], [35.0, 35.0, 55.0, 55.0]]), "scores": torch.tensor([0.9, 0.95]),
         "labels": torch.tensor([0, 0])},  # the person, and a detection inside the crowd
        {"boxes": torch.tensor([[12.0, 12.0, 28.0, 28.0]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([0])},
    ]  # fmt: skip
    result = DetectionMAP()
    result.update(predictions, batch["boxes"], batch["box_labels"], batch["box_ignore"])
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(tmp_path / "annotations" / "instances_val2017.json"))
        detections = ground_truth.loadRes([
            {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [35, 35, 20, 20], "score": 0.95},
            {"image_id": 2, "category_id": 1, "bbox": [12, 12, 16, 16], "score": 0.8},
        ])  # fmt: skip
        evaluation = COCOeval(ground_truth, detections, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)
    assert result.compute() == {"map": pytest.approx(evaluation.stats[0]), "map50": pytest.approx(evaluation.stats[1])}
    # a crop keeps each flag with its box: the centre 64² window (x from 16) cuts the person, shifts the crowd
    cropped = COCODetection(tmp_path, split="val", size=64)[0]
    assert cropped["boxes"].tolist() == [[0, 4, 8, 24], [14, 30, 44, 60]]
    assert cropped["box_ignore"].tolist() == [False, True]
    # an image with crowd regions alone has nothing to learn: `skip_empty` drops it
    kept = COCODetection(tmp_path, split="val", size=None, skip_empty=True)
    assert len(kept) == 1 and kept[0]["path"].endswith("a.jpg")


def test_a_coco_image_missing_on_disk_is_skipped_as_an_unreadable_one(tmp_path):
    """An image the annotations list but the folder lacks stopped a run partway (at its turn to load); now it is
    reported once, counted where evaluation counts skipped files, and the other images go on."""
    from unirestore.framework.data.io import BadFileWarning, skip_mark, skipped_since

    _save(tmp_path / "val2017" / "a.jpg", _flat(70, 40, 60))
    _save(tmp_path / "val2017" / "c.jpg", _flat(90, 40, 60))
    annotations = {
        "images": [{"id": k, "file_name": name} for k, name in enumerate(["a.jpg", "b.jpg", "c.jpg"])],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    mark = skip_mark()
    with pytest.warns(BadFileWarning, match=r"b\.jpg: missing, though instances_val2017\.json lists it"):
        dataset = COCODetection(tmp_path, split="test", size=None)
    assert [path for path, _ in skipped_since(mark)] == [str(tmp_path / "val2017" / "b.jpg")]
    assert len(dataset) == 2
    assert [_value(dataset[i]["hq"]) for i in range(2)] == [70, 90] and dataset[1]["boxes"].tolist() == [[1, 1, 6, 6]]
    (tmp_path / "val2017" / "a.jpg").unlink()
    (tmp_path / "val2017" / "c.jpg").unlink()
    with pytest.raises(DataError, match=r"val2017: none of the 3 images instances_val2017.json lists is here \(e.g. a.jpg\)"):
        COCODetection(tmp_path, split="test")


def _voc(objects: list[tuple], difficult: tuple[int, ...] = ()) -> str:
    """VOC XML of (name, xmin, ymin, xmax, ymax) objects; those at the positions `difficult` are marked so."""
    body = "".join(
        f"<object><name>{n}</name><difficult>{int(k in difficult)}</difficult><bndbox><xmin>{a}</xmin>"
        f"<ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for k, (n, a, b, c, d) in enumerate(objects)
    )
    return f"<annotation><filename>x</filename>{body}</annotation>"


def test_rtts_voc_boxes(tmp_path):
    _save(tmp_path / "JPEGImages" / "AM_Bing_211.png", _flat(120, 40, 60))
    _save(tmp_path / "JPEGImages" / "BD_Baidu_074.png", _flat(130, 40, 60))
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "AM_Bing_211.xml").write_text(
        _voc([("car", 11, 6, 30, 20), ("person", 1, 1, 5, 9)])
    )
    (tmp_path / "Annotations" / "BD_Baidu_074.xml").write_text(_voc([("Bus", 2, 2, 40, 30)]))
    dataset = RTTS(tmp_path, size=None)
    assert len(dataset) == 2
    sample = dataset[0]
    _check_common(sample)
    assert sample["boxes"].tolist() == [[10, 5, 30, 20], [0, 0, 5, 9]] and sample["box_labels"].tolist() == [
        2,
        0,
    ]
    assert dataset[1]["box_labels"].tolist() == [4] and sample["corruption"] == "haze_real"
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("BD_Baidu_074\n")
    assert len(RTTS(tmp_path, split="test")) == 1
    # an image the listing names but the folder lacks is skipped with a warning, as an unreadable one is
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("BD_Baidu_074\nAM_Gone_001\n")
    with pytest.warns(BadFileWarning, match="AM_Gone_001.*missing, though test.txt lists it"):
        assert len(RTTS(tmp_path, split="test")) == 1
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("AM_Gone_001\n")
    with pytest.raises(DataError, match="none of the 1 images it lists is in JPEGImages"):
        RTTS(tmp_path, split="test")
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("BD_Baidu_074\n")
    (tmp_path / "Annotations" / "BD_Baidu_074.xml").write_text(_voc([("tractor", 2, 2, 40, 30)]))
    with pytest.raises(DataError, match="BD_Baidu_074.xml: unknown class 'tractor'"):
        RTTS(tmp_path, split="test")
    (tmp_path / "Annotations" / "BD_Baidu_074.xml").unlink()
    with pytest.raises(DataError, match="BD_Baidu_074.xml: annotation file missing"):
        RTTS(tmp_path, split="test")


def test_rtts_difficult_objects_are_ignore_regions_by_default_as_voc_evaluates_them(tmp_path):
    """A hazy image with a car found and a difficult car [30, 60)². The VOC devkit ignores difficult objects:
    found or missed, the mAP is 1.0. They were counted as ordinary objects by default (missed: 51/101) or, with
    `skip_difficult`, dropped (a detection on one: a false positive, 0.5); now `skip_difficult` (default true)
    makes them ignore regions, and false counts them as ordinary objects."""
    from unirestore.framework.metrics import DetectionMAP

    _save(tmp_path / "JPEGImages" / "AM_Bing_211.png", _flat(120, 64, 64))
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "AM_Bing_211.xml").write_text(
        _voc([("car", 5, 5, 24, 24), ("car", 31, 31, 60, 60)], difficult=(1,))
    )
    found = {"boxes": torch.tensor([[4.0, 4.0, 24.0, 24.0], [30.0, 30.0, 60.0, 60.0]]), "scores": torch.tensor([0.9, 0.95]),
             "labels": torch.tensor([2, 2])}  # fmt: skip
    missed = {key: value[:1] for key, value in found.items()}

    def map_of(dataset, prediction) -> float:
        batch = collate([dataset[0]])
        result = DetectionMAP()
        result.update([prediction], batch["boxes"], batch["box_labels"], batch["box_ignore"])
        return result.compute()["map"]

    default = RTTS(tmp_path, size=None)
    assert default[0]["boxes"].tolist() == [[4, 4, 24, 24], [30, 30, 60, 60]]
    assert default[0]["box_ignore"].tolist() == [False, True]
    assert map_of(default, found) == pytest.approx(1.0) and map_of(default, missed) == pytest.approx(1.0)
    skipped = RTTS(tmp_path, size=None, skip_difficult=True)
    assert skipped[0]["box_ignore"].tolist() == [False, True] and map_of(skipped, found) == pytest.approx(1.0)
    counted = RTTS(tmp_path, size=None, skip_difficult=False)
    assert counted[0]["box_ignore"].tolist() == [False, False]
    assert map_of(counted, found) == pytest.approx(1.0) and map_of(counted, missed) == pytest.approx(51 / 101)


def test_image_folder_class_range_keeps_cubs_disjoint_classes(tmp_path):
    """CUB retrieval: train on the first classes, test on the others; labels stay the folder positions."""
    for k, name in enumerate(("001.Albatross", "002.Auklet", "003.Blackbird", "004.Bobolink")):
        _save(tmp_path / name / "a.jpg", _flat(10 * k))
    train = ImageFolder(tmp_path, size=16, class_range=[0, 2])
    test = ImageFolder(tmp_path, split="test", size=16, class_range=[2, 4])
    assert train.class_names == ["001.Albatross", "002.Auklet"] and test.class_names == ["003.Blackbird", "004.Bobolink"]
    assert [int(test[i]["label"]) for i in range(2)] == [2, 3] and test.num_classes == 4
    with pytest.raises(DataError, match=r"class_range \[3, 9\] must be \[first, last\] with 0 <= first < last <= 4"):
        ImageFolder(tmp_path, class_range=[3, 9])


def test_a_flat_folder_with_a_labels_file_reads_like_class_folders(tmp_path):
    """ImageNet's validation set as distributed is one flat folder and a CSV (Kaggle's LOC_val_solution.csv:
    a header, then the image id and its synset followed by boxes)."""
    flat = tmp_path / "val"
    for k in range(4):
        _save(flat / f"ILSVRC2012_val_0000000{k + 1}.JPEG", _flat(10 * k))
    rows = ["ImageId,PredictionString", "ILSVRC2012_val_00000002,n01484850 1 2 3 4 n01484850 5 6 7 8",
            "ILSVRC2012_val_00000001,n01443537 0 0 9 9", "ILSVRC2012_val_00000004,n01443537 1 1 2 2",
            "ILSVRC2012_val_00000003,n01440764 3 3 4 4", "ILSVRC2012_val_00000099,n01440764 3 3 4 4"]  # fmt: skip
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    dataset = ImageFolder(flat, split="val", size=16, labels=str(tmp_path / "LOC_val_solution.csv"))
    by_image = {Path(dataset[i]["path"]).stem[-1]: int(dataset[i]["label"]) for i in range(len(dataset))}
    assert by_image == {"1": 1, "2": 2, "3": 0, "4": 1} and dataset.num_classes == 1000  # ImageNet indices
    assert dataset.class_names == ["n01440764", "n01443537", "n01484850"]  # the row of a missing image: left out
    # class indices or names, with the file's extension or without; class_range as for folders
    (tmp_path / "ids.csv").write_text("".join(f"ILSVRC2012_val_0000000{k + 1}.JPEG,{label}\n"
                                              for k, label in enumerate([10, 2, 10, 7])))  # fmt: skip
    ids = ImageFolder(flat, split="val", size=16, labels=str(tmp_path / "ids.csv"))
    assert sorted(int(ids[i]["label"]) for i in range(4)) == [2, 7, 10, 10] and ids.num_classes == 11
    assert ImageFolder(flat, size=16, labels=str(tmp_path / "ids.csv"), class_range=[1, 2]).class_names == ["7"]
    (tmp_path / "names.csv").write_text("".join(f"ILSVRC2012_val_0000000{k + 1},{name}\n"
                                                for k, name in enumerate(["wren", "auk", "wren", "tern"])))  # fmt: skip
    names = ImageFolder(flat, split="val", size=16, labels=str(tmp_path / "names.csv"))
    assert names.class_names == ["auk", "tern", "wren"] and names.num_classes == 3
    assert {Path(names[i]["path"]).stem[-1]: int(names[i]["label"]) for i in range(4)} == {"1": 2, "2": 0, "3": 2, "4": 1}
    # what stops the run, in one line each
    (tmp_path / "short.csv").write_text("\n".join(rows[:3]))
    with pytest.raises(DataError, match=r"2 of 4 images have no row in .*short.csv \(e.g. ILSVRC2012_val_00000003"):
        ImageFolder(flat, labels=str(tmp_path / "short.csv"))
    with pytest.raises(DataError, match=r"labels file .*nowhere.csv not found"):
        ImageFolder(flat, labels=str(tmp_path / "nowhere.csv"))
    (tmp_path / "bare.csv").write_text("ILSVRC2012_val_00000001\n")
    with pytest.raises(DataError, match=r"bare.csv:1: no class after the image name"):
        ImageFolder(flat, labels=str(tmp_path / "bare.csv"))
    (tmp_path / "image.csv").write_bytes((flat / "ILSVRC2012_val_00000001.JPEG").read_bytes())  # no text at all
    with pytest.raises(DataError, match=r"image.csv: not a CSV text file \(UnicodeDecodeError\); give the CSV"):
        ImageFolder(flat, labels=str(tmp_path / "image.csv"))
    with pytest.raises(DataError, match=r"no class sub-folders; .* add labels: <a CSV file of image, class>"):
        ImageFolder(flat)


def test_a_plugins_dense_target_is_cropped_and_resized_with_the_image():
    """A key of the image's size that the sample format does not know (a plugin's depth map, say) follows the
    image through the resize and the crop: floating point bilinearly, integer by nearest; others stay."""
    from unirestore.framework.data.sample import fit_to_size, make_sample

    height, width = 40, 60
    ramp = torch.arange(width, dtype=torch.float32).expand(height, width)  # value = column
    hq = ramp.expand(3, height, width) / width
    sample = make_sample(hq)
    sample["depth"] = ramp[None].clone()  # (1, H, W) float
    sample["parts"] = (ramp // 10).long()  # (H, W) integer ids 0..5
    sample["points"] = torch.zeros(7, 2)  # not of the image's size: kept as is
    for train in (True, False):
        out = fit_to_size(sample, 32, train, np.random.default_rng(3))
        assert out["depth"].shape == (1, 32, 32) and out["parts"].shape == (32, 32)
        assert torch.equal(out["points"], sample["points"])
        # the same window as the image: the depth map reads the image's columns back
        torch.testing.assert_close(out["depth"][0] / width, out["hq"][0], atol=0.02, rtol=0)
        assert out["parts"].dtype == torch.int64 and set(out["parts"].unique().tolist()) <= set(range(6))
    upscaled = fit_to_size(sample, 48, True, np.random.default_rng(0))  # short side 40 < 48: resized first
    assert upscaled["depth"].shape == (1, 48, 48)
    torch.testing.assert_close(upscaled["depth"][0] / width, upscaled["hq"][0], atol=0.03, rtol=0)
