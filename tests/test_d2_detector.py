"""The detectron2 detector adapter, against a stand-in with detectron2's calling conventions (fake_detectron2)."""

from __future__ import annotations

import pickle
import sys

import fake_detectron2
import numpy as np
import pytest
import torch

from unirestore.framework.d2_detector import Detectron2Detector, load_detectron2_detector
from unirestore.framework.downstream import Detector, DownstreamError, load_real_detector
from unirestore.tasks.det import COCO_CATEGORY_IDS, DetectionEvaluator, coco_label_map


@pytest.fixture
def d2():
    with fake_detectron2.installed() as module:
        yield module


def _scene(height=48, width=64):
    """A red box (x 10-30, y 8-24) and a blue one (x 40-56, y 30-44) on black; RGB in [0, 1]."""
    image = torch.zeros(3, height, width)
    image[0, 8:24, 10:30] = 1.0
    image[2, 30:44, 40:56] = 1.0
    return image, torch.tensor([[10.0, 8.0, 30.0, 24.0]])


def _detector(d2, size=96, input_format="BGR"):
    cfg = d2.get_cfg()
    cfg.INPUT.FORMAT = input_format
    if input_format == "RGB":  # an RGB model's config gives its means and deviations in RGB order
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = cfg.MODEL.PIXEL_MEAN[::-1], cfg.MODEL.PIXEL_STD[::-1]
    return Detectron2Detector(d2.RedFinder(cfg), 80, size, size, input_format)


@pytest.mark.parametrize("input_format", ["BGR", "RGB"])
def test_predictions_come_back_in_the_input_pixels(d2, input_format):
    """Upscaled 1.5× for the model, in its channel order: the red box, not the blue one, at its own pixels;
    the task's evaluator scores that as a perfect mAP."""
    detector = _detector(d2, input_format=input_format)
    assert isinstance(detector, Detector)
    image, box = _scene()
    (prediction,) = detector.predict(image[None])
    assert prediction["labels"].tolist() == [fake_detectron2.RED_CLASS]
    assert torch.allclose(prediction["boxes"], box, atol=1.0)

    evaluator = DetectionEvaluator(detector, label_map=torch.tensor([0, 1, 2, fake_detectron2.RED_CLASS]))
    evaluator.update(image[None], {"boxes": [box], "box_labels": [torch.tensor([3])]})
    assert evaluator.compute()["map50"] == pytest.approx(1.0)


def test_losses_are_differentiable_with_frozen_statistics(d2):
    detector = _detector(d2)
    image, box = _scene()
    images = image[None].clone().requires_grad_(True)
    statistics = detector.model.norm.running_mean.clone(), detector.model.norm.running_var.clone()

    losses = detector.losses(images, [{"boxes": box, "labels": torch.tensor([3])}])
    assert set(losses) == {"classification", "box"}
    # the boxes were scaled with the image: the model's box at 96 × 72 is the target's
    assert losses["box"].item() < 1.5
    wrong = detector.losses(images, [{"boxes": box + 10, "labels": torch.tensor([3])}])
    assert wrong["box"].item() > 10 and wrong["classification"].item() > losses["classification"].item()

    (losses["classification"] + losses["box"]).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.equal(detector.model.norm.running_mean, statistics[0])
    assert torch.equal(detector.model.norm.running_var, statistics[1])
    assert not detector.model.training


def test_faster_rcnn_terms_are_summed_by_kind(d2, monkeypatch):
    detector = _detector(d2)
    terms = {"loss_cls": 1.0, "loss_box_reg": 2.0, "loss_rpn_cls": 3.0, "loss_rpn_loc": 4.0}
    monkeypatch.setattr(
        detector.model, "forward", lambda inputs: {k: torch.tensor(v) for k, v in terms.items()}
    )
    image, box = _scene()
    losses = detector.losses(image[None], [{"boxes": box, "labels": torch.tensor([3])}])
    assert losses["classification"].item() == 4.0 and losses["box"].item() == 6.0


def _config(tmp_path, **model):
    path = tmp_path / "retinanet.yaml"
    path.write_text(
        f"MODEL:\n  META_ARCHITECTURE: RetinaNet\n  RETINANET:\n    NUM_CLASSES: {model.get('classes', 80)}\n"
    )
    return path


def _weights(d2, tmp_path, name="model_final.pkl", protocol=4, **changes):
    state = {k: v.numpy() for k, v in d2.RedFinder(d2.get_cfg()).state_dict().items()}
    state["score.bias"] = np.array([0.25], dtype=np.float32)  # to see that the file was read
    state.update(changes)
    path = tmp_path / name
    if name.endswith(".pkl"):
        with path.open("wb") as file:
            pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, file, protocol=protocol)
    else:
        torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    return path


@pytest.mark.parametrize(
    ("name", "protocol"), [("model_final.pkl", 2), ("model_final.pkl", 5), ("model_final.pth", 4)]
)
def test_load_from_a_config_and_weights(d2, tmp_path, name, protocol):
    """A .pkl as Python 2 (Detectron1's zoo), 3 and 3.14 pickle numpy arrays, and a .pth."""
    checkpoints = {
        "detectron2_config": str(_config(tmp_path)),
        "detectron2_weights": str(_weights(d2, tmp_path, name, protocol)),
    }
    detector = load_real_detector(checkpoints, 96)  # the key picks detectron2 over torchvision's RetinaNet
    assert isinstance(detector, Detectron2Detector)
    assert detector.num_classes == 80 and detector.min_size == detector.max_size == 96
    assert detector.model.score.bias.item() == 0.25
    assert not any(p.requires_grad for p in detector.parameters())


def test_model_zoo_names_are_found(d2, tmp_path, monkeypatch):
    monkeypatch.setitem(
        d2.ZOO, "COCO-Detection/retinanet_R_50_FPN_3x.yaml", str(_config(tmp_path, classes=5))
    )
    checkpoints = {"detectron2_config": "COCO-Detection/retinanet_R_50_FPN_3x.yaml",
                   "detectron2_weights": str(_weights(d2, tmp_path))}  # fmt: skip
    assert load_detectron2_detector(checkpoints, 64).num_classes == 5


class _Shell:
    def __reduce__(self):
        return (print, ("this ran",))


def test_bad_inputs_are_one_line_errors(d2, tmp_path, capsys):
    config = str(_config(tmp_path))
    cases = {
        "neither a file nor a detectron2 model-zoo config": {"detectron2_config": "COCO/nope.yaml"},
        "set downstream_checkpoints.detectron2_weights": {"detectron2_config": config},
        "missing \\['score.weight'\\]": {
            "detectron2_config": config,
            "detectron2_weights": str(_weights(d2, tmp_path, "partial.pkl")),
        },
        "wrong shapes \\['score.weight'\\]": {
            "detectron2_config": config,
            "detectron2_weights": str(
                _weights(d2, tmp_path, "other.pkl", **{"score.weight": np.zeros((2, 3, 1, 1))})
            ),
        },
    }
    del_key = tmp_path / "partial.pkl"
    with del_key.open("rb") as file:
        data = pickle.load(file)
    del data["model"]["score.weight"]
    with del_key.open("wb") as file:
        pickle.dump(data, file)
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text("MODEL:\n  RETINANETT: {}\n")
    cases["not a detectron2 config \\(.*RETINANETT"] = {"detectron2_config": str(bad_key)}
    shell = tmp_path / "shell.pkl"
    shell.write_bytes(pickle.dumps({"model": _Shell(), "__author__": "x"}))
    cases["shell.pkl: not a readable detectron2 .pkl \\(refusing builtins.print"] = {"detectron2_config": config, "detectron2_weights": str(shell)}
    odd = tmp_path / "odd.pkl"
    odd.write_bytes(pickle.dumps({"model": {"score.weight": "text"}, "__author__": "x"}))
    cases["does not load into the detectron2 model.*Unsupported type"] = {
        "detectron2_config": config,
        "detectron2_weights": str(odd),
    }
    cases["LazyConfig \\(.py\\) files are not read"] = {"detectron2_config": "new_baselines/retinanet.py"}
    for message, checkpoints in cases.items():
        with pytest.raises(DownstreamError, match=message) as error:
            load_detectron2_detector(checkpoints, 64)
        assert "\n" not in str(error.value)
    assert "this ran" not in capsys.readouterr().out
    with pytest.raises(DownstreamError) as error:  # said once, not wrapped in another message
        load_detectron2_detector({"detectron2_config": config, "detectron2_weights": str(shell)}, 64)
    assert str(error.value).startswith(f"{shell}: not a readable detectron2 .pkl")


def test_without_detectron2_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # `import detectron2` raises ImportError
    with pytest.raises(DownstreamError, match="detectron2 is not installed: install it"):
        load_real_detector({"detectron2_config": "x.yaml", "detectron2_weights": "w.pkl"}, 64)


def test_coco_label_maps():
    rtts = ["person", "bicycle", "car", "motorbike", "bus"]
    assert coco_label_map(91, None, rtts).tolist() == [1, 2, 3, 4, 6]  # torchvision's COCO ids
    assert coco_label_map(80, None, rtts).tolist() == [0, 1, 2, 3, 5]  # detectron2's contiguous classes
    assert coco_label_map(80, [1, 90, 13], None).tolist() == [0, 79, 11]
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[-1] == 90
    assert coco_label_map(80, [1, 12], None) is None  # 12 is no COCO class: the dataset's own labels
    assert coco_label_map(91, None, ["cat", "dog"]) is None


def test_the_detection_task_runs_a_detectron2_model_on_rtts(d2, tmp_path):
    """RTTS names map to detectron2's contiguous COCO classes (motorbike → 3); the task's loss and mAP go
    through the adapter."""
    from PIL import Image

    from unirestore.framework.data.config import DatasetEntry
    from unirestore.framework.data.sample import collate
    from unirestore.framework.registry import get_task_class
    from unirestore.tasks.base import TaskContext

    image, box = _scene()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / "JPEGImages" / "a.png")
    x0, y0, x1, y1 = box[0].int().tolist()
    (tmp_path / "Annotations" / "a.xml").write_text(
        f"<annotation><object><name>motorbike</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
        f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>"
    )  # VOC boxes are 1-based, inclusive
    checkpoints = {
        "detectron2_config": str(_config(tmp_path)),
        "detectron2_weights": str(_weights(d2, tmp_path)),
    }
    entries = [DatasetEntry(type="rtts", options={"root": str(tmp_path)})]
    task = get_task_class("det")(TaskContext(data=entries, size=96, checkpoints=checkpoints))
    task.prepare()
    assert task._labels().tolist() == [0, 1, 2, 3, 5]  # person, bicycle, car, motorbike, bus
    assert task.downstream().min_size == task.downstream().max_size == 96  # the data's size by default
    sized = get_task_class("det")(TaskContext(data=entries, size=96, checkpoints=checkpoints, detector_size=800))
    assert sized.downstream().min_size == 800  # RunConfig.detector_size

    batch = collate([task.dataset("test")[0]])
    assert batch["box_labels"][0].tolist() == [3]
    losses = task.losses(batch["hq"], batch)
    assert set(losses) == {"loss/det_classification", "loss/det_box"} and losses["loss/det_box"].item() < 0.2
    evaluator = task.evaluator()
    evaluator.update(batch["hq"], batch)
    assert evaluator.compute()["map50"] == pytest.approx(1.0)
    assert evaluator.per_image()["map50"].tolist() == [pytest.approx(1.0)]  # eval_images.csv's value
