"""The CUDA path, on a GPU: bf16 and fp16 steps, channels_last, torch.compile, a torchrun job on
NCCL with SyncBatchNorm whose checkpoint loads on a CPU, every script on CUDA, bench.py's rows,
and a training step that never makes the host wait for the GPU. Where torch sees no CUDA GPU
(CI has none) every test here is skipped, with that reason; on a GPU machine the README's test
command runs them with the rest."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from runs import load_checkpoint
from conftest import ROOT, TINY_MODEL, TINY_PRETRAIN, run_script
from data import InMemory, ResumableSampler, ViewLoader, build_augmentation
from objective import build_objective
from model import build_model, build_optimizer, convert_to_global_bn
from pretrain import Config, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU: the GPU path is tested on a GPU machine")
CUDA = torch.device("cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OBJECTIVE = build_objective("nt-xent", 0.5)


def small_model():
    torch.manual_seed(0)
    model = build_model(Config(arch="resnet18", width_multiplier=0.25, image_size=32)).to(CUDA)
    return model.to(memory_format=torch.channels_last)


def fixed_views(n=64):
    """Two augmented views of n random images, made on the GPU: n x 3 x 32 x 32 each."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=CUDA)
    augment = build_augmentation(32, "crop,color", 0.5)
    return augment(images), augment(images)


def step(model, optimizer, scaler, views, dtype):
    """pretrain.py's step under autocast: forward of both views, NT-Xent, backward, LARS."""
    autocast = torch.autocast("cuda", dtype=dtype)
    return train_step(model, *views, optimizer, OBJECTIVE, scaler, autocast)[0]


def train_fixed_batch(precision, compile=False, steps=8):
    model = small_model()
    optimizer = build_optimizer(model, "lars", 0.5, 1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    run = torch.compile(model) if compile else model
    x = fixed_views()
    losses = [step(run, optimizer, scaler, x, DTYPES[precision]).item() for _ in range(steps)]
    return losses, scaler


# ------------------------------------------------------------------------------ the step itself


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_lower_the_loss_on_a_fixed_batch(precision):
    """In fp32 on a CPU these 8 steps take the loss from 4.89 to 4.08."""
    losses, scaler = train_fixed_batch(precision)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    if precision == "fp16":  # the gradient scaler ran and kept a usable scale
        assert scaler.is_enabled() and 0 < scaler.get_scale() < float("inf")


def test_channels_last_computes_what_the_default_layout_computes():
    model = small_model().eval()
    x = torch.cat(fixed_views(16)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        h_last, _ = model(x)
        h_plain, _ = model.to(memory_format=torch.contiguous_format)(x.contiguous())
    assert (h_last - h_plain).norm() <= 1e-2 * h_plain.norm()  # cuDNN kernels differ, TF32


def test_compile_trains_as_eager_does():
    eager, _ = train_fixed_batch("bf16", steps=3)
    compiled, _ = train_fixed_batch("bf16", compile=True, steps=3)
    assert all(math.isfinite(v) for v in compiled)
    assert abs(compiled[0] - eager[0]) < 0.05 and compiled[-1] < compiled[0]


def test_a_training_step_never_waits_for_the_gpu():
    """After the epoch's order is copied to the GPU (once, before its first batch), neither the
    batch (indexing, augmentation) nor the step (bf16 forward, NT-Xent, backward, LARS)
    synchronises: the host queues step k+1 while the GPU runs step k."""
    data = InMemory(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device=CUDA),
                    torch.randint(0, 10, (256,), device=CUDA), [str(c) for c in range(10)])
    sampler = ResumableSampler(data, 1, 0, shuffle=True, seed=0, drop_last=True)
    batches = iter(ViewLoader(data, sampler, 32, [build_augmentation(32, "crop,color", 0.5)] * 2,
                              CUDA, 0))
    model = small_model()
    optimizer = build_optimizer(model, "lars", 0.5, 1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    step(model, optimizer, scaler, next(batches)[0], torch.bfloat16)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(model, optimizer, scaler, next(batches)[0], torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_global_bn_on_cuda_is_syncbatchnorm():
    model = convert_to_global_bn(small_model())
    kinds = {type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}
    assert kinds == {"SyncBatchNorm"}


# ------------------------------------------------------------------------------ the scripts


def test_torchrun_on_nccl_with_syncbn_writes_a_checkpoint_the_cpu_loads(tiny_folder, tmp_path):
    """One process under torchrun takes the path of eight: NCCL, SyncBatchNorm, DDP, bf16."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
         "--master-port=29514", str(ROOT / "pretrain.py"),
         *map(str, [*TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", tmp_path,
                    "--device", "cuda", "--epochs", 1])],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 process(es) on cuda | bf16 | global BN" in proc.stdout
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")  # map_location cpu
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])  # strict: SyncBatchNorm's keys are BatchNorm's
    h, z = model.eval()(torch.rand(2, 3, 32, 32))
    assert torch.isfinite(h).all() and torch.isfinite(z).all()


def test_every_script_runs_a_step_on_cuda(pretrained_checkpoint, tiny_folder, tmp_path):
    cuda = ["--device", "cuda", "--workers", "1"]
    out = run_script("linear_eval.py", "--checkpoint", pretrained_checkpoint, "--epochs", 1,
                     "--batch-size", 16, "--knn", 5, "--out", tmp_path / "le.json", *cuda).stdout
    assert "on cuda" in out and json.loads((tmp_path / "le.json").read_text())["device"] == "cuda"
    run_script("finetune.py", "--checkpoint", pretrained_checkpoint, "--epochs", 1,
               "--batch-size", 8, "--label-fraction", 1.0, "--out-dir", tmp_path / "ft", *cuda)
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["device"] == "cuda"
    run_script("distill.py", "--teacher", tmp_path / "ft" / "finetuned.pt", "--epochs", 1,
               "--batch-size", 8, "--out-dir", tmp_path / "d", *cuda)
    assert json.loads((tmp_path / "d" / "results.json").read_text())["device"] == "cuda"


@pytest.mark.parametrize("dataset", ["cifar10", "folder"])
def test_bench_reports_every_row_on_cuda(dataset, tiny_folder, tmp_path):
    run_script("bench.py", "--dataset", dataset, "--data-dir", tiny_folder, *TINY_MODEL,
               "--batch-size", 16, "--no-blur", "--workers", 1, "--device", "cuda",
               "--warmup", 2, "--steps", 2, "--repeats", 2, "--out", tmp_path / "b.json",
               env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["precision"] == "bf16" and set(result["rows"]) == {"data", "memory", "full"}
    assert all(row["images_per_s"] > 0 and row["peak_memory_mb"] > 0
               for row in result["rows"].values())
    if result["bf16_peak_tflops"]:  # a card of the table (H100, A100, ...)
        assert 0 < result["rows"]["memory"]["peak_fraction"] < 1


def test_the_gpu_decodes_and_crops_as_the_cpu_does(tmp_path):
    """--decode device on CUDA: nvjpeg and the GPU's dense resize against the CPU's libjpeg-turbo
    and banded resize, on the same boxes: within a few levels of 255 (two IDCTs, sums in another
    order), and a pretraining run of a JPEG folder takes it."""
    from augment import sample_crop_boxes
    from conftest import make_own_images
    from data import ImageFolder, WorkerCrops, device_crops
    photos = make_own_images(tmp_path / "own")
    folder = ImageFolder(str(photos.parent), WorkerCrops(96, views=2, on_device=True))
    folder.samples = [s for s in folder.samples if "notes" not in s[0]]
    folder.ids = list(range(len(folder.samples)))
    items = [folder.read(i)[0] for i in range(len(folder.samples))]
    sides = torch.tensor([[x[1], x[2]] if isinstance(x, tuple) else x.shape[:2] for x in items])
    boxes = sample_crop_boxes(2 * len(items), *sides.repeat_interleave(2, 0).T)
    on_cpu = device_crops(items, 96, 2, torch.device("cpu"), folder, boxes=boxes)
    on_gpu = device_crops(items, 96, 2, CUDA, folder, boxes=boxes.to(CUDA)).cpu()
    difference = (on_gpu.int() - on_cpu.int()).abs()
    assert difference.max() <= 8 and difference.float().mean() < 1, (difference.max(), difference.float().mean())
    run_script("pretrain.py", "--dataset", "folder", "--data-dir", photos, *TINY_MODEL, "--workers",
               1, "--decode", "device", "--device", "cuda", "--batch-size", 8, "--epochs", 1,
               "--warmup-epochs", 0, "--out-dir", tmp_path / "run")
    assert load_checkpoint(tmp_path / "run")["finished"]
