"""Bad input: unreadable files skipped with one warning each, an all-bad folder fails clearly, every image
mode becomes RGB, EXIF orientation is honoured, label problems are errors naming the file."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unirestore.framework.data.adapters import Cityscapes, HQFolder
from unirestore.framework.data.io import BadFileWarning, DataError, UnreadableImage, list_images, load_rgb
from unirestore.framework.data.sample import collate


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_bad_files(folder):
    """One of each kind of bad file, all with image suffixes."""
    good = _png_bytes(np.full((40, 40, 3), 200, np.uint8))
    (folder / "b_empty.png").write_bytes(b"")
    (folder / "d_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "f_garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg" * 10)
    (folder / "h_text.png").write_text("hello, I am text")
    return ["b_empty.png", "d_truncated.png", "f_garbage.jpg", "h_text.png"]


def test_bad_files_are_skipped_with_one_warning_each_and_batches_stay_whole(tmp_path):
    for name in ("a", "c", "e", "g"):
        Image.fromarray(np.full((40, 40, 3), ord(name), np.uint8)).save(tmp_path / f"{name}.png")
    bad = _write_bad_files(tmp_path)
    (tmp_path / "readme.txt").write_text("not listed: no image suffix")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = HQFolder(tmp_path, split="train", size=32)
        batch = collate([dataset[i] for i in range(len(dataset))])
        again = collate([dataset[i] for i in range(len(dataset))])  # a second pass warns no more
    reported = [str(w.message) for w in caught if issubclass(w.category, BadFileWarning)]
    assert len(dataset) == 8 and batch["hq"].shape == (8, 3, 32, 32)
    assert sorted(m.split("file ")[1].split(":")[0].rsplit("/", 1)[1] for m in reported) == bad
    # in training a bad index is replaced by the next readable sample, deterministically
    names = [p.rsplit("/", 1)[1] for p in batch["path"]]
    assert names == ["a.png", "c.png", "c.png", "e.png", "e.png", "g.png", "g.png", "a.png"]
    assert batch["path"] == again["path"] and torch.equal(batch["hq"], again["hq"])
    # a held-out image is not replaced (it would be scored twice): its index raises, for the caller to skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        held_out = HQFolder(tmp_path, split="val", size=32)
        kept = []
        for i in range(len(held_out)):
            try:
                kept.append(held_out[i]["path"].rsplit("/", 1)[1])
            except UnreadableImage:
                continue
    assert kept == ["a.png", "c.png", "e.png", "g.png"]


def test_bad_files_in_dataloader_workers(tmp_path):
    for name in ("a", "c"):
        Image.fromarray(np.full((40, 40, 3), ord(name), np.uint8)).save(tmp_path / f"{name}.png")
    _write_bad_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = HQFolder(tmp_path, split="train", size=32)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["path"]) for b in batches) == len(dataset) == 6


def test_an_all_bad_folder_fails_at_start_naming_the_folder(tmp_path):
    _write_bad_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=rf"{tmp_path}: none of the 4 image file\(s\) can be read"):
            HQFolder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"{empty}: no samples found"):
        HQFolder(empty)
    with pytest.raises(DataError, match="not a folder"):
        HQFolder(tmp_path / "missing")


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("L", (0.4, 0.4, 0.4)),
        ("RGBA", (1.0, 0.5, 0.5)),  # red at alpha 0.5 on white
        ("P", (0.0, 0.0, 1.0)),
        ("CMYK", (0.0, 1.0, 1.0)),  # full cyan
        ("I;16", (0.5, 0.5, 0.5)),
        ("LA", (0.7, 0.7, 0.7)),  # black at alpha 0.3 on white
    ],
)
def test_image_modes_become_rgb(tmp_path, mode, expected):
    if mode == "L":
        image = Image.fromarray(np.full((8, 10), 102, np.uint8))
    elif mode == "RGBA":
        image = Image.fromarray(np.tile(np.array([255, 0, 0, 128], np.uint8), (8, 10, 1)))
    elif mode == "P":
        image = Image.fromarray(np.full((8, 10, 3), (0, 0, 255), np.uint8)).convert("P")
    elif mode == "CMYK":
        image = Image.new("CMYK", (10, 8), (255, 0, 0, 0))  # full cyan
    elif mode == "I;16":
        image = Image.fromarray(np.full((8, 10), 32768, np.uint16))
    else:
        image = Image.fromarray(np.tile(np.array([0, 77], np.uint8), (8, 10, 1)), mode="LA")
    suffix = ".tif" if mode == "CMYK" else ".png"
    path = tmp_path / f"x{suffix}"
    image.save(path)
    with Image.open(path) as check:
        assert check.mode.startswith(mode[:2])
    rgb = load_rgb(path)
    assert rgb.shape == (3, 8, 10) and rgb.dtype == torch.float32
    assert torch.allclose(rgb[:, 0, 0], torch.tensor(expected), atol=0.01)


def test_a_dark_16_bit_pgm_stays_dark(tmp_path):
    """PIL opens a 16-bit PGM as 32-bit "I": its scale is the bit depth, whatever the brightest pixel."""
    path = tmp_path / "dark.pgm"
    values = np.array([[0, 100], [200, 255]], ">u2")
    path.write_bytes(b"P5 2 2 65535\n" + values.tobytes())
    with Image.open(path) as check:
        assert check.mode == "I"
    torch.testing.assert_close(load_rgb(path)[0], torch.from_numpy(values.astype(np.float32) / 65535))


def test_exif_orientation_is_honoured(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)  # wide; left half white
    array[:, :20] = 255
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    rgb = load_rgb(tmp_path / "rotated.jpg")
    assert rgb.shape == (3, 40, 20)  # now tall
    assert rgb[:, :18].mean() > 0.9 and rgb[:, 22:].mean() < 0.1  # the white half is on top


def test_list_images_skips_hidden_and_non_images(tmp_path):
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "a.png").write_bytes(b"")
    (tmp_path / "._b.jpg").write_bytes(b"")
    (tmp_path / "c.PNG").write_bytes(b"")
    (tmp_path / "d.txt").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["c.PNG"]
    with pytest.raises(UnreadableImage, match="empty file"):
        load_rgb(tmp_path / "c.PNG")


def test_list_images_follows_folder_links_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    (tmp_path / "self").symlink_to(".")  # a loop
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes(b"")
    (tmp_path / "sub" / "link").symlink_to(tmp_path / "elsewhere")  # a linked folder is still listed
    names = sorted(p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path))
    assert len(names) == 2 and "sub/a.png" in names and names[0].endswith("b.png"), names


def test_an_image_over_pils_pixel_limit_is_unreadable_not_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 2000 pixels is over twice the limit: refused
    with pytest.raises(UnreadableImage, match=r"huge.png: 0.002 MP, over the 0.001 MP that PIL decodes"):
        load_rgb(path)


def test_a_file_name_near_the_length_limit_is_written(tmp_path):
    from unirestore.framework.data.io import save_png

    path = tmp_path / ("L" * 251 + ".png")  # 255 bytes: the longest name a file system takes
    save_png(torch.zeros(3, 4, 4), path)
    assert load_rgb(path).shape == (3, 4, 4)


def test_missing_label_and_wrong_mask_size_are_errors_naming_the_file(tmp_path):
    image_dir = tmp_path / "leftImg8bit" / "val" / "ulm"
    label_dir = tmp_path / "gtFine" / "val" / "ulm"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(image_dir / "ulm_000000_000001_leftImg8bit.png")
    with pytest.raises(DataError, match="ulm_000000_000001_gtFine_labelIds.png: label file missing"):
        Cityscapes(tmp_path, split="val")
    Image.fromarray(np.zeros((8, 32), np.uint8)).save(label_dir / "ulm_000000_000001_gtFine_labelIds.png")
    with pytest.raises(DataError, match=r"labelIds.png: label map is \(8, 32\)"):
        Cityscapes(tmp_path, split="val")


def test_save_png_never_leaves_half_a_file(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from unirestore.framework.data.io import save_png

    target = tmp_path / "out" / "x.png"
    save_png(torch.full((3, 8, 8), 0.5), target)
    before = target.read_bytes()

    def dies_mid_write(self, fp, *args, **kwargs):
        with open(fp, "wb") as stream:
            stream.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space"):
        save_png(torch.zeros(3, 8, 8), target)
    assert target.read_bytes() == before  # the earlier file, whole
    assert [p.name for p in target.parent.iterdir()] == ["x.png"]  # no temporary left behind
