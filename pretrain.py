"""SimCLR contrastive pretraining: Algorithm 1 of Chen et al. 2020 (v1), with the v2 options.

Each image is augmented twice (Sec. 3, Appendix A), both views go through a ResNet encoder f and
a projection head g (Sec. 2.1, Fig. 2), and NT-Xent (Eq. 1) pulls the two views of an image
together while pushing away the other 2(N-1) views of the batch. The encoder output h = f(x) is
the representation the other scripts evaluate (linear_eval.py), fine-tune (finetune.py) and
distill (distill.py); they import the model and the data from this file. The encoder is in
resnet.py, the augmentation in augment.py, the command-line plumbing (flags, errors,
checkpoints, stopping) in cli.py.

    python pretrain.py --dataset cifar10 --data-dir data/cifar10      # laptop or 1 GPU
    torchrun --nproc_per_node=8 pretrain.py --dataset imagenet --data-dir /data/imagenet

--batch-size is the global batch: under torchrun each process takes batch_size / world_size
images, BatchNorm statistics are global (Sec. 2.2, "Global BN") and every process scores its
views against the views of all processes. Checkpoints go to --out-dir (default
runs/<dataset>-<arch>-<time>/ckpt.pt) every epoch and on Ctrl-C; --resume continues a run.
The CIFAR-10 preset is the authors' recipe (ResNet-18, 1000 epochs, batch 512, LARS);
README.md lists what this code measured and what the papers report.
"""
import contextlib
import copy
import dataclasses
import datetime
import io
import itertools
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from einops import rearrange

from augment import (SimCLRAugmentation, center_crop_box, center_crop_resize, crop_resize,
                     parse_augment, random_crop_resize_uint8)
from cli import (Progress, StopSignal, UserError, console, first_line, git_revision,
                 load_checkpoint, load_model_state, opt, parse_config, per_process_batch,
                 prepare_out_dir, random_states, restore_random_state, resumed_config, run_cli,
                 save_checkpoint, setup, world_info)
from lars import LARS
from resnet import build_encoder

# torch.distributed.nn.functional's differentiable collectives are deprecated in favour of a
# private module; they are still the public way to gather with gradients, so keep logs clean.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.", category=FutureWarning)

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    # data
    dataset: str = opt("cifar10", "which data", ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_dir: str = opt("data", "dataset root; cifar10 may also be an image-folder export "
                        "(train/<class>/*, val/ or test/)")
    out_dir: str = opt("", "where checkpoints and logs go (default runs/<dataset>-<arch>-<time>)")
    image_size: int = opt(32, "training resolution in pixels; <= 32 selects the CIFAR stem", min=8)
    workers: int = opt(-1, "data-loading processes per GPU (-1: CPU cores per process, at "
                       "most 8)", min=-1)
    # augmentation (Sec. 3, Appendix A)
    augment: str = opt("crop,color", "augmentations on, comma-separated, from crop (random "
                       "resized crop + flip), flip, jitter, gray, color (= jitter,gray); for "
                       "the paper's Fig. 5 ablations")
    color_strength: float = opt(0.5, "colour distortion strength s (Appendix A): 1.0 ImageNet, "
                                "0.5 CIFAR-10", min=0)
    blur: bool = opt(False, "Gaussian blur with p 0.5 (on for ImageNet, off for 32 px images)")
    # model (Sec. 2.1; v2 Sec. 2)
    arch: str = opt("resnet18", "encoder f", ["resnet18", "resnet34", "resnet50", "resnet101",
                                              "resnet152"])
    width_multiplier: float = opt(1.0, "channels of every layer x w (the paper's 1x/2x/4x); "
                                  "fractions such as 0.25 for CPU runs", above=0)
    sk_ratio: float = opt(0.0, "selective kernels (v2): 0 off, 0.0625 the paper's value", min=0)
    proj_head: str = opt("nonlinear", "projection head g (Fig. 8 ablation)",
                         ["none", "linear", "nonlinear"])
    proj_layers: int = opt(2, "layers of the nonlinear head: 2 in v1, 3 in v2", min=1)
    proj_dim: int = opt(128, "output dimension of g", min=1)
    # loss (Eq. 1)
    temperature: float = opt(0.5, "NT-Xent temperature tau: 0.5 CIFAR-10, 0.1 ImageNet", above=0)
    # optimisation (Sec. 2.2, Appendix B)
    batch_size: int = opt(512, "global batch size N in images (each gives 2 views)", min=2)
    epochs: int = opt(1000, "training epochs; the schedule spans them", min=1)
    max_steps: int = opt(0, "stop (with a checkpoint) after this many optimizer steps, 0: no "
                         "limit; the schedule still spans --epochs, so the run can be resumed",
                         min=0)
    optimizer: str = opt("lars", "LARS as in the paper; sgd and adam for comparison",
                         ["lars", "sgd", "adam"])
    lr: float = opt(1.0, "base learning rate, scaled by --lr-scaling", above=0)
    lr_scaling: str = opt("linear", "linear: lr x B/256; sqrt: lr x sqrt(B) (better for small B)",
                          ["linear", "sqrt"])
    weight_decay: float = opt(1e-4, "L2 weight decay, not on biases and BatchNorm parameters",
                              min=0)
    momentum: float = opt(0.9, "momentum of LARS and SGD", min=0, below=1)
    warmup_epochs: float = opt(10.0, "linear warmup from 0, then cosine decay to 0", min=0)
    memory_size: int = opt(0, "v2's MoCo memory: K past projections as extra negatives (MoCo: "
                           "65536), 0: off", min=0)
    memory_momentum: float = opt(0.999, "momentum m of the memory network's moving average",
                                 min=0, max=1)
    global_bn: bool = opt(True, "BatchNorm statistics over the global batch under torchrun "
                          "(--no-global-bn: per-GPU statistics, the paper's ablation)")
    # system
    device: str = opt("auto", "auto picks cuda, then mps, then cpu", ["auto", "cuda", "mps", "cpu"])
    precision: str = opt("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a "
                         "gradient scaler", ["auto", "bf16", "fp16", "fp32"])
    compile: bool = opt(False, "torch.compile the model (slower start, faster steps on GPU)")
    seed: int = opt(0, "random seed (initialisation and data order)")
    log_every: int = opt(50, "print a log line every this many steps (and after the first)",
                         min=1)
    eval_every: int = opt(0, "kNN top-1 on the evaluation split every this many epochs, 0: off",
                          min=0)
    knn_k: int = opt(200, "neighbours of the kNN monitor", min=1)
    knn_temperature: float = opt(0.1, "temperature of the kNN monitor's weights", above=0)
    resume: str = opt("", "checkpoint to continue from; its configuration is used, with the "
                      "flags given here on top")
    show_augmentations: int = opt(0, "save a PNG of N images beside their two views and exit",
                                 min=0)


# Per-dataset presets, applied before the command-line flags.
PRESETS = {
    # Authors' README recipe for CIFAR-10: ResNet-18 with the CIFAR stem, 1000 epochs, B 512,
    # LARS lr 1.0 (linear scaling), wd 1e-4, tau 0.5, colour strength 0.5, no blur.
    "cifar10": dict(arch="resnet18", image_size=32, batch_size=512, epochs=1000, lr=1.0,
                    lr_scaling="linear", weight_decay=1e-4, temperature=0.5, color_strength=0.5,
                    blur=False),
    "stl10": dict(arch="resnet18", image_size=96, batch_size=512, epochs=1000, lr=1.0,
                  lr_scaling="linear", weight_decay=1e-4, temperature=0.5, color_strength=0.5,
                  blur=False),
    # Paper, Sec. 2.2 and B.1: ResNet-50, 224 px, B 4096, 100 epochs, lr 0.3 x B/256 (= 4.8),
    # wd 1e-6, tau 0.1, colour strength 1.0, blur.
    "imagenet": dict(arch="resnet50", image_size=224, batch_size=4096, epochs=100, lr=0.3,
                     lr_scaling="linear", weight_decay=1e-6, temperature=0.1, color_strength=1.0,
                     blur=True),
}
PRESETS["cifar100"] = PRESETS["cifar10"]
PRESETS["folder"] = PRESETS["imagenet"]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


SMALL_IMAGE_DATASETS = ("cifar10", "cifar100", "stl10")  # decoded once into device memory


def build_augmentation(size, augment="crop", strength=1.0, blur=False):
    """The authors' augmentation (augment.py) with the --augment switches; the default, crop +
    flip, is what fine-tuning and linear evaluation train with."""
    try:
        return SimCLRAugmentation(size, **parse_augment(augment), strength=strength, blur=blur)
    except ValueError as e:
        raise UserError(str(e))


class WorkerCrops:
    """What a loader worker does to each full-resolution image of a folder (the part of the
    augmentation that needs the whole image): `views` random crops resized to size (TF's
    sampler and bicubic resize), or with views=0 the evaluation's centre crop, uint8 out.
    random=False (--augment without crop): the centre crop for every view."""

    def __init__(self, size, views=0, random=True):
        self.size, self.views, self.random = size, views, random

    def __call__(self, image):
        x = torchvision.transforms.functional.pil_to_tensor(image)  # uint8 3 x H x W
        if not self.views:
            return center_crop_resize(x, self.size)
        crop = random_crop_resize_uint8 if self.random else center_crop_resize
        return torch.stack([crop(x, self.size) for _ in range(self.views)])  # V x 3 x S x S


class InMemory:
    """A split of small images decoded once into one uint8 tensor N x 3 x H x W on the training
    device (CIFAR-10's 50,000 images: 150 MB), with its labels: batches are indexed and augmented
    there, without loader workers or a copy per step. samples / root: the files, when it was
    read from an image folder (finetune.py's subset lists name them)."""

    def __init__(self, images, labels, classes, samples=None, root=None):
        self.images, self.labels, self.classes = images, labels, classes
        self.samples, self.root = samples, root

    def __len__(self):
        return len(self.images)

    @property
    def targets(self):
        return self.labels.tolist()

    def subset(self, indices):
        idx = torch.as_tensor(indices, device=self.images.device)
        return InMemory(self.images[idx], self.labels[idx], self.classes,
                        self.samples and [self.samples[i] for i in indices], self.root)


def load_split(dataset, data_dir, split, size, device, workers=0, views=0, log=print, crop=True):
    """A split ready for batches on the device: CIFAR-10/100 and STL-10 as InMemory; image
    folders (ImageNet) as an ImageFolder whose workers decode and crop (WorkerCrops; crop=False:
    the centre crop for every view, --augment without crop)."""
    if dataset not in SMALL_IMAGE_DATASETS:
        return build_dataset(dataset, data_dir, split, WorkerCrops(size, views, crop))
    source = build_dataset(dataset, data_dir, split, torchvision.transforms.functional.pil_to_tensor)
    if not hasattr(source, "samples"):  # torchvision's arrays: N x H x W x 3 (CIFAR), N x 3 x H x W
        images = torch.as_tensor(source.data)
        images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images
        labels = getattr(source, "targets", None) or source.labels
    else:  # an image-folder export: every file decoded once, by the loader workers
        progress, parts, done = Progress(log, f"decoding {split}", len(source)), [], 0
        try:
            for x, y in make_loader(source, 500, torch.device("cpu"), workers):
                parts.append((x, y))
                done += len(y)
                if progress.due(done):
                    progress.show(done, "images")
        except RuntimeError as e:  # torch.stack in the loader: images of different sizes
            raise UserError(f"the images under {source.root} differ in size ({first_line(e)}); "
                            f"use --dataset folder for such data")
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if source.unreadable.value:
            log(f"{source.unreadable.value} unreadable image(s), each replaced by the next image "
                f"(named on stderr)")
    return InMemory(images.contiguous().to(device), torch.as_tensor(labels).to(device),
                    source.classes, getattr(source, "samples", None), getattr(source, "root", None))


class ViewLoader:
    """One epoch of `views` augmented views of every image in this process's share (sampler),
    as float batches on the device: yields ([view 1, ...], labels), views n x 3 x S x S. InMemory
    data is indexed and augmented on the device; image folders come cropped from the loader
    workers (WorkerCrops), and the device does the rest (flip, colour, blur) on the batch."""

    def __init__(self, data, sampler, batch_size, augment, views, device, workers):
        self.data, self.sampler, self.batch_size = data, sampler, batch_size
        self.augment, self.views, self.device = augment, views, device
        self.loader = None if isinstance(data, InMemory) else make_loader(
            data, batch_size, device, workers, sampler, drop_last=True, persistent=True)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        if self.loader is None:
            order = torch.tensor(list(self.sampler), device=self.device)  # one copy per epoch
            for idx in order[:len(self) * self.batch_size].view(-1, self.batch_size):
                images = self.data.images[idx]  # n x 3 x H x W, uint8
                yield [self.augment(images) for _ in range(self.views)], self.data.labels[idx]
        else:
            for crops, labels in self.loader:
                crops = crops.to(self.device, non_blocking=True)  # n x V x 3 x S x S, uint8
                yield ([self.augment(crops[:, v], cropped=True) for v in range(self.views)],
                       labels.to(self.device, non_blocking=True))


def eval_batches(data, size, batch_size, device, workers):
    """Every world-th image of data (this process's share), in order, as the evaluation sees
    it (the centre crop; 32 px images as they are): yields (float n x 3 x S x S, labels)."""
    rank, world = world_info()
    if isinstance(data, InMemory):
        box = center_crop_box(*data.images.shape[2:], size)
        boxes = torch.tensor([box], device=device)
        for idx in torch.arange(rank, len(data), world, device=device).split(batch_size):
            x = data.images[idx].float() / 255  # n x 3 x H x W
            if box != (0, 0, size, size):
                x = crop_resize(x, boxes.expand(len(idx), 4), size)
            yield x, data.labels[idx]
    else:
        part = torch.utils.data.Subset(data, range(rank, len(data), world))
        for x, y in make_loader(part, batch_size, device, workers):
            yield x.to(device, non_blocking=True).float() / 255, y.to(device, non_blocking=True)


def build_dataset(dataset, data_dir, split, transform):
    """split: 'pretrain' (every image usable without labels), 'train' (labelled) or 'val'.

    cifar10/cifar100/stl10 come from torchvision (downloaded when missing); imagenet, folder, and a
    cifar export with a train/ folder are read with ImageFolder from <data-dir>/train and /val.
    """
    root = Path(data_dir)
    if dataset in ("imagenet", "folder") or (dataset.startswith("cifar") and (root / "train").is_dir()):
        subdirs = ["train"] if split != "val" else ["val", "test"]
        path = next((root / s for s in subdirs if (root / s).is_dir()), root / subdirs[0])
        if not path.is_dir():
            raise UserError(f"no image folder at {path}: expected {root}/train/<class>/<image> and "
                            f"{root}/val/<class>/<image> (set --data-dir)")
        try:
            return ImageFolder(str(path), transform)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"cannot read images under {path}: {e}")
    if dataset in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        return _torchvision_dataset(dataset, root, lambda download: cls(
            str(root), train=split != "val", transform=transform, download=download))
    if dataset == "stl10":
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
        return _torchvision_dataset(dataset, root, lambda download: torchvision.datasets.STL10(
            str(root), split=stl_split, transform=transform, download=download))
    raise UserError(f"unknown dataset {dataset!r}")


def _torchvision_dataset(name, root, make):
    try:
        return make(download=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        pass
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints before failing offline
            return make(download=True)
    except Exception as e:
        raise UserError(f"{name} is not in {root} and could not be downloaded "
                        f"({type(e).__name__}); download it into --data-dir on a machine with "
                        f"network, or point --data-dir at an image-folder export "
                        f"(train/<class>/*, val/<class>/*)")


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder that survives unreadable files (truncated JPEGs, non-images with
    an image extension: real folders, ImageNet's included, contain some). Such a file is named
    on stderr and replaced by the next readable image, so batches keep their size on every
    process; `unreadable` counts the replacements, across loader workers. Many in a row mean
    the wrong folder, not a stray file, and stop the run."""

    MAX_IN_A_ROW = 50

    def __init__(self, root, transform):
        super().__init__(root, transform)
        self.unreadable = multiprocessing.Value("q", 0)  # shared with the loader workers
        self.named = set()

    def __getitem__(self, index):
        for offset in range(self.MAX_IN_A_ROW):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)  # decodes the whole file
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for a bad file
                with self.unreadable.get_lock():
                    self.unreadable.value += 1
                if path not in self.named:  # one write: lines of several workers stay whole
                    self.named.add(path)
                    sys.stderr.write(f"warning: unreadable image {path} ({type(e).__name__}: "
                                     f"{e}); using the next image instead\n")
                    sys.stderr.flush()
                continue
            return self.transform(image), target
        raise UserError(f"{self.MAX_IN_A_ROW} unreadable images in a row from "
                        f"{self.samples[index][0]} on: is {self.root} a folder of images?")


def unreadable_images(dataset, device, log):
    """{'unreadable_images': the files an ImageFolder (or a Subset of one) has replaced so far,
    summed over processes}, with a summary line; {} for datasets that cannot have any."""
    folder = getattr(dataset, "dataset", dataset)
    if not isinstance(folder, ImageFolder):
        return {}
    count = torch.tensor(folder.unreadable.value, device=device)
    if world_info()[1] > 1:
        dist.all_reduce(count)
    if count.item():
        log(f"{count.item()} unreadable image(s) so far, each replaced by the next image "
            f"(named on stderr)")
    return {"unreadable_images": count.item()}


def _quiet_worker(worker_id):
    # Ctrl-C and SIGTERM reach every process of the group; the main process answers them
    # (StopSignal) and then shuts its workers down, so a worker must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size, device, workers, sampler=None, drop_last=False,
                persistent=False):
    """The DataLoader of every script: pinned memory on CUDA, workers that leave signals to the
    main process, persistent workers on request (their start-up is paid once per run)."""
    # The workers' seeds come from a generator seeded once, here: drawing them from the main
    # random stream at every epoch's start would make a run resumed mid-epoch diverge.
    seeds = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
    return torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0,
        worker_init_fn=_quiet_worker, generator=seeds)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (this rank's share of a seeded per-epoch shuffle, tail dropped) that
    can start part-way into an epoch, so a run stopped mid-epoch resumes on the next batch."""

    start = 0  # samples of the current epoch this rank has already consumed

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def default_workers(world_size):
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, min(8, (os.cpu_count() or 1) // local))


# ---------------------------------------------------------------------------------------------
# Model: encoder f (resnet.py), projection head g, global BatchNorm
# ---------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """g(h) (Sec. 2.1 and Fig. 8; v2 Sec. 2): linear layers without bias, each with BatchNorm and
    ReLU, except the last, which has no ReLU and no BN shift. Middle layers keep h's width.

    kind 'nonlinear' has `num_layers` layers (2 in v1, 3 in v2), 'linear' one, 'none' is the
    identity. self.layers[:k] is what v2 fine-tunes from (finetune.py --ft-proj-layer k).
    """

    def __init__(self, in_dim, kind="nonlinear", num_layers=2, out_dim=128):
        super().__init__()
        dims = {"none": [], "linear": [out_dim],
                "nonlinear": [in_dim] * (num_layers - 1) + [out_dim]}[kind]
        self.layers = nn.Sequential()
        for i, d in enumerate(dims):
            last = i == len(dims) - 1
            linear = nn.Linear(in_dim, d, bias=False)
            nn.init.normal_(linear.weight, std=0.01)
            bn = nn.BatchNorm1d(d)
            if last:
                bn.bias.requires_grad_(False)  # no learnable shift (official center=False)
            self.layers.append(nn.Sequential(linear, bn) if last else
                               nn.Sequential(linear, bn, nn.ReLU(inplace=True)))
            in_dim = d
        self.out_dim = in_dim

    def forward(self, h):
        return self.layers(h)


class SimCLR(nn.Module):
    """x -> (h, z): h = f(x) is the representation, z = g(h) goes into the loss."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        h = self.encoder(x)
        return h, self.head(h)


def build_model(cfg):
    """The SimCLR network described by a configuration (a Config or the dict in a checkpoint)."""
    c = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    encoder, h_dim = build_encoder(c["arch"], c["width_multiplier"], c["image_size"], c["sk_ratio"])
    return SimCLR(encoder, ProjectionHead(h_dim, c["proj_head"], c["proj_layers"], c["proj_dim"]))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the batches of all processes (paper Sec. 2.2, "Global BN").

    torch.nn.SyncBatchNorm only runs on CUDA, so this one, for gloo on a CPU, all-reduces the
    per-channel sums with autograd; the gradient then flows through every process's statistics
    exactly as if the whole batch were on one device. Same parameters and buffers as BatchNorm.
    """

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))  # all but the channel dimension
        count = x.new_tensor([x.numel() / x.shape[1]])
        stats = dist_nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total, total_sq, n = stats[:x.shape[1]], stats[x.shape[1]:-1], stats[-1]
        mean = total / n
        var = total_sq / n - mean * mean  # biased, for normalisation
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def convert_to_global_bn(module):
    """Every BatchNorm in module becomes a global one: SyncBatchNorm on CUDA, GlobalBatchNorm else."""
    if next(module.parameters()).is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum).to(module.weight)
        bn.load_state_dict(module.state_dict())
        bn.weight, bn.bias = module.weight, module.bias  # keeps requires_grad (the frozen shift)
        return bn
    for name, child in module.named_children():
        module.add_module(name, _to_global_bn(child))
    return module


# ---------------------------------------------------------------------------------------------
# Loss: NT-Xent (Eq. 1)
# ---------------------------------------------------------------------------------------------


def gather_with_grad(x):
    """Concatenate x from every process (rank order), passing gradients back to their owners."""
    rank, world = world_info()
    if world == 1:
        return x
    return torch.cat(dist_nn.all_gather(x))


def nt_xent_loss(z1, z2, temperature, negatives=None):
    """NT-Xent, Eq. 1, averaged over all 2N anchors: L of Algorithm 1.

        l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)
        L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)],   sim = cosine similarity

    z1[k] and z2[k] (n x d each) are the two views of image k. Under torchrun each process passes
    its own n images; its 2n anchors are scored against the 2N views of all processes (gathered
    with gradient), so with DDP averaging the gradient equals the single-process one on the whole
    batch. `negatives` (K x d, e.g. a MoCo memory) are extra candidates for every anchor.
    The official code's loss is loss_a + loss_b, each a mean over N anchors: 2 x this L.
    Returns (L over this process's anchors, contrast_acc: the authors' metric, the share of
    first views whose second view ranks first among the N second views of the global batch).
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2])  # 2n x d: [view 1; view 2]
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # bf16 -> fp32
    candidates = gather_with_grad(z)  # 2N x d: [z1; z2] of rank 0, then of rank 1, ...
    if negatives is not None:
        candidates = torch.cat([candidates, F.normalize(negatives.to(z.dtype), dim=1)])  # (2N+K) x d
    logits = z @ candidates.T / temperature  # 2n x (2N+K)
    rank, world = world_info()
    anchor = torch.arange(2 * n, device=z.device)
    self_index = rank * 2 * n + anchor
    positive = rank * 2 * n + (anchor + n) % (2 * n)  # view 1 <-> view 2 of the same image
    logits = logits.masked_fill(F.one_hot(self_index, logits.shape[1]).bool(), float("-inf"))
    loss = F.cross_entropy(logits, positive)
    second_views = (2 * n * torch.arange(world, device=z.device)[:, None] + n + anchor[:n]).flatten()  # N
    contrast_acc = (logits[:n, second_views].argmax(dim=1) == rank * n + anchor[:n]).float().mean()
    return loss, contrast_acc


class Memory(nn.Module):
    """SimCLRv2's memory (v2 Sec. 2, after MoCo, He et al. 2020): a momentum network, a copy of
    f and g whose weights follow an exponential moving average of the trained ones and never
    receive gradients, projects every batch; its projections wait in a FIFO queue of `size` rows
    and serve as extra negatives in NT-Xent. Cost: one more forward pass per step and a second
    copy of the weights; gain in the paper: about 1% in linear evaluation and fine-tuning.
    """

    def __init__(self, model, size, dim, momentum=0.999):
        super().__init__()
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.momentum = momentum
        # random unit vectors until real projections replace them, as MoCo starts
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))  # K x d
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # next row to write

    @torch.no_grad()
    def update(self, model):
        """theta_m <- m * theta_m + (1 - m) * theta, for every parameter."""
        for p_m, p in zip(self.model.parameters(), model.parameters()):
            p_m.lerp_(p.detach(), 1 - self.momentum)

    @torch.no_grad()
    def project(self, x):
        return F.normalize(self.model(x)[1].float(), dim=1)  # 2n x d

    @torch.no_grad()
    def enqueue(self, keys):
        """Overwrite the oldest rows with the keys of every process (rank order), wrapping around."""
        keys = gather_with_grad(keys)  # 2N x d
        rows = (self.position + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[rows] = keys.to(self.queue.dtype)
        self.position.copy_((self.position + len(keys)) % len(self.queue))


# ---------------------------------------------------------------------------------------------
# Optimisation: LARS / SGD / Adam, warmup + cosine
# ---------------------------------------------------------------------------------------------


def scaled_lr(base_lr, batch_size, scaling):
    """Learning rate = base x B/256 (linear) or base x sqrt(B) (sqrt), Appendix B.1."""
    return base_lr * (batch_size / 256 if scaling == "linear" else math.sqrt(batch_size))


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warmup from 0 to peak over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model, name, lr, weight_decay, momentum=0.9, nesterov=False):
    """LARS (lars.py) or, for comparison, SGD / Adam with the same rule: no weight decay on
    biases and BatchNorm parameters (the 1-D ones)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.AdamW(groups, lr=lr)
    raise UserError(f"unknown optimizer {name!r}")


# ---------------------------------------------------------------------------------------------
# Evaluation: kNN monitor on h (used by --eval-every here and by linear_eval.py --knn)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(encoder, dataset, size, batch_size, device, workers=0, log=None,
                     name="features"):
    """h for every image of dataset (its evaluation view at size px), in dataset order, and the
    labels (on device).

    Under torchrun each process encodes every world-th image and the pieces are gathered, so
    every process returns the whole set. The encoder must be in eval mode. With `log`, progress
    lines (this process's share) go there.
    """
    rank, world = world_info()
    progress = Progress(log or (lambda *a: None), name, len(range(rank, len(dataset), world)))
    feats, labels, done = [], [], 0
    for x, y in eval_batches(dataset, size, batch_size, device, workers):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(encoder(x).float())
        labels.append(y)
        done += len(y)
        if progress.due(done):
            progress.show(done, "images")
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world == 1:
        return feats, labels
    rows = -(-len(dataset) // world)  # pad every piece to the same length for all_gather
    pad = lambda t: torch.cat([t, t.new_zeros((rows - len(t),) + t.shape[1:])])
    out_f = feats.new_empty((len(dataset),) + feats.shape[1:])
    out_l = labels.new_empty(len(dataset))
    for r, (f, l) in enumerate(zip(dist_nn.all_gather(pad(feats)), dist_nn.all_gather(pad(labels)))):
        count = len(range(r, len(dataset), world))
        out_f[r::world], out_l[r::world] = f[:count], l[:count]
    return out_f, out_l


@torch.no_grad()
def knn_predict(train_feats, train_labels, query_feats, num_classes, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018) on cosine similarity: each of the k nearest training images
    votes for its class with weight exp(sim / temperature). Returns class scores, Q x C."""
    train_feats = F.normalize(train_feats, dim=1)
    k = min(k, len(train_feats))
    scores = []
    for q in F.normalize(query_feats, dim=1).split(1024):
        sim, idx = (q @ train_feats.T).topk(k, dim=1)  # q x k
        votes = F.one_hot(train_labels[idx], num_classes).float()  # q x k x C
        scores.append((votes * (sim / temperature).exp().unsqueeze(-1)).sum(1))
    return torch.cat(scores)


def knn_accuracy(encoder, train, val, cfg, device, workers, log):
    """kNN top-1 (%) of the evaluation split val, with the training split train as memory."""
    was_training = encoder.training
    encoder.eval()
    train_f, train_l = extract_features(encoder, train, cfg.image_size, 512, device, workers, log,
                                        "kNN: train")
    val_f, val_l = extract_features(encoder, val, cfg.image_size, 512, device, workers, log,
                                    "kNN: val")
    encoder.train(was_training)
    scores = knn_predict(train_f, train_l, val_f, len(train.classes), cfg.knn_k, cfg.knn_temperature)
    return 100.0 * (scores.argmax(1) == val_l).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def show_augmentations(cfg, data, augment, out_dir, device):
    """Save a grid: each row an image as evaluation sees it, then its two augmented views."""
    idx = torch.randperm(len(data))[:cfg.show_augmentations].tolist()
    if isinstance(data, InMemory):
        part = data.subset(idx)
        originals, _ = next(eval_batches(part, cfg.image_size, len(idx), device, 0))
    else:
        part = torch.utils.data.Subset(data, idx)
        originals = torch.stack([WorkerCrops(cfg.image_size)(data.loader(data.samples[i][0]))
                                 for i in idx]).to(device) / 255
    views, _ = next(iter(ViewLoader(part, range(len(idx)), len(idx), augment, 2, device, 0)))
    rows = torch.stack([originals, *views], 1).flatten(0, 1)  # 3n x 3 x S x S: image, v1, v2
    path = Path(out_dir) / "augmentations.png"
    torchvision.utils.save_image(rows, path, nrow=3, padding=2, pad_value=1.0)
    return path


def train(cfg, ckpt=None):
    """Pretrain as cfg says; ckpt: the checkpoint of --resume, read by resolve_config."""
    device, rank, world = setup(cfg.device)
    torch.manual_seed(cfg.seed + rank)  # ranks differ in augmentations; DDP syncs the weights
    main = rank == 0
    log = console(main)

    local_batch = per_process_batch(cfg.batch_size, world)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    workers = cfg.workers if cfg.workers >= 0 else default_workers(world)
    out_dir = Path(cfg.out_dir or f"runs/{cfg.dataset}-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    if main:
        prepare_out_dir(out_dir)  # an unwritable folder fails now, not after an epoch

    # Data: two views per image (Algorithm 1, lines 3-9), made on the device (augment.py)
    augment = build_augmentation(cfg.image_size, cfg.augment, cfg.color_strength, cfg.blur)
    dataset = load_split(cfg.dataset, cfg.data_dir, "pretrain", cfg.image_size, device, workers,
                         views=2, log=log, crop=augment.crop)
    if isinstance(dataset, InMemory) and not augment.crop and dataset.images.shape[-1] != cfg.image_size:
        raise UserError(f"--augment without crop keeps the images' {dataset.images.shape[-1]} px: "
                        f"set --image-size {dataset.images.shape[-1]}")
    if cfg.show_augmentations:
        if main:
            log(f"saved {show_augmentations(cfg, dataset, augment, out_dir, device)}")
        return
    knn_sets = None
    if cfg.eval_every:  # read now: a missing evaluation split fails before the first step
        split = lambda name: load_split(cfg.dataset, cfg.data_dir, name, cfg.image_size, device,
                                        workers, log=log)
        # CIFAR pretrains on its training split, already in memory
        knn_sets = (dataset if cfg.dataset.startswith("cifar") else split("train"), split("val"))
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} images are fewer than one batch of {cfg.batch_size}")
    if ckpt and ckpt.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise UserError(f"{cfg.resume} was written at {ckpt['steps_per_epoch']} steps per epoch, "
                        f"this data gives {steps_per_epoch}: resume with the same data")
    total_steps = cfg.epochs * steps_per_epoch  # the schedule's length
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    sampler = ResumableSampler(dataset, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = ViewLoader(dataset, sampler, local_batch, augment, 2, device, workers)

    # Model, optimizer
    torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): let cuDNN pick its kernels
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optimizer, peak_lr, cfg.weight_decay, cfg.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    if ckpt:
        load_model_state(model, ckpt["model"], cfg.resume)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"the optimizer state in {cfg.resume} does not fit --optimizer "
                            f"{cfg.optimizer}: {e}")
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        restore_random_state(ckpt["rng"], device)
    under_torchrun = dist.is_initialized()  # even one process: the path of eight
    if under_torchrun and cfg.global_bn:
        model = convert_to_global_bn(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    raw_model = model  # what checkpoints store; the momentum network copies it
    memory = None
    if cfg.memory_size:
        if cfg.memory_size < 2 * cfg.batch_size:
            raise UserError(f"--memory-size {cfg.memory_size} must hold at least one batch of "
                            f"{2 * cfg.batch_size} views")
        memory = Memory(raw_model, cfg.memory_size, raw_model.head.out_dim, cfg.memory_momentum).to(device)
        if ckpt and "memory" in ckpt:
            memory.load_state_dict(ckpt["memory"])
    if under_torchrun:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    n_params = sum(p.numel() for p in raw_model.encoder.parameters())
    log(f"git {git_revision() or '-'} | {world} process(es) on {device.type} | {precision} | "
        f"{'global BN | ' if under_torchrun and cfg.global_bn else ''}"
        f"encoder {n_params / 1e6:.2f}M parameters, h {raw_model.encoder.out_dim}-d")
    log("config " + json.dumps(dataclasses.asdict(cfg)))
    log(f"{len(dataset)} images, {steps_per_epoch} steps/epoch of {cfg.batch_size} "
        f"({local_batch} per process), {last_step} of {total_steps} steps, peak lr {peak_lr:.4g}, "
        f"out {out_dir}")

    stop = StopSignal()
    ckpt_path = out_dir / "ckpt.pt"

    def checkpoint():
        states = random_states(device)  # every process resumes its own augmentation stream
        if main:
            save_checkpoint(ckpt_path, dict(
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), epoch=step // steps_per_epoch, step=step,
                steps_per_epoch=steps_per_epoch, config=dataclasses.asdict(cfg), rng=states,
                **({"memory": memory.state_dict()} if memory is not None else {})))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                              enabled=precision in ("bf16", "fp16"))
    model.train()
    sums = torch.zeros(3, device=device)  # loss, contrast_acc, non-finite losses since the last log
    epoch_sums = torch.zeros(3, device=device)
    progress = Progress(log, "step", last_step, cfg.batch_size, every=cfg.log_every, start=step)
    since_log, t_start = 0, time.time()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        if step >= last_step:
            break
        sampler.set_epoch(epoch)
        sampler.start = (step % steps_per_epoch) * local_batch
        epoch_sums.zero_()
        t_epoch, epoch_step_start = time.time(), step
        for (x1, x2), _ in loader:
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = torch.cat([x1, x2])  # 2n x 3 x H x W: [views 1; views 2]
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                _, z = model(x)  # BN statistics over both views, as the official code
            z1, z2 = rearrange(z, "(v b) d -> v b d", v=2)
            if memory is not None:  # v2: the momentum network's keys join the queue after the step
                memory.update(raw_model)
                with autocast:
                    keys = memory.project(x)
            loss, acc = nt_xent_loss(z1, z2, cfg.temperature, memory.queue if memory is not None else None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if memory is not None:
                memory.enqueue(keys)
            step += 1
            since_log += 1
            sums += torch.stack([loss.detach(), acc.detach(), (~torch.isfinite(loss.detach())).float()])

            stopping = stop()  # asked every step, the same answer on every process
            # the log line, and the check for a non-finite loss before any checkpoint is written
            if progress.due(step) or step % steps_per_epoch == 0 or stopping:
                if world > 1:
                    dist.all_reduce(sums)
                    sums /= world
                loss_avg, acc_avg, bad = (sums / since_log).tolist()
                epoch_sums += sums
                sums.zero_()
                since_log = 0
                if bad > 0:
                    raise UserError(f"loss is not finite at step {step}; stopped. " + (
                        f"The last good checkpoint is {ckpt_path}" if ckpt_path.exists() else
                        "No checkpoint was written yet") + " (try a lower --lr)")
                progress.show(step, f"epoch {epoch + 1}/{cfg.epochs} loss {loss_avg:.4f} "
                                    f"contrast_acc {100 * acc_avg:.1f}% lr {lr:.4g}")
            if step >= last_step or stopping:
                break

        # end of epoch (or stop): checkpoint first, then the log line and the optional kNN
        checkpoint()
        if stop.stopped_at(step, ckpt_path, log):
            return
        epoch_steps = step - epoch_step_start
        record = dict(epoch=epoch + 1, step=step, loss=epoch_sums[0].item() / max(1, epoch_steps),
                      contrast_acc=epoch_sums[1].item() / max(1, epoch_steps), lr=lr,
                      images_per_s=epoch_steps * cfg.batch_size / (time.time() - t_epoch),
                      time=time.time() - t_start)
        record.update(unreadable_images(dataset, device, log))
        if knn_sets and ((epoch + 1) % cfg.eval_every == 0 or step >= last_step):
            record["knn_top1"] = knn_accuracy(raw_model.encoder, *knn_sets, cfg, device, workers, log)
            log(f"epoch {epoch + 1}: kNN top-1 {record['knn_top1']:.2f}%")
        if main:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
    log(f"done: {step} steps in {datetime.timedelta(seconds=round(time.time() - t_start))}, "
        f"checkpoint {ckpt_path}")


def resolve_config(argv):
    """Flags over presets; with --resume, flags over the checkpoint's stored configuration.
    Returns (config, the checkpoint of --resume or None)."""
    cfg, given = parse_config(Config, argv, PRESETS, __doc__.splitlines()[0])
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume)
    return resumed_config(Config, ckpt["config"], given, cfg.resume), ckpt


def main(argv=None):
    run_cli("pretrain.py", lambda: train(*resolve_config(argv)))


if __name__ == "__main__":
    main()
