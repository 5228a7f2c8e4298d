"""Degradation synthesis (SPEC §7): what turns a clean image into the model's input.

Two families share one registry, `DEGRADATIONS` (name -> function):

- the 15 ImageNet-C corruptions (Hendrycks & Dietterich), run by `imagecorruptions` (the
  `imagecorruptions-imaug` distribution), plus "clean", the identity: these make the training set;
- synthesisers for the paper's unseen benchmarks: `rain` (streaks), `haze` (atmospheric scattering),
  `snow_synth` (flakes and veil), `motion` (camera-shake blur), `noise15` / `noise25` / `noise50`
  (additive Gaussian noise at sigma = 15, 25, 50 on the 0..255 scale; these ignore the severity).

Every function maps an (H, W, 3) uint8 image, a severity in 1..5 and a `numpy.random.Generator` to a new
(H, W, 3) uint8 image, and draws all its randomness from that generator. Most ImageNet-C functions read
numpy's global random state instead, so their wrapper seeds it from the generator right before the call
(and puts the caller's state back after): the result depends only on the generator, in the main process
and in any DataLoader worker process alike. (Two *threads* degrading at once would interleave that global
state: use process workers, which is what DataLoader does.)

`Degrader` draws the release's training degradation for one image, deterministically from
(seed, epoch, index): a name uniform over its list (default: "clean" + the 15), a severity with
p = (0.05, 0.25, 0.40, 0.25, 0.05), and a short side uniform in [max(size/4, 32), size) that the image is
resized to (bicubic) before the corruption and back from after it. `degrade_folder` writes a degraded copy
of a folder of images (the `unirestore degrade` command).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.io import (
    BadFileWarning,
    DataError,
    UnreadableImage,
    list_images,
    load_rgb_array,
    report_bad_file,
    save_png,
)
from .files import atomic_write

# The 15 ImageNet-C corruptions, in the benchmark's order.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
# The training mix of the release: drawn uniformly among these 16.
TRAIN_CORRUPTIONS: tuple[str, ...] = ("clean", *CORRUPTIONS)
# Synthesisers for the unseen-degradation benchmarks (rain, haze, snow, motion blur, noise).
SYNTHETIC: tuple[str, ...] = ("rain", "haze", "snow_synth", "motion", "noise15", "noise25", "noise50")
# Words that stand for several names, alike in `--corruption` and in a data config's `corruptions`; besides
# these, "all" is every registered degradation ("clean", ImageNet-C, the synthesisers, a plugin's).
CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {"imagenet_c": CORRUPTIONS}
# P(severity = 1..5) in the release.
SEVERITY_PROBS: tuple[float, ...] = (0.05, 0.25, 0.40, 0.25, 0.05)
# imagecorruptions refuses images under 32 x 32.
MIN_SIDE = 32

DegradeFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
DEGRADATIONS: dict[str, DegradeFn] = {}


def register_degradation(name: str) -> Callable[[DegradeFn], DegradeFn]:
    """Register `fn(image_uint8_hwc, severity, rng) -> image_uint8_hwc` under `name` (a duplicate raises)."""

    def decorator(fn: DegradeFn) -> DegradeFn:
        if name in DEGRADATIONS:
            raise ValueError(f"degradation {name!r} is already registered")
        if name == "all" or name in CORRUPTION_GROUPS:
            raise ValueError(f"{name!r} names a group of degradations; register this one under another name")
        DEGRADATIONS[name] = fn
        return fn

    return decorator


def get_degradation(name: str) -> DegradeFn:
    """The registered function for `name`; an unknown name raises `ValueError` listing the known ones."""
    try:
        return DEGRADATIONS[name]
    except KeyError:
        raise ValueError(f"unknown degradation {name!r}; known: {', '.join(DEGRADATIONS)}") from None


# --------------------------------------------------------------------------------------------------
# ImageNet-C through imagecorruptions, and "clean"


@register_degradation("clean")
def clean(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return image.copy()


# Only these two take `seed=`; the others read numpy's global state.
_SEEDED = frozenset({"impulse_noise", "glass_blur"})


def _imagenet_c(name: str) -> DegradeFn:
    def corrupt(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        from imagecorruptions import corrupt as corrupt_image  # 0.5 s import (numba): only when used

        seed = int(rng.integers(2**31))
        height, width = image.shape[:2]
        small = min(height, width) < MIN_SIDE
        if small:  # the library needs 32 x 32: work on an upscaled copy
            scale = MIN_SIDE / min(height, width)
            image = _resize(image, math.ceil(height * scale), math.ceil(width * scale))
        kwargs = {"seed": seed} if name in _SEEDED else {}
        state = np.random.get_state()
        np.random.seed(seed)  # the per-call context: this call's draws depend on `rng` alone
        try:
            out = corrupt_image(image, corruption_name=name, severity=severity, **kwargs)
        finally:
            np.random.set_state(state)
        return _resize(out, height, width) if small else out

    corrupt.__name__ = name
    corrupt.__doc__ = f"ImageNet-C {name} (imagecorruptions), seeded from `rng`."
    return corrupt


for _name in CORRUPTIONS:
    register_degradation(_name)(_imagenet_c(_name))


# --------------------------------------------------------------------------------------------------
# Synthesisers for the unseen benchmarks (float work in [0, 1], uint8 in and out)


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an (H, W, 3) uint8 image (PIL, antialiased when shrinking)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int = 4) -> np.ndarray:
    """A smooth random (H, W) field in [0, 1]: a `cells` x `cells` grid of uniforms, upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    field_ = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(field_), 0.0, 1.0)


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """A (k, k) kernel holding a 1-pixel line of `length` through its centre; angle in degrees from vertical."""
    size = length if length % 2 else length + 1
    kernel = np.zeros((size, size), np.float32)
    centre = size // 2
    radians = math.radians(angle)
    steps = np.linspace(-(length - 1) / 2, (length - 1) / 2, 2 * length)
    rows = np.clip(np.round(centre + steps * math.cos(radians)).astype(int), 0, size - 1)
    cols = np.clip(np.round(centre + steps * math.sin(radians)).astype(int), 0, size - 1)
    kernel[rows, cols] = 1.0
    return kernel


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'Same'-size convolution of an (H, W) or (H, W, C) float image, reflect-padded (FFT)."""
    from scipy.signal import fftconvolve

    pad = kernel.shape[0] // 2
    widths = [(pad, pad), (pad, pad)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, widths, mode="reflect" if min(image.shape[:2]) > pad else "edge")
    kernel = kernel if image.ndim == 2 else kernel[:, :, None]
    out = fftconvolve(padded, kernel, mode="same", axes=(0, 1))
    return out[pad : pad + image.shape[0], pad : pad + image.shape[1]].astype(np.float32)


@register_degradation("rain")
def rain(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks: sparse drops smeared along one near-vertical direction, screen-blended (brighten)."""
    x = _to_float(image)
    height, width = x.shape[:2]
    short = min(height, width)
    density = (0.003, 0.005, 0.008, 0.011, 0.015)[severity - 1]
    length = max(3, round(short * (0.04, 0.06, 0.08, 0.10, 0.12)[severity - 1]))
    opacity = (0.35, 0.4, 0.45, 0.5, 0.55)[severity - 1]
    angle = rng.uniform(-20.0, 20.0)
    drops = (rng.random((height, width)) < density) * rng.uniform(0.6, 1.0, (height, width))
    streaks = _convolve(drops.astype(np.float32), _line_kernel(length, angle))
    streaks = np.clip(streaks, 0.0, 1.0) * opacity
    out = 1.0 - (1.0 - x) * (1.0 - streaks[:, :, None])
    return _to_uint8(out)


@register_degradation("haze")
def haze(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), with a depth proxy d in [0.1, 1].

    The proxy: far at the top of the frame (a slightly tilted vertical ramp) mixed with a smooth random
    field, as no depth map exists for an arbitrary image. beta grows with severity; A is a bright,
    slightly tinted airlight.
    """
    x = _to_float(image)
    height, width = x.shape[:2]
    beta = (0.6, 1.0, 1.5, 2.0, 2.6)[severity - 1] * rng.uniform(0.9, 1.1)
    airlight = np.clip(rng.uniform(0.75, 0.95) + rng.uniform(-0.03, 0.03, 3), 0.0, 1.0).astype(np.float32)
    tilt = rng.uniform(-0.3, 0.3)
    rows = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None]  # 1 = top = far
    cols = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    ramp = np.clip(rows + tilt * cols, 0.0, 1.0)
    depth = 0.1 + 0.9 * (0.7 * ramp + 0.3 * _smooth_field(rng, height, width))
    transmission = np.exp(-beta * depth)[:, :, None]
    out = x * transmission + airlight * (1.0 - transmission)
    return _to_uint8(out)


@register_degradation("snow_synth")
def snow_synth(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Falling snow: a whitish veil plus two layers of soft flakes (small far ones, larger near ones)."""
    from scipy.ndimage import gaussian_filter

    x = _to_float(image)
    height, width = x.shape[:2]
    short = min(height, width)
    veil = (0.05, 0.1, 0.15, 0.2, 0.25)[severity - 1]
    x = x * (1.0 - veil) + veil * 0.9
    fall = rng.uniform(-30.0, 30.0)
    for density, radius in (
        ((0.002, 0.003, 0.005, 0.007, 0.009)[severity - 1], 0.003),  # far: many small flakes
        ((0.0004, 0.0007, 0.001, 0.0014, 0.0018)[severity - 1], 0.007),  # near: few large ones
    ):
        sigma = max(0.5, radius * short * rng.uniform(0.8, 1.2))
        flakes = (rng.random((height, width)) < density).astype(np.float32)
        flakes = gaussian_filter(flakes, sigma) * (2.0 * math.pi * sigma**2)  # each flake peaks at ~1
        streak = max(1, round(sigma * 2))
        if streak > 1:  # falling flakes smear a little along their path
            kernel = _line_kernel(streak, fall)
            flakes = _convolve(flakes, kernel / kernel.sum())
        alpha = np.clip(flakes * 1.5, 0.0, 1.0)[:, :, None]
        x = x * (1.0 - alpha) + alpha
    return _to_uint8(x)


def _shake_kernel(length: int, rng: np.random.Generator) -> np.ndarray:
    """A camera-shake kernel: a smooth random trajectory of about `length` pixels, normalised to sum 1."""
    steps = 8 * length
    heading = rng.uniform(0.0, 2.0 * math.pi) + np.cumsum(rng.normal(0.0, 0.08, steps))
    path = np.cumsum(np.stack([np.sin(heading), np.cos(heading)], axis=1) * (length / steps), axis=0)
    path -= (path.max(axis=0) + path.min(axis=0)) / 2.0  # centre the trajectory in the kernel
    size = 2 * (int(np.abs(path).max()) + 1) + 1
    kernel = np.zeros((size, size), np.float32)
    rows, cols = path[:, 0] + size // 2, path[:, 1] + size // 2
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    for dr, dc, weight in (
        (0, 0, (1 - fr) * (1 - fc)),
        (1, 0, fr * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 1, fr * fc),
    ):
        np.add.at(kernel, (np.clip(r0 + dr, 0, size - 1), np.clip(c0 + dc, 0, size - 1)), weight)
    return kernel / kernel.sum()


@register_degradation("motion")
def motion(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Camera-shake motion blur along a random smooth trajectory (GoPro-like), length grows with severity."""
    x = _to_float(image)
    short = min(x.shape[:2])
    length = max(3, round(short * (0.015, 0.025, 0.04, 0.055, 0.07)[severity - 1]))
    return _to_uint8(_convolve(x, _shake_kernel(length, rng)))


def _gaussian_noise(sigma: float) -> DegradeFn:
    def noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        return _to_uint8(_to_float(image) + rng.normal(0.0, sigma / 255.0, image.shape).astype(np.float32))

    noise.__doc__ = f"Additive white Gaussian noise, sigma = {sigma:g} / 255 (the severity is ignored)."
    return noise


for _sigma in (15, 25, 50):
    register_degradation(f"noise{_sigma}")(_gaussian_noise(_sigma))


def apply_degradation(image: np.ndarray, name: str, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Apply degradation `name` at `severity` to an (H, W, 3) uint8 image, deterministically from `seed`."""
    fn = get_degradation(name)
    _check_severity(severity)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return fn(image, severity, np.random.default_rng(seed))


def _check_severity(severity: int | None) -> None:
    if severity is not None and severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


# --------------------------------------------------------------------------------------------------
# The release's sampling


@dataclass(frozen=True)
class Degradation:
    """What was drawn for one image (`short_side` is None when the image was not rescaled)."""

    corruption: str
    severity: int
    short_side: int | None
    seed: int


@dataclass(frozen=True)
class DegradedImage:
    """A degraded image and the degradation that made it."""

    image: torch.Tensor | np.ndarray  # same type and shape as the input
    degradation: Degradation


class Degrader:
    """Draws and applies one degradation per image, deterministically from (seed, epoch, index).

    Args:
        corruptions: names to draw from, uniformly (default: "clean" + the 15 ImageNet-C corruptions).
        severity: a fixed severity in 1..5, or None to draw it with `severity_probs`.
        severity_probs: P(severity = 1..5).
        rescale: resize the short side to a random size in [max(side/4, 32), side) before the corruption
            and back after it (the release's low-resolution component); False corrupts at full size.
        seed: the base seed.
    """

    def __init__(
        self,
        corruptions: Sequence[str] = TRAIN_CORRUPTIONS,
        severity: int | None = None,
        severity_probs: Sequence[float] = SEVERITY_PROBS,
        rescale: bool = True,
        seed: int = 0,
    ):
        if isinstance(corruptions, str):
            corruptions = (corruptions,)
        if not corruptions:
            raise ValueError("Degrader needs at least one corruption name")
        for name in corruptions:
            get_degradation(name)
        _check_severity(severity)
        probs = np.asarray(severity_probs, dtype=np.float64)
        if probs.shape != (5,) or (probs < 0).any() or not math.isclose(probs.sum(), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"severity_probs must be 5 non-negative numbers summing to 1, got {severity_probs}"
            )
        self.corruptions = tuple(corruptions)
        self.severity = severity
        self.severity_probs = tuple(float(p) for p in probs / probs.sum())
        self.rescale = rescale
        self.seed = seed

    def __repr__(self) -> str:
        return (
            f"Degrader(corruptions={list(self.corruptions)}, severity={self.severity}, "
            f"rescale={self.rescale}, seed={self.seed})"
        )

    def draw(self, index: int, short_side: int, epoch: int = 0) -> Degradation:
        """The degradation for image `index` (of short side `short_side`) in `epoch`."""
        rng = np.random.default_rng([self.seed, epoch, index])
        # every value is drawn every time, in this order, so fixing one never shifts the others
        name = self.corruptions[int(rng.integers(len(self.corruptions)))]
        severity = 1 + int(rng.choice(5, p=self.severity_probs))
        low = max(math.ceil(short_side / 4), MIN_SIDE)
        target = int(rng.integers(low, short_side)) if low < short_side else max(short_side, MIN_SIDE)
        seed = int(rng.integers(2**31))
        return Degradation(
            corruption=name,
            severity=self.severity or severity,
            short_side=target if self.rescale else None,
            seed=seed,
        )

    def apply(self, image: np.ndarray, degradation: Degradation) -> np.ndarray:
        """Apply a drawn degradation to an (H, W, 3) uint8 image."""
        height, width = image.shape[:2]
        work = image
        if degradation.short_side is not None and degradation.short_side != min(height, width):
            scale = degradation.short_side / min(height, width)
            work = _resize(image, max(1, round(height * scale)), max(1, round(width * scale)))
        fn = get_degradation(degradation.corruption)
        out = fn(work, degradation.severity, np.random.default_rng(degradation.seed))
        return _resize(out, height, width)

    def __call__(self, image: torch.Tensor | np.ndarray, index: int, epoch: int = 0) -> DegradedImage:
        """Degrade a (3, H, W) float tensor in [0, 1] or an (H, W, 3) uint8 array (same type back)."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
            array = (
                (image.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            )
        else:
            array = image
        degradation = self.draw(index, min(array.shape[:2]), epoch)
        out = self.apply(np.ascontiguousarray(array), degradation)
        if isinstance(image, torch.Tensor):
            out = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).to(image.dtype) / 255.0
        return DegradedImage(image=out, degradation=degradation)


# --------------------------------------------------------------------------------------------------
# A degraded copy of a folder


@dataclass
class DegradeReport:
    """What `degrade_folder` did."""

    src: Path
    dst: Path
    corruptions: tuple[str, ...]
    written: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (source file, reason)
    seconds: float = 0.0
    manifest: Path | None = None  # CSV: output, source, corruption, severity, short_side


def parse_corruptions(corruption: str | Sequence[str]) -> tuple[str, ...]:
    """The degradation names that a comma-separated string or a list of words stands for, in order, each once.

    A word is a registered name, "all" (every registered degradation) or a group of `CORRUPTION_GROUPS`
    ("imagenet_c": the 15 ImageNet-C corruptions; the release's training mix is "clean,imagenet_c"). The same
    words mean the same names in `unirestore degrade` / `eval --corruption` and in a data config. An unknown
    word raises ValueError listing the known ones.
    """
    items = [corruption] if isinstance(corruption, str) else corruption
    words = [word for item in items for word in str(item).split(",")]
    groups = ", ".join(["all", *CORRUPTION_GROUPS])
    names: list[str] = []
    for word in (word.strip() for word in words):
        if word == "all":
            names += DEGRADATIONS
        elif word in CORRUPTION_GROUPS:
            names += CORRUPTION_GROUPS[word]
        elif word:
            if word not in DEGRADATIONS:
                raise ValueError(f"unknown degradation {word!r}; known: {', '.join(DEGRADATIONS)} (or {groups})")
            names.append(word)
    if not names:
        raise ValueError(f"no degradation named in {corruption!r}; known: {groups}, {', '.join(DEGRADATIONS)}")
    return tuple(dict.fromkeys(names))


def _path_index(relative: str) -> int:
    """A stable 64-bit index for a relative path: adding files to a folder leaves the others' draws as they were."""
    return int.from_bytes(hashlib.blake2b(relative.encode("utf-8"), digest_size=8).digest(), "little")


@lru_cache(maxsize=64)
def _degrader(name: str, severity: int | None, rescale: bool, seed: int) -> Degrader:
    return Degrader(corruptions=(name,), severity=severity, rescale=rescale, seed=seed)


def _degrade_file(job: tuple) -> tuple[list[tuple], str | None]:
    """Degrade one file with every name (in a worker process, or in this one): its manifest rows, or why it
    was skipped."""
    path, relative, target, dst, names, split, severity, rescale, seed = job
    try:
        image = load_rgb_array(path)
    except UnreadableImage as error:
        report_bad_file(error)
        return [], error.reason
    rows = []
    index = _path_index(relative)
    for name in names:
        result = _degrader(name, severity, rescale, seed)(image, index)
        output = (Path(name) / target) if split else target
        save_png(result.image, dst / output)
        drawn = result.degradation
        rows.append((output.as_posix(), relative, name, drawn.severity, drawn.short_side))
    return rows, None


def degrade_folder(
    src: Path,
    dst: Path,
    corruption: str = "all",
    severity: int | None = None,
    seed: int = 0,
    rescale: bool = True,
    progress: bool = True,
    workers: int = 1,
) -> DegradeReport:
    """Write a degraded PNG copy of every image under `src` to `dst`, keeping relative paths.

    `corruption` is one name (written straight into `dst`) or several, as `parse_corruptions` reads them ("all":
    every registered degradation, "imagenet_c", a comma-separated list), one sub-folder of `dst` each. `severity` None draws it per image
    with the release's probabilities. Each image's draw depends on (seed, its relative path) only, so
    `workers` processes write the same files as one. Files that cannot be decoded are warned about once,
    listed in the report and skipped. `dst/manifest.csv` records what each output got.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    names = parse_corruptions(corruption)
    _check_severity(severity)
    if workers < 1:
        raise ValueError(f"--workers {workers}: give at least 1 process")
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed {seed}: give a seed from 0 to 2**63 - 1")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"{dst}: the output folder must not be {src} or inside it; choose another folder")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: a file, not a folder; give DST a folder for the degraded copies")
    split = len(names) > 1
    root = src.resolve()
    outputs = {folder: folder.resolve() for folder in ([dst / name for name in names] if split else [dst])}
    for folder, resolved in outputs.items():  # where the copies go
        if resolved.is_relative_to(root):
            raise ValueError(
                f"{folder}: the copies degraded by '{folder.name}' would be written into {src}, over the clean "
                "images; choose a DST that does not hold the source folder under a degradation's name"
            )
    files = list_images(src)
    if not files:
        raise DataError(
            f"{src}: no image files found (looked for {', '.join(sorted({'.png', '.jpg', '.jpeg'}))}, ...)"
        )
    for resolved in outputs.values():
        if not root.is_relative_to(resolved):
            continue
        # an output folder holding SRC: refused if a copy would replace a source image, before any write
        sources = {root / path.relative_to(src) for path in files}
        for path in files:
            target = resolved / path.relative_to(src).with_suffix(".png")
            if target in sources:
                raise ValueError(f"{target}: a degraded copy would replace this source image; choose another DST")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{dst}: cannot create this folder ({error.strerror or error}); give a DST you can write to") from None
    report = DegradeReport(src=src, dst=dst, corruptions=names)
    candidates: dict[Path, list[Path]] = {}  # output name -> the files that would write it (a.jpg, a.png)
    for path in files:
        candidates.setdefault(path.relative_to(src).with_suffix(".png"), []).append(path)

    def job(path: Path) -> tuple:
        relative = path.relative_to(src).as_posix()
        return (path, relative, Path(relative).with_suffix(".png"), dst, names, split, severity, rescale, seed)

    rows: list[tuple[str, str, str, int, int | None]] = []
    failed: set[Path] = set()  # output names whose first file was unreadable: the next one may write it

    def record(path: Path, target: Path, file_rows: list, reason: str | None) -> None:
        if reason is not None:
            report.skipped.append((path, reason))
            failed.add(target)
        else:
            rows.extend(file_rows)
            report.written += 1

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .console import make_console

    columns = (TextColumn("degrading"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(Progress(*columns, disable=not progress, console=make_console(stderr=True)))
        task = bar.add_task("degrade", total=len(files) * len(names))
        firsts = [job(paths[0]) for paths in candidates.values()]
        if workers > 1 and len(firsts) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent may hold torch's thread pools
            pool = ProcessPoolExecutor(min(workers, len(firsts)), mp_context=multiprocessing.get_context("spawn"))
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # Ctrl-C: the queued files are dropped
            with _interrupts_left_to_this_process():  # the workers start (and stay) deaf to Ctrl-C
                results = pool.map(_degrade_file, firsts, chunksize=max(1, min(16, len(firsts) // (4 * workers))))
        else:
            results = map(_degrade_file, firsts)
        for first, (file_rows, reason) in zip(firsts, results, strict=True):  # in file order, whatever the workers
            record(first[0], first[2], file_rows, reason)
            bar.advance(task, len(names))
        for target, paths in candidates.items():  # the other files of an output name, in this process
            done = target not in failed
            for path in paths[1:]:
                if done:
                    report.skipped.append((path, f"another file already wrote {target}"))
                else:
                    file_rows, reason = _degrade_file(job(path))
                    record(path, target, file_rows, reason)
                    done = reason is None
                bar.advance(task, len(names))
    if rows:
        report.manifest = dst / "manifest.csv"

        def write(temporary):
            with open(temporary, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(("output", "source", "corruption", "severity", "short_side"))
                writer.writerows(rows)

        atomic_write(report.manifest, write)
    report.seconds = time.perf_counter() - started
    return report


@contextlib.contextmanager
def _interrupts_left_to_this_process():
    """Ignore Ctrl-C while worker processes start: they inherit it (Python keeps an ignored SIGINT ignored),
    so a terminal's Ctrl-C, sent to the whole process group, reaches this process alone and stops the run in
    one line, instead of a traceback from each worker."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def degrade_command(
    src: Path,
    dst: Path,
    corruption: str = "all",
    severity: int | None = None,
    seed: int = 0,
    rescale: bool = True,
    workers: int = 1,
) -> DegradeReport:
    """Body of `unirestore degrade SRC DST [--corruption WORDS] [--severity 1-5] [--seed S] [--workers N]`
    (WORDS as `parse_corruptions` reads them).

    Bad arguments and a missing source folder raise `DataError` (one line, exit code 2, from the CLI); a
    folder without any readable image exits 1.
    """
    import typer
    from rich.markup import escape

    from .console import make_console

    try:
        parse_corruptions(corruption)
    except ValueError as error:
        raise DataError(f"--corruption: {error}") from None
    try:
        _check_severity(severity)
    except ValueError as error:
        raise DataError(f"--severity: {error}") from None
    console = make_console(stderr=True)
    try:
        with warnings.catch_warnings():  # skipped files are listed below, once, without a code line
            warnings.simplefilter("ignore", BadFileWarning)
            report = degrade_folder(src, dst, corruption, severity, seed, rescale, workers=workers)
    except DataError:
        raise
    except ValueError as error:
        raise DataError(str(error)) from None
    for path, reason in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {escape(str(path))}: {escape(reason)}")
    console.print(
        f"wrote {report.written} image(s) x {len(report.corruptions)} degradation(s) to {report.dst} "
        f"in {report.seconds:.1f} s; {len(report.skipped)} skipped"
    )
    if report.written == 0:
        raise typer.Exit(1)
    return report
