"""Restoring files: the work behind `unirestore restore`, usable from Python as well.

`collect_images` turns files and folders into (file, output name) pairs that never overwrite an input or each
other; `restore_files` restores them in same-size batches with every prompt asked for, one encode and
denoise per image, and writes one PNG per task (and optionally the input beside the outputs). An unreadable
file, or an image that does not fit in memory even alone, is reported and skipped; the others finish.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

SIDE_BY_SIDE = "side-by-side"  # the folder under `out` of the input | outputs rows
PROVENANCE = "unirestore"  # the PNG text chunk of an output: what restored it (JSON)


@dataclass
class RestoreReport:
    """What `restore_files` did: images written, and one message per file it skipped."""

    written: int = 0
    skipped: list[str] = field(default_factory=list)


def output_folders(out: Path, tasks: Sequence[str]) -> dict[str, Path]:
    """One task: `out` itself; several: `out/<task>`."""
    return {task: out if len(tasks) == 1 else out / task for task in tasks}


def collect_images(
    inputs: Sequence[Path], out: Path, reserved: Sequence[str] = ()
) -> tuple[list[tuple[Path, Path]], list[str], list[str]]:
    """(file, output name relative to `out`) for every image; problems and renames as messages.

    Files already under `out` are left out (an output folder inside an input folder is not restored again), a
    file given twice (itself and in its folder) is restored once, and no two files get the same output name:
    `a.jpg` beside `a.png`, or `x.png` from two folders, would overwrite each other, so later ones are named
    `a_jpg.png`, then `x-2.png`, ... An input subfolder named as one of `reserved` (folders under `out` that
    hold other outputs, such as the side-by-side rows) is renamed `<name>-input`.
    """
    from .data.io import DataError, list_images

    out = out.resolve()
    found, problems = [], []
    for item in inputs:
        if item.is_dir() and item.resolve().is_relative_to(out):
            problems.append(f"{item}: inside --out {out}; write the restored images to another folder")
            continue
        if item.is_dir():
            try:
                files = list_images(item)
            except DataError as error:
                problems.append(str(error))
                continue
            files = [path for path in files if not path.resolve().is_relative_to(out)]
            if not files:
                problems.append(f"{item}: no image files in this folder")
            found += [(path, path.relative_to(item).with_suffix(".png")) for path in files]
        elif item.is_file():
            found.append((item, Path(item.name).with_suffix(".png")))
        else:
            problems.append(f"{item}: no such file or folder")
    taken: set[Path] = set()
    unique, renamed = [], []
    once: dict[Path, tuple[Path, Path]] = {}
    for path, name in found:
        once.setdefault(path.resolve(), (path, name))  # a file given twice (itself and in its folder): once
    found = list(once.values())
    for path, name in found:
        wanted, reason = name, f"{name} is another input's"
        if len(name.parts) > 1 and name.parts[0] in reserved:
            name, reason = Path(f"{name.parts[0]}-input", *name.parts[1:]), f"{name.parts[0]}/ holds other outputs"
        if name in taken:
            name = name.with_name(f"{name.stem}_{path.suffix[1:].lower()}.png")
        stem, number = name.stem, 2
        while name in taken:
            name, number = name.with_name(f"{stem}-{number}.png"), number + 1
        taken.add(name)
        if (out / name).resolve() == path.resolve():
            problems.append(f"{path}: its output would overwrite it; write the restored images to another folder")
            continue
        if name != wanted:
            renamed.append(f"{path} → {name} ({reason})")
        unique.append((path, name))
    return unique, problems, renamed


def provenance(path: Path) -> dict | None:
    """What restored the PNG at `path` (its `PROVENANCE` text chunk), or None: not a restore's output, or
    no file."""
    import json

    from PIL import Image

    try:
        with Image.open(path) as image:  # the text chunks come before the pixels: nothing is decoded
            text = getattr(image, "text", {}).get(PROVENANCE)
        return json.loads(text) if text else None
    except (OSError, ValueError, SyntaxError):
        return None


def _labels(settings: dict, tasks: Sequence[str], side_by_side: bool) -> dict[str, dict]:
    """The provenance each output of one image carries, by output kind (a task, or the side-by-side row)."""
    labels = {task: {**settings, "task": task} for task in tasks}
    if side_by_side:
        labels[SIDE_BY_SIDE] = {**settings, "task": ",".join(tasks)}
    return labels


def already_restored(
    files: list[tuple[Path, Path]], out: Path, tasks: Sequence[str], side_by_side: bool, settings: dict | None = None
) -> tuple[list, list]:
    """(done, stale): the (file, name) pairs whose every output (each task's, and the side-by-side row if
    asked) is written, with these `settings` (the checkpoint, seed, ...), and those with one written with
    other settings. An image whose outputs are only partly written, with these settings (an interruption
    between them), is in neither: it is restored again, as one never begun; so is one where a file that no
    restore wrote stands in an output's place (`restore_files` then leaves that file alone and says so)."""
    folders = {**output_folders(out, tasks), **({SIDE_BY_SIDE: out / SIDE_BY_SIDE} if side_by_side else {})}
    labels = _labels(settings or {}, tasks, side_by_side)
    done, stale = [], []
    for item in files:
        written = {kind: provenance(folder / item[1]) for kind, folder in folders.items()}
        if all(written[kind] == labels[kind] for kind in folders):
            done.append(item)
        elif any(value is not None and value != labels[kind] for kind, value in written.items()):
            stale.append(item)
    return done, stale


def _restore_group(model, group: list, tasks: list[str], seed: int, **options) -> list[dict[str, torch.Tensor]]:
    """{task: restored image} for each (path, name, image) of `group` (one size), each with the noise it would
    get restored alone (a generator seeded with `seed` per image); one by one, then one task at a time, if the
    batch does not fit."""
    device = next(model.cfrm.parameters()).device
    images = torch.stack([image for _, _, image in group]).to(device)
    generators = [torch.Generator(device=device).manual_seed(seed) for _ in group]
    try:
        restored = model.restore_tasks(images, tasks, generator=generators, **options)
        return [{task: restored[task][i] for task in tasks} for i in range(len(group))]
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(group) == 1 and len(tasks) == 1:
            raise
    if len(group) == 1:  # the decoder's copies per task did not fit: one task at a time
        return [{task: _restore_group(model, group, [task], seed, **options)[0][task] for task in tasks}]
    return [restored for item in group for restored in _restore_group(model, [item], tasks, seed, **options)]


def _read_chunks(files: list[tuple[Path, Path]], batch_size: int, ahead: bool):
    """Lists of (file, name, (3, H, W) image or the DataError reading it, its alpha or None), `batch_size`
    files each; with `ahead`, the next list is read in a thread while the caller works on this one (decoding
    releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from .data.io import DataError, load_rgb_alpha

    def read(chunk):
        items = []
        for path, name in chunk:
            try:
                items.append((path, name, *load_rgb_alpha(path)))  # (3, H, W) in [0, 1], (1, H, W) or None
            except DataError as error:
                items.append((path, name, error, None))
        return items

    chunks = [files[start : start + batch_size] for start in range(0, len(files), batch_size)]
    if not ahead:
        yield from map(read, chunks)
        return
    with ThreadPoolExecutor(max_workers=1) as reader:
        coming = reader.submit(read, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            items = coming.result()
            coming = reader.submit(read, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield items


class _Writer:
    """PNG writes (zlib, which releases the GIL) in `threads` threads beside the restoration, at most a few
    queued (memory); 0 threads writes at once. `close()` waits for them all and raises the first failure."""

    def __init__(self, threads: int):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=threads) if threads else None
        self.pending, self.limit = deque(), 4 * threads

    def write(self, save: Callable, *args) -> None:
        if self.pool is None:
            save(*args)
            return
        self.pending.append(self.pool.submit(save, *args))
        while len(self.pending) > self.limit:
            self.pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)  # whatever else failed, what was restored is written
            while self.pending:
                self.pending.popleft().result()


def restore_files(
    model,
    files: list[tuple[Path, Path]],
    out: Path,
    tasks: Sequence[str] = ("pir",),
    seed: int = 0,
    steps: int | None = None,
    tile_size: int | None = None,
    batch_size: int = 1,
    side_by_side: bool = False,
    advance: Callable[[int], None] = lambda count: None,
    on_skip: Callable[[str], None] = lambda message: None,
    io_threads: int | None = None,
    settings: dict | None = None,
) -> RestoreReport:
    """Restore `files` ((file, output name) pairs, as `collect_images` gives) with each prompt of `tasks`.

    Writes `output_folders(out, tasks)[task] / name` per task, and with `side_by_side` the input beside every
    output in `out/side-by-side/name`; all writes are atomic. Up to `batch_size` same-size images are restored
    together, each with the noise it would get alone. `advance(n)` is called as files are done (a progress bar),
    `on_skip(message)` as one is skipped.
    A grayscale input (its three channels equal) gets a grayscale output; an input with transparency gets its
    alpha back (restored as composited on white, as every input with transparency is read).
    `io_threads` read the next files and write the PNGs while the model restores (default: 2 beside a GPU,
    none on the CPU, whose cores the restoration uses); the files written are the same.
    Every output records what restored it (`settings`, e.g. the checkpoint, and its task) in a PNG text chunk;
    a file in an output's place that does not (a photo of the user's) is never written over.
    """
    from torchvision.transforms.functional import rgb_to_grayscale
    from torchvision.utils import make_grid

    from .data.io import DataError, save_png

    tasks = list(tasks)
    folders = output_folders(out, tasks)
    labels = _labels({**(settings or {}), "seed": seed, "steps": steps, "tile_size": tile_size}, tasks, side_by_side)
    report = RestoreReport()
    if io_threads is None:
        io_threads = 0 if next(model.cfrm.parameters()).device.type == "cpu" else 2

    def skip(message: str) -> None:
        report.skipped.append(message)
        on_skip(message)

    written = threading.Lock()

    def write(path: Path, files: list[tuple[torch.Tensor, Path, dict]]) -> None:
        """An image's outputs; one that cannot be written (a folder in its place, a name too long, a file
        that no restore wrote) skips the image, a full disk stops the run."""
        for image, target, label in files:
            if target.exists() and provenance(target) is None:
                skip(f"{path}: {target} exists and is not a restored image; move it, or give another --out")
                return
            try:
                save_png(image, target, text={PROVENANCE: json.dumps(label, sort_keys=True)})
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                skip(f"{path}: cannot write {target} ({error.strerror or error})")
                return
        with written:
            report.written += 1

    options = {"steps": steps, "tile_size": tile_size}
    writer = _Writer(io_threads)
    try:
        for items in _read_chunks(files, batch_size, ahead=io_threads > 0):
            by_size: dict[tuple, list] = {}
            alphas = {}
            for path, name, image, alpha in items:
                if isinstance(image, DataError):
                    skip(str(image))
                    advance(1)
                else:
                    by_size.setdefault(tuple(image.shape), []).append((path, name, image))
                    alphas[name] = alpha
            for group in by_size.values():
                try:
                    outputs = _restore_group(model, group, tasks, seed, **options)
                except torch.OutOfMemoryError:  # the cache is freed; the other sizes go on
                    height, width = group[0][2].shape[-2:]
                    for path, _, _ in group:
                        skip(f"{path}: out of memory at {width}×{height}; restore it with a smaller --tile-size "
                             f"(now {tile_size})")  # fmt: skip
                    advance(len(group))
                    continue
                for (path, name, image), restored in zip(group, outputs, strict=True):
                    gray = bool((image[0] == image[1]).all() and (image[1] == image[2]).all())
                    restored = {task: output.float().cpu() for task, output in restored.items()}
                    if gray:  # one channel, shown as the input is
                        restored = {task: rgb_to_grayscale(output) for task, output in restored.items()}
                    alpha = [alphas[name]] if alphas[name] is not None else []
                    files = [
                        (torch.cat([output, *alpha]), folders[task] / name, labels[task])
                        for task, output in restored.items()
                    ]
                    if side_by_side:  # input | each task's output, in `tasks` order, 2-pixel white gaps
                        row = torch.stack([image, *(output.expand_as(image) for output in restored.values())])
                        grid = make_grid(row.clamp(0, 1), nrow=len(row), padding=2, pad_value=1.0)
                        files.append((grid, out / SIDE_BY_SIDE / name, labels[SIDE_BY_SIDE]))
                    writer.write(write, path, files)
                    advance(1)
    finally:
        writer.close()
    return report
