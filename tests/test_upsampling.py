"""The decoder's upsamplers as four 2×2 convs: the same function as diffusers' nearest ×2 + 3×3 conv."""

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from unirestore.framework.model import UniRestore
from unirestore.framework.upsampling import is_nearest_conv, nearest_upsample_conv


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 16, 1, 1), (3, 4, 6, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_diffusers_upsampler_values_and_gradients(shape, bias):
    upsampler = Upsample2D(shape[1], use_conv=True, out_channels=shape[1] + 3, bias=bias)
    upsampler.conv.weight.data.normal_()
    sample = torch.randn(shape, requires_grad=True)
    expected = upsampler(sample)
    (expected * torch.linspace(-1, 1, expected.numel()).view_as(expected)).sum().backward()
    expected_grads = [sample.grad.clone(), upsampler.conv.weight.grad.clone()]
    sample.grad = None
    upsampler.zero_grad()

    output = nearest_upsample_conv(upsampler, sample)
    (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample.grad, expected_grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(upsampler.conv.weight.grad, expected_grads[1], rtol=1e-4, atol=1e-4)


def test_channels_last_and_bf16_follow_the_input():
    upsampler = Upsample2D(8, use_conv=True)
    sample = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    output = nearest_upsample_conv(upsampler, sample)
    assert output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, upsampler(sample), rtol=1e-5, atol=1e-5)
    upsampler = upsampler.to(torch.bfloat16)
    low = nearest_upsample_conv(upsampler, sample.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), upsampler(sample.to(torch.bfloat16)).float(), rtol=0.05, atol=0.05)


def test_other_upsamplers_run_as_diffusers_wrote_them():
    transposed = Upsample2D(4, use_conv_transpose=True)
    no_conv = Upsample2D(4, use_conv=False)
    wide = Upsample2D(4, use_conv=True, kernel_size=5, padding=2)
    sample = torch.randn(1, 4, 3, 3)
    for upsampler in (transposed, no_conv, wide):
        assert not is_nearest_conv(upsampler)
        torch.testing.assert_close(nearest_upsample_conv(upsampler, sample), upsampler(sample))


def test_plain_decode_equals_the_priors_decoder(tiny_prior):
    model = UniRestore(tiny_prior)
    assert any(is_nearest_conv(u) for b in model.vae.decoder.up_blocks for u in (b.upsamplers or ()))
    latents = torch.randn(2, model.vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        expected = (model.vae.decode(latents / model.vae.config.scaling_factor).sample + 1) / 2
        torch.testing.assert_close(model.decode(latents, None, None), expected, rtol=1e-5, atol=1e-5)
