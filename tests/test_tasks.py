"""The task contract, run over every registered task, plus the registry's plugin and lookup behaviour.

Built-in downstream models train with tiny budgets here (2 steps on a handful of scenes): the contract is
about shapes, keys, gradients and caching, not accuracy.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import time

import pytest
import torch

from unirestore.framework import downstream, registry
from unirestore.framework.data.config import DatasetEntry
from unirestore.framework.data.sample import collate
from unirestore.framework.registry import UnknownTaskError, get_task_class, known_tasks
from unirestore.tasks.base import Evaluator, Task, TaskContext

TASKS = known_tasks()
SIZE = 64
TINY_BUDGET = {"batch_size": 4, "train_scenes": 8, "val_scenes": 8}


@pytest.fixture(scope="module", autouse=True)
def tiny_budgets():
    """Every built-in downstream model trains for 2 steps on 8 scenes while this module runs."""
    patch = pytest.MonkeyPatch()
    for arch, defaults in downstream.BUILTIN_DEFAULTS.items():
        patch.setitem(downstream.BUILTIN_DEFAULTS, arch, {**defaults, **TINY_BUDGET})
    patch.setenv(downstream.STEPS_ENV, "2")
    yield
    patch.undo()


@pytest.fixture(scope="module")
def tasks(tiny_budgets) -> dict[str, Task]:
    """One instance of every registered task with built-in data, prepared as a run prepares it before its
    losses or metric are used (its downstream models trained, loaded or checked), sharing the session's
    downstream cache."""
    built = {}
    for name in TASKS:
        if get_task_class(name).builtin_type is not None:
            built[name] = get_task_class(name)(TaskContext(size=SIZE))
            built[name].prepare()
    return built


def _skip_without_builtin_data(name: str) -> None:
    if get_task_class(name).builtin_type is None:
        pytest.skip(
            f"task '{name}' has no built-in data (builtin_type None), which the contract tests run it on; give it "
            "a generated dataset type of its own as builtin_type (tasks/base.py)"
        )


def _prepared(tasks: dict[str, Task], name: str) -> Task:
    """The task `name` of the `tasks` fixture; a task without built-in data is skipped, saying why."""
    _skip_without_builtin_data(name)
    return tasks[name]


def _batch(task: Task, count: int = 3) -> dict:
    dataset = task.dataset("train")
    return collate([dataset[i] for i in range(count)])


def test_builtin_tasks_are_registered():
    assert {"pir", "cls", "seg", "det", "ret"} <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_task_declares_its_contract(name):
    cls = get_task_class(name)
    assert issubclass(cls, Task) and cls.name == name
    assert cls.description and cls.metric_names and cls.loss_weights
    assert cls.default_beta > 0
    assert isinstance(cls.anchor_to_pir, bool)


@pytest.mark.parametrize("name", TASKS)
def test_dataset_yields_the_keys_the_task_needs(tasks, name):
    task = _prepared(tasks, name)
    sample = task.dataset("val")[0]
    for key in getattr(task, "sample_keys", ("hq", "lq")):
        assert key in sample, f"{name} samples lack {key!r}"
    assert sample["hq"].shape == sample["lq"].shape == (3, SIZE, SIZE)
    assert 0.0 <= float(sample["lq"].min()) and float(sample["lq"].max()) <= 1.0


@pytest.mark.parametrize("name", TASKS)
def test_losses_are_named_finite_and_differentiable(tasks, name):
    task = _prepared(tasks, name)
    batch = _batch(task)
    restored = batch["lq"].clone().requires_grad_(True)
    terms = task.losses(restored, batch)
    assert terms, f"{name} returned no loss term"
    for key, value in terms.items():
        assert key.startswith(f"loss/{name}_"), key
        assert value.ndim == 0 and math.isfinite(float(value.detach())), (key, value)
    (gradient,) = torch.autograd.grad(sum(terms.values()), restored)
    assert torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0, f"{name}'s loss does not reach the restored images"


@pytest.mark.parametrize("name", TASKS)
def test_loss_weights_come_from_the_task_configuration(tasks, name):
    task = _prepared(tasks, name)
    batch = _batch(task)
    doubled = type(task)(task.context, {term: 2.0 * weight for term, weight in task.weights.items()})
    if hasattr(task, "downstream"):
        doubled.downstream = task.downstream  # same frozen model, no reload
    plain, scaled = task.losses(batch["lq"], batch), doubled.losses(batch["lq"], batch)
    assert plain.keys() == scaled.keys()
    for key in plain:
        torch.testing.assert_close(scaled[key], 2.0 * plain[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", TASKS)
def test_evaluator_reports_every_metric_on_random_predictions(tasks, name):
    task = _prepared(tasks, name)
    evaluator = task.evaluator()
    assert isinstance(evaluator, Evaluator)
    for start in (0, 4):
        dataset = task.dataset("val")
        batch = collate([dataset[i] for i in range(start, start + 4)])
        evaluator.update(torch.rand_like(batch["lq"]), batch)
    metrics = evaluator.compute()
    assert set(task.metric_names) <= set(metrics), (task.metric_names, metrics)
    for key in task.metric_names:
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (key, metrics[key])


@pytest.mark.parametrize("name", TASKS)
def test_downstream_models_are_frozen(tasks, name):
    model = _prepared(tasks, name).downstream()
    if model is None:
        return
    if isinstance(model, torch.nn.Module):
        model.train()  # a parent's train() must not unfreeze it
        assert not model.training and not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", TASKS)
def test_prepare_caches_and_a_second_call_is_a_no_op(name, tmp_path):
    _skip_without_builtin_data(name)
    task = get_task_class(name)(TaskContext(size=SIZE, home=tmp_path))
    task.prepare()
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    if task.downstream() is None:
        assert files == {}
        return
    assert not [n for n in files if n.endswith(".tmp")], "a temporary file was left behind"
    for spec in task.builtin_specs():  # the built-in models' cache (a task's own model caches as it likes)
        assert f"{spec.name}.safetensors" in files
        record = json.loads((tmp_path / f"{spec.name}.json").read_text())
        assert {"architecture", "training", "clean_val", "train_seconds"} <= set(record)
        assert record["training"]["steps"] == 2
    start = time.perf_counter()
    get_task_class(name)(TaskContext(size=SIZE, home=tmp_path)).prepare()
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files


def test_a_network_of_a_tasks_own_stays_frozen_in_frozen_network():
    """What `test_downstream_models_are_frozen` asks of every task's model, for a plugin's own network (the
    built-in wrappers that give it are private)."""
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    frozen = downstream.FrozenNetwork(network)
    torch.nn.ModuleList([frozen]).train()  # a parent put in train mode
    assert not any(m.training for m in frozen.modules()) and not any(p.requires_grad for p in frozen.parameters())
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    statistics = network[1].running_mean.clone()
    torch.testing.assert_close(frozen(images), network(images))  # its forward; no dropout
    assert torch.equal(network[1].running_mean, statistics)
    (gradient,) = torch.autograd.grad(frozen(images).sum(), images)
    assert gradient.abs().sum() > 0


def test_prepare_force_retrains(tmp_path):
    task = get_task_class("ret")(TaskContext(size=SIZE, home=tmp_path))
    task.prepare(steps=1)
    assert json.loads((tmp_path / "embedder-64.json").read_text())["training"]["steps"] == 1
    task.prepare(steps=2)  # cached: a different budget alone does not retrain
    assert json.loads((tmp_path / "embedder-64.json").read_text())["training"]["steps"] == 1
    task.prepare(force=True, steps=2)
    assert json.loads((tmp_path / "embedder-64.json").read_text())["training"]["steps"] == 2


def test_a_task_may_generate_its_own_built_in_data(monkeypatch):
    """`builtin_type` naming a generated dataset type of the task's own: it was built with a `length` its
    constructor may not take (a TypeError), and a type never registered failed with a KeyError."""
    from unirestore.framework.data import config as data_config
    from unirestore.framework.data.io import DataError
    from unirestore.framework.data.sample import make_sample

    monkeypatch.setattr(data_config, "DATASET_TYPES", dict(data_config.DATASET_TYPES))

    @data_config.register_dataset_type("blobs")
    class Blobs(torch.utils.data.Dataset):  # a fixed set drawn in memory: no `length`
        sample_keys = ("hq", "blob")

        def __init__(self, split="train", size=64, seed=0):
            self.images = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(seed))

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            image = self.images[index]
            return {**make_sample(image), "blob": image.mean(dim=0, keepdim=True)}

    @data_config.register_dataset_type("endless_blobs")
    class EndlessBlobs(Blobs):
        def __init__(self, split="train", size=64, seed=0, length=3):
            super().__init__(split, size, seed)
            self.length = length

        def __len__(self):
            return self.length

        def __getitem__(self, index):
            return super().__getitem__(index % 5)

    class BlobTask(Task):
        name, builtin_type, sample_keys = "blobs", "blobs", ("hq", "lq", "blob")

    test = BlobTask(TaskContext(size=32)).dataset("test")
    assert len(test) == 5 and test[0]["lq"].shape == (3, 32, 32) and test[0]["blob"].shape == (1, 32, 32)
    BlobTask.builtin_type = "endless_blobs"  # one that takes a length gets the built-in data's
    assert len(BlobTask(TaskContext(size=32)).dataset("val")) == downstream.BUILTIN_LENGTHS["val"]
    BlobTask.builtin_type = "never_registered"
    with pytest.raises(DataError, match="builtin_type 'never_registered' is not a dataset type; register it"):
        BlobTask(TaskContext(size=32)).dataset("train")


@pytest.mark.parametrize("listed", [False, True])
def test_a_task_may_ask_for_its_training_images_clean(monkeypatch, listed):
    """`dataset(split, degrade=False)`: the same images without drawing a degradation for each (a task that
    trains a model of its own on clean images would pay for corruptions it throws away), from built-in data
    or a data config's entries."""
    from unirestore.framework import degrade
    from unirestore.framework.data.config import parse_data_config

    data = parse_data_config({"tasks": {"cls": [{"type": "builtin_scenes", "corruption": ["fog"]}]}}) if listed else None
    task = get_task_class("cls")(TaskContext(data=data, size=32))
    degraded = task.dataset("train")
    samples = [degraded[index] for index in range(4)]
    assert all("lq" in sample for sample in samples)
    assert not listed or {sample["corruption"] for sample in samples} == {"fog"}

    def refuse(*args, **kwargs):
        raise AssertionError("a degradation was drawn for a clean image")

    monkeypatch.setattr(degrade.Degrader, "__call__", refuse)
    clean = task.dataset("train", degrade=False)
    assert len(clean) == len(degraded)
    for index, sample in enumerate(samples):
        assert "lq" not in clean[index] and "corruption" not in clean[index]
        assert torch.equal(clean[index]["hq"], sample["hq"]) and clean[index]["label"] == sample["label"]


def test_a_plugins_own_generated_type_in_a_data_config_is_built_in_data(monkeypatch):
    """A data config naming a plugin task's own generated type (its `builtin_type`) is built-in data, as one
    naming builtin_scenes is: the task uses its built-in downstream model, not a real checkpoint, and generated
    data needs a crop size. The registry says which types are generated, not a fixed list."""
    from unirestore.framework.data import config as data_config
    from unirestore.framework.data.io import DataError
    from unirestore.framework.data.sample import make_sample
    from unirestore.framework.downstream import DownstreamError, checkpoint_path

    monkeypatch.setattr(data_config, "DATASET_TYPES", dict(data_config.DATASET_TYPES))
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))

    @data_config.register_dataset_type("plugin_blobs")
    class Blobs(torch.utils.data.Dataset):
        sample_keys = ("hq",)

        def __init__(self, split="train", size=64, seed=0, length=4):
            self.size, self.length = size, length

        def __len__(self):
            return self.length

        def __getitem__(self, index):
            return make_sample(torch.rand(3, self.size, self.size))

    @registry.register_task
    class BlobTask(Task):
        name, builtin_type = "blob_plugin", "plugin_blobs"

        def prepare(self, force=False, steps=None):  # a real network on real data; its own one on built-in data
            if not self._builtin():
                checkpoint_path(self.context.checkpoints, "blob_net", "blob network")

        def losses(self, restored, batch):
            return {"loss/blob_plugin": restored.mean()}

    def listing(entry: dict, **config):
        return data_config.parse_data_config({**config, "tasks": {"blob_plugin": [entry]}})

    for type_name in ("plugin_blobs", "builtin_scenes"):
        task = BlobTask(TaskContext(data=listing({"type": type_name}), size=32))
        assert task._builtin() and downstream.context_is_builtin(task.context, "blob_plugin")
        task.prepare()  # no real checkpoint asked for
        assert task.dataset("train")[0]["hq"].shape == (3, 32, 32)
        with pytest.raises(DataError, match=f"{type_name}: generated data needs a size; set `size`"):
            BlobTask(TaskContext(data=listing({"type": type_name}, size=None))).dataset("train")
    # a real type stays real data: the plugin asks for its checkpoint
    real = BlobTask(TaskContext(data=listing({"type": "hq_folder", "root": "/x"})))
    assert not real._builtin()
    with pytest.raises(DownstreamError, match="set downstream_checkpoints.blob_net"):
        real.prepare()


def test_pir_loss_is_selectable(tasks):
    batch = _batch(tasks["pir"])
    pir = get_task_class("pir")
    assert set(pir().losses(batch["lq"], batch)) == {"loss/pir_l1"}
    mse = pir(loss_weights={"l1": 0.0, "mse": 10.0}).losses(batch["lq"], batch)
    assert set(mse) == {"loss/pir_mse"}
    expected = 10.0 * torch.nn.functional.mse_loss(batch["lq"], batch["hq"])
    torch.testing.assert_close(mse["loss/pir_mse"], expected)
    with pytest.raises(ValueError, match="positive weight"):
        pir(loss_weights={"l1": 0.0})
    with pytest.raises(ValueError, match="no loss term"):
        pir(loss_weights={"l2": 1.0})


def test_real_data_without_a_checkpoint_names_the_config_key(tmp_path):
    entries = [DatasetEntry(type="image_folder", options={"root": str(tmp_path)})]
    for name, key in (("cls", "resnet50"), ("seg", "deeplabv3_resnet50"), ("det", "retinanet_resnet50_fpn")):
        task = get_task_class(name)(TaskContext(data=entries, size=SIZE))
        with pytest.raises(downstream.DownstreamError, match=f"downstream_checkpoints.{key}"):
            task.prepare()
    missing = TaskContext(data=entries, checkpoints={"resnet50": str(tmp_path / "nope.pth")})
    with pytest.raises(downstream.DownstreamError, match="not found: downstream_checkpoints.resnet50"):
        get_task_class("ret")(missing).prepare()


def test_detection_accepts_any_detector_protocol(tasks):
    from unirestore.tasks.det import Detector

    class ConstantDetector:
        def losses(self, images, targets):
            value = images.mean()
            return {"classification": value, "box": 2 * value}

        def predict(self, images):
            box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
            return [
                {"boxes": box, "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.long)}
            ] * len(images)

    assert isinstance(tasks["det"].downstream(), Detector)
    task = get_task_class("det")(TaskContext(size=SIZE))
    task.use_detector(ConstantDetector())
    batch = _batch(task)
    terms = task.losses(batch["lq"], batch)
    torch.testing.assert_close(terms["loss/det_box"], 2 * terms["loss/det_classification"])
    evaluator = task.evaluator()
    evaluator.update(batch["lq"], batch)
    assert 0.0 <= evaluator.compute()["map"] <= 1.0
    with pytest.raises(TypeError, match="Detector"):
        task.use_detector(object())


# --------------------------------------------------------------------------------------------------
# Registry


class _EntryPoint:
    def __init__(self, name, value, load):
        self.name, self.value, self._load = name, value, load

    def load(self):
        return self._load()


def test_a_broken_plugin_is_reported_and_skipped(monkeypatch, capsys):
    class PluginTask(Task):
        name = "plugin_demo"
        metric_names = ("score",)

        def losses(self, restored, batch):
            return {"loss/plugin_demo": restored.mean()}

    class Clash(PluginTask):
        name = "seg"  # a built-in's name

    class Nameless(PluginTask):
        name = ""

    class NoLosses(Task):
        name = "no_losses"

    def broken():
        raise ImportError("No module named 'missing_dependency'")

    points = [
        _EntryPoint("broken", "broken_pkg.tasks", broken),
        _EntryPoint("good", "good_pkg:PluginTask", lambda: PluginTask),
        _EntryPoint("clash", "clash_pkg:Clash", lambda: Clash),
        _EntryPoint("nameless", "nameless_pkg:Nameless", lambda: Nameless),
        _EntryPoint("no_losses", "nl_pkg:NoLosses", lambda: NoLosses),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: points)
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    monkeypatch.setattr(registry, "_BROKEN", {})
    names = registry.known_tasks()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("warning: task plugin '") for line in lines)  # one line each
    broken = registry.broken_plugins()
    assert "missing_dependency" in broken["broken"]
    assert "its name 'seg' is taken by unirestore.tasks.seg" in broken["clash"] and "has no `name`" in broken["nameless"]
    assert "defines no losses" in broken["no_losses"]
    assert {"pir", "cls", "seg", "det", "ret", "plugin_demo"} <= set(names) and "no_losses" not in names
    assert registry.get_task_class("seg") is not Clash
    assert registry.task_source("plugin_demo").startswith("plugin ")
    # a data config naming a type the broken plugin would have registered says why it is missing
    from unirestore.framework.data.config import parse_data_config
    from unirestore.framework.data.io import DataError

    with pytest.raises(DataError, match=r"unknown dataset type 'edge_folder'.*failed to load: broken: .*missing_dep"):
        parse_data_config({"tasks": {"pir": [{"type": "edge_folder", "root": "/x"}]}})


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError) as error:
        get_task_class("segmentaton")
    message = str(error.value)
    assert "segmentaton" in message
    for name in TASKS:
        assert name in message
    assert "det (detection)" in message and "seg (segmentation)" in message


def test_a_file_in_tasks_that_is_not_imported_is_named_in_the_lookup_error(monkeypatch, tmp_path):
    """A task file dropped into tasks/ without its import in tasks/__init__.py registered nothing, and looking
    its task up said only "unknown task"."""
    import unirestore.tasks

    for name in ("pir.py", "base.py", "edges.py"):
        (tmp_path / name).write_text("")
    monkeypatch.setattr(unirestore.tasks, "__path__", [str(tmp_path)])
    assert registry.unimported_task_files() == ["tasks/edges.py"]  # pir is imported; base holds no task
    with pytest.raises(UnknownTaskError, match=r"tasks/edges.py not imported in tasks/__init__.py.*add it there"):
        get_task_class("edges")
    from typer.testing import CliRunner

    from unirestore.framework.cli import app

    listing = CliRunner().invoke(app, ["task", "list", "--output", str(tmp_path / "runs")])
    assert listing.exit_code == 0, listing.output
    assert "tasks/edges.py is not imported in tasks/__init__.py: its tasks are not registered" in " ".join(
        listing.stdout.split()
    )


def test_aliases_resolve_to_the_registered_name():
    assert registry.resolve_task_name("detection") == "det"
    assert get_task_class("classification") is get_task_class("cls")
    assert registry.parse_task_list("pir,segmentation,seg,classification") == ["pir", "seg", "cls"]
    assert registry.task_key("detection") == "det" and registry.task_key("nope") == "nope"


def test_a_name_or_alias_already_taken_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    for name, aliases, owner in (("clash", ("seg",), "seg"), ("clash", ("detection",), "det"), ("detection", (), "det")):
        task_cls = type("Clash", (Task,), {"name": name, "aliases": aliases})
        with pytest.raises(ValueError, match=f"already names task '{owner}'"):
            registry.register_task(task_cls)
        assert name not in registry._TASKS
    registry.register_task(type("Fine", (Task,), {"name": "fine", "aliases": ("finer",)}))
    assert registry.resolve_task_name("finer") == "fine"


def test_real_classifier_loads_a_local_checkpoint(tmp_path):
    import timm

    network = timm.create_model("resnet50", pretrained=False, num_classes=7)
    torch.save({"state_dict": network.state_dict()}, tmp_path / "r50.pth")
    classifier = downstream.load_real_classifier("resnet", {"resnet50": str(tmp_path / "r50.pth")})
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    logits = classifier(images)  # resized to 224 and normalised inside
    assert logits.shape == (2, 7)
    (gradient,) = torch.autograd.grad(logits.sum(), images)
    assert gradient.abs().sum() > 0
    # a stage trained with train.precision=bf16 hands it bf16 images under autocast (on the CPU too)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = classifier(images.detach().bfloat16())
    assert (half.float() - logits.detach()).abs().max() < 0.05 * logits.detach().abs().max()  # bf16 rounding
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(downstream.DownstreamError, match="does not fit"):
        downstream.load_real_classifier("resnet", {"resnet50": str(tmp_path / "other.pth")})
    # a whole pickled model (torch.save(model)) is refused without running its code, with the fix
    torch.save({"model": network}, tmp_path / "whole.pth")
    with pytest.raises(downstream.DownstreamError) as refused:
        downstream.load_real_classifier("resnet", {"resnet50": str(tmp_path / "whole.pth")})
    assert "holds a pickled Python object (timm.models.resnet.ResNet)" in str(refused.value)
    assert "torch.save(model.state_dict(), path)" in str(refused.value) and "\n" not in str(refused.value)


def test_detection_evaluator_maps_detector_labels_back():
    from unirestore.tasks.det import COCO_IDS, DetectionEvaluator

    box = torch.tensor([[5.0, 5.0, 30.0, 30.0]])

    class CocoDetector:  # predicts COCO id 3 ("car") and id 9 (no RTTS class)
        def losses(self, images, targets):
            return {}

        def predict(self, images):
            return [
                {
                    "boxes": box.repeat(2, 1),
                    "scores": torch.tensor([0.9, 0.8]),
                    "labels": torch.tensor([3, 9]),
                }
            ]

    rtts_to_coco = torch.tensor([COCO_IDS[n] for n in ("person", "bicycle", "car", "motorbike", "bus")])
    evaluator = DetectionEvaluator(CocoDetector(), rtts_to_coco)
    evaluator.update(torch.rand(1, 3, 64, 64), {"boxes": [box], "box_labels": [torch.tensor([2])]})
    assert evaluator.map.predictions[0]["labels"].tolist() == [2]  # car, in RTTS labels; id 9 dropped
    assert evaluator.compute()["map"] == pytest.approx(1.0)


def test_detection_neither_trains_on_nor_scores_ignore_regions():
    """A crowd region (a sample's `box_ignore`) is left out of the detector's targets, before the labels are
    mapped to the detector's; the evaluator passes the flags on, so the detection inside the region is not a
    false positive (mAP 1.0). A batch without the flags counts every box, as before."""
    from unirestore.framework.data.sample import make_sample

    seen = []

    class RecordingDetector:  # labels: dataset 0 -> detector 1, dataset 1 -> detector 3
        def losses(self, images, targets):
            seen.append(targets)
            return {"classification": images.mean(), "box": images.mean()}

        def predict(self, images):
            boxes = torch.tensor([[4.0, 4.0, 24.0, 24.0], [35.0, 35.0, 55.0, 55.0], [40.0, 0.0, 50.0, 10.0]])
            return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.95, 0.8]), "labels": torch.tensor([3, 3, 1])}]

    task = get_task_class("det")(TaskContext(size=SIZE))
    task.use_detector(RecordingDetector(), label_map=torch.tensor([1, 3]))
    sample = make_sample(
        torch.rand(3, SIZE, SIZE),
        boxes=[[4.0, 4.0, 24.0, 24.0], [30.0, 30.0, 60.0, 60.0], [40.0, 0.0, 50.0, 10.0]],
        box_labels=[1, 1, 0],
        box_ignore=[False, True, False],
    )
    batch = collate([sample])
    task.losses(batch["hq"], batch)
    assert seen[-1][0]["boxes"].tolist() == [[4, 4, 24, 24], [40, 0, 50, 10]] and seen[-1][0]["labels"].tolist() == [3, 1]
    evaluator = task.evaluator()
    evaluator.update(batch["hq"], batch)
    assert evaluator.compute()["map"] == pytest.approx(1.0)
    unflagged = {key: value for key, value in batch.items() if key != "box_ignore"}
    task.losses(batch["hq"], unflagged)
    assert seen[-1][0]["labels"].tolist() == [3, 3, 1]
    evaluator = task.evaluator()
    evaluator.update(batch["hq"], unflagged)  # the region counted: a miss, and the detection in it a false positive
    assert evaluator.compute()["map"] == pytest.approx((1.0 + 0.5 * 51 / 101) / 2)


def test_a_damaged_cache_is_retrained(tmp_path):
    spec = downstream.builtin_spec("embedder", SIZE)
    downstream.builtin_model(spec, home=tmp_path, steps=1, progress=False)
    (tmp_path / "embedder-64.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="retraining"):
        model = downstream.builtin_model(spec, home=tmp_path, steps=1, progress=False)
    assert model(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 32)
    assert (tmp_path / "embedder-64.safetensors").stat().st_size > 1000
