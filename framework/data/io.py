"""Reading images and label maps from disk, and reporting the ones that cannot be read.

A leaf module (PIL, numpy, torch only), so `framework/degrade.py` may use it too.

Every image comes back as RGB float32 in [0, 1], whatever its mode on disk: grayscale (L, I;16, I, F),
RGBA / LA (composited on white), palette (P, with or without transparency), CMYK. EXIF orientation is
applied first. A file that cannot be decoded raises `UnreadableImage` (a `DataError`); datasets catch it,
report the file once with `report_bad_file` and use another sample in its place.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..files import atomic_write

# Lower-case suffixes of the files listed as images; everything else in a folder is ignored.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
)


class DataError(ValueError):
    """A dataset or file is unusable. The message names the file or folder, the problem and the fix."""


class UnreadableImage(DataError):
    """One image file cannot be decoded (corrupt, truncated, empty, not an image). Datasets skip these."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}; replace or delete the file")


class BadFileWarning(UserWarning):
    """An unreadable file was skipped (one warning per file and process)."""


_reported: set[str] = set()
_skipped: list[tuple[str, str]] = []  # every skip in this process, in order: (path, reason)


def report_bad_file(error: UnreadableImage) -> None:
    """Note that the file of `error` is skipped (`skipped_since` lists it) and warn of it once per process."""
    _skipped.append((error.path, error.reason))
    if error.path in _reported:
        return
    _reported.add(error.path)
    warnings.warn(f"skipping unreadable file {error.path}: {error.reason}", BadFileWarning, stacklevel=3)


def skip_mark() -> int:
    """A mark in this process's log of skipped files, for `skipped_since`."""
    return len(_skipped)


def skipped_since(mark: int) -> list[tuple[str, str]]:
    """(path, reason) of every file skipped in this process since `mark`, warned of or not."""
    return _skipped[mark:]


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under `root` (by suffix, case-insensitive), sorted; hidden files and folders skipped.

    Raises `DataError` when `root` is not a folder. An empty result is returned as is: the caller decides
    whether that is an error (it knows what it expected to find).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; check the path (it must exist and hold the images)")
    found: list[Path] = []
    stack = [root]
    seen = {_identity(root)}  # folders already listed: a link back up (`self -> .`) is not followed again
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    if recursive and _identity(entry.path) not in seen:
                        seen.add(_identity(entry.path))
                        stack.append(Path(entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(Path(entry.path))
    return sorted(found)


def _identity(folder: str | os.PathLike) -> tuple[int, int]:
    status = os.stat(folder)
    return status.st_dev, status.st_ino


def _open(path: Path) -> Image.Image:
    """Open and fully decode `path`, EXIF orientation applied; `UnreadableImage` on any decoding failure."""
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a worker
            image = ImageOps.exif_transpose(image)
            image.load()
            return image
    except UnreadableImage:
        raise
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found; check the dataset path") from error
    except UnidentifiedImageError as error:
        raise UnreadableImage(path, "not an image PIL can read") from error
    except Image.DecompressionBombError as error:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise UnreadableImage(
            path, f"{_pixels(error)} over the {limit:.3g} MP that PIL decodes (its guard against decompression "
            "bombs); split it into parts, or downscale it"
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnreadableImage(path, f"cannot decode ({reason})") from error


def _pixels(error: Exception) -> str:
    """"400 MP" from PIL's "Image size (400000000 pixels) exceeds limit ..."."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found.group(1)) / 1e6:.3g} MP," if found else "too many pixels,"


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from any PIL mode."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            array = array / 65535.0
        elif mode == "I":
            # 32-bit integer images hold 16-bit data in practice: PIL opens 16-bit PGMs (scaled to 65535) and
            # signed 16-bit TIFFs as "I". The scale follows the bit depth, not the content (a dark image stays
            # dark); only data beyond 16 bits is scaled by its own maximum.
            array = array / max(65535.0, array.max(initial=0))
        else:
            array = array / (array.max(initial=0) if array.max(initial=0) > 1 else 1.0)
        gray = np.clip(array, 0, 1).astype(np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[:, :, 3:4]
        # composite on white: transparent regions read as a white page, not as black
        return rgba[:, :, :3] * alpha + (1.0 - alpha)
    if mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(image, dtype=np.float32) / 255.0


def load_rgb_array(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as (H, W, 3) uint8 RGB (16-bit data rounded to 8 bits)."""
    array = _to_rgb_array(_open(Path(path)))
    return np.round(array * 255.0).astype(np.uint8)


def load_rgb(path: str | os.PathLike) -> torch.Tensor:
    """The image at `path` as a (3, H, W) float32 tensor in [0, 1], RGB, EXIF orientation applied.

    Raises `UnreadableImage` (a `DataError`) when the file cannot be decoded.
    """
    return _chw(_to_rgb_array(_open(Path(path))))


def _chw(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) → a (C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def load_rgb_alpha(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`load_rgb`'s (3, H, W) image (transparent parts on white) and, for an image with transparency, its
    (1, H, W) alpha in [0, 1] (None where every pixel is opaque), from one decode."""
    image = _open(Path(path))
    alpha = None
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        values = np.asarray(image.convert("RGBA"), dtype=np.float32)[:, :, 3] / 255.0
        if (values < 1.0).any():
            alpha = _chw(values[:, :, None])
    return _chw(_to_rgb_array(image)), alpha


def load_label_map(path: str | os.PathLike) -> np.ndarray:
    """A single-channel label image (L, P, I;16, I) as an (H, W) int64 array of its raw values.

    A missing or unreadable label file is an error (never skipped): the labels would silently be wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file missing; restore it or remove its image from the dataset")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGB", "RGBA"):
                raise DataError(
                    f"{path}: label map is {image.mode}, expected one channel of class ids "
                    "(use the *_labelIds / *_labelTrainIds file, not the colour one)"
                )
            return np.asarray(image).astype(np.int64)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot decode label map ({error}); replace the file") from error


def check_same_size(
    image: torch.Tensor, mask: np.ndarray | torch.Tensor, mask_path: str | os.PathLike
) -> None:
    """Raise `DataError` naming `mask_path` unless the (H, W) mask matches the (3, H, W) image."""
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise DataError(
            f"{mask_path}: label map is {tuple(mask.shape)} (H, W) but its image is "
            f"{tuple(image.shape[-2:])}; the label belongs to another image or was resized"
        )


def save_png(image: torch.Tensor | np.ndarray, path: str | os.PathLike, text: dict[str, str] | None = None) -> None:
    """Write a (C, H, W) float tensor in [0, 1] or an (H, W, C) uint8 array as an 8-bit PNG: 3 channels RGB,
    4 RGBA, 1 grayscale, 2 grayscale with alpha; `text`, if given, as the PNG's text chunks."""
    if isinstance(image, torch.Tensor):
        array = (image.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    else:
        array = image
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    image = Image.fromarray(np.ascontiguousarray(array))  # (H, W): L, 2 channels: LA, 3: RGB, 4: RGBA
    options = {}
    if text:
        from PIL.PngImagePlugin import PngInfo

        options["pnginfo"] = PngInfo()
        for key, value in text.items():
            options["pnginfo"].add_text(key, value)
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG", **options))  # never half a PNG
