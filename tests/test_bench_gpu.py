"""The real-scale speed benchmark, run at the tiny scale on the CPU so that the script keeps working."""

import json

import pytest

from unirestore.experiments.bench_gpu import main


def test_bench_gpu_runs_every_measurement_and_writes_its_report(tmp_path):
    args = ["--scale", "tiny", "--device", "cpu", "--size", "64", "--throughput-batch", "2", "--train-batch", "1",
            "--iters", "1", "--warmup", "0", "--profile", "--out", str(tmp_path)]
    results = main(args)
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["restore_over_bare_bf16_b1"] == results["restore_over_bare_bf16_b1"] > 0
    for precision in ("fp32", "bf16", "bf16-weights-cl"):
        for batch in (1, 2):
            assert saved["timings"][f"restore/{precision}/b{batch}"]["seconds"] > 0
    assert saved["timings"]["bare_prior_subpixel/bf16/b1"]["seconds"] > 0
    assert saved["timings"]["restore_3_prompts/bf16-weights-cl/b1"]["seconds"] > 0
    assert saved["three_prompts_over_one_restore_b1"] > 0
    assert saved["flops"]["restore"] > saved["flops"]["bare_prior"] > 0
    assert set(saved["parts_bf16_b1"]) >= {"encoder with CFRM", "Controller", "decoder with TFA"}
    ops = saved["dispatched_ops_b1"]
    restore = ops["restore"]
    assert set(restore) == {"total", "prior", "cfrm", "controller", "sc_tuners", "tfa"}
    assert restore["total"] == sum(v for k, v in restore.items() if k != "total")
    # the restore runs the prior's pass and more: the prior's share alone is about the bare pass
    assert restore["total"] > ops["bare_prior"]["total"] and restore["prior"] >= ops["bare_prior"]["total"]
    training = saved["training"]
    assert {f"stage{s}/{p}/{c}" for s in (1, 2) for p in ("fp32", "bf16") for c in ("ckpt", "no-ckpt")} <= set(training)
    assert {"stage1/bf16-channels-last/no-ckpt", "stage2/bf16-channels-last/no-ckpt"} <= set(training)
    comparison = training["stage2_comparison"]
    # The implemented stage 2 computes the straightforward step's losses (bf16 rounding apart).
    for key, value in comparison["implemented"]["losses"].items():
        assert abs(value - comparison["straightforward"]["losses"][key]) <= 0.02 * abs(value) + 1e-3
    report = (tmp_path / "bench_gpu.md").read_text()
    assert "restore / bare prior pass" in report and "stage 2 (bf16)" in report
    assert "three prompts (pir, seg, cls) from one encode and denoise" in report
    assert saved["restore_files"]["io_threads_0"] > 0 and saved["restore_files"]["io_threads_2"] > 0
    assert "`restore_files` (the restore command's loop) over 8 PNG files" in report
    profiles = saved["profile_b1"]
    assert set(profiles) == {f"{name}/{precision}" for name in ("bare_prior", "restore")
                             for precision in ("fp32", "bf16", "bf16-weights-cl")}  # fmt: skip
    for summary in profiles.values():
        assert summary["iters"] == 3 and summary["wall_ms"] > 0
        assert "gpu_idle_share" not in summary and "top_kernels" not in summary  # no device columns on a CPU
    # autocast casts the fp32 weights at each operator; bf16 weights leave only the casts of the pass itself
    assert profiles["restore/bf16"]["cast_ops"] > profiles["restore/bf16-weights-cl"]["cast_ops"] > 0
    assert "| profile, batch 1 (3 calls) |" in report and "| restore/bf16 |" in report


def test_bench_gpu_training_only_times_the_training_steps_alone(tmp_path, monkeypatch):
    import torch

    with pytest.raises(SystemExit):
        main(["--training-only", "--skip-training"])
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic, **_: compile_(fn, backend="eager", dynamic=dynamic))
    main(["--scale", "tiny", "--device", "cpu", "--size", "64", "--train-batch", "1", "--iters", "1",
          "--training-only", "--compile", "default", "--out", str(tmp_path)])  # fmt: skip
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["timings"] == {} and "compiled" not in saved and "flops" not in saved
    comparison = saved["training"]["stage2_comparison"]
    assert set(comparison) == {"implemented", "straightforward", "implemented_compiled", "speedup", "speedup_compiled"}
    for key, value in comparison["implemented"]["losses"].items():  # the same draws, compiled or not
        assert value == pytest.approx(comparison["implemented_compiled"]["losses"][key], rel=1e-3)
    assert comparison["speedup_compiled"] > 0 and comparison["speedup"] > 0
    assert "with its decoder inputs compiled (`train.compile`)" in (tmp_path / "bench_gpu.md").read_text()


def test_bench_gpu_keeps_what_it_measured_when_a_later_part_fails(tmp_path, monkeypatch):
    """The report is written after each part: a run that fails (or is stopped) halfway keeps its figures."""
    from unirestore.experiments import bench_gpu

    def fail(*args, **kwargs):
        raise RuntimeError("a later part failed")

    monkeypatch.setattr(bench_gpu, "time_parts", fail)
    args = ["--scale", "tiny", "--device", "cpu", "--size", "64", "--throughput-batch", "2", "--iters", "1",
            "--warmup", "0", "--skip-training", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(RuntimeError, match="a later part failed"):
        main(args)
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["timings"]["restore/bf16/b1"]["seconds"] > 0 and saved["restore_over_bare_bf16_b1"] > 0
    assert "parts_bf16_b1" not in saved
    assert "restore / bare prior pass, bf16 batch 1" in (tmp_path / "bench_gpu.md").read_text()


def test_summarize_trace_reads_kernels_launches_casts_and_the_gpus_idle_time():
    from unirestore.experiments.bench_gpu import short_kernel_name, summarize_trace

    cast = ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda("
            "at::TensorIteratorBase&)::{lambda(float)#1}, std::array<char*, 2ul> >(int, "
            "at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda(float)#1}, std::array<char*, 2ul>)")
    conv = "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64"
    gemm = "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT"

    def event(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    # Two calls: in each, a cast kernel overlapping a convolution (busy 15 µs), a GEMM and a host-to-device copy;
    # the profiled calls end with a device sync, which is no sync inside a pass.
    trace = {"traceEvents": [{"ph": "M", "name": "process_name"}]}
    for offset in (0, 1000):
        trace["traceEvents"] += [
            event("cpu_op", "aten::_to_copy", offset, 30),
            event("cuda_runtime", "cudaLaunchKernel", offset + 1, 4),
            event("cuda_driver", "cuLaunchKernelEx", offset + 2, 4),
            event("cuda_runtime", "cudaMemcpyAsync", offset + 3, 2),
            event("cuda_runtime", "cudaStreamSynchronize", offset + 5, 90),  # an .item() waiting for the GPU
            event("kernel", cast, offset + 100, 10),
            event("kernel", conv, offset + 105, 10),
            event("kernel", gemm, offset + 300, 5),
            event("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", offset + 400, 2),
        ]
    trace["traceEvents"].append(event("cuda_runtime", "cudaDeviceSynchronize", 1500, 10))
    summary = summarize_trace(trace, iters=2, wall_s=2e-3)
    assert summary["wall_ms"] == pytest.approx(1.0) and summary["cast_ops"] == 1
    assert summary["cast_ops_cpu_ms"] == pytest.approx(0.030)
    assert summary["kernels"] == 3 and summary["launch_calls"] == 2
    assert summary["launch_cpu_ms"] == pytest.approx(0.008)
    assert summary["sync_calls"] == 1 and summary["sync_wait_ms"] == pytest.approx(0.090)
    assert summary["device_ms"] == pytest.approx(0.027) and summary["gpu_busy_ms"] == pytest.approx(0.022)
    assert summary["gpu_idle_share"] == pytest.approx(1 - 0.022)
    assert summary["cast_copy_ms"] == pytest.approx(0.012)
    assert summary["kernel_ms_by_kind"] == pytest.approx({"cast/copy": 0.012, "convolution": 0.010, "matmul": 0.005})
    top = summary["top_kernels"]
    assert [k["ms"] for k in top] == pytest.approx([0.010, 0.010, 0.005, 0.002])
    assert top[0]["calls"] == 1 and sum(k["share"] for k in top) == pytest.approx(1.0)
    assert short_kernel_name(cast) == ("vectorized_elementwise_kernel<4, bfloat16_copy_kernel_cuda(TensorIteratorBase&)"
                                       "::{lambda(float)#1}, std::array<char*, 2ul> >")
    assert short_kernel_name("k" * 200, width=50) == "k" * 49 + "…"
    # a CPU trace has no device columns
    assert set(summarize_trace({"traceEvents": trace["traceEvents"][:2]}, iters=1, wall_s=1.0)) == {
        "iters", "wall_ms", "cast_ops", "cast_ops_cpu_ms"}


def test_bench_gpu_compile_only_times_the_compiled_passes_alone(tmp_path, monkeypatch):
    import torch

    with pytest.raises(SystemExit):
        main(["--compile-only"])  # nothing to time without --compile
    torch._dynamo.reset()  # the graphs are counted from here: none reused from another test's passes
    compile_ = torch.compile
    inputs = []  # (dtype, channels_last) of the images each compiled pass gets

    def eager_compile(fn, mode, dynamic):
        # dynamo captures the passes as for inductor; the eager backend spares minutes of code generation on a CPU
        compiled = compile_(fn, backend="eager", dynamic=dynamic)

        def run(images, *rest):
            inputs.append((images.dtype, images.is_contiguous(memory_format=torch.channels_last)))
            return compiled(images, *rest)

        return run

    monkeypatch.setattr(torch, "compile", eager_compile)
    args = ["--scale", "tiny", "--device", "cpu", "--size", "64", "--iters", "1", "--warmup", "0",
            "--compile", "reduce-overhead", "--compile-only", "--compile-batches", "1", "--profile",
            "--out", str(tmp_path)]  # fmt: skip
    main(args)
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["timings"] == {} and "flops" not in saved and "training" not in saved
    compiled = saved["compiled"]
    assert compiled["mode"] == "reduce-overhead"
    assert {key for key in compiled if "/" in key} == {"bare_prior/b1", "restore/b1"}
    assert compiled["restore_over_bare_b1"] > 0 and compiled["graphs"] >= 2
    assert 0 <= sum(compiled["graph_break_reasons"].values()) <= compiled["graph_breaks"]
    assert set(compiled["profile_b1"]) == {"bare_prior", "restore"}
    report = (tmp_path / "bench_gpu.md").read_text()
    assert "| torch.compile (reduce-overhead), bf16 weights |" in report and "- dynamo: " in report
    assert "| bare_prior/compiled |" in report
    assert compiled["graphs"] == 2 and compiled["graph_breaks"] == 0  # each pass one graph
    assert set(inputs) == {(torch.bfloat16, True)}  # as `restore --precision bf16 --compile` casts
    inputs.clear()
    main([*args[:-1], str(tmp_path / "fp32"), "--compile-precision", "fp32"])
    compiled = json.loads((tmp_path / "fp32" / "bench_gpu.json").read_text())["compiled"]
    assert compiled["precision"] == "fp32" and set(inputs) == {(torch.float32, False)}  # as `restore --compile`
    assert "| torch.compile (reduce-overhead), fp32 weights |" in (tmp_path / "fp32" / "bench_gpu.md").read_text()
    main([*args[:-1], str(tmp_path / "restore"), "--compile-passes", "restore"])
    compiled = json.loads((tmp_path / "restore" / "bench_gpu.json").read_text())["compiled"]
    assert {key for key in compiled if "/" in key} == {"restore/b1"} and "restore_over_bare_b1" not in compiled
    assert "| restore | 1 |" in (tmp_path / "restore" / "bench_gpu.md").read_text()
