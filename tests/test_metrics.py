"""Metrics on constructed inputs whose values are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from unirestore.framework import metrics


def test_psnr_of_identical_images_is_finite_and_capped():
    images = torch.rand(2, 3, 32, 32)
    value = metrics.psnr(images, images)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, torch.full((2,), metrics.PSNR_CAP_DB))


def test_psnr_of_known_noise_matches_the_formula():
    target = torch.full((1, 3, 16, 16), 128 / 255)
    sign = (torch.arange(16 * 16).reshape(16, 16) % 2) * 2 - 1  # ±1 checkerboard
    prediction = target + sign * 4 / 255  # every pixel off by exactly 4 levels
    expected = 20 * math.log10(255 / 4)  # 10·log10(1 / (4/255)²)
    assert metrics.psnr(prediction, target).item() == pytest.approx(expected, abs=1e-3)


def test_psnr_quantises_to_8_bits_first():
    target = torch.rand(1, 3, 16, 16)
    noisy = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    mse = (metrics.quantize_8bit(noisy) - metrics.quantize_8bit(target)).pow(2).mean()
    assert metrics.psnr(noisy, target).item() == pytest.approx(10 * math.log10(1 / mse.item()), abs=1e-3)
    # a difference under half an 8-bit level vanishes
    levels = metrics.quantize_8bit(target)
    assert metrics.psnr(levels + 0.3 / 255, levels).item() == pytest.approx(metrics.PSNR_CAP_DB)


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(metrics.ssim(images, images), torch.ones(2))
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(0, 1)
    assert (metrics.ssim(noisy, images) < 0.9).all()
    assert metrics.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)).shape == (1,)  # small images work


def test_ssim_is_the_reference_one_whose_border_is_not_averaged():
    """Wang et al.'s SSIM as scikit-image computes it with their settings (a second implementation): the mean
    over the positions where the 11-pixel window lies inside the image. A restoration wrong only in its top two
    rows loses almost nothing there; a mean over the whole reflect-padded map (0.84 here) would not be it."""
    from skimage.metrics import structural_similarity

    target = torch.randint(0, 256, (2, 3, 24, 30), generator=torch.Generator().manual_seed(0))
    prediction = target.clone()
    prediction[..., :2, :] = 255 - prediction[..., :2, :]  # the top two rows inverted
    noisy = (target + torch.randint(-40, 41, target.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
    for restored in (prediction, noisy):
        expected = [
            structural_similarity(t.numpy(), r.numpy(), data_range=255, channel_axis=0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False)
            for r, t in zip(restored, target)
        ]  # fmt: skip
        torch.testing.assert_close(metrics.ssim(restored / 255, target / 255), torch.tensor(expected).float(),
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert (metrics.ssim(prediction / 255, target / 255) > 0.99).all()


@pytest.mark.parametrize("side", [1, 2, 3, 5])
def test_ssim_of_images_narrower_than_its_window(side):
    images = torch.rand(2, 3, side, 40, generator=torch.Generator().manual_seed(side))
    torch.testing.assert_close(metrics.ssim(images, images), torch.ones(2))
    assert (metrics.ssim(images, 1 - images) < 0.9).all()


def test_image_quality_accumulates_the_mean_over_images():
    a, b = torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16)
    ta, tb = torch.rand_like(a), torch.rand_like(b)
    quality = metrics.ImageQuality()
    first = quality.update(a, ta)  # the batch's per-image values
    quality.update(b, tb)
    expected = torch.cat([metrics.psnr(a, ta), metrics.psnr(b, tb)]).mean().item()
    assert quality.compute()["psnr"] == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(first["psnr"], metrics.psnr(a, ta))
    torch.testing.assert_close(first["ssim"], metrics.ssim(a, ta))


def test_mean_iou_on_constructed_masks():
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    prediction = torch.tensor([[[0, 1, 1, 1, 0]]])  # the last pixel is ignored
    # class 0: intersection 1, union 2 → 1/2; class 1: intersection 2, union 3 → 2/3
    assert metrics.mean_iou(prediction, target, num_classes=3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    logits = torch.nn.functional.one_hot(prediction, 3).permute(0, 3, 1, 2).float()
    assert metrics.mean_iou(logits, target, num_classes=3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert metrics.mean_iou(target.clamp(max=2), target, num_classes=3) == pytest.approx(1.0)


def test_mean_iou_per_image_is_each_images_own_and_the_set_pools_pixels():
    target = torch.tensor([[[0, 0, 1, 1, 255]], [[2, 2, 2, 2, 2]]])
    prediction = torch.tensor([[[0, 1, 1, 1, 0]], [[2, 2, 2, 2, 0]]])
    accumulated = metrics.MeanIoU(num_classes=3)
    per_image = accumulated.update(prediction, target)
    # image 0: classes 0 and 1 as above; image 1: class 2 at 4/5, class 0 predicted once and absent: 0
    torch.testing.assert_close(per_image, torch.tensor([(1 / 2 + 2 / 3) / 2, (4 / 5 + 0) / 2]))
    # the set: class 0 intersection 1, union 3; class 1 2/3; class 2 4/5 — not the mean of the images'
    assert accumulated.compute() == pytest.approx((1 / 3 + 2 / 3 + 4 / 5) / 3)


def test_accuracy_on_constructed_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0], [9.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1, -100])  # the last one has no label
    assert metrics.accuracy(logits, labels) == pytest.approx(3 / 4)
    accumulated = metrics.Accuracy()
    accumulated.update(logits[:2], labels[:2])
    per_image = accumulated.update(logits[2:], labels[2:])
    assert accumulated.compute() == pytest.approx(3 / 4)
    torch.testing.assert_close(per_image, torch.tensor([0.0, 1.0, float("nan")]), equal_nan=True)


def _boxes():
    return [
        {
            "boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0], [30.0, 30.0, 60.0, 50.0]]),
            "labels": torch.tensor([0, 3]),
        },
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
    ]


def test_map_of_perfect_boxes_is_one():
    targets = _boxes()
    predictions = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    result = metrics.coco_map(predictions, targets)
    assert result["map"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)


def test_map_of_no_boxes_is_zero():
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert metrics.coco_map([empty, empty], _boxes())["map"] == 0.0


def test_map_of_wrong_classes_is_zero_and_accumulates():
    targets = _boxes()
    wrong = [
        {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"] + 5}
        for t in targets
    ]
    assert metrics.coco_map(wrong, targets)["map"] == pytest.approx(0.0)
    accumulated = metrics.DetectionMAP()
    for target in targets:
        prediction = {**target, "scores": torch.ones(len(target["labels"]))}
        accumulated.update([prediction], [target["boxes"]], [target["labels"]])
    assert accumulated.compute()["map"] == pytest.approx(1.0)


def test_map_by_hand_reads_xyxy_boxes_and_the_right_stats():
    """COCO's AP by hand: a box shifted 2 px has IoU 80/120 = 2/3 with its xyxy ground truth (read as xywh it
    would be 0.75), so it matches at the thresholds .50-.65, 4 of the 10: `map` 0.4, `map50` 1. A second image
    whose box is missed caps recall at 1/2: precision 1 at 51 of the 101 recall points."""
    box = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]]), "labels": torch.tensor([1])}
    shifted = {"boxes": torch.tensor([[12.0, 10.0, 22.0, 20.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    one = metrics.coco_map([shifted], [box])
    assert one == {"map": pytest.approx(0.4), "map50": pytest.approx(1.0)}
    half = metrics.coco_map([shifted, none], [box, box])
    assert half == {"map": pytest.approx(0.4 * 51 / 101), "map50": pytest.approx(51 / 101)}


def _coco_eval(dataset: dict, detections: list[dict]) -> list[float]:
    """pycocotools' own mAP and mAP@.5 of `detections` against a COCO ground-truth dict."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = dataset
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(value) for value in evaluation.stats[:2]]


def test_map_treats_ignored_boxes_as_coco_crowd_regions():
    """One image: an object found exactly (score .9) and a crowd region [30, 60)² with a detection inside it
    (score .95, IoU 400/900 < .5 but all of it inside the region). With the crowd box dropped, that detection
    is a false positive ranked first: AP 0.5 at every threshold; counted as an ordinary box (which it does not
    match), the region is a miss as well: 0.5 · 51/101. As an ignore region it is neither right nor wrong: 1.0,
    what pycocotools gives on the COCO ground truth with `iscrowd` 1."""
    target = {"boxes": torch.tensor([[4.0, 4.0, 24.0, 24.0], [30.0, 30.0, 60.0, 60.0]]), "labels": torch.tensor([1, 1])}
    found = {"boxes": torch.tensor([[4.0, 4.0, 24.0, 24.0], [35.0, 35.0, 55.0, 55.0]]), "scores": torch.tensor([0.9, 0.95]),
             "labels": torch.tensor([1, 1])}  # fmt: skip
    dropped = {k: v[:1] for k, v in target.items()}
    assert metrics.coco_map([found], [dropped]) == {"map": pytest.approx(0.5), "map50": pytest.approx(0.5)}
    assert metrics.coco_map([found], [target])["map"] == pytest.approx(0.5 * 51 / 101)
    crowd = {**target, "ignore": torch.tensor([False, True])}
    assert metrics.coco_map([found], [crowd]) == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    dataset = {
        "images": [{"id": 1}],
        "categories": [{"id": 1}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 30, 30], "area": 900, "iscrowd": 1},
        ],
    }
    detections = [{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9},
                  {"image_id": 1, "category_id": 1, "bbox": [35, 35, 20, 20], "score": 0.95}]  # fmt: skip
    assert [metrics.coco_map([found], [crowd])[k] for k in ("map", "map50")] == pytest.approx(_coco_eval(dataset, detections))
    # an ignored box nothing detects is no miss (counted, it halves the recall); a sample's key name works too
    alone = {k: v[:1] for k, v in found.items()}
    assert metrics.coco_map([alone], [target])["map"] == pytest.approx(51 / 101)
    assert metrics.coco_map([alone], [{**target, "box_ignore": torch.tensor([False, True])}])["map"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="1 ignore flags for 2 boxes"):
        metrics.coco_map([found], [{**target, "ignore": torch.tensor([True])}])


def test_detection_map_carries_ignore_flags_and_leaves_ignored_alone_images_undefined():
    boxes = [torch.tensor([[4.0, 4.0, 24.0, 24.0], [30.0, 30.0, 60.0, 60.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    labels = [torch.tensor([0, 0]), torch.tensor([0])]
    ignore = [torch.tensor([False, True]), torch.tensor([True])]  # the second image: a crowd region alone
    none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    predictions = [{"boxes": boxes[0], "scores": torch.tensor([0.9, 0.95]), "labels": labels[0]}, none]
    flagged, counted = metrics.DetectionMAP(), metrics.DetectionMAP()
    flagged.update(predictions, boxes, labels, ignore)
    counted.update(predictions, boxes, labels)  # no flags: every box is one to find, the third one missed
    assert flagged.compute()["map"] == pytest.approx(1.0) and counted.compute()["map"] == pytest.approx(67 / 101)
    per_image = flagged.per_image()["map"]
    assert per_image[0] == pytest.approx(1.0) and torch.isnan(per_image[1])  # nothing to find there
    assert counted.per_image()["map"].tolist() == [pytest.approx(1.0), 0.0]


def test_map_at_r_by_hand_on_unnormalised_embeddings():
    """Two classes of three on a circle, leave-one-out by angle (R = 2 per query): the first two neighbours
    of 0°, 10°, 47° | 30°, 85°, 95° are [right, wrong], [right, wrong], [wrong, right], [wrong, wrong],
    [right, wrong], [right, wrong]; AP@R = Σ precision@i · right_i / R gives 1/2, 1/2, 1/4, 0, 1/2, 1/2.
    Lengths differ from 1: the similarity is the cosine."""
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 47.0, 30.0, 85.0, 95.0]))
    lengths = torch.tensor([1.0, 3.0, 0.5, 2.0, 7.0, 0.2])
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1) * lengths[:, None]
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    result = metrics.retrieval_metrics(embeddings, labels)
    assert result == {"recall_at_1": pytest.approx(4 / 6), "map_at_r": pytest.approx(2.25 / 6)}
    assert metrics.retrieval_hits(embeddings, labels).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_recall_at_1_on_a_constructed_embedding():
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 25.0, 90.0]))
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    # nearest neighbours by angle: 0→10 (same), 10→0 (same), 25→10 (other class), 90→25 (same)
    result = metrics.retrieval_metrics(embeddings, labels)
    assert result["recall_at_1"] == pytest.approx(3 / 4)
    clusters = torch.eye(4).repeat_interleave(3, dim=0) + 0.01 * torch.randn(12, 4)
    perfect = metrics.retrieval_metrics(clusters, torch.arange(4).repeat_interleave(3))
    assert perfect == {"recall_at_1": pytest.approx(1.0), "map_at_r": pytest.approx(1.0)}


def test_retrieval_without_possible_matches_is_zero():
    assert metrics.retrieval_metrics(torch.randn(3, 4), torch.tensor([0, 1, 2])) == {
        "recall_at_1": 0.0,
        "map_at_r": 0.0,
    }
    accumulated = metrics.Retrieval()
    accumulated.update(torch.randn(4, 4), torch.tensor([0, 0, -100, 1]))
    assert set(accumulated.compute()) == {"recall_at_1", "map_at_r"}


def test_retrieval_hits_per_query_average_to_recall_at_1():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # class 3 occurs once: no possible match
    embeddings = torch.nn.functional.one_hot(labels, 4).float() + 0.8 * torch.randn(9, 4)
    hits = metrics.retrieval_hits(embeddings, labels)
    assert torch.isnan(hits[8]) and not torch.isnan(hits[:8]).any()
    assert set(hits[:8].tolist()) <= {0.0, 1.0} and 0 < hits[:8].sum() < 8  # some right, some wrong
    assert hits[:8].mean().item() == pytest.approx(metrics.retrieval_metrics(embeddings, labels)["recall_at_1"])
    # the accumulator puts each value back at its image; unlabelled images are not scored
    accumulated = metrics.Retrieval()
    accumulated.update(embeddings[:4], labels[:4])
    accumulated.update(torch.randn(2, 4), torch.tensor([-100, -100]))
    accumulated.update(embeddings[4:], labels[4:])
    per_image = accumulated.per_image()["recall_at_1"]
    assert per_image.shape == (11,) and torch.isnan(per_image[4:6]).all()
    torch.testing.assert_close(torch.cat([per_image[:4], per_image[6:]]), hits, equal_nan=True)


def test_detection_map_per_image_is_each_images_own():
    boxes = [torch.tensor([[2.0, 2.0, 12.0, 12.0]]), torch.tensor([[5.0, 5.0, 20.0, 25.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1]), torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    predictions = [
        {"boxes": boxes[0], "scores": torch.ones(1), "labels": labels[0]},  # exact
        {"boxes": boxes[1] + 40, "scores": torch.ones(1), "labels": labels[1]},  # far off
        {"boxes": boxes[0], "scores": torch.ones(1), "labels": labels[0]},  # nothing to find
    ]
    accumulated = metrics.DetectionMAP()
    accumulated.update(predictions, boxes, labels)
    per_image = accumulated.per_image()
    assert per_image["map"][:2].tolist() == [pytest.approx(1.0), 0.0] and torch.isnan(per_image["map"][2])
    assert per_image["map50"][:2].tolist() == [pytest.approx(1.0), 0.0]
