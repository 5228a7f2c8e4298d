"""Ray Tune sweeps on the tiny preset: one local Ray (2 CPUs, no dashboard) for the whole module, a tiny
stage-1 checkpoint built once with the engine, trials of a few steps each."""

import copy
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from unirestore.framework.cli import app
from unirestore.framework.compare import compare_runs
from unirestore.framework.config import RunConfig, dump_yaml, load_run_config
from unirestore.framework.sweep import (
    CAPPED_GAP,
    SweepError,
    _log_grid,
    _union_seconds,
    objective,
    parse_ranges,
    sweep_beta,
    sweep_extend,
    sweep_run_name,
    task_gaps,
)


def tiny_config(folder, *overrides: str) -> RunConfig:
    """Stage 0, stage 1 and the downstream models at a few steps each, everything under `folder`."""
    return load_run_config(
        None,
        [
            f"output={folder / 'run'}",
            f"tracking_uri=sqlite:///{folder / 'mlflow.db'}",
            "experiment=sweep-test",
            "stage0.vae_steps=2",
            "stage0.unet_steps=2",
            "stage0.batch_size=4",
            "train.stage1_steps=2",
            "train.stage2_steps=2",
            "train.stage3_steps=2",
            "train.batch_size=2",
            "train.val_samples=2",
            "train.eval_samples=2",
            "train.log_every=1",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray for the module, started once UNIRESTORE_HOME points at this module's own cache (stage 0
    trains the tiny prior there, apart from the untrained one other test files share) and the downstream
    models' budget is small: the workers inherit both."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNIRESTORE_HOME", str(tmp_path_factory.getbasetemp() / "sweep-home"))
        patch.setenv("UNIRESTORE_DOWNSTREAM_STEPS", "3")
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=200_000_000)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def source(ray_cluster, workspace):
    """A tiny stage-1 checkpoint (tasks pir and seg; cls and det come later) from the engine, and its config."""
    from unirestore.framework.engine import train

    config = tiny_config(workspace, "tasks=[pir,seg]")
    result = train(config, stages=(0, 1), progress=False)
    return result.checkpoint, config


@pytest.fixture(scope="module")
def trained_source(source):
    """Stage 2 on top of `source`: tasks are added by prompt to a model whose TFA is trained."""
    from unirestore.framework.engine import train

    _, config = source
    return train(config, stages=(2,), progress=False).checkpoint, config


# --------------------------------------------------------------------------------------------------
# Pure pieces


def test_parse_ranges_and_grid():
    assert parse_ranges("pir=1,seg=0.01:1") == {"pir": (1.0, 1.0), "seg": (0.01, 1.0)}
    for text in ("seg=a:b", "seg=1:", "=1:2"):  # a half-written range is not a fixed β
        with pytest.raises(SweepError, match="task=LOW:HIGH"):
            parse_ranges(text)
    with pytest.raises(SweepError, match="pir is given twice"):
        parse_ranges("pir=1,pir=2")
    assert _log_grid(0.01, 1.0, 3) == [0.01, 0.1, 1.0]
    assert _log_grid(0.5, 0.5, 4) == [0.5]


def test_the_sweeps_run_is_named_after_its_folder_once():
    assert sweep_run_name("beta", Path("runs/sweep-beta")) == "sweep-beta"  # the default folder
    assert sweep_run_name("beta", Path("runs/sweep-beta-2")) == "sweep-beta-2"
    assert sweep_run_name("extend", Path("runs/b1")) == "sweep-extend-b1"


def test_objective_normalises_by_the_lq_hq_gap():
    baseline = {
        "pir": {"lq": {"psnr": 20.0}, "hq": {"psnr": 100.0}},  # HQ row at the PSNR cap
        "cls": {"lq": {"accuracy": 0.4}, "hq": {"accuracy": 0.9}},
        "seg": {"lq": {"miou": 0.3}, "hq": {"miou": 0.3}},  # no gap: raw difference
    }
    metrics = {"pir": "psnr", "cls": "accuracy", "seg": "miou"}
    gaps = task_gaps(baseline, metrics)
    assert gaps == {"pir": CAPPED_GAP, "cls": pytest.approx(0.5), "seg": 1.0}
    score, gains = objective({"pir": 25.0, "cls": 0.65, "seg": 0.4}, baseline, metrics, {"cls": 2.0}, gaps)
    assert gains == {"pir": pytest.approx(0.5), "cls": pytest.approx(0.5), "seg": pytest.approx(0.1)}
    assert score == pytest.approx(0.5 + 2 * 0.5 + 0.1)
    assert task_gaps(baseline, metrics, {"pir": 5.0})["pir"] == 5.0


def test_a_lower_better_primary_metric_gains_when_it_falls(monkeypatch):
    """A task whose primary metric is an error (`Task.lower_is_better`): a given gap, or the fallback when LQ
    and HQ tie, counted a fall below LQ as a loss."""
    from unirestore.framework import registry
    from unirestore.tasks.base import Task

    registry.known_tasks()
    monkeypatch.setitem(registry._TASKS, "depth", type("Depth", (Task,), {"name": "depth", "lower_is_better": ("abs_rel",)}))
    metrics = {"depth": "abs_rel"}
    measured = {"depth": {"lq": {"abs_rel": 0.30}, "hq": {"abs_rel": 0.10}}}
    tied = {"depth": {"lq": {"abs_rel": 0.30}, "hq": {"abs_rel": 0.30}}}
    for baseline, gaps in ((measured, None), (measured, {"depth": 0.2}), (tied, None)):
        gap = task_gaps(baseline, metrics, gaps)
        _, gains = objective({"depth": 0.20}, baseline, metrics, {}, gap)
        assert gains["depth"] > 0, (baseline, gaps, gains)


def test_the_input_check_prepares_the_tasks_at_the_trials_crop_size(monkeypatch):
    """It prepared them at 512 whatever the prior: a task plugin whose `prepare` trains its own model for the
    run's crop size trained one at 512 on the CPU, for a check, before Ray started."""
    from unirestore.framework import engine
    from unirestore.framework.prior import tiny_native_size
    from unirestore.framework.sweep import _check_inputs

    sizes = []
    monkeypatch.setattr(engine, "_check_downstream", lambda config, names, size: sizes.append(size))
    _check_inputs(RunConfig(prior="tiny"), ["pir"])
    _check_inputs(load_run_config(None, ["prior=tiny", "train.crop_size=48"]), ["pir"])
    assert sizes == [tiny_native_size(), 48]


def test_a_retried_or_resumed_trial_logs_each_objective_step_once(tmp_path):
    """A trial that Ray retries, or that a resumed sweep continues, goes back to its last checkpoint and
    validates those steps again: its run keeps the points it holds and adds only the later steps."""
    from mlflow.tracking import MlflowClient

    from unirestore.framework.engine.tracking import Tracker
    from unirestore.framework.sweep import _child_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(uri, "sweep-test")
    job = {"tracking_uri": uri, "experiment": "sweep-test", "parent_run_id": parent.start("sweep-beta", {}),
           "kind": "beta", "name": "sweep-beta"}  # fmt: skip
    first = _child_run(job, tmp_path / "trial", "t1", {"beta.seg": 0.1})
    for step in (1, 2):
        first.log_metrics({"sweep/objective": 0.1 * step, "sweep/gain/seg": 0.2 * step}, step)
    retry = _child_run(job, tmp_path / "trial", "t1", {"beta.seg": 0.1})  # its last checkpoint: step 1
    assert retry.run_id == first.run_id
    for step in (2, 3):
        retry.log_metrics({"sweep/objective": 0.5 * step, "sweep/gain/seg": 0.6 * step}, step)
    client = MlflowClient(uri)
    for key, first_value, later in (("sweep/objective", 0.1, 0.5), ("sweep/gain/seg", 0.2, 0.6)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, key))
        assert history == [(1, pytest.approx(first_value)), (2, pytest.approx(2 * first_value)),
                           (3, pytest.approx(3 * later))], (key, history)  # fmt: skip
    run = client.get_run(first.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.params == {"sweep.beta.seg": "0.1"}


def test_union_of_intervals():
    assert _union_seconds([[0, 2], [1, 3], [5, 6]]) == pytest.approx(4.0)
    assert _union_seconds([]) == 0.0


# --------------------------------------------------------------------------------------------------
# One-line errors, before any trial starts


def test_user_errors_are_one_line(source, workspace):
    checkpoint, config = source
    cases = [
        ({"tasks": "pir,nope"}, "unknown task 'nope'"),
        ({"beta_ranges": {"seg": (1.0, 0.1)}}, "need 0 < LOW <= HIGH"),
        ({"beta_ranges": {"det": (0.1, 1.0)}}, "not swept"),
        ({"search": "bayes"}, "--search"),
        ({"num_samples": 0}, "--num-samples"),
    ]
    for kwargs, message in cases:
        kwargs = {"tasks": "pir,seg", **kwargs}
        with pytest.raises(SweepError, match=message) as raised:
            sweep_beta(checkpoint, config=config, output=workspace / "never", show=False, **kwargs)
        assert "\n" not in str(raised.value)
    with pytest.raises(SweepError, match="checkpoint not found"):
        sweep_beta(workspace / "missing.safetensors", "pir", config=config, show=False)
    with pytest.raises(SweepError, match="already has a prompt for pir"):
        sweep_extend(checkpoint, "pir", config=config, show=False)
    with pytest.raises(SweepError, match="saved after stage 1, before its TFA and prompts were trained"):
        sweep_extend(checkpoint, "cls", config=config, output=workspace / "never", show=False)
    assert not (workspace / "never").exists()


def test_real_data_without_its_downstream_model_or_a_readable_val_set_is_refused_before_ray_starts(
    source, trained_source, workspace
):
    """The trials would each fail on the missing model or set (and be retried); the sweep refuses at once."""
    from dataclasses import replace

    from PIL import Image

    from unirestore.framework.data.io import DataError
    from unirestore.framework.downstream import DownstreamError

    (workspace / "voc" / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (workspace / "voc" / "Annotations").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40)).save(workspace / "voc" / "JPEGImages" / "a.png")
    (workspace / "voc" / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>car</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>30</xmax><ymax>20</ymax>"
        "</bndbox></object></annotation>"
    )
    (workspace / "imagenet" / "n01440764").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40)).save(workspace / "imagenet" / "n01440764" / "a.png")
    data = workspace / "real.yaml"
    data.write_text(
        "tasks:\n  pir: [{type: builtin_photos}]\n"
        f"  det: [{{type: rtts, root: {workspace / 'voc'}}}]\n"
        f"  cls: [{{type: image_folder, root: {workspace / 'imagenet'}}}]\n"
    )
    with pytest.raises(DownstreamError, match="set downstream_checkpoints.retinanet_resnet50_fpn"):
        sweep_extend(trained_source[0], "det", config=replace(trained_source[1], data=str(data)),
                     output=workspace / "never-real", show=False)  # fmt: skip
    with pytest.raises(DownstreamError, match="set downstream_checkpoints.resnet50"):
        sweep_beta(source[0], "pir,cls", config=replace(source[1], data=str(data)),
                   output=workspace / "never-real", show=False)  # fmt: skip
    # a validation set the trials could not read (ImageNet's flat val without its labels file) is named too
    (workspace / "flat-val").mkdir(exist_ok=True)
    Image.new("RGB", (40, 40)).save(workspace / "flat-val" / "ILSVRC2012_val_00000001.png")
    flat = workspace / "flat-val.yaml"
    flat.write_text(
        f"tasks:\n  pir: [{{type: builtin_photos}}]\n  cls: [{{type: image_folder, root: {workspace / 'imagenet'}, "
        f"splits: [train]}}, {{type: image_folder, root: {workspace / 'flat-val'}, splits: [val, test]}}]\n"
    )
    with pytest.raises(DataError, match="flat-val: no class sub-folders"):
        sweep_beta(source[0], "pir,cls", config=replace(source[1], data=str(flat)),
                   output=workspace / "never-real", show=False)  # fmt: skip
    assert not (workspace / "never-real").exists()


def test_a_moved_prior_or_another_one_is_refused_before_ray_starts(workspace, monkeypatch):
    """Every trial would fail to load the checkpoint onto a prior folder that has moved since it was trained, or
    onto another prior than its own: both sweeps refuse before Ray starts, and take the prior's new place from
    --set prior=FOLDER."""
    from unirestore.framework import sweep
    from unirestore.framework.checkpoint import save_checkpoint
    from unirestore.framework.config import ModelConfig
    from unirestore.framework.model import UniRestore
    from unirestore.framework.prior import build_tiny_prior, load_prior

    class RayStarted(Exception):
        pass

    def ray_session(address=None):
        raise RayStarted

    monkeypatch.setattr(sweep, "ray_session", ray_session)
    folder = build_tiny_prior(workspace / "prior-to-move", seed=2)
    other = build_tiny_prior(workspace / "another-prior", seed=3)  # the same architecture, other weights
    stage1 = save_checkpoint(UniRestore(load_prior(folder), ModelConfig(use_tfa=False), tasks=["pir"]),
                             workspace / "moving-stage1.safetensors", extra={"stage": "stage1"})  # fmt: skip
    stage2 = save_checkpoint(UniRestore(load_prior(folder), tasks=["pir"]), workspace / "moving-stage2.safetensors",
                             extra={"trained_prompts": ["pir"]})  # fmt: skip
    never = workspace / "never-prior"

    def beta(*overrides: str) -> None:
        sweep_beta(stage1, "pir", config=tiny_config(workspace, *overrides), steps=1, output=never, show=False)

    def extend(*overrides: str) -> None:
        sweep_extend(stage2, "det", config=tiny_config(workspace, *overrides), steps=1, output=never, show=False)

    for sweep_of in (beta, extend):
        with pytest.raises(RayStarted):  # the checkpoint's own prior: the checks pass
            sweep_of()
        with pytest.raises(SweepError) as raised:
            sweep_of(f"prior={other}")
        assert str(raised.value).endswith(
            f"was trained on the weights of prior '{folder}', not on those of '{other}' (unet/diffusion_pytorch_model"
            ".safetensors holds other bytes); give the folder it was trained on, or a copy of it, with --set "
            "prior=FOLDER"
        )
    moved = folder.rename(workspace / "prior-moved")
    for sweep_of, source in ((beta, stage1), (extend, stage2)):
        with pytest.raises(SweepError) as raised:
            sweep_of()
        assert str(raised.value) == (
            f"checkpoint {source} was trained on prior folder {folder}, which is not there any more; if it has "
            "moved, give its new place with --set prior=FOLDER"
        )
        with pytest.raises(RayStarted):
            sweep_of(f"prior={moved}")
    # the command line: one line, exit 2
    result = CliRunner().invoke(app, ["sweep", "extend", "--from", str(stage2), "--tasks", "det", "--output",
                                      str(never)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {stage2} was trained on prior folder {folder}, which is not there any more; if it has "
        + "moved, give its new place with --set prior=FOLDER"
    ]
    assert not never.exists()


def test_gpus_requested_on_a_machine_without_fails_fast(source, trained_source, workspace):
    checkpoint, config = source
    started = time.perf_counter()
    with pytest.raises(SweepError, match=r"--gpus-per-trial 1 but this machine has 0 GPU"):
        sweep_beta(
            checkpoint, "pir,seg", config=config, gpus_per_trial=1, output=workspace / "gpu", show=False
        )
    with pytest.raises(SweepError, match=r"--gpus-per-trial 1"):
        sweep_extend(trained_source[0], "cls", config=config, gpus_per_trial=1, output=workspace / "gpu", show=False)
    assert time.perf_counter() - started < 30


# --------------------------------------------------------------------------------------------------
# Sweeps


def test_beta_sweep_writes_best_config_and_nested_mlflow_runs(ray_cluster, source, workspace):
    import shutil

    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    checkpoint, config = source
    folder = workspace / "beta"
    result = sweep_beta(checkpoint, "pir,seg,cls", config=config, num_samples=2, steps=2, val_every=1,
                        output=folder, show=False)  # fmt: skip

    assert len(result.trials) == 2
    assert all(trial.status == "TERMINATED" and trial.objective is not None for trial in result.trials)
    # The best is the highest objective among the trials that ran to the last step (ASHA may stop one early).
    finished = [trial for trial in result.trials if trial.step >= 2 and not trial.stopped_early] or result.trials
    assert result.best.objective == max(trial.objective for trial in finished)
    assert set(result.beta) == {"pir", "seg", "cls"}
    for task, (low, high) in {"pir": (0.1, 10.0)}.items():
        assert low <= result.beta[task] <= high
    assert result.checkpoint.is_file() and result.checkpoint.is_relative_to(folder)
    assert set(result.baseline) == {"pir", "seg", "cls"}

    loaded = load_run_config(result.config_file)  # `unirestore train --config best.yaml`
    assert loaded.train.beta == pytest.approx(result.beta)
    assert loaded.tasks == ["pir", "seg", "cls"]  # and the sweep's settings, given to it as a config:
    assert (loaded.train.batch_size, loaded.train.stage2_steps, loaded.stage0.vae_steps) == (2, 2, 2)
    # best.yaml trains the winner: its stage 2 from the same checkpoint, by `unirestore train`, is the trial's
    replay = workspace / "replay"
    replay.mkdir()
    shutil.copyfile(checkpoint, replay / "stage1.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray gives each 1-CPU trial
    try:
        trained = CliRunner().invoke(app, ["train", "--config", str(result.config_file), "--stage", "2", "--output",
                                           str(replay), "--tracking-uri", config.tracking_uri])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert trained.exit_code == 0, trained.output
    replayed, winner = load_file(str(replay / "stage2.safetensors")), load_file(str(result.checkpoint))
    assert replayed.keys() == winner.keys()
    assert not [key for key in winner if not torch.equal(replayed[key], winner[key])]

    client = MlflowClient(tracking_uri=config.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(children) == 2
    assert {run.info.status for run in children} == {"FINISHED"}
    assert {run.info.run_id for run in children} == {trial.run_id for trial in result.trials}
    for run in children:  # the sweep's params and objective, and the engine's own params and metrics
        params, metrics = set(run.data.params), set(run.data.metrics)
        assert {"sweep.beta.pir", "sweep.beta.seg", "sweep.beta.cls", "stages", "beta"} <= params
        assert {"sweep/objective", "stage2/loss_total"} <= metrics
        assert run.info.run_name.startswith(f"{parent.info.run_name}-")  # the trials of this sweep, not another's
        # a trial the scheduler stopped, at the last validation too, has no test table: it says so
        trial = next(trial for trial in result.trials if trial.run_id == run.info.run_id)
        assert ("test/pir/restored/psnr" not in metrics) == trial.stopped_early
        assert (run.data.tags.get("unirestore.stopped_early") == "true") == trial.stopped_early
    # The parent: named after its folder (`beta`), its settings as the command line and the trials write them,
    # the base config, and a tag of its own, so that filtering on the trials' tag lists the trials alone
    assert parent.info.run_name == "sweep-beta-beta"
    assert parent.data.params["tasks"] == "pir,seg,cls"
    assert parse_ranges(parent.data.params["ranges"]) == {"pir": (0.1, 10.0), "seg": (0.5, 50.0), "cls": (0.5, 50.0)}
    assert parent.data.tags["unirestore.sweep_parent"] == "beta" and "unirestore.sweep" not in parent.data.tags
    artifacts = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    assert {"config.json", "results.json", "best.yaml", "objective.png"} <= artifacts
    trials = compare_runs(config.tracking_uri, config.experiment, filter_string="tags.`unirestore.sweep` = 'beta'")
    assert set(trials.run_ids) == {trial.run_id for trial in result.trials}
    assert "stage2/val/pir/restored/psnr" in trials.metrics  # what the trials share (the parent has none of it)

    timing = result.timing
    assert 0 < timing.trial_seconds <= timing.wall_seconds
    assert 0 <= timing.overhead_share < 1
    print(f"\nβ sweep, 2 trials × 2 steps on {os.cpu_count()} CPUs: wall {timing.wall_seconds:.1f} s, "
          f"trials working {timing.trial_seconds:.1f} s ({timing.trial_seconds_summed:.1f} s summed), "
          f"driver {timing.driver_seconds:.1f} s, Ray overhead {timing.overhead_seconds:.1f} s "
          f"({100 * timing.overhead_share:.0f} %, trial start-up {timing.trial_setup_seconds:.1f} s summed)")  # fmt: skip

    # The same folder again: refused without --resume; with it, every trial is done and nothing reruns.
    with pytest.raises(SweepError, match="already holds a sweep"):
        sweep_beta(checkpoint, "pir,seg,cls", config=config, num_samples=2, steps=2, val_every=1, output=folder,
                   show=False)  # fmt: skip
    resumed = sweep_beta(checkpoint, "pir,seg,cls", config=config, num_samples=2, steps=2, val_every=1,
                         output=folder, resume=True, show=False)  # fmt: skip
    assert resumed.beta == result.beta and resumed.run_id == result.run_id
    assert resumed.timing.trial_seconds == 0.0
    assert ray_cluster.is_initialized()  # the sweeps joined the module's Ray and left it running

    # Resumed with another config, its trials would each refuse their run folders inside Ray: refused before.
    saved = (folder / "sweep.json").read_text()
    config_file = workspace / "sweep-config.yaml"
    config_file.write_text(dump_yaml(config))
    runner = CliRunner()
    refused = runner.invoke(app, ["sweep", "beta", "--from", str(checkpoint), "--tasks", "pir,seg,cls", "--num-samples",
                                  "2", "--steps", "2", "--output", str(folder), "--resume", "--config", str(config_file),
                                  "--set", "train.lr=0.5"])  # fmt: skip
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.count("\n") == 1 and "with other settings than its sweep's (train.lr: None → 0.5)" in refused.stderr
    assert "resume with the same options" in refused.stderr
    with pytest.raises(SweepError, match=r"steps: 2 → 3; train.stage2_steps: 2 → 3\)"):
        sweep_beta(checkpoint, "pir,seg,cls", config=config, num_samples=2, steps=3, val_every=1, output=folder,
                   resume=True, show=False)  # fmt: skip
    assert (folder / "sweep.json").read_text() == saved
    assert MlflowClient(tracking_uri=config.tracking_uri).get_run(result.run_id).info.status == "FINISHED"


def test_sweeps_from_a_prior_folders_checkpoint_run_on_that_prior(ray_cluster, workspace):
    """A checkpoint of a prior folder (as sd-turbo's) swept with a config that names no prior (so `tiny`): the
    trials train on the checkpoint's prior, as `task add` does, with its defaults (the release's learning rate
    and β), instead of failing to load the checkpoint onto the tiny prior or taking the tiny preset's lr."""
    import math

    from mlflow.tracking import MlflowClient

    from unirestore.framework.checkpoint import save_checkpoint
    from unirestore.framework.config import RELEASE_LR, ModelConfig
    from unirestore.framework.model import UniRestore
    from unirestore.framework.prior import build_tiny_prior, load_prior

    folder = build_tiny_prior(workspace / "sd-like", seed=1)  # weights of its own, not the tiny prior's
    model = UniRestore(load_prior(folder), ModelConfig(use_tfa=False), tasks=["pir"])
    stage1 = save_checkpoint(model, workspace / "sd-like-stage1.safetensors", extra={"stage": "stage1"})
    config = tiny_config(workspace, "experiment=sweep-folder-prior")
    assert config.prior == "tiny"
    result = sweep_beta(stage1, "pir", config=config, num_samples=1, steps=1, val_every=1, scheduler="none",
                        output=workspace / "folder-beta", show=False)  # fmt: skip
    assert load_run_config(result.config_file).prior == str(folder.resolve())
    assert 0.1 <= result.beta["pir"] <= 10  # a decade either side of pir's own β, 1
    client = MlflowClient(tracking_uri=config.tracking_uri)
    params = client.get_run(result.trials[0].run_id).data.params
    assert float(params["lr/stage2"]) == pytest.approx(RELEASE_LR * math.sqrt(2 / 64))

    model = UniRestore(load_prior(folder), tasks=["pir"])
    stage2 = save_checkpoint(model, workspace / "sd-like-stage2.safetensors", extra={"trained_prompts": ["pir"]})
    extended = sweep_extend(stage2, "det", config=config, num_samples=1, steps=1, output=workspace / "folder-extend",
                            show=False)  # fmt: skip
    assert extended.best["det"].params["lr"] == pytest.approx(RELEASE_LR)


def test_extend_merge_equals_adding_tasks_one_by_one(trained_source, workspace):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from unirestore.framework.engine import add_task

    checkpoint, config = trained_source
    new_tasks = ["det", "cls"]
    result = sweep_extend(checkpoint, new_tasks, config=config, num_samples=1, steps=2, output=workspace / "extend",
                          show=False)  # fmt: skip
    assert set(result.best) == set(new_tasks)
    # The parent, and one run per trial that the engine itself logged into (no stray runs).
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_run(result.run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string="attributes.run_name LIKE 'sweep-extend-%'")
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == result.run_id]
    assert len(children) == len(runs) - 1 == 2
    assert all(run.info.status == "FINISHED" and "stages" in run.data.params for run in children)

    # Ray gives each 1-CPU trial one thread; the reference does the same, so the arithmetic matches.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        previous = checkpoint
        for task in new_tasks:
            step_config = copy.deepcopy(config)
            step_config.output = str(workspace / f"one-by-one-{task}")
            step_config.train.stage3_steps = 2
            step_config.train.val_every = 2
            step_config.train.checkpoint_every = 2
            step_config.train.device = "cpu"
            previous = add_task(step_config, previous, task, progress=False).checkpoint
    finally:
        torch.set_num_threads(threads)

    merged, sequential = load_file(str(result.checkpoint)), load_file(str(previous))
    assert merged.keys() == sequential.keys()
    different = [key for key in merged if not torch.equal(merged[key], sequential[key])]
    assert not different, different
