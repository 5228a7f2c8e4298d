"""The data config (strict parsing), per-task dataset building and the weighted mix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unirestore.framework.data.builtin import BuiltinPhotos
from unirestore.framework.data.compose import Degraded, WeightedConcat
from unirestore.framework.data.config import (
    DATASET_TYPES,
    build_task_dataset,
    build_task_datasets,
    load_data_config,
    parse_data_config,
)
from unirestore.framework.data.io import DataError
from unirestore.framework.data.sample import collate


@pytest.fixture()
def hq_root(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path


def _write(tmp_path, text: str):
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return path


def test_parse_a_full_config(tmp_path, hq_root):
    path = _write(
        tmp_path,
        f"""
size: 32
seed: 5
degradation: {{corruptions: [clean, gaussian_noise, rain], severity_probs: [0.2, 0.2, 0.2, 0.2, 0.2]}}
tasks:
  pir:
    - {{type: hq_folder, root: {hq_root}, weight: 2}}
    - {{type: builtin_photos, length: 4, weight: 0.5, corruption: noise25}}
  cls: [{{type: builtin_scenes, length: 6, max_objects: 2}}]
  seg: [{{type: cityscapes, root: /data/cityscapes, split: val, weight: 10}}]
""",
    )
    config = load_data_config(path)
    assert config.size == 32 and config.seed == 5
    assert config.degradation.corruptions == ["clean", "gaussian_noise", "rain"]
    pir = config.tasks["pir"]
    assert pir[0].type == "hq_folder" and pir[0].weight == 2.0 and str(pir[0].options["root"]) == str(hq_root)
    assert pir[1].corruption == ["noise25"] and pir[1].options == {"length": 4}
    assert config.tasks["seg"][0].split == "val" and config.tasks["seg"][0].weight == 10
    assert config.tasks["cls"][0].options == {"length": 6, "max_objects": 2}
    del config.tasks["seg"]  # no Cityscapes here
    datasets = build_task_datasets(config, "train")
    pir_set = datasets["pir"]
    assert isinstance(pir_set, WeightedConcat) and len(pir_set) == 3 * 2 + 2
    # a held-out split scores each image once, whatever the training weight
    assert len(build_task_datasets(config, "test")["pir"]) == 3 + 4
    batch = collate([pir_set[i] for i in range(len(pir_set))])  # folder and generated samples batch together
    assert batch["hq"].shape == batch["lq"].shape == (8, 3, 32, 32)
    assert (
        set(batch["corruption"][:6]) <= {"clean", "gaussian_noise", "rain"}
        and batch["corruption"][6:] == ["noise25"] * 2
    )
    cls_batch = collate([datasets["cls"][i] for i in range(6)])
    assert cls_batch["label"].shape == (6,) and cls_batch["mask"].shape == (6, 32, 32)


@pytest.mark.parametrize(
    "text, message",
    [
        # a typo's closest key comes first, before the list of them all
        ("sise: 32", r"data.yaml: sise: unknown key 'sise'; did you mean 'size'\? valid keys: size, seed, degr"),
        (
            "tasks: {pir: [{type: hq_foldr, root: /x}]}",
            r"tasks.pir\[0\].type: unknown dataset type 'hq_foldr'; valid: hq_folder",
        ),
        (
            "tasks: {pir: [{type: hq_folder, rot: /x}]}",
            r"tasks.pir\[0\] \(hq_folder\): unknown key 'rot'; did you mean 'root'\? valid keys: type, weight, split"
            + r".*root, recursive",
        ),
        ("tasks: {pir: [{type: hq_folder}]}", r"\(hq_folder\): missing required key\(s\) root"),
        (
            "tasks: {pir: [{type: hq_folder, root: /x, weight: many}]}",
            r"\(hq_folder\).weight: expected float, got 'many'",
        ),
        ("tasks: {pir: [{type: hq_folder, root: /x, weight: 0}]}", r"weight: must be positive"),
        (
            "tasks: {pir: [{type: hq_folder, root: /x, corruption: fogg}]}",
            r"corruption: unknown degradation 'fogg'; known: clean",
        ),
        ("tasks: {pir: [{type: hq_folder, root: /x, split: training}]}", r"split: unknown split 'training'"),
        ("tasks: {seg: [{type: foggy_cityscapes, root: /x, beta: dense}]}", r"\(foggy_cityscapes\).beta: "),
        ("degradation: {severity: 7}", r"degradation: severity must be an integer in 1..5"),
        (
            "degradation: {corruption: [fog]}",
            r"degradation: unknown key 'corruption'; did you mean 'corruptions'\? valid keys: corruptions",
        ),
        # no key is close: no guess
        ("tasks: {pir: [{type: hq_folder, root: /x, zzz: 1}]}", r"\(hq_folder\): unknown key 'zzz'; valid keys: "),
        ("size: 8", r"size: must be at least 32"),
        ("tasks: [pir]", r"tasks: expected a mapping"),
        ("size: 64\ntasks: {pir: [{type: hq_folder, root: /x}\n", r"not valid YAML at line 3; fix the syntax$"),
    ],
)
def test_bad_configs_name_the_file_and_the_key(tmp_path, text, message):
    with pytest.raises(DataError, match=message) as error:
        load_data_config(_write(tmp_path, text))
    assert str(error.value).startswith(str(tmp_path / "data.yaml")) and "\n" not in str(error.value)


def test_every_type_is_documented_by_its_constructor():
    for name, cls in DATASET_TYPES.items():
        assert cls.__doc__, name
    config = parse_data_config(
        {"tasks": {"det": [{"type": "rtts", "root": "/data/RTTS", "skip_difficult": True}]}}
    )
    assert config.tasks["det"][0].options["skip_difficult"] is True


def test_weighted_concat_repeat_factors_and_epochs():
    small = BuiltinPhotos("train", size=32, length=10)
    large = BuiltinPhotos("val", size=32, length=20)
    mix = WeightedConcat([small, large], [3, 0.25], seed=1)
    assert len(mix) == 30 + 5
    located = [mix.locate(i) for i in range(len(mix))]
    first = [inner for d, inner in located if d == 0]
    # each image of the small set appears 3 times, as 3 different virtual indices (fresh crops)
    assert sorted(v % 10 for v in first) == sorted(list(range(10)) * 3) and len(set(first)) == 30
    second = [inner for d, inner in located if d == 1]
    assert len(set(second)) == 5 and all(v < 20 for v in second)
    mix.set_epoch(1)
    assert [mix.locate(i)[1] for i in range(30, 35)] != second  # another subset next epoch
    assert mix[0]["path"] != mix[1]["path"]
    with pytest.raises(IndexError):
        mix[35]
    with pytest.raises(ValueError, match="positive"):
        WeightedConcat([small], [0])


def test_task_dataset_is_deterministic_by_seed_and_loader_safe(hq_root):
    config = parse_data_config(
        {"size": 32, "tasks": {"pir": [{"type": "hq_folder", "root": str(hq_root), "weight": 2}]}}
    )
    a = build_task_dataset(config.tasks["pir"], "train", 32, seed=3, degradation=config.degradation)
    b = build_task_dataset(config.tasks["pir"], "train", 32, seed=3, degradation=config.degradation)
    c = build_task_dataset(config.tasks["pir"], "train", 32, seed=4, degradation=config.degradation)
    assert all(torch.equal(a[i]["lq"], b[i]["lq"]) for i in range(len(a)))
    assert any(not torch.equal(a[i]["hq"], c[i]["hq"]) for i in range(len(a)))
    assert isinstance(a.datasets[0], Degraded)
    loader = DataLoader(a, batch_size=3, num_workers=2, collate_fn=collate)
    lq = torch.cat([batch["lq"] for batch in loader])
    assert torch.equal(lq, torch.stack([a[i]["lq"] for i in range(len(a))]))


def test_a_value_the_dataset_class_refuses_is_a_data_error(tmp_path):
    config = load_data_config(_write(tmp_path, "size: 32\ntasks: {pir: [{type: builtin_photos, leaves: 2.0}]}"))
    with pytest.raises(DataError, match=r"builtin_photos: leaves must be a share in \[0, 1\], got 2.0"):
        build_task_datasets(config, "train")


def test_the_shipped_paper_config_parses_with_the_release_mix():
    """`experiments/configs/paper.yaml`, named in the README, is a valid data config with the release's weights."""
    from pathlib import Path

    config = load_data_config(Path(__file__).parents[1] / "experiments" / "configs" / "paper.yaml")
    weights = {task: [entry.weight for entry in entries] for task, entries in config.tasks.items()}
    assert weights == {"pir": [1.0, 1.0, 1.0, 1.0], "cls": [0.2, 1.0], "seg": [10.0], "det": [1.0], "ret": [1.0, 1.0]}
    assert [entry.options["class_range"] for entry in config.tasks["ret"]] == [[0, 100], [100, 200]]
    assert [entry.type for entry in config.tasks["pir"]] == ["hq_folder"] * 4
    # the training folders serve training only; a held-out set serves validation and the final table
    for task in ("pir", "cls", "ret"):
        splits = [entry.splits for entry in config.tasks[task]]
        assert splits[-1] == ["val", "test"] and all(s == ["train"] for s in splits[:-1])
    assert config.size == 512 and config.degradation.severity is None
    from unirestore.framework.degrade import TRAIN_CORRUPTIONS

    assert config.degradation.corruptions == list(TRAIN_CORRUPTIONS)  # clean + the 15 ImageNet-C, as released


def test_the_shipped_release_run_config_names_every_downstream_model_its_tasks_load(tmp_path):
    """`experiments/configs/release.yaml`, named in the README: a valid run config whose downstream_checkpoints
    hold the key of every real model the cls, seg and det tasks load (each then reports its file as missing
    here, not its key as unset)."""
    from pathlib import Path

    from unirestore.framework import downstream
    from unirestore.framework.config import load_run_config
    from unirestore.framework.data.config import DatasetEntry
    from unirestore.framework.registry import get_task_class
    from unirestore.tasks.base import TaskContext

    config = load_run_config(Path(__file__).parents[1] / "experiments" / "configs" / "release.yaml")
    assert config.prior == "/models/sd-turbo" and config.tasks == ["pir", "seg", "cls"]
    assert config.train.batch_size * 8 == 48 and config.train.precision == "fp32"
    checkpoints = config.downstream_checkpoints
    loads = [(name, kind) for name in ("cls", "seg") for kind in get_task_class(name).kinds]
    for name, kind in loads:
        load = getattr(downstream, get_task_class(name).real_loader)
        with pytest.raises(downstream.DownstreamError, match=r"not found: downstream_checkpoints\.\w+ = /models/"):
            load(kind, checkpoints)
    assert len(loads) == 4
    entries = [DatasetEntry(type="image_folder", options={"root": str(tmp_path)})]  # any real entry
    detection = get_task_class("det")(TaskContext(data=entries, size=64, checkpoints=checkpoints))
    with pytest.raises(downstream.DownstreamError, match=r"not found: downstream_checkpoints\.retinanet"):
        detection.prepare()


def _photos(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return folder


def test_the_data_configs_size_sets_the_crops_unless_the_run_sets_crop_size(tmp_path, tiny_prior):
    """`size` in the data config was ignored: every run cropped at train.crop_size or the prior's native size."""
    from unirestore.framework.config import load_run_config
    from unirestore.framework.engine import build_tasks

    root = _photos(tmp_path / "hq", [(120, 100), (130, 110)])

    def crop(text, *overrides):
        path = tmp_path / f"data{len(text)}-{len(overrides)}.yaml"
        path.write_text(text + f"tasks:\n  pir: [{{type: hq_folder, root: {root}}}]\n")
        config = load_run_config(None, [f"data={path}", *overrides])
        size = config.train.crop_size or tiny_prior.native_size  # what the engine gives the tasks
        task = build_tasks(config, ["pir"], torch.device("cpu"), size)["pir"]
        return tuple(task.dataset("train")[0]["hq"].shape[-2:])

    native = tiny_prior.native_size
    assert crop("") == (native, native)  # no size: the run's
    assert crop("size: 48\n") == (48, 48)  # the file's
    assert crop("size: 48\n", "train.crop_size=40") == (40, 40)  # the run's, set, wins
    assert crop("size: null\n") in {(100, 120), (110, 130)}  # full images


def test_evaluation_on_full_images_of_several_sizes(tmp_path, tiny_prior):
    """size: null gives images of different sizes: evaluated one at a time where a batch would not stack,
    and padded to one size for the grids."""
    from unirestore.framework.evaluate import evaluate
    from unirestore.framework.model import UniRestore
    from unirestore.framework.registry import get_task_class
    from unirestore.tasks.base import TaskContext

    root = _photos(tmp_path / "hq", [(70, 64), (64, 90), (80, 72)])
    data = parse_data_config({"size": None, "tasks": {"pir": [{"type": "hq_folder", "root": str(root)}]}})
    task = get_task_class("pir")(TaskContext(data=data, size=tiny_prior.native_size))
    model = UniRestore(tiny_prior, tasks=["pir"])
    table = evaluate(model, [task], split="test", samples=3, batch_size=2)
    lq, restored, hq = table.examples["pir"]
    assert lq.shape == restored.shape == hq.shape == (3, 3, 90, 80)  # the tallest and the widest
    dataset = task.dataset("test")
    for k in range(3):
        height, width = dataset[k]["lq"].shape[-2:]
        assert (lq[k, :, height:, :] == 1).all() and (lq[k, :, :, width:] == 1).all()  # white below and beside
        assert lq[k, :, :height, :width].ne(1).any()
    whole = table.results["pir"]["restored"]["psnr"]
    # the same images tile by tile (their padded sides, 96, exceed 64): bounded memory, another float path
    tiled = evaluate(model, [task], split="test", samples=3, batch_size=2, tile_size=64).results["pir"]["restored"]
    assert whole > 0 and tiled["psnr"] > 0 and tiled["psnr"] != whole


def test_entries_serve_only_their_splits(tmp_path):
    """A training folder listed with splits: [train] never feeds validation or the table (ImageNet's train
    images were evaluated as its test set when the file listed only them)."""
    train = _photos(tmp_path / "train", [(40, 40)] * 3)
    held_out = _photos(tmp_path / "val", [(50, 50)] * 2)
    config = parse_data_config({
        "size": None,
        "tasks": {"pir": [{"type": "hq_folder", "root": str(train), "splits": ["train"]},
                          {"type": "hq_folder", "root": str(held_out), "splits": ["val", "test"]}]},
    })  # fmt: skip
    built = {split: build_task_datasets(config, split)["pir"] for split in ("train", "val", "test")}
    assert len(built["train"]) == 3 and len(built["val"]) == len(built["test"]) == 2
    assert {tuple(built["train"][i]["hq"].shape) for i in range(3)} == {(3, 40, 40)}
    assert {tuple(built["test"][i]["hq"].shape) for i in range(2)} == {(3, 50, 50)}
    only_train = parse_data_config({"tasks": {"pir": [{"type": "hq_folder", "root": str(train), "splits": ["train"]}]}})
    with pytest.raises(DataError, match=r"no dataset of tasks.pir serves the test split.*splits: \[test\]"):
        build_task_datasets(only_train, "test")
    with pytest.raises(DataError, match=r"splits: unknown split 'tset'"):
        parse_data_config({"tasks": {"pir": [{"type": "hq_folder", "root": str(train), "splits": ["tset"]}]}})


def test_a_registered_dataset_type_is_a_checked_data_config_type(tmp_path, monkeypatch):
    from unirestore.framework.data import config as data_config
    from unirestore.framework.data.adapters import HQFolder
    from unirestore.framework.data.config import register_dataset_type

    monkeypatch.setattr(data_config, "DATASET_TYPES", dict(data_config.DATASET_TYPES))

    @register_dataset_type("depth_folder")
    class DepthFolder(HQFolder):
        def __init__(self, root: Path, split="train", size=256, seed=0, max_depth: float = 10.0):
            self.max_depth = max_depth
            super().__init__(root, split, size, seed)

    config = load_data_config(_write(tmp_path, "tasks: {pir: [{type: depth_folder, root: /x, max_depth: 80}]}"))
    assert config.tasks["pir"][0].options == {"root": Path("/x"), "max_depth": 80.0}
    with pytest.raises(DataError, match=r"\(depth_folder\)\.max_depth: expected float, got .far."):
        load_data_config(_write(tmp_path, "tasks: {pir: [{type: depth_folder, root: /x, max_depth: far}]}"))
    with pytest.raises(DataError, match=r"unknown key 'max_dept'; did you mean 'max_depth'\? valid keys: .*max_"):
        load_data_config(_write(tmp_path, "tasks: {pir: [{type: depth_folder, root: /x, max_dept: 1}]}"))
    with pytest.raises(ValueError, match="'hq_folder' is registered twice"):
        register_dataset_type("hq_folder", DepthFolder)
    assert register_dataset_type("depth_folder", DepthFolder) is DepthFolder  # the same class again is fine


def test_the_task_keys_are_checked_against_the_registry(tmp_path):
    """A typo in a task key fails at parse time with the known tasks; an alias keys its task's entries."""
    with pytest.raises(DataError, match=r"tasks\.segm: unknown task 'segm'; known tasks: .*seg \(segmentation\)"):
        load_data_config(_write(tmp_path, "tasks: {pir: [{type: builtin_photos}], segm: [{type: builtin_scenes}]}"))
    config = load_data_config(_write(tmp_path, "tasks: {restoration: [{type: builtin_photos}]}"))
    assert list(config.tasks) == ["pir"]
    with pytest.raises(DataError, match=r"tasks\.pir: listed twice"):
        load_data_config(_write(tmp_path, "tasks: {pir: [{type: builtin_photos}], restoration: [{type: builtin_photos}]}"))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "tasks: {cls: [{type: hq_folder, root: /x}]}",
            r"tasks\.cls\[0\] \(hq_folder\): .* task 'cls', its samples have no label; use .*: image_folder, builtin_scenes",
        ),
        (
            "tasks: {seg: [{type: builtin_scenes}, {type: image_folder, root: /x}]}",
            r"tasks\.seg\[1\] \(image_folder\): .* no mask; use a type that gives them: cityscapes, foggy_cityscapes, acdc",
        ),
        (
            "tasks: {detection: [{type: builtin_photos}]}",
            r"tasks\.det\[0\] \(builtin_photos\): .* no boxes, box_labels; use a type that gives them: coco, rtts",
        ),
        (
            "tasks: {pir: [{type: hq_folder, root: /x, degrade: false}]}",
            r"tasks\.pir\[0\] \(hq_folder\): .* no lq; drop degrade: false",
        ),
    ],
)
def test_a_type_that_cannot_serve_its_task_is_refused_when_read(tmp_path, text, message):
    """Else a cls run on a folder of unlabelled images scored 0 accuracy, and seg a NaN mIoU, without a word."""
    with pytest.raises(DataError, match=message) as error:
        load_data_config(_write(tmp_path, text))
    assert str(error.value).startswith(str(tmp_path / "data.yaml")) and "\n" not in str(error.value)


def test_every_task_is_served_by_its_built_in_type_and_the_real_types_of_its_kind():
    from unirestore.framework.registry import get_task_class, known_tasks

    for task in known_tasks():
        builtin = get_task_class(task).builtin_type
        if builtin is not None:
            parse_data_config({"tasks": {task: [{"type": builtin}]}})
    real = {
        "pir": ["hq_folder", "paired_folder", "gopro", "reside", "image_folder", "cityscapes", "coco"],
        "cls": ["image_folder"], "ret": ["image_folder"], "seg": ["cityscapes", "foggy_cityscapes", "acdc"],
        "det": ["coco", "rtts"],
    }  # fmt: skip
    for task, types in real.items():
        parse_data_config({"tasks": {task: [{"type": name, "root": "/x"} for name in types]}})
    parse_data_config({"tasks": {"pir": [{"type": "paired_folder", "root": "/x", "degrade": False}]}})


def test_relative_paths_are_read_from_the_data_configs_own_folder(tmp_path, monkeypatch):
    """They were read from the working directory: the file worked only from the folder it was written for."""
    _photos(tmp_path / "photos", [(40, 40)] * 2)
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "data.yaml"
    path.write_text(
        "size: 32\ntasks:\n"
        "  pir: [{type: hq_folder, root: ../photos}, {type: hq_folder, root: /elsewhere, splits: [val]}]\n"
        "  seg: [{type: cityscapes, root: ../cityscapes, labels_root: gt}]\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_data_config("../cfg/data.yaml")  # the file named from another folder
    pir, seg = config.tasks["pir"], config.tasks["seg"]
    assert [entry.options["root"] for entry in pir] == [str(tmp_path / "photos"), "/elsewhere"]
    assert seg[0].options == {"root": str(tmp_path / "cityscapes"), "labels_root": str(tmp_path / "cfg" / "gt")}
    assert len(build_task_dataset(pir, "train", 32)) == 2
    # a mapping parsed without a file keeps its paths for the working directory
    raw = parse_data_config({"tasks": {"pir": [{"type": "hq_folder", "root": "photos"}]}})
    assert raw.tasks["pir"][0].options["root"] == "photos"


def test_an_entry_feeding_training_and_the_test_split_from_the_same_files_is_named(tmp_path):
    from unirestore.framework.data.config import training_images_in_test

    config = parse_data_config(
        {
            "tasks": {
                "pir": [
                    {"type": "hq_folder", "root": "/data/DIV2K_train_HR"},  # every split: named
                    {"type": "hq_folder", "root": "/data/DIV2K_valid_HR", "splits": ["val", "test"]},
                    {"type": "paired_folder", "root": "/data/Rain100L", "splits": ["train"]},
                ],
                "seg": [{"type": "cityscapes", "root": "/data/cityscapes"}],  # reads leftImg8bit/<split>
                "cls": [{"type": "image_folder", "root": "/data/imagenet/train", "split": "train"}],  # pinned
                "det": [{"type": "rtts", "root": "/data/RTTS"}, {"type": "builtin_scenes"}],
            }
        }
    )
    messages = training_images_in_test(config, ["pir", "seg", "cls", "det"], source="paper.yaml")
    assert len(messages) == 2
    assert messages[0].startswith("paper.yaml: tasks.pir[0] (hq_folder /data/DIV2K_train_HR) serves training")
    assert messages[1].startswith("paper.yaml: tasks.det[0] (rtts /data/RTTS)")
    assert all("splits: [train]" in message for message in messages)
    (val,) = training_images_in_test(config, ["pir", "seg"], source="paper.yaml", split="val")  # a sweep's
    assert "tasks.pir[0]" in val and "the sweep's objective scores images the model trained on" in val
