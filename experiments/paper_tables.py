"""The paper's Tables 1–6 in miniature, on the built-in data: one command, same data, steps and seeds per row.

    python -m unirestore.experiments.paper_tables --budget small      # ≤ 30 min on 2 CPU cores
    python -m unirestore.experiments.paper_tables --budget toy        # seconds: keeps the script working

Rows: LQ; NAFNet (trained for PIR on the same data and budget, then the same downstream models on its
output); UniRestore without CFRM; without TFA; with one shared prompt (UniRestore-SP); UniRestore; HQ.
Columns: PSNR/SSIM on the seen corruptions and on unseen synthetic rain, haze, snow, noise and motion blur
(Table 1); accuracy of two classifiers (Table 2); mIoU of two segmenters (Table 3); detection mAP after adding
`det` by its prompt alone (Table 6); trainable parameters (Table 5); the gap closed, (UniRestore − LQ) /
(HQ − LQ), beside the paper's own. Writes BENCHMARKS.md (with the CPU speed section and, when present, the
GPU figures of experiments/results/), a PNG chart, and logs everything to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from unirestore.framework.checkpoint import load_checkpoint
from unirestore.framework.config import RunConfig, Stage0Config, TrainConfig
from unirestore.framework.engine import add_task, build_tasks, train
from unirestore.framework.engine.trainer import HookBase, one_cycle
from unirestore.framework.evaluate import evaluate
from unirestore.framework.model import count_parameters

from .baselines import NAFNet

# Unseen degradations of Table 1: (column, degradation name of framework/degrade.py)
UNSEEN = (("rain", "rain"), ("haze", "haze"), ("snow", "snow_synth"), ("noise", "noise25"), ("motion", "motion"))
# The paper's own (LQ, UniRestore, HQ) on its seen sets, Tables 2 and 3, per model here; FCN stands in for
# the paper's second segmenter, RefineNet-lw.
PAPER_SCORES = {
    "cls/acc/resnet": ("ImageNet / ResNet-50", 51.75, 71.65, 72.80),
    "cls/acc/vit": ("ImageNet / ViT-B", 67.65, 77.05, 78.70),
    "seg/miou/deeplab": ("Cityscapes / DeepLabv3+", 40.36, 66.05, 75.64),
    "seg/miou/fcn": ("Cityscapes / RefineNet-lw", 40.75, 65.73, 75.66),
}
# Its gap closed, (UniRestore − LQ) / (HQ − LQ), by metric: each model beside its own counterpart.
PAPER_GAP_CLOSED = {
    key: (name, round((ours - lq) / (hq - lq), 3)) for key, (name, lq, ours, hq) in PAPER_SCORES.items()
}
ROWS = ("LQ", "NAFNet", "w/o CFRM", "w/o TFA", "UniRestore-SP", "UniRestore", "HQ")


@dataclass(frozen=True)
class Budget:
    vae_steps: int  # stage 0: the tiny prior's VAE
    unet_steps: int  # stage 0: the tiny prior's UNet
    stage1_steps: int
    stage2_steps: int
    stage3_steps: int
    batch_size: int
    eval_samples: int  # test images per task and column
    downstream_steps: int | None  # built-in downstream models (None: their defaults)


_STAGE0, _TRAIN = Stage0Config(), TrainConfig().for_prior("tiny")
BUDGETS = {
    "toy": Budget(4, 4, 2, 2, 2, 2, 4, 4),
    # the README main command's budget (the stage-0, stage-1/2 and batch defaults): ~25 min on 2 CPU cores
    "small": Budget(_STAGE0.vae_steps, _STAGE0.unet_steps, _TRAIN.stage1_steps, _TRAIN.stage2_steps,
                    _TRAIN.stage3_steps, _TRAIN.batch_size, 48, None),
    "medium": Budget(3000, 1500, 1500, 1500, 500, 8, 128, None),
}


class StepTimer(HookBase):
    """Seconds per optimiser step of each stage (setup and evaluation excluded)."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    def after_step(self) -> None:
        self.seconds.setdefault(self.trainer.stage, []).append(self.trainer.step_seconds)

    def steps_per_second(self) -> dict[str, float]:
        # the first step of a stage carries one-off costs (allocations, lazy inits): leave it out
        return {
            stage: (len(values) - 1) / sum(values[1:]) if len(values) > 1 else 1 / values[0]
            for stage, values in self.seconds.items()
        }


class RestorerAdapter(torch.nn.Module):
    """A plain image-to-image restorer seen through the interface `evaluate` expects of a model."""

    def __init__(self, restorer: torch.nn.Module, tasks):
        super().__init__()
        self.restorer = restorer
        self.tasks = list(tasks)
        self.config = type("Config", (), {"shared_prompt": True})()

    @torch.no_grad()
    def restore(self, images, task="pir", generator=None, **_):
        return self.restorer(images).clamp(0, 1)

    def restore_tasks(self, images, tasks=("pir",), generator=None, **_):
        restored = self.restore(images)  # one output, whatever the task
        return {task: restored for task in tasks}


def _config(budget: Budget, output: Path, tracking_uri: str, **model) -> RunConfig:
    config = RunConfig(
        tasks=["pir", "seg", "cls"], output=str(output), tracking_uri=tracking_uri, experiment="paper-tables"
    )
    stage0 = replace(config.stage0, vae_steps=budget.vae_steps, unet_steps=budget.unet_steps)
    config.stage0 = replace(stage0, force=not _prior_matches(stage0))
    config.train = replace(
        config.train,
        stage1_steps=budget.stage1_steps,
        stage2_steps=budget.stage2_steps,
        stage3_steps=budget.stage3_steps,
        batch_size=budget.batch_size,
        eval_samples=budget.eval_samples,
        checkpoint_every=max(budget.stage1_steps, budget.stage2_steps),
    )
    config.model = replace(config.model, **model)
    return config


def _prior_matches(stage0) -> bool:
    """Whether the cached tiny prior was trained with exactly this stage-0 config (else the budget retrains it)."""
    from unirestore.framework.engine.stage0 import MARKER
    from unirestore.framework.prior import tiny_prior_path

    marker = tiny_prior_path() / MARKER
    if not marker.is_file():
        return True  # untrained: stage 0 runs anyway
    recorded = json.loads(marker.read_text()).get("config", {})
    wanted = {key: value for key, value in asdict(stage0).items() if key != "force"}
    return {key: recorded.get(key) for key in wanted} == wanted


def _train_nafnet(tasks, budget: Budget, steps: int, seed: int) -> NAFNet:
    """NAFNet for PIR alone: the pir task's training data, L1, the same batch, steps and lr rule."""
    from unirestore.framework.data.sample import collate

    torch.manual_seed(seed)
    model = NAFNet()
    dataset = tasks["pir"].dataset("train")
    lr = 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = one_cycle(optimizer, lr, steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        indices = torch.randint(len(dataset), (budget.batch_size,), generator=generator).tolist()
        batch = collate([dataset[i] for i in indices])
        loss = F.l1_loss(model(batch["lq"]), batch["hq"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


def _evaluate_row(model, tasks, budget: Budget, unseen_tasks, device) -> dict[str, float]:
    """Every column of one row: each task's metrics on the restored images, and PSNR/SSIM on unseen sets."""
    row: dict[str, float] = {}
    table = evaluate(model, tasks, split="test", samples=budget.eval_samples, inputs=("restored",), device=device)
    for task, rows in table.results.items():
        for metric, value in rows.get("restored", {}).items():
            row[f"{task}/{metric}"] = value
    for column, task in unseen_tasks.items():
        result = evaluate(model, {"pir": task}, split="test", samples=budget.eval_samples, inputs=("restored",), device=device)
        for metric, value in result.results["pir"]["restored"].items():
            row[f"{column}/{metric}"] = value
    return row


def _reference_rows(tasks, budget: Budget, unseen_tasks, model, device) -> tuple[dict, dict]:
    """The LQ and HQ rows: the downstream models on degraded and on clean images."""
    lq, hq = {}, {}
    table = evaluate(model, tasks, split="test", samples=budget.eval_samples, inputs=("lq", "hq"), device=device)
    for task, rows in table.results.items():
        for metric, value in rows["lq"].items():
            lq[f"{task}/{metric}"] = value
        for metric, value in rows["hq"].items():
            hq[f"{task}/{metric}"] = value
    for column, task in unseen_tasks.items():
        result = evaluate(model, {"pir": task}, split="test", samples=budget.eval_samples, inputs=("lq", "hq"), device=device)
        for metric, value in result.results["pir"]["lq"].items():
            lq[f"{column}/{metric}"] = value
        for metric, value in result.results["pir"]["hq"].items():
            hq[f"{column}/{metric}"] = value
    return lq, hq


def _unseen_tasks(config: RunConfig, device, size: int) -> dict:
    from unirestore.framework.data.config import DegradationConfig

    tasks = {}
    for column, name in UNSEEN:
        task = build_tasks(config, ["pir"], device, size)["pir"]
        task.context.degradation = DegradationConfig(corruptions=[name], severity=3, rescale=False)
        tasks[column] = task
    return tasks


def _trainable(model, variant: str) -> int:
    """Trainable parameters of a variant (Table 5): the stage-1 and stage-2 modules it uses."""
    count = count_parameters(model.controller) + count_parameters(model.sc_tuners)
    if model.config.use_cfrm:
        count += count_parameters(model.cfrm)
    if model.config.use_tfa:
        count += count_parameters(model.tfa)
        used = ["shared"] if model.config.shared_prompt else [t for t in model.tasks if t != "shared"]
        count += sum(model.prompts(t).numel() for t in used if t in model.prompts)
    return count


def run(budget_name: str, output: Path, benchmarks: Path | None) -> dict:
    budget = BUDGETS[budget_name]
    started = time.perf_counter()
    output = output.resolve()
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    if budget.downstream_steps is not None:
        os.environ["UNIRESTORE_DOWNSTREAM_STEPS"] = str(budget.downstream_steps)
    tracking_uri = f"sqlite:///{output / 'mlflow.db'}"
    timer = StepTimer()
    full = _config(budget, output / "full", tracking_uri)
    # Stage 0 and stage 1 of the full model; stage 1 is shared by UniRestore, -SP and w/o TFA (it trains
    # neither the TFA nor the prompts), so those rows differ only where the paper's ablation differs.
    train(full, stages=(0, 1), hooks=[timer])
    train(full, stages=(2,), hooks=[timer])
    shared = _config(budget, output / "shared", tracking_uri, shared_prompt=True)
    Path(shared.output).mkdir(parents=True)
    shutil.copy(output / "full" / "stage1.safetensors", Path(shared.output) / "stage1.safetensors")
    train(shared, stages=(2,))
    no_cfrm = _config(budget, output / "no_cfrm", tracking_uri, use_cfrm=False)
    train(no_cfrm, stages=(1, 2))
    detection = add_task(replace(full, output=str(output / "det")), output / "full" / "stage2.safetensors", "det",
                         hooks=[timer])  # fmt: skip

    device = torch.device("cpu")
    models = {
        "UniRestore": load_checkpoint(detection.checkpoint),
        "UniRestore-SP": load_checkpoint(output / "shared" / "stage2.safetensors", config_overrides={"shared_prompt": True}),
        "w/o CFRM": load_checkpoint(output / "no_cfrm" / "stage2.safetensors", config_overrides={"use_cfrm": False}),
        "w/o TFA": load_checkpoint(output / "full" / "stage1.safetensors", config_overrides={"use_tfa": False}),
    }
    size = models["UniRestore"].native_size
    tasks = build_tasks(full, ["pir", "seg", "cls", "det"], device, size)
    unseen = _unseen_tasks(full, device, size)
    nafnet = _train_nafnet(tasks, budget, budget.stage1_steps + budget.stage2_steps, full.train.seed)
    models["NAFNet"] = RestorerAdapter(nafnet, ["pir", "seg", "cls", "det"])

    lq, hq = _reference_rows(tasks, budget, unseen, models["UniRestore"], device)
    rows = {"LQ": lq, "HQ": hq}
    for name, model in models.items():
        rows[name] = _evaluate_row(model, tasks, budget, unseen, device)
    parameters = {name: _trainable(model, name) for name, model in models.items() if name != "NAFNet"}
    parameters["NAFNet"] = count_parameters(nafnet)
    wall = time.perf_counter() - started

    speed = _cpu_speed(models["UniRestore"], timer)
    results = {
        "budget": budget_name,
        "budget_detail": budget.__dict__,
        "rows": rows,
        "parameters": parameters,
        "gap_closed": _gap_closed(rows),
        "speed": speed,
        "wall_s": wall,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    (output / "paper_tables.json").write_text(json.dumps(results, indent=2))
    chart = _chart(rows, output / "paper_tables.png")
    text = _markdown(results, chart)
    (output / "paper_tables.md").write_text(text)
    if benchmarks is not None:
        _write_benchmarks(benchmarks, text, chart)
    _log(tracking_uri, results, output, chart)
    print(text)
    return results


def _metric_keys(rows: dict, prefix: str) -> list[str]:
    keys = sorted({k for row in rows.values() for k in row if k.startswith(prefix)})
    return keys


def _gap_closed(rows: dict) -> dict[str, float | None]:
    gaps = {}
    for task in ("cls", "seg"):
        keys = _metric_keys({"hq": rows["HQ"]}, f"{task}/")
        for key in keys:
            lq, hq, ours = rows["LQ"].get(key), rows["HQ"].get(key), rows["UniRestore"].get(key)
            if None in (lq, hq, ours) or abs(hq - lq) < 1e-9:
                gaps[key] = None
            else:
                gaps[key] = (ours - lq) / (hq - lq)
    return gaps


@torch.no_grad()
def _cpu_speed(model, timer: StepTimer) -> dict:
    torch.manual_seed(0)
    speed = {"train_steps_per_s": timer.steps_per_second(), "restore_images_per_s": {}}
    for size in (128, 256):
        images = torch.rand(4, 3, size, size)
        generator = torch.Generator().manual_seed(0)
        model.restore(images[:1], "pir", generator=generator)
        start = time.perf_counter()
        model.restore(images, "pir", generator=generator)
        speed["restore_images_per_s"][size] = 4 / (time.perf_counter() - start)
    speed["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return speed


def _fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _markdown(results: dict, chart: Path) -> str:
    rows = results["rows"]
    order = [r for r in ROWS if r in rows]
    psnr_cols = [("seen", "pir")] + [(c, c) for c, _ in UNSEEN]
    lines = [
        f"## The paper's tables in miniature (budget `{results['budget']}`)",
        "",
        (
            f"Command: `python -m unirestore.experiments.paper_tables --budget {results['budget']}` — "
            f"{results['machine']}, wall time {results['wall_s'] / 60:.1f} min. Built-in data, tiny prior, "
            f"{results['budget_detail']['eval_samples']} test images per column, the same seeds for every row."
        ),
        "",
        "### Table 1: perceptual restoration (PSNR dB / SSIM)",
        "",
        "| input | " + " | ".join(name for name, _ in psnr_cols) + " |",
        "|---|" + "---|" * len(psnr_cols),
    ]
    for row in order:
        cells = [
            f"{_fmt(rows[row].get(f'{key}/psnr'))} / {_fmt(rows[row].get(f'{key}/ssim'), 3)}" for _, key in psnr_cols
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for title, task in (("Table 2: classification accuracy", "cls"), ("Table 3: segmentation mIoU", "seg"),
                        ("Table 6: detection mAP (det added by its prompt alone)", "det")):  # fmt: skip
        keys = _metric_keys(rows, f"{task}/")
        lines += ["", f"### {title}", "", "| input | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for row in order:
            lines.append(f"| {row} | " + " | ".join(_fmt(rows[row].get(k), 4) for k in keys) + " |")
    lines += ["", "### Table 5: trainable parameters", "", "| model | parameters |", "|---|---|"]
    for name, count in results["parameters"].items():
        lines.append(f"| {name} | {count:,} |")
    lines += ["", "### Gap closed, (UniRestore − LQ) / (HQ − LQ)", "", "| metric | here | paper |", "|---|---|---|"]
    for key, value in results["gap_closed"].items():
        paper = PAPER_GAP_CLOSED.get(key)
        lines.append(f"| {key} | {_fmt(value, 3)} | {paper[1]} ({paper[0]}) |" if paper else f"| {key} | {_fmt(value, 3)} | |")
    lines += ["", _order_check(rows), "", f"![tables]({chart.name})", ""]
    speed = results["speed"]
    lines += [
        "## Speed on the CPU (tiny preset)",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for stage, value in speed["train_steps_per_s"].items():
        lines.append(f"| training steps/s, {stage} (batch {results['budget_detail']['batch_size']}) | {value:.2f} |")
    for size, value in speed["restore_images_per_s"].items():
        lines.append(f"| restore images/s at {size}² (batch 4) | {value:.2f} |")
    lines.append(f"| peak resident memory | {speed['peak_rss_gib']:.2f} GiB |")
    return "\n".join(lines) + "\n"


def _order_check(rows: dict) -> str:
    """Say whether UniRestore beats LQ everywhere and whether Table 4's order holds, without tuning anything."""
    notes = []
    keys = [k for k in rows["UniRestore"] if k.endswith(("/psnr", "/ssim")) or k.startswith(("cls/", "seg/", "det/"))]
    worse = [k for k in keys if rows["LQ"].get(k) is not None and rows["UniRestore"][k] <= rows["LQ"][k]]
    notes.append("UniRestore beats LQ on every column." if not worse else
                 f"UniRestore does **not** beat LQ on: {', '.join(worse)}.")  # fmt: skip
    for key in [k for k in ("pir/psnr",) + tuple(_metric_keys(rows, "cls/")[:1]) + tuple(_metric_keys(rows, "seg/")[:1])]:
        values = [rows[r].get(key) for r in ("UniRestore", "w/o TFA", "w/o CFRM")]
        if None in values:
            continue
        holds = values[0] > values[1] > values[2]
        notes.append(f"Table 4 order (full > w/o TFA > w/o CFRM) on {key}: {'holds' if holds else 'does not hold'} "
                     f"({' > '.join(_fmt(v, 3) for v in values)}).")  # fmt: skip
    return "\n".join(f"- {n}" for n in notes)


def _chart(rows: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["pir/psnr"] + _metric_keys(rows, "cls/acc")[:1] + _metric_keys(rows, "seg/miou")[:1] + _metric_keys(rows, "det/")[:1]
    order = [r for r in ROWS if r in rows]
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        # PSNR of HQ against itself is the 100 dB cap, not a result: that panel leaves it out and zooms in
        shown = [r for r in order if not (key.endswith("psnr") and r == "HQ")]
        values = [rows[r].get(key) or 0.0 for r in shown]
        colors = {"LQ": "tab:gray", "HQ": "tab:green"}
        axis.bar(range(len(shown)), values, color=[colors.get(r, "tab:blue") for r in shown])
        axis.set_xticks(range(len(shown)), shown, rotation=45, ha="right", fontsize=8)
        if key.endswith("psnr") and values:
            axis.set_ylim(max(0.0, min(values) - 2), max(values) + 1)
        axis.set_title(key)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


BEGIN, END = "<!-- paper_tables: begin -->", "<!-- paper_tables: end -->"


def _write_benchmarks(path: Path, tables: str, chart: Path) -> None:
    """BENCHMARKS.md: these tables, then the GPU figures kept under experiments/results/.

    When the file already holds a generated block (between the BEGIN/END markers), only that block is
    replaced, so notes written around it are kept.
    """
    path = path.resolve()
    shutil.copy(chart, path.parent / chart.name)
    block = f"{BEGIN}\n{tables}\n{END}"
    existing = path.read_text() if path.is_file() else ""
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
        return
    gpu = sorted((Path(__file__).parent / "results").glob("bench_gpu_*.md"))
    parts = ["# Benchmarks", "", block, "", "## Speed at the real scale (sd-turbo architecture, random weights)", "",
             "Command: `python -m unirestore.experiments.bench_gpu --out DIR`.", ""]  # fmt: skip
    parts += [p.read_text() for p in gpu] or ["No GPU figures recorded yet."]
    path.write_text("\n".join(parts) + "\n")


def _log(tracking_uri: str, results: dict, output: Path, chart: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("paper-tables")
    with mlflow.start_run(run_name=f"paper-tables-{results['budget']}"):
        mlflow.log_params({"budget": results["budget"], **{k: v for k, v in results["budget_detail"].items()}})
        for row, metrics in results["rows"].items():
            mlflow.log_metrics({f"{row.replace('/', '-').replace(' ', '_')}/{k}": v for k, v in metrics.items()
                                if v is not None})  # fmt: skip
        mlflow.log_metric("wall_s", results["wall_s"])
        mlflow.log_artifact(str(output / "paper_tables.md"))
        mlflow.log_artifact(str(output / "paper_tables.json"))
        mlflow.log_artifact(str(chart))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--output", type=Path, default=Path("runs/paper-tables"))
    parser.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"),
                        help="where to write BENCHMARKS.md ('' to skip)")  # fmt: skip
    args = parser.parse_args(argv)
    return run(args.budget, args.output, args.benchmarks if str(args.benchmarks) else None)


if __name__ == "__main__":
    main()
