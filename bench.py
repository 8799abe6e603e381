"""Speed of SimCLR pretraining (Algorithm 1): the data pipeline, the compute step, both together.

In images per second (an image is two views) and peak memory, for pretrain.py's flags: 1. the
data pipeline alone; 2. pretrain.train_step on a batch already on the device (the compute
ceiling); 3. the step fed by the pipeline. Also the loss's and optimizer's shares, FLOPs, the
fraction of the GPU's bf16 peak and seconds per epoch: wall-clock between device
synchronisations after warm-up steps, the median over --repeats.

    python bench.py --data-dir data/cifar10 --batch-size 512                # 1 GPU
    python bench.py --data-dir data/cifar10 --batch-size 512 --compile
    python bench.py --dataset folder --data-dir data/cifar10 --arch resnet50 \\
        --image-size 224 --batch-size 256 --rows memory                          # 224 px compute
    OMP_NUM_THREADS=1 python bench.py --data-dir data/cifar10 --width-multiplier 0.25 \\
        --batch-size 64 --warmup 1 --steps 2 --repeats 3 --out bench.json        # CPU, < 1 min

RESULTS.md holds the tables it measured; docs/protocols.md ("Speed") what they mean for a GPU.
"""
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from data import InMemory, ViewLoader, decode, load_split, select
from model import build_model, build_optimizer, scaled_lr
from objective import build_objective
from pretrain import Config, parse_with_presets, train_step, view_augmentations
from runs import (UserError, check_output, default_workers, git_revision, opt, precision_for,
                  random_states, run_cli, save_checkpoint, setup, write_json, written_by)

# --- Configuration ---------------------------------------------------------------------------


@dataclass
class BenchConfig(Config):
    """pretrain.py's options (what is measured, with its presets), and how it is measured."""
    WRITES = "writes only --out (JSON), and a checkpoint in a temporary folder it removes"
    # how it is measured
    channels_last: bool = opt(True, "NHWC activations and weights, as pretrain.py runs; "
                              "--no-channels-last measures the NCHW layout it replaced")
    cudnn_benchmark: bool = opt(True, "cuDNN times its convolution algorithms, as pretrain.py "
                                "lets it; --no-cudnn-benchmark measures without")
    rows: str = opt("data,memory,full", "rows, comma-separated: data (pipeline alone), memory (step "
                    "on a batch in memory), full (step fed by the pipeline), checkpoint (writing "
                    "one, in the current folder), worker (one loader worker on a core, and "
                    "torchvision's, on a folder's JPEGs)")
    mosaics: int = opt(0, "the worker row on this many ImageNet-sized JPEGs made of tiles of "
                       "--data-dir's images (make_mosaics); 0: --data-dir's own", min=0)
    worker_images: int = opt(256, "images the worker row times in each round", min=1)
    step_rate: float = opt(0.0, "images/s of a device's step, for the cores per device the worker "
                           "row implies (0: row 2's rate)", min=0)
    warmup: int = opt(3, "untimed steps before each row (cuDNN autotuning, torch.compile); rows "
                      "fed by the pipeline take at least 2 per worker (prefetched batches)",
                      min=0)
    steps: int = opt(10, "steps (batches) per timed repeat", min=1)
    repeats: int = opt(5, "timed repeats per row; the table shows the median", min=1)
    epoch_images: int = opt(0, "images per epoch for the seconds-per-epoch figure; 0: the "
                            "dataset's (CIFAR-10's training set: 50,000)", min=0)
    out: str = opt("", "also write the results as JSON to this file")


ROWS = ("data", "memory", "full", "checkpoint", "worker")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, matched in this
# order against torch.cuda.get_device_name(). An estimate of what the hardware allows: clocks
# under load and the exact board vary.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989),
                    ("B200", 2250), ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121),
                    ("A10", 125)]


# --- Timing and data: between device synchronisations, batches as pretrain.py makes them -----


def synchronize(device):
    """Wait for the work queued on the device (else a timer measures the host's queueing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure(step, device, warmup, steps, repeats):
    """(seconds per call of step() in each of `repeats` timings of `steps` calls, the seconds of
    the `warmup` calls before them: torch.compile's compilation is in it)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        times.append((time.perf_counter() - start) / steps)
    return times, warmup_seconds


def peak_memory_mb(device):
    """CUDA: the tensors' peak since the last reset; elsewhere the process's peak RSS (cumulative)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def view_batches(dataset, augments, cfg, batches, workers, device):
    """`batches` batches of views made as pretrain.py makes them (fresh loader workers for a
    folder), of images drawn with replacement: a small dataset still gives enough."""
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=batches * cfg.batch_size)
    return iter(ViewLoader(dataset, sampler, cfg.batch_size, augments, device, workers))


# --- Model FLOPs and the device's peak -------------------------------------------------------


def model_flops_per_view(cfg):
    """(forward, backward) FLOPs of the network for one view: FlopCounterMode's convolutions and
    matrix products (2 per multiply-add), on a CPU copy and 2 images (BatchNorm needs two)."""
    model = build_model(cfg).train()
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as forward:
        _, z = model(x)
    with FlopCounterMode(display=False) as backward:
        z.square().sum().backward()
    return forward.get_total_flops() / 2, backward.get_total_flops() / 2


def bf16_peak_tflops(device_name):
    """The GPU's dense bf16 peak in TFLOP/s from BF16_PEAK_TFLOPS; None when not tabulated."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


# --- The measurements ------------------------------------------------------------------------


def bench(cfg):
    rows = [r for r in cfg.rows.split(",") if r]
    if not rows or set(rows) - set(ROWS):
        raise UserError(f"--rows {cfg.rows!r}: choose from {', '.join(ROWS)}, comma-separated")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise UserError("bench.py measures one process; run it with python, not torchrun")
    device, _, _ = setup(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    precision, autocast, _ = precision_for(cfg.precision, device)
    augments = view_augmentations(cfg)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(1)
    worker = worker_row(cfg, ViewLoader.crops_per_image(augments)) if "worker" in rows else None
    if rows == ["worker"]:
        return dict(config=dataclasses.asdict(cfg), device=device.type, cpu_count=os.cpu_count(),
                    torch=torch.__version__, git=git_revision(), rows={}, worker=worker)
    dataset = load_split(cfg.dataset, cfg.data_dir, "pretrain", cfg.image_size, device, workers,
                         views=ViewLoader.crops_per_image(augments), log=lambda *a: None)
    if isinstance(dataset, InMemory):  # no loader workers in the measured pipeline
        workers = 0
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"bench.py: {cfg.arch} x{cfg.width_multiplier:g}, {cfg.image_size} px, batch "
          f"{cfg.batch_size}, {device_name}, {precision}, "
          f"{'in memory' if not workers else f'{workers} workers'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("config " + json.dumps(dataclasses.asdict(cfg)))
    result = dict(config=dataclasses.asdict(cfg), device=device_name, precision=precision,
                  workers=workers, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                  torch=torch.__version__, git=git_revision(), rows={}, worker=worker)

    def timed(step, warmup=cfg.warmup, steps=cfg.steps):
        """A row: step()'s rate (images/s of --batch-size), the median over --repeats."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, warmup_seconds = measure(step, device, warmup, steps, cfg.repeats)
        median = statistics.median(seconds)
        return dict(images_per_s=cfg.batch_size / median, ms_per_step=1000 * median,
                    ms_per_step_repeats=[1000 * t for t in seconds], steps_per_repeat=steps,
                    warmup_seconds=warmup_seconds, peak_memory_mb=peak_memory_mb(device))

    # Row 1: the pipeline alone. The first batch (the workers' start) is timed on its own; the
    # rate is taken after two batches per worker, over at least one per worker.
    if "data" in rows:
        warmup, steps = max(cfg.warmup, 2 * workers), max(cfg.steps, workers)
        loader = view_batches(dataset, augments, cfg, 1 + warmup + steps * cfg.repeats, workers,
                              device)
        start = time.perf_counter()
        next(loader)
        first_batch_s = time.perf_counter() - start
        row = result["rows"]["data"] = timed(lambda: next(loader), warmup, steps)
        row.update(first_batch_s=first_batch_s,
                   images_per_s_per_worker=row["images_per_s"] / max(1, workers))
        del loader

    # The model and optimizer, placed as pretrain.py places them.
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optimizer, scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling),
                                cfg.weight_decay, cfg.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.train()
    objective = build_objective("nt-xent", cfg.temperature)
    step = lambda views: train_step(model, *views, optimizer, objective, scaler, autocast,
                                    memory_format=memory_format)

    # Row 2: one real batch of augmented views, on the device, used for every step.
    if "memory" in rows:
        views, _ = next(view_batches(dataset, augments, cfg, 1, 0, device))
        result["rows"]["memory"] = timed(lambda: step(views))
        del views

    # Row 3: the step fed by a fresh loader; the warm-up drains the workers' prefetched batches,
    # so that a pipeline slower than the step shows its own rate.
    if "full" in rows:
        warmup = max(cfg.warmup, 2 * workers)
        loader = view_batches(dataset, augments, cfg, warmup + cfg.steps * cfg.repeats, workers,
                              device)
        result["rows"]["full"] = timed(lambda: step(next(loader)[0]), warmup)
        del loader

    # The loss and the optimizer on their own, on synthetic inputs of the real shapes.
    if "memory" in rows:
        z = torch.randn(2 * cfg.batch_size, raw_model.head.out_dim, device=device,
                        dtype=amp_dtype or torch.float32, requires_grad=True)  # as autocast gives it

        def loss_step():  # the loss forward and backward, as in the step
            z1, z2 = rearrange(z, "(v b) d -> v b d", v=2)
            torch.autograd.grad(objective(z1, z2)[0], z)

        for p in raw_model.parameters():
            p.grad = torch.randn_like(p) * 1e-3 if p.requires_grad else None
        loss_ms, optimizer_ms = timed(loss_step)["ms_per_step"], timed(optimizer.step)["ms_per_step"]
        step_ms = result["rows"]["memory"]["ms_per_step"]
        result.update(loss_ms=loss_ms, optimizer_ms=optimizer_ms, loss_share=loss_ms / step_ms,
                      optimizer_share=optimizer_ms / step_ms)

    # Writing the run's checkpoint as pretrain.py does, on the current folder's disk.
    if "checkpoint" in rows:
        for p in raw_model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()  # the optimizer's state as in a run
        seconds = []
        with tempfile.TemporaryDirectory(dir=".", prefix=".bench-checkpoint-") as folder:
            path = Path(folder) / "ckpt.pt"
            for _ in range(cfg.repeats):
                start = time.perf_counter()
                save_checkpoint(path, dict(model=raw_model.state_dict(), rng=random_states(device),
                                           optimizer=optimizer.state_dict()), keep_previous=True)
                seconds.append(time.perf_counter() - start)
            size = path.stat().st_size
        result["checkpoint"] = dict(seconds=statistics.median(seconds), seconds_repeats=seconds,
                                    mb=size / 1e6, share_at_10_min=statistics.median(seconds) / 600)

    # FLOPs and the fraction of the device's peak that the step reaches.
    forward, backward = model_flops_per_view(cfg)
    train_flops = 2 * (forward + backward)  # per image: two views, forward and backward
    peak = bf16_peak_tflops(device_name) if device.type == "cuda" else None
    result.update(forward_gflops_per_view=forward / 1e9, train_gflops_per_image=train_flops / 1e9,
                  bf16_peak_tflops=peak)
    for name, row in result["rows"].items():
        if name != "data":
            row["achieved_tflops"] = train_flops * row["images_per_s"] / 1e12
            row["peak_fraction"] = row["achieved_tflops"] / peak if peak and amp_dtype else None

    # Seconds per epoch of whole batches (the workers persist: their start is paid once per run).
    result["epoch_images"] = cfg.epoch_images or len(dataset)
    steps_per_epoch = result["epoch_images"] // cfg.batch_size
    for name in ("memory", "full"):
        if name in result["rows"]:
            result["rows"][name]["epoch_s"] = (steps_per_epoch * cfg.batch_size /
                                               result["rows"][name]["images_per_s"])
    return result


# --- Report ----------------------------------------------------------------------------------


def worker_lines(worker, cfg, step_rate):
    """The worker row's lines: the rates side by side, and the cores per device they imply."""
    w = worker
    lines = [f"worker, one core, {w['images']} JPEGs of {w['image_size'][0]} x {w['image_size'][1]} "
             f"px and the like, {w['views']} views at {cfg['image_size']} px: this project "
             f"{w['ours_images_per_s']:.0f} images/s, torchvision's PIL + RandomResizedCrop x "
             f"{w['views']} {w['torchvision_images_per_s']:.0f} ({w['ratio']:.2f}x); the decode "
             f"alone {w['decode_images_per_s']:.0f} (PIL's {w['decode_pil_images_per_s']:.0f})"]
    if step_rate:
        lines.append(f"  a step of {step_rate:.0f} images/s needs about "
                     f"{step_rate / w['ours_images_per_s']:.1f} cores per device for this "
                     f"project's workers ({step_rate / w['torchvision_images_per_s']:.1f} for "
                     f"torchvision's); where a node has fewer, --decode device")
    return lines


def report(result):
    """The table and the figures derived from it, as text."""
    cfg, rows = result["config"], result["rows"]
    if cfg["rows"] == "worker":  # the worker row alone
        return "\n".join(worker_lines(result["worker"], cfg, cfg["step_rate"]))
    source = f"{result['workers']} workers" if result["workers"] else "in memory"
    titles = dict(data=f"1 data pipeline ({source})",
                  memory="2 step, batch in memory", full="3 step fed by the pipeline")
    lines = [f"{'row':<30} {'images/s':>10} {'ms/step':>10} {'(min-max)':>15} {'peak MB':>9} "
             f"{'s/epoch':>9}"]
    for name in ROWS:
        if name in rows and name != "checkpoint":
            r = rows[name]
            epoch = f"{r['epoch_s']:.1f}" if "epoch_s" in r else "-"
            spread = f"{min(r['ms_per_step_repeats']):.1f}-{max(r['ms_per_step_repeats']):.1f}"
            lines.append(f"{titles[name]:<30} {r['images_per_s']:>10.1f} {r['ms_per_step']:>10.1f} "
                         f"{spread:>15} {r['peak_memory_mb']:>9.0f} {epoch:>9}")
    memory_kind = ("CUDA max_memory_allocated per row" if result["device"] not in ("cpu", "mps")
                   else "process peak RSS, cumulative")
    lines.append(f"(an image is two views; ms/step: median over {cfg['repeats']} repeats of "
                 f"{cfg['steps']} or more steps; peak MB: {memory_kind}; s/epoch: "
                 f"{result['epoch_images'] // cfg['batch_size']} steps of {cfg['batch_size']}, "
                 f"{result['epoch_images']} images" + ("" if cfg["epoch_images"] else
                                                       ", the dataset's") + ")")
    if cfg["compile"] and "memory" in rows:  # the price torch.compile pays before its first step
        r = rows["memory"]
        extra = r["warmup_seconds"] - cfg["warmup"] * r["ms_per_step"] / 1000
        lines.append(f"torch.compile: row 2's {cfg['warmup']} warm-up steps took "
                     f"{r['warmup_seconds']:.1f} s, {extra:.1f} s more than as many steps at its rate")
    if "data" in rows and not result["workers"]:
        lines.append(f"pipeline: images in memory, indexed and augmented on the {result['device']}"
                     f" ({rows['data']['images_per_s']:.0f} images/s)")
    elif "data" in rows:
        d = rows["data"]
        lines.append(f"pipeline: {d['images_per_s_per_worker']:.0f} images/s per worker, first "
                     f"batch after {d['first_batch_s']:.2f} s (workers starting)")
        if "memory" in rows:
            need = rows["memory"]["images_per_s"] / max(d["images_per_s_per_worker"], 1e-9)
            lines.append(f"  to feed row 2 it needs {rows['memory']['images_per_s']:.0f} images/s, "
                         f"about {need:.1f} workers at this per-worker rate")
    if "loss_ms" in result:
        lines.append(f"loss (NT-Xent fwd+bwd) {result['loss_ms']:.2f} ms = "
                     f"{100 * result['loss_share']:.1f}% of the step in memory; optimizer "
                     f"({cfg['optimizer']} step) {result['optimizer_ms']:.2f} ms = "
                     f"{100 * result['optimizer_share']:.1f}%")
    lines.append(f"model: {result['forward_gflops_per_view']:.3f} GFLOPs forward per view, "
                 f"{result['train_gflops_per_image']:.3f} GFLOPs per image trained (2 views, "
                 "forward + backward; convolutions and matmuls only)")
    for name in ("memory", "full"):
        if name in rows:
            r = rows[name]
            line = f"  row {titles[name][0]}: {r['achieved_tflops']:.3f} TFLOP/s achieved"
            if r["peak_fraction"] is not None:
                line += (f" = {100 * r['peak_fraction']:.1f}% of {result['device']}'s "
                         f"~{result['bf16_peak_tflops']} TFLOP/s bf16 dense peak (estimate)")
            lines.append(line)
    if "memory" in rows and "full" in rows:
        ratio = rows["full"]["images_per_s"] / rows["memory"]["images_per_s"]
        lines.append(f"row 3 / row 2 = {ratio:.2f}: the share of the step's rate the pipeline "
                     f"keeps (1: it keeps up)")
    if result["worker"]:
        lines += worker_lines(result["worker"], cfg, cfg["step_rate"] or (
            rows["memory"]["images_per_s"] if "memory" in rows else 0))
    if "checkpoint" in result:
        c = result["checkpoint"]
        lines.append(f"checkpoint: {c['mb']:.1f} MB written in {c['seconds']:.2f} s (median of "
                     f"{cfg['repeats']}) = {100 * c['share_at_10_min']:.2f}% of a run that "
                     f"checkpoints every 10 minutes")
    return "\n".join(lines)


# --- The loader worker of image folders, against torchvision's -------------------------------


def make_mosaics(source, folder, count, seed=0):
    """count ImageNet-sized JPEGs (500 x 375 and the like, quality 90) in folder/train/<k>/, each
    a mosaic of 64 px tiles of source's images: photos at ImageNet's size, without ImageNet."""
    import random
    files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise UserError(f"--mosaics: no JPEG or PNG images under {source}")
    for i in range(count):
        rng = random.Random(seed + i)
        w, h = rng.choice([(500, 375), (375, 500), (500, 333), (400, 400)])
        canvas = Image.new("RGB", (w, h))
        for y in range(0, h, 64):
            for x in range(0, w, 64):
                with Image.open(rng.choice(files)) as tile:
                    canvas.paste(tile.convert("RGB").resize((64, 64)), (x, y))
        sub = Path(folder) / "train" / f"n{i % 8:08d}"
        sub.mkdir(parents=True, exist_ok=True)
        canvas.save(sub / f"{i:05d}.JPEG", quality=90)
    return Path(folder)


def worker_row(cfg, views):
    """Images/s of one loader worker on one core: this project's (data.WorkerCrops on batches)
    against torchvision's usual SimCLR worker (PIL, RandomResizedCrop x views), and the decode
    alone (data.decode, PIL), interleaved over the same files; the median of --repeats rounds
    after an untimed one."""
    import torchvision.transforms as T
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix=".bench-mosaics-", dir=".") as tmp:
        root = make_mosaics(cfg.data_dir, tmp, cfg.mosaics) if cfg.mosaics else Path(cfg.data_dir)
        folder = load_split("folder", str(root), "pretrain", cfg.image_size, torch.device("cpu"),
                            0, views, log=lambda *a: None)
        folder = select(folder, list(range(min(cfg.worker_images, len(folder.samples)))))
        paths = [p for p, _ in folder.samples]
        with Image.open(paths[0]) as first:
            shape = first.size
        crop = T.Compose([T.RandomResizedCrop(cfg.image_size), T.PILToTensor()])

        def pil(path):
            with Image.open(path) as image:
                return image.convert("RGB")

        ways = {"ours": lambda: [folder.__getitems__(list(range(i, min(i + 32, len(paths)))))
                                 for i in range(0, len(paths), 32)],
                "torchvision": lambda: [[crop(image) for _ in range(views)] for image in map(pil, paths)],
                "decode": lambda: [decode(p) for p in paths],
                "decode_pil": lambda: [pil(p) for p in paths]}
        rates = {name: [] for name in ways}
        for round in range(cfg.repeats + 1):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                if round:  # the first round is the untimed one
                    rates[name].append(len(paths) / (time.perf_counter() - start))
    torch.set_num_threads(threads)
    rates = {name: statistics.median(r) for name, r in rates.items()}
    return dict(images=len(paths), image_size=list(shape), views=views, **{
        f"{name}_images_per_s": rate for name, rate in rates.items()},
        ratio=rates["ours"] / rates["torchvision"])


def main(argv=None):
    def run():
        cfg, _ = parse_with_presets(argv, BenchConfig)  # pretrain.py's flags, as it resolves them
        if cfg.out:  # checked before the measurements, not after
            check_output(cfg.out, "--out", written_by("bench.py"))
        result = bench(cfg)
        print(report(result))
        if cfg.out:
            write_json(cfg.out, result, "bench.py")
            print(f"wrote {cfg.out}")

    run_cli("bench.py", run)


if __name__ == "__main__":
    main()
