"""Run comparison over an MLflow store."""

import mlflow
import pytest

from unirestore.framework.compare import CompareError, compare_runs, plot_comparison, render_table


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("demo", artifact_location=str(tmp_path / "artifacts"))
    for name, psnr, acc in (("small-beta", 20.5, 0.61), ("big-beta", 19.0, 0.72)):
        with mlflow.start_run(experiment_id=experiment, run_name=name):
            mlflow.log_params({"stage": "2", "tasks": "pir,cls", "beta": name, "prior": "tiny", "steps": 10})
            mlflow.log_metrics({"pir/psnr": psnr, "cls/acc/resnet": acc, "loss/pir_l1": 0.1})
    return uri


def test_two_runs_side_by_side_with_the_best_marked(store, tmp_path):
    comparison = compare_runs(store, experiment="demo")
    assert len(comparison.rows) == 2
    assert comparison.metrics == ["cls/acc/resnet", "pir/psnr"]  # loss terms are left out by default
    assert comparison.best == {"pir/psnr": 20.5, "cls/acc/resnet": 0.72}
    assert {"stage", "tasks", "beta", "prior", "steps"} <= set(comparison.columns)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_table(comparison))
    text = console.export_text()
    assert "small-beta" in text and "big-beta" in text and text.count("★") == 2
    plot = plot_comparison(comparison, tmp_path / "compare.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
