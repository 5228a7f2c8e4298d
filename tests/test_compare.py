"""Run comparison over an MLflow store."""

import re

import mlflow
import pytest

from unirestore.framework.compare import CompareError, compare_runs, plot_comparison, render_table


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("demo", artifact_location=str(tmp_path / "artifacts"))
    for name, psnr, acc, loss in (("small-beta", 20.5, 0.61, 0.3), ("big-beta", 19.0, 0.72, 0.2)):
        with mlflow.start_run(experiment_id=experiment, run_name=name):
            mlflow.log_params({"stages": "2", "tasks": "pir,cls", "beta": name, "prior": "tiny", "steps": 10})
            mlflow.log_metrics({"pir/psnr": psnr, "cls/acc/resnet": acc, "loss/pir_l1": 0.1,
                                "stage2/loss_total": loss})  # fmt: skip
            if name == "big-beta":
                mlflow.log_metric("downstream/vit/acc", 0.5)  # a metric of one run alone
    return uri


def test_two_runs_side_by_side_with_the_best_marked(store, tmp_path):
    comparison = compare_runs(store, experiment="demo")
    assert len(comparison.rows) == 2
    assert comparison.metrics == ["cls/acc/resnet", "pir/psnr"]  # shared metrics; losses are left out by default
    # a loss at any level of its name is best at its minimum
    assert compare_runs(store, experiment="demo", metrics=["stage2/loss_total"]).best == {"stage2/loss_total": 0.2}
    assert comparison.best == {"pir/psnr": 20.5, "cls/acc/resnet": 0.72}
    assert {"stages", "tasks", "beta", "prior", "steps"} <= set(comparison.columns)  # as train and sweeps log them
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_table(comparison))
    text = console.export_text()
    assert "small-beta" in text and "big-beta" in text and text.count("★") == 2
    plot = plot_comparison(comparison, tmp_path / "compare.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_metric_its_task_declares_lower_better_is_best_at_its_minimum(tmp_path, monkeypatch):
    """A task plugin's error metric (a saliency MAE, `Task.lower_is_better`) was starred at its maximum."""
    from unirestore.framework import registry
    from unirestore.tasks.base import Task

    registry.known_tasks()
    monkeypatch.setitem(registry._TASKS, "sal", type("Saliency", (Task,), {"name": "sal", "lower_is_better": ("mae",)}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("sal", artifact_location=str(tmp_path / "artifacts"))
    for name, mae, max_f in (("short", 0.034, 0.86), ("long", 0.031, 0.87)):
        with mlflow.start_run(experiment_id=experiment, run_name=name):
            mlflow.log_metrics({"test/sal/restored/mae": mae, "test/sal/restored/max_f": max_f,
                                "eval/default/sal/restored_sal/mae": mae, "test/pir/restored/mae": mae})  # fmt: skip
    comparison = compare_runs(uri, experiment="sal")
    assert "test/sal/restored/mae" in comparison.metrics  # shown by default, unlike a loss
    assert comparison.best["test/sal/restored/mae"] == comparison.best["eval/default/sal/restored_sal/mae"] == 0.031
    assert comparison.best["test/sal/restored/max_f"] == 0.87
    assert comparison.best["test/pir/restored/mae"] == 0.034  # another task's metric of that name is its own


def test_filter_and_metric_selection(store):
    comparison = compare_runs(store, experiment="demo", metrics=["pir/psnr"], filter_string="metrics.`pir/psnr` > 20")
    assert [row["pir/psnr"] for row in comparison.rows] == [20.5]
    with pytest.raises(CompareError, match="metrics present"):
        compare_runs(store, experiment="demo", metrics=["nope"])
    with pytest.raises(CompareError, match="no experiment 'missing'"):
        compare_runs(store, experiment="missing")


def test_a_missing_store_is_named_and_not_created(tmp_path):
    for uri in (f"sqlite:///{tmp_path / 'none.db'}", str(tmp_path / "mlruns"), f"file://{tmp_path / 'mlruns'}"):
        with pytest.raises(CompareError, match="no tracking store at .*; run this in the folder you trained in"):
            compare_runs(uri)
    assert not any(tmp_path.iterdir())  # MLflow would have made an empty store
    (tmp_path / "mlflow.db").write_bytes(b"")  # a sqlite file given as a plain path
    with pytest.raises(CompareError, match=r"mlflow.db is a file: give a sqlite store as sqlite:///"):
        compare_runs(str(tmp_path / "mlflow.db"))
    with pytest.raises(CompareError, match=r"cannot reach the tracking server at http://127.0.0.1:9"):
        compare_runs("http://127.0.0.1:9")  # nothing listens on the discard port: named at once, no retries


def test_training_curves_of_several_runs_side_by_side(tmp_path):
    """`runs compare --metric M --curves out.png`: each run's logged history of M, one line per run."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from unirestore.framework.cli import app
    from unirestore.framework.compare import plot_histories

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("sweep", artifact_location=str(tmp_path / "artifacts"))
    for name, rate in (("beta-0.1", 0.5), ("beta-1", 0.9)):
        with mlflow.start_run(experiment_id=experiment, run_name=name):
            for step in range(0, 50, 5):
                mlflow.log_metric("stage2/loss_total", np.exp(-rate * step / 10), step=step)
    comparison = compare_runs(uri, experiment="sweep", metrics=["stage2/loss_total"])
    assert len(comparison.run_ids) == 2
    path = plot_histories(uri, comparison, tmp_path / "curves.png")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    # two lines in two colours (matplotlib's first two: blue and orange) on the panel
    blue = ((pixels[..., 2] > 150) & (pixels[..., 0] < 80)).sum()
    orange = ((pixels[..., 0] > 200) & (pixels[..., 1] > 100) & (pixels[..., 1] < 160) & (pixels[..., 2] < 60)).sum()
    assert blue > 50 and orange > 50

    runner = CliRunner()
    result = runner.invoke(app, ["runs", "compare", "--tracking-uri", uri, "--experiment", "sweep",
                                 "--metric", "stage2/loss_total", "--curves", str(tmp_path / "cli.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.png").is_file() and "curves:" in result.stdout
    refused = runner.invoke(app, ["runs", "compare", "--tracking-uri", uri, "--curves", str(tmp_path / "x.png")])
    assert refused.exit_code == 2 and "give one, e.g. --metric stage2/loss_total" in refused.stderr


def test_a_plot_path_that_cannot_be_written_is_refused_before_any_work(store, tmp_path):
    """One line and exit 2 before the runs are read: not the table, then a traceback."""
    import os
    from pathlib import Path

    from typer.testing import CliRunner

    from unirestore.framework.cli import app

    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder.png").mkdir()
    cases = [
        (tmp_path / "a-file" / "compare.png", "a-file is a file, not a folder"),
        (tmp_path / "a-folder.png", "is a folder; give a file path"),
        (tmp_path / ("n" * 300 + ".png"), "cannot write in .* \\(File name too long\\)"),
    ]
    if Path("/proc/self").is_dir():  # a folder that cannot be made, whoever runs the tests
        cases.append((Path("/proc/unirestore-none/compare.png"), "cannot write in /proc/unirestore-none"))
    if os.geteuid() != 0:  # the superuser writes into a read-only folder all the same
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases.append((tmp_path / "read-only" / "compare.png", "cannot write in .*read-only \\(Permission denied\\)"))
    runner = CliRunner()
    for option in ("--plot", "--curves"):
        for path, message in cases:
            result = runner.invoke(app, ["runs", "compare", "--tracking-uri", store, "--experiment", "demo",
                                         "--metric", "pir/psnr", option, str(path)])  # fmt: skip
            assert result.exit_code == 2, (path, result.output)
            assert result.stderr.count("\n") == 1 and re.search(f"error: {option} .*{message}", result.stderr)
            assert "small-beta" not in result.stdout  # refused before the runs were read
    written = runner.invoke(app, ["runs", "compare", "--tracking-uri", store, "--experiment", "demo",
                                  "--plot", str(tmp_path / "new" / "folder" / "compare.png")])  # fmt: skip
    assert written.exit_code == 0, written.output
    assert (tmp_path / "new" / "folder" / "compare.png").is_file()
    assert [p.name for p in (tmp_path / "new" / "folder").iterdir()] == ["compare.png"]  # no scratch file left


def _eval_run(experiment: str, name: str, rows: list[tuple[str, str, str, float]], folder):
    """An eval run that logged eval_images.csv: (task, image, restored row, PSNR) per line."""
    import csv

    path = folder / name / "eval_images.csv"
    path.parent.mkdir()
    columns = sorted({row for _, _, row, _ in rows})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["corruption", "task", "image", "metric", "LQ", *columns])
        for task, image, row, value in rows:
            writer.writerow(["default", task, image, "psnr", 20.0, *(value if c == row else "" for c in columns)])
    with mlflow.start_run(experiment_id=experiment, run_name=name):
        mlflow.log_metric("pir/psnr", 20.0)
        mlflow.log_artifact(str(path))


def test_per_image_between_runs_that_share_no_image_says_so(tmp_path):
    from typer.testing import CliRunner

    from unirestore.framework.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("unirestore-eval", artifact_location=str(tmp_path / "artifacts"))
    _eval_run(experiment, "photos", [("pir", f"photo{i}.png", "restored[pir]", 21.0) for i in range(3)], tmp_path)
    _eval_run(experiment, "scenes", [("seg", "scene.png", "restored[seg]", 22.0)], tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["runs", "compare", "--tracking-uri", uri, "--per-image"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert "no test image is shared between these eval runs" in result.stderr
    assert "scenes (" in result.stderr and "1 image(s) (default/seg)" in result.stderr
    assert "photos (" in result.stderr and "3 image(s) (default/pir)" in result.stderr

    # the same images restored with other prompts: no row to pair, and that is what is said
    _eval_run(experiment, "photos-cls", [("pir", f"photo{i}.png", "restored[cls]", 21.0) for i in range(3)], tmp_path)
    filtered = "attributes.run_name != 'scenes'"
    result = runner.invoke(app, ["runs", "compare", "--tracking-uri", uri, "--per-image", "--filter", filtered])
    assert result.exit_code == 2, result.output
    assert "share test images but no restored row" in result.stderr and "restored[cls]" in result.stderr
