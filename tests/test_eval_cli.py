"""`unirestore eval` and `unirestore runs compare` end to end through the CLI on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from compiling import recording_compile
from photos import write_photos
from typer.testing import CliRunner

from unirestore.framework.checkpoint import save_checkpoint
from unirestore.framework.cli import app
from unirestore.framework.config import ModelConfig
from unirestore.framework.model import UniRestore

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_prior):
    folder = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir", "cls"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNIRESTORE_DOWNSTREAM_STEPS", "3")
        yield folder, save_checkpoint(model, folder / "model.safetensors")


def _eval(folder, path, out, *extra):
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = ["eval", "--ckpt", str(path), "--tasks", "pir,cls", "--samples", "4", "--out", str(out),
            "--tracking-uri", uri, *extra]  # fmt: skip
    return runner.invoke(app, args), uri


def test_eval_writes_tables_and_an_mlflow_run_and_is_deterministic(checkpoint):
    folder, path = checkpoint
    first, uri = _eval(folder, path, folder / "a")
    assert first.exit_code == 0, first.output
    assert "evaluating cls" in first.output  # a progress bar per task
    for name in ("eval.csv", "eval.json", "eval.md", "eval_images.csv", "eval_gains.png"):
        assert (folder / "a" / name).is_file()
    results = json.loads((folder / "a" / "eval.json").read_text())["results"]
    rows = {(r["task"], r["input"]) for r in results}
    # LQ, HQ, the task's own prompt and the PIR prompt on classification (as Table 2 shows)
    assert {("cls", "LQ"), ("cls", "HQ"), ("cls", "restored[cls]"), ("cls", "restored[pir]"), ("pir", "restored[pir]")} <= rows
    assert any(p.suffix == ".png" for p in (folder / "a" / "grids").iterdir())
    # the printed table names the prompt of each restored row (rich must not read "[pir]" as markup)
    assert "restored[cls]" in first.output and "restored[pir]" in first.output
    # per image: every test image of each task, one line per metric, a column per row; the means are the table's
    import csv

    per_image = list(csv.DictReader((folder / "a" / "eval_images.csv").read_text().splitlines()))
    assert list(per_image[0])[:5] == ["corruption", "task", "image", "metric", "LQ"]
    assert list(per_image[0])[-1] == "HQ"
    table = {(r["task"], r["input"], r["metric"]): r["value"] for r in results}
    for task, metric in (("pir", "psnr"), ("pir", "ssim"), ("cls", "acc/resnet"), ("cls", "acc/vit")):
        lines = [r for r in per_image if r["task"] == task and r["metric"] == metric]
        assert len(lines) == 4 and len({r["image"] for r in lines}) == 4
        for row in ("LQ", f"restored[{task}]", "HQ"):
            mean = sum(float(r[row]) for r in lines) / 4
            assert mean == pytest.approx(table[(task, row, metric)], abs=1e-5), (task, row, metric)
    psnr = [r for r in per_image if r["task"] == "pir" and r["metric"] == "psnr"]
    above = sum(float(r["restored[pir]"]) > float(r["LQ"]) for r in psnr)
    assert f"default, pir, restored[pir]: psnr above LQ on {above} of 4 images" in first.output
    assert f"psnr above LQ on {above} of 4 images" in (folder / "a" / "eval.md").read_text()
    # the restored images below their LQ, worst first, as a grid (this untrained model is below on all)
    from PIL import Image

    worse = folder / "a" / "grids" / "default-worse-pir.png"
    assert above == 0 and "grids/default-worse-pir.png" in (folder / "a" / "eval.md").read_text()
    assert Image.open(worse).height == 2 + 4 * (64 + 2)  # 4 rows of LQ | restored | HQ at the test size
    second, _ = _eval(folder, path, folder / "b")
    assert second.exit_code == 0, second.output
    assert (folder / "a" / "eval.csv").read_text() == (folder / "b" / "eval.csv").read_text()
    # each image's noise comes from its index: another batch size gives the same table (to float rounding)
    third, _ = _eval(folder, path, folder / "c", "--batch-size", "3")
    assert third.exit_code == 0, third.output
    values = [[float(line.rsplit(",", 1)[1]) for line in (folder / name / "eval.csv").read_text().splitlines()[1:]]
              for name in ("a", "c")]  # fmt: skip
    assert values[0] == pytest.approx(values[1], abs=1e-4)
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["unirestore-eval"])
    assert len(runs) == 3 and (runs["status"] == "FINISHED").all()
    assert "metrics.eval/default/cls/LQ/acc/resnet" in runs.columns or any(
        c.startswith("metrics.eval/default/cls/LQ/") for c in runs.columns
    )
    # named after the run folder and the file (every run folder holds a stage2.safetensors); the checkpoint by
    # its absolute path, the tasks as train logs them, the config it read and the grids as in the --out folder
    name = f"eval-{path.parent.name}/model"
    run = runs.iloc[0]
    assert set(runs["tags.mlflow.runName"]) == {name}
    assert run["params.checkpoint"] == run["tags.unirestore.source"] == str(path.resolve())
    assert (run["params.tasks"], run["params.prompts"], run["params.prior"]) == ("pir,cls", "default", "tiny")
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run["run_id"])}
    assert {"config.json", "eval_images.csv", "grids"} <= artifacts
    grids = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run["run_id"], "grids")}
    assert "grids/default-worse-pir.png" in grids  # where eval.md says it is

    compare = runner.invoke(app, ["runs", "compare", "--experiment", "unirestore-eval", "--tracking-uri", uri,
                                  "--metric", "eval/default/pir/restored_pir/psnr",
                                  "--metric", "eval/default/cls/LQ/acc/resnet",
                                  "--plot", str(folder / "compare.png")])  # fmt: skip
    assert compare.exit_code == 0, compare.output
    assert compare.output.count(name) == 3 and "★" in compare.output
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_compiled_gives_the_eager_table(checkpoint, monkeypatch):
    """`eval --compile` restores through the compiled pass (here dynamo's graphs run by the eager backend, which
    spares minutes of code generation; `restore --compile` is tested with inductor) and scores the same; the
    smaller last batch runs in the full batch's graph."""
    folder, path = checkpoint
    compiled, batches = [], []
    monkeypatch.setattr(torch, "compile", recording_compile(batches, compiled, backend="eager"))
    results = {}
    for option in ([], ["--compile"]):
        result, _ = _eval(folder, path, folder / f"compiled-{bool(option)}", "--batch-size", "3", *option)
        assert result.exit_code == 0, result.output
        table = json.loads((folder / f"compiled-{bool(option)}" / "eval.json").read_text())["results"]
        results[bool(option)] = {(r["task"], r["input"], r["metric"]): r["value"] for r in table}
    assert len(compiled) == 1 and compiled[0].__name__ == "_padded_pass"
    assert set(batches) == {3}  # 4 images: a batch of 3, then 1 padded to 3
    assert results[True].keys() == results[False].keys()
    assert all(abs(results[True][key] - results[False][key]) <= 1e-4 for key in results[False])


def test_eval_per_corruption_and_missing_prompt(checkpoint, monkeypatch):
    folder, path = checkpoint
    result, _ = _eval(folder, path, folder / "c", "--corruption", "gaussian_noise,rain", "--severity", "2")
    assert result.exit_code == 0, result.output
    results = json.loads((folder / "c" / "eval.json").read_text())["results"]
    assert {r["corruption"] for r in results} == {"gaussian_noise@2", "rain@2"}
    # a missing prompt is named before the task's downstream models are built (trained, for the built-in ones)
    monkeypatch.setattr("unirestore.framework.engine.build_tasks", lambda *args: pytest.fail("built the tasks"))
    missing = runner.invoke(app, ["eval", "--ckpt", str(path), "--tasks", "seg", "--out", str(folder / "d")])
    assert missing.exit_code == 2
    assert "no prompt for 'seg'" in missing.output and "pir, cls" in missing.output
    assert "Traceback" not in missing.output


def test_eval_logs_where_its_config_tracks_and_names_the_run_that_trained_the_checkpoint(checkpoint, tiny_prior,
                                                                                         monkeypatch):
    """`eval --config` (the run folder's config.yaml, as the README says) logs into the store that config names,
    as `task add --config` does, not into a mlflow.db of whatever folder it runs in."""
    import mlflow

    folder, _ = checkpoint
    (folder / "trained").mkdir()
    monkeypatch.chdir(folder / "trained")
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"])
    path = save_checkpoint(model, folder / "trained" / "stage2.safetensors", extra={"run_id": "trained-0"})
    store = f"sqlite:///{folder / 'training.db'}"
    (folder / "trained" / "config.yaml").write_text(f"tracking_uri: {store}\n")
    result = runner.invoke(app, ["eval", "--ckpt", str(path), "--tasks", "pir", "--samples", "2", "--out",
                                 str(folder / "from-config"), "--config", str(folder / "trained" / "config.yaml")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (folder / "trained" / "mlflow.db").exists()
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("unirestore-eval").experiment_id])
    assert run.info.run_name == "eval-trained/stage2" and run.info.status == "FINISHED"
    assert run.data.tags["unirestore.source_run"] == "trained-0"


def test_eval_on_real_data_reads_the_downstream_checkpoints_from_config_or_set(checkpoint):
    """Real data needs the real classifiers: eval takes them from the run's config or --set, as train does."""
    from PIL import Image

    folder, path = checkpoint
    (folder / "imagenet" / "n01440764").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40)).save(folder / "imagenet" / "n01440764" / "a.png")
    data = folder / "real-cls.yaml"
    data.write_text(f"tasks:\n  cls: [{{type: image_folder, root: {folder / 'imagenet'}}}]\n")
    broken = folder / "resnet50.pth"
    broken.write_bytes(b"not a state dict")

    def run(*extra):
        uri = f"sqlite:///{folder / 'real.db'}"
        result = runner.invoke(app, ["eval", "--ckpt", str(path), "--tasks", "cls", "--samples", "1",
                                     "--out", str(folder / "real"), "--tracking-uri", uri, *extra])  # fmt: skip
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0]

    assert "set downstream_checkpoints.resnet50 to a local" in run("--data", str(data))
    # --set reaches the loader, which names the file it cannot read
    given = run("--data", str(data), "--set", f"downstream_checkpoints.resnet50={broken}")
    assert f"{broken}: not a readable checkpoint" in given
    # so does a run config (the run folder's config.yaml), its data included
    config = folder / "run.yaml"
    config.write_text(f"data: {data}\ndownstream_checkpoints: {{resnet50: {broken}}}\n")
    assert f"{broken}: not a readable checkpoint" in run("--config", str(config))
    missing = folder / "moved" / "resnet50.pth"
    config.write_text(f"data: {data}\ndownstream_checkpoints: {{resnet50: {missing}}}\n")
    assert f"not found: downstream_checkpoints.resnet50 = {missing}" in run("--config", str(config))
    assert f"not found: downstream_checkpoints.resnet50 = {missing}" in run(
        "--data", str(data), "--set", f"downstream_checkpoints.resnet50={missing}"
    )
    # each stopped before making --out: no folder (nor its lock file) is left behind
    assert not (folder / "real").exists()
    assert not (folder / "real.db").exists()


def test_eval_of_a_missing_real_test_split_stops_before_making_its_out_folder(checkpoint):
    folder, path = checkpoint
    (folder / "cityscapes" / "leftImg8bit" / "train").mkdir(parents=True, exist_ok=True)  # no val (test reads it)
    data = folder / "real-pir.yaml"
    data.write_text(f"tasks:\n  pir: [{{type: cityscapes, root: {folder / 'cityscapes'}}}]\n")
    out = folder / "no-test-split"
    result = runner.invoke(app, ["eval", "--ckpt", str(path), "--tasks", "pir", "--samples", "1", "--out", str(out),
                                 "--data", str(data), "--tracking-uri", f"sqlite:///{folder / 'split.db'}"])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "leftImg8bit/val: folder not found" in lines[0], result.stderr
    assert not out.exists()


def test_eval_of_a_real_prior_checkpoint_on_builtin_data_names_the_runs_config(tmp_path, tiny_prior):
    """A checkpoint trained with --config on real data, evaluated without it, would be judged on the built-in
    scenes: say so, and name the run folder's config.yaml."""
    import shutil

    from unirestore.framework.prior import load_prior, tiny_prior_path

    folder = tmp_path / "sd-like"  # the tiny prior as a folder: a prior other than "tiny", by name
    shutil.copytree(tiny_prior_path(), folder)
    model = UniRestore(load_prior(folder), ModelConfig(), tasks=["pir"])
    path = save_checkpoint(model, tmp_path / "run" / "stage2.safetensors")
    (tmp_path / "run" / "config.yaml").write_text(f"prior: {folder}\n")
    result, _ = _eval(tmp_path, path, tmp_path / "out", "--tasks", "pir", "--samples", "1")
    assert result.exit_code == 0, result.output
    note = " ".join(result.stderr.split())
    assert f"note: evaluating a checkpoint of prior '{folder}' on the built-in data" in note
    assert f"--config {tmp_path / 'run' / 'config.yaml'}" in note
    quiet, _ = _eval(tmp_path, path, tmp_path / "out2", "--tasks", "pir", "--samples", "1",
                     "--config", str(tmp_path / "run" / "config.yaml"))  # fmt: skip
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr


def test_eval_samples_0_takes_every_test_image_and_the_report_counts_what_it_took(checkpoint, tmp_path):
    """A test set smaller than --samples is reported with its real size, not the number asked for."""
    from PIL import Image

    folder, path = checkpoint
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 40), (40 * i, 90, 200)).save(tmp_path / "photos" / f"photo{i}.png")
    data = tmp_path / "three.yaml"
    data.write_text(f"size: 32\ntasks:\n  pir: [{{type: hq_folder, root: {tmp_path / 'photos'}}}]\n")
    for samples, expected in (("0", 3), ("50", 3), ("2", 2)):
        out = tmp_path / f"out{samples}"
        result, _ = _eval(folder, path, out, "--tasks", "pir", "--data", str(data), "--samples", samples)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "eval.json").read_text())
        assert report["images"] == {"pir": expected}
        assert f"{expected} images per task" in (out / "eval.md").read_text()
        assert len((out / "eval_images.csv").read_text().splitlines()) == 1 + 2 * expected  # psnr and ssim


def test_workers_read_the_same_test_images_and_count_the_unreadable_ones(checkpoint):
    """`eval --workers 2` reads and degrades the test images in two processes: the same tables and per-image
    values as reading them here, and a corrupt file is still counted (warned of in a worker, counted here)."""
    folder, path = checkpoint
    photos = write_photos(folder / "photos", dict.fromkeys("01234", (40, 48)), seed=0, broken="2b-broken.png")
    data = folder / "photos.yaml"
    data.write_text(f"size: 32\ntasks:\n  pir: [{{type: hq_folder, root: {photos}}}]\n")
    outputs = {}
    for workers in ("0", "2"):
        out = folder / f"workers-{workers}"
        result = runner.invoke(app, ["eval", "--ckpt", str(path), "--tasks", "pir", "--samples", "0", "--data",
                                     str(data), "--out", str(out), "--workers", workers,
                                     "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "unreadable files skipped: 1" in result.output.replace("\n", " ")
        outputs[workers] = [(out / name).read_text() for name in ("eval.csv", "eval_images.csv")]
    assert outputs["0"] == outputs["2"]
    assert "2b-broken" not in outputs["2"][1] and outputs["2"][1].count("4.png") == 2  # psnr and ssim rows
    # the unreadable image is left out, not replaced by the next one (which would be scored twice)
    assert all(outputs["2"][1].count(f"{name}.png") == 2 for name in "01234")
    assert json.loads((folder / "workers-2" / "eval.json").read_text())["images"] == {"pir": 5}
    # one file skipped under two degradations is one file, named
    out = folder / "workers-two-units"
    result = runner.invoke(app, ["eval", "--ckpt", str(path), "--tasks", "pir", "--samples", "0", "--data", str(data),
                                 "--out", str(out), "--workers", "2", "--corruption", "gaussian_noise,fog",
                                 "--severity", "2", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"unreadable files skipped: 1 ({photos / '2b-broken.png'})" in result.output.replace("\n", "")
    assert json.loads((out / "eval.json").read_text())["skipped"] == [str(photos / "2b-broken.png")]


class _MAE:
    """A per-batch error metric (lower is better): one value per image as each batch comes."""

    def __init__(self):
        self.errors = []

    def update(self, images, batch):
        self.errors.append((images - batch["hq"]).abs().mean(dim=(1, 2, 3)))
        return {"mae": self.errors[-1]}

    def compute(self):
        return {"mae": float(torch.cat(self.errors).mean())}


def _fake_task(name: str, hq: torch.Tensor, lq: torch.Tensor, evaluator):
    """A task whose test set is the (HQ, LQ) pairs given, scored by `evaluator()`."""
    from unirestore.framework.data.sample import make_sample

    class Task:
        def dataset(self, split):
            return [make_sample(h, lq=q, path=f"img{i}") for i, (h, q) in enumerate(zip(hq, lq))]

    task = Task()
    task.name, task.evaluator = name, evaluator
    return task


class _FakeModel(torch.nn.Module):
    """What `evaluate` reads of a model (its prompts, config, device and `restore_tasks`), restoring with
    `restore(images, generator)`."""

    config = ModelConfig()

    def __init__(self, tasks, restore):
        super().__init__()
        self.tasks, self.restore, self.cfrm = tuple(tasks), restore, torch.nn.Linear(1, 1)

    def restore_tasks(self, images, tasks, generator=None, **kwargs):
        return {task: self.restore(images, generator) for task in tasks}


def test_the_worse_grid_keeps_the_images_furthest_below_lq_worst_first():
    """`evaluate` keeps the restored images that lost most against their LQ, in order."""
    from unirestore.framework.evaluate import evaluate
    from unirestore.tasks.pir import PIREvaluator

    torch.manual_seed(0)
    hq = torch.rand(7, 3, 32, 32)
    lq = (hq + 0.05 * torch.randn_like(hq)).clamp(0, 1)
    noise = [0.0, 0.3, 0.01, 0.6, 0.0, 0.2, 0.02]  # what the "restoration" adds, per image

    def model(better=False):
        seen = []

        def restore(images, generator):  # the test images arrive in order, in batches of 3
            out = []
            for image in images:
                k = len(seen)
                seen.append(k)
                out.append(hq[k] if better else (image + noise[k] * torch.randn_like(image)).clamp(0, 1))
            return torch.stack(out)

        return _FakeModel(["pir"], restore)

    def task():
        return _fake_task("pir", hq, lq, PIREvaluator)

    table = evaluate(model(), [task()], samples=7, batch_size=3, inputs=("lq", "restored"), worse=3)
    rows = table.images["pir"]
    drops = [r["psnr"] - q["psnr"] for r, q in zip(rows["restored"], rows["lq"])]
    order = sorted(range(7), key=lambda i: drops[i])[:3]
    assert order == [3, 1, 5]  # the three noisiest
    _, restored, kept_hq = table.worse["pir"]
    torch.testing.assert_close(kept_hq, hq[order])
    assert restored.shape == (3, 3, 32, 32)
    # a restoration above LQ on every image leaves nothing to show; without LQ there is nothing to compare
    better = evaluate(model(better=True), [task()], samples=7, batch_size=3, inputs=("lq", "restored"))
    assert all(r["psnr"] > q["psnr"] for r, q in zip(better.images["pir"]["restored"], better.images["pir"]["lq"]))
    assert "pir" not in better.worse
    assert "pir" not in evaluate(model(), [task()], samples=7, batch_size=3, inputs=("restored",)).worse


def test_an_error_metric_counts_a_rise_above_lq_as_worse(monkeypatch):
    """A task's lower-better per-image metric (a saliency MAE, `Task.lower_is_better`): the worse grid kept
    the images whose error fell most, and the summary counted a fall as "below LQ" like a PSNR's."""
    from unirestore.framework import registry
    from unirestore.framework.evaluate import EvalReport, evaluate
    from unirestore.tasks.base import Task

    torch.manual_seed(0)
    hq = torch.rand(7, 3, 16, 16)
    lq = (hq + 0.05 * torch.randn_like(hq)).clamp(0, 1)
    noise = [0.0, 0.3, 0.0, 0.6, 0.0, 0.2, 0.02]  # 0: restored to HQ exactly (its error falls to 0)

    def restore(images, generator):
        start = restore.seen
        restore.seen += len(images)
        return torch.stack([hq[k] if not noise[k] else (lq[k] + noise[k] * torch.randn_like(lq[k])).clamp(0, 1)
                            for k in range(start, start + len(images))])  # fmt: skip

    restore.seen = 0

    task = _fake_task("sal", hq, lq, _MAE)
    task.lower_is_better = ("mae",)
    table = evaluate(_FakeModel(["sal"], restore), [task], samples=7, batch_size=3, inputs=("lq", "restored"), worse=3)
    rows = table.images["sal"]
    rises = [r["mae"] - q["mae"] for r, q in zip(rows["restored"], rows["lq"])]
    order = sorted(range(7), key=lambda i: -rises[i])[:3]
    assert order == [3, 1, 5] and all(rises[i] > 0 for i in order)  # the three noisiest
    torch.testing.assert_close(table.worse["sal"][2], hq[order])
    # the summary says on how many images the error fell below LQ's (the images restored to HQ)
    registry.known_tasks()
    monkeypatch.setitem(registry._TASKS, "sal", type("Saliency", (Task,), {"name": "sal", "lower_is_better": ("mae",)}))
    report = EvalReport(checkpoint="x", split="test", samples=7)
    report.images[("default", "sal", "LQ")] = rows["lq"]
    report.images[("default", "sal", "restored[sal]")] = rows["restored"]
    (line,) = report.improved()
    assert line.startswith("default, sal, restored[sal]: mae below LQ on 3 of 7 images, above on 4 (sign test p")


def test_values_known_after_the_last_batch_get_a_worse_grid_of_the_same_restorations():
    """A per-image value that needs the whole set (a retrieval hit) comes when the images are gone: the worst
    images are restored again from the noise they had, and the grid shows what was scored."""
    from unirestore.framework.evaluate import evaluate

    torch.manual_seed(0)
    hq = torch.rand(7, 3, 16, 16)
    lq = (hq + 0.05 * torch.randn_like(hq)).clamp(0, 1)
    scored = {}  # row → the images its evaluator saw, in order

    class Evaluator:
        def __init__(self):
            self.seen, self.errors = [], []

        def update(self, images, batch):
            self.seen.append(images.clone())
            self.errors.append(((images - batch["hq"]) ** 2).mean(dim=(1, 2, 3)))
            return {}  # nothing per batch

        def compute(self):
            scored[len(scored)] = torch.cat(self.seen)
            return {"error": float(torch.cat(self.errors).mean())}

        def per_image(self):
            return {"closeness": -torch.cat(self.errors)}

    def restore(images, generators):  # a noise of random strength per image, from the image's own generator
        noisy = [image + torch.rand(1, generator=g) * torch.randn(image.shape, generator=g) for image, g in zip(images, generators)]
        return torch.stack(noisy).clamp(0, 1)

    task = _fake_task("ret", hq, lq, Evaluator)
    table = evaluate(_FakeModel(["ret"], restore), [task], samples=7, batch_size=3, inputs=("lq", "restored"), worse=3)
    rows = table.images["ret"]
    drops = [r["closeness"] - q["closeness"] for r, q in zip(rows["restored"], rows["lq"])]
    order = sorted(range(7), key=lambda i: drops[i])[:3]
    lq_kept, restored_kept, hq_kept = table.worse["ret"]
    torch.testing.assert_close(hq_kept, hq[order])
    torch.testing.assert_close(lq_kept, lq[order])
    torch.testing.assert_close(restored_kept, scored[1][order])  # the very images scored, not a new draw
    assert not torch.equal(restored_kept, lq_kept)


def test_per_image_values_of_both_kinds_land_in_one_row_per_image():
    """An evaluator with a value per batch (an MAE) and one that needs the whole set (an F-measure at the set's
    best threshold): the second was dropped without a word."""
    from unirestore.framework.evaluate import evaluate

    hq = torch.rand(5, 3, 16, 16)
    lq = (hq + 0.05 * torch.randn_like(hq)).clamp(0, 1)

    class Both(_MAE):
        def per_image(self):
            errors = torch.cat(self.errors)
            return {"rank": errors.argsort().argsort().float()}  # known once every image is seen

    table = evaluate(_FakeModel(["sal"], lambda images, generator: images), [_fake_task("sal", hq, lq, Both)],
                     samples=5, batch_size=2, inputs=("lq", "restored"))  # fmt: skip
    rows = table.images["sal"]["lq"]
    assert [list(row) for row in rows] == [["image", "mae", "rank"]] * 5
    errors = torch.tensor([row["mae"] for row in rows])
    assert [row["rank"] for row in rows] == errors.argsort().argsort().float().tolist()


def test_eval_in_bf16_scores_what_fp32_scores_to_rounding(checkpoint):
    folder, path = checkpoint
    scores = {}
    for precision in ("fp32", "bf16"):
        result, _ = _eval(folder, path, folder / f"p-{precision}", "--tasks", "pir", "--precision", precision)
        assert result.exit_code == 0, result.output
        rows = json.loads((folder / f"p-{precision}" / "eval.json").read_text())["results"]
        scores[precision] = {(r["input"], r["metric"]): r["value"] for r in rows}
    assert scores["bf16"][("LQ", "psnr")] == scores["fp32"][("LQ", "psnr")]  # the inputs are not cast
    restored = ("restored[pir]", "psnr")
    assert scores["bf16"][restored] != scores["fp32"][restored]  # the restoration ran in bf16
    assert abs(scores["bf16"][restored] - scores["fp32"][restored]) < 0.2
    refused, _ = _eval(folder, path, folder / "p-fp8", "--precision", "fp8")
    assert refused.exit_code == 2 and "--precision fp8: use one of fp32, bf16, fp16" in refused.stderr


def test_the_per_image_summary_counts_each_side_and_gives_the_sign_test(tmp_path):
    from scipy.stats import binomtest

    from unirestore.framework.evaluate import EvalReport

    report = EvalReport(checkpoint="x", split="test", samples=12)
    lq = [{"image": f"{i}", "psnr": 20.0} for i in range(12)]
    restored = [{"image": f"{i}", "psnr": 21.0 if i < 9 else (20.0 if i == 9 else 19.0)} for i in range(12)]
    report.images[("default", "pir", "LQ")] = lq
    report.images[("default", "pir", "restored[pir]")] = restored
    (line,) = report.improved()
    expected = binomtest(9, 11).pvalue  # the tie (image 9) is left out
    assert line == f"default, pir, restored[pir]: psnr above LQ on 9 of 12 images, below on 2 (sign test p = {expected:.2g})"
    assert report.plot_gains(tmp_path / "gains.png").read_bytes()[:4] == b"\x89PNG"
    assert EvalReport(checkpoint="x", split="test", samples=1).plot_gains(tmp_path / "none.png") is None


def test_runs_compare_per_image_pairs_two_checkpoints_image_by_image(checkpoint, tiny_prior, tmp_path):
    import csv

    _, path = checkpoint
    torch.manual_seed(7)
    other = UniRestore(tiny_prior, ModelConfig(), tasks=["pir", "cls"])
    other_path = save_checkpoint(other, tmp_path / "other.safetensors")
    uri = f"sqlite:///{tmp_path / 'paired.db'}"
    for ckpt, out in ((path, tmp_path / "first"), (other_path, tmp_path / "second")):  # the second is newer
        result = runner.invoke(app, ["eval", "--ckpt", str(ckpt), "--tasks", "pir,cls", "--samples", "4",
                                     "--out", str(out), "--tracking-uri", uri])  # fmt: skip
        assert result.exit_code == 0, result.output
    compare = runner.invoke(app, ["runs", "compare", "--experiment", "unirestore-eval", "--tracking-uri", uri,
                                  "--metric", "eval/default/pir/restored_pir/psnr", "--per-image"])  # fmt: skip
    assert compare.exit_code == 0, compare.output
    assert f"per image, against eval-{tmp_path.name}/other" in compare.output
    rows = {}
    for name in ("first", "second"):
        for line in csv.DictReader((tmp_path / name / "eval_images.csv").read_text().splitlines()):
            if line["task"] == "pir" and line["metric"] == "psnr":
                rows.setdefault(name, []).append(float(line["restored[pir]"]))
    above = sum(a > b for a, b in zip(rows["first"], rows["second"]))
    below = sum(a < b for a, b in zip(rows["first"], rows["second"]))
    line = next(text for text in compare.output.splitlines() if "restored[pir]" in text and "psnr" in text)
    assert [cell.strip() for cell in line.split("│")[6:9]] == [str(above), str(below), "4"], line
    # one eval run alone has nothing to be compared with
    alone = runner.invoke(app, ["runs", "compare", "--experiment", "unirestore-eval", "--tracking-uri", uri,
                                "--filter", f"tags.mlflow.runName = 'eval-{path.parent.name}/model'", "--per-image"])  # fmt: skip
    assert alone.exit_code == 2 and "1 of the runs shown logged eval_images.csv" in alone.stderr
    # an evaluation by corruption since (README's order): it has no value for the metric, so the two checkpoints'
    # default tables are still what is compared, not the newest run
    result = runner.invoke(app, ["eval", "--ckpt", str(path), "--tasks", "pir", "--corruption", "gaussian_noise",
                                 "--severity", "3", "--samples", "4", "--out", str(tmp_path / "by-corruption"),
                                 "--tracking-uri", uri])  # fmt: skip
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["runs", "compare", "--experiment", "unirestore-eval", "--tracking-uri", uri,
                                "--metric", "eval/default/pir/restored_pir/psnr", "--per-image"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert f"per image, against eval-{tmp_path.name}/other" in again.output
    line = next(text for text in again.output.splitlines() if "restored[pir]" in text and "psnr" in text)
    assert [cell.strip() for cell in line.split("│")[6:9]] == [str(above), str(below), "4"], line


def test_eval_loads_the_checkpoint_on_the_device_asked_for(checkpoint, monkeypatch, tmp_path):
    """`--device` (auto: CUDA when there is one) is where the model and the downstream models run."""
    from unirestore.framework import checkpoint as checkpoints
    from unirestore.framework.engine.trainer import resolve_device

    folder, path = checkpoint
    devices = []
    real = checkpoints.load_checkpoint

    def load(*args, device="cpu", **kwargs):
        devices.append(torch.device(device))
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(checkpoints, "load_checkpoint", load)
    for extra in ([], ["--device", "cpu"]):
        result, _ = _eval(folder, path, tmp_path / f"d{len(devices)}", "--tasks", "pir", "--samples", "1", *extra)
        assert result.exit_code == 0, result.output
    assert devices == [resolve_device("auto"), torch.device("cpu")]


def test_grids_show_full_size_test_images_scaled_down():
    """A 4K test set would keep 4K images for its grids: they are scaled to at most GRID_SIDE a side."""
    from unirestore.framework.data.sample import make_sample
    from unirestore.framework.evaluate import GRID_SIDE, evaluate
    from unirestore.tasks.pir import PIREvaluator

    hq = torch.rand(2, 3, GRID_SIDE // 2 + 40, GRID_SIDE + 80)

    class Task:
        name = "pir"

        def dataset(self, split):
            return [make_sample(image, lq=image.clone(), path=f"big{i}") for i, image in enumerate(hq)]

        def evaluator(self):
            return PIREvaluator()

    class Model(torch.nn.Module):
        tasks = ("pir",)
        config = ModelConfig()

        def __init__(self):
            super().__init__()
            self.cfrm = torch.nn.Linear(1, 1)

        def restore_tasks(self, images, tasks, **kwargs):
            return {task: (images + 0.1 * torch.randn_like(images)).clamp(0, 1) for task in tasks}  # below LQ

    table = evaluate(Model(), [Task()], samples=2, batch_size=2)
    for stack in (*table.examples["pir"], *table.worse["pir"]):
        assert stack.shape == (2, 3, round((GRID_SIDE // 2 + 40) * GRID_SIDE / (GRID_SIDE + 80)), GRID_SIDE), stack.shape
    torch.testing.assert_close(table.examples["pir"][2][0].mean(), hq[0].mean(), atol=1e-3, rtol=0)


def test_eval_resume_evaluates_only_what_an_interrupted_run_left(checkpoint, monkeypatch, tmp_path):
    import os

    from unirestore.framework import evaluate as evaluation

    folder, path = checkpoint
    args = ("--tasks", "pir", "--samples", "2", "--corruption", "gaussian_noise,rain,fog", "--severity", "2")
    whole, _ = _eval(folder, path, tmp_path / "whole", *args)
    assert whole.exit_code == 0, whole.output
    real, calls = evaluation.evaluate, []

    def interrupted_at_the_third(*positional, **keywords):
        calls.append(keywords.get("label"))
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill: the two finished units are saved, the third is not
        return real(*positional, **keywords)

    out = tmp_path / "resumed"
    monkeypatch.setattr(evaluation, "evaluate", interrupted_at_the_third)
    killed, _ = _eval(folder, path, out, *args)
    assert killed.exit_code != 0 and sorted(p.name for p in (out / "partial").iterdir()) == [
        "gaussian_noise-s2-pir.json", "rain-s2-pir.json"]
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(k.get("label")) or real(*a, **k))
    calls.clear()
    resumed, _ = _eval(folder, path, out, *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert calls == ["fog@2"] and "gaussian_noise@2/pir, rain@2/pir" in resumed.output
    assert (out / "eval.csv").read_text() == (tmp_path / "whole" / "eval.csv").read_text()
    assert (out / "eval_images.csv").read_text() == (tmp_path / "whole" / "eval_images.csv").read_text()
    # results saved before skipped files were named held their count: 0 is none, 2 are two
    for name, count in (("gaussian_noise-s2-pir.json", 0), ("rain-s2-pir.json", 2)):
        unit = json.loads((out / "partial" / name).read_text())
        (out / "partial" / name).write_text(json.dumps({**unit, "skipped": count}))
    older, _ = _eval(folder, path, out, *args, "--resume")
    assert older.exit_code == 0 and "unreadable files skipped: 2 (rain@2/pir: unreadable file 1" in older.output
    # results saved for another checkpoint file (retrained in place) are not read back
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    calls.clear()
    again, _ = _eval(folder, path, out, *args, "--resume")
    assert again.exit_code == 0 and calls == ["gaussian_noise@2", "rain@2", "fog@2"]


def _points(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run: its (step, value) points, in the order logged."""
    return {name: [(p.step, p.value) for p in client.get_metric_history(run_id, name)]
            for name in client.get_run(run_id).data.metrics}  # fmt: skip


def test_an_eval_stopped_by_sigterm_leaves_its_mlflow_run_and_resume_finishes_that_run(checkpoint, tmp_path):
    """A real `unirestore eval` stopped by SIGTERM half-way: its MLflow run was open from the start, each finished
    (degradation, task) unit's metrics in it as the unit finished; it ends KILLED (exit 143), and --resume goes on
    in the same run, which then holds what an uninterrupted evaluation's holds, each metric point once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from unirestore.framework.engine.tracking import load_run_id

    folder, path = checkpoint
    args = ("--tasks", "pir", "--samples", "8", "--batch-size", "2", "--severity", "2",
            "--corruption", "gaussian_noise,rain,fog,snow,contrast,pixelate")  # fmt: skip
    whole, uri = _eval(folder, path, tmp_path / "whole", *args)
    assert whole.exit_code == 0, whole.output
    out, client = tmp_path / "stopped", MlflowClient(uri)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # UNIRESTORE_HOME and the downstream steps as this process has them
    command = [sys.executable, "-m", "unirestore.framework.cli", "eval", "--ckpt", str(path), "--out", str(out),
               "--tracking-uri", uri, *args]  # fmt: skip
    evaluation = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while evaluation.poll() is None and time.monotonic() < deadline and len(list((out / "partial").glob("*.json"))) < 2:
            time.sleep(0.05)
        # while it evaluates (four units of 8 images left): its run is there, the first unit's metrics in it
        run = client.get_run(load_run_id(out))
        assert run.info.status == "RUNNING" and run.info.run_name == f"eval-{path.parent.name}/model"
        assert run.data.params["checkpoint"] == str(path.resolve())
        assert "eval/gaussian_noise_s2/pir/restored_pir/psnr" in run.data.metrics
        evaluation.send_signal(signal.SIGTERM)
        _, stderr = evaluation.communicate(timeout=300)
    finally:
        if evaluation.poll() is None:
            evaluation.kill()
            evaluation.communicate()
    assert evaluation.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "interrupted; the same command with --resume keeps the results saved so far and evaluates the rest"
    )
    assert len(list((out / "partial").glob("*.json"))) < 6  # stopped half-way
    run_id = load_run_id(out)
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and len(killed.data.metrics) >= 2 * 3  # two units or more: 3 rows each
    resumed = runner.invoke(app, [*command[3:], "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "note:" not in resumed.output and load_run_id(out) == run_id  # the same run, continued
    finished, reference = client.get_run(run_id), client.get_run(load_run_id(tmp_path / "whole"))
    assert finished.info.status == "FINISHED"
    points, expected = _points(client, run_id), _points(client, reference.info.run_id)
    assert set(points) == set(expected) and "skipped_files" in points
    for name, logged in points.items():
        assert [step for step, _ in logged] == [0], name  # each metric once
        assert logged[0][1] == pytest.approx(expected[name][0][1], rel=1e-4, abs=1e-5), name
    assert finished.data.params == reference.data.params
    assert {k: v for k, v in finished.data.tags.items() if not k.startswith("mlflow.")} == {
        k: v for k, v in reference.data.tags.items() if not k.startswith("mlflow.")}
    for where in (None, "grids"):
        assert [a.path for a in client.list_artifacts(run_id, where)] == [
            a.path for a in client.list_artifacts(reference.info.run_id, where)]


def test_an_eval_that_crashed_ends_failed_and_resume_continues_its_run_or_a_new_one(checkpoint, monkeypatch,
                                                                                     tmp_path):
    """An error half-way ends the run FAILED with the finished units' metrics; --resume finishes the same run; a
    run deleted from the store since is replaced by a new one, which one line says."""
    from mlflow.tracking import MlflowClient

    from unirestore.framework import evaluate as evaluation
    from unirestore.framework.engine.tracking import RUN_FILE, load_run_id

    folder, path = checkpoint
    args = ("--tasks", "pir", "--samples", "2", "--corruption", "gaussian_noise,rain", "--severity", "2")
    real, calls = evaluation.evaluate, []

    def failing_at_the_second(*positional, **keywords):
        calls.append(keywords.get("label"))
        if len(calls) == 2:
            raise RuntimeError("the device fell off the bus")
        return real(*positional, **keywords)

    out = tmp_path / "crashed"
    monkeypatch.setattr(evaluation, "evaluate", failing_at_the_second)
    crashed, uri = _eval(folder, path, out, *args)
    assert isinstance(crashed.exception, RuntimeError)
    client, run_id = MlflowClient(uri), load_run_id(out)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert {name.split("/")[1] for name in run.data.metrics} == {"gaussian_noise_s2"}  # the unit that finished
    monkeypatch.setattr(evaluation, "evaluate", real)
    resumed, _ = _eval(folder, path, out, *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert load_run_id(out) == run_id and client.get_run(run_id).info.status == "FINISHED"
    points = _points(client, run_id)
    assert {name.split("/")[1] for name in points if name != "skipped_files"} == {"gaussian_noise_s2", "rain_s2"}
    assert all([step for step, _ in logged] == [0] for logged in points.values()), points
    client.delete_run(run_id)
    again, _ = _eval(folder, path, out, *args, "--resume")
    assert again.exit_code == 0, again.output
    new = load_run_id(out)
    notes = [line for line in again.output.splitlines() if line.startswith("note:")]
    assert notes == [(f"note: MLflow run {run_id} ({out / RUN_FILE}) is no longer in the tracking store (deleted, "
                      f"or another --tracking-uri); this evaluation is logged to a new run, {new}")]  # fmt: skip
    assert new != run_id and client.get_run(new).info.status == "FINISHED"
    assert _points(client, new) == points  # the units read back, logged to the new run


def test_eval_resume_evaluates_again_a_unit_whose_test_set_changed(checkpoint, tmp_path):
    """Results saved for another test set are never read back into the table: an image added, replaced or
    removed since makes --resume evaluate that unit again and say why; an unchanged set is read back."""
    folder, path = checkpoint
    photos = write_photos(tmp_path / "photos", dict.fromkeys("012", (40, 48)), seed=0)
    data = tmp_path / "photos.yaml"
    data.write_text(f"size: 32\ntasks:\n  pir: [{{type: hq_folder, root: {photos}}}]\n")
    args = ("--tasks", "pir", "--data", str(data), "--samples", "0")
    out = tmp_path / "out"
    first, _ = _eval(folder, path, out, *args)
    assert first.exit_code == 0, first.output
    write_photos(photos, {"3": (40, 48)}, seed=1)  # an image added
    grown, _ = _eval(folder, path, out, *args, "--resume")
    said = " ".join(grown.output.split())
    assert grown.exit_code == 0, grown.output
    assert "test set changed since" in said and "default/pir (3 images then, 4 now)" in said
    assert "read back" not in said
    # the same MLflow run goes on: the new values logged beside the old ones, and shown
    from mlflow.tracking import MlflowClient

    from unirestore.framework.engine.tracking import load_run_id

    table = {(r["input"], r["metric"]): r["value"] for r in json.loads((out / "eval.json").read_text())["results"]}
    client, run_id = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}"), load_run_id(out)
    history = client.get_metric_history(run_id, "eval/default/pir/restored_pir/psnr")
    newest = max(history, key=lambda point: point.timestamp)
    assert len(history) == 2 and newest.value == pytest.approx(table[("restored[pir]", "psnr")])
    assert client.get_run(run_id).data.metrics["eval/default/pir/restored_pir/psnr"] == newest.value
    fresh, _ = _eval(folder, path, tmp_path / "fresh", *args)
    assert fresh.exit_code == 0, fresh.output
    for name in ("eval.csv", "eval_images.csv"):
        assert (out / name).read_text() == (tmp_path / "fresh" / name).read_text()
    assert json.loads((out / "eval.json").read_text())["images"] == {"pir": 4}
    write_photos(photos, {"1": (48, 40)}, seed=2)  # one replaced under its name: as many images as before
    replaced, _ = _eval(folder, path, out, *args, "--resume")
    said = " ".join(replaced.output.split())
    assert replaced.exit_code == 0 and "default/pir (4 images, some of them added, removed or replaced)" in said
    (photos / "0.png").unlink()
    shrunk, _ = _eval(folder, path, out, *args, "--resume")
    assert shrunk.exit_code == 0 and "default/pir (4 images then, 3 now)" in " ".join(shrunk.output.split())
    assert "0.png" not in (out / "eval_images.csv").read_text()
    same, _ = _eval(folder, path, out, *args, "--resume")
    assert same.exit_code == 0 and "read back from" in same.output and "evaluated again" not in same.output


def test_a_second_eval_into_the_same_out_stops_at_once(checkpoint, tmp_path):
    """Two evaluations writing one --out would overwrite each other's partial results and tables: while one holds
    the folder, another exits 2 with one line naming the holder and writes nothing there."""
    import os

    from unirestore.framework.engine import run_folder_lock

    folder, path = checkpoint
    out = tmp_path / "out"
    with run_folder_lock(out, user="eval", option="--out"):
        second, _ = _eval(folder, path, out, "--tasks", "pir", "--samples", "1")
        line = " ".join(second.stderr.split())
        assert second.exit_code == 2, second.output
        holder = f"error: {out} is in use by another process writing there (eval, process {os.getpid()} on"
        assert line.startswith(holder), line
        assert line.endswith("wait for it to end, or give another --out") and "Traceback" not in second.output
        assert [p.name for p in out.iterdir()] == [".lock"]
    free, _ = _eval(folder, path, out, "--tasks", "pir", "--samples", "1")  # once it is free, it goes through
    assert free.exit_code == 0 and (out / "eval.csv").is_file(), free.output


def test_eval_under_torchrun_shares_the_units_and_writes_one_processs_table(checkpoint, tmp_path):
    """Two processes (torchrun, CPU, gloo): each evaluates its (degradation, task) units, the first reads them all
    back and writes the tables, which equal one process's."""
    import os
    import subprocess
    import sys

    folder, path = checkpoint
    args = ["--corruption", "gaussian_noise,rain", "--severity", "2", "--tasks", "pir", "--samples", "2"]
    alone, _ = _eval(folder, path, tmp_path / "alone", *args)
    assert alone.exit_code == 0, alone.output
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNIRESTORE_DOWNSTREAM_STEPS": "3", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "unirestore.framework.cli", "eval", "--ckpt", str(path), "--out", str(tmp_path / "shared"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *args]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "process 0 of 2 evaluated gaussian_noise@2/pir" in result.stdout
    assert "process 1 of 2 evaluated rain@2/pir" in result.stdout
    assert result.stdout.count("wrote ") == 1  # the first process alone writes and logs
    shared = json.loads((tmp_path / "shared" / "eval.json").read_text())["results"]
    single = json.loads((tmp_path / "alone" / "eval.json").read_text())["results"]
    assert [{**r, "value": None} for r in shared] == [{**r, "value": None} for r in single] and len(shared) >= 8
    for ours, theirs in zip(shared, single, strict=True):  # one thread per process there: float rounding only
        assert ours["value"] == pytest.approx(theirs["value"], rel=1e-4, abs=1e-5), ours


def test_retrieval_gets_per_image_hits_once_the_whole_set_is_seen():
    """A metric of the whole set with per-image values (a retrieval query's hit): eval_images gets them."""
    import math

    from unirestore.framework.data.sample import make_sample
    from unirestore.framework.evaluate import evaluate
    from unirestore.tasks.ret import RetrievalEvaluator

    torch.manual_seed(1)
    labels = torch.arange(4).repeat_interleave(3)
    hq = torch.rand(4, 3, 8, 8)[labels] + 0.05 * torch.randn(12, 3, 8, 8)
    lq = hq + 2.0 * torch.randn_like(hq)  # noisy enough to send some queries to another class

    class Task:
        name = "ret"

        def dataset(self, split):
            return [make_sample(h.clamp(0, 1), lq=q.clamp(0, 1), label=int(y), path=f"img{i}")
                    for i, (h, q, y) in enumerate(zip(hq, lq, labels))]  # fmt: skip

        def evaluator(self):
            return RetrievalEvaluator(torch.nn.Flatten())

    class Model(torch.nn.Module):  # only LQ and HQ are scored: nothing is restored
        tasks = ("ret",)
        config = ModelConfig()

        def __init__(self):
            super().__init__()
            self.cfrm = torch.nn.Linear(1, 1)

    table = evaluate(Model(), [Task()], samples=12, batch_size=5, inputs=("lq", "hq"))
    for row in ("lq", "hq"):
        values = [entry["recall_at_1"] for entry in table.images["ret"][row]]
        assert [entry["image"] for entry in table.images["ret"][row]] == [f"img{i}" for i in range(12)]
        scored = [v for v in values if not math.isnan(v)]
        assert len(scored) == 12 and sum(scored) / 12 == pytest.approx(table.results["ret"][row]["recall_at_1"])
    assert table.results["ret"]["hq"]["recall_at_1"] > table.results["ret"]["lq"]["recall_at_1"]
