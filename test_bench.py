"""bench.py: its timer measures what the device did, its FLOP count matches a hand count, and the
whole benchmark runs on a CPU at tiny settings and reports every row (RESULTS.md's speed tables
come from it)."""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import bench
from runs import precision_for
from conftest import ROOT, TINY_MODEL, run_script

CPU = torch.device("cpu")


def test_measure_times_a_known_sleep():
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.02)

    times, warmup_seconds = bench.measure(step, CPU, warmup=2, steps=3, repeats=4)
    assert len(times) == 4 and len(calls) == 2 + 3 * 4  # warm-up calls happen, outside the times
    for t in times:  # seconds per call
        assert 0.02 <= t < 0.05  # not 0.06: the time is per call, not per repeat
    assert 0.04 <= warmup_seconds < 0.08  # the two warm-up calls together (torch.compile's cost)


def test_measure_waits_for_queued_device_work(monkeypatch):
    """A stand-in device: step() only queues 50 ms of work on a one-thread 'stream' and returns
    at once, as a CUDA kernel launch does. Without the closing synchronisation each step would
    time as ~0 ms; without the opening one the first repeat would also pay for the warm-up's
    queued work (~100 ms)."""
    stream = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(bench, "synchronize", lambda device: stream.submit(lambda: None).result())
    step = lambda: stream.submit(time.sleep, 0.05)
    times, warmup_seconds = bench.measure(step, torch.device("cuda"), warmup=1, steps=1, repeats=3)
    stream.shutdown()
    for t in times:
        assert 0.05 <= t < 0.09
    assert 0.05 <= warmup_seconds < 0.09  # the warm-up's queued work waited for as well


def test_flop_count_matches_a_hand_count():
    """Forward FLOPs = sum over convolutions and linear layers of 2 x multiply-adds, counted here
    from each layer's shapes; backward is twice that, less the first convolution (the image needs
    no gradient)."""
    cfg = bench.BenchConfig(arch="resnet18", width_multiplier=0.125, image_size=32)
    model = bench.build_model(cfg).train()
    counts = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            counts.append(2 * output[0].numel() * k)  # per image: C_out x H x W outputs, k MACs each
        else:
            counts.append(2 * module.in_features * module.out_features)

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    model(torch.rand(2, 3, 32, 32))
    forward, backward = bench.model_flops_per_view(cfg)
    assert forward == sum(counts)
    assert backward == 2 * sum(counts) - counts[0]


def test_peak_table_picks_the_right_gpu():
    assert bench.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench.bf16_peak_tflops("NVIDIA H100 PCIe") == 756
    assert bench.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bench.bf16_peak_tflops("NVIDIA L40S") == 362
    assert bench.bf16_peak_tflops("NVIDIA L4") == 121
    assert bench.bf16_peak_tflops("Tesla T4") is None


@pytest.mark.parametrize("dataset, source", [("folder", "1 workers"), ("cifar10", "in memory")])
def test_bench_runs_on_cpu_and_reports_every_row(dataset, source, tiny_folder, tmp_path):
    out = tmp_path / "bench.json"
    # One compute thread: on a small shared CPU, threads that wait for each other are what slows.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = run_script("bench.py", "--dataset", dataset, "--data-dir", tiny_folder, *TINY_MODEL,
                      "--no-blur", "--batch-size", "8", "--workers", "1", "--warmup", "1",
                      "--steps", "2", "--repeats", "2", "--out", out, env=env)
    assert time.time() - start < 60
    for title in (f"1 data pipeline ({source})", "2 step, batch in memory", "3 step fed by the pipeline",
                  "loss (NT-Xent", "GFLOPs forward per view"):
        assert title in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"data", "memory", "full"}
    for name, row in result["rows"].items():
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0 and row["peak_memory_mb"] > 0
        assert len(row["ms_per_step_repeats"]) == 2
        assert row["images_per_s"] == pytest.approx(8 / (row["ms_per_step"] / 1000))
    # an epoch is the dataset's 48 images (6 steps of 8), as pretrain.py would run it, and says so
    assert result["epoch_images"] == 48 and "6 steps of 8, 48 images, the dataset's" in proc.stdout
    for name in ("memory", "full"):
        assert result["rows"][name]["epoch_s"] == pytest.approx(48 / result["rows"][name]["images_per_s"])
        assert result["rows"][name]["achieved_tflops"] > 0
        assert result["rows"][name]["peak_fraction"] is None  # no bf16 peak for a CPU
    assert result["rows"]["data"]["first_batch_s"] > 0
    assert 0 < result["loss_share"] < 1 and 0 < result["optimizer_share"] < 1
    assert result["forward_gflops_per_view"] > 0
    assert result["train_gflops_per_image"] > 2 * result["forward_gflops_per_view"]
    assert result["device"] == "cpu" and result["precision"] == precision_for("auto", torch.device("cpu"))[0]


def test_the_checkpoint_row_writes_the_runs_checkpoint_and_leaves_nothing(tiny_folder, tmp_path):
    """--rows checkpoint: the size written is that of the model and optimizer state (checked
    against torch.save of a model and LARS state built here), the time positive, and its
    temporary folder is gone afterwards."""
    import io
    from model import build_model, build_optimizer
    out = tmp_path / "bench.json"
    run_script("bench.py", "--dataset", "folder", "--data-dir", tiny_folder, *TINY_MODEL,
               "--batch-size", "8", "--rows", "checkpoint", "--repeats", "2", "--out", out)
    result = json.loads(out.read_text())["checkpoint"]
    model = build_model(bench.Config(arch="resnet18", width_multiplier=0.125, image_size=32))
    optimizer = build_optimizer(model, "lars", 0.1, 1e-6)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict()), buffer)
    assert result["mb"] == pytest.approx(buffer.tell() / 1e6, rel=0.1)
    assert result["seconds"] > 0 and len(result["seconds_repeats"]) == 2
    assert not list(ROOT.glob(".bench-checkpoint-*"))


def test_bad_rows_is_one_line_error(tiny_folder):
    proc = run_script("bench.py", "--dataset", "folder", "--data-dir", tiny_folder, "--rows",
                      "memory,speed", "--image-size", 32, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("bench.py: error: --rows") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_folder_of_small_images_is_measured_as_pretrain_py_trains_it(tiny_folder):
    """Not at the folder preset's 224 px (7x the images): refused as pretrain.py refuses it, and
    at 32 px with the CIFAR recipe."""
    proc = run_script("bench.py", "--dataset", "folder", "--data-dir", tiny_folder, check=False)
    assert proc.returncode == 1 and "would upscale them 7.0x" in proc.stderr
    from bench import BenchConfig
    from pretrain import parse_with_presets
    cfg, _ = parse_with_presets(["--dataset", "folder", "--data-dir", str(tiny_folder),
                                 "--image-size", "32"], BenchConfig)
    assert (cfg.blur, cfg.color_strength, cfg.temperature) == (False, 0.5, 0.5)


def test_the_worker_row_times_both_workers_on_mosaics(tiny_folder, tmp_path):
    """--rows worker alone: this project's worker, torchvision's and the decodes, on JPEG
    mosaics made from the folder in a temporary folder that is gone afterwards; the cores per
    device for a given step rate."""
    out = tmp_path / "w.json"
    proc = run_script("bench.py", "--rows", "worker", "--dataset", "folder", "--data-dir",
                      tiny_folder, "--image-size", "64", "--mosaics", "6", "--worker-images", "6",
                      "--repeats", "1", "--step-rate", "1000", "--out", out)
    worker = json.loads(out.read_text())["worker"]
    assert worker["images"] == 6 and worker["views"] == 2 and max(worker["image_size"]) >= 400
    rates = [worker[f"{n}_images_per_s"] for n in ("ours", "torchvision", "decode", "decode_pil")]
    assert all(r > 0 for r in rates)
    assert worker["ratio"] == pytest.approx(rates[0] / rates[1])
    assert f"{1000 / rates[0]:.1f} cores per device" in proc.stdout
    assert not list(ROOT.glob(".bench-mosaics-*"))
