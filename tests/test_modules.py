"""The trainable modules: exact sizes at SD 2.1 scale (built on the meta device) and behaviour at tiny sizes."""

import pytest
import torch
from torch import nn

from unirestore.framework.modules import (
    CFRM,
    TFA,
    AdaptiveBlock,
    CFRMLevel,
    Controller,
    LayerNorm2d,
    NAFBlock,
    SCTuner,
    SCTuners,
    TaskPrompts,
    TFALayer,
)

SD_SKIP_CHANNELS = [320] * 4 + [640] * 3 + [1280] * 5


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def tiny_controller(**overrides) -> Controller:
    config = {
        "in_channels": 4,
        "model_channels": 32,
        "channel_mult": (1, 1, 2, 2),
        "num_res_blocks": 2,
        "attention_levels": (True, True, True, False),
        "num_heads": 4,
        "out_channels": 32,
        "time_embed_dim": 64,
        "norm_num_groups": 8,
    }
    config.update(overrides)
    return Controller(**config)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with noise, so zero-initialised paths and gates do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module


# ---------------------------------------------------------------------------------------------------------------
# sizes at SD 2.1 / sd-turbo scale


def test_tfa_size_matches_paper_table_5():
    with torch.device("meta"):
        tfa = TFA(encoder_channels=[512, 256, 128], decoder_channels=[512, 512, 512])
    assert count_parameters(tfa) == 21_030_656


def test_cfrm_size():
    with torch.device("meta"):
        cfrm = CFRM([128, 256, 512], num_blocks=(1, 1, 9))
    assert count_parameters(cfrm) == 25_960_624


def test_sc_tuners_size():
    with torch.device("meta"):
        tuners = SCTuners(256, SD_SKIP_CHANNELS)
    assert count_parameters(tuners) == 22_147_200


def test_controller_size():
    with torch.device("meta"):
        controller = Controller()
    # SPEC's reading: about 52.5 M with diffusers' blocks
    assert count_parameters(controller) == 52_494_080
    assert count_parameters(controller) == pytest.approx(52.5e6, rel=0.02)


def test_task_prompt_size():
    prompts = TaskPrompts(512)
    prompts.add("pir")
    assert count_parameters(prompts) == 512


# ---------------------------------------------------------------------------------------------------------------
# NAFBlock and CFRM


def test_layer_norm_2d_normalises_each_pixel_over_channels():
    norm = randomize_(LayerNorm2d(8))
    sample = torch.randn(2, 8, 5, 7)
    reference = nn.LayerNorm(8, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    expected = reference(sample.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(sample), expected)


def test_nafblock_is_identity_at_init_and_not_after():
    block = NAFBlock(16)
    sample = torch.randn(2, 16, 7, 9)
    assert torch.equal(block(sample), sample)

    randomize_(block)
    output = block(sample)
    assert output.shape == sample.shape
    assert not torch.allclose(output, sample)


def test_adaptive_block_rejects_groups_not_dividing_4c():
    with pytest.raises(ValueError, match="divisible by groups"):
        AdaptiveBlock(6, groups=16)  # 4c = 24


def test_cfrm_keeps_shapes_for_odd_sizes():
    cfrm = CFRM([16, 32, 64], num_blocks=(1, 1, 2))
    features = [torch.randn(2, 16, 13, 11), torch.randn(2, 32, 7, 6), torch.randn(2, 64, 3, 3)]
    restored = cfrm(features)
    assert [tuple(f.shape) for f in restored] == [tuple(f.shape) for f in features]
    assert all(torch.isfinite(f).all() for f in restored)
    # the encoder calls the levels directly; forward is the same computation
    torch.testing.assert_close(cfrm.levels[1](features[1]), restored[1])


def test_cfrm_level_layout():
    level = CFRMLevel(16, num_blocks=3)
    assert len(level.nafblocks) == 3
    assert isinstance(level.adaptive.nafblock, NAFBlock)


def test_cfrm_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="num_blocks"):
        CFRM([16, 32], num_blocks=(1, 1, 9))
    cfrm = CFRM([16, 32], num_blocks=(1, 1))
    with pytest.raises(ValueError, match="2 levels"):
        cfrm([torch.randn(1, 16, 4, 4)])


def test_cfrm_gradients_reach_every_parameter():
    cfrm = randomize_(CFRM([16, 32], num_blocks=(1, 1)))
    outputs = cfrm([torch.randn(2, 16, 6, 5), torch.randn(2, 32, 3, 3)])
    sum(output.square().mean() for output in outputs).backward()
    missing = [name for name, parameter in cfrm.named_parameters() if parameter.grad is None]
    assert not missing


# ---------------------------------------------------------------------------------------------------------------
# Controller


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (16, 16, {16: (16, 16), 8: (8, 8), 4: (4, 4), 2: (2, 2)}),
        (9, 12, {12: (9, 12), 6: (5, 6), 3: (3, 3), 2: (2, 2)}),
    ],
)
def test_controller_outputs_one_map_per_level_keyed_by_width(height, width, expected):
    controller = tiny_controller()
    control = controller(torch.randn(2, 4, height, width), 999)
    assert {key: tuple(value.shape[-2:]) for key, value in control.items()} == expected
    assert all(value.shape[:2] == (2, 32) for value in control.values())
    assert list(control) == sorted(control, reverse=True)  # finest first


def test_controller_at_init_is_the_heads_shortcut_of_conv_in():
    # zero-initialised resnet conv2 and attention out-projections make every block an identity, so the finest
    # map (head with an identity shortcut: 32 -> 32 channels) is conv_in's output, whatever the timestep
    controller = tiny_controller()
    sample = torch.randn(2, 4, 8, 8)
    control = controller(sample, 999)
    torch.testing.assert_close(control[8], controller.conv_in(sample))
    assert all(value.abs().sum() > 0 for value in control.values())
    for key, value in controller(sample, 0).items():
        torch.testing.assert_close(value, control[key])


def test_controller_zero_init_still_learns():
    controller = tiny_controller()
    control = controller(torch.randn(2, 4, 8, 8), 500)
    sum(value.square().mean() for value in control.values()).backward()
    assert controller.heads[0].conv2.weight.grad.abs().sum() > 0
    assert controller.down_blocks[0].attentions[0].to_out[0].weight.grad.abs().sum() > 0


def test_controller_timestep_forms_agree():
    controller = randomize_(tiny_controller())
    sample = torch.randn(2, 4, 8, 8)
    reference = controller(sample, 250)
    for timesteps in (torch.tensor(250), torch.tensor([250]), torch.tensor([250, 250])):
        for key, value in controller(sample, timesteps).items():
            torch.testing.assert_close(value, reference[key])
    other = controller(sample, 750)
    assert not torch.allclose(other[8], reference[8])
    with pytest.raises(ValueError, match="batch of 2"):
        controller(sample, torch.tensor([1, 2, 3]))


def test_controller_rejects_a_latent_too_small_for_its_levels():
    with pytest.raises(ValueError, match="width 1"):
        tiny_controller()(torch.randn(1, 4, 4, 4), 999)


# ---------------------------------------------------------------------------------------------------------------
# SC-Tuners


def test_sc_tuner_formula():
    tuner = randomize_(SCTuner(8, 4))
    skip, control = torch.randn(2, 4, 5, 5), torch.randn(2, 8, 5, 5)
    projected = skip + tuner.proj(control)
    torch.testing.assert_close(tuner(skip, control), projected + tuner.mlp(projected))


def test_sc_tuners_pick_control_by_width():
    tuners = SCTuners(16, [8, 8, 24])
    skips = [torch.randn(2, 8, 6, 8), torch.randn(2, 8, 6, 8), torch.randn(2, 24, 3, 4)]
    control = {8: torch.randn(2, 16, 6, 8), 4: torch.randn(2, 16, 3, 4)}
    edited = tuners(skips, control)
    assert [tuple(e.shape) for e in edited] == [tuple(s.shape) for s in skips]
    torch.testing.assert_close(edited[2], tuners.tuners[2](skips[2], control[4]))

    changed = tuners(skips, {8: control[8], 4: torch.randn(2, 16, 3, 4)})
    torch.testing.assert_close(changed[0], edited[0])
    assert not torch.allclose(changed[2], edited[2])


def test_sc_tuners_missing_width_lists_available():
    tuners = SCTuners(16, [8])
    with pytest.raises(KeyError, match=r"width 5.*\[4, 8\]"):
        tuners([torch.randn(1, 8, 5, 5)], {8: torch.randn(1, 16, 8, 8), 4: torch.randn(1, 16, 4, 4)})
    with pytest.raises(ValueError, match="1 tuners"):
        tuners([], {})


def test_controller_feeds_sc_tuners_on_odd_latents():
    # the Controller's keys are the widths that a UNet with the same downsamplers produces
    controller = tiny_controller(out_channels=16)
    control = controller(torch.randn(2, 4, 9, 12), 999)
    tuners = SCTuners(16, [8, 8, 16, 32])
    skips = [
        torch.randn(2, 8, 9, 12),
        torch.randn(2, 8, 5, 6),
        torch.randn(2, 16, 3, 3),
        torch.randn(2, 32, 2, 2),
    ]
    assert [tuple(e.shape) for e in tuners(skips, control)] == [tuple(s.shape) for s in skips]


# ---------------------------------------------------------------------------------------------------------------
# TFA and task prompts


def tiny_tfa_inputs(batch: int = 2):
    """Decoder inputs (64 ch) and CFRM features (64, 32, 16 ch), deepest first; the last pair differs by a pixel
    as it does for image sizes that are not a multiple of 8."""
    samples = [torch.randn(batch, 64, 5, 6), torch.randn(batch, 64, 10, 12), torch.randn(batch, 64, 20, 24)]
    features = [torch.randn(batch, 64, 5, 6), torch.randn(batch, 32, 10, 12), torch.randn(batch, 16, 21, 25)]
    return samples, features


def run_tfa(tfa: TFA, samples, features, prompt):
    outputs = []
    for layer, sample, feature in zip(tfa.layers, samples, features, strict=True):
        sample, prompt = layer(sample, feature, prompt)
        outputs.append(sample)
    assert prompt is None  # the last layer hands no prompt on
    return outputs


def test_tfa_shapes_and_zero_prompt():
    tfa = TFA(encoder_channels=[64, 32, 16], decoder_channels=[64, 64, 64])
    prompts = TaskPrompts(64)
    prompts.add("pir")
    samples, features = tiny_tfa_inputs()
    outputs = run_tfa(tfa, samples, features, prompts("pir"))
    assert [tuple(o.shape) for o in outputs] == [tuple(s.shape) for s in samples]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_tfa_layer_prompt_chain_and_broadcast():
    layer = TFALayer(32, 48, next_channels=16, prompt_length=2)
    sample, feature = torch.randn(3, 48, 7, 5), torch.randn(3, 32, 7, 5)
    prompt = torch.randn(2, 32)
    output, next_prompt = layer(sample, feature, prompt)
    assert output.shape == sample.shape
    assert next_prompt.shape == (3, 2, 16)
    batched, _ = layer(sample, feature, prompt.expand(3, -1, -1))
    torch.testing.assert_close(batched, output)
    with pytest.raises(ValueError, match=r"\(B, 2, 32\)"):
        layer(sample, feature, torch.randn(1, 32))


def test_tfa_layer_is_equation_1_with_three_independent_projections():
    """The layer computes the projections' shared norm once; the result is Eq. 1 with each ϑ applied whole."""
    torch.manual_seed(0)
    layer = TFALayer(32, 48, next_channels=16, prompt_length=2)
    for parameter in layer.parameters():  # away from the zero inits, so every term counts
        torch.nn.init.normal_(parameter, std=0.2)
    sample, feature, prompt = torch.randn(2, 48, 6, 5), torch.randn(2, 32, 6, 5), torch.randn(2, 2, 32)
    forget = layer.forget_gate(feature).softmax(dim=-1)
    remember = layer.input_gate(feature).softmax(dim=-1)
    updated = forget * prompt + remember * torch.tanh(layer.content(feature))
    attention = torch.tanh(layer.out_gate(updated.flatten(1)))
    tuned = feature + layer.tuner_out(layer.tuner_in(feature) * attention[:, :, None, None])
    expected = sample + layer.fuse(torch.cat([sample, tuned], dim=1))
    output, next_prompt = layer(sample, feature, prompt)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(next_prompt, torch.nn.functional.gelu(layer.prompt_out(updated)))


def test_tfa_different_prompts_give_different_outputs_and_prompts_get_gradients():
    tfa = TFA(encoder_channels=[64, 32, 16], decoder_channels=[64, 64, 64])
    prompts = TaskPrompts(64)
    prompts.add("pir")
    prompts.add("seg")
    with torch.no_grad():
        prompts("seg").normal_()
    samples, features = tiny_tfa_inputs()

    pir = run_tfa(tfa, samples, features, prompts("pir"))
    seg = run_tfa(tfa, samples, features, prompts("seg"))
    assert not torch.allclose(pir[-1], seg[-1])

    pir[-1].square().mean().backward()
    assert prompts("pir").grad is not None and prompts("pir").grad.abs().sum() > 0
    assert prompts("seg").grad is None


def test_task_prompts_registry():
    prompts = TaskPrompts(8, prompt_length=2)
    added = prompts.add("pir")
    assert added.shape == (2, 8) and not added.any()
    assert "pir" in prompts and "cls" not in prompts
    prompts.add("cls")
    assert prompts.names() == ["pir", "cls"]
    assert prompts("cls") is prompts.prompts["cls"]
    with pytest.raises(ValueError, match="already exists"):
        prompts.add("pir")
    with pytest.raises(KeyError, match=r"'det'.*\['pir', 'cls'\]"):
        prompts("det")
    assert set(prompts.state_dict()) == {"prompts.pir", "prompts.cls"}
