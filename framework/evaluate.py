"""Evaluation: each task's metric on three inputs, the rows of every table in the paper (SPEC §8):

- `lq`: the degraded image fed straight to the task's evaluator (downstream model, or PSNR vs clean);
- `restored`: the model's output with that task's prompt;
- `hq`: the clean image (the upper bound).

Deterministic: a fixed evaluation set (the first `samples` images of the split, epoch 0; None: all) and fixed seeds
for the denoising noise, so two calls on the same weights give the same numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

INPUTS = ("lq", "restored", "hq")
INPUT_TITLES = {"lq": "LQ", "restored": "restored", "hq": "HQ"}


@dataclass
class EvalTable:
    """results[task][input][metric] = value, plus a few (lq, restored, hq) examples per task, and per image
    (where the task's evaluator gives per-image values) images[task][input] = [{"image": path, metric: value}]."""

    split: str
    samples: int | None
    results: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # images evaluated per task
    examples: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    images: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    # the images the restoration made worse than LQ (given `reference`), worst first, as `examples`
    worse: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def flat(self, prefix: str | None = None) -> dict[str, float]:
        """{"<prefix>/<task>/<input>/<metric>": value}; the prefix defaults to the split."""
        prefix = self.split if prefix is None else prefix
        return {
            f"{prefix}/{task}/{source}/{metric}": value
            for task, rows in self.results.items()
            for source, metrics in rows.items()
            for metric, value in metrics.items()
        }

    def rich_table(self, title: str | None = None):
        from rich.markup import escape
        from rich.table import Table

        sources = [s for s in INPUTS if any(s in rows for rows in self.results.values())]
        table = Table(title=title or f"{self.split} split, {_images_per_task(self.counts)}")
        table.add_column("task")
        table.add_column("metric")
        for source in sources:
            table.add_column(INPUT_TITLES[source], justify="right")
        for task, rows in self.results.items():
            metrics = list(dict.fromkeys(m for source in sources for m in rows.get(source, {})))
            for metric in metrics:
                cells = [_format(rows.get(source, {}).get(metric)) for source in sources]
                table.add_row(escape(task), escape(metric), *cells)
        return table


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _images_per_task(counts: Mapping[str, int]) -> str:
    """"32 images per task", or "images per task: pir 100, cls 32" when the test sets are smaller than asked."""
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} images per task"
    return "images per task: " + ", ".join(f"{task} {count}" for task, count in counts.items())


class _Chunks(torch.utils.data.Dataset):
    """Chunk k of the first `count` images of `dataset`: (the indices of its readable images, their samples, the
    unreadable files its loading skipped as (path, reason): a DataLoader worker's own log of them stays in the
    worker). An unreadable test image is left out, not replaced: each image is scored once."""

    def __init__(self, dataset, count: int, batch_size: int):
        self.dataset, self.count, self.batch_size = dataset, count, batch_size

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def __getitem__(self, k: int) -> tuple[list[int], list, list[tuple[str, str]]]:
        from .data.io import UnreadableImage, skip_mark, skipped_since

        mark = skip_mark()
        kept, samples = [], []
        for i in range(k * self.batch_size, min((k + 1) * self.batch_size, self.count)):
            try:
                samples.append(self.dataset[i])
            except UnreadableImage:  # noted in the skip log
                continue
            kept.append(i)
        return kept, samples, skipped_since(mark)


def _as_is(item):
    return item


def _fixed_batches(dataset, count: int | None, batch_size: int, workers: int = 0):
    """(index of the batch's first image, batch) over the first `count` images, in order; full images of
    several sizes come one at a time. `workers` DataLoader processes read and degrade the images ahead
    (the same samples: each depends on its index alone)."""
    from .data.io import UnreadableImage, report_bad_file

    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    count = len(dataset) if count is None else min(count, len(dataset))
    chunks = _Chunks(dataset, count, batch_size)
    if workers > 0:
        from .engine.trainer import ignore_interrupts

        loaded = torch.utils.data.DataLoader(
            chunks, batch_size=None, collate_fn=_as_is, num_workers=workers, worker_init_fn=ignore_interrupts
        )
        for kept, samples, skipped in loaded:
            for path, reason in skipped:  # noted in this process, where the caller counts them
                report_bad_file(UnreadableImage(path, reason))
            yield from _batches(kept, samples)
    else:
        for k in range(len(chunks)):
            kept, samples, _ = chunks[k]  # its skips are noted in this process already
            yield from _batches(kept, samples)


def _batches(indices: list[int], samples: list):
    """(the images' indices in the set, their batch)."""
    from .data.sample import collate

    if not samples:
        return
    if len({tuple(sample["lq"].shape) for sample in samples}) > 1:  # full images of several sizes
        yield from (([index], collate([sample])) for index, sample in zip(indices, samples, strict=True))
    else:
        yield indices, collate(samples)


def _to(batch: dict, device: torch.device) -> dict:
    return {
        key: value.to(device)
        if isinstance(value, torch.Tensor)
        else [v.to(device) if isinstance(v, torch.Tensor) else v for v in value]
        if isinstance(value, list)
        else value
        for key, value in batch.items()
    }


def _pad_white(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, h, w) padded right and bottom to (C, height, width) with 1 (white)."""
    return torch.nn.functional.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]), value=1.0)


GRID_SIDE = 1024  # the longest side of an image in a grid: full-size test images (4K) are shown scaled down


def _for_grid(*images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(3, H, W) images on the CPU in float, scaled down to at most GRID_SIDE a side (memory, and a viewable grid)."""
    side = max(images[0].shape[-2:])
    if side <= GRID_SIDE:
        return tuple(image.detach().float().cpu() for image in images)
    size = [round(length * GRID_SIDE / side) for length in images[0].shape[-2:]]
    return tuple(
        torch.nn.functional.interpolate(image.detach().float()[None], size=size, mode="bilinear", antialias=True,
                                        align_corners=False)[0].clamp(0, 1).cpu()
        for image in images
    )  # fmt: skip


def _stack_padded(triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """(lq, restored, hq) triples as three (N, 3, H, W) stacks; full images differ in size: each is padded
    to the largest, in the grids' white."""
    height = max(image.shape[-2] for image, _, _ in triples)
    width = max(image.shape[-1] for image, _, _ in triples)
    return tuple(torch.stack([_pad_white(image, height, width) for image in column]) for column in zip(*triples))


@contextmanager
def image_bar(description: str, total: int, enabled: bool = True, console=None):
    """A rich bar over images (done / total, images/s, time left) on `console` (default: stdout's);
    `advance(n)` after each batch."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{escape(description)}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} images/s"), TimeRemainingColumn())  # fmt: skip
    if console is None:
        from .console import make_console

        console = make_console()
    with Progress(*columns, disable=not enabled, console=console) as bar:
        task = bar.add_task(description, total=total, rate="-")

        def advance(count: int) -> None:
            bar.advance(task, count)
            done = bar.tasks[0]
            if done.elapsed:
                bar.update(task, rate=f"{done.completed / done.elapsed:.2f}")

        yield advance


def _generators(seed: int, indices: Sequence[int], device) -> list[torch.Generator]:
    """One generator per test image, seeded by the image's index: its restoration does not depend on the batch
    it is in (`--batch-size`), nor on which images came before."""
    return [torch.Generator(device=device).manual_seed((seed * 2**32 + i) % 2**64) for i in indices]


def _restore_prompts(model, images, prompts: list[str], seed: int, indices: Sequence[int], tile_size) -> dict[str, torch.Tensor]:
    """{prompt: restored images}, all from one encode and denoise, of the images at `indices` of the set; one
    prompt at a time, from the same noise, if the decoder's copies do not fit."""
    device = images.device
    try:
        generators = _generators(seed, indices, device)
        return model.restore_tasks(images, prompts, generator=generators, tile_size=tile_size)
    except torch.OutOfMemoryError:
        if len(prompts) == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
    outputs = {}
    for prompt in prompts:
        generators = _generators(seed, indices, device)
        outputs[prompt] = model.restore(images, task=prompt, generator=generators, tile_size=tile_size)
    return outputs


@torch.no_grad()
def evaluate(
    model,
    tasks: Mapping[str, object] | Sequence[object],
    split: str = "test",
    samples: int | None = 16,
    batch_size: int = 8,
    seed: int = 0,
    inputs: Sequence[str] = INPUTS,
    examples: int = 4,
    device: torch.device | str | None = None,
    progress: bool = False,
    label: str = "",
    tile_size: int | None = None,
    prompts: Sequence[str] | None = None,
    worse: int = 4,
    workers: int = 0,
) -> EvalTable:
    """Evaluate `model` on each task (Task objects, or a name → Task mapping) for every input in `inputs`.

    `restored` is restored with the task's own prompt (row `restored`), or with each of `prompts` (rows
    `restored[<prompt>]`, the paper's Table 2 shows the PIR prompt on classification too), all of them from
    one encode and denoise per batch, each with the noise it would get alone. Each test image's noise comes
    from `seed` and its index alone, so the table does not depend on `batch_size`. A prompt the model lacks gets
    no row. `progress` shows a bar per task (images done, images/s, time left), headed by the task's name
    and `label`; leave it off while another bar is live (validation inside a training stage). Images whose
    side exceeds `tile_size` are restored tile by tile (full-size test images: memory bounded by the tile).

    `workers` DataLoader processes read and degrade the test images ahead of the restoration.

    With `lq` among the inputs, the `worse` images the task's own prompt restored furthest below their LQ,
    on the task's first per-image metric, are kept (worst first) for a grid of what the restoration hurt
    (furthest above their LQ for a metric in the task's `lower_is_better`, an error); for values known only
    once the whole set is seen (a retrieval hit), those images are restored again.
    """
    task_list = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    device = torch.device(device) if device is not None else next(model.cfrm.parameters()).device
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise ValueError(f"unknown evaluation input(s) {', '.join(sorted(unknown))}; use {', '.join(INPUTS)}")
    serves_all = model.config.shared_prompt or not getattr(model.config, "use_tfa", True)  # one decoder for all
    was_training = model.training
    model.eval()
    table = EvalTable(split=split, samples=samples)
    try:
        for task in task_list:
            rows: dict[str, str | None] = {}  # row → the prompt it is restored with (None: lq, hq)
            for source in sorted(inputs, key=INPUTS.index):  # lq first: the restored rows compare with it
                if source != "restored":
                    rows[source] = None
                    continue
                for prompt in prompts or [task.name]:
                    if prompt in model.tasks or serves_all:
                        rows["restored" if prompts is None else f"restored[{prompt}]"] = prompt
            restoring = list(dict.fromkeys(p for p in rows.values() if p is not None))
            own = next((row for row, prompt in rows.items() if prompt == task.name), None)
            evaluators = {row: task.evaluator() for row in rows}
            lower = tuple(getattr(task, "lower_is_better", ()))  # metrics where lower is better
            per_image: dict[str, list[dict]] = {row: [] for row in rows}
            every_name: list[str] = []
            every_index: list[int] = []  # each scored image's index in the set (unreadable ones are left out)
            kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            losses: list[tuple[float, int, tuple]] = []  # (restored − LQ, index, (lq, restored, hq)), worst first
            dataset = task.dataset(split)
            description = f"evaluating {task.name} {label}".strip()
            table.counts[task.name] = len(dataset) if samples is None else min(samples, len(dataset))
            with image_bar(description, table.counts[task.name], progress) as advance:
                for indices, batch in _fixed_batches(dataset, samples, batch_size, workers):
                    batch = _to(batch, device)
                    count = batch["lq"].shape[0]
                    restored = _restore_prompts(model, batch["lq"], restoring, seed, indices, tile_size) if restoring else {}
                    names = [path or f"#{index}" for index, path in zip(indices, batch.get("path") or [""] * count)]
                    every_name += names
                    every_index += indices
                    scores = {}
                    for row, prompt in rows.items():
                        images = batch[row] if prompt is None else restored[prompt]
                        scores[row] = evaluators[row].update(images, batch)  # per image, if the metric has it
                        if scores[row]:
                            per_image[row] += _image_rows(names, scores[row])
                    if row_scores := (scores.get(own) if worse else None):
                        metric = next(iter(row_scores))
                        if scores.get("lq") and metric in scores["lq"]:
                            drops = row_scores[metric].float().cpu() - scores["lq"][metric].float().cpu()
                            drops = -drops if metric in lower else drops  # an error that rose is a drop
                            for i in range(count):
                                if drops[i] < 0:  # NaN (not scored) compares False
                                    triple = _for_grid(batch["lq"][i], restored[task.name][i], batch["hq"][i])
                                    losses.append((float(drops[i]), indices[i], triple))
                            losses = sorted(losses, key=lambda item: item[:2])[:worse]
                    advance(count)
                    if len(kept) < examples:
                        take = examples - len(kept)
                        shown = restored[task.name] if own is not None else batch["lq"]
                        kept += [_for_grid(*triple) for triple in zip(batch["lq"][:take], shown[:take], batch["hq"][:take])]
            table.results[task.name] = {row: evaluators[row].compute() for row in rows}
            table.counts[task.name] = len(every_index)  # the images scored (unreadable ones left out)
            late_rows = set()
            for row, evaluator in evaluators.items():  # values that need the whole set (a retrieval hit)
                late = getattr(evaluator, "per_image", lambda: None)()
                if late and per_image[row]:  # both kinds (an MAE per batch, an F at the set's threshold): one row
                    for values, more in zip(per_image[row], _image_rows(every_name, late), strict=True):
                        values.update(more)
                elif late:
                    per_image[row] = _image_rows(every_name, late)
                    late_rows.add(row)
            table.images[task.name] = {row: values for row, values in per_image.items() if values}
            if own in late_rows and "lq" in late_rows and worse:
                losses = _replay_worse(model, dataset, restoring, task.name, per_image[own], per_image["lq"],
                                       every_index, seed, worse, tile_size, device, lower)  # fmt: skip
            if kept:
                table.examples[task.name] = _stack_padded(kept)
            if losses:
                table.worse[task.name] = _stack_padded([triple for _, _, triple in losses])
    finally:
        model.train(was_training)
    return table


def _replay_worse(model, dataset, prompts, task, restored_rows, lq_rows, indices, seed, worse, tile_size,
                  device, lower=()) -> list[tuple[float, int, tuple]]:
    """The `worse` images restored furthest below their LQ, worst first, as (restored − LQ, index, triple),
    for values known only once the whole set is seen (a retrieval hit, an image's detection mAP): the images
    are gone by then, so they are read and restored again, each from its own noise (the same restoration).
    A metric in `lower` (lower is better) counts the images restored furthest above their LQ, as LQ − restored."""
    from .data.sample import collate

    metric = next(key for key in restored_rows[0] if key != "image")
    sign = -1.0 if metric in lower else 1.0  # an error that rose is a drop
    drops = [(sign * (restored[metric] - lq[metric]), index) for index, restored, lq in zip(indices, restored_rows, lq_rows)]
    order = sorted((drop, i) for drop, i in drops if drop < 0)[:worse]  # NaN (not scored) compares False
    triples = []
    for _, i in order:
        batch = _to(collate([dataset[i]]), device)
        restored = _restore_prompts(model, batch["lq"], prompts, seed, [i], tile_size)[task]
        triples.append(_for_grid(batch["lq"][0], restored[0], batch["hq"][0]))
    return [(drop, i, triple) for (drop, i), triple in zip(order, triples, strict=True)]


def _image_rows(names: list[str], values: dict[str, torch.Tensor]) -> list[dict]:
    """{"image": name, metric: value, ...} per image, from {metric: (N,) tensor} (one host copy per metric)."""
    columns = {metric: column.float().cpu().tolist() for metric, column in values.items()}
    return [{"image": name, **{metric: column[i] for metric, column in columns.items()}} for i, name in enumerate(names)]


def before_after_grid(lq: torch.Tensor, restored: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
    """One row per image: LQ | restored | HQ, 2-pixel white gaps; (3, H', W') in [0, 1]."""
    from torchvision.utils import make_grid

    rows = torch.stack([lq, restored, hq], dim=1).flatten(0, 1)  # (3N, 3, H, W), row-major
    return make_grid(rows.clamp(0, 1).float(), nrow=3, padding=2, pad_value=1.0)


def save_grids(table: EvalTable, folder, prefix: str, which: str = "examples") -> list:
    """Write one before/after grid PNG per task of `table` to `folder` (`which`: its `examples`, or the
    images the restoration made `worse`); returns the paths."""
    from .data.io import save_png

    folder = Path(folder)
    paths = []
    for task, (lq, restored, hq) in getattr(table, which).items():
        path = folder / f"{prefix}-{task}.png"
        save_png(before_after_grid(lq, restored, hq), path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# `unirestore eval`: the paper's tables from the command line


@dataclass
class EvalReport:
    """rows[(corruption, task, row)] = metrics, where row is `LQ`, `HQ` or `restored[<prompt>]`."""

    checkpoint: str
    split: str
    samples: int | None
    rows: dict[tuple[str, str, str], dict[str, float]] = field(default_factory=dict)
    # images[(corruption, task, row)] = [{"image": path, metric: value}], the same images in the same order
    # for every row of a (corruption, task); only for metrics with per-image values
    images: dict[tuple[str, str, str], list[dict]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # the unreadable files the test sets skipped
    grids: list = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # images evaluated per task
    resumed: list[str] = field(default_factory=list)  # "<degradation>/<task>" units read back, not evaluated
    # "<degradation>/<task> (what changed)": units saved for another test set, evaluated again on resuming
    retested: list[str] = field(default_factory=list)

    @property
    def skipped_files(self) -> int:
        return len(self.skipped)

    @classmethod
    def from_table(cls, table: EvalTable, checkpoint: str, label: str = "default") -> EvalReport:
        """The report of one `evaluate` table (a training's final one), its rows named as `eval` names them
        (LQ, HQ, restored[<task>]): its files then read, and pair image by image (`runs compare --per-image`),
        as an evaluation's do."""
        report = cls(checkpoint=checkpoint, split=table.split, samples=table.samples, counts=dict(table.counts))
        for task, rows in table.results.items():
            names = {"lq": "LQ", "hq": "HQ", "restored": f"restored[{task}]"}
            for source, metrics in rows.items():
                report.rows[(label, task, names.get(source, source))] = metrics
            for source, values in table.images.get(task, {}).items():
                report.images[(label, task, names.get(source, source))] = values
        return report

    def records(self) -> list[dict]:
        return [
            {"corruption": corruption, "task": task, "input": row, "metric": metric, "value": value}
            for (corruption, task, row), metrics in self.rows.items()
            for metric, value in metrics.items()
        ]

    def flat(self) -> dict[str, float]:
        return {
            metric_name(corruption, task, row, metric): value
            for (corruption, task, row), metrics in self.rows.items()
            for metric, value in metrics.items()
        }

    def image_records(self) -> list[dict]:
        """One record per (corruption, task, image, metric), with a column per row: LQ, restored[...], HQ."""
        records = []
        for corruption, task in dict.fromkeys((c, t) for c, t, _ in self.images):
            rows = {r: values for (c, t, r), values in self.images.items() if c == corruption and t == task}
            columns = sorted(rows, key=_column_order)
            first = rows[columns[0]]
            metrics = [k for k in first[0] if k != "image"] if first else []
            for i, item in enumerate(first):
                for metric in metrics:
                    record = {"corruption": corruption, "task": task, "image": item["image"], "metric": metric}
                    records.append(record | {row: round(rows[row][i][metric], 6) for row in columns})
        return records

    def improved(self) -> list[str]:
        """Per task and restored row, on how many images the first per-image metric beats LQ, and the two-sided
        sign test's p-value of that split (ties left out): how likely so uneven a split is by chance alone. A
        metric the task declares lower-better (`Task.lower_is_better`) beats LQ below it."""
        from scipy.stats import binomtest

        from .registry import lower_is_better

        lines = []
        for (corruption, task, row, metric), gains in self._gains().items():
            better, worse = sum(gain > 0 for gain in gains), sum(gain < 0 for gain in gains)
            beats, loses = "above", "below"
            if lower_is_better(task, metric):
                (better, worse), (beats, loses) = (worse, better), (loses, beats)
            test = f" (sign test p = {binomtest(better, better + worse).pvalue:.2g})" if better + worse else ""
            lines.append(f"{corruption}, {task}, {row}: {metric} {beats} LQ on {better} of {len(gains)} images, "
                         f"{loses} on {worse}{test}")  # fmt: skip
        return lines

    def _gains(self) -> dict[tuple[str, str, str, str], list[float]]:
        """{(corruption, task, restored row, metric): restored − LQ per image} on each task's first metric."""
        gains = {}
        for (corruption, task, row), values in self.images.items():
            lq = self.images.get((corruption, task, "LQ"))
            if row.startswith("restored") and lq and values:
                metric = next(k for k in values[0] if k != "image")
                gains[(corruption, task, row, metric)] = [
                    r[metric] - q[metric] for r, q in zip(values, lq, strict=True)
                    if not (math.isnan(r[metric]) or math.isnan(q[metric]))
                ]  # fmt: skip
        return gains

    def plot_gains(self, path) -> Path | None:
        """A PNG, one panel per restored row: the histogram of restored − LQ over the test images, a line at 0
        (where a mean hides that some images lose). None when no metric has per-image values."""
        from .plots import panels, save

        gains = {key: values for key, values in self._gains().items() if values}
        if not gains:
            return None
        figure, axes = panels(len(gains), columns=3, width=4.0, height=3.0)
        for axis, ((corruption, task, row, metric), values) in zip(axes, gains.items()):
            axis.hist(values, bins=min(30, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            axis.axvline(0.0, color="black", linewidth=1)
            axis.set_title(f"{task} {row} ({corruption})", fontsize=8)
            axis.set_xlabel(f"{metric}: restored − LQ", fontsize=8)
            axis.set_ylabel("images", fontsize=8)
            axis.tick_params(labelsize=7)
        return save(figure, path, dpi=110)

    def markdown(self) -> str:
        lines = [f"# Evaluation of `{self.checkpoint}`", "",
                 f"{self.split} split, {_images_per_task(self.counts)}; unreadable files skipped: {self.skipped_files}.",
                 ""]  # fmt: skip
        for corruption in dict.fromkeys(c for c, _, _ in self.rows):
            lines += [f"## degradation: {corruption}", ""]
            for task in dict.fromkeys(t for c, t, _ in self.rows if c == corruption):
                rows = {r: m for (c, t, r), m in self.rows.items() if c == corruption and t == task}
                metrics = list(dict.fromkeys(k for m in rows.values() for k in m))
                lines += [f"### {task}", "", "| input | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
                for row, values in rows.items():
                    lines.append(f"| {row} | " + " | ".join(_format(values.get(k)) for k in metrics) + " |")
                lines.append("")
        if self.images:
            lines += ["## per image (eval_images.csv)", "", *(f"- {line}" for line in self.improved()), "",
                      "Restored − LQ per image, per prompt: `eval_gains.png`.", ""]  # fmt: skip
            worse = [path for path in self.grids if "-worse-" in Path(path).name]
            if worse:
                lines += ["The restored images furthest below their LQ (LQ | restored | HQ, worst first): "
                          + ", ".join(f"`grids/{Path(path).name}`" for path in worse), ""]  # fmt: skip
        return "\n".join(lines)

    def rich_table(self):
        from rich.markup import escape
        from rich.table import Table

        # Cells are data, not markup: "restored[pir]" would otherwise print as "restored".
        table = Table(title=escape(f"{self.checkpoint}: {self.split} split, {_images_per_task(self.counts)}"))
        for column in ("degradation", "task", "input", "metric", "value"):
            table.add_column(column, justify="right" if column == "value" else "left")
        for record in self.records():
            cells = (record["corruption"], record["task"], record["input"], record["metric"], _format(record["value"]))
            table.add_row(*map(escape, cells))
        return table

    def write(self, folder) -> list:
        import csv
        import json

        from .files import atomic_write, atomic_write_text

        folder = Path(folder)

        def write_csv(path: Path, records: list[dict], fields: list[str]) -> Path:
            def write(temporary):
                with open(temporary, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(records)

            return atomic_write(path, write)

        files = [
            write_csv(folder / "eval.csv", self.records(), ["corruption", "task", "input", "metric", "value"]),
            atomic_write_text(folder / "eval.json", json.dumps(
                {"checkpoint": self.checkpoint, "split": self.split, "samples": self.samples, "images": self.counts,
                 "skipped_files": self.skipped_files, "skipped": self.skipped, "results": self.records()},
                indent=2)),
            atomic_write_text(folder / "eval.md", self.markdown()),
        ]  # fmt: skip
        images = self.image_records()
        if images:
            rows = sorted(dict.fromkeys(k for record in images for k in record), key=_column_order)
            files.append(write_csv(folder / "eval_images.csv", images, rows))
        gains = self.plot_gains(folder / "eval_gains.png")
        return files + ([gains] if gains else [])


def metric_name(corruption: str, task: str, row: str, metric: str) -> str:
    """An evaluation's value as MLflow names it: `eval/<degradation>/<task>/<row>/<metric>`."""
    return f"eval/{corruption.replace('@', '_s')}/{task}/{row.replace('[', '_').replace(']', '')}/{metric}"


@contextmanager
def tracked_evaluation(folder, *, tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, object],
                       tags: Mapping[str, str], config: dict, resume: bool = False, enabled: bool = True,
                       say: Callable[[str], None] = print):  # fmt: skip
    """The MLflow run of an evaluation (`unirestore eval`), open while it runs: started with the config it read
    (config.json), `params` and `tags`; the caller logs each (degradation, task) unit's metrics as the unit
    finishes (`eval/<degradation>/<task>/<row>/<metric>`, step 0) and ends with `log_evaluation`. Ended
    FINISHED, or FAILED on an error, KILLED on Ctrl-C or SIGTERM. Its id is kept in `folder` (the --out
    folder's mlflow_run.json): with `resume` the run goes on, its units read back logged only where the
    interrupted process had not; a run deleted from the store since is replaced by a new one, which `say`
    tells. Through the tracking module's explicit client, as training is tracked. Yields the `Tracker`."""
    from .engine.tracking import RUN_FILE, Tracker, load_run_id, save_run_id

    folder = Path(folder)
    tracker = Tracker(tracking_uri, experiment, enabled=enabled)
    recorded = load_run_id(folder) if resume and enabled else ""
    tracker.start(run_name, tags, run_id=recorded)
    status = "FAILED"
    try:
        if recorded and tracker.run_id != recorded:
            say(f"MLflow run {recorded} ({folder / RUN_FILE}) is no longer in the tracking store (deleted, or "
                f"another --tracking-uri); this evaluation is logged to a new run, {tracker.run_id}")  # fmt: skip
        save_run_id(folder, tracker.run_id)
        tracker.log_config(config)
        tracker.log_params(params)
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


def log_evaluation(tracker, report: EvalReport, files: Sequence, again: bool = False) -> None:
    """What an evaluation's run gets at its end: the unreadable files' count (`again`: logged anew when a
    unit was evaluated by this call, as the count may have changed), `files` (tables, per-image CSV, gains
    plot) and the grids (under grids/, as in the output folder)."""
    tracker.log_metrics({"skipped_files": report.skipped_files}, 0, again=again)
    for path in files:
        tracker.log_artifact(path)
    for path in report.grids:
        tracker.log_artifact(path, "grids")


def _column_order(name: str) -> tuple:
    """eval_images.csv's columns: where the value is from, then LQ, the restored rows, HQ."""
    keys = ("corruption", "task", "image", "metric", "LQ")
    return (keys.index(name) if name in keys else len(keys) + (name == "HQ"),)


def _read_partial(path: Path | None) -> dict | None:
    """A unit's saved results (its `key` says for which checkpoint, data and settings), None if none."""
    import json

    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # cut short by a kill before the rename: not there
        return None
    return saved if isinstance(saved, dict) else None


def _test_set_key(dataset) -> dict[str, object]:
    """What a test set is: its number of images and a digest of every file it reads (path, size, modification
    time) and of their labels, so that results saved for it are not read back once an image was added,
    removed or replaced. Generated (built-in) data counts by its type and length."""
    import hashlib

    digest, images, pending = hashlib.sha256(), 0, [dataset]
    while pending:  # Degraded wraps one dataset, WeightedConcat several
        part = pending.pop(0)
        if hasattr(part, "datasets") or hasattr(part, "dataset"):
            pending += list(getattr(part, "datasets", None) or [part.dataset])
            continue
        records = getattr(part, "records", None)
        if records is None:
            digest.update(f"{type(part).__name__} {len(part)}\n".encode())
            images += len(part)
            continue
        images += len(records)
        for record in records:
            for item in record if isinstance(record, tuple) else (record,):
                if isinstance(item, Path):
                    try:
                        stat = item.stat()
                        item = f"{item} {stat.st_size} {stat.st_mtime_ns}"
                    except OSError:  # removed since it was listed: the set differs from any saved one
                        item = f"{item} gone"
                digest.update(f"{item!r}\n".encode())
    return {"images": images, "digest": digest.hexdigest()[:16]}


def _test_set_changed(saved: dict, key: dict) -> str | None:
    """Why the `saved` unit is not read back when only its test set differs from `key`'s (None otherwise)."""
    then, now = saved.get("key", {}).get("test_set"), key.get("test_set")
    if then == now or {**saved.get("key", {}), "test_set": None} != {**key, "test_set": None}:
        return None
    if then is None:
        return "saved without a record of its test set"
    if then["images"] != now["images"]:
        return f"{then['images']} images then, {now['images']} now"
    return f"{now['images']} images, some of them added, removed or replaced"


def _unit(table: EvalTable, task: str, prompts: Sequence[str], key: dict) -> dict:
    """One (degradation, task) unit of `evaluate_checkpoint` as saved: its rows (LQ, HQ, restored[<prompt>];
    a prompt the model lacks has none), per-image values and image count."""
    rows = {"LQ": "lq", "HQ": "hq", **{f"restored[{p}]": f"restored[{p}]" for p in prompts}}
    return {
        "key": key,
        "count": table.counts[task],
        "rows": {row: table.results[task][source] for row, source in rows.items() if source in table.results[task]},
        "images": {row: table.images[task][source] for row, source in rows.items() if source in table.images[task]},
        "skipped": [],
        "grids": [],
    }


def check_prompts(model, names: Sequence[str], checkpoint) -> None:
    """A CheckpointError naming the first of `names` the model has no prompt for (and how to add one); a
    model with one shared prompt, or without the TFA, serves every task."""
    from .checkpoint import CheckpointError

    for name in names:
        if name not in model.tasks and not model.config.shared_prompt and model.config.use_tfa:
            raise CheckpointError(
                f"checkpoint {checkpoint} has no prompt for '{name}'; it has prompts for: {', '.join(model.tasks)} "
                f"(add one with `unirestore task add {name} --from {checkpoint}`)"
            )


def evaluate_checkpoint(
    model,
    tasks: Mapping[str, object],
    checkpoint: str,
    prompts: Sequence[str] | None = None,
    corruptions: Sequence[str] | None = None,
    severity: int | None = None,
    split: str = "test",
    samples: int | None = 32,
    batch_size: int = 8,
    seed: int = 0,
    grids_folder=None,
    device: torch.device | str | None = None,
    progress: bool = False,
    tile_size: int | None = None,
    partial_folder=None,
    resume: bool = False,
    identity: Mapping[str, object] | None = None,
    shard: tuple[int, int] = (0, 1),
    workers: int = 0,
    on_unit: Callable[[dict[str, float], bool], None] | None = None,
) -> EvalReport:
    """LQ, HQ and one restored row per prompt for each task, optionally per corruption × severity.

    `prompts` None: each task's own prompt plus the PIR prompt (as the paper's Table 2 shows both).
    `corruptions` None: the datasets' own degradation (the training distribution, fixed seeds).

    Each (degradation, task) unit's results are saved to `partial_folder` as it finishes; with `resume`, a
    unit saved there for the same checkpoint, settings and test set (`identity` adds what this function does
    not see: the checkpoint file's size and time, the data, the precision) is read back instead of evaluated
    again; one saved for a test set that has changed since (images added, removed or replaced) is evaluated
    again and named in `retested`.
    `shard` (rank, world size): only every world-th unit, from the rank-th, is evaluated and reported (one
    process of several, each saving its units to the shared `partial_folder`). `workers` DataLoader
    processes read and degrade the test images ahead (the results do not depend on them).
    `on_unit(metrics, evaluated)` is called after each unit, once saved, with its values as MLflow names them
    (`metric_name`) and whether it was evaluated (True) or read back (False).
    """
    import json

    from .data.config import DegradationConfig
    from .data.io import BadFileWarning, skip_mark, skipped_since
    from .files import atomic_write

    check_prompts(model, list(tasks) + list(prompts or []), checkpoint)
    available = list(model.tasks)
    report = EvalReport(checkpoint=str(checkpoint), split=split, samples=samples)
    settings = [(None, "default")] if not corruptions else [(c, f"{c}@{severity or 3}") for c in corruptions]
    units = [(corruption, label, name, task) for corruption, label in settings for name, task in tasks.items()]
    rank, world = shard
    skipped_paths: set[str] = set()
    test_sets: dict[str, dict] = {}  # per task: the same files under every degradation
    with warnings.catch_warnings():  # skipped files are counted and named in the report, not warned of
        warnings.simplefilter("ignore", BadFileWarning)
        for corruption, label, name, task in units[rank::world]:
            chosen = prompts or list(dict.fromkeys([name, "pir"] if "pir" in available else [name]))
            prefix = label.replace("@", "-s")
            key = {**dict(identity or {}), "checkpoint": str(checkpoint), "split": split, "samples": samples,
                   "seed": seed, "batch_size": batch_size, "tile_size": tile_size, "prompts": chosen,
                   "degradation": label, "task": name}  # fmt: skip
            partial = None if partial_folder is None else Path(partial_folder) / f"{prefix}-{name}.json"
            if partial is not None:  # results of another test set are never read back into this table
                if name not in test_sets:
                    test_sets[name] = _test_set_key(task.dataset(split))
                key["test_set"] = test_sets[name]
            saved = _read_partial(partial) if resume else None
            unit = saved if saved is not None and saved.get("key") == key else None
            if unit is not None:
                report.resumed.append(f"{label}/{name}")
            else:
                if saved is not None and (changed := _test_set_changed(saved, key)):
                    report.retested.append(f"{label}/{name} ({changed})")
                task.context.degradation = (
                    None if corruption is None
                    else DegradationConfig(corruptions=[corruption], severity=severity or 3, rescale=False)
                )  # fmt: skip
                mark = skip_mark()
                # LQ, HQ and every prompt's restoration in one pass over the test images
                table = evaluate(model, [task], split=split, samples=samples, batch_size=batch_size, seed=seed,
                                 prompts=chosen, device=device, progress=progress, examples=4,
                                 label="" if corruption is None else label, tile_size=tile_size,
                                 workers=workers)  # fmt: skip
                task.context.degradation = None
                unit = _unit(table, name, chosen, key)
                unit["skipped"] = sorted({path for path, _ in skipped_since(mark)})  # each file once
                if grids_folder is not None and f"restored[{name}]" in table.results[name]:
                    grids = save_grids(table, grids_folder, prefix)
                    grids += save_grids(table, grids_folder, f"{prefix}-worse", which="worse")
                    unit["grids"] = [str(path) for path in grids]
                if partial is not None:
                    text = json.dumps(unit)
                    atomic_write(partial, lambda temporary, text=text: Path(temporary).write_text(text))
            report.counts[name] = unit["count"]
            skipped = unit["skipped"]  # the files (a count, in results saved before they were named)
            if isinstance(skipped, int):
                skipped = [f"{label}/{name}: unreadable file {k + 1} (unnamed)" for k in range(skipped)]
            skipped_paths.update(skipped)
            report.grids += [Path(path) for path in unit["grids"] if Path(path).is_file()]
            for row, metrics in unit["rows"].items():
                report.rows[(label, name, row)] = metrics
            for row, values in unit["images"].items():
                report.images[(label, name, row)] = values
            if on_unit is not None:
                named = {metric_name(label, name, row, metric): value
                         for row, values in unit["rows"].items() for metric, value in values.items()}  # fmt: skip
                on_unit(named, f"{label}/{name}" not in report.resumed)
    report.skipped = sorted(skipped_paths)
    return report
