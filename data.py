"""The data of every script: datasets, image folders, loaders and samplers, and the two ways
images reach the training device, as the authors keep data.py apart from their model.

Small fixed-size datasets (CIFAR-10/100, STL-10, or an image folder of them) are decoded once
into one uint8 tensor on the training device (InMemory): batches are indexed and augmented there
(augment.py), with no loader workers and no copy per step. Image folders of any size (ImageNet,
your own images) are decoded by loader workers, which crop each view at full resolution to the
output size (WorkerCrops), and the device does the rest of the augmentation on the batch.
ViewLoader yields the augmented views of one epoch either way; eval_batches the evaluation view.
"""
import contextlib
import io
import itertools
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision

from augment import (SimCLRAugmentation, center_crop_box, center_crop_resize, crop_resize,
                     parse_augment, random_crop_resize_uint8)
from cli import Progress, UserError, first_line, world_info

SMALL_IMAGE_DATASETS = ("cifar10", "cifar100", "stl10")  # decoded once into device memory


def build_augmentation(size, augment="crop", strength=1.0, blur=False, base_crop=False):
    """The authors' augmentation (augment.py) with the --augment switches; the default, crop +
    flip, is what fine-tuning and linear evaluation train with."""
    try:
        return SimCLRAugmentation(size, **parse_augment(augment), strength=strength, blur=blur,
                                  base_crop=base_crop)
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
    """One epoch of augmented views of every image in this process's share (sampler), as float
    batches on the device: yields ([view 1, ...], labels), views n x 3 x S x S, one view per
    augmentation in `augments` (the same one twice for Algorithm 1; Fig. 5's protocol gives
    each branch its own). InMemory data is indexed and augmented on the device; image folders
    come cropped from the loader workers (WorkerCrops), and the device does the rest (flip,
    colour, blur) on the batch."""

    def __init__(self, data, sampler, batch_size, augments, device, workers):
        self.data, self.sampler, self.batch_size = data, sampler, batch_size
        self.augments, self.device = augments, device
        self.loader = None if isinstance(data, InMemory) else make_loader(
            data, batch_size, device, workers, sampler, drop_last=True, persistent=True)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        if self.loader is None:
            order = torch.tensor(list(self.sampler), device=self.device)  # one copy per epoch
            for idx in order[:len(self) * self.batch_size].view(-1, self.batch_size):
                images = self.data.images[idx]  # n x 3 x H x W, uint8
                yield [augment(images) for augment in self.augments], self.data.labels[idx]
        else:
            for crops, labels in self.loader:
                crops = crops.to(self.device, non_blocking=True)  # n x V x 3 x S x S, uint8
                yield ([augment(crops[:, v], cropped=True) for v, augment in enumerate(self.augments)],
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
