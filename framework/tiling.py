"""Tiled restoration for images larger than a tile (UHDSnow is 4K): memory bounded by the tile size.

The padded image is cut into overlapping tiles on the latent grid. One noise tensor is drawn for the whole
image's latent and each tile denoises from its own crop of it, so overlapping tiles start from the same noise
and agree where they overlap; their outputs are blended with weights that ramp linearly across the overlap,
which leaves no visible seam.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_TILE_SIZE = 1024
DEFAULT_TILE_OVERLAP = 128


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile`, at most `stride` apart, the last flush right."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def ramp(length: int, overlap: int, at_start: bool, at_end: bool, device) -> torch.Tensor:
    """A 1-D blending weight: 1 inside, a linear ramp over `overlap` at each side that borders another tile."""
    weight = torch.ones(length, device=device)
    if overlap > 0:
        edge = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if not at_start:
            weight[:overlap] = torch.minimum(weight[:overlap], edge)
        if not at_end:
            weight[-overlap:] = torch.minimum(weight[-overlap:], edge.flip(0))
    return weight


def tiled_forward(
    model,
    images: torch.Tensor,
    tasks: Sequence[str],
    tile_size: int = DEFAULT_TILE_SIZE,
    tile_overlap: int | None = DEFAULT_TILE_OVERLAP,
    steps: int | None = None,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """encode → denoise → decode tile by tile on padded images (B, 3, H, W); returns the blended output of
    each task, every tile encoded and denoised once for all of them."""
    multiple = model.size_multiple
    factor = 2**model.num_taps  # pixels per latent cell
    tile = max(multiple, tile_size // multiple * multiple)
    overlap = DEFAULT_TILE_OVERLAP if tile_overlap is None else tile_overlap
    if overlap < 0:
        raise ValueError(f"tile_overlap={overlap}: must be 0 or more pixels")
    # Tiles start on the latent grid: the overlap is rounded up to whole latent cells (a blend, never none
    # when one was asked for), and at most half a tile.
    overlap = min(-(-overlap // factor) * factor, tile // 2)
    stride = tile - overlap
    height, width = images.shape[-2:]
    latent_shape = model.latent_shape(images)
    device = generator.device if generator is not None else images.device

    def draw() -> torch.Tensor:
        return torch.randn(latent_shape, generator=generator, device=device).to(images.device, images.dtype)

    # the posterior sample's noise (if the model samples it) first, as an untiled pass draws it
    posterior = draw() if model.config.sample_posterior else None
    noise = draw()
    outputs = [torch.zeros_like(images) for _ in tasks]
    total = torch.zeros(1, 1, height, width, device=images.device, dtype=images.dtype)
    rows, columns = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    for top in rows:
        for left in columns:
            bottom, right = min(top + tile, height), min(left + tile, width)
            crop = images[..., top:bottom, left:right]
            cells = (..., slice(top // factor, bottom // factor), slice(left // factor, right // factor))
            restored = model.forward_padded_tasks(
                crop,
                tasks,
                steps=steps,
                noise=noise[cells],
                posterior_noise=None if posterior is None else posterior[cells],
            )
            weight = (
                ramp(bottom - top, overlap, top == rows[0], bottom == height, images.device)[:, None]
                * ramp(right - left, overlap, left == columns[0], right == width, images.device)[None, :]
            )
            weight = weight.to(images.dtype)[None, None]
            for output, out in zip(outputs, restored, strict=True):
                output[..., top:bottom, left:right] += out * weight
            total[..., top:bottom, left:right] += weight
    return [output / total for output in outputs]
