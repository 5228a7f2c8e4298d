"""The `unirestore` command line through typer's CliRunner: a full tiny training run end to end, the task
list, restore with a bad file among good ones, and the one-line errors (exit code 2, no traceback)."""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from compiling import recording_compile
from photos import write_photos
from PIL import Image
from typer.testing import CliRunner

from unirestore.framework.cli import app
from unirestore.framework.config import TINY_LR

runner = CliRunner()
TINY = [
    "--set", "stage0.vae_steps=2",
    "--set", "stage0.unet_steps=2",
    "--set", "stage0.batch_size=4",
    "--set", "train.val_samples=2",
    "--set", "train.log_every=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        # the same private home as test_engine.py: the stage-0 trained prior and built-in downstream models
        patch.setenv("UNIRESTORE_HOME", str(tmp_path_factory.getbasetemp() / "engine-home"))
        patch.setenv("UNIRESTORE_DOWNSTREAM_STEPS", "3")
        patch.chdir(folder)  # anything written to the working directory lands here
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: one thread is as fast, and immune to a busy machine's other jobs
        try:
            yield folder
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(root):
    output, uri = root / "run", f"sqlite:///{root / 'mlflow.db'}"
    args = ["train", "--tasks", "pir,seg,cls", "--steps", "2", "--batch-size", "2", "--beta", "pir=1,seg=0.2,cls=0.1",
            "--output", str(output), "--tracking-uri", uri, *TINY]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return output, uri, result


def test_train_end_to_end_writes_checkpoint_grids_and_an_mlflow_run(trained):
    output, uri, result = trained
    assert (output / "stage2.safetensors").is_file()
    assert (output / "stage2" / "last.safetensors").is_file() and (
        output / "stage2" / "last.state.pt"
    ).is_file()
    assert (output / "grids" / "final-pir.png").is_file()
    # this short run restores some test images below their LQ: they are drawn, worst first
    assert (output / "grids" / "final-worse-pir.png").is_file() and "final-worse-*" in result.stdout
    assert "restored" in result.stdout and "LQ" in result.stdout  # the final table
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["unirestore"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.tasks"] == "pir,seg,cls" and run["params.beta"] == "pir=1.0,seg=0.2,cls=0.1"
    assert run["tags.unirestore.prior"] == "tiny"
    # each stage's peak lr is the tiny preset's own, scaled to the batch of 2
    for stage in (1, 2, 3):
        assert float(run[f"params.lr/stage{stage}"]) == pytest.approx(TINY_LR[stage] * math.sqrt(2 / 64))
    for key in (
        "loss/cfrm",
        "loss/control",
        "stage2/lr",
        "test/pir/restored/psnr",
        "test/seg/lq/miou/deeplab",
    ):
        assert f"metrics.{key}" in runs.columns and np.isfinite(run[f"metrics.{key}"]), key
    stage2_terms = [
        c for c in runs.columns if c.startswith(("metrics.loss/pir", "metrics.loss/seg", "metrics.loss/cls"))
    ]
    assert stage2_terms and all(np.isfinite(run[c]) for c in stage2_terms)
    artifacts = [a.path for a in mlflow.MlflowClient(uri).list_artifacts(run["run_id"], "checkpoints")]
    assert "checkpoints/stage2.safetensors" in artifacts
    curves = [a.path for a in mlflow.MlflowClient(uri).list_artifacts(run["run_id"], "curves")]
    assert {"curves/stage1.png", "curves/stage2.png"} <= set(curves)  # and stage0.png when stage 0 trained here
    assert (output / "curves" / "stage2.png").is_file() and "metric curves" in result.stdout
    # the artifacts live beside the store's database, not in one run's folder (which a cleanup may delete)
    assert run["artifact_uri"].startswith((output.parent / "mlartifacts").as_uri())


def test_a_training_runs_final_table_is_logged_and_pairs_image_by_image_with_an_evaluation(trained, root):
    """The final table is written and logged as `eval` writes its own, each test image's values included, so
    that `runs compare --per-image` takes training runs (a sweep's trials) as it takes eval runs."""
    import csv

    import mlflow

    output, uri, _ = trained
    folder = output / "final" / "stage2"
    for name in ("eval.md", "eval.csv", "eval_images.csv", "eval_gains.png"):
        assert (folder / name).is_file(), name
    assert "grids/final-worse-pir.png" in (folder / "eval.md").read_text()
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("unirestore").experiment_id])
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "final")}
    assert {"final/eval.md", "final/eval_images.csv", "final/eval_gains.png"} <= logged
    lines = [line for line in csv.DictReader((folder / "eval_images.csv").read_text().splitlines())
             if line["task"] == "pir" and line["metric"] == "psnr"]  # fmt: skip
    mean = sum(float(line["restored[pir]"]) for line in lines) / len(lines)
    assert mean == pytest.approx(run.data.metrics["test/pir/restored/psnr"], abs=1e-4)
    # the same checkpoint evaluated on the first 4 of those test images: paired with the training run's
    evaluated = runner.invoke(app, ["eval", "--ckpt", str(output / "stage2.safetensors"), "--tasks", "pir",
                                    "--samples", "4", "--out", str(root / "eval-final"), "--tracking-uri", uri])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    compare = runner.invoke(app, ["runs", "compare", "--tracking-uri", uri, "--metric", "test/pir/restored/psnr",
                                  "--metric", "eval/default/pir/restored_pir/psnr", "--per-image"])  # fmt: skip
    assert compare.exit_code == 0, compare.output
    line = next(text for text in compare.output.splitlines() if "restored[pir]" in text and "psnr" in text)
    assert line.split("│")[1].strip().startswith(output.name) and line.split("│")[8].strip() == "4", line


def test_task_list_names_sources_and_checkpoints(trained, root):
    result = runner.invoke(app, ["task", "list", "--output", str(root)])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    for task in ("pir", "seg", "cls", "det"):
        assert task in lines and "built-in" in lines[task]
    assert "'detection'" in result.stdout and "'segmentation'" in result.stdout  # the aliases
    assert "stage2.safetensors" in result.stdout
    assert "data-config dataset types: hq_folder, paired_folder" in " ".join(result.stdout.split())


def test_restore_writes_good_files_and_skips_bad_ones(trained, root):
    output, _, _ = trained
    images = root / "images"
    images.mkdir()
    pixels = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    result = runner.invoke(app, ["restore", str(images), "--task", "seg", "--ckpt", str(output / "stage2.safetensors"),
                                 "--out", str(root / "restored")])  # fmt: skip
    assert result.exit_code == 1, result.output  # the good file is still written
    restored = Image.open(root / "restored" / "good.png")
    assert restored.size == (56, 40)
    assert "broken.jpg" in result.output and "1 skipped" in result.output
    # A grayscale input comes back grayscale, in its size.
    Image.fromarray(pixels[:, :, 1]).save(images / "gray.png")
    result = runner.invoke(app, ["restore", str(images / "gray.png"), "--ckpt", str(output / "stage2.safetensors"),
                                 "--out", str(root / "restored-gray")])  # fmt: skip
    assert result.exit_code == 0, result.output
    gray = Image.open(root / "restored-gray" / "gray.png")
    assert gray.mode == "L" and gray.size == (56, 40)
    assert Image.open(root / "restored" / "good.png").mode == "RGB"
    # A task whose prompt the checkpoint lacks (given by its alias) names the command that adds it.
    ckpt = output / "stage2.safetensors"
    result = runner.invoke(app, ["restore", str(images), "--task", "detection", "--ckpt", str(ckpt),
                                 "--out", str(root / "restored-det")])  # fmt: skip
    assert result.exit_code == 2 and not (root / "restored-det").exists()
    assert "no prompt for 'det'" in result.stderr and f"task add det --from {ckpt}" in result.stderr.replace("\n", "")


def test_restore_gives_an_image_with_transparency_its_alpha_back(trained, root):
    """A PNG with transparency is restored as composited on white and written with its own alpha; one whose
    alpha is opaque everywhere, as plain RGB; grayscale with alpha as grayscale with alpha."""
    output, _, _ = trained
    folder = root / "transparent"
    folder.mkdir()
    rng = np.random.default_rng(6)
    pixels = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    alpha = np.full((40, 56), 255, np.uint8)
    alpha[:, :20] = 0  # a cut-out
    alpha[:, 20:28] = 128  # a soft edge
    Image.fromarray(np.dstack([pixels, alpha])).save(folder / "cutout.png")
    Image.fromarray(np.dstack([pixels, np.full((40, 56), 255, np.uint8)])).save(folder / "opaque.png")
    Image.fromarray(np.dstack([pixels[:, :, 0], alpha])).save(folder / "gray.png")
    result = runner.invoke(app, ["restore", str(folder), "--ckpt", str(output / "stage2.safetensors"), "--out",
                                 str(root / "transparent-out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    cutout = Image.open(root / "transparent-out" / "cutout.png")
    assert cutout.mode == "RGBA" and cutout.size == (56, 40)
    assert np.array_equal(np.asarray(cutout)[:, :, 3], alpha)
    assert Image.open(root / "transparent-out" / "opaque.png").mode == "RGB"
    gray = Image.open(root / "transparent-out" / "gray.png")
    assert gray.mode == "LA" and np.array_equal(np.asarray(gray)[:, :, 1], alpha)


def test_restore_in_batches_writes_what_one_by_one_writes(trained, root):
    output, _, _ = trained
    sizes = [(40, 56), (40, 56), (32, 32), (40, 56)]
    folder = write_photos(root / "batch-images", dict(zip("0123", sizes)), seed=3, broken="4.png")
    written = {}
    for batch in ("1", "3"):
        args = ["restore", str(folder), "--ckpt", str(output / "stage2.safetensors"), "--out", str(root / f"b{batch}"),
                "--batch-size", batch]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "restored 4 image(s)" in result.stdout and "1 skipped" in result.stdout
        written[batch] = {i: np.asarray(Image.open(root / f"b{batch}" / f"{i}.png"), np.float32) for i in range(4)}
    for index in range(4):  # each image gets its own noise, whatever shares its batch
        assert np.abs(written["1"][index] - written["3"][index]).max() <= 1.0, index
    assert np.abs(written["1"][0] - written["1"][1]).max() > 10  # different inputs, different outputs


def test_restore_compiled_writes_what_the_eager_restore_writes(trained, root):
    """`--compile`: torch.compile's graph of the restore (inductor's kernels on this CPU) gives the same images,
    each with its own noise, for several prompts at once."""
    output, _, _ = trained
    folder = write_photos(root / "compile-images", {"0": (40, 56), "1": (40, 56)}, seed=4)
    written = {}
    for option in ([], ["--compile"]):
        out = root / f"compiled-{bool(option)}"
        args = ["restore", str(folder), "--ckpt", str(output / "stage2.safetensors"), "--out", str(out),
                "--task", "pir,cls", "--batch-size", "2", *option]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        written[bool(option)] = {(task, i): np.asarray(Image.open(out / task / f"{i}.png"), np.float32)
                                 for task in ("pir", "cls") for i in range(2)}  # fmt: skip
    for key, image in written[False].items():
        assert np.abs(written[True][key] - image).max() <= 1.0, key
    assert np.abs(written[True][("pir", 0)] - written[True][("pir", 1)]).max() > 10


def test_restore_compiled_runs_the_smaller_last_batch_in_the_full_batchs_graph(trained, root, monkeypatch):
    """`restore --compile --batch-size 2` on 3 same-size images: the last image runs padded in the first two's
    graph (here a stand-in for torch.compile that records the batches its pass gets), written as eager writes it."""
    output, _, _ = trained
    folder = write_photos(root / "last-batch-images", dict.fromkeys("012", (40, 56)), seed=6)
    batches = []
    monkeypatch.setattr(torch, "compile", recording_compile(batches))
    written = {}
    for option in ([], ["--compile"]):
        out = root / f"last-batch-{bool(option)}"
        args = ["restore", str(folder), "--ckpt", str(output / "stage2.safetensors"), "--out", str(out),
                "--batch-size", "2", *option]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        written[bool(option)] = [np.asarray(Image.open(out / f"{i}.png"), np.float32) for i in range(3)]
    assert batches == [2, 2]
    for eager, compiled in zip(written[False], written[True], strict=True):
        assert np.abs(compiled - eager).max() <= 1.0


def test_a_failing_compile_is_one_line_naming_the_way_round(trained, root, monkeypatch):
    output, uri, _ = trained
    folder = write_photos(root / "compile-fails", {"0": (40, 56)}, seed=5)
    compile_ = torch.compile

    def no_compiler(graph, inputs):
        raise RuntimeError("C++ compiler not found")

    monkeypatch.setattr(torch, "compile", lambda fn, dynamic, **_: compile_(fn, backend=no_compiler, dynamic=dynamic))
    args = ["restore", str(folder), "--ckpt", str(output / "stage2.safetensors"), "--out", str(root / "cf"),
            "--compile"]  # fmt: skip
    # and `train --compile`, whose stage 2 fails at its first step (stage 1's checkpoint kept: --resume goes on)
    shutil.copytree(output, root / "cf-train", ignore=shutil.ignore_patterns("stage2*"))
    train = ["train", "--tasks", "pir", "--stage", "2", "--steps", "1", "--batch-size", "2",
             "--output", str(root / "cf-train"), "--tracking-uri", uri, "--compile", *TINY]  # fmt: skip
    for command in (args, train):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, result.output
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("error: torch.compile failed") and "C++ compiler not found" in line
        assert "run without --compile" in line and "Traceback" not in result.output


def test_restore_reading_and_writing_in_threads_writes_the_same_files(trained, root, monkeypatch):
    """Beside a GPU, files are read ahead and PNGs written in threads while the model restores: the same
    files, skips and report as one thing at a time; a write that fails still fails the call."""
    import errno

    from unirestore.framework.checkpoint import load_checkpoint
    from unirestore.framework.inference import collect_images, restore_files

    output, _, _ = trained
    model = load_checkpoint(output / "stage2.safetensors")
    sizes = [(40, 56), (32, 32), (40, 56), (40, 56), (32, 32)]
    folder = write_photos(root / "threaded", dict(zip("01234", sizes)), seed=5, broken="2b.png")
    files, problems, _ = collect_images([folder], root / "unused")
    assert not problems and len(files) == 6
    reports, written = {}, {}
    for threads in (0, 2):
        out = root / f"threaded-{threads}"
        reports[threads] = restore_files(model, files, out, ["pir", "cls"], batch_size=3, side_by_side=True,
                                         io_threads=threads)  # fmt: skip
        written[threads] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    assert reports[0] == reports[2] and reports[2].written == 5 and "2b.png" in reports[2].skipped[0]
    assert len(written[2]) == 15 and written[0] == written[2]

    # an output that cannot be written skips its image alone: a folder in its place, a write refused
    from unirestore.framework.data.io import save_png

    def denied(image, path, **options):
        if path.name == "3.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        save_png(image, path, **options)

    blocked = root / "threaded-blocked"
    (blocked / "1.png").mkdir(parents=True)
    monkeypatch.setattr("unirestore.framework.data.io.save_png", denied)
    report = restore_files(model, files, blocked, ["pir"], io_threads=2)
    assert report.written == 3, report.skipped
    assert sum("1.png exists and is not a restored image" in message for message in report.skipped) == 1
    assert sum("3.png: cannot write" in m and "Permission denied" in m for m in report.skipped) == 1
    assert sorted(p.name for p in blocked.glob("*.png") if p.is_file()) == ["0.png", "2.png", "4.png"]

    def full_disk(image, path, **options):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("unirestore.framework.data.io.save_png", full_disk)
    with pytest.raises(OSError, match="No space left"):
        restore_files(model, files, root / "threaded-full", ["pir"], io_threads=2)


def test_restore_notes_a_checkpoint_whose_tfa_is_untrained(trained, root):
    output, _, _ = trained
    images = root / "note-images"
    images.mkdir()
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(images / "a.png")
    for stage, noted in (("stage1", True), ("stage2", False)):
        args = ["restore", str(images), "--ckpt", str(output / f"{stage}.safetensors"), "--out", str(root / stage)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert (root / stage / "a.png").is_file()
        assert ("saved after stage 1" in " ".join(result.stderr.split())) is noted


def test_restore_tiles_large_images_runs_in_bf16_and_skips_what_does_not_fit(trained, root, monkeypatch):
    import torch

    from unirestore.framework.checkpoint import load_checkpoint
    from unirestore.framework.model import UniRestore

    output, _, _ = trained
    ckpt = output / "stage2.safetensors"
    folder = root / "large"
    folder.mkdir()
    pixels = (np.random.default_rng(1).random((64, 200, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "wide.png")

    def restore(name, *options):
        args = ["restore", str(folder), "--ckpt", str(ckpt), "--out", str(root / name), *options]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(root / name / "wide.png"), dtype=np.float32) / 255

    tiled, whole = restore("tiled", "--tile-size", "64"), restore("whole", "--tile-size", "0")
    half = restore("bf16", "--tile-size", "0", "--precision", "bf16")
    half_tiled = restore("bf16-tiled", "--tile-size", "64", "--precision", "bf16")
    assert tiled.shape == whole.shape == half.shape == half_tiled.shape == (64, 200, 3)
    model = load_checkpoint(ckpt)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255
    expected = model.restore(image, "pir", generator=torch.Generator().manual_seed(0), tile_size=64)[0]
    assert np.abs(tiled - expected.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6  # the tiled path ran
    assert np.abs(tiled - whole).max() > 2 / 255  # and it is not the whole-image pass
    # bf16 weights restore the same image, to rounding, whole and tiled (the tiles blend in fp32)
    assert 0 < np.abs(half - whole).mean() < 0.01 and np.abs(half_tiled - tiled).mean() < 0.01

    # An image too large for the device is reported with the fix, and the others still finish.
    Image.fromarray(pixels[:40, :48]).save(folder / "small.png")
    original = UniRestore.restore_tasks

    def restore_or_run_out(self, images, *args, **kwargs):
        if images.shape[-1] > 100:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(UniRestore, "restore_tasks", restore_or_run_out)
    result = runner.invoke(app, ["restore", str(folder), "--ckpt", str(ckpt), "--out", str(root / "some"),
                                 "--tile-size", "0"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert (root / "some" / "small.png").is_file() and not (root / "some" / "wide.png").exists()
    words = " ".join(result.output.split())  # the console wraps long lines
    assert "wide.png" in result.output.replace("\n", "") and "out of memory at 200×64" in words
    assert "smaller --tile-size" in words


def test_restore_with_several_prompts_writes_each_tasks_image_as_alone(trained, root, monkeypatch):
    """`--task pir,cls`: OUT/pir/ and OUT/cls/ hold what `--task pir` and `--task cls` write, from one
    encode and denoise; a batch that does not fit with every task's decoder copy goes one task at a time."""
    import torch

    from unirestore.framework.model import UniRestore

    output, _, _ = trained
    ckpt = str(output / "stage2.safetensors")
    folder = write_photos(root / "prompts", {"a": (40, 56), "b": (40, 56)}, seed=4)

    def restore(out, task, *options):
        result = runner.invoke(app, ["restore", str(folder), "--ckpt", ckpt, "--task", task, "--out", str(out),
                                     *options])  # fmt: skip
        assert result.exit_code == 0, result.output
        return result

    together = restore(root / "both", "pir,classification", "--batch-size", "2", "--side-by-side")
    assert "restored 2 image(s)" in together.output and "pir, cls" in together.output
    assert sorted(str(p.relative_to(root / "both")) for p in (root / "both").rglob("*.png")) == [
        "cls/a.png", "cls/b.png", "pir/a.png", "pir/b.png", "side-by-side/a.png", "side-by-side/b.png"]
    # input | pir | cls, 2-pixel gaps
    row = np.asarray(Image.open(root / "both" / "side-by-side" / "a.png"), np.float32)
    assert row.shape == (40 + 4, 3 * (56 + 2) + 2, 3)
    panels = [row[2:42, 2 + k * 58 : 58 + k * 58] for k in range(3)]
    for panel, expected in zip(panels, (folder / "a.png", root / "both" / "pir" / "a.png", root / "both" / "cls" / "a.png")):
        assert np.abs(panel - np.asarray(Image.open(expected), np.float32)).max() <= 1.0
    calls = []
    original = UniRestore.restore_tasks

    def one_task_fits(self, images, tasks, *args, **kwargs):
        calls.append((images.shape[0], list(tasks)))
        if len(tasks) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(self, images, tasks, *args, **kwargs)

    for task in ("pir", "cls"):
        restore(root / task, task)
    monkeypatch.setattr(UniRestore, "restore_tasks", one_task_fits)
    restore(root / "split", "pir,cls", "--batch-size", "2")
    assert calls[:4] == [(2, ["pir", "cls"]), (1, ["pir", "cls"]), (1, ["pir"]), (1, ["cls"])]
    for task in ("pir", "cls"):
        for name in ("a.png", "b.png"):
            alone = np.asarray(Image.open(root / task / name), np.float32)
            for run in ("both", "split"):
                assert np.abs(np.asarray(Image.open(root / run / task / name), np.float32) - alone).max() <= 1.0


def test_restore_skip_existing_goes_on_where_an_interrupted_run_stopped(trained, root):
    output, _, _ = trained
    ckpt = str(output / "stage2.safetensors")
    folder = write_photos(root / "resume-in", dict.fromkeys("abc", (32, 40)), seed=5)
    out = root / "resume-out"

    def run(*options):
        result = runner.invoke(app, ["restore", str(folder), "--ckpt", ckpt, "--out", str(out), *options])
        assert result.exit_code == 0, result.output
        return result.output

    run("--task", "pir,cls")
    first = (out / "pir" / "a.png").read_bytes()
    (out / "pir" / "b.png").unlink()  # as if the run had been killed before writing b's PIR image
    text = run("--task", "pir,cls", "--skip-existing")
    assert "restored 1 image(s)" in text and "2 image(s) already restored" in " ".join(text.split())
    assert "other settings" not in text  # b's cls image is this run's own: b was cut short, not made otherwise
    assert (out / "pir" / "b.png").is_file() and (out / "pir" / "a.png").read_bytes() == first
    # an output records how it was restored: outputs of other settings are not taken for done
    text = " ".join(run("--task", "pir,cls", "--skip-existing", "--seed", "1").split())
    assert "3 image(s) in" in text and "other settings" in text and "restored 3 image(s)" in text
    assert (out / "pir" / "a.png").read_bytes() != first
    assert "restored 3 image(s)" in run("--task", "pir,cls")  # without the option every image is restored
    assert (out / "pir" / "a.png").read_bytes() == first
    # a file of the user's where an output goes is never written over; the other images are restored
    (out / "cls" / "c.png").write_bytes(b"a photo of mine")
    result = runner.invoke(app, ["restore", str(folder), "--ckpt", ckpt, "--out", str(out), "--task", "pir,cls"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "c.png exists and is not a restored image" in text, text
    assert "restored 2 image(s)" in text and (out / "cls" / "c.png").read_bytes() == b"a photo of mine"
    result = runner.invoke(app, ["restore", str(folder), "--ckpt", ckpt, "--out", str(out), "--task", "pir,cls",
                                 "--skip-existing"])  # fmt: skip
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "c.png exists and is not a restored image" in text, text
    assert "other settings" not in text and (out / "cls" / "c.png").read_bytes() == b"a photo of mine"


def test_restore_never_overwrites_an_input_or_another_output(trained, root):
    output, _, _ = trained
    ckpt = str(output / "stage2.safetensors")
    photos, other = root / "photos", root / "other"
    (photos / "more").mkdir(parents=True)
    other.mkdir()
    pixels = (np.random.default_rng(2).random((40, 48, 3)) * 255).astype(np.uint8)
    for path in (photos / "x.png", photos / "x.jpg", photos / "more" / "y.png", other / "x.png"):
        Image.fromarray(pixels).save(path)
    out = photos / "restored"  # an output folder inside an input folder
    for _ in range(2):  # the second run does not restore the first one's outputs
        result = runner.invoke(app, ["restore", str(photos), str(other), "--ckpt", ckpt, "--out", str(out)])
        assert result.exit_code == 0, result.output
        names = sorted(str(path.relative_to(out)) for path in out.rglob("*.png"))
        assert names == ["more/y.png", "x.png", "x_png-2.png", "x_png.png"], names
        assert "restored 4 image(s)" in result.output and "renamed" in result.output

    before = (photos / "x.png").read_bytes()
    # nothing left to restore is a mistake in the command: one line, exit 2, before the model loads
    result = runner.invoke(app, ["restore", str(photos / "x.png"), "--ckpt", ckpt, "--out", str(photos)])
    assert result.exit_code == 2 and "no image to restore" in result.output
    assert "would overwrite it" in " ".join(result.output.split())
    assert (photos / "x.png").read_bytes() == before
    result = runner.invoke(app, ["restore", str(photos / "more"), "--ckpt", ckpt, "--out", str(photos)])
    assert result.exit_code == 2 and "inside --out" in " ".join(result.output.split())
    # x.jpg's output would replace x.png, a file no restore wrote: left alone (exit 1)
    result = runner.invoke(app, ["restore", str(photos / "x.jpg"), "--ckpt", ckpt, "--out", str(photos)])
    assert result.exit_code == 1 and "x.png exists and is not a restored image" in " ".join(result.output.split())
    assert (photos / "x.png").read_bytes() == before
    # a file given twice (itself and in its folder) is restored once
    twice = root / "twice"
    result = runner.invoke(app, ["restore", str(other), str(other / "x.png"), "--ckpt", ckpt, "--out", str(twice)])
    assert result.exit_code == 0 and "restored 1 image(s)" in result.output and "renamed" not in result.output
    # an input folder named side-by-side does not land on the side-by-side rows of the one-task output
    (other / "side-by-side").mkdir()
    Image.fromarray(pixels[:, :40]).save(other / "side-by-side" / "x.png")
    rows = root / "rows"
    result = runner.invoke(app, ["restore", str(other), "--side-by-side", "--ckpt", ckpt, "--out", str(rows)])
    assert result.exit_code == 0 and "side-by-side/ holds other outputs" in " ".join(result.output.split())
    assert Image.open(rows / "side-by-side-input" / "x.png").size == (40, 40)  # the subfolder's image, restored
    assert Image.open(rows / "side-by-side" / "x.png").size == (2 + 48 + 2 + 48 + 2, 2 + 40 + 2)  # x.png's row


def _corrupt(root):
    path = root / "corrupt.safetensors"
    path.write_bytes(b"\x00" * 64)
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--tasks", "pir,nope"], "unknown task 'nope'"),
        # a task the data config leaves out is not trained on the built-in scenes behind the user's back
        (["train", "--data", "{pir_only}"], "lists no datasets for task 'seg' (it lists pir); add them under tasks.seg"),
        (["task", "add", "ret", "--from", "{corrupt}", "--data", "{pir_only}"], "`ret: [{type: builtin_scenes}]`"),
        (["eval", "--ckpt", "{corrupt}", "--data", "{pir_only}", "--tasks", "pir,cls"], "no datasets for task 'cls'"),
        # retrieval's metric loss is zero on one image a batch: nothing would train
        (["task", "add", "ret", "--from", "{corrupt}", "--set", "train.batch_size=1"], "'ret' needs at least 2 images"),
        (["train", "--tasks", "pir,ret", "--data", "{full_size}", "--batch-size", "2"],
         "task 'ret' needs several per batch; give the data config a crop size"),
        (["train", "--set", "train.nope=1"], "unknown key 'train.nope'"),
        (["train", "--set", "train.stage1_stepz=5"],
         "unknown key 'train.stage1_stepz' in --set; did you mean 'train.stage1_steps'? valid keys here: batch_size"),
        # the data config given where the run config goes
        (["train", "--config", "{pir_only}"], "is a data config (datasets per task), not a run config; give it as --data"),
        (["train", "--set", "train.batch_size=abc"], "expected an integer"),
        (["train", "--beta", "seg=high"], "train.beta.seg: expected a number"),
        (["train", "--beta", "pri=1"], "train.beta names unknown task 'pri'"),
        (["train", "--set", "train.task_weights.sge=2"], "train.task_weights names unknown task 'sge'"),
        (["train", "--stage", "7"], "--stage 7"),
        (["train", "--set", "model.cfrm_blocks=[1,1,9]"], "model.cfrm_blocks=[1, 1, 9] has 3 entries"),
        (["train", "--set", "train.cfrm_level_weights=[0.1]"], "train.cfrm_level_weights=[0.1] has 1 entries"),
        (["train", "--stage", "1", "--prior", "{root}/no-such-prior"], "no-such-prior"),
        (["train", "--data", "{missing_root}"], "tasks.pir[0] (hq_folder): root /no/such/DIV2K is not a folder"),
        (["train", "--data", "{missing_labels}", "--tasks", "pir,cls"],
         "tasks.cls[0] (image_folder): labels file /no/such/LOC_val_solution.csv not found"),
        # a held-out set that cannot be read is named before stage 1, not when stage 2 validates or the table is made
        (["train", "--tasks", "pir,cls", "--data", "{flat_val}"], "flat-val: no class sub-folders; expected"),
        (["train", "--tasks", "pir", "--data", "{empty_val}", "--steps", "1"], "empty: no samples found for HQFolder"),
        (["train", "--beta", "pir=-1"], "train.beta={'pir': -1.0}: a task's β must be >= 0"),
        (["train", "--set", "train.loss_weights.pir.l1=-2"], "loss term weights must be >= 0"),
        (["task", "add", "nope"], "unknown task 'nope'"),
        (["train", "--tasks", "pir", "--data", "{full_size}", "--batch-size", "2"], "size: null trains on full images"),
        # real data needs real downstream models: refused before stage 1, not when stage 2 starts
        (["train", "--tasks", "pir,cls", "--data", "{real_cls}"], "set downstream_checkpoints.resnet50 to a local"),
        (["train", "--tasks", "pir,cls", "--data", "{real_cls}", "--set", "downstream_checkpoints.resnet50={corrupt}",
          "--set", "downstream_checkpoints.vit_base_patch16_224={corrupt}"], "corrupt.safetensors"),
        (["task", "add", "detection", "--from", "{corrupt}"], "corrupt"),  # the alias names det
        (["task", "add", "det", "--from", "{corrupt}", "--steps", "0"], "--steps 0: the new prompt needs at least"),
        (["train", "--tasks", "pir,segmentaton"], "known tasks: cls (classification), det (detection)"),
        (["task", "add", "det", "--from", "{corrupt}", "--set", "data={missing_root}"], "tasks.det[0] (coco): root /no/such/coco is not"),
        (["restore", "{root}", "--ckpt", "{root}/missing.safetensors"], "checkpoint not found"),
        (["eval", "--ckpt", "{corrupt}", "--corruption", "gaussian_nose"], "--corruption: unknown"),
        (["eval", "--ckpt", "{corrupt}", "--severity", "7"], "--severity 7: give 1 to 5"),
        (["eval", "--ckpt", "{corrupt}", "--severity", "5"], "--severity 5 is the strength of --corruption; give"),
        (["eval", "--ckpt", "{corrupt}", "--samples", "-1"], "--samples -1: give a number of test images"),
        (["degrade", "{root}/no-such-folder", "{root}/degraded"], "no-such-folder: not a folder"),
        (["degrade", "{root}", "{root}/degraded", "--corruption", "nope"], "--corruption: unknown"),
        (["degrade", "{root}", "{root}/degraded", "--severity", "0"], "--severity:"),
        (["restore", "{root}", "--ckpt", "{corrupt}"], "corrupt"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--out", "{corrupt}"], "is a file; give a folder"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--precision", "fp8"], "--precision fp8: use one of"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--precision", "fp16", "--device", "cpu"], "use bf16"),
        (["runs", "compare", "--tracking-uri", "sqlite:///{root}/errors.db"], "no tracking store at"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--tile-size", "-1"], "--tile-size -1: give a tile side"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--steps", "9"], "--steps 9: give 1 to 4 denoising steps"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--batch-size", "0"], "--batch-size 0: give at least 1"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--task", " , "], "give a task, e.g. pir, or several"),
        (["eval", "--ckpt", "{corrupt}", "--batch-size", "0"], "--batch-size 0: give at least 1"),
        (["eval", "--ckpt", "{corrupt}", "--out", "{corrupt}"], "corrupt.safetensors is a file; give a folder for the"),
        (["eval", "--ckpt", "{corrupt}", "--device", "cuda:99"], "device cuda:99: this machine has"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--device", "gpu"], "device 'gpu' is not a device; use auto"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--device", "mps"], "device 'mps': unirestore runs on cpu or"),
        (["restore", "{root}", "--ckpt", "{corrupt}", "--seed", "99999999999999999999"], "--seed 999999"),
        (["restore", "{root}/no-such", "--ckpt", "{corrupt}"], "no-such: no such file or folder"),
        (["degrade", "{root}", "{root}/degraded", "--seed", "-1"], "--seed -1: give a seed from 0"),
        (["sweep", "beta", "--from", "{root}/missing.safetensors"], "checkpoint not found"),
        (["sweep", "beta", "--from", "{corrupt}", "--num-samples", "0"], "--num-samples 0: need at least 1"),
        (["sweep", "extend", "--from", "{corrupt}", "--tasks", "det", "--gpus-per-trial", "-1"], "--gpus-per-trial"),
    ],
)
def test_user_errors_exit_2_with_one_line(root, args, expected):
    corrupt = _corrupt(root)
    missing_root = root / "missing-root.yaml"  # a data config whose roots do not exist on this machine
    missing_root.write_text(
        "tasks:\n  pir: [{type: hq_folder, root: /no/such/DIV2K}]\n  det: [{type: coco, root: /no/such/coco}]\n"
    )
    real_cls = root / "real-cls.yaml"  # ImageNet's layout: a folder per class
    (root / "imagenet" / "n01440764").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40)).save(root / "imagenet" / "n01440764" / "a.png")
    real_cls.write_text(
        f"tasks:\n  pir: [{{type: builtin_photos}}]\n  cls: [{{type: image_folder, root: {root / 'imagenet'}}}]\n"
    )
    pir_only = root / "pir-only.yaml"
    pir_only.write_text("tasks:\n  pir: [{type: builtin_photos}]\n")
    missing_labels = root / "missing-labels.yaml"  # ImageNet's flat validation folder, its labels file mistyped
    missing_labels.write_text(
        f"tasks:\n  pir: [{{type: builtin_photos}}]\n  cls: [{{type: image_folder, root: {root / 'imagenet'}, "
        "labels: /no/such/LOC_val_solution.csv}]\n"
    )
    flat_val = root / "flat-val.yaml"  # ImageNet's val as distributed (one flat folder), its labels file left out
    (root / "flat-val").mkdir(exist_ok=True)
    Image.new("RGB", (40, 40)).save(root / "flat-val" / "ILSVRC2012_val_00000001.png")
    flat_val.write_text(
        f"tasks:\n  pir: [{{type: builtin_photos}}]\n  cls: [{{type: image_folder, root: {root / 'imagenet'}, "
        f"splits: [train]}}, {{type: image_folder, root: {root / 'flat-val'}, splits: [val, test]}}]\n"
    )
    empty_val = root / "empty-val.yaml"  # a held-out folder holding no image
    (root / "empty").mkdir(exist_ok=True)
    empty_val.write_text(
        f"tasks:\n  pir: [{{type: hq_folder, root: {root / 'imagenet'}, splits: [train]}}, "
        f"{{type: hq_folder, root: {root / 'empty'}, splits: [val, test]}}]\n"
    )
    full_size = root / "full-size.yaml"
    full_size.write_text(
        f"size: null\ntasks:\n  pir: [{{type: hq_folder, root: {root / 'imagenet'}}}]\n"
        f"  ret: [{{type: image_folder, root: {root / 'imagenet'}}}]\n"
    )
    args = [a.format(root=root, corrupt=corrupt, missing_root=missing_root, real_cls=real_cls, full_size=full_size,
                     pir_only=pir_only, missing_labels=missing_labels, flat_val=flat_val, empty_val=empty_val)
            for a in args]  # fmt: skip
    tracked = args[0] == "train" or args[:2] == ["task", "add"]
    result = runner.invoke(app, [*args, *(["--tracking-uri", f"sqlite:///{root}/errors.db"] if tracked else [])])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert not (root / "errors.db").exists()  # nothing was started
    assert not (root / "runs").exists()  # and no run folder was made


def test_stage_0_alone_on_a_prior_folder_is_refused_before_a_run_starts(root):
    """Stage 0 trains the tiny prior alone: on another prior it would start an MLflow run that trains nothing
    and print the tiny prior's folder as its checkpoint. `--stage all` still skips it with a note."""
    from unirestore.framework.prior import build_tiny_prior

    folder = build_tiny_prior(root / "folder-prior", seed=1)
    result = runner.invoke(app, ["train", "--stage", "0", "--prior", str(folder), "--output", str(root / "stage0-run"),
                                 "--tracking-uri", f"sqlite:///{root / 'stage0.db'}"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: --stage 0 trains the built-in tiny prior only; prior '{folder}' comes trained: train stages 1 and 2 "
        "on it (--stage 1,2)\n"
    )
    assert not (root / "stage0.db").exists() and not (root / "stage0-run").exists()


def test_degrade_writes_a_degraded_copy(root):
    source = root / "clean"
    source.mkdir()
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(source / "a.png")
    result = runner.invoke(app, ["degrade", str(source), str(root / "noisy"), "--corruption", "gaussian_noise",
                                 "--severity", "3", "--seed", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (root / "noisy" / "a.png").is_file()


def test_train_reads_task_aliases_as_the_registered_names():
    from unirestore.framework.cli import _build_config, _check_tasks

    run_config = _build_config(None, ["tasks=[pir,segmentation,classification]", "train.beta.segmentation=2",
                                      "train.task_weights.classification=3"])
    _check_tasks(run_config)
    assert run_config.tasks == ["pir", "seg", "cls"]
    assert run_config.train.beta == {"seg": 2.0} and run_config.train.task_weights == {"cls": 3.0}


def test_the_command_reports_a_mistyped_command_option_or_value_in_one_line(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "unirestore.framework.cli", *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120, check=False)  # fmt: skip

    for args, expected in [
        (["nope"], "No such command 'nope'"),
        (["train", "--stagee", "1"], "No such option: --stagee"),
        (["restore", str(tmp_path), "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    ]:
        result = run(*args)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert run("--help").returncode == 0 and "restore" in run("--help").stdout
    bare = run()  # no command: the help, as before
    assert bare.returncode == 2 and "train" in bare.stdout and not bare.stderr.strip()
    assert run("degrade", str(tmp_path / "missing"), str(tmp_path / "out")).returncode == 2  # a command's own error


class _EntryPoint:
    """An installed plugin's entry point, as importlib.metadata lists it."""

    def __init__(self, name, value, load):
        self.name, self.value, self._load = name, value, load

    def load(self):
        return self._load()


def test_the_readme_plugin_task_is_added_by_its_prompt_alone_on_its_own_data(trained, root, monkeypatch):
    """README "Adding a task", run as it stands: its module installed as a plugin, its dataset type read from
    a data config, `task add edges` trains the new prompt and changes nothing else."""
    import importlib.metadata
    import importlib.util
    import re
    from pathlib import Path

    from safetensors.torch import load_file

    from unirestore.framework import registry
    from unirestore.framework.data import config as data_config

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Adding a task", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    module_file = root / "readme_edges.py"
    module_file.write_text(code)

    def load_plugin():
        spec = importlib.util.spec_from_file_location("readme_edges", module_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.EdgeTask

    # an installed plugin: the registries as a fresh process has them, the README module behind the entry point
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(data_config, "DATASET_TYPES", dict(data_config.DATASET_TYPES))
    points = [_EntryPoint("edges", "readme_edges:EdgeTask", load_plugin)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: points)

    # the plugin's layout: images/x.png beside edges/x.png, the boundaries drawn from the clean image
    data = root / "bsds"
    (data / "images").mkdir(parents=True)
    (data / "edges").mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        image = np.zeros((80, 96, 3), np.uint8)
        top, left = rng.integers(8, 40, 2)
        image[top : top + 30, left : left + 40] = rng.integers(60, 255, 3)
        edges = np.zeros((80, 96), np.uint8)
        edges[top, left : left + 40] = edges[top + 29, left : left + 40] = 255
        edges[top : top + 30, left] = edges[top : top + 30, left + 39] = 255
        Image.fromarray(image).save(data / "images" / f"{k}.png")
        Image.fromarray(edges).save(data / "edges" / f"{k}.png")
    config = root / "edges.yaml"
    config.write_text(f"tasks:\n  edges: [{{type: edge_folder, root: {data}}}]\n")

    output, _, _ = trained
    source = output / "stage2.safetensors"
    base = ["task", "add", "edges", "--from", str(source), "--output", str(root / "edges-run"),
            "--tracking-uri", f"sqlite:///{root / 'edges.db'}", "--steps", "2", *TINY]  # fmt: skip
    # no built-in data for it: the run asks for --data before anything starts
    refused = runner.invoke(app, base)
    assert refused.exit_code == 2 and "task 'edges' has no built-in data; give --data" in refused.stderr
    assert not (root / "edges-run").exists()

    result = runner.invoke(app, [*base, "--data", str(config), "--set", "train.eval_samples=4"])
    assert result.exit_code == 0, result.output
    assert "edge_accuracy" in result.stdout  # its metric in the final table, LQ against restored
    before, after = load_file(str(source)), load_file(str(root / "edges-run" / "stage3-edges.safetensors"))
    assert set(after) - set(before) == {"prompts.prompts.edges"}
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert after["prompts.prompts.edges"].abs().sum() > 0
    from unirestore.framework.engine.curves import MetricHistory

    assert "loss/edges_l1" in MetricHistory(root / "edges-run" / "stage3-edges").series()
    listing = runner.invoke(app, ["task", "list", "--output", str(root / "edges-run")])
    text = " ".join(listing.stdout.split())
    assert "│ edges │" in listing.stdout and "edge_folder (readme_edges)" in text
    # its evaluator's per-image values reach eval_images.csv, one line per image
    evaluated = runner.invoke(app, ["eval", "--ckpt", str(root / "edges-run" / "stage3-edges.safetensors"),
                                    "--tasks", "edges", "--data", str(config), "--samples", "3",
                                    "--out", str(root / "edges-eval"), "--tracking-uri",
                                    f"sqlite:///{root / 'edges.db'}", *TINY])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    lines = (root / "edges-eval" / "eval_images.csv").read_text().splitlines()
    assert lines[0].startswith("corruption,task,image,metric,LQ,restored[edges]")
    assert len(lines) == 4 and all(",edges," in line and "edge_accuracy" in line for line in lines[1:])


def test_the_readme_python_example_restores_one_image_per_prompt(trained, root, monkeypatch, tmp_path):
    """README's Python block, run as written in a folder holding its checkpoint path and photo."""
    import re
    from pathlib import Path

    output, _, _ = trained
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"In Python, a checkpoint.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    (tmp_path / "runs" / "unirestore").mkdir(parents=True)
    # two steps of training leave the prompts too close for their outputs to differ by a level in 8 bits: the
    # cls prompt gets values a longer training would give it, so that each prompt's PNG must differ
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(output / "stage2.safetensors", "pt") as checkpoint:
        tensors = {key: checkpoint.get_tensor(key) for key in checkpoint.keys()}  # noqa: SIM118
        metadata = checkpoint.metadata()
    prompt = tensors["prompts.prompts.cls"]
    tensors["prompts.prompts.cls"] = torch.randn(prompt.shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, tmp_path / "runs" / "unirestore" / "stage2.safetensors", metadata=metadata)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the README block is the thing under test)
    outputs = {task: np.asarray(Image.open(tmp_path / f"photo-{task}.png")) for task in ("pir", "seg", "cls")}
    assert all(image.shape == (50, 70, 3) for image in outputs.values())
    single = np.asarray(Image.open(tmp_path / "photo-restored.png"), np.float32)
    assert np.abs(single - outputs["pir"].astype(np.float32)).max() <= 1.0  # restore_tasks: each as alone
    assert not np.array_equal(outputs["pir"], outputs["cls"])  # each prompt steers the decoder its own way


def test_the_device_running_out_of_memory_is_one_line_naming_the_fix(trained, root, monkeypatch):
    """Training and evaluation stop with exit 1 and one line: what ran out, and which option to lower."""
    import torch

    from unirestore.framework.model import UniRestore

    output, _, _ = trained

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.5 GiB free.")

    monkeypatch.setattr(UniRestore, "decode_tasks", out_of_memory)
    evaluated = runner.invoke(app, ["eval", "--ckpt", str(output / "stage2.safetensors"), "--tasks", "pir",
                                    "--samples", "2", "--batch-size", "2", "--out", str(root / "oom-eval"),
                                    "--tracking-uri", f"sqlite:///{root / 'oom.db'}"])  # fmt: skip
    added = runner.invoke(app, ["task", "add", "det", "--from", str(output / "stage2.safetensors"), "--output",
                                str(root / "oom-run"), "--tracking-uri", f"sqlite:///{root / 'oom.db'}",
                                "--steps", "2", *TINY])  # fmt: skip
    for result, fix in ((evaluated, "give a smaller --batch-size (now 2) or --tile-size (now 1024)"),
                        (added, "lower --batch-size")):  # fmt: skip
        assert result.exit_code == 1, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert errors == [f"error: out of memory: CUDA out of memory; {errors[0].split('; ', 1)[1]}"], errors
        assert fix in errors[0] and "Traceback" not in result.output
    assert "continues from its last checkpoint with --resume" in added.stderr


def test_a_full_disk_while_restoring_is_one_line_and_keeps_what_was_written(trained, root, monkeypatch, tmp_path):
    import errno

    from unirestore.framework.data import io

    output, _, _ = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(photos / f"{name}.png")
    real_save = io.save_png

    def full_after_one(image, path, **options):
        if path.parent.is_dir() and any(path.parent.iterdir()):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(image, path, **options)

    monkeypatch.setattr(io, "save_png", full_after_one)
    out = tmp_path / "restored"
    result = runner.invoke(app, ["restore", str(photos), "--ckpt", str(output / "stage2.safetensors"), "--out", str(out)])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]  # beside the progress bar
    assert errors == [line for line in errors if line.startswith("error: cannot write: No space left on device; free")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == ["a.png"] and Image.open(out / "a.png").size == (40, 40)


@pytest.mark.parametrize("entry", ["cli", "experiments"])
def test_the_command_and_the_experiments_count_subnormal_floats_as_zero(entry):
    """On some CPUs arithmetic on floats below the normal range is many times slower, and stage 2's gradients
    reach them: the `unirestore` command and `python -m unirestore.experiments.*` flush them to zero."""
    start = {
        "cli": "sys.argv = ['unirestore', '--version']\nfrom unirestore.framework.cli import main\n"
               "try:\n    main()\nexcept SystemExit:\n    pass",
        "experiments": "import unirestore.experiments",
    }[entry]  # fmt: skip
    code = f"import sys, torch\nbefore = (torch.tensor([1e-39]) * 1.0).item()\n{start}\n" \
           "print(before, (torch.tensor([1e-39]) * 1.0).item())"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after = map(float, out.stdout.split()[-2:])
    assert before > 0 and after == 0.0


def test_version_names_the_package_torch_and_diffusers():
    import importlib.metadata

    import diffusers

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    expected = f"unirestore {importlib.metadata.version('unirestore')} (torch {torch.__version__}, "
    assert result.output.startswith(expected) and f"diffusers {diffusers.__version__})" in result.output


def test_restore_under_torchrun_shares_the_images_between_processes(trained, root, monkeypatch):
    """Each process of `torchrun ... restore` (WORLD_SIZE, RANK) restores every world-th image, even with
    --skip-existing after another process has begun; together they write what one process writes."""
    output, _, _ = trained
    folder = write_photos(root / "shard-images", dict.fromkeys("01234", (32, 40)), seed=5, broken="5.png")
    args = ["restore", str(folder), "--ckpt", str(output / "stage2.safetensors")]
    alone = runner.invoke(app, [*args, "--out", str(root / "alone")])
    assert alone.exit_code == 1 and "restored 5 image(s)" in alone.stdout
    counts = []
    for rank in (1, 0):  # the second process starts after the first has written its share
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        result = runner.invoke(app, [*args, "--out", str(root / "shared"), "--skip-existing"])
        assert f"(process {rank} of 2: one image in 2)" in result.stdout, result.output
        counts.append(int(result.stdout.split("restored ")[1].split(" ")[0]))
        assert ("5.png" in result.output) == (rank == 1)  # the broken 5.png falls to process 1: it reports it
    assert counts == [2, 3]
    for index in range(5):
        shared = np.asarray(Image.open(root / "shared" / f"{index}.png"), np.float32)
        assert np.abs(shared - np.asarray(Image.open(root / "alone" / f"{index}.png"), np.float32)).max() <= 1.0


def test_an_output_path_through_a_file_is_one_line(trained, root, tmp_path):
    """--out under a file (a typo such as photos/a.png/out): one line naming the path, exit 2, no traceback."""
    output, _, _ = trained
    photo = tmp_path / "a.png"
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(photo)
    ckpt = str(output / "stage2.safetensors")
    for args in (["restore", str(photo), "--ckpt", ckpt, "--out", str(photo / "out")],
                 ["eval", "--ckpt", ckpt, "--tasks", "pir", "--samples", "1", "--out", str(photo / "ev")]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        line = " ".join(result.stderr.split())
        if args[0] == "restore":  # the output folder is made before any work
            assert f"error: --out {photo}/out: cannot create this folder (Not a directory)" in line, line
        else:  # before the evaluation, not after it
            assert f"error: --out {photo}/ev: {photo} is a file; give a folder" in line, line
    assert photo.is_file() and Image.open(photo).size == (24, 24)  # the input is untouched


def test_a_user_error_raised_in_a_dataloader_worker_is_still_one_line_naming_it(capsys):
    """torch re-raises a worker's error as "Caught DataError in DataLoader worker process 0." plus the worker's
    traceback; the CLI prints the error itself (training and eval read data in workers)."""
    import torch
    import typer

    from unirestore.framework.cli import _errors
    from unirestore.framework.data.io import DataError

    message = "/data/cityscapes/gtFine/val/x_labelIds.png: label map is 10×10 but its image is 20×20; fix the file"

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise DataError(message)

    with pytest.raises(typer.Exit) as stopped, _errors():
        list(torch.utils.data.DataLoader(Broken(), batch_size=None, num_workers=1))
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize(
    "message",
    [
        (
            "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's workers "
            "are out of shared memory. Please try to raise your shared memory limit."
        ),
        "DataLoader worker (pid(s) 4242) exited unexpectedly",
        (
            "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  "
            'File "x.py", line 1\nRuntimeError: unable to write to file </torch_4242_1>: No space left on device (28)'
        ),
    ],
)
def test_a_dataloader_worker_out_of_shared_memory_is_one_line_with_the_fix(capsys, message):
    """In a container /dev/shm is 64 MB unless raised: the workers that read training or test data fail there."""
    import typer

    from unirestore.framework.cli import _errors

    with pytest.raises(typer.Exit) as stopped, _errors():
        raise RuntimeError(message)
    assert stopped.value.exit_code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--shm-size" in lines[0] and "--workers 0" in lines[0]
    assert lines[0].startswith("error: a DataLoader worker failed: ") and "Caught" not in lines[0]


def test_a_run_folder_in_use_stops_a_second_training(trained, root):
    """Two trainings in one folder would mix their stages, logs and checkpoints: the second stops at once,
    naming the process that holds the folder; once it is free, a kill's leftover temporary files go."""
    import os

    from unirestore.framework.engine import run_folder_lock

    output, uri, _ = trained
    leftover = output / "stage2" / ".last.safetensors.k1ll3d.tmp"  # a checkpoint cut before its rename
    with run_folder_lock(output):
        leftover.write_bytes(b"half")
        resume = ["train", "--config", str(output / "config.yaml"), "--resume"]
        for args in (resume, ["task", "add", "det", "--from", str(output / "stage2.safetensors")]):
            result = runner.invoke(app, [*args, "--output", str(output), "--tracking-uri", uri, *TINY])
            line = " ".join(result.stderr.split())
            holder = f"in use by another process writing there (training, process {os.getpid()} on"
            assert result.exit_code == 2 and holder in line, line
        assert leftover.is_file()  # the holder's business, not the refused run's
    # free again: the resumed run (everything done) goes through and the leftover is gone
    result = runner.invoke(app, [*resume, "--output", str(output), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert not leftover.exists() and "already complete" in result.output


def test_resuming_a_folder_with_nothing_in_it_says_so(trained, root):
    _, uri, _ = trained  # the tiny prior is trained by now
    output = root / "fresh"
    result = runner.invoke(app, ["train", "--tasks", "pir", "--stage", "1", "--steps", "1", "--resume", "--output",
                                 str(output), "--tracking-uri", uri, *TINY])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"nothing to resume in {output}; starting the run anew" in " ".join(result.output.split())
    assert (output / "stage1.safetensors").is_file()


def test_resuming_a_training_whose_mlflow_run_was_deleted_says_so_and_logs_to_a_new_run(trained, root):
    """A run deleted in the MLflow UI stays in the store, marked deleted: --resume cannot continue it."""
    from mlflow.tracking import MlflowClient

    from unirestore.framework.engine.tracking import RUN_FILE, load_run_id

    _, uri, _ = trained  # the tiny prior is trained by now
    output = root / "deleted-run"
    args = ["train", "--tasks", "pir", "--stage", "1", "--steps", "1", "--output", str(output), "--tracking-uri", uri,
            *TINY]  # fmt: skip
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    client, old = MlflowClient(uri), load_run_id(output)
    client.delete_run(old)
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    new = load_run_id(output)
    assert new != old and client.get_run(new).info.lifecycle_stage == "active"
    assert client.get_run(new).info.status == "FINISHED"
    notes = [line for line in resumed.output.splitlines() if "is no longer in the tracking store" in line]
    assert notes == [(f"note: MLflow run {old} ({output / RUN_FILE}) is no longer in the tracking store (deleted, or "
                      f"another --tracking-uri); this training is logged to a new run, {new}")], resumed.output  # fmt: skip
    assert f"MLflow run: {new}" in resumed.output
    again = runner.invoke(app, [*args, "--resume"])  # the new run is continued, without a note
    assert again.exit_code == 0 and "no longer in the tracking store" not in again.output, again.output
    assert load_run_id(output) == new


@pytest.mark.parametrize("command", ["train", "task add", "eval", "sweep beta", "sweep extend"])
@pytest.mark.parametrize("kind", ["unknown scheme", "under a file"])
def test_an_unusable_tracking_uri_is_refused_before_any_work_in_one_line(root, command, kind):
    corrupt = _corrupt(root)
    uri = "nosuch://host/store" if kind == "unknown scheme" else f"sqlite:///{corrupt}/mlflow.db"
    out = root / f"never-{command.replace(' ', '-')}"
    args = {
        "train": ["train", "--tasks", "pir", "--output", str(out), "--tracking-uri", uri],
        "task add": ["task", "add", "det", "--from", str(corrupt), "--output", str(out), "--tracking-uri", uri],
        "eval": ["eval", "--ckpt", str(corrupt), "--tasks", "pir", "--out", str(out), "--tracking-uri", uri],
        "sweep beta": ["sweep", "beta", "--from", str(corrupt), "--output", str(out), "--set", f"tracking_uri={uri}"],
        "sweep extend": ["sweep", "extend", "--from", str(corrupt), "--output", str(out), "--set",
                         f"tracking_uri={uri}"],
    }[command]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow tracking URI {uri} cannot be used: "), lines
    reason = "no store for the scheme 'nosuch'" if kind == "unknown scheme" else f"{corrupt} is a file, not a folder"
    assert reason in lines[0]
    option = "--set tracking_uri=" if command.startswith("sweep") else "--tracking-uri "
    assert f"give {option}sqlite:///PATH/mlflow.db" in lines[0]  # the fix, as this command takes it
    assert "Traceback" not in result.output
    assert not out.exists()  # checked before the checkpoint is read (it is corrupt) and before anything is made


def test_task_add_names_a_held_out_set_that_cannot_be_read_before_training(trained, root):
    """The new task's validation and test sets are read only after its steps: one that cannot be read (a flat
    folder without its labels file) stops `task add` before the run starts, as its downstream model does."""
    output, uri, _ = trained
    classes, flat = root / "add-classes" / "n01440764", root / "add-flat"
    for folder in (classes, flat):
        write_photos(folder, {"a": (40, 40), "b": (40, 40)}, seed=0)
    data = root / "add-flat.yaml"
    data.write_text(f"tasks:\n  ret: [{{type: image_folder, root: {classes.parent}, splits: [train]}}, "
                    f"{{type: image_folder, root: {flat}, splits: [val, test]}}]\n")  # fmt: skip
    added = root / "add-flat-run"
    result = runner.invoke(app, ["task", "add", "ret", "--from", str(output / "stage2.safetensors"), "--data",
                                 str(data), "--output", str(added), "--tracking-uri", uri])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "add-flat: no class sub-folders" in " ".join(result.stderr.split())
    assert not (added / "stage3-ret").exists()


def test_train_and_task_add_compile_sets_train_compile(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from unirestore.framework import engine

    seen = []
    monkeypatch.setattr(engine, "train", lambda config, **_: seen.append(config.train.compile) or SimpleNamespace(
        checkpoint="x", run_id=None))  # fmt: skip
    monkeypatch.setattr(engine, "add_task", lambda config, *_, **__: seen.append(config.train.compile) or SimpleNamespace(
        checkpoint="x"))  # fmt: skip
    output = ["--output", str(tmp_path / "run")]
    for extra in ([], ["--compile"]):
        assert runner.invoke(app, ["train", "--tasks", "pir", *output, *extra]).exit_code == 0
        source = ["--from", str(tmp_path / "stage2.safetensors")]
        assert runner.invoke(app, ["task", "add", "det", *source, *output, *extra]).exit_code == 0
    assert seen == [False, False, True, True]


def test_ctrl_c_is_one_line_naming_how_to_go_on(trained, root, monkeypatch):
    import mlflow

    from unirestore.framework import engine

    _, uri, _ = trained

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_train_stages", interrupted)
    output = root / "interrupted"
    result = runner.invoke(app, ["train", "--tasks", "pir", "--stage", "1", "--output", str(output),
                                 "--tracking-uri", uri, "--set", "run_name=interrupted", *TINY])  # fmt: skip
    assert result.exit_code == 130
    assert result.stderr.strip() == (
        "interrupted; what was saved is whole: the same command with --resume continues from the last checkpoint"
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["unirestore"], filter_string="attributes.run_name = 'interrupted'")
    assert list(runs["status"]) == ["KILLED"]


PYTHON = [sys.executable, "-m", "unirestore.framework.cli"]


def _start(args: list[str], env: dict) -> subprocess.Popen:
    """`unirestore <args>` in a child process that hears Ctrl-C as a shell's would: a test run started with nohup
    or `&` ignores it, and would pass that on."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([*PYTHON, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, before)


def _signal_when(process: subprocess.Popen, ready, number: int) -> str:
    """Send signal `number` to `process` once `ready()` says so (or at once if it ended); its stderr once it ended."""
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.05)
        process.send_signal(number)
        return process.communicate(timeout=300)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_ctrl_c_during_training_saves_the_step_it_reached_and_resume_goes_on_from_it(root):
    """The real signal to a real `unirestore train`: the step in progress finishes and is saved (past the last
    periodic checkpoint), exit 130 with one line naming the step and the command that continues, which does."""
    import mlflow

    from unirestore.framework.engine.curves import MetricHistory
    from unirestore.framework.engine.state import read_training_state

    output, uri = root / "ctrl-c", f"sqlite:///{root / 'ctrl-c.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # PYTHONPATH and UNIRESTORE_HOME as this process has them
    args = ["train", "--tasks", "pir", "--stage", "1", "--steps", "60", "--batch-size", "2", "--output", str(output),
            "--tracking-uri", uri, "--set", "train.checkpoint_every=5", "--set", "train.eval_samples=2", *TINY]  # fmt: skip
    training = _start(args, env)
    history = MetricHistory(output / "stage1")
    # past the first periodic checkpoint (step 5), so that the stop lands between two of them
    stderr = _signal_when(
        training, lambda: max((record["step"] for record in history.read()), default=0) >= 6, signal.SIGINT
    )
    assert training.returncode == 130, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    stopped = re.fullmatch(r"interrupted: stage1 stopped at step (\d+) of 60, saved in (\S+); continue with: (.+)", line)
    assert stopped, stderr[-3000:]
    step = int(stopped[1])
    assert stopped[2] == str(output / "stage1" / "last.safetensors")
    state = read_training_state(output / "stage1")
    assert state.step == step and 5 < step < 60 and not state.done
    mlflow.set_tracking_uri(uri)
    assert list(mlflow.search_runs(experiment_names=["unirestore"])["status"]) == ["KILLED"]
    command = shlex.split(stopped[3])
    assert command[:2] == ["unirestore", "train"] and command[-1] == "--resume"
    resumed = subprocess.run([*PYTHON, *command[1:]], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage1: resuming at step {step} of 60" in resumed.stdout
    assert (output / "stage1.safetensors").is_file() and read_training_state(output / "stage1").done
    assert list(mlflow.search_runs(experiment_names=["unirestore"])["status"]) == ["FINISHED"]  # the same run


def test_a_killed_training_resumed_holds_each_metric_step_once_in_mlflow(root):
    """A training killed outright (SIGKILL: no step saved on the way out) after logging steps past its last
    checkpoint: the resumed stage trains those steps again, and its MLflow run holds each (metric, step) once,
    with the values metrics.jsonl holds (the replay is bit-identical on the CPU; the speed is measured anew)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from unirestore.framework.engine.curves import MetricHistory
    from unirestore.framework.engine.state import has_training_state, read_training_state
    from unirestore.framework.engine.tracking import load_run_id

    output, uri = root / "killed-replay", f"sqlite:///{root / 'killed-replay.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "unirestore.framework.cli", "train", "--tasks", "pir", "--stage", "1", "--steps",
               "40", "--batch-size", "2", "--output", str(output), "--tracking-uri", uri, "--set",
               "train.checkpoint_every=5", "--set", "train.val_every=3", "--set", "train.eval_samples=2", *TINY]  # fmt: skip
    history, folder = MetricHistory(output / "stage1"), output / "stage1"
    training = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, killed = time.monotonic() + 300, False
        while not killed and training.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            logged = max((record["step"] for record in history.read()), default=0)
            if logged < 7:
                continue
            training.send_signal(signal.SIGSTOP)  # held still while the files are read
            saved = read_training_state(folder).step if has_training_state(folder) else 0
            logged = max((record["step"] for record in history.read()), default=0)
            if 5 <= saved < logged:  # steps logged past the checkpoint resuming starts from: replayed
                training.kill()
                killed = True
            else:
                training.send_signal(signal.SIGCONT)
        training.communicate(timeout=300)
    finally:
        if training.poll() is None:
            training.kill()
            training.communicate()
    assert killed, "the training ended before it could be killed between two checkpoints"
    client = MlflowClient(uri)
    run_id = load_run_id(output)
    first = {point.step for point in client.get_metric_history(run_id, "stage1/loss_total")}
    assert max(first) > saved  # the killed process had logged the steps the resumed one replays
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage1: resuming at step {saved} of 40" in resumed.stdout
    run = client.get_run(run_id)  # the same run, continued
    assert run.info.status == "FINISHED"
    expected: dict[str, dict[int, float]] = {}
    for record in history.read():
        for name, value in record["metrics"].items():
            assert record["step"] not in expected.setdefault(name, {}), (name, record["step"])
            expected[name][record["step"]] = value
    assert {"stage1/loss_total", "stage1/lr", "stage1/val/pir/restored/psnr"} <= set(expected)
    assert set(expected["stage1/loss_total"]) == set(range(1, 41))
    for name in run.data.metrics:
        steps = [point.step for point in client.get_metric_history(run_id, name)]
        assert len(steps) == len(set(steps)), (name, sorted(steps))  # each step once
    for name, values in expected.items():
        logged = {point.step: point.value for point in client.get_metric_history(run_id, name)}
        assert set(logged) == set(values), name
        if not name.endswith("steps_per_second"):
            assert logged == values, name  # the first pass's values, which the replay reproduced exactly


def test_ctrl_c_in_stage_0_saves_its_step_and_resume_goes_on_from_it(root, tmp_path):
    """Stage 0 (the tiny prior's training, minutes of the main command) kept no checkpoint: Ctrl-C lost all of it.
    Now the step in progress finishes and is saved in the run folder, the cached prior stays unmarked, exit 130
    with stage 1's line, and the command it names goes on from that step and puts the trained prior in place."""
    import mlflow
    from safetensors import safe_open

    from unirestore.framework.engine.stage0 import MARKER

    home, output, uri = tmp_path / "home", tmp_path / "run", f"sqlite:///{tmp_path / 'stage0.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNIRESTORE_HOME": str(home)}  # the shared test prior stays as it is
    args = ["train", "--stage", "0", "--output", str(output), "--tracking-uri", uri, "--set", "stage0.vae_steps=80",
            "--set", "stage0.unet_steps=2", "--set", "stage0.batch_size=2", "--set", "stage0.checkpoint_every=10"]  # fmt: skip
    saved = output / "stage0" / "last.safetensors"

    def saved_step() -> int:
        if not saved.is_file():
            return 0
        with safe_open(saved, framework="pt") as handle:
            return int(handle.metadata()["step"])

    training = _start(args, env)
    stderr = _signal_when(training, lambda: saved_step() >= 10, signal.SIGINT)  # past the first periodic checkpoint
    assert training.returncode == 130, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    stopped = re.fullmatch(r"interrupted: stage0 stopped at step (\d+) of 82, saved in (\S+); continue with: (.+)", line)
    assert stopped, stderr[-3000:]
    step = int(stopped[1])
    assert 10 <= step < 80 and stopped[2] == str(saved) and saved_step() == step
    assert not (home / "priors" / "tiny" / MARKER).exists()  # not taken for a trained prior
    mlflow.set_tracking_uri(uri)
    assert list(mlflow.search_runs(experiment_names=["unirestore"])["status"]) == ["KILLED"]
    assert runner.invoke(app, args).exit_code == 2  # without --resume, the saved steps are not overwritten
    command = shlex.split(stopped[3])
    assert command[:2] == ["unirestore", "train"] and command[-1] == "--resume"
    resumed = subprocess.run([*PYTHON, *command[1:]], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage0: resuming at step {step} of 82" in resumed.stdout
    assert (home / "priors" / "tiny" / MARKER).is_file() and not saved.exists()
    assert list(mlflow.search_runs(experiment_names=["unirestore"])["status"]) == ["FINISHED"]  # the same run


def test_sigterm_in_the_final_evaluation_says_the_training_is_saved_and_resume_evaluates(root):
    """A SIGTERM (or Ctrl-C) while the trained model is evaluated ended the process without a word, its MLflow run
    left running: now one line says that the training is complete and saved and names the command that
    evaluates it again, exit 143, the run ends as killed; that command skips the stages and writes the table."""
    import mlflow

    output, uri = root / "eval-stopped", f"sqlite:///{root / 'eval-stopped-db' / 'mlflow.db'}"
    (root / "eval-stopped-db").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # stages 1 and 2 alone: the tiny prior is not trained here
    args = ["train", "--tasks", "pir", "--stage", "1,2", "--steps", "1", "--batch-size", "2", "--output", str(output),
            "--tracking-uri", uri, "--set", "train.eval_samples=32", *TINY]  # fmt: skip
    artifacts = root / "eval-stopped-db" / "mlartifacts"  # the final checkpoint is logged, then evaluated

    def evaluating() -> bool:
        if any(artifacts.rglob("checkpoints/stage2.safetensors")):
            time.sleep(0.5)  # past the copy
            return True
        return False

    training = _start(args, env)
    stderr = _signal_when(training, evaluating, signal.SIGTERM)
    assert training.returncode == 143, stderr[-3000:]
    command = f"unirestore train --config {output / 'config.yaml'} --stage 1,2 --resume"
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: training is complete, saved in {output / 'stage2.safetensors'}, but its final evaluation was "
        f"interrupted; run it again with: {command}"
    ), stderr[-3000:]
    assert not (output / "final" / "stage2" / "eval.md").exists()
    mlflow.set_tracking_uri(uri)
    assert list(mlflow.search_runs(experiment_names=["unirestore"])["status"]) == ["KILLED"]
    again = [*shlex.split(command)[1:], "--set", "train.eval_samples=4"]  # train.eval_samples may change on --resume
    resumed = subprocess.run([*PYTHON, *again], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage2: already complete (1 steps), skipped" in resumed.stdout
    assert (output / "final" / "stage2" / "eval.md").is_file()
    assert list(mlflow.search_runs(experiment_names=["unirestore"])["status"]) == ["FINISHED"]  # the same run


def test_a_training_stopped_by_sigterm_exits_143_with_its_one_line(capsys):
    """128 + the signal, as a shell reports a process killed by it: a scheduler tells preemption from failure."""
    import signal

    import typer

    from unirestore.framework.cli import _errors
    from unirestore.framework.engine.trainer import TrainingInterrupted

    message = "stage2 stopped at step 7 of 20, saved in r/stage2/last.safetensors; continue with: unirestore train ..."
    with pytest.raises(typer.Exit) as stopped, _errors():
        raise TrainingInterrupted(message, signal.SIGTERM)
    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err == f"interrupted: {message}\n"


def test_downstream_train_says_when_a_task_has_no_downstream_model(root):
    result = runner.invoke(app, ["downstream", "train", "--task", "pir"])
    assert result.exit_code == 0 and "task 'pir' has no downstream model to train" in result.output


def test_downstream_train_reads_the_data_config_given_with_data(root):
    """A task without built-in data is told to "give a data config (--data)", an option this command lacked."""
    config = root / "cls-real.yaml"
    config.write_text("tasks:\n  cls: [{type: image_folder, root: images}]\n")
    result = runner.invoke(app, ["downstream", "train", "--task", "cls", "--data", str(config)])
    # real data: the real classifier's checkpoint is what it needs, not the built-in models' training
    assert result.exit_code != 0 and "downstream_checkpoints.resnet50" in " ".join(result.output.split())
