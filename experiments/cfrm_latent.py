"""What the CFRM does to the latent alone: decode the degraded image's latent with and without it, per corruption.

    python -m unirestore.experiments.cfrm_latent runs/unirestore/stage1.safetensors --samples 128

No diffusion and no TFA: `decode(encode(lq))` with the plain VAE encoder, then with the CFRM on its tapped levels,
each decoded by the prior's plain decoder, against the clean image (PSNR, dB). `f1` is the mean squared error of
the deepest tapped feature to the clean image's plain one, the quantity the stage-1 CFRM loss weighs there. The
test images are the first `--samples` of the PIR task's test split with their own degradations, as
`unirestore eval` scores them; the run folder's config.yaml beside the checkpoint, if any, gives the data.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from unirestore.framework.checkpoint import load_checkpoint
from unirestore.framework.config import RunConfig, load_run_config
from unirestore.framework.data.sample import collate
from unirestore.framework.engine import build_tasks
from unirestore.framework.metrics import psnr

COLUMNS = ("lq", "plain", "cfrm", "f1 plain", "f1 cfrm")


@torch.no_grad()
def measure(checkpoint: Path, samples: int, batch_size: int) -> dict[str, dict[str, float]]:
    """{corruption: {"images": n, column: mean}} over the first `samples` test images, "all" included."""
    model = load_checkpoint(checkpoint).eval()
    saved = checkpoint.parent / "config.yaml"
    config = load_run_config(saved) if saved.is_file() else RunConfig()
    size = config.train.crop_size or model.native_size
    dataset = build_tasks(config, ["pir"], torch.device("cpu"), size)["pir"].dataset("test")
    values: dict[str, list[list[float]]] = defaultdict(list)
    for start in range(0, min(samples, len(dataset)), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, samples, len(dataset)))])
        clean = model.encode(batch["hq"], use_cfrm=False).features[-1]
        row = [psnr(batch["lq"], batch["hq"])]
        plain, corrected = (model.encode(batch["lq"], use_cfrm=use) for use in (False, True))
        for encoded in (plain, corrected):
            row.append(psnr(model.decode(encoded.latents, None, None).clamp(0, 1), batch["hq"]))
        for encoded in (plain, corrected):
            row.append((encoded.features[-1] - clean).pow(2).flatten(1).mean(1))
        for i, corruption in enumerate(batch["corruption"]):
            values[corruption].append([float(column[i]) for column in row])
    values["all"] = [v for corruption in list(values) for v in values[corruption]]
    return {
        corruption: {
            "images": len(rows),
            **{c: sum(r[j] for r in rows) / len(rows) for j, c in enumerate(COLUMNS)},
        }
        for corruption, rows in values.items()
    }


def table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| corruption (images) | LQ | plain VAE | with CFRM | f1 plain | f1 with CFRM |",
        "|---|---|---|---|---|---|",
    ]
    for corruption in sorted(results, key=lambda c: (c == "all", c)):
        r = results[corruption]
        lines.append(
            f"| {corruption} ({r['images']}) | {r['lq']:.2f} | {r['plain']:.2f} | {r['cfrm']:.2f} "
            f"| {r['f1 plain']:.2f} | {r['f1 cfrm']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a stage-1 or stage-2 checkpoint (.safetensors)")
    parser.add_argument("--samples", type=int, default=128, help="test images, the first of the split")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    print(table(measure(args.checkpoint, args.samples, args.batch_size)))


if __name__ == "__main__":
    main()
