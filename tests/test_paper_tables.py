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
