"""The UniRestore model: structure at real scale, shapes, gradients, prompts and checkpoints."""

import copy
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from unirestore.framework.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from unirestore.framework.config import ConfigError, ModelConfig, TrainConfig
from unirestore.framework.model import UniRestore, _CompiledPass, count_parameters
from unirestore.framework.prior import (
    TINY_VAE,
    PriorError,
    build_prior_from_configs,
    ensure_tiny_prior,
    load_prior,
    tiny_prior_path,
)

# Stable Diffusion 2.1 / sd-turbo, written here so the structure check does not trust the package's presets.
SD21_VAE = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
}
SD21_UNET = {
    "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model(tiny_prior):
    torch.manual_seed(0)
    return UniRestore(tiny_prior, ModelConfig(), tasks=["pir", "cls", "seg"])


def test_parameter_counts_at_sd_turbo_scale():
    prior = build_prior_from_configs(SD21_VAE, SD21_UNET, device="meta")
    with torch.device("meta"):
        model = UniRestore(prior, ModelConfig(), tasks=["pir", "cls", "seg"])
    counts = {name: count_parameters(module) for name, module in model.components().items()}
    assert counts["tfa"] == 21_030_656
    assert abs(counts["cfrm"] - 25.96e6) / 25.96e6 < 0.01
    assert abs(counts["sc_tuners"] - 22.15e6) / 22.15e6 < 0.01
    assert abs(counts["controller"] - 52.5e6) / 52.5e6 < 0.02
    assert counts["prompts"] == 3 * 512  # one 512-number prompt per task
    assert model._unet_skip_channels() == [320] * 4 + [640] * 3 + [1280] * 5
    assert model.native_size == 512 and model.size_multiple == 64


def test_cfrm_levels_follow_the_priors_encoder(tiny_prior):
    prior = build_prior_from_configs(SD21_VAE, SD21_UNET, device="meta")
    with torch.device("meta"):
        release = UniRestore(prior, ModelConfig())
    assert release.config.cfrm_blocks == [1, 1, 9]  # the release's counts at Stable Diffusion's three levels
    assert [len(level.nafblocks) for level in release.cfrm.levels] == [1, 1, 9]
    tiny = UniRestore(tiny_prior, ModelConfig())  # the 4× tiny VAE taps two levels: the deepest keeps its 9
    assert tiny.num_taps == 2 and [len(level.nafblocks) for level in tiny.cfrm.levels] == [1, 9]
    assert tiny.config.cfrm_blocks == [1, 9]  # recorded, so a checkpoint rebuilds the same model
    assert TrainConfig().cfrm_weights_for(3) == [0.1, 0.1, 0.01]
    assert TrainConfig().cfrm_weights_for(2) == [0.1, 0.01]
    with pytest.raises(ConfigError, match=r"model.cfrm_blocks=\[1, 1, 9\] has 3 entries .* 2 tapped levels"):
        UniRestore(tiny_prior, ModelConfig(cfrm_blocks=[1, 1, 9]))
    with pytest.raises(ConfigError, match="train.cfrm_level_weights"):
        TrainConfig(cfrm_level_weights=[1.0]).cfrm_weights_for(2)


def test_a_cached_tiny_prior_of_another_architecture_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path))
    folder = ensure_tiny_prior()
    marker = folder / "stage0.json"
    marker.write_text("{}")  # as if stage 0 had trained it
    assert ensure_tiny_prior() == folder and marker.is_file()  # the current architecture is kept, trained
    config_file = folder / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config["latent_channels"] = 8  # a cache written by an older version
    config_file.write_text(json.dumps(config))
    assert ensure_tiny_prior() == folder
    assert not marker.exists()  # rebuilt untrained, so stage 0 trains it again
    assert json.loads(config_file.read_text())["latent_channels"] == TINY_VAE["latent_channels"]


def test_prior_is_frozen_and_in_eval(model):
    for module in (model.vae, model.unet):
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    model.train()
    assert not model.vae.training and not model.unet.training
    model.eval()


@pytest.mark.parametrize("size", [(67, 93), (64, 64), (130, 71)])
def test_shapes_through_every_stage(model, size):
    images = torch.rand(2, 3, *size)
    padded, resized, _ = model.preprocess(images)
    assert padded.shape[-2] % model.size_multiple == 0 and padded.shape[-1] % model.size_multiple == 0
    assert min(resized) >= model.native_size
    with torch.no_grad():
        encoded = model.encode(padded)
        factor = 2 ** model.num_taps
        channels = model.vae.config.latent_channels
        assert encoded.latents.shape == (2, channels, padded.shape[-2] // factor, padded.shape[-1] // factor)
        assert [f.shape[1] for f in encoded.features] == model.encoder_channels
        for level, feature in enumerate(encoded.features):
            assert feature.shape[-2:] == (padded.shape[-2] // 2 ** (level + 1), padded.shape[-1] // 2 ** (level + 1))
        latents = model.denoise(encoded.latents, generator=generator())
        assert latents.shape == encoded.latents.shape
        decoded = model.decode(latents, encoded.features, "cls")
        assert decoded.shape == padded.shape
    restored = model.restore(images, "pir", generator=generator())
    assert restored.shape == images.shape
    assert restored.min() >= 0 and restored.max() <= 1
    assert torch.isfinite(restored).all()


def test_decoding_several_prompts_in_one_pass_matches_one_at_a_time(tiny_prior):
    torch.manual_seed(0)
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir", "cls"])
    with torch.no_grad():
        for prompt in model.prompts.parameters():
            prompt.normal_()  # zero-initialised prompts would decode alike
        encoded = model.encode(torch.rand(2, 3, 64, 64))
    trained = [*model.tfa.parameters(), *model.prompts.parameters()]

    def loss(outputs):
        return outputs[0].square().mean() + outputs[1].abs().mean()

    together = model.decode_tasks(encoded.latents, encoded.features, ["cls", "pir"])
    grads_together = torch.autograd.grad(loss(together), trained)
    apart = [model.decode(encoded.latents, encoded.features, task) for task in ("cls", "pir")]
    grads_apart = torch.autograd.grad(loss(apart), trained)

    assert [o.shape for o in together] == [(2, 3, 64, 64)] * 2
    assert not torch.allclose(together[0], together[1], atol=1e-3)  # the prompts do steer the output
    for one, other in zip(together, apart, strict=True):
        torch.testing.assert_close(one, other, atol=1e-5, rtol=1e-5)
    for one, other in zip(grads_together, grads_apart, strict=True):
        torch.testing.assert_close(one, other, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads_together)


def test_restore_is_deterministic_with_a_generator(model):
    images = torch.rand(1, 3, 64, 80)
    first = model.restore(images, "pir", generator=generator(3))
    second = model.restore(images, "pir", generator=generator(3))
    assert torch.equal(first, second)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_denoise_steps(model, steps):
    latents = torch.randn(1, model.vae.config.latent_channels, 8, 8)
    out = model.denoise(latents, steps=steps, generator=generator())
    assert out.shape == latents.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="1 to 4"):
        model.denoise(latents, steps=5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_denoise_hands_the_scheduler_python_int_timesteps_with_the_same_result(model, steps, monkeypatch):
    """DDIM's step indexes a CPU table by its timestep and branches on it: a timestep given as a device tensor
    makes every step wait for the GPU (and breaks a compiled graph). It gets ints, and the result is the one the
    same loop gives with tensor timesteps (the UNet and Controller still get the tensor)."""
    latents = torch.randn(1, model.vae.config.latent_channels, 8, 8)
    seen, step = [], model.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        seen.append(timestep)
        return step(model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(model.scheduler, "step", recording_step)
    with torch.no_grad():
        out = model.denoise(latents, steps=steps, generator=generator(5))
    assert len(seen) == steps and all(type(t) is int for t in seen)
    monkeypatch.setattr(model.scheduler, "step", step)
    with torch.no_grad():  # the loop as written with tensor timesteps throughout
        model.scheduler.set_timesteps(steps)
        timesteps = model.scheduler.timesteps
        sample = model.scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator(5)), timesteps[:1])
        for t in timesteps:
            output = model.unet_forward(sample, t, model.control(latents, t))
            sample = model.scheduler.step(output, t, sample).prev_sample
    assert seen == timesteps.tolist()
    assert torch.equal(out, sample)


@pytest.mark.parametrize("steps", [1, 2])
def test_a_compiled_restore_is_one_graph(model, steps):
    """torch.compile makes one graph of the whole restore: no tensor's value is read on the way (the timesteps
    read in the loop broke it at every call, and each break is a CUDA graph more and a wait for the GPU)."""
    import torch._dynamo as dynamo

    model.config.denoise_steps, default_steps = steps, model.config.denoise_steps
    try:
        images = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            noise = torch.randn(model.encode(images).latents.shape, generator=generator(1))
            explained = dynamo.explain(lambda x: model.forward_padded(x, "pir", noise=noise))(images)
            eager = model.forward_padded(images, "pir", noise=noise)
    finally:
        model.config.denoise_steps = default_steps
        dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert torch.isfinite(eager).all()


def test_compile_restore_runs_only_passes_without_gradients_compiled_with_the_noise_drawn_first(model, monkeypatch):
    """After `compile_restore` a restore goes through the compiled pass with its noise drawn outside it, in the
    order the pass draws it (the same images for the same seed); a pass with gradients stays eager."""
    images = torch.rand(2, 3, 32, 32)
    eager = model.restore_tasks(images, ["pir", "cls"], generator=generator(3))
    calls = []

    def compiled(*args):  # stands in for torch.compile's function: the same pass, recorded
        calls.append(args)
        return model._padded_pass(*args)

    monkeypatch.setitem(model.__dict__, "_compiled_pass", _CompiledPass(id(model), "default", compiled))
    through = model.restore_tasks(images, ["pir", "cls"], generator=generator(3))
    assert len(calls) == 1 and calls[0][1] == ("pir", "cls") and calls[0][3] is None  # no generator inside
    assert all(torch.equal(eager[task], through[task]) for task in eager)
    with torch.enable_grad():
        model.forward_padded_tasks(images, ["pir"], generator=generator(3))
    assert len(calls) == 1
    # a copy of a compiled model compiles its own pass (the copied function would run the original's weights)
    twin = copy.deepcopy(model)
    monkeypatch.setattr(torch, "compile", lambda fn, mode, dynamic: fn)
    twin.restore_tasks(images, ["pir"], generator=generator(3))
    assert len(calls) == 1 and twin.__dict__["_compiled_pass"].owner == id(twin)
    monkeypatch.delitem(model.__dict__, "_compiled_pass")
    model.compile_restore()
    assert model.__dict__["_compiled_pass"].owner == id(model)
    del model.__dict__["_compiled_pass"]


@pytest.mark.parametrize("sample_posterior", [False, True])
def test_a_compiled_pass_runs_a_smaller_batch_in_the_graph_of_a_larger_one(tiny_prior, monkeypatch, sample_posterior):
    """A batch smaller than one the compiled pass has run at its size, task list and step count (a run's last
    batch) runs padded in that batch's graph, not a graph of its own, and each image comes out as eager gives it."""
    torch.manual_seed(0)
    model = UniRestore(tiny_prior, ModelConfig(sample_posterior=sample_posterior), tasks=["pir", "cls"])
    images = torch.rand(3, 3, 32, 32, generator=generator(4))
    tasks = ["pir", "cls"]
    eager = model.restore_tasks(images[:2], tasks, generator=[generator(i) for i in range(2)])
    eager_one = model.restore_tasks(images[:1], tasks, generator=generator(7))
    batches, too_large = [], set()

    def compile_(fn, mode, dynamic):  # stands in for torch.compile: the same pass, the batches it gets recorded
        def compiled(images, tasks, *args):
            batches.append((images.shape[0], tasks))
            if images.shape[0] in too_large:
                raise torch.OutOfMemoryError("stand-in")
            return fn(images, tasks, *args)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_)
    model.compile_restore()
    model.restore_tasks(images, tasks, generator=[generator(i) for i in range(3)])
    through = model.restore_tasks(images[:2], tasks, generator=[generator(i) for i in range(2)])
    through_one = model.restore_tasks(images[:1], tasks, generator=generator(7))
    model.restore_tasks(images[:2], ["pir"], generator=[generator(i) for i in range(2)])  # another graph's batch
    assert batches == [(3, ("pir", "cls"))] * 3 + [(2, ("pir",))]
    for task in tasks:
        assert through[task].shape == (2, 3, 32, 32) and through_one[task].shape == (1, 3, 32, 32)
        torch.testing.assert_close(through[task], eager[task], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(through_one[task], eager_one[task], rtol=1e-5, atol=1e-5)
    # a batch that once fitted no longer does (memory taken since): the caller's retry with fewer images (the
    # restore command's one by one) runs them unpadded, not padded up to the size that failed
    too_large.add(3)
    with pytest.raises(torch.OutOfMemoryError):
        model.restore_tasks(images[:2], tasks, generator=[generator(i) for i in range(2)])
    through_one = model.restore_tasks(images[:1], tasks, generator=generator(7))
    assert batches[-2:] == [(3, ("pir", "cls")), (1, ("pir", "cls"))]
    for task in tasks:
        torch.testing.assert_close(through_one[task], eager_one[task], rtol=1e-5, atol=1e-5)


def _set_trainable(model, names):
    for name, module in model.components().items():
        module.requires_grad_(name in names)


def test_stage1_gradients_reach_only_cfrm_controller_tuners(tiny_prior):
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"]).train()
    trainable = {"cfrm", "controller", "sc_tuners"}
    _set_trainable(model, trainable)
    prior_before = {k: v.clone() for k, v in list(model.vae.state_dict().items()) + list(model.unet.state_dict().items())}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    clean, degraded = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        target = model.encode(clean, use_cfrm=False)
    restored = model.encode(degraded, use_cfrm=True)
    feature_loss = sum(torch.nn.functional.mse_loss(r, c) for r, c in zip(restored.features, target.features))
    timesteps = torch.tensor([999, 499])
    noise = torch.randn_like(target.latents)
    noisy = model.scheduler.add_noise(target.latents, noise, timesteps)
    control = model.control(restored.latents, timesteps)
    estimate = model.predict_original(noisy, timesteps, model.unet_forward(noisy, timesteps, control))
    loss = feature_loss + torch.nn.functional.mse_loss(estimate, target.latents)
    loss.backward()
    for name, module in model.components().items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if name in trainable:
            assert grads and any(g.abs().sum() > 0 for g in grads), name
        else:
            assert not grads, name
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(p.grad is None for p in model.unet.parameters())
    optimizer.step()
    for key, value in list(model.vae.state_dict().items()) + list(model.unet.state_dict().items()):
        assert torch.equal(value, prior_before[key]), key


def test_latent_loss_never_reaches_cfrm(tiny_prior):
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"])
    _set_trainable(model, {"cfrm"})
    encoded = model.encode(torch.rand(1, 3, 64, 64))
    assert all(feature.requires_grad for feature in encoded.features)
    assert not encoded.latents.requires_grad  # the main path is cut before the last down block


def test_stage2_gradients_reach_only_tfa_and_prompts(tiny_prior):
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir", "cls"]).train()
    _set_trainable(model, {"tfa", "prompts"})
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        encoded = model.encode(images)
        latents = model.denoise(encoded.latents, generator=generator())
    output = model.decode(latents, encoded.features, "cls")
    (output - images).abs().mean().backward()
    for name, module in model.components().items():
        has_grad = any(p.grad is not None for p in module.parameters())
        assert has_grad == (name in {"tfa", "prompts"}), name
    assert model.prompts.prompts["cls"].grad.abs().sum() > 0
    assert model.prompts.prompts["pir"].grad is None or model.prompts.prompts["pir"].grad.abs().sum() == 0


def test_prompts_steer_the_output_and_adding_a_task_changes_nothing_else(tiny_prior):
    torch.manual_seed(1)
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir", "cls"])
    images = torch.rand(1, 3, 64, 64)
    zero = model.restore(images, "pir", generator=generator())
    assert torch.isfinite(zero).all()  # a zero prompt is well defined
    with torch.no_grad():
        model.prompts.prompts["cls"].normal_(0, 3)
    assert not torch.equal(zero, model.restore(images, "cls", generator=generator()))
    before = {task: model.restore(images, task, generator=generator()) for task in ("pir", "cls")}
    tensors_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_task("det")
    for task in ("pir", "cls"):
        assert torch.equal(before[task], model.restore(images, task, generator=generator()))
    after = model.state_dict()
    assert set(after) - set(tensors_before) == {"prompts.prompts.det"}
    assert all(torch.equal(after[k], v) for k, v in tensors_before.items())
    assert after["prompts.prompts.det"].abs().sum() == 0
    with pytest.raises(KeyError, match="pir"):
        model.restore(images, "unknown")


def test_ablation_switches(tiny_prior):
    images = torch.rand(1, 3, 64, 64)
    counts = {}
    for name, config in {
        "full": ModelConfig(),
        "no_cfrm": ModelConfig(use_cfrm=False),
        "no_tfa": ModelConfig(use_tfa=False),
        "shared": ModelConfig(shared_prompt=True),
    }.items():
        model = UniRestore(tiny_prior, config, tasks=["pir", "cls", "seg"])
        assert model.restore(images, "cls", generator=generator()).shape == images.shape
        counts[name] = model.tasks
    assert counts["shared"] == ["shared"]
    assert counts["full"] == ["pir", "cls", "seg"]


def test_checkpoint_round_trip_is_bit_identical(tmp_path, tiny_prior):
    torch.manual_seed(2)
    model = UniRestore(tiny_prior, ModelConfig(denoise_steps=2), tasks=["pir", "cls"])
    with torch.no_grad():
        for parameter in model.tfa.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
        model.prompts.prompts["cls"].normal_()
    images = torch.rand(1, 3, 70, 64)
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_checkpoint(path)
    assert loaded.config.denoise_steps == 2 and loaded.tasks == ["pir", "cls"]
    for task in ("pir", "cls"):
        assert torch.equal(model.restore(images, task, generator=generator()), loaded.restore(images, task, generator=generator()))
    # only the trainable parts are stored
    from safetensors.torch import load_file

    keys = load_file(str(path)).keys()
    assert {k.split(".")[0] for k in keys} == {"cfrm", "controller", "sc_tuners", "tfa", "prompts", "prior"}


def test_checkpoint_for_another_prior_is_refused(tmp_path, tiny_prior):
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"])
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    other = tmp_path / "other-prior"
    shutil.copytree(tiny_prior_path(), other)
    config = json.loads((other / "unet" / "config.json").read_text())
    config["sample_size"] = 2 * config["sample_size"]  # same weights, another architecture setting
    (other / "unet" / "config.json").write_text(json.dumps(config))
    AutoencoderKL.from_pretrained(other, subfolder="vae")  # the folder itself is a valid prior
    with pytest.raises(CheckpointError, match="trained on prior 'tiny'"):
        load_checkpoint(path, prior=str(other))
    # The same name with another architecture (a checkpoint from an earlier tiny preset): the fix is to retrain.
    renamed = load_prior(other)
    renamed.name = "tiny"
    with pytest.raises(CheckpointError, match=r"train it again on this one \(unirestore train\)"):
        load_checkpoint(path, prior=renamed)


def test_checkpoint_whose_prior_moved_names_the_fix_and_loads_with_it(tmp_path, tiny_prior):
    from typer.testing import CliRunner

    from unirestore.framework.cli import app

    first = tmp_path / "models" / "prior"
    shutil.copytree(tiny_prior_path(), first)
    model = UniRestore(load_prior(str(first)), ModelConfig(), tasks=["pir"])
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    moved = first.rename(tmp_path / "prior-moved")
    with pytest.raises(PriorError, match=r"trained on prior '.*models/prior', which does not load here .*give --prior"):
        load_checkpoint(path)
    assert load_checkpoint(path, prior=str(moved)).tasks == ["pir"]

    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (40, 32), (90, 120, 30)).save(tmp_path / "in" / "a.png")
    args = ["restore", str(tmp_path / "in"), "--ckpt", str(path), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "give --prior" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--prior", str(moved)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a.png").is_file()
    add = ["task", "add", "det", "--from", str(path), "--output", str(tmp_path / "runs"),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    result = CliRunner().invoke(app, add)
    assert result.exit_code == 2 and "give --prior" in " ".join(result.output.split())
    assert not (tmp_path / "mlflow.db").exists()  # refused before the run started


def test_a_prior_folder_given_by_a_relative_path_is_recorded_by_its_absolute_one(tmp_path, monkeypatch):
    """A checkpoint names its prior for every later load: a folder given relative to the working directory
    (load_prior("models/sd-turbo")) is recorded absolute, so the checkpoint loads from anywhere."""
    from unirestore.framework.prior import build_tiny_prior

    build_tiny_prior(tmp_path / "models" / "prior", seed=1)
    monkeypatch.chdir(tmp_path)
    model = UniRestore(load_prior("models/prior"), ModelConfig(), tasks=["pir"])
    assert model.prior_identity["name"] == str(tmp_path.resolve() / "models" / "prior")
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path / "models")
    assert load_checkpoint(path).prior_identity == model.prior_identity


def test_checkpoint_on_retrained_tiny_prior_weights_is_refused(tmp_path, tiny_prior, monkeypatch):
    """Stage 0 can train the tiny prior again (same architecture, other weights): its old checkpoints must not
    load onto it silently."""
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"])
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    assert model.prior_identity["weights"] == tiny_prior.weights
    source = tiny_prior_path()
    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))
    target = tiny_prior_path()
    shutil.copytree(source, target)
    assert load_checkpoint(path).prior_identity == model.prior_identity  # a copy of the same weights loads
    unet = UNet2DConditionModel.from_pretrained(target, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.1)
    unet.save_pretrained(target / "unet")
    with pytest.raises(CheckpointError, match=r"other weights of prior 'tiny'.*UNIRESTORE_HOME") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_checkpoint_on_other_weights_of_a_prior_folder_is_refused(tmp_path):
    """Each VAE and UNet weight file's size and hash tell two folders of the same architecture apart. Old
    checkpoints (none recorded) and the fp16 variant of the same weights still load."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from unirestore.framework.cli import app
    from unirestore.framework.prior import build_tiny_prior

    first, second = build_tiny_prior(tmp_path / "first", seed=0), build_tiny_prior(tmp_path / "second", seed=1)
    model = UniRestore(load_prior(str(first)), ModelConfig(), tasks=["pir"])
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    assert set(model.prior_identity["weight_files"]) == {
        "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
    }  # fmt: skip
    assert load_checkpoint(path).prior_identity == model.prior_identity
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, prior=str(second))
    assert str(error.value) == (
        f"checkpoint {path} was trained on the weights of prior '{first}', not on those of '{second}' "
        "(unet/diffusion_pytorch_model.safetensors holds other bytes); give the folder it was trained on, or a "
        "copy of it, with --prior"
    )
    (tmp_path / "in").mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (40, 32), (90, 120, 30)).save(tmp_path / "in" / "a.png")
    result = CliRunner().invoke(app, ["restore", str(tmp_path / "in"), "--ckpt", str(path), "--prior", str(second),
                                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {error.value}"
    assert not (tmp_path / "out" / "a.png").exists()

    # the fp16 variant of the same weights alone (a download of sd-turbo's fp16 files): the same prior, rounded
    half = tmp_path / "half"
    shutil.copytree(first, half)
    for subfolder, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        cls.from_pretrained(first, subfolder=subfolder).half().save_pretrained(half / subfolder, variant="fp16")
        (half / subfolder / "diffusion_pytorch_model.safetensors").unlink()
    assert load_checkpoint(path, prior=str(half)).tasks == ["pir"]

    # a checkpoint written before weight files were recorded loads as it did
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    identity = json.loads(metadata["prior"])
    del identity["weight_files"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**metadata, "prior": json.dumps(identity)})
    assert load_checkpoint(old, prior=str(second)).tasks == ["pir"]

    # the folder it was trained on, its UNet replaced since
    shutil.copy(second / "unet" / "diffusion_pytorch_model.safetensors", first / "unet")
    with pytest.raises(CheckpointError, match=r"trained on other weights than prior '.*first' holds now .*put back"):
        load_checkpoint(path)


def test_a_prior_given_by_hub_id_records_the_weight_files_of_its_cached_snapshot(tmp_path, monkeypatch):
    """A hub id (as stabilityai/sd-turbo) is read from the Hugging Face cache's snapshot that refs/main names:
    its weight files are recorded as a folder's are, so a checkpoint is refused once the cache holds other
    weights under that id (another revision) and loads again on the ones it was trained on. All offline."""
    import huggingface_hub.constants

    from unirestore.framework.checkpoint import read_checkpoint
    from unirestore.framework.prior import build_tiny_prior, hub_snapshot, weight_file_digests

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once, when it is imported
    repo = cache / "models--unirestore-tests--sd-like"
    trained, other = "1" * 40, "2" * 40
    build_tiny_prior(repo / "snapshots" / trained, seed=0)
    build_tiny_prior(repo / "snapshots" / other, seed=1)  # the same architecture, other weights
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(trained)
    assert hub_snapshot("unirestore-tests/sd-like") == repo / "snapshots" / trained
    assert hub_snapshot("unirestore-tests/not-cached") is None

    prior = load_prior("unirestore-tests/sd-like")
    assert prior.name == "unirestore-tests/sd-like"
    assert set(prior.weight_files) == {
        "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
    }  # fmt: skip
    assert prior.weight_files == weight_file_digests(repo / "snapshots" / trained)
    assert prior.weight_files != weight_file_digests(repo / "snapshots" / other)
    path = save_checkpoint(UniRestore(prior, ModelConfig(), tasks=["pir"]), tmp_path / "model.safetensors")
    assert read_checkpoint(path)[1]["prior"]["weight_files"] == prior.weight_files

    (repo / "refs" / "main").write_text(other)  # the cache moved on to another revision of the same id
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"checkpoint {path} was trained on other weights than prior 'unirestore-tests/sd-like' has in the Hugging "
        "Face cache now (unet/diffusion_pytorch_model.safetensors holds other bytes: another revision of it); give "
        "--prior a folder with the weights it was trained on, or train it again on these"
    )
    assert load_checkpoint(path, prior=str(repo / "snapshots" / trained)).tasks == ["pir"]  # that folder, as told
    (repo / "refs" / "main").write_text(trained)
    assert load_checkpoint(path).tasks == ["pir"]


def _change_a_layer_between_the_slices(folder):
    """Change one layer of the UNet in prior `folder` (as a fine-tune of part of it, or a merged LoRA, does), one
    whose bytes all lie between the 16 slices of 64 KiB that a sampled hash of the file reads."""
    import struct

    from safetensors.torch import load_file, save_file

    from unirestore.framework.prior import _SAMPLED_SLICES, _SLICE_BYTES

    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    size = path.stat().st_size
    slices = [index * (size - _SLICE_BYTES) // (_SAMPLED_SLICES - 1) for index in range(_SAMPLED_SLICES)]

    def between(entry):
        begin, end = (8 + length + offset for offset in entry["data_offsets"])
        return all(end <= start or begin >= start + _SLICE_BYTES for start in slices)

    name = max((name for name, entry in header.items() if name != "__metadata__" and between(entry)),
               key=lambda name: header[name]["data_offsets"][1] - header[name]["data_offsets"][0])  # fmt: skip
    tensors = load_file(path)
    tensors[name] += 0.01
    save_file(tensors, path, metadata=header.get("__metadata__"))  # the same tensors: the same layout


def _with_sampled_weight_files(path, old):
    """Checkpoint `path` written to `old` as one written before whole weight files were hashed: each weight file
    recorded by its size and the hash of 16 slices of it alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    identity = json.loads(metadata["prior"])
    identity["weight_files"] = {
        name: {"size": entry["size"], "sample": entry["sample"]} for name, entry in identity["weight_files"].items()
    }
    save_file(tensors, str(old), metadata={**metadata, "prior": json.dumps(identity)})
    return old


def test_a_checkpoint_is_refused_on_weights_changed_between_the_sampled_slices(tmp_path):
    """Weights changed in one layer only fall between the slices of a sampled hash: the hash of the whole file
    tells the folders apart. A checkpoint that records the sampled hashes alone (written before whole files were
    hashed) is checked by those, as it was."""
    from unirestore.framework.prior import _sample_digest, build_tiny_prior

    first, second = build_tiny_prior(tmp_path / "first", seed=0), build_tiny_prior(tmp_path / "second", seed=1)
    tuned = tmp_path / "tuned"
    shutil.copytree(first, tuned)
    _change_a_layer_between_the_slices(tuned)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (first / unet).read_bytes() != (tuned / unet).read_bytes()
    assert _sample_digest(first / unet) == _sample_digest(tuned / unet)

    model = UniRestore(load_prior(str(first)), ModelConfig(), tasks=["pir"])
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, prior=str(tuned))
    assert str(error.value) == (
        f"checkpoint {path} was trained on the weights of prior '{first}', not on those of '{tuned}' "
        f"({unet} holds other bytes); give the folder it was trained on, or a copy of it, with --prior"
    )

    old = _with_sampled_weight_files(path, tmp_path / "old.safetensors")
    assert load_checkpoint(old).tasks == ["pir"]
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(old, prior=str(second))
    assert str(error.value) == (
        f"checkpoint {old} was trained on the weights of prior '{first}', not on those of '{second}' "
        f"({unet} holds other bytes); give the folder it was trained on, or a copy of it, with --prior"
    )
    assert load_checkpoint(old, prior=str(tuned)).tasks == ["pir"]  # between its slices: unseen, as before


def test_a_weight_file_is_read_whole_once_per_version(tmp_path, monkeypatch, capsys):
    """The hash of a whole weight file is kept under UNIRESTORE_HOME: an unchanged file is not read again, a
    touched or rewritten one is, and a kept hash that is damaged or cannot be read or written is computed again,
    never an error."""
    import hashlib
    import os

    from unirestore.framework import prior
    from unirestore.framework.prior import _digest_record, file_sha256

    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(prior, "_NOTED_BYTES", 1)
    reads = []
    file_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda handle, name: reads.append(name) or file_digest(handle, name))
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(os.urandom(2**20))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    assert file_sha256(path) == digest and len(reads) == 1
    assert f"hashing {path} (0.0 GB) once" in " ".join(capsys.readouterr().err.split())
    assert file_sha256(path) == digest and len(reads) == 1  # kept
    assert capsys.readouterr().err == ""
    assert [record.name for record in (tmp_path / "home" / "digests").iterdir()] == [_digest_record(path)[0].name]

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    assert file_sha256(path) == digest and len(reads) == 2
    assert file_sha256(path) == digest and len(reads) == 2
    changed = bytearray(path.read_bytes())
    changed[2**19] ^= 1
    path.write_bytes(changed)  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    digest = hashlib.sha256(changed).hexdigest()
    assert file_sha256(path) == digest and len(reads) == 3
    assert file_sha256(path) == digest and len(reads) == 3

    record, version = _digest_record(path)
    damaged = [b"", b"\xff\xfe not JSON", b"[]", json.dumps({**version, "sha256": 5}).encode(),
               json.dumps({**version, "size": 1, "sha256": "0" * 64}).encode()]  # fmt: skip
    for count, content in enumerate(damaged, start=4):
        record.write_bytes(content)
        assert file_sha256(path) == digest and len(reads) == count
        assert file_sha256(path) == digest and len(reads) == count  # kept again
    record.unlink()
    record.mkdir()  # neither readable nor writable
    assert file_sha256(path) == digest and len(reads) == 9
    assert file_sha256(path) == digest and len(reads) == 10
    assert record.is_dir() and list(record.parent.glob("*.tmp")) == []


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_missing_or_corrupt_checkpoint_fails_clearly(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_a_folder_names_its_newest_checkpoint_or_a_stage_folders_last(tmp_path):
    """`--ckpt runs/x` is the run's newest checkpoint (the last stage or task added), whatever its name sorts
    as; a stage's folder gives its periodic `last.safetensors`; an empty folder says what to give."""
    import os

    from unirestore.framework.checkpoint import resolve_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    for age, name in enumerate(["stage3-ret", "stage1", "stage2", "stage3-det"]):  # oldest first
        (run / f"{name}.safetensors").write_bytes(b"x")
        os.utime(run / f"{name}.safetensors", ns=(10**18 + age * 10**9,) * 2)
    assert resolve_checkpoint(run) == run / "stage3-det.safetensors"  # sorts before stage3-ret, is newer
    assert resolve_checkpoint(run / "stage1.safetensors") == run / "stage1.safetensors"
    stage = run / "stage2"
    stage.mkdir()
    for name in ("last", "other"):
        (stage / f"{name}.safetensors").write_bytes(b"x")
    assert resolve_checkpoint(stage) == stage / "last.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no \.safetensors checkpoint in folder .*empty; give the checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_tiny_prior_saved_with_save_pretrained_loads_through_the_folder_loader(tmp_path, tiny_prior):
    folder = tmp_path / "sd-like"
    tiny_prior.vae.save_pretrained(folder / "vae")
    tiny_prior.unet.save_pretrained(folder / "unet")
    tiny_prior.scheduler.save_pretrained(folder / "scheduler")
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(tiny_prior_path() / sub, folder / sub)
    prior = load_prior(folder)
    assert prior.fingerprint == tiny_prior.fingerprint
    assert torch.equal(prior.empty_prompt_embeds, tiny_prior.empty_prompt_embeds)
    assert isinstance(prior.unet, UNet2DConditionModel)
    assert all(not p.requires_grad for p in prior.unet.parameters())
    # the text encoder and tokenizer are read only to encode the empty prompt: a partial copy without them is
    # named (transformers would blame the folder itself, or fail with a traceback), and loads when the
    # embedding is given, as a checkpoint gives it
    for sub in ("tokenizer", "text_encoder"):
        moved = shutil.move(folder / sub, tmp_path / sub)
        with pytest.raises(PriorError, match=rf"sd-like lacks {sub}/, with which the empty prompt is encoded"):
            load_prior(folder)
        assert torch.equal(load_prior(folder, empty_prompt_embeds=prior.empty_prompt_embeds).empty_prompt_embeds,
                           prior.empty_prompt_embeds)  # fmt: skip
        shutil.move(moved, folder / sub)
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(PriorError, match=r"sd-like/text_encoder holds no weights \(model.safetensors"):
        load_prior(folder)
    # a folder whose UNet weights are missing (a partial copy) is named before diffusers looks for them
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(PriorError, match=r"sd-like/unet holds no weights \(diffusion_pytorch_model.safetensors"):
        load_prior(folder)


def test_bad_prior_paths_fail_clearly(tmp_path):
    with pytest.raises(PriorError, match="lacks"):
        load_prior(tmp_path)
    with pytest.raises(PriorError, match="neither a folder"):
        load_prior(str(tmp_path / "missing"))


def test_a_hub_id_that_does_not_load_fails_in_one_line_without_a_library_warning():
    """`downstream train` reads a prior's native size from its configs alone: a hub id missing offline is one
    line there as well, without huggingface_hub's warning about an argument diffusers passes it."""
    import warnings

    from unirestore.framework.prior import prior_native_size

    for read in (prior_native_size, load_prior):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(PriorError, match="downloads are off"):
                read("someone/no-such-prior")
        assert [str(warning.message) for warning in caught] == []


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tiled_and_untiled_restore_agree(tiny_prior, prediction_type):
    from diffusers import DDIMScheduler

    from unirestore.framework.prior import SD_SCHEDULER
    from unirestore.framework.tiling import tile_starts

    assert tile_starts(256, 128, 96) == [0, 96, 128]
    torch.manual_seed(3)
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"])
    model.scheduler = DDIMScheduler(**dict(SD_SCHEDULER, prediction_type=prediction_type))
    # a smooth image, as photos are: tiles then see the same content the whole image shows
    images = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12), size=(192, 256), mode="bicubic").clamp(0, 1)
    whole = model.restore(images, "pir", generator=generator(5))
    tiled = model.restore(images, "pir", generator=generator(5), tile_size=128, tile_overlap=64)
    assert tiled.shape == whole.shape
    difference = (tiled - whole).abs()
    if prediction_type == "epsilon":  # sd-turbo's parameterisation: the UNet's output is scaled down in ẑ0
        assert difference.mean() < 0.02, difference.mean()
    else:  # v: ẑ0 is the (random, untrained) UNet's own output, whose attention sees one tile at a time
        other_noise = model.restore(images, "pir", generator=generator(6))
        assert difference.mean() < 0.5 * (other_noise - whole).abs().mean(), difference.mean()
    # seams: the error along tile borders is no worse than elsewhere
    assert difference[..., :, 120:136].mean() < 3 * difference.mean() + 1e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clean_latent_estimate_follows_the_priors_prediction_type(tiny_prior, prediction_type):
    """ẑ0 from the exact target of either parameterisation is the clean latent (sd-turbo: ε; tiny: v)."""
    from diffusers import DDIMScheduler

    from unirestore.framework.prior import SD_SCHEDULER

    assert tiny_prior.scheduler.config.prediction_type == "v_prediction"
    model = UniRestore(tiny_prior, tasks=["pir"])
    model.scheduler = DDIMScheduler(**dict(SD_SCHEDULER, prediction_type=prediction_type))
    clean, noise = torch.randn(3, 4, 8, 8, generator=generator(1)), torch.randn(3, 4, 8, 8, generator=generator(2))
    timesteps = torch.tensor([249, 749, 999])
    noisy = model.scheduler.add_noise(clean, noise, timesteps)
    target = noise if prediction_type == "epsilon" else model.scheduler.get_velocity(clean, noise, timesteps)
    torch.testing.assert_close(model.predict_original(noisy, timesteps, target), clean, atol=1e-4, rtol=1e-4)
    # The wrong parameterisation does not give it back: the formula really depends on the type.
    other = model.scheduler.get_velocity(clean, noise, timesteps) if prediction_type == "epsilon" else noise
    assert (model.predict_original(noisy, timesteps, other) - clean).abs().max() > 0.5


def test_restore_with_a_generator_per_image_matches_restoring_each_alone(model):
    images = torch.rand(3, 3, 40, 56, generator=generator(5))
    alone = {}
    for tile_size in (None, 32):
        alone[tile_size] = torch.cat([model.restore(images[i : i + 1], "pir", generator=generator(),
                                                    tile_size=tile_size) for i in range(3)])  # fmt: skip
        batched = model.restore(images, "pir", generator=[generator() for _ in range(3)], tile_size=tile_size)
        torch.testing.assert_close(batched, alone[tile_size], rtol=1e-5, atol=1e-5)
    shared = model.restore(images, "pir", generator=generator())  # one generator: one noise draw for the batch
    torch.testing.assert_close(shared[:1], alone[None][:1], rtol=1e-5, atol=1e-5)
    assert (shared[1:] - alone[None][1:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        model.restore(images, "pir", generator=[generator(), generator()])


def test_a_sampled_posterior_draws_from_each_images_own_generator(tiny_prior):
    torch.manual_seed(0)
    model = UniRestore(tiny_prior, ModelConfig(sample_posterior=True), tasks=["pir"])
    images = torch.rand(2, 3, 40, 56, generator=generator(5))
    for tile_size in (None, 32):
        alone = torch.cat(
            [model.restore(images[i : i + 1], generator=generator(i), tile_size=tile_size) for i in range(2)]
        )
        torch.manual_seed(1)  # the global generator must not matter
        batched = model.restore(images, generator=[generator(0), generator(1)], tile_size=tile_size)
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
        torch.manual_seed(2)
        again = model.restore(images[:1], generator=generator(0), tile_size=tile_size)
        torch.testing.assert_close(again, alone[:1], rtol=0, atol=0)


def test_restore_refuses_integer_images_and_passes_an_empty_batch(model):
    images = torch.rand(1, 3, 32, 32, generator=generator(1))
    with pytest.raises(
        TypeError, match=r"float images in \[0, 1\], got torch.uint8: pass images.float\(\) / 255"
    ):
        model.restore((images * 255).to(torch.uint8))
    assert model.restore(images[:0]).shape == (0, 3, 32, 32)
    # out-of-range values are clamped whatever the size (here no resize would have clamped them)
    big = torch.rand(1, 3, 64, 64, generator=generator(2))
    torch.testing.assert_close(
        model.restore(big * 1.5 - 0.25, generator=generator()),
        model.restore((big * 1.5 - 0.25).clamp(0, 1), generator=generator()),
    )
    with pytest.raises(ValueError, match="steps=0"):
        model.restore(images, steps=0)


def test_tile_overlaps_blend_on_the_latent_grid(model):
    """An overlap under the size multiple still blends (rounded up to latent cells); a negative one is refused."""
    from unirestore.framework.tiling import tiled_forward

    assert model.size_multiple > 2**model.num_taps  # the case that once rounded a small overlap to none
    images = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 32, generator=generator(3)), size=(64, 256),
                                             mode="bicubic").clamp(0, 1)  # fmt: skip
    small = 2**model.num_taps + 1  # rounds up to two latent cells
    blended, none = (
        tiled_forward(model, images, ["pir"], tile_size=64, tile_overlap=overlap, generator=generator())[0]
        for overlap in (small, 0)
    )
    assert torch.isfinite(blended).all()
    assert not torch.equal(blended, none)  # the small overlap was not dropped
    with pytest.raises(ValueError, match="tile_overlap=-8"):
        tiled_forward(model, images, ["pir"], tile_size=64, tile_overlap=-8)


def test_checkpoints_get_the_permissions_of_a_plain_file(tmp_path, tiny_prior):
    """Written through a private temporary file, a checkpoint must still be readable as any other output (other
    users, other nodes of a cluster), under the process's umask."""
    import os

    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir"])
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(model, tmp_path / "model.safetensors")
        os.umask(0o077)
        private = save_checkpoint(model, tmp_path / "private.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert private.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_hub_id_with_downloads_off_names_the_local_folder_as_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorError, match=r"downloads are off \(HF_HUB_OFFLINE=1\).*--prior /path/to/folder") as error:
        load_prior("unirestore-tests/no-such-prior")
    assert "\n" not in str(error.value)


def test_restore_tasks_gives_each_prompts_own_restore_from_one_encode_and_denoise(tiny_prior):
    """Several prompts at once: the same outputs as one `restore` per prompt, whole, tiled and per image."""
    torch.manual_seed(2)
    model = UniRestore(tiny_prior, ModelConfig(), tasks=["pir", "cls", "seg"])
    with torch.no_grad():
        for name in ("cls", "seg"):
            model.prompts.prompts[name].normal_(0, 3)
    images = torch.rand(2, 3, 40, 56, generator=generator(7))
    calls = []
    denoise = model.denoise
    model.denoise = lambda *args, **kwargs: calls.append(1) or denoise(*args, **kwargs)
    for tile_size in (None, 32):
        together = model.restore_tasks(images, ["pir", "seg", "cls"], generator=[generator(), generator()],
                                       tile_size=tile_size)  # fmt: skip
        tiles = len(calls)
        assert list(together) == ["pir", "seg", "cls"]
        for task, restored in together.items():
            alone = model.restore(images, task, generator=[generator(), generator()], tile_size=tile_size)
            torch.testing.assert_close(restored, alone, rtol=1e-5, atol=1e-5)
        assert len(calls) == 4 * tiles  # the three single restores denoised three times as often
        calls.clear()
        assert (together["seg"] - together["pir"]).abs().max() > 1e-4  # the prompts differ (10× the tolerance)
    with pytest.raises(KeyError, match="nope"):
        model.restore_tasks(images, ["pir", "nope"])
    assert not calls  # a missing prompt stops it before any work


def test_restore_tasks_with_one_shared_prompt_decodes_once(tiny_prior):
    torch.manual_seed(4)
    model = UniRestore(tiny_prior, ModelConfig(shared_prompt=True), tasks=["pir", "cls"])
    images = torch.rand(1, 3, 32, 32, generator=generator(8))
    decoded = []
    decode_tasks = model.decode_tasks
    model.decode_tasks = lambda latents, features, tasks: decoded.append(list(tasks)) or decode_tasks(
        latents, features, tasks)  # fmt: skip
    outputs = model.restore_tasks(images, ["pir", "cls"], generator=generator())
    assert decoded == [["shared"]] and torch.equal(outputs["pir"], outputs["cls"])
    torch.testing.assert_close(outputs["cls"], model.restore(images, "cls", generator=generator()))


def test_native_size_is_read_from_the_configs_alone(tmp_path, tiny_prior, monkeypatch):
    """`unirestore downstream train` needs only the prior's image side: no weights are read for it."""
    from typer.testing import CliRunner

    from unirestore.framework.cli import app
    from unirestore.framework.prior import prior_native_size, tiny_native_size

    folder = tmp_path / "prior"
    shutil.copytree(tiny_prior_path(), folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["sample_size"] = 24  # another native size than the preset's, so the number comes from the file
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    expected = load_prior(folder).native_size
    assert expected == 96 and prior_native_size("tiny") == tiny_native_size() == tiny_prior.native_size

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", no_weights)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_weights)
    assert prior_native_size(folder) == expected
    with pytest.raises(PriorError, match="lacks unet/"):
        shutil.rmtree(folder / "unet")
        prior_native_size(folder)
    single = tmp_path / "sd_turbo.safetensors"
    single.write_bytes(b"")
    for read in (prior_native_size, load_prior):
        with pytest.raises(PriorError, match=r"is a single file; .*from_single_file"):
            read(single)
    shutil.copytree(tiny_prior_path() / "unet", folder / "unet")
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    sizes = []

    def build_tasks(config, names, device, size):
        sizes.append(size)
        return {"cls": object()}

    monkeypatch.setattr("unirestore.framework.engine.build_tasks", build_tasks)
    command = ["downstream", "train", "--task", "cls", "--set"]
    assert CliRunner().invoke(app, [*command, f"prior={folder}"]).exit_code == 0 and sizes == [96]
    result = CliRunner().invoke(app, [*command, f"prior={tmp_path / 'nope'}"])
    assert result.exit_code == 2 and "neither a folder on disk nor a hub id" in " ".join(result.output.split())


def test_a_prior_folder_with_only_half_precision_weights_loads_in_fp32(tmp_path, tiny_prior):
    """A download of just sd-turbo's fp16 files (`*.fp16.safetensors`) loads, upcast, as the full one would."""
    from transformers import CLIPTextModel

    folder = tmp_path / "prior-fp16"
    shutil.copytree(tiny_prior_path(), folder)
    for sub, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        half = cls.from_pretrained(tiny_prior_path(), subfolder=sub).to(torch.float16)
        shutil.rmtree(folder / sub)
        half.save_pretrained(folder / sub, variant="fp16")
        assert all(".fp16." in p.name for p in (folder / sub).iterdir() if p.suffix == ".safetensors")
    prior = load_prior(folder)
    assert prior.unet.dtype == prior.vae.dtype == prior.empty_prompt_embeds.dtype == torch.float32
    assert prior.fingerprint == tiny_prior.fingerprint
    for ours, full in zip(prior.unet.parameters(), tiny_prior.unet.parameters(), strict=True):
        assert torch.equal(ours, full.half().float())
    torch.testing.assert_close(prior.empty_prompt_embeds, tiny_prior.empty_prompt_embeds, atol=5e-3, rtol=0)


def test_priors_of_another_kind_are_refused_before_their_weights_load(tmp_path):
    """SDXL-type UNets (extra conditioning) and inpainting / upscaling UNets (more input channels than the
    VAE's latents) are named as such, and no weight is read."""
    from unirestore.framework.prior import prior_native_size

    for change, message in (
        ({"addition_embed_type": "text_time"}, r"extra conditioning \(addition_embed_type=text_time, as SDXL"),
        ({"in_channels": 9}, r"takes 9 input channels but its VAE makes 16-channel latents"),
    ):
        folder = tmp_path / f"prior-{next(iter(change))}"
        shutil.copytree(tiny_prior_path(), folder)
        for weights in (folder / "unet").glob("*.safetensors"):
            weights.write_bytes(b"not weights")  # never read
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
        for read in (prior_native_size, load_prior):
            with pytest.raises(PriorError, match=message) as error:
                read(folder)
            assert str(error.value).startswith(f"prior '{folder}'")


def test_an_empty_unirestore_home_means_the_default_cache(monkeypatch, tmp_path):
    from pathlib import Path

    from unirestore.framework.prior import unirestore_home

    monkeypatch.setenv("UNIRESTORE_HOME", "")  # not the working directory
    assert unirestore_home() == Path.home() / ".cache" / "unirestore"
    monkeypatch.setenv("UNIRESTORE_HOME", str(tmp_path))
    assert unirestore_home() == tmp_path
