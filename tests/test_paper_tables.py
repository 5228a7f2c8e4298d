"""The paper-tables benchmark at a toy budget: every row and column is produced and written."""

import json

import pytest


@pytest.fixture
def private_home(tmp_path, monkeypatch):
    # its own home: the toy budget retrains the tiny prior and the downstream models at a few steps
    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))
    return tmp_path


def test_toy_budget_writes_every_table(private_home):
    from unirestore.experiments.paper_tables import ROWS, UNSEEN, run

    benchmarks = private_home / "BENCHMARKS.md"
    results = run("toy", private_home / "out", benchmarks)
    assert set(results["rows"]) == set(ROWS)
    for row in ("LQ", "HQ", "UniRestore", "NAFNet"):
        for column, _ in UNSEEN:
            assert f"{column}/psnr" in results["rows"][row]
        assert any(k.startswith("cls/acc/") for k in results["rows"][row])
        assert any(k.startswith("seg/miou/") for k in results["rows"][row])
    assert "det/map" in results["rows"]["UniRestore"]  # det added by its prompt alone
    assert results["parameters"]["UniRestore"] > results["parameters"]["w/o CFRM"]
    text = benchmarks.read_text()
    for title in ("Table 1", "Table 2", "Table 3", "Table 5", "Table 6", "Gap closed", "Speed on the CPU"):
        assert title in text
    assert (private_home / "paper_tables.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((private_home / "out" / "paper_tables.json").read_text())
    assert saved["wall_s"] > 0


def test_rewriting_benchmarks_keeps_the_notes_around_the_generated_block(tmp_path):
    from unirestore.experiments.paper_tables import BEGIN, END, _write_benchmarks

    chart = tmp_path / "runs" / "paper_tables.png"
    chart.parent.mkdir()
    chart.write_bytes(b"\x89PNG fake")
    benchmarks = tmp_path / "BENCHMARKS.md"
    _write_benchmarks(benchmarks, "old tables", chart)  # a fresh file: the block, then the GPU section
    first = benchmarks.read_text()
    assert first.startswith("# Benchmarks") and f"{BEGIN}\nold tables\n{END}" in first
    benchmarks.write_text(first.replace(END, END + "\n\nHand-written note.") + "Closing note.\n")
    _write_benchmarks(benchmarks, "new tables", chart)
    text = benchmarks.read_text()
    assert "new tables" in text and "old tables" not in text
    assert "Hand-written note." in text and text.endswith("Closing note.\n")
    assert text.count(BEGIN) == 1 and (tmp_path / "paper_tables.png").is_file()


def test_cfrm_latent_scores_every_test_image_once_and_an_initial_cfrm_as_the_identity(tiny_prior, tmp_path):
    """The CFRM starts as the identity (SPEC: zero-initialised last convolutions), so before training its latent
    decodes as the plain encoder's; every image of the first `samples` is counted under its own corruption."""
    from unirestore.experiments.cfrm_latent import measure, table
    from unirestore.framework.checkpoint import save_checkpoint
    from unirestore.framework.model import UniRestore

    path = save_checkpoint(UniRestore(tiny_prior, tasks=["pir"]), tmp_path / "initial.safetensors")
    results = measure(path, samples=6, batch_size=4)
    assert results["all"]["images"] == 6
    assert sum(r["images"] for name, r in results.items() if name != "all") == 6
    assert abs(results["all"]["cfrm"] - results["all"]["plain"]) < 0.05
    assert "| all (6) |" in table(results)


def test_gap_closed_sits_beside_the_papers_gap_of_the_same_model():
    """Each classifier and segmenter beside the paper's own gap (Tables 2 and 3: ViT-B closes 0.851 of it on
    ImageNet, not ResNet-50's 0.945; FCN stands in for the second segmenter, RefineNet-lw: 0.716)."""
    from pathlib import Path

    from unirestore.experiments.paper_tables import _gap_closed, _markdown

    keys = ("cls/acc/resnet", "cls/acc/vit", "seg/miou/deeplab", "seg/miou/fcn")
    rows = {"LQ": dict.fromkeys(keys, 0.5), "UniRestore": dict.fromkeys(keys, 0.6), "HQ": dict.fromkeys(keys, 0.9),
            "w/o TFA": dict.fromkeys(keys, 0.55), "w/o CFRM": dict.fromkeys(keys, 0.52)}  # fmt: skip
    gaps = _gap_closed(rows)
    assert gaps == {key: pytest.approx(0.25) for key in keys}  # (0.6 − 0.5) / (0.9 − 0.5)
    results = {"budget": "toy", "machine": "here", "wall_s": 60.0, "rows": rows, "gap_closed": gaps,
               "parameters": {}, "budget_detail": {"eval_samples": 4, "batch_size": 2},
               "speed": {"train_steps_per_s": {}, "restore_images_per_s": {}, "peak_rss_gib": 1.0}}  # fmt: skip
    lines = [line for line in _markdown(results, Path("chart.png")).splitlines() if line.startswith(("| cls/", "| seg/"))]
    paper = {line.split(" | ")[0][2:]: line.split(" | ")[2] for line in lines if "0.250" in line}
    assert paper == {
        "cls/acc/resnet": f"{(71.65 - 51.75) / (72.80 - 51.75):.3f} (ImageNet / ResNet-50) |",
        "cls/acc/vit": f"{(77.05 - 67.65) / (78.70 - 67.65):.3f} (ImageNet / ViT-B) |",
        "seg/miou/deeplab": f"{(66.05 - 40.36) / (75.64 - 40.36):.3f} (Cityscapes / DeepLabv3+) |",
        "seg/miou/fcn": f"{(65.73 - 40.75) / (75.66 - 40.75):.3f} (Cityscapes / RefineNet-lw) |",
    }


def test_the_experiments_let_idle_openmp_threads_sleep_as_the_cli_does():
    """`python -m unirestore.experiments.<name>` sets OMP_WAIT_POLICY=PASSIVE before torch loads (unless the user
    set it): two processes on two cores with spinning OpenMP threads ran a detector's training 60 times slower."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    probe = "import os, unirestore.experiments; print(os.environ.get('OMP_WAIT_POLICY'))"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "PASSIVE"
    kept = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert kept.stdout.strip() == "ACTIVE"
