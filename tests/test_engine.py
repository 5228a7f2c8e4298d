"""The training engine on the tiny preset (CPU, a few steps each): config, data stream, stage enforcement,
exact resume, stage 3, divergence, deterministic evaluation.

Every run here uses its own UNIRESTORE_HOME (the stage-0 trained tiny prior lives there, apart from the
untrained one the other test files share) and tiny budgets.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unirestore.framework.checkpoint import load_checkpoint, read_checkpoint
from unirestore.framework.config import (
    RELEASE_LR,
    TINY_BETA,
    TINY_LR,
    ConfigError,
    RunConfig,
    TrainConfig,
    apply_overrides,
    dump_yaml,
    load_run_config,
)
from unirestore.framework.engine import (
    CallbackHook,
    RunFolderError,
    TrainingDiverged,
    add_task,
    build_tasks,
    train,
)
from unirestore.framework.engine.curves import MetricHistory
from unirestore.framework.engine.stages import (
    StageLoss,
    apply_stage,
    named_parameters,
    parameter_groups,
    stage1,
    stage2,
    stage3,
)
from unirestore.framework.engine.state import read_training_state
from unirestore.framework.engine.tracking import load_run_id
from unirestore.framework.engine.trainer import Distributed, TaskStream, scaled_lr
from unirestore.framework.evaluate import evaluate
from unirestore.framework.model import UniRestore
from unirestore.framework.prior import load_prior

TASKS = ["pir", "seg", "cls"]
TINY = [
    "stage0.vae_steps=2",
    "stage0.unet_steps=2",
    "stage0.batch_size=4",
    "train.batch_size=2",
    "train.stage1_steps=3",
    "train.stage2_steps=3",
    "train.stage3_steps=2",
    "train.checkpoint_every=2",
    "train.val_samples=2",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A module-wide folder, with UNIRESTORE_HOME pointing into it and small downstream-model budgets."""
    folder = tmp_path_factory.mktemp("engine")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNIRESTORE_HOME", str(tmp_path_factory.getbasetemp() / "engine-home"))
        patch.setenv("UNIRESTORE_DOWNSTREAM_STEPS", "3")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: one thread is as fast, and immune to a busy machine's other jobs
        try:
            yield folder
        finally:
            torch.set_num_threads(threads)


def make_config(root, name: str, *extra: str) -> RunConfig:
    return load_run_config(
        overrides=[
            f"output={root / name}",
            f"tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"tasks=[{','.join(TASKS)}]",
            *TINY,
            *extra,
        ]
    )


class ModelSpy:
    """A hook that remembers the model of each stage and the prior's weights it started from."""

    def __init__(self):
        self.models = {}

    def __call__(self, trainer):
        self.models.setdefault(trainer.stage, trainer.loss.model)


@pytest.fixture(scope="module")
def base_run(root):
    """Stages 0 → 1 → 2 on pir, seg, cls: the run the other tests compare against."""
    spy = ModelSpy()
    config = make_config(root, "base")
    result = train(config, stages=(0, 1, 2), hooks=[CallbackHook(spy)], progress=False)
    return config, result, spy


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --------------------------------------------------------------------------------------------------
# Config


def test_run_config_is_strict_and_round_trips(tmp_path):
    config = load_run_config(
        overrides=["train.beta.seg=0.5", "train.loss_weights.pir.l1=3", "model.denoise_steps=2"]
    )
    assert config.train.beta == {"seg": 0.5}
    assert config.train.loss_weights == {"pir": {"l1": 3.0}}
    assert config.tracking_uri.startswith("sqlite:////")  # absolute
    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml(config))
    assert load_run_config(path) == config
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        apply_overrides(config, ["train.nope=1"])
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        apply_overrides(config, ["train.batch_size=two"])
    with pytest.raises(ConfigError, match="precision"):
        apply_overrides(config, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="decoder_input"):
        apply_overrides(config, ["train.decoder_input=other"])
    # a section given a value is named itself, not the next item that trips over it
    with pytest.raises(ConfigError, match=r"'train=3': 'train' is a section, not a value; set its keys"):
        apply_overrides(config, ["train=3", "train.stage1_steps=1"])


def test_a_mistyped_config_key_names_the_closest_one_first(tmp_path):
    """--set and a YAML file: the closest valid key (with its section) comes before the list of them all; a key
    close to none gets no guess."""
    message = "unknown key '{}' in {}; did you mean 'train.stage1_steps'? valid keys here: batch_size, beta, "
    with pytest.raises(ConfigError) as error:
        load_run_config(None, ["train.stage1_stepz=5"])
    assert str(error.value).startswith(message.format("train.stage1_stepz", "--set"))
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  stage1_stepz: 5\n")
    with pytest.raises(ConfigError) as error:
        load_run_config(path)
    assert str(error.value).startswith(message.format("train.stage1_stepz", path))
    with pytest.raises(ConfigError, match=r"^unknown key 'trian' in --set; did you mean 'train'\? valid keys here: "):
        load_run_config(None, ["trian.stage1_steps=5"])
    path.write_text("modle: {denoise_steps: 2}\n")
    with pytest.raises(ConfigError, match=r"^unknown key 'modle' in .*typo.yaml; did you mean 'model'\? valid keys"):
        load_run_config(path)
    with pytest.raises(ConfigError, match=r"^unknown key 'train.zzz' in --set; valid keys here: batch_size, "):
        load_run_config(None, ["train.zzz=5"])


def test_learning_rate_scaling_and_weight_decay_groups(tiny_prior):
    assert scaled_lr(TrainConfig(batch_size=64)) == pytest.approx(1e-4)
    assert scaled_lr(TrainConfig(batch_size=4, grad_accum=4)) == pytest.approx(1e-4 * math.sqrt(16 / 64))
    assert scaled_lr(TrainConfig(batch_size=8), world_size=8) == pytest.approx(1e-4)
    # Unset, the peak lr is the release's for a real prior in every stage and the tiny preset's own per stage
    # for `tiny`; set, it wins in every stage.
    for stage in (1, 2, 3):
        release = scaled_lr(TrainConfig(batch_size=64), prior="/models/sd-turbo", stage=stage)
        assert release == pytest.approx(RELEASE_LR)
        assert scaled_lr(TrainConfig(batch_size=64), prior="tiny", stage=stage) == pytest.approx(TINY_LR[stage])
        assert scaled_lr(TrainConfig(batch_size=64, lr=3e-4), prior="tiny", stage=stage) == pytest.approx(3e-4)
    assert TINY_LR[2] > TINY_LR[1]
    model = UniRestore(tiny_prior, tasks=["pir"])
    trainable = apply_stage(model, stage1(["pir"]))
    decay, plain = parameter_groups(trainable, 0.01)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    names = {id(p): n for n, p in trainable.items()}
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") or p.squeeze().ndim <= 1 for p in plain["params"])
    assert len(decay["params"]) + len(plain["params"]) == len(trainable)
    # vectors kept in 2-D or 4-D shapes are vectors too: NAFBlocks' per-channel scales, the task prompts
    plain_names = {names[id(p)] for p in plain["params"]}
    assert any(name.endswith(".beta") for name in plain_names) and any(name.endswith(".gamma") for name in plain_names)
    stage2_trainable = apply_stage(model, stage2(["pir"]))
    prompts = {name for name in stage2_trainable if name.startswith("prompts.")}
    assert prompts and all(stage2_trainable[name].ndim == 2 for name in prompts)
    _, plain = parameter_groups(stage2_trainable, 0.01)
    assert {id(stage2_trainable[name]) for name in prompts} <= {id(p) for p in plain["params"]}


def test_stage2_weighs_each_task_by_its_beta_the_tiny_presets_by_default(tiny_prior):
    class Constant:
        name, anchor_to_pir, default_beta = "seg", False, 1.0

        def losses(self, restored, batch):
            return {"loss/seg_ce": restored.sum() * 0 + 1}

    model = UniRestore(tiny_prior, tasks=["pir", "seg"])
    batch = {"hq": torch.rand(1, 3, 64, 64), "lq": torch.rand(1, 3, 64, 64), "task": "seg"}
    assert TINY_BETA["seg"] != Constant.default_beta
    for prior, beta, expected in (
        ("tiny", {}, TINY_BETA["seg"]),  # the tiny preset's own
        ("/models/sd-turbo", {}, Constant.default_beta),  # a real prior: the task's default
        ("tiny", {"seg": 0.3}, 0.3),  # set, it wins
    ):
        config = RunConfig(prior=prior, train=TrainConfig(beta=beta))
        loss = StageLoss(model, stage2(["pir", "seg"]), {"seg": Constant()}, config)
        with torch.no_grad():
            assert float(loss(batch)["loss/seg_ce"]) == pytest.approx(expected)


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])  # fmt: skip
def test_a_compiled_stage_2_draws_computes_and_differentiates_as_the_eager_one(tiny_prior, device):
    """`train.compile` runs what stage 2's decoder reads (the frozen encoder with the CFRM, the Controller, the
    UNet) through torch.compile with inductor, in one graph: the same random draws as eager (the generators end in
    the same state), and the same terms and TFA gradients to rounding."""
    from torch._dynamo.utils import counters

    class Mean:
        name, anchor_to_pir, default_beta = "seg", True, 1.0

        def losses(self, restored, batch):
            return {"loss/seg_mean": restored.mean()}

    torch._dynamo.reset()
    counters.clear()
    model = UniRestore(tiny_prior, tasks=["pir", "seg"])
    apply_stage(model, stage2(["pir", "seg"]))
    model.to(device)
    batch = {"hq": torch.rand(2, 3, 32, 32, device=device), "lq": torch.rand(2, 3, 32, 32, device=device), "task": "seg"}
    results = []
    for compiled in (False, True):
        loss = StageLoss(model, stage2(["pir", "seg"]), {"seg": Mean()}, RunConfig(train=TrainConfig(compile=compiled)))
        torch.manual_seed(5)
        terms = loss(batch)
        sum(terms.values()).backward()
        gradients = {name: p.grad.clone() for name, p in model.tfa.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((terms, gradients, torch.rand(4, device=device)))
    (eager, eager_gradients, eager_next), (through, gradients, next_draws) = results
    assert torch.equal(eager_next, next_draws)  # as many draws from the global generator
    assert set(eager) == set(through) == {"loss/seg_mean", "loss/seg_pir_l1"}
    for key in eager:
        torch.testing.assert_close(through[key], eager[key], rtol=1e-4, atol=1e-5)
    assert eager_gradients and set(gradients) == set(eager_gradients)
    for name, gradient in eager_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-3, atol=1e-4 if device == "cuda" else 1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    model.to("cpu")


def test_stage_declarations_set_requires_grad_exactly(tiny_prior):
    model = UniRestore(tiny_prior, tasks=["pir", "cls"])
    model.add_task("det")
    for stage, allowed in [
        (stage1(["pir"]), ("cfrm.", "controller.", "sc_tuners.")),
        (stage2(["pir", "cls"]), ("tfa.", "prompts.")),
        (stage3("det"), ("prompts.prompts.det",)),
    ]:
        apply_stage(model, stage)
        trainable = [n for n, p in named_parameters(model).items() if p.requires_grad]
        assert trainable and all(n.startswith(allowed) for n in trainable)
        assert not any(p.requires_grad for p in model.vae.parameters())
        assert not any(p.requires_grad for p in model.unet.parameters())
    with pytest.raises(ValueError, match="no such parameters"):
        apply_stage(model, stage3("seg"))


# --------------------------------------------------------------------------------------------------
# Data stream


def test_task_stream_is_a_pure_function_of_the_step():
    datasets = {"a": [{"i": i} for i in range(5)], "b": [{"i": 100 + i} for i in range(15)]}
    stream = TaskStream(datasets, batch_size=2, grad_accum=2, seed=3)
    assert stream.probabilities.tolist() == pytest.approx([0.25, 0.75])
    plans = list(stream.plans(0, 40, {}))
    assert {p.task for p in plans} == {"a", "b"}
    # resuming at step 25 from the data position of step 25 gives the same plans and samples
    position = {}
    for plan in plans[: 25 * 2]:
        position[plan.task] = plan.number + 1
    resumed = list(TaskStream(datasets, 2, 2, seed=3).plans(25, 40, position))
    assert resumed == plans[25 * 2 :]
    fresh = TaskStream(datasets, 2, 2, seed=3)
    assert [fresh.samples(p) for p in resumed] == [stream.samples(p) for p in plans[25 * 2 :]]
    # one epoch of a task visits each of its samples once
    seen = [s["i"] for p in plans if p.task == "a" and p.number < 5 for s in stream.samples(p)]
    assert sorted(seen[:5]) == [0, 1, 2, 3, 4]
    weighted = TaskStream(datasets, 2, 1, seed=3, task_weights={"a": 3.0})
    assert weighted.probabilities.tolist() == pytest.approx([0.5, 0.5])


# --------------------------------------------------------------------------------------------------
# End to end through the API


def test_stages_change_only_their_parameters_and_never_the_prior(root, base_run):
    config, result, spy = base_run
    prior = load_prior("tiny")  # the stage-0 trained prior on disk
    torch.manual_seed(config.train.seed)
    initial = UniRestore(prior, config.model, tasks=TASKS)
    init = {f"{c}.{k}": v for c, m in initial.components().items() for k, v in m.state_dict().items()}
    after1 = tensors(root / "base" / "stage1.safetensors")
    after2 = tensors(result.checkpoint)

    def changed(before, after, component):
        keys = [k for k in before if k.startswith(component + ".")]
        return [k for k in keys if not torch.equal(before[k], after[k])]

    for component in ("cfrm", "controller", "sc_tuners"):
        assert changed(init, after1, component), component  # stage 1 trains these ...
        assert not changed(after1, after2, component), component  # ... and stage 2 leaves them
    for component in ("tfa", "prompts"):
        assert not changed(init, after1, component), component
    assert changed(after1, after2, "tfa")
    assert "prompts.prompts.pir" in changed(after1, after2, "prompts")  # the PIR anchor reaches it every step
    # the frozen prior: the models that trained hold exactly the weights on disk
    for model in spy.models.values():
        for name, value in prior.vae.state_dict().items():
            assert torch.equal(model.vae.state_dict()[name], value), name
        for name, value in prior.unet.state_dict().items():
            assert torch.equal(model.unet.state_dict()[name], value), name
    assert set(spy.models) == {"stage1", "stage2"}
    # Stage 1 trains no TFA, so its model (validation, checkpoint) decodes with the prior's plain decoder;
    # stage 2 switches the TFA on.
    assert read_checkpoint(root / "base" / "stage1.safetensors")[1]["model_config"]["use_tfa"] is False
    assert read_checkpoint(result.checkpoint)[1]["model_config"]["use_tfa"] is True
    assert (root / "base" / "grids" / "final-pir.png").is_file()
    # Each stage's logged values, kept beside its checkpoints and drawn as curves
    for stage, terms in (("stage1", {"loss/cfrm", "loss/control"}), ("stage2", {"loss/pir_l1", "loss/seg_ce"})):
        history = MetricHistory(root / "base" / stage)
        records = history.read()
        assert [r["step"] for r in records if f"{stage}/loss_total" in r["metrics"]] == [1, 2, 3]  # log_every=1
        series = history.series()
        assert terms <= set(series) and f"{stage}/lr" in series
        assert any(name.startswith(f"{stage}/val/") for name in series)  # validation after the last step
        with Image.open(root / "base" / "curves" / f"{stage}.png") as image:
            assert image.format == "PNG" and image.width > 600
    assert {"test/pir/lq/psnr", "test/pir/restored/psnr", "test/cls/restored/acc/resnet"} <= set(
        result.metrics
    )


def test_missing_downstream_models_train_in_a_second_process_as_in_this_one(root, tmp_path, monkeypatch):
    """With no cached downstream model, a second process trains them while stage 1 runs, the run logs how
    long each took, and the weights are those training in this process gives."""
    import mlflow

    from unirestore.framework import downstream

    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))  # nothing cached
    config = make_config(root, "background", "train.eval_samples=2")
    result = train(config, stages=(1,), progress=False)
    logged = mlflow.MlflowClient(config.tracking_uri).get_run(result.run_id).data.metrics
    names = [downstream.builtin_spec(arch, 64).name for arch in ("deeplab", "fcn", "resnet", "vit")]
    assert {f"downstream/{name}/seconds" for name in names} <= set(logged)
    for name in names:
        assert logged[f"downstream/{name}/seconds"] > 0
    spec = downstream.builtin_spec("resnet", 64)
    cached = downstream.read_record(spec)
    assert cached is not None and cached["training"]["steps"] == 3
    downstream.builtin_model(spec, home=tmp_path / "here", force=True, progress=False)
    here = tensors(tmp_path / "here" / f"{spec.name}.safetensors")
    there = tensors(downstream.downstream_home() / f"{spec.name}.safetensors")
    assert here.keys() == there.keys()
    # Equal up to float rounding: the second process runs half the cores' threads, this one runs one.
    assert all(torch.allclose(here[key], there[key], rtol=1e-4, atol=1e-6) for key in here)


def test_kill_and_resume_reaches_the_same_weights(root, base_run):
    _, base, _ = base_run

    class Killed(Exception):
        pass

    def kill(trainer):
        if (
            trainer.stage == "stage2" and trainer.step == 3
        ):  # after the step-2 checkpoint, before the final one
            raise Killed

    config = make_config(root, "killed")
    with pytest.raises(Killed):
        train(config, stages=(1, 2), hooks=[CallbackHook(kill)], progress=False)
    state = read_training_state(root / "killed" / "stage2")
    assert state.step == 2 and not state.done
    run_id = load_run_id(root / "killed")
    with pytest.raises(RunFolderError, match="--resume"):
        train(config, stages=(1, 2), progress=False)
    with pytest.raises(RunFolderError, match="differs"):
        train(make_config(root, "killed", "train.lr=3e-4"), stages=(1, 2), resume=True, progress=False)
    # The kill came after step 3 was logged and before its checkpoint: the history holds step 3 once.
    assert [r["step"] for r in MetricHistory(root / "killed" / "stage2").read()] == [1, 2, 3]
    resumed = train(config, stages=(1, 2), resume=True, progress=False)
    assert resumed.run_id == run_id  # the same MLflow run goes on
    expected, got = tensors(base.checkpoint), tensors(resumed.checkpoint)
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    # The replayed step is in the curves once, with the values the uninterrupted run logged.
    for stage in ("stage1", "stage2"):
        killed = MetricHistory(root / "killed" / stage).read()
        whole = MetricHistory(root / "base" / stage).read()
        assert [r["step"] for r in killed] == [r["step"] for r in whole]
        for a, b in zip(killed, whole):
            assert a["metrics"].keys() == b["metrics"].keys()
            for name in a["metrics"]:
                if not name.endswith("steps_per_second"):
                    assert a["metrics"][name] == pytest.approx(b["metrics"][name], rel=1e-5), (stage, name)


def test_sigterm_saves_the_step_it_reached_and_the_resumed_run_matches_the_uninterrupted_one(root, base_run):
    """A preemption's SIGTERM (or Ctrl-C) mid-stage: the step in progress finishes and is saved, though no periodic
    checkpoint falls there, the MLflow run ends as killed, and resuming reaches the uninterrupted run's weights."""
    import os
    import signal

    import mlflow

    from unirestore.framework.engine import TrainingInterrupted

    _, base, _ = base_run

    def preempt(trainer):
        if trainer.stage == "stage2" and trainer.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # noted now, acted on after step 2

    config = make_config(root, "preempted", "train.checkpoint_every=5")  # no periodic checkpoint in 3 steps
    with pytest.raises(TrainingInterrupted) as caught:
        train(config, stages=(1, 2), hooks=[CallbackHook(preempt)], progress=False)
    assert caught.value.signal == signal.SIGTERM
    folder = root / "preempted" / "stage2"
    message = str(caught.value)
    assert message.startswith(f"stage2 stopped at step 2 of 3, saved in {folder / 'last.safetensors'}; continue with: ")
    assert message.endswith(f"unirestore train --config {root / 'preempted' / 'config.yaml'} --stage 1,2 --resume")
    state = read_training_state(folder)
    assert state.step == 2 and not state.done
    assert [r["step"] for r in MetricHistory(folder).read()] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back with the stage
    mlflow.set_tracking_uri(config.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["unirestore"], filter_string="attributes.run_name = 'preempted'")
    assert list(runs["status"]) == ["KILLED"]
    resumed = train(config, stages=(1, 2), resume=True, progress=False)
    expected, got = tensors(base.checkpoint), tensors(resumed.checkpoint)
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_an_interruption_while_saving_leaves_the_previous_checkpoint_pair_or_the_new_one(tiny_prior, tmp_path,
                                                                                         monkeypatch, where):  # fmt: skip
    """A second Ctrl-C cuts the save of the step where the first one stopped: the stage still resumes, from the
    pair before (cut while writing) or the new one (Ctrl-C between the renames waits for the second)."""
    import os
    import signal

    from unirestore.framework import files
    from unirestore.framework.config import ModelConfig
    from unirestore.framework.engine import state as state_module
    from unirestore.framework.engine.state import TrainingState, save_training_state

    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"])
    save_training_state(tmp_path, model, TrainingState(stage="stage1", step=1, total_steps=9))
    if where == "writing":

        def cut(payload, path):
            raise KeyboardInterrupt

        monkeypatch.setattr(state_module.torch, "save", cut)
    else:
        real_replace = os.replace

        def replace_then_ctrl_c(source, target):
            real_replace(source, target)
            os.kill(os.getpid(), signal.SIGINT)  # before the other file's rename

        monkeypatch.setattr(files.os, "replace", replace_then_ctrl_c)
    with torch.no_grad():
        next(model.cfrm.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(tmp_path, model, TrainingState(stage="stage1", step=2, total_steps=9))
    monkeypatch.undo()
    kept = 1 if where == "writing" else 2
    assert read_training_state(tmp_path).step == kept
    assert read_checkpoint(tmp_path / "last.safetensors")[1]["extra"]["step"] == kept
    assert not list(tmp_path.glob(".*.tmp"))


def test_add_task_changes_only_the_new_prompt(root, base_run):
    config, base, _ = base_run
    result = add_task(config, base.checkpoint, "det", progress=False)
    assert result.checkpoint == root / "base" / "stage3-det.safetensors"
    before, after = tensors(base.checkpoint), tensors(result.checkpoint)
    assert set(after) - set(before) == {"prompts.prompts.det"}
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert after["prompts.prompts.det"].abs().sum() > 0  # trained away from its zero init
    old, new = load_checkpoint(base.checkpoint), load_checkpoint(result.checkpoint)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for task in TASKS:
        a = old.restore(images, task=task, generator=torch.Generator().manual_seed(0))
        b = new.restore(images, task=task, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b), task
    assert {"test/det/lq/map", "test/det/restored/map", "test/det/hq/map"} <= set(result.metrics)
    # A prompt acts only through a trained TFA: a stage-1 checkpoint is refused before any run starts.
    from unirestore.framework.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="saved after stage 1, before its TFA and prompts were trained"):
        add_task(config, root / "base" / "stage1.safetensors", "ret", progress=False)
    assert not (root / "base" / "stage3-ret").exists()


def test_add_task_from_a_checkpoint_of_other_prior_weights_leaves_no_run(root, base_run):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from unirestore.framework.checkpoint import CheckpointError

    _, base, _ = base_run
    with safe_open(str(base.checkpoint), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors_ = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    identity = json.loads(metadata["prior"])
    assert identity["weights"]  # the tiny prior's weights are part of its identity
    metadata["prior"] = json.dumps({**identity, "weights": "0" * 16})  # as if stage 0 had trained it again
    source = root / "other-weights.safetensors"
    save_file(tensors_, str(source), metadata=metadata)
    other = make_config(root, "other-weights")
    with pytest.raises(CheckpointError, match="other weights of prior 'tiny'"):
        add_task(other, source, "det", progress=False)
    assert not (root / "other-weights").exists()  # refused before the run started


def test_add_task_trains_with_the_defaults_of_the_checkpoints_prior_not_the_configs(root, tmp_path):
    """A checkpoint of a prior folder (as sd-turbo's) extended with a config that names no prior (so `tiny`):
    stage 3 takes the release's learning rate, not the tiny preset's 320 times higher one, and its saved config
    names the prior it trained on."""
    from unirestore.framework.checkpoint import save_checkpoint
    from unirestore.framework.prior import build_tiny_prior

    folder = build_tiny_prior(tmp_path / "sd-like", seed=1)  # weights of its own, not the tiny prior's
    model = UniRestore(load_prior(folder), tasks=["pir"])
    source = save_checkpoint(model, tmp_path / "stage2.safetensors", extra={"trained_prompts": ["pir"]})
    config = make_config(root, "folder-prior-add", "train.eval_samples=2")
    assert config.prior == "tiny"
    peaks = []
    hook = CallbackHook(lambda trainer: peaks.append(trainer.optimizer.param_groups[0]["max_lr"]))
    add_task(config, source, "det", hooks=[hook], progress=False)
    assert peaks and all(peak == pytest.approx(RELEASE_LR * math.sqrt(2 / 64)) for peak in peaks)
    saved = load_run_config(root / "folder-prior-add" / "stage3-det" / "config.yaml")
    assert saved.prior == str(folder.resolve())


def test_add_task_names_its_source_checkpoint_and_the_run_that_trained_it(root, tmp_path, monkeypatch):
    """The run of `task add` names its source by an absolute path (given relative, it would point elsewhere
    from another folder) and links the run that trained it (recorded in the checkpoint)."""
    import mlflow

    from unirestore.framework.checkpoint import save_checkpoint

    model = UniRestore(load_prior("tiny"), tasks=["pir"])
    save_checkpoint(model, tmp_path / "stage2.safetensors", extra={"trained_prompts": ["pir"], "run_id": "trained-0"})
    monkeypatch.chdir(tmp_path)
    config = make_config(root, "source-named", "train.eval_samples=2")
    result = add_task(config, "stage2.safetensors", "det", progress=False)
    run = mlflow.MlflowClient(config.tracking_uri).get_run(result.run_id)
    source = str(tmp_path / "stage2.safetensors")
    assert run.data.tags["unirestore.source"] == run.data.params["source"] == source
    assert run.data.tags["unirestore.source_run"] == "trained-0"


def test_a_cpu_stage_leaves_a_core_to_its_data_worker(root, base_run):
    _, base, _ = base_run
    seen = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = make_config(root, "threads", "train.num_workers=1")
        hook = CallbackHook(lambda trainer: seen.append(torch.get_num_threads()))
        add_task(config, base.checkpoint, "det", hooks=[hook], progress=False)
        assert torch.get_num_threads() == 2  # given back when the stage ends
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(root, base_run):
    def poison(trainer):
        if trainer.step == 2:  # after the step-2 checkpoint
            with torch.no_grad():
                next(trainer.loss.model.cfrm.parameters()).fill_(float("nan"))

    config = make_config(root, "nan")
    with pytest.raises(TrainingDiverged, match=r"step 3 \(.*loss/cfrm=nan") as caught:
        train(config, stages=(1,), hooks=[CallbackHook(poison)], progress=False)
    assert "last good checkpoint" in str(caught.value) and "step 2" in str(caught.value)
    state = read_training_state(root / "nan" / "stage1")
    assert state.step == 2
    kept = tensors(root / "nan" / "stage1" / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert not (root / "nan" / "stage1.safetensors").exists()


def test_evaluation_is_deterministic(root, base_run):
    config, base, _ = base_run
    model = load_checkpoint(base.checkpoint)
    tasks = build_tasks(config, ["pir"], torch.device("cpu"), 64)
    first = evaluate(model, tasks, split="val", samples=2, batch_size=2)
    second = evaluate(model, tasks, split="val", samples=2, batch_size=2)
    assert first.results == second.results
    assert set(first.results["pir"]) == {"lq", "restored", "hq"}


def test_two_processes_train_with_data_parallel_and_evaluate_on_rank_0(root, base_run):
    """`torchrun --nproc_per_node 2` on the CPU (gloo): the DistributedDataParallel path of a multi-GPU run.
    Rank 0 validates and evaluates alone (a metric that synchronised across ranks there would wait forever),
    and each stage's DataLoader workers stop with the stage."""
    import os
    import subprocess
    import sys

    import mlflow

    output, uri = root / "ddp", f"sqlite:///{root / 'ddp.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # UNIRESTORE_HOME from the fixture
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "unirestore.framework.cli", "train", "--tasks", "pir,seg,cls", "--steps", "2",
               "--batch-size", "2", "--output", str(output), "--tracking-uri", uri,
               "--set", "train.val_samples=2", "--set", "train.eval_samples=2", "--set", "train.num_workers=1"]  # fmt: skip
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = launcher.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        import psutil

        # the launcher and the ranks (each in a session of its own): a hung collective never returns by itself
        for process in [*psutil.Process(launcher.pid).children(recursive=True), launcher]:
            process.kill()
        stdout, stderr = launcher.communicate()
        pytest.fail(f"two-process training hung; its last output:\n{stderr[-3000:]}")
    done = subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (output / "stage2.safetensors").is_file() and (output / "grids" / "stage2-seg.png").is_file()
    assert "restored" in done.stdout  # rank 0's final table
    assert "can only test a child process" not in done.stderr  # no stale DataLoader iterator in a new worker
    assert "Traceback" not in done.stderr
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["unirestore"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"  # one run, from rank 0
    assert int(runs.iloc[0]["params.effective_batch"]) == 4  # two processes of 2


def test_metric_history_skips_a_line_cut_by_a_kill_and_cuts_back_to_the_resumed_step(tmp_path):
    history = MetricHistory(tmp_path)
    for step in (10, 20, 30):
        history.append(step, {"loss/pir_l1": 1.0 / step, "stage1/lr": 1e-4})
    with history.path.open("a") as stream:
        stream.write('{"step": 40, "metrics": {"loss/pir')  # the process died mid-line
    assert [r["step"] for r in history.read()] == [10, 20, 30]
    history.keep_until(20)
    assert [r["step"] for r in history.read()] == [10, 20]
    history.append(30, {"loss/pir_l1": float("nan")})
    steps, values = history.series()["loss/pir_l1"]
    assert steps == [10, 20] and values == pytest.approx([0.1, 0.05])  # the NaN is not drawn


def test_stage0_is_drawn_as_curves_and_logged_as_the_other_stages_are(root, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))  # no trained tiny prior: stage 0 runs
    config = make_config(root, "stage0-curves", "model.use_tfa=false")
    result = train(config, stages=(0,), progress=False)
    history = MetricHistory(root / "stage0-curves" / "stage0")
    assert [r["step"] for r in history.read()] == [2, 4]  # the VAE's last step, then the UNet's
    # the loss terms, and the total, learning rate and speed under the names stages 1 to 3 give theirs
    stage_keys = {"stage0/loss_total", "stage0/lr", "stage0/steps_per_second"}
    assert {"loss/vae_l1", "loss/vae_kl", "loss/unet_v"} | stage_keys <= set(history.series())
    run = mlflow.MlflowClient(config.tracking_uri).get_run(result.run_id)
    assert stage_keys <= set(run.data.metrics)
    # every setting of the config is a param under its --set name: an ablation shows in a column of its own
    params = run.data.params
    assert (params["model.use_tfa"], params["stage0.vae_steps"], params["train.eval_samples"]) == ("False", "2", "32")
    assert params["tasks"] == "pir,seg,cls" and "tracking_uri" not in params
    assert run.data.tags["unirestore.output"] == str(root / "stage0-curves")
    with Image.open(root / "stage0-curves" / "curves" / "stage0.png") as image:
        assert image.format == "PNG"
    train(config, stages=(0,), resume=True, progress=False)  # the prior is trained now: skipped, history kept
    assert [r["step"] for r in history.read()] == [2, 4]


def test_the_run_folders_config_names_its_data_config_by_an_absolute_path(root, tmp_path, monkeypatch):
    """A relative `data:` was saved as given, so the run folder's config.yaml worked only from the folder the
    run started in; a run folder saved that way still resumes from there."""
    from unirestore.framework.config import load_yaml
    from unirestore.framework.data.config import load_data_config

    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))  # stage 0 of its own, left out of the others'
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (48, 48), (90, 120, 30)).save(tmp_path / "photos" / "a.png")
    for name in ("data.yaml", "other.yaml"):
        (tmp_path / name).write_text("tasks: {pir: [{type: hq_folder, root: photos}]}\n")
    monkeypatch.chdir(tmp_path)
    config = make_config(root, "relative-data", "tasks=[pir]", "data=data.yaml")
    train(config, stages=(0,), progress=False)
    saved = root / "relative-data" / "config.yaml"
    assert load_yaml(saved)["data"] == str((tmp_path / "data.yaml").resolve())
    monkeypatch.chdir(root)  # the saved config reads the same data from anywhere
    data = load_data_config(load_run_config(saved).data)
    assert data.tasks["pir"][0].options["root"] == str((tmp_path / "photos").resolve())
    monkeypatch.chdir(tmp_path)
    saved.write_text(saved.read_text().replace(f"data: {(tmp_path / 'data.yaml').resolve()}", "data: data.yaml"))
    assert load_yaml(saved)["data"] == "data.yaml"  # as a run folder saved before paths were made absolute
    train(config, stages=(0,), resume=True, progress=False)
    with pytest.raises(RunFolderError, match=r"differs from the run's \(data\)"):
        train(make_config(root, "relative-data", "tasks=[pir]", "data=other.yaml"), stages=(0,), resume=True)


def test_a_run_folders_config_names_a_local_prior_and_downstream_checkpoints_by_absolute_paths(tmp_path, monkeypatch):
    """A prior folder and downstream checkpoints given relative to the working directory are saved absolute (a
    hub id and `tiny` stay as they are), and a run folder that saved them relative still resumes from there."""
    from unirestore.framework.config import RunConfig, dump_yaml
    from unirestore.framework.engine import _absolute_paths, _check_resumed_config

    (tmp_path / "priors" / "mine").mkdir(parents=True)
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    given = RunConfig(prior="priors/mine", downstream_checkpoints={"resnet50": "ckpt/r50.pth"})
    config = _absolute_paths(given)
    assert config.prior == str(tmp_path.resolve() / "priors" / "mine")
    assert config.downstream_checkpoints == {"resnet50": str(tmp_path.resolve() / "ckpt" / "r50.pth")}
    assert _absolute_paths(RunConfig(prior="stabilityai/sd-turbo")).prior == "stabilityai/sd-turbo"
    assert _absolute_paths(RunConfig(prior="tiny")).prior == "tiny"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_yaml(given))  # as saved before paths were made absolute
    _check_resumed_config(tmp_path / "run", config)
    other = _absolute_paths(RunConfig(prior="priors/mine", downstream_checkpoints={"resnet50": "ckpt/other.pth"}))
    with pytest.raises(RunFolderError, match=r"downstream_checkpoints\.resnet50"):
        _check_resumed_config(tmp_path / "run", other)


PRIOR_SETTINGS = ("stage1_steps", "stage2_steps", "stage3_steps", "batch_size", "checkpoint_every", "val_every",
                  "val_samples", "eval_samples")  # fmt: skip


def _resolved(config: RunConfig) -> dict:
    train_config = config.with_prior_defaults().train
    return {name: getattr(train_config, name) for name in PRIOR_SETTINGS}


def test_unset_step_counts_and_batch_size_follow_the_prior_as_the_learning_rate_does():
    """On a real prior the tiny preset's 450 steps at batch 4 barely move the modules at the release's lr: left
    unset, the step counts, batch size and validation / checkpoint settings are the release's there, and the
    tiny preset's own (unchanged) on `tiny`; set, they win on either. release.yaml states the release's values
    as the code holds them."""
    from unirestore.framework.config import load_yaml

    preset = {"stage1_steps": 450, "stage2_steps": 450, "stage3_steps": 200, "batch_size": 4, "checkpoint_every": 100,
              "val_every": 0, "val_samples": 8, "eval_samples": 32}  # fmt: skip
    release = {"stage1_steps": 200_000, "stage2_steps": 250_000, "stage3_steps": 200, "batch_size": 6,
               "checkpoint_every": 2000, "val_every": 5000, "val_samples": 64, "eval_samples": 500}  # fmt: skip
    assert _resolved(RunConfig()) == _resolved(load_run_config(None, ["prior=tiny"])) == preset
    for prior in ("/models/sd-turbo", "stabilityai/sd-turbo"):
        assert _resolved(load_run_config(None, [f"prior={prior}"])) == release
        chosen = _resolved(load_run_config(None, [f"prior={prior}", "train.stage1_steps=7", "train.batch_size=2"]))
        assert chosen == {**release, "stage1_steps": 7, "batch_size": 2}
    assert _resolved(load_run_config(None, ["train.stage2_steps=9", "train.val_every=3"])) == {
        **preset, "stage2_steps": 9, "val_every": 3}  # fmt: skip
    # `null` in a file or --set is "unset" too, and a resolved config stays as it is when resolved again
    unset = load_run_config(None, ["prior=/models/sd-turbo", "train.batch_size=null"])
    assert unset.train.batch_size is None and unset.with_prior_defaults().with_prior_defaults().train.batch_size == 6
    with pytest.raises(ConfigError, match=r"train.stage1_steps=-1: must be >= 0"):
        load_run_config(None, ["train.stage1_steps=-1"])
    # experiments/configs/release.yaml: its train values (but the machine's num_workers) are the real-prior defaults
    shipped = load_yaml(Path(__file__).parents[1] / "experiments" / "configs" / "release.yaml")
    stated = {name: value for name, value in shipped["train"].items() if name != "num_workers"}
    defaults = TrainConfig().for_prior(shipped["prior"])
    assert {name: getattr(defaults, name) for name in stated} == stated
    assert {name for name in PRIOR_SETTINGS if name != "stage3_steps"} <= set(stated)


def test_a_real_prior_run_saves_the_defaults_it_resolved_and_resumes_by_them(root, tmp_path):
    """A run on a prior folder with the batch size and checkpoint interval left unset trains at the release's
    batch (6) and saves the values it used in config.yaml and MLflow: `train --config` of that file repeats the
    run, and --resume with another batch size is refused as a changed setting."""
    import mlflow

    from unirestore.framework.config import load_yaml
    from unirestore.framework.prior import build_tiny_prior

    folder = build_tiny_prior(tmp_path / "sd-like", seed=1)  # weights of its own, not the tiny prior's
    config = make_config(root, "folder-prior-defaults", f"prior={folder}", "tasks=[pir]", "train.batch_size=null",
                         "train.checkpoint_every=null", "train.stage1_steps=2")  # fmt: skip
    assert config.train.batch_size is None and config.train.checkpoint_every is None
    seen = []
    hook = CallbackHook(
        lambda trainer: seen.append((trainer.config.batch_size, trainer.optimizer.param_groups[0]["max_lr"]))
    )
    result = train(config, stages=(1,), hooks=[hook], progress=False)
    assert seen == [(6, pytest.approx(RELEASE_LR * math.sqrt(6 / 64)))] * 2
    saved = root / "folder-prior-defaults" / "config.yaml"
    assert {name: load_yaml(saved)["train"][name] for name in PRIOR_SETTINGS} == {
        **_resolved(RunConfig(prior=str(folder))), "stage1_steps": 2, "stage2_steps": 3, "stage3_steps": 2,
        "val_samples": 2}  # fmt: skip
    params = mlflow.MlflowClient(config.tracking_uri).get_run(result.run_id).data.params
    assert params["batch_size"] == "6" and params["train.checkpoint_every"] == "2000"
    train(load_run_config(saved), stages=(1,), resume=True, progress=False)  # the saved file resumes the run
    train(config, stages=(1,), resume=True, progress=False)  # and so does the same command
    with pytest.raises(RunFolderError, match=r"differs from the run's \(train.batch_size\)"):
        train(make_config(root, "folder-prior-defaults", f"prior={folder}", "tasks=[pir]", "train.batch_size=4",
                          "train.checkpoint_every=null", "train.stage1_steps=2"), stages=(1,), resume=True)  # fmt: skip


@pytest.mark.parametrize(("steps", "warmup"), [(10, 0.1), (20, 0.05), (4, 0.25), (450, 0.1), (7, 0.0)])
def test_the_one_cycle_schedule_warms_up_to_the_peak_and_decays(steps, warmup):
    """Whatever the steps: a warm-up of exactly one step (`--steps 10` at warmup 0.1) once divided by zero."""
    from unirestore.framework.engine.trainer import build_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainConfig(warmup=warmup), steps, 2e-3)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = max(rates)
    assert peak == pytest.approx(2e-3, rel=0.05) and rates[-1] < peak / 10
    assert rates.index(peak) <= max(1, round(warmup * steps))


def test_the_detector_size_reaches_the_detection_task():
    from unirestore.framework.config import load_run_config

    config = load_run_config(None, ["detector_size=800"])
    assert build_tasks(config, ["det"], torch.device("cpu"), 64)["det"].context.detector_size == 800
    assert build_tasks(load_run_config(), ["det"], torch.device("cpu"), 64)["det"].context.detector_size is None


def test_cudnn_autotunes_while_a_stage_trains_on_a_gpu_only():
    """`train.cudnn_benchmark` (on by default) turns cuDNN's autotuner on for a stage on a GPU and back after;
    on the CPU, or set false, it stays as it was."""
    import torch

    from unirestore.framework.config import RunConfig, from_dict
    from unirestore.framework.engine import _tuned_convolutions

    assert RunConfig().train.cudnn_benchmark is True
    assert from_dict(RunConfig, {"train": {"cudnn_benchmark": False}}, source="t").train.cudnn_benchmark is False
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        for device, enabled, inside in (("cuda", True, True), ("cuda", False, False), ("cpu", True, False)):
            with _tuned_convolutions(torch.device(device), enabled):
                assert torch.backends.cudnn.benchmark is inside
            assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def _vote(rank: int, store: str, flags: list, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        distributed = Distributed(rank, 2, rank)
        results.put((rank, [distributed.all_agree(flag) for flag in flags[rank]]))
    finally:
        torch.distributed.destroy_process_group()


def test_processes_agree_when_one_loss_is_not_finite(tmp_path):
    """A loss that is not finite in one process stops them all: each votes before its backward, so none is
    left waiting for the diverged one's gradients."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    flags = [[True, True, False], [True, False, True]]  # rank 0 diverges at the third vote, rank 1 at the second
    processes = [context.Process(target=_vote, args=(rank, str(tmp_path / "store"), flags, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    votes = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert votes == {0: [True, False, False], 1: [True, False, False]}
    assert Distributed().all_agree(False) is False and Distributed().all_agree(True) is True


def test_training_counts_subnormal_floats_as_zero_and_restores_the_setting_after():
    """On some CPUs arithmetic on floats below the normal range is many times slower and stage 2's gradients
    reach them: a stage trained from Python flushes them while it runs, as the command does, and leaves the
    caller's setting as it was."""
    from unirestore.framework.engine.trainer import BatchPlan, HookBase, Trainer, flushing_subnormals

    seen = []

    class Record(HookBase):
        def after_step(self):
            seen.append(flushing_subnormals())

    was = flushing_subnormals()
    torch.set_flush_denormal(False)
    try:
        model = _Square()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = ((BatchPlan(step, 0, "pir", step), {"x": torch.ones(2, 3)}) for step in range(1, 100))
        Trainer(model, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0), data, stage="s",
                start_step=0, max_steps=3, config=TrainConfig(), device=torch.device("cpu"),
                distributed=Distributed(0, 1, 0), hooks=[Record()]).train()  # fmt: skip
        assert seen == [True] * 3 and not flushing_subnormals()
    finally:
        torch.set_flush_denormal(was)


class _Square(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"loss/square": (self.weight * batch["x"]).pow(2).mean()}


def _train_until_stopped(rank: int, store: str, results) -> None:
    import os
    import signal

    from unirestore.framework.engine.trainer import BatchPlan, HookBase, Trainer, TrainingInterrupted

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # spawned by a process started with SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)

    class Record(HookBase):
        def after_step(self):
            if rank == 1 and self.trainer.step == 2:  # Ctrl-C in one process only, between two steps' votes
                os.kill(os.getpid(), signal.SIGINT)

        def after_interrupt(self):
            results.put((rank, "saved at", self.trainer.step))

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_Square())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = ((BatchPlan(step, 0, "pir", step), {"x": torch.ones(2, 3)}) for step in range(1, 100))
        trainer = Trainer(model, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0), data, stage="s",
                          start_step=0, max_steps=10, config=TrainConfig(), device=torch.device("cpu"),
                          distributed=Distributed(rank, 2, rank), hooks=[Record()])  # fmt: skip
        try:
            trainer.train()
            results.put((rank, "finished", trainer.step))
        except TrainingInterrupted:
            results.put((rank, "interrupted", trainer.step))
    finally:
        torch.distributed.destroy_process_group()


def test_a_ctrl_c_in_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Under DDP the stop request rides on the next step's vote on a finite loss (no second collective per
    step): a Ctrl-C noted in rank 1 after step 2 stops both processes after step 3, each saving that step."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_train_until_stopped, args=(rank, str(tmp_path / "store"), results)) for rank in (0, 1)
    ]
    for process in processes:
        process.start()
    events = sorted(results.get(timeout=120) for _ in range(4))
    for process in processes:
        process.join(timeout=60)
    assert events == [(0, "interrupted", 3), (0, "saved at", 3), (1, "interrupted", 3), (1, "saved at", 3)]
