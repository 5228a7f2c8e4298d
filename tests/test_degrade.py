"""Degradations: every name x severity runs and changes the image, draws are deterministic per (seed, index)
in any DataLoader worker, the release's severity distribution, and the folder command."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from unirestore.framework.data.builtin import BuiltinPhotos
from unirestore.framework.data.compose import Degraded
from unirestore.framework.data.io import BadFileWarning, DataError
from unirestore.framework.data.sample import collate
from unirestore.framework.degrade import (
    CORRUPTIONS,
    DEGRADATIONS,
    SEVERITY_PROBS,
    SYNTHETIC,
    TRAIN_CORRUPTIONS,
    Degrader,
    apply_degradation,
    degrade_folder,
    get_degradation,
    register_degradation,
)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 48 x 48 photo crop as (H, W, 3) uint8."""
    hq = BuiltinPhotos("train", size=48, length=1)[0]["hq"]
    return (hq * 255).round().byte().permute(1, 2, 0).numpy()


def test_registry_holds_the_release_set_and_the_benchmarks():
    assert len(CORRUPTIONS) == 15 and TRAIN_CORRUPTIONS == ("clean", *CORRUPTIONS)
    assert set(DEGRADATIONS) == {*TRAIN_CORRUPTIONS, *SYNTHETIC}
    with pytest.raises(ValueError, match="known: clean, gaussian_noise"):
        get_degradation("gausian_noise")
    with pytest.raises(ValueError, match="already registered"):
        register_degradation("rain")(lambda image, severity, rng: image)


@pytest.mark.parametrize("name", [n for n in DEGRADATIONS if n != "clean"])
def test_every_degradation_and_severity_changes_the_image(image, name):
    for severity in range(1, 6):
        out = apply_degradation(image, name, severity, seed=1)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert not np.array_equal(out, image), f"{name} severity {severity} left the image unchanged"
        assert np.array_equal(out, apply_degradation(image, name, severity, seed=1)), (
            f"{name} not deterministic"
        )


def test_clean_leaves_the_image_unchanged(image):
    for severity in range(1, 6):
        assert np.array_equal(apply_degradation(image, "clean", severity, seed=3), image)
    assert np.array_equal(Degrader(["clean"], rescale=False)(image, 0).image, image)


def test_images_under_32_pixels_are_handled(image):
    small = np.ascontiguousarray(image[:20, :24])
    assert apply_degradation(small, "glass_blur", 2, seed=0).shape == small.shape
    assert Degrader(seed=0)(torch.rand(3, 20, 24), 5).image.shape == (3, 20, 24)


def test_noise_sigma_matches_its_name():
    flat = np.full((64, 64, 3), 128, np.uint8)
    for sigma in (15, 25, 50):
        out = apply_degradation(flat, f"noise{sigma}", seed=0).astype(np.float64)
        assert abs(out.std() - sigma) < 0.1 * sigma


def test_degrader_is_deterministic_and_leaves_the_global_rng_alone(image):
    degrader = Degrader(seed=7)
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    first = [degrader(image, i) for i in range(8)]
    assert np.random.random() == before  # the corruptions' seeding did not leak out
    second = [degrader(image, i) for i in range(8)]
    for a, b in zip(first, second, strict=True):
        assert a.degradation == b.degradation and np.array_equal(a.image, b.image)
    other_epoch = [degrader.draw(i, 48, epoch=1) for i in range(8)]
    assert [d.degradation for d in first] != other_epoch


def test_severity_and_corruption_follow_the_release_distribution():
    degrader = Degrader(seed=0)
    draws = [degrader.draw(i, 256) for i in range(8000)]
    severities = np.bincount([d.severity for d in draws], minlength=6)[1:]
    assert chisquare(severities, np.asarray(SEVERITY_PROBS) * len(draws)).pvalue > 1e-3
    names = np.unique([d.corruption for d in draws], return_counts=True)[1]
    assert len(names) == 16 and chisquare(names).pvalue > 1e-3
    sides = np.array([d.short_side for d in draws])
    assert sides.min() >= 64 and sides.max() < 256  # [size/4, size)
    assert Degrader(seed=0).draw(3, 64).short_side >= 32  # never below what imagecorruptions accepts


def test_fixed_severity_and_rescale_off():
    degrader = Degrader(["fog"], severity=4, rescale=False)
    drawn = degrader.draw(0, 128)
    assert (drawn.corruption, drawn.severity, drawn.short_side) == ("fog", 4, None)
    with pytest.raises(ValueError, match="severity"):
        Degrader(severity=6)
    with pytest.raises(ValueError, match="unknown degradation"):
        Degrader(["fogg"])


def test_same_output_in_dataloader_workers_as_in_the_main_process():
    # corruptions that read numpy's global state, and the two that take a seed
    names = ("gaussian_noise", "shot_noise", "snow", "frost", "glass_blur", "impulse_noise")
    dataset = Degraded(BuiltinPhotos("val", size=48, length=6, seed=2), Degrader(names, seed=11))
    main = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
    workers = [batch for batch in loader]
    lq = torch.cat([batch["lq"] for batch in workers])
    assert torch.equal(lq, torch.stack([s["lq"] for s in main]))
    assert [name for batch in workers for name in batch["corruption"]] == [s["corruption"] for s in main]
    assert all(not torch.equal(s["lq"], s["hq"]) for s in main)


def test_degrade_folder_writes_a_degraded_copy_and_skips_bad_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    photo = BuiltinPhotos("train", size=40, length=2)
    for i, name in enumerate(["a.png", "sub/b.jpg"]):
        Image.fromarray((photo[i]["hq"] * 255).round().byte().permute(1, 2, 0).numpy()).save(src / name)
    (src / "broken.png").write_bytes(b"not an image at all")
    (src / "notes.txt").write_text("ignored")
    with pytest.warns(BadFileWarning, match="broken.png"):
        report = degrade_folder(src, dst, corruption="gaussian_noise", severity=3, seed=0, progress=False)
    assert report.written == 2 and [p.name for p, _ in report.skipped] == ["broken.png"]
    out = np.asarray(Image.open(dst / "sub" / "b.png"))
    assert out.shape == (40, 40, 3)
    with open(report.manifest) as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["output"], r["severity"]) for r in rows} == {("a.png", "3"), ("sub/b.png", "3")}
    # the same seed gives the same files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        degrade_folder(
            src, tmp_path / "again", corruption="gaussian_noise", severity=3, seed=0, progress=False
        )
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "again" / "a.png")), np.asarray(Image.open(dst / "a.png"))
    )


def test_degrade_folder_several_names_and_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((36, 36, 3), 90, np.uint8)).save(src / "x.png")
    report = degrade_folder(src, tmp_path / "out", corruption="rain,noise25", seed=1, progress=False)
    assert report.corruptions == ("rain", "noise25")
    assert (tmp_path / "out" / "rain" / "x.png").is_file() and (
        tmp_path / "out" / "noise25" / "x.png"
    ).is_file()
    with pytest.raises(ValueError, match="unknown degradation 'fogg'"):
        degrade_folder(src, tmp_path / "o2", corruption="fogg", progress=False)
    with pytest.raises(ValueError, match="inside it"):
        degrade_folder(src, src / "out", corruption="rain", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        degrade_folder(empty, tmp_path / "o3", corruption="rain", progress=False)
    # a name given twice is one degradation (written straight into DST, as one name is)
    assert degrade_folder(src, tmp_path / "o4", corruption="rain,rain", progress=False).corruptions == ("rain",)
    assert (tmp_path / "o4" / "x.png").is_file()


@pytest.mark.parametrize(
    "words, expected",
    [
        ("all", tuple(DEGRADATIONS)),
        ("imagenet_c", CORRUPTIONS),
        ("clean,imagenet_c", TRAIN_CORRUPTIONS),
        ("rain, imagenet_c,all", ("rain", *CORRUPTIONS, "clean", *SYNTHETIC[1:])),  # each once, in order
    ],
)
def test_the_command_line_and_a_data_config_read_corruption_words_alike(words, expected):
    """`degrade --corruption all` meant every registered degradation (23), a data config's `corruptions: all`
    clean + the 15 ImageNet-C ones: the same word, two sets."""
    from unirestore.framework.data.config import DegradationConfig, parse_data_config
    from unirestore.framework.degrade import parse_corruptions

    assert len(DEGRADATIONS) == 23 and parse_corruptions(words) == expected
    for written in (words, words.split(",")):  # the data config: one string, or a list of words
        config = parse_data_config({
            "degradation": {"corruptions": written},
            "tasks": {"pir": [{"type": "builtin_photos", "corruption": written}]},
        })  # fmt: skip
        assert config.degradation.corruptions == config.tasks["pir"][0].corruption == list(expected)
    assert DegradationConfig().corruptions == list(parse_corruptions("clean,imagenet_c"))  # the release's mix
    with pytest.raises(ValueError, match=r"unknown degradation 'imagenet'; known: clean, .* \(or all, imagenet_c\)"):
        parse_corruptions("clean,imagenet")
    with pytest.raises(ValueError, match="names a group of degradations"):
        register_degradation("imagenet_c")(lambda image, severity, rng: image)


def test_degrade_never_writes_over_its_source(tmp_path):
    """DST holding SRC: a degradation's folder that is SRC (work/snow, or work/clean under `all`), or a copy
    that would land on a source image, is refused before anything is written."""
    work = tmp_path / "work"
    (work / "snow").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (36, 36, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(work / "snow" / "x.png")
    before = (work / "snow" / "x.png").read_bytes()
    with pytest.raises(ValueError, match="would be written into .*snow, over the clean images"):
        degrade_folder(work / "snow", work, corruption="snow,fog", progress=False)
    (work / "clean").mkdir()
    Image.fromarray(pixels).save(work / "clean" / "y.png")
    with pytest.raises(ValueError, match="'clean' would be written into"):
        degrade_folder(work / "clean", work, corruption="all", progress=False)
    (work / "clean" / "clean").mkdir()
    Image.fromarray(pixels).save(work / "clean" / "clean" / "y.png")  # its copy under one name: work/clean/y.png
    with pytest.raises(ValueError, match="y.png: a degraded copy would replace this source image"):
        degrade_folder(work / "clean", work, corruption="fog", progress=False)
    assert (work / "snow" / "x.png").read_bytes() == before and not (work / "fog").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file, not a folder; give DST a folder"):
        degrade_folder(work / "snow", tmp_path / "file", corruption="fog", progress=False)
    with pytest.raises(ValueError, match="--seed -1"):
        degrade_folder(work / "snow", tmp_path / "o", corruption="fog", seed=-1, progress=False)


def test_degrade_folder_in_worker_processes_writes_what_one_process_writes(tmp_path):
    """Draws depend on (seed, relative path) only: two workers write the same bytes and manifest as one. An
    unreadable a.jpg leaves its output name to a.png (whose name it would take), in either case."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    photo = BuiltinPhotos("train", size=32, length=5)
    for i, name in enumerate(["a.png", "b.png", "sub/c.jpg", "d.png", "e.png"]):
        Image.fromarray((photo[i]["hq"] * 255).round().byte().permute(1, 2, 0).numpy()).save(src / name)
    (src / "a.jpg").write_bytes(b"broken")  # sorted before a.png, same output name
    outputs = {}
    for workers in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadFileWarning)
            report = degrade_folder(src, tmp_path / f"w{workers}", corruption="rain,pixelate", seed=3,
                                    progress=False, workers=workers)  # fmt: skip
        assert report.written == 5 and [(p.name, r.startswith("not an image")) for p, r in report.skipped] == [
            ("a.jpg", True)
        ]
        files = sorted(p.relative_to(tmp_path / f"w{workers}") for p in (tmp_path / f"w{workers}").rglob("*.*"))
        outputs[workers] = {f: (tmp_path / f"w{workers}" / f).read_bytes() for f in files}
    assert len(outputs[1]) == 11 and outputs[1] == outputs[2]  # 5 images × 2 degradations + manifest.csv
    with pytest.raises(ValueError, match="--workers 0"):
        degrade_folder(src, tmp_path / "w0", corruption="rain", progress=False, workers=0)


def _sigint_handler(queue) -> None:
    import signal

    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_degrade_workers_start_deaf_to_ctrl_c():
    """A terminal's Ctrl-C goes to the whole process group: workers started inside this block ignore it (they
    inherit the ignored signal through spawn), so only the main process stops, in one line."""
    import multiprocessing
    import signal

    from unirestore.framework.degrade import _interrupts_left_to_this_process

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    before = signal.getsignal(signal.SIGINT)
    with _interrupts_left_to_this_process():
        child = context.Process(target=_sigint_handler, args=(queue,))
        child.start()
    assert signal.getsignal(signal.SIGINT) is before  # the main process answers Ctrl-C again
    assert queue.get(timeout=60) is True
    child.join(timeout=60)
    outside = context.Process(target=_sigint_handler, args=(queue,))
    outside.start()
    # without the block a worker hears Ctrl-C, unless this process was itself started deaf to it (nohup, `&`)
    assert queue.get(timeout=60) is (before == signal.SIG_IGN)
    outside.join(timeout=60)
