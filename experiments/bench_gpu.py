"""Speed at the real scale: UniRestore built at sd-turbo scale with random weights (no checkpoint needed).

Measures, in one run: restore latency (batch 1) and throughput (batch 16) at 512² in fp32 and bf16 beside a
bare prior pass (VAE encode → one UNet step → VAE decode, diffusers' modules as they are, and again with the
decode through the framework's plain decoder, whose upsamplers run as 2×2 convs) in the same run; stage-1 and stage-2 training step
time and peak memory (batch 4, with and without gradient checkpointing); stage 2 as implemented (decoder
inputs once, without gradients; both prompts decoded in one pass) against a straightforward step that re-runs
the whole pipeline for each prompt, with their losses compared; the FLOPs of one restore (torch's FLOP
counter) and the share of the GPU's measured bf16 matrix peak that the timing reaches.

    python -m unirestore.experiments.bench_gpu --out bench/              # on a GPU: the real figures
    python -m unirestore.experiments.bench_gpu --device cpu --size 64 --throughput-batch 2 --train-batch 1 --iters 1
    python -m unirestore.experiments.bench_gpu --compile reduce-overhead --compile-only --compile-batches 1 --out c/
    python -m unirestore.experiments.bench_gpu --training-only --compile default --out t/   # and `train --compile`

Each run also times every part of both passes alone (encoder with and without the CFRM, Controller, UNet with
and without SC-Tuners, decoder with and without the TFA), which says which module the restore's extra time is
spent in. `--compile MODE` adds both passes under torch.compile; each batch size compiles anew (minutes at
sd-turbo scale), so run it apart from the training figures (`--compile-only` skips every eager figure).
`--profile` runs both passes at batch 1 under torch.profiler in each precision (and compiled, with
`--compile`): wall time against the GPU's busy time, kernels launched, the time in cast and copy kernels,
time by kind of kernel and the top kernels; on a CPU only the wall time and the cast operators.

The results are written to `--out` after each part of the run, so a run stopped or failed halfway still
leaves the figures measured until then.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from unirestore.framework.config import ModelConfig, TrainConfig
from unirestore.framework.engine.losses import (
    compiled_decoder_inputs,
    decoder_inputs,
    stage1_losses,
    task_losses,
)
from unirestore.framework.model import UniRestore, count_parameters
from unirestore.framework.prior import (
    SD_TURBO_UNET,
    SD_TURBO_VAE,
    TINY_UNET,
    TINY_VAE,
    build_prior_from_configs,
)

SCALES = {"sd-turbo": (SD_TURBO_VAE, SD_TURBO_UNET), "tiny": (TINY_VAE, TINY_UNET)}
# The compiled passes' weights and activation layout, as the `restore` command casts them (cli._cast).
COMPILE_PRECISIONS = {
    "bf16": (torch.bfloat16, torch.channels_last),
    "fp32": (torch.float32, torch.contiguous_format),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    """Mean seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def peak_memory(device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measured_bf16_peak(device, n: int = 8192) -> float | None:
    """TFLOP/s of a large bf16 matrix product: the practical ceiling the restore timing is compared with."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / seconds / 1e12


class StandInClassification:
    """A classification task for timing: CE of a frozen torchvision ResNet-50 (random weights) at 224²."""

    name = "cls"
    anchor_to_pir = True

    def __init__(self, device):
        import torchvision

        self.classifier = torchvision.models.resnet50(weights=None).to(device).eval()
        self.classifier.requires_grad_(False)
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def losses(self, restored, batch):
        images = F.interpolate(restored, size=(224, 224), mode="bilinear", align_corners=False)
        logits = self.classifier((images - self.mean) / self.std)
        return {"loss/cls_ce": 0.1 * F.cross_entropy(logits.float(), batch["label"])}


def straightforward_stage2_step(model, task, batch, generator_seed):
    """The naive stage-2 loss: the whole pipeline re-run for the task prompt and again for the PIR anchor."""
    outputs = {}
    for prompt in (task.name, "pir"):
        torch.manual_seed(generator_seed)  # the same draws as the implemented step's, in the same order
        with torch.no_grad():
            latents, features = decoder_inputs(model, batch["hq"], batch["lq"])
        outputs[prompt] = model.decode(latents, features, prompt)
    terms = dict(task.losses(outputs[task.name], batch))
    terms["loss/cls_pir_l1"] = F.l1_loss(outputs["pir"].float(), batch["hq"].float())
    return terms


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="sd-turbo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--throughput-batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--training-only", action="store_true",
        help="time only the training steps and stage 2 against the straightforward step (with --compile: also "
             "with its decoder inputs compiled, as `train --compile` runs it)",
    )  # fmt: skip
    parser.add_argument(
        "--compile",
        choices=["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default="none",
        help="also time both passes under torch.compile in this mode (bf16 weights; compiling takes minutes)",
    )
    parser.add_argument(
        "--compile-precision", choices=sorted(COMPILE_PRECISIONS), default="bf16",
        help="with --compile: the compiled passes' weights (bf16 and channels_last, as `restore --precision bf16 "
             "--compile` runs; fp32 as `restore --compile` runs on the CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="with --compile: time only the compiled passes (no eager figures)",
    )
    parser.add_argument(
        "--compile-batches", type=int, nargs="+", default=None, metavar="N",
        help="batch sizes to compile and time (default: 1 and --throughput-batch)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-passes", nargs="+", choices=["restore", "bare_prior"], default=["restore", "bare_prior"],
        help="with --compile: the passes to compile and time (each compiles for minutes at sd-turbo scale)",
    )  # fmt: skip
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile both passes at batch 1 under torch.profiler (kernels, launches, casts on a GPU)",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_gpu.json and bench_gpu.md")
    args = parser.parse_args(argv)
    if args.compile_only and args.compile == "none":
        parser.error("--compile-only needs --compile MODE")
    if args.training_only and (args.skip_training or args.compile_only):
        parser.error("--training-only times the training steps alone: not with --skip-training or --compile-only")

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    vae_config, unet_config = SCALES[args.scale]
    with torch.device(device):
        prior = build_prior_from_configs(vae_config, unet_config, device=device)
        model = UniRestore(prior, ModelConfig(), tasks=["pir", "cls", "seg"])
    model.eval()
    results: dict = {
        "scale": args.scale,
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "parameters": {name: count_parameters(m) for name, m in model.components().items()},
        "timings": {},
    }
    if device.type == "cpu":
        results["cpu_threads"] = torch.get_num_threads()

    def save() -> None:
        # After each part of the run: a run stopped or failed later keeps what it measured.
        results["wall_s"] = time.perf_counter() - started
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=2))
            (args.out / "bench_gpu.md").write_text(markdown(results))
            print(f"[{results['wall_s']:.0f} s] saved to {args.out}")

    results["bf16_peak_tflops"] = measured_bf16_peak(device)
    timings = results["timings"]

    def bare_pass(images):
        # The frozen prior alone: VAE encode → one UNet step → VAE decode.
        latents = prior.vae.encode(images * 2 - 1).latent_dist.mode() * prior.vae.config.scaling_factor
        context = prior.empty_prompt_embeds.to(latents.dtype).expand(latents.shape[0], -1, -1)
        noise_prediction = prior.unet(latents, 999, encoder_hidden_states=context).sample
        return prior.vae.decode(noise_prediction / prior.vae.config.scaling_factor).sample

    def bare_pass_subpixel(images):
        # The same, decoded by the framework's plain decoder: its upsamplers as four 2×2 convs (same result).
        latents = prior.vae.encode(images * 2 - 1).latent_dist.mode() * prior.vae.config.scaling_factor
        context = prior.empty_prompt_embeds.to(latents.dtype).expand(latents.shape[0], -1, -1)
        noise_prediction = prior.unet(latents, 999, encoder_hidden_states=context).sample
        return model.decode(noise_prediction, None, None)

    def restore_pass(images):
        generator = torch.Generator(device=device).manual_seed(0)
        return model.forward_padded(images, "pir", generator=generator)

    def save_compiled(compiled: dict) -> None:
        results["compiled"] = compiled
        save()

    if args.compile_only:
        save_compiled(bench_compiled(model, bare_pass, device, args, save_compiled))
        print(markdown(results))
        return results
    if args.training_only:
        results["training"] = bench_training(model, device, args)
        save()
        print(markdown(results))
        return results

    precisions = {"fp32": None, "bf16": torch.bfloat16}
    for precision, dtype in precisions.items():
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        for batch in (1, args.throughput_batch):
            images = torch.rand(batch, 3, args.size, args.size, device=device)
            passes = (("bare_prior", bare_pass), ("bare_prior_subpixel", bare_pass_subpixel), ("restore", restore_pass))
            for name, fn in passes:
                with torch.no_grad(), autocast:
                    reset_peak(device)
                    seconds = timed(lambda fn=fn, images=images: fn(images), device, args.warmup, args.iters)
                timings[f"{name}/{precision}/b{batch}"] = {
                    "seconds": seconds,
                    "images_per_s": batch / seconds,
                    "peak_gib": peak_memory(device),
                }
                print(f"{name:10s} {precision} batch {batch:2d}: {seconds * 1e3:8.1f} ms  ({batch / seconds:6.2f} img/s)")
    save()
    if args.profile:
        # Why bf16 under autocast barely beats fp32 at batch 1: kernels, launches and casts of both passes.
        results["profile_b1"] = profiles = {}
        images = torch.rand(1, 3, args.size, args.size, device=device)
        for precision, dtype in precisions.items():
            autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
            for name, fn in (("bare_prior", bare_pass), ("restore", restore_pass)):
                with torch.no_grad(), autocast:
                    profiles[f"{name}/{precision}"] = profile_pass(lambda fn=fn: fn(images), device)
        save()

    # FLOPs of one restore at batch 1, counted by torch, and the share of the measured peak it reaches.
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.rand(1, 3, args.size, args.size, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        counter = FlopCounterMode(display=False)
        with counter:
            restore_pass(images)
        restore_flops = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            bare_pass(images)
        bare_flops = counter.get_total_flops()
    results["flops"] = {"restore": restore_flops, "bare_prior": bare_flops}
    restore_bf16 = timings["restore/bf16/b1"]["seconds"]
    results["achieved_tflops_bf16_b1"] = restore_flops / restore_bf16 / 1e12
    throughput = timings[f"restore/bf16/b{args.throughput_batch}"]["seconds"]
    results["achieved_tflops_bf16_throughput"] = args.throughput_batch * restore_flops / throughput / 1e12
    if results["bf16_peak_tflops"]:
        results["share_of_peak_b1"] = results["achieved_tflops_bf16_b1"] / results["bf16_peak_tflops"]
        results["share_of_peak_throughput"] = results["achieved_tflops_bf16_throughput"] / results["bf16_peak_tflops"]
    results["restore_over_bare_bf16_b1"] = restore_bf16 / timings["bare_prior/bf16/b1"]["seconds"]
    results["restore_over_bare_subpixel_bf16_b1"] = restore_bf16 / timings["bare_prior_subpixel/bf16/b1"]["seconds"]
    results["fp32_over_bf16_restore_b1"] = timings["restore/fp32/b1"]["seconds"] / restore_bf16
    save()

    # Where the restore's extra time goes: each part of both passes timed alone (bf16 autocast, batch 1).
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        results["parts_bf16_b1"] = time_parts(model, images, device, args)
    for part, seconds in results["parts_bf16_b1"].items():
        print(f"part {part:22s} {seconds * 1e3:8.2f} ms")
    save()

    if not args.skip_training:
        results["training"] = bench_training(model, device, args)
        save()

    # Inference as deployed: bf16 weights (no autocast casts per op) and channels_last activations.
    model.eval()
    model.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    for batch in (1, args.throughput_batch):
        images = torch.rand(batch, 3, args.size, args.size, device=device, dtype=torch.bfloat16)
        images = images.contiguous(memory_format=torch.channels_last)
        for name, fn in (("bare_prior", bare_pass), ("restore", restore_pass)):
            with torch.no_grad():
                reset_peak(device)
                seconds = timed(lambda fn=fn, images=images: fn(images), device, args.warmup, args.iters)
            timings[f"{name}/bf16-weights-cl/b{batch}"] = {
                "seconds": seconds,
                "images_per_s": batch / seconds,
                "peak_gib": peak_memory(device),
            }
            print(f"{name:10s} bf16-weights-cl batch {batch:2d}: {seconds * 1e3:8.1f} ms")
    deployed = timings["restore/bf16-weights-cl/b1"]["seconds"]
    results["restore_over_bare_bf16_weights_b1"] = deployed / timings["bare_prior/bf16-weights-cl/b1"]["seconds"]
    results["fp32_over_bf16_weights_restore_b1"] = timings["restore/fp32/b1"]["seconds"] / deployed
    save()
    images = torch.rand(1, 3, args.size, args.size, device=device, dtype=torch.bfloat16)
    images = images.contiguous(memory_format=torch.channels_last)
    if args.profile:
        for name, fn in (("bare_prior", bare_pass), ("restore", restore_pass)):
            with torch.no_grad():
                results["profile_b1"][f"{name}/bf16-weights-cl"] = profile_pass(lambda fn=fn: fn(images), device)
        save()
    # One model for viewers and machines: three prompts from one encode and denoise (`restore_tasks`).
    with torch.no_grad():
        reset_peak(device)
        generator = torch.Generator(device=device)
        seconds = timed(lambda: model.forward_padded_tasks(images, ["pir", "seg", "cls"], generator=generator),
                        device, args.warmup, args.iters)  # fmt: skip
    timings["restore_3_prompts/bf16-weights-cl/b1"] = {
        "seconds": seconds, "images_per_s": 1 / seconds, "peak_gib": peak_memory(device)}  # fmt: skip
    results["three_prompts_over_one_restore_b1"] = seconds / timings["restore/bf16-weights-cl/b1"]["seconds"]
    print(f"restore, 3 prompts at once, bf16-weights-cl batch 1: {seconds * 1e3:8.1f} ms")
    modules = {name: model.components()[name] for name in ("cfrm", "controller", "sc_tuners", "tfa")}
    results["dispatched_ops_b1"] = {
        "bare_prior": dispatched_ops(lambda: bare_pass(images), {}),
        "restore": dispatched_ops(lambda: restore_pass(images), modules),
    }
    print(f"dispatched operators, batch 1: {results['dispatched_ops_b1']}")
    save()
    results["restore_files"] = bench_restore_files(model, args)
    save()
    if args.compile != "none":
        model.to(memory_format=torch.contiguous_format)  # bench_compiled casts as the precision deploys
        save_compiled(bench_compiled(model, bare_pass, device, args, save_compiled))
    print(markdown(results))
    return results


def bench_restore_files(model: UniRestore, args, count: int = 8) -> dict[str, float]:
    """`unirestore restore`'s own loop (`restore_files`) over PNG files of the bench's size, three prompts,
    reading and writing in this thread against reading ahead and writing in two threads (the default beside a
    GPU): seconds for `count` images, the second of two runs each."""
    import tempfile

    import numpy as np
    from PIL import Image

    from unirestore.framework.inference import collect_images, restore_files

    rng = np.random.default_rng(0)
    seconds = {}
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "in"
        inputs.mkdir()
        for k in range(count):  # smooth content, as photos: PNG's compression works as on real images
            small = (rng.random((args.size // 8, args.size // 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(small).resize((args.size, args.size), Image.BICUBIC).save(inputs / f"{k}.png")
        files, _, _ = collect_images([inputs], Path(folder) / "out")
        for threads in (0, 2):
            for _ in range(2):
                started = time.perf_counter()
                restore_files(model, files, Path(folder) / f"out-{threads}", ["pir", "seg", "cls"],
                              io_threads=threads)  # fmt: skip
                seconds[f"io_threads_{threads}"] = time.perf_counter() - started
    print(f"restore_files, {count} images, 3 prompts: {seconds}")
    return {**seconds, "images": count}


def time_parts(model: UniRestore, images: torch.Tensor, device, args) -> dict[str, float]:
    """Seconds of each part of the restore and of the bare prior pass, each run alone on the same input.

    The restore's extra cost over the bare pass is (encoder with CFRM − encoder) + Controller + (UNet with
    SC-Tuners − UNet) + (decoder with TFA − decoder).
    """
    prior_unet = model.unet
    encoded = model.encode(images, use_cfrm=True)
    latents, features = encoded.latents, encoded.features
    context = model.empty_prompt_embeds.to(latents.dtype).expand(latents.shape[0], -1, -1)
    control = model.control(latents, 999)
    parts = {
        "encoder": lambda: model.encode(images, use_cfrm=False),
        "encoder with CFRM": lambda: model.encode(images, use_cfrm=True),
        "Controller": lambda: model.control(latents, 999),
        "UNet": lambda: prior_unet(latents, 999, encoder_hidden_states=context).sample,
        "UNet with SC-Tuners": lambda: model.unet_forward(latents, 999, control),
        "decoder, diffusers' upsamplers": lambda: model.vae.decode(latents / model.vae.config.scaling_factor).sample,
        "decoder": lambda: model.decode(latents, None, None),
        "decoder with TFA": lambda: model.decode(latents, features, "pir"),
    }
    return {name: timed(fn, device, args.warmup, args.iters) for name, fn in parts.items()}


# Kinds of CUDA kernel by name, first match wins (cast and layout kernels before the elementwise ones they
# are instances of).
KERNEL_KINDS = (
    ("cast/copy", ("copy_kernel", "memcpy", "memset", "copy_device")),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("normalization", ("norm", "moments", "welford")),
    ("elementwise/reduction", ("elementwise", "vectorized", "reduce", "upsample", "catarray", "triton")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in lowered for key in keys)), "other")


def short_kernel_name(name: str, width: int = 160) -> str:
    """A kernel's name without `void`, its argument list and torch's namespaces, cut to `width` characters."""
    name = name.removeprefix("void ")
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    for namespace in ("at::native::", "at::", "(anonymous namespace)::"):
        name = name.replace(namespace, "")
    return name if len(name) <= width else name[: width - 1] + "…"


def summarize_trace(trace: dict, iters: int, wall_s: float, top: int = 10) -> dict:
    """Per-call figures from a Chrome trace of torch.profiler over `iters` calls that took `wall_s` in all.

    Always: wall ms and the cast operators (`aten::_to_copy`, which autocast and `.to(dtype)` dispatch) with
    their CPU time. With device activity (a CUDA trace): kernels run; the time of kernels, copies and sets
    summed (`device_ms`) and as the union of their intervals (`gpu_busy_ms`), whose complement in the wall
    time is the GPU's idle share; launch calls and their CPU time; the time in cast/copy kernels and copies;
    the time by kind of kernel and the `top` kernels and copies by time; and the calls that make the CPU wait
    for the GPU inside the pass (a stream sync, as `.item()` or indexing a CPU tensor with a GPU one makes, or
    a blocking copy) with the time the CPU waited: each one stops the CPU from queueing work ahead.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    casts = [e for e in events if e.get("cat") == "cpu_op" and e.get("name") == "aten::_to_copy"]
    summary = {
        "iters": iters,
        "wall_ms": 1e3 * wall_s / iters,
        "cast_ops": len(casts) / iters,
        "cast_ops_cpu_ms": sum(e.get("dur", 0) for e in casts) / 1e3 / iters,
    }
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not device:
        return summary
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launches = [e for e in runtime if "Launch" in e.get("name", "")]
    # cudaDeviceSynchronize left out: the profiled calls end with one. (A name may end in CUPTI's "_vNNNN".)
    blocking = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
    syncs = [e for e in runtime if e.get("name", "").split("_v")[0] in blocking]
    busy_us, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in device):
        if stop > end:
            busy_us += stop - max(start, end)
            end = stop
    by_name: dict[str, list[float]] = {}
    for e in device:
        entry = by_name.setdefault(e["name"], [0, 0.0])
        entry[0] += 1
        entry[1] += e.get("dur", 0)
    total_us = sum(us for _, us in by_name.values())
    kinds: dict[str, float] = {}
    for name, (_, us) in by_name.items():
        kind = "cast/copy" if name.startswith(("Memcpy", "Memset")) else kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3 / iters
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    summary.update(
        kernels=sum(1 for e in device if e["cat"] == "kernel") / iters,
        device_ms=total_us / 1e3 / iters,
        gpu_busy_ms=busy_us / 1e3 / iters,
        gpu_idle_share=max(0.0, 1 - busy_us / 1e6 / wall_s),
        launch_calls=len(launches) / iters,
        launch_cpu_ms=sum(e.get("dur", 0) for e in launches) / 1e3 / iters,
        sync_calls=len(syncs) / iters,
        sync_wait_ms=sum(e.get("dur", 0) for e in syncs) / 1e3 / iters,
        cast_copy_ms=kinds.get("cast/copy", 0.0),
        kernel_ms_by_kind=dict(sorted(kinds.items(), key=lambda item: -item[1])),
        top_kernels=[
            {"name": short_kernel_name(name), "calls": calls / iters, "ms": us / 1e3 / iters, "share": us / total_us}
            for name, (calls, us) in ranked
        ],
    )
    return summary


def profile_pass(fn, device, iters: int = 3) -> dict:
    """`summarize_trace` of `iters` calls of `fn` under torch.profiler (CPU, and CUDA on a GPU), after one
    call outside it. The profiler's own overhead lengthens the wall time a little: read the idle share as an
    upper bound, beside the unprofiled timings. A profiler that fails is reported, not raised."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        fn()
        synchronize(device)
        with profile(activities=activities) as profiler:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            synchronize(device)
            wall_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "trace.json"
            profiler.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
    except Exception as error:  # noqa: BLE001 (a diagnostic: CUPTI or the trace may fail in many ways)
        print(f"profile failed: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {error}"}
    summary = summarize_trace(trace, iters, wall_s)
    print(f"profile: {json.dumps({k: v for k, v in summary.items() if k != 'top_kernels'})}")
    return summary


def dispatched_ops(fn, owners: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Operators one call of `fn` dispatches, by the module of `owners` they run in ("prior" outside them).

    Views are left out (they launch no kernel). At batch 1 on a GPU each operator costs a kernel launch and
    its Python and dispatcher overhead whatever its size, so the counts say how much of the restore's extra
    time over the bare pass is overhead that CUDA graphs (`--compile reduce-overhead`) would remove.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    stack: list[str] = []
    counts: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            view = func.is_view or torch.Tag.inplace_view in func.tags or func is aten._unsafe_view.default
            if not view:
                owner = stack[-1] if stack else "prior"
                counts[owner] = counts.get(owner, 0) + 1
            return func(*args, **(kwargs or {}))

    def enter(module, inputs, name):
        stack.append(name)

    def leave(module, inputs, output):
        stack.pop()

    handles = []
    for name, module in owners.items():
        for sub in module.modules():
            handles.append(sub.register_forward_pre_hook(lambda m, i, name=name: enter(m, i, name)))
            handles.append(sub.register_forward_hook(leave))
    try:
        with torch.no_grad(), Count():
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return {"total": sum(counts.values()), **dict(sorted(counts.items()))}


def bench_compiled(model: UniRestore, bare_pass, device, args, save=None) -> dict:
    """Both passes under torch.compile (`--compile MODE`), the weights cast as deployed (`--compile-precision`:
    bf16 and channels_last, or fp32).

    The restore starts from fixed noise (no generator inside the compiled graph). Compilation time is
    reported apart from the timing, and so are dynamo's graph breaks and the graphs CUDA graphs skipped
    (`reduce-overhead` replays only the graphs it could capture). The restore compiles first and `save(out)`
    keeps each pass's timing as it comes: a run stopped while compiling keeps the passes done. With
    `--profile`, both passes at batch 1 are profiled last: profiling CUDA graph replays has hung or crashed
    some CUDA versions.
    """
    from collections import Counter

    from torch._dynamo.utils import counters
    from torch.profiler import profile

    if args.profile and device.type == "cuda":
        with profile():  # the profiler set up before any CUDA graph is captured (torch's advice)
            pass
    counters.clear()
    dtype, memory_format = COMPILE_PRECISIONS[args.compile_precision]
    model.to(dtype=dtype, memory_format=memory_format)
    out = {"mode": args.compile, "precision": args.compile_precision}
    at_batch_1 = {}

    def keep() -> None:
        reasons = Counter()
        for reason, count in counters["graph_break"].items():
            reasons[reason.splitlines()[0][:160]] += count  # the reason's title; its explanation follows
        out["graph_breaks"] = reasons.total()
        out["graph_break_reasons"] = dict(reasons.most_common(8))
        out["graphs"] = counters["stats"]["unique_graphs"]
        out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        if "restore/b1" in out and "bare_prior/b1" in out:
            out["restore_over_bare_b1"] = out["restore/b1"]["seconds"] / out["bare_prior/b1"]["seconds"]
        if save is not None:
            save(out)

    # Static shapes: each batch size compiles for itself, as a deployment with a fixed batch would.
    compiled_bare = torch.compile(bare_pass, mode=args.compile, dynamic=False)
    for batch in args.compile_batches or (1, args.throughput_batch):
        images = torch.rand(batch, 3, args.size, args.size, device=device, dtype=dtype)
        images = images.contiguous(memory_format=memory_format)
        with torch.no_grad():
            latent_shape = model.encode(images).latents.shape
        noise = torch.randn(latent_shape, device=device, dtype=dtype)
        model.compile_restore(args.compile)  # as `restore --compile` and `eval --compile` run it

        def compiled_restore(x, noise=noise):
            return model.forward_padded(x, "pir", noise=noise)

        passes = (("restore", compiled_restore), ("bare_prior", compiled_bare))
        for name, fn in (item for item in passes if item[0] in args.compile_passes):
            with torch.no_grad():
                start = time.perf_counter()
                fn(images)
                synchronize(device)
                compile_s = time.perf_counter() - start
                seconds = timed(lambda fn=fn, images=images: fn(images), device, args.warmup, args.iters)
            out[f"{name}/b{batch}"] = {"seconds": seconds, "images_per_s": batch / seconds, "compile_s": compile_s}
            print(f"compiled {name:10s} batch {batch:2d}: {seconds * 1e3:8.1f} ms (compiled in {compile_s:.0f} s)")
            if batch == 1:
                at_batch_1[name] = lambda fn=fn, images=images: fn(images)
            keep()
    print(f"compiled: {out['graphs']} graphs, {out['graph_breaks']} graph breaks, "
          f"{out['cudagraph_skips']} skipped by CUDA graphs")  # fmt: skip
    if args.profile and at_batch_1:
        # a pass that has run no larger batch: batch 1 is timed as itself, not padded up to the last batch timed
        model.compile_restore(args.compile)
        with torch.no_grad():
            out["profile_b1"] = {name: profile_pass(fn, device) for name, fn in at_batch_1.items()}
    return out


def bench_training(model: UniRestore, device, args) -> dict:
    out = {}
    size, batch_size = args.size, args.train_batch
    clean = torch.rand(batch_size, 3, size, size, device=device)
    degraded = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
    batch = {"hq": clean, "lq": degraded, "label": torch.randint(0, 1000, (batch_size,), device=device)}
    stage_sets = {1: ("cfrm", "controller", "sc_tuners"), 2: ("tfa", "prompts")}
    task = StandInClassification(device)
    level_weights = TrainConfig().cfrm_weights_for(model.num_taps)  # the release's (0.1, 0.1, 0.01) at SD scale
    variants = [(precision, dtype, checkpointing, False) for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16))
                for checkpointing in (False, True)]  # fmt: skip
    variants.append(("bf16-channels-last", torch.bfloat16, False, True))  # NHWC convolutions, as cuDNN prefers
    for precision, dtype, checkpointing, channels_last in variants:
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model.config.gradient_checkpointing = checkpointing
        for stage, names in stage_sets.items():
            for name, module in model.components().items():
                module.requires_grad_(name in names)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-5)
            generator = torch.Generator(device=device).manual_seed(0)

            def step(stage=stage, dtype=dtype, optimizer=optimizer, generator=generator):
                autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
                with autocast:
                    if stage == 1:
                        terms = stage1_losses(
                            model, clean, degraded, {"cfrm": 1.0, "control": 1.0}, level_weights, generator
                        )
                    else:
                        latents, features = decoder_inputs(model, clean, degraded, generator=generator)
                        terms = task_losses(model, task, batch, latents, features, beta=1.0)
                loss = sum(terms.values())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            reset_peak(device)
            try:
                seconds = timed(step, device, warmup=1, iters=max(1, args.iters // 2))
                record = {"seconds": seconds, "peak_gib": peak_memory(device)}
            except torch.OutOfMemoryError:
                record = {"seconds": None, "peak_gib": None, "error": "out of memory"}
            key = f"stage{stage}/{precision}/{'ckpt' if checkpointing else 'no-ckpt'}"
            out[key] = record
            print(f"train {key}: {record}")
            del optimizer
    model.config.gradient_checkpointing = False
    model.to(memory_format=torch.contiguous_format)

    # Stage 2 as implemented against the straightforward step, timed and compared on the same draws.
    for name, module in model.components().items():
        module.requires_grad_(name in stage_sets[2])
    model.train()

    def ours(inputs=decoder_inputs):
        torch.manual_seed(7)
        latents, features = inputs(model, clean, degraded)
        return task_losses(model, task, batch, latents, features, beta=1.0)

    def naive():
        return straightforward_stage2_step(model, task, batch, 7)

    variants = [("implemented", ours), ("straightforward", naive)]
    if args.compile != "none":  # `train.compile`: the decoder inputs compiled, the same draws
        compiled = compiled_decoder_inputs()
        variants.append(("implemented_compiled", lambda: ours(compiled)))
    comparison = {}
    for label, fn in variants:
        def step(fn=fn):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                terms = fn()
            sum(terms.values()).backward()
            model.zero_grad(set_to_none=True)
            return terms

        reset_peak(device)
        seconds = timed(step, device, warmup=1, iters=max(1, args.iters // 2))
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            terms = fn()
        comparison[label] = {
            "seconds": seconds,
            "peak_gib": peak_memory(device),
            "losses": {k: float(v) for k, v in terms.items()},
        }
    for label in comparison.copy():
        if label.startswith("implemented"):
            speedup = comparison["straightforward"]["seconds"] / comparison[label]["seconds"]
            comparison[label.replace("implemented", "speedup")] = speedup
    out["stage2_comparison"] = comparison
    return out


def summary_lines(results: dict) -> list[str]:
    files = results.get("restore_files") or {"images": 0, "io_threads_0": float("nan"), "io_threads_2": float("nan")}
    lines = [
        "",
        f"- restore / bare prior pass, bf16 batch 1: **{results['restore_over_bare_bf16_b1']:.2f}×** (target ≤ 1.3×)",
        (
            "- restore / bare prior pass decoded with the same sub-pixel upsamplers, bf16 batch 1: "
            f"**{results.get('restore_over_bare_subpixel_bf16_b1', float('nan')):.2f}×**"
        ),
        f"- fp32 / bf16 restore time, batch 1: **{results['fp32_over_bf16_restore_b1']:.2f}×** (target ≥ 2×)",
        (
            f"- with bf16 weights and channels_last: restore / bare prior **"
            f"{results.get('restore_over_bare_bf16_weights_b1', float('nan')):.2f}×**, fp32 / bf16 **"
            f"{results.get('fp32_over_bf16_weights_restore_b1', float('nan')):.2f}×**"
        ),
        (
            f"- three prompts (pir, seg, cls) from one encode and denoise, bf16 weights, batch 1: **"
            f"{results.get('three_prompts_over_one_restore_b1', float('nan')):.2f}×** one restore's time "
            "(three restores: 3×)"
        ),
        (
            f"- `restore_files` (the restore command's loop) over {files['images']} PNG files, three prompts, bf16 "
            f"weights: {files['io_threads_0']:.2f} s reading and writing in turn, {files['io_threads_2']:.2f} s "
            "reading ahead and writing in two threads"
        ),
        (
            f"- FLOPs of one restore: {results['flops']['restore'] / 1e12:.2f} TFLOP "
            f"(bare prior pass {results['flops']['bare_prior'] / 1e12:.2f} TFLOP)"
        ),
    ]
    if results.get("bf16_peak_tflops"):
        lines.append(
            f"- measured bf16 matrix peak {results['bf16_peak_tflops']:.0f} TFLOP/s; restore reaches "
            f"{results['achieved_tflops_bf16_b1']:.0f} TFLOP/s at batch 1 ({100 * results['share_of_peak_b1']:.1f} %) "
            f"and {results['achieved_tflops_bf16_throughput']:.0f} TFLOP/s at batch 16 "
            f"({100 * results['share_of_peak_throughput']:.1f} %)"
        )
    return lines


def profile_lines(profiles: dict, top_of: tuple[str, ...] = ()) -> list[str]:
    """Tables of `profile_pass` summaries by pass: totals, kernel time by kind, and the top kernels of `top_of`."""
    def cell(summary, key, form):
        return "" if key not in summary else format(summary[key] * (100 if key.endswith("share") else 1), form)

    iters = next((summary["iters"] for summary in profiles.values() if "iters" in summary), 0)
    lines = [
        "",
        (
            f"| profile, batch 1 ({iters} calls) | wall ms (profiled) | GPU busy ms | GPU idle % | kernels | "
            "launch calls | launch CPU ms | syncs | sync wait ms | cast/copy kernel ms | cast ops | cast ops CPU ms |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    columns = (("wall_ms", ".1f"), ("gpu_busy_ms", ".1f"), ("gpu_idle_share", ".0f"), ("kernels", ".0f"),
               ("launch_calls", ".0f"), ("launch_cpu_ms", ".1f"), ("sync_calls", ".0f"), ("sync_wait_ms", ".1f"),
               ("cast_copy_ms", ".2f"), ("cast_ops", ".0f"), ("cast_ops_cpu_ms", ".1f"))  # fmt: skip
    for name, summary in profiles.items():
        if "error" in summary:
            lines.append(f"| {name} | {summary['error']} |" + " |" * (len(columns) - 1))
        else:
            lines.append(f"| {name} | " + " | ".join(cell(summary, key, form) for key, form in columns) + " |")
    kinds = list(dict.fromkeys(kind for summary in profiles.values() for kind in summary.get("kernel_ms_by_kind", {})))
    if kinds:
        lines += ["", "| kernel ms by kind | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for name, summary in profiles.items():
            by_kind = summary.get("kernel_ms_by_kind", {})
            lines.append(f"| {name} | " + " | ".join(f"{by_kind.get(kind, 0.0):.2f}" for kind in kinds) + " |")
    for name in top_of:
        top = profiles.get(name, {}).get("top_kernels")
        if top:
            lines += ["", f"| top kernels, {name} | calls | ms | share % |", "|---|---|---|---|"]
            lines += [f"| `{k['name']}` | {k['calls']:.0f} | {k['ms']:.2f} | {100 * k['share']:.1f} |" for k in top]
    return lines


def markdown(results: dict) -> str:
    lines = [
        f"### Real scale ({results['scale']}, random weights) on {results['device']}",
        "",
        f"torch {results['torch']}, images {results['size']}², wall time {results.get('wall_s', 0):.0f} s.",
    ]
    if results["timings"]:
        lines += ["", "| pass | precision | batch | ms / batch | images / s | peak GiB |", "|---|---|---|---|---|---|"]
    for key, value in results["timings"].items():
        name, precision, batch = key.split("/")
        peak = value["peak_gib"]
        lines.append(
            f"| {name} | {precision} | {batch[1:]} | {value['seconds'] * 1e3:.1f} | {value['images_per_s']:.2f} | "
            f"{'' if peak is None else f'{peak:.2f}'} |"
        )
    if "restore_over_bare_bf16_b1" in results:  # absent from a run stopped earlier, or --compile-only
        lines += summary_lines(results)
    parts = results.get("parts_bf16_b1")
    if parts:
        lines += ["", "| part (bf16, batch 1, each alone) | ms |", "|---|---|"]
        lines += [f"| {name} | {seconds * 1e3:.2f} |" for name, seconds in parts.items()]
        extra = {
            "CFRM": parts["encoder with CFRM"] - parts["encoder"],
            "Controller": parts["Controller"],
            "SC-Tuners": parts["UNet with SC-Tuners"] - parts["UNet"],
            "TFA": parts["decoder with TFA"] - parts["decoder"],
        }
        lines += ["", "- the restore's extra over the bare pass, by module: "
                  + ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in extra.items())]
    ops = results.get("dispatched_ops_b1")
    if ops:
        restore = ops["restore"]
        by_module = ", ".join(f"{name} {count}" for name, count in restore.items() if name != "total")
        lines += [
            "",
            (
                f"- operators dispatched at batch 1 (views left out; bf16 weights): bare prior pass "
                f"{ops['bare_prior']['total']}, restore {restore['total']} ({by_module})"
            ),
        ]
    if results.get("profile_b1"):
        lines += profile_lines(results["profile_b1"], top_of=("bare_prior/bf16", "restore/bf16"))
    compiled = results.get("compiled")
    if compiled:
        lines += ["", f"| torch.compile ({compiled['mode']}), {compiled.get('precision', 'bf16')} weights | batch | ms / batch | compile s |",
                  "|---|---|---|---|"]
        for key, value in compiled.items():
            if "/" in key:
                name, batch = key.split("/")
                lines.append(f"| {name} | {batch[1:]} | {value['seconds'] * 1e3:.1f} | {value['compile_s']:.0f} |")
        if "restore_over_bare_b1" in compiled:
            lines += ["", f"- compiled restore / compiled bare prior pass, batch 1: **{compiled['restore_over_bare_b1']:.2f}×**"]
        if "graphs" in compiled:
            reasons = "; ".join(f"{count}× {reason}" for reason, count in compiled["graph_break_reasons"].items())
            lines.append(
                f"- dynamo: {compiled['graphs']} graphs, {compiled['graph_breaks']} graph breaks"
                f"{f' ({reasons})' if reasons else ''}; graphs CUDA graphs skipped: {compiled['cudagraph_skips']}"
            )
        if compiled.get("profile_b1"):
            lines += profile_lines({f"{name}/compiled": value for name, value in compiled["profile_b1"].items()})
    training = results.get("training")
    if training:
        lines += ["", "| training step | precision | gradient checkpointing | s / step | peak GiB |", "|---|---|---|---|---|"]
        for key, value in training.items():
            if key == "stage2_comparison":
                continue
            stage, precision, ckpt = key.split("/")
            seconds = "OOM" if value["seconds"] is None else f"{value['seconds']:.3f}"
            peak = "" if value["peak_gib"] is None else f"{value['peak_gib']:.1f}"
            lines.append(f"| {stage} | {precision} | {'yes' if ckpt == 'ckpt' else 'no'} | {seconds} | {peak} |")
        comparison = training["stage2_comparison"]
        lines += [
            "",
            (
                f"- stage 2 (bf16): {comparison['implemented']['seconds']:.3f} s/step as implemented vs "
                f"{comparison['straightforward']['seconds']:.3f} s/step re-running the pipeline per prompt: "
                f"**{comparison['speedup']:.2f}×** (target ≥ 1.5×); losses "
                f"{comparison['implemented']['losses']} vs {comparison['straightforward']['losses']}"
            ),
        ]
        if "implemented_compiled" in comparison:
            compiled = comparison["implemented_compiled"]
            lines.append(
                f"- stage 2 (bf16) with its decoder inputs compiled (`train.compile`): {compiled['seconds']:.3f} s/step, "
                f"**{comparison['speedup_compiled']:.2f}×** the straightforward step; losses {compiled['losses']}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
