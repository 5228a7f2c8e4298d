"""The real-scale speed benchmark, run at the tiny scale on the CPU so that the script keeps working."""

import json

from unirestore.experiments.bench_gpu import main


def test_bench_gpu_runs_every_measurement_and_writes_its_report(tmp_path):
    args = ["--scale", "tiny", "--device", "cpu", "--size", "64", "--throughput-batch", "2", "--train-batch", "1",
            "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]
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
