"""The data of every script: datasets, image folders, loaders and samplers.

Small datasets (CIFAR-10/100, STL-10, or an image folder of them) are decoded once into one uint8
tensor on the training device (InMemory), where batches are indexed and augmented (augment.py).
Image folders of any size (ImageNet, your own) are decoded by loader workers, which crop each view
at full resolution to the output size (WorkerCrops); the device does the rest on the batch.
ViewLoader yields the augmented views of an epoch either way, eval_batches the evaluation view.
"""
import contextlib
import copy
import io
import itertools
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, PngImagePlugin
from torchvision.datasets.folder import IMG_EXTENSIONS

from augment import (SimCLRAugmentation, center_crop_box, center_crop_resize, crop_resize,
                     parse_augment, random_crops_uint8, sample_crop_boxes, view_boxes)
from runs import SOFTWARE, Progress, UserError, first_line, world_info

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
    """What a loader worker does to each image of a folder: `views` random crops resized to size,
    uint8 (views=0: the evaluation's centre crop; random=False, --augment without crop: the
    centre crop for every view). on_device (--decode device): it reads a JPEG's bytes and the
    device decodes and crops (device_crops); reader: how the folder reads each file for it."""

    def __init__(self, size, views=0, random=True, on_device=False):
        self.size, self.views, self.random = size, views, random
        self.on_device = on_device and views and random
        self.reader = read_encoded if self.on_device else decode

    def __call__(self, image):  # uint8 H x W x 3, as decoded
        return self.batch([image])[0]

    def batch(self, images):
        """The crops of a loader worker's batch: one draw of the crop sampler for all."""
        if self.on_device:
            return images  # read_encoded's: the device crops them
        if self.views and self.random:
            return list(random_crops_uint8(images, self.size, self.views))  # V x 3 x S x S each
        views = [center_crop_resize(image, self.size) for image in images]  # 3 x S x S each
        return [torch.stack([view] * self.views) for view in views] if self.views else views


class InMemory:
    """A split of small images as one uint8 tensor N x 3 x H x W on the training device (CIFAR-10:
    150 MB), and its labels. samples / root: the files of an image folder it was read from."""

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


SIDES = {"cifar10": 32, "cifar100": 32, "stl10": 96}  # px


def load_split(dataset, data_dir, split, size, device, workers=0, views=0, log=print, crop=True,
               val_fraction=0.0, val_dir="", held_out=None, decode_on="workers"):
    """A split ready for batches on the device: CIFAR-10/100 and STL-10 as InMemory, image
    folders as an ImageFolder whose workers decode and crop (WorkerCrops). val_fraction, val_dir:
    where the evaluation images come from (build_dataset); a training split never holds them,
    nor the files of held_out (excluding)."""
    transform = (WorkerCrops(size, views, crop, decode_on == "device") if dataset not in
                 SMALL_IMAGE_DATASETS else chw)
    source = build_dataset(dataset, data_dir, split, transform, val_fraction, val_dir)
    if split != "val":
        source = excluding(source, evaluation_files(data_dir, val_dir) if held_out is None
                           else held_out)
    if dataset not in SMALL_IMAGE_DATASETS:
        return source
    if hasattr(source, "samples"):  # an image-folder export: of the size --dataset says?
        with Image.open(source.samples[0][0]) as first:
            width, height = first.size
        if width != SIDES[dataset] or height != SIDES[dataset]:
            raise UserError(f"the images under {source.root} are {width} x {height} px, {dataset}'s "
                            f"{SIDES[dataset]} x {SIDES[dataset]}: for your own images use "
                            f"--dataset folder (and --image-size {min(width, height)})")
        classes = len(source.classes)  # the same count or, for a part of CIFAR-10, fewer
        if classes and (classes > 10 if dataset == "cifar10" else classes <= 10):
            other = "cifar100" if dataset == "cifar10" else "cifar10"
            raise UserError(f"{source.root} has {classes} classes: not {dataset}'s "
                            f"{10 if dataset == 'cifar10' else 100}; --dataset {other}, or "
                            f"--dataset folder for images of your own")
    if not hasattr(source, "samples"):  # torchvision's arrays: N x H x W x 3 (CIFAR), N x 3 x H x W
        images = torch.as_tensor(source.data)
        images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images
        labels = dataset_labels(source)
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
        if source.unreadable_files():
            log(f"{source.unreadable_files()} unreadable image(s), each replaced by the next image "
                f"(named on stderr)")
    return InMemory(images.contiguous().to(device), torch.as_tensor(labels).to(device),
                    source.classes, getattr(source, "samples", None), getattr(source, "root", None))


class ViewLoader:
    """One epoch of this process's share (sampler) as float batches on the device: yields
    ([view 1, ...], labels), views n x 3 x S x S, one per augmentation in `augments` (Fig. 5's
    protocol, base_crop: both from one random crop of each image). Image folders come cropped
    from the loader workers (or as JPEG bytes, device_crops); the device does the rest.
    `waited`: seconds spent waiting for the workers (runs.Run's data share)."""

    def __init__(self, data, sampler, batch_size, augments, device, workers):
        self.data, self.sampler, self.batch_size = data, sampler, batch_size
        self.augments, self.device = augments, device
        self.shared = augments[0].base_crop  # Fig. 5's protocol: the views share one crop
        self.encoded = getattr(getattr(data, "transform", None), "on_device", False)
        self.loader = None if isinstance(data, InMemory) else make_loader(
            data, batch_size, device, workers, sampler, drop_last=True, persistent=True,
            collate=_items if self.encoded else None)
        self.waited = 0.0

    @staticmethod
    def crops_per_image(augments):
        """The random crops the workers make of each image: one per view, or one shared."""
        return 1 if augments[0].base_crop else len(augments)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        if self.loader is None:
            order = torch.tensor(list(self.sampler), device=self.device)  # one copy per epoch
            for idx in order[:len(self) * self.batch_size].view(-1, self.batch_size):
                images = self.data.images[idx]  # n x 3 x H x W, uint8
                if self.shared:  # float 0..255, as the augmentation reads uint8
                    boxes = sample_crop_boxes(len(idx), *images.shape[2:], device=self.device)
                    images = crop_resize(images.float(), boxes, self.augments[0].size)
                yield ([augment(images, cropped=self.shared) for augment in self.augments],
                       self.data.labels[idx])
        else:
            batches = iter(self.loader)
            while True:
                start = time.perf_counter()
                batch = next(batches, None)
                self.waited += time.perf_counter() - start
                if batch is None:
                    return
                crops, labels = batch
                crops = (device_crops(crops, self.augments[0].size, ViewLoader.crops_per_image(
                    self.augments), self.device, self.data) if self.encoded else
                    crops.to(self.device, non_blocking=True))  # n x V x 3 x S x S, uint8
                yield ([augment(crops[:, 0 if self.shared else v], cropped=True)
                        for v, augment in enumerate(self.augments)],
                       labels.to(self.device, non_blocking=True))


def eval_batches(data, size, batch_size, device, workers):
    """This process's share (every world-th image) in order, as the evaluation sees it (the
    centre crop, clipped to [0, 1]; 32 px images as they are): yields (float n x 3 x S x S, labels)."""
    rank, world = world_info()
    if isinstance(data, InMemory):
        box = center_crop_box(*data.images.shape[2:], size)
        boxes = torch.tensor([box], device=device)
        for idx in torch.arange(rank, len(data), world, device=device).split(batch_size):
            x = data.images[idx].float() / 255  # n x 3 x H x W
            if box != (0, 0, size, size):
                x = crop_resize(x, boxes.expand(len(idx), 4), size).clamp(0, 1)  # bicubic overshoots
            yield x, data.labels[idx]
    else:
        part = torch.utils.data.Subset(data, range(rank, len(data), world))
        for x, y in make_loader(part, batch_size, device, workers):
            yield x.to(device, non_blocking=True).float() / 255, y.to(device, non_blocking=True)


def evaluation_files(data_dir, val_dir):
    """The evaluation folder's images (--val-dir, val/ or test/) if it lies inside the training
    images' folder (<data-dir>/train, or <data-dir>), else None: beside it, none can be trained on."""
    root = Path(data_dir)
    tree = root / "train" if (root / "train").is_dir() else root
    folder = Path(val_dir) if val_dir else next(
        (root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if folder is None or not inside(folder, tree):
        return None
    try:
        return _image_folder(folder, None, "--val-dir", labelled=False)
    except UserError:
        return None


SPLIT_SEED = 0  # the held-out images depend on the folder and --val-fraction alone


def class_balanced(labels, fraction, seed):
    """Sorted indices of round(fraction x n_c) images of every class c (at least 1), drawn with
    seed: class-balanced as the authors' ImageNet lists (about 13 and 128 per class for 1% and
    10%), the same on every machine and process."""
    generator = torch.Generator().manual_seed(seed)
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    chosen = []
    for y in sorted(by_class):
        members = by_class[y]
        k = max(1, round(fraction * len(members)))
        chosen += [members[j] for j in torch.randperm(len(members), generator=generator)[:k].tolist()]
    return sorted(chosen)


def image_names(dataset, indices):
    """What subset.txt stores: <class>/<file> for image folders, the index for other datasets."""
    if getattr(dataset, "samples", None) is None:  # torchvision arrays (in memory or not)
        return [str(i) for i in indices]
    return [Path(dataset.samples[i][0]).relative_to(dataset.root).as_posix() for i in indices]


SUBSET_HEADER = "# the labelled images of the run in this folder; --subset-file takes this file"


def save_subset(path, dataset, indices):
    """subset.txt: the labelled images (image_names) under SUBSET_HEADER (subset_is_ours)."""
    Path(path).write_text("\n".join([SUBSET_HEADER, *image_names(dataset, indices)]) + "\n")


def subset_is_ours(path):
    return Path(path).read_text().startswith(SUBSET_HEADER)


def read_subset_file(path, dataset):
    """Indices of the images a subset file names, one per line: <class>/<file> (image_names), a
    bare file name as in the authors' ImageNet lists (n01440764_10026.JPEG), or, for datasets
    without files (torchvision's CIFAR), an index."""
    try:
        lines = [s.strip() for s in Path(path).read_text().splitlines()]
    except OSError as e:
        raise UserError(f"cannot read --subset-file {path}: {e.strerror}")
    lines = [s for s in lines if s and not s.startswith("#")]
    if not lines:
        raise UserError(f"--subset-file {path} names no images")
    if getattr(dataset, "samples", None) is None:  # torchvision arrays (in memory or not)
        try:
            indices = [int(s) for s in lines]
        except ValueError:
            raise UserError(f"--subset-file {path}: this dataset has no image files, so each "
                            f"line must be an index into the training split")
        bad = [i for i in indices if not 0 <= i < len(dataset)]
        if bad:
            raise UserError(f"--subset-file {path}: index {bad[0]} is outside the "
                            f"{len(dataset)} training images")
        return sorted(set(indices))
    by_path, by_name = {}, {}
    for i, (file, _) in enumerate(dataset.samples):
        by_path[Path(file).relative_to(dataset.root).as_posix()] = i
        by_name.setdefault(Path(file).name, []).append(i)
    indices, missing = [], []
    for s in lines:
        if s in by_path:
            indices.append(by_path[s])
        elif len(by_name.get(s, [])) == 1:
            indices.append(by_name[s][0])
        elif s in by_name:
            raise UserError(f"--subset-file {path}: {s} names {len(by_name[s])} images; "
                            f"write it as <class>/{s}")
        else:
            missing.append(s)
    if missing:
        raise UserError(f"--subset-file {path}: {len(missing)} of {len(lines)} images are not in "
                        f"{dataset.root} (first: {missing[0]})")
    return sorted(set(indices))


def choose_labeled(cfg, train_set, log):
    """The labelled indices (from --subset-file or drawn with --label-fraction and --seed)."""
    if cfg.subset_file:
        indices = read_subset_file(cfg.subset_file, train_set)
        log(f"{len(indices)} labelled images from {cfg.subset_file}")
    else:
        labels = dataset_labels(train_set)
        indices = class_balanced(labels, cfg.label_fraction, cfg.seed)
        share = len(indices) / len(labels)
        log(f"{len(indices)} labelled images: {100 * share:.3g}% of the {len(labels)} training "
            f"images" + (f" ({100 * cfg.label_fraction:g}% asked, at least one of each class)"
                         if abs(share - cfg.label_fraction) > 0.1 * cfg.label_fraction else
                         f", {100 * cfg.label_fraction:g}% of each class") + f", seed {cfg.seed}")
    return indices


def stage_data(given, stored):
    """{dataset, data_dir, val_fraction, val_dir} of a later stage: as given, else the checkpoint's
    (stored: its configuration), which for the evaluation split holds on its own data only: the
    later scripts evaluate on the images pretraining held out. A split that would evaluate on
    images the checkpoint trained on is refused."""
    dataset = given.get("dataset") or stored.get("dataset", "")
    same = dataset == stored.get("dataset")
    data_dir = given.get("data_dir") or (stored.get("data_dir", "") if same else "")
    if not dataset or not data_dir:
        raise UserError(f"--data-dir is needed: {dataset} is not the checkpoint's data "
                        f"({stored.get('dataset')})" if dataset else "--dataset and --data-dir are needed")
    same_data = os.path.realpath(data_dir) == os.path.realpath(stored.get("data_dir", ""))
    trained = Path(stored.get("data_dir", "")) / (
        "train" if (Path(stored.get("data_dir", "")) / "train").is_dir() else "")
    split = dict(dataset=dataset, data_dir=data_dir)
    for name, default in (("val_fraction", 0.0), ("val_dir", "")):
        theirs = stored.get(name, default) if same_data else default
        split[name] = given.get(name, theirs)
        if split[name] != theirs and (name == "val_fraction" and same_data or
                                      name == "val_dir" and inside(split[name], trained)):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {split[name]} differs from the checkpoint's {theirs or repr(theirs)}"
                            f": it was trained on images that split holds; leave {flag} out (the "
                            f"checkpoint's split is used), or evaluate another checkpoint")
    return split


def inside(path, folder):
    """Whether path is folder or lies under it (paths as written, made absolute)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def excluding(dataset, evaluation):
    """dataset without the evaluation split's files, whatever folders were given (a --val-dir
    inside the training folder, an unlabeled folder holding them); arrays are disjoint already."""
    if evaluation is None or getattr(dataset, "samples", None) is None or \
            getattr(evaluation, "samples", None) is None:
        return dataset
    held_out = {os.path.abspath(file) for file, _ in evaluation.samples}
    keep = [i for i, (file, _) in enumerate(dataset.samples) if os.path.abspath(file) not in held_out]
    return dataset if len(keep) == len(dataset.samples) else select(dataset, keep)


def preset(dataset, image_size):
    """The preset of a dataset: --dataset folder follows ImageNet's, or CIFAR-10's for images of
    32 px or less (no blur, colour strength 0.5, ...)."""
    return "cifar10" if dataset == "folder" and image_size <= 32 else dataset


def typical_side(folder, count=64):
    """The median shorter side (px) of the first `count` images found under folder (headers
    only), or None without images: what --image-size should not exceed by far."""
    sides = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if Path(name).suffix.lower() in IMG_EXTENSIONS and len(sides) < count:
                try:
                    with Image.open(Path(directory) / name) as image:
                        sides.append(min(image.size))
                except OSError:
                    continue
        if len(sides) >= count:
            break
    return sorted(sides)[len(sides) // 2] if sides else None


def check_same_classes(train, val):
    """The splits must name the same classes (or labels shift), and two at least."""
    if len(val.classes) < 2:
        raise UserError(f"the evaluation images are of {len(val.classes)} class"
                        f"{'' if len(val.classes) == 1 else 'es'} ({', '.join(val.classes)}): "
                        f"classifying needs two or more (<class>/<image> folders)")
    if list(train.classes) != list(val.classes):
        odd = sorted(set(train.classes) ^ set(val.classes)) or ["(their order)"]
        raise UserError(f"the training and evaluation images have different classes "
                        f"({len(train.classes)} vs {len(val.classes)}; first difference: {odd[0]}): "
                        f"their labels would not match")


def dataset_labels(dataset):
    """The class index of every image (ImageFolder and CIFAR: .targets; STL-10: .labels)."""
    labels = getattr(dataset, "targets", None)
    return [int(y) for y in (dataset.labels if labels is None else labels)]


def select(dataset, indices):
    """A copy of dataset (InMemory, image folder, torchvision arrays) with the images at indices."""
    if isinstance(dataset, InMemory):
        return dataset.subset(indices)
    dataset = copy.copy(dataset)
    if hasattr(dataset, "samples"):
        dataset.samples = dataset.imgs = [dataset.samples[i] for i in indices]
        if hasattr(dataset, "ids"):  # an ImageFolder's places in its unreadable marks
            dataset.ids = [dataset.ids[i] for i in indices]
        dataset.targets = [y for _, y in dataset.samples]
    else:
        dataset.data = dataset.data[indices]
        for name in ("targets", "labels"):
            if getattr(dataset, name, None) is not None:
                setattr(dataset, name, [getattr(dataset, name)[i] for i in indices])
    return dataset


def build_dataset(dataset, data_dir, split, transform, val_fraction=0.0, val_dir=""):
    """split: 'pretrain' (every image, labels unused), 'train' (labelled) or 'val'.

    cifar10/cifar100/stl10 come from torchvision; imagenet, folder and a cifar export are image
    folders, <data-dir>/train/<class>/<image> and <data-dir>/val/ (or test/); folder pretrains on
    every image under <data-dir>/train (or <data-dir>). The evaluation split is --val-dir, else
    with --val-fraction a class-balanced part of the training images (SPLIT_SEED), else val/.
    """
    if split == "val" and val_dir:
        return _image_folder(Path(val_dir), transform, "--val-dir")
    if val_fraction:
        full = build_dataset(dataset, data_dir, "train", transform)
        held_out = set(class_balanced(dataset_labels(full), val_fraction, SPLIT_SEED))
        if len(held_out) == len(full):
            raise UserError(f"--val-fraction {val_fraction} holds out every training image "
                            f"({len(full)}); lower it")
        return select(full, sorted(held_out) if split == "val" else
                      [i for i in range(len(full)) if i not in held_out])
    root = Path(data_dir)
    if dataset in ("imagenet", "folder") or (dataset.startswith("cifar") and (root / "train").is_dir()):
        train = root / "train" if (root / "train").is_dir() or dataset != "folder" else root
        if split == "pretrain" and dataset == "folder":
            return _image_folder(train, transform, "--data-dir", labelled=False)
        if split != "val":
            return _image_folder(train, transform, "--data-dir")
        path = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
        if path is None:
            raise UserError(f"no evaluation images: {root} has no val/ (or test/) folder of class "
                            f"folders; hold out part of the training images with --val-fraction "
                            f"0.1, or give --val-dir")
        return _image_folder(path, transform, "--data-dir")
    if dataset in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        return _torchvision_dataset(dataset, root, lambda download: cls(
            str(root), train=split != "val", transform=transform, download=download))
    if dataset == "stl10":
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
        return _torchvision_dataset(dataset, root, lambda download: torchvision.datasets.STL10(
            str(root), split=stl_split, transform=transform, download=download))
    raise UserError(f"unknown dataset {dataset!r}")


def _image_folder(path, transform, flag, labelled=True):
    """An ImageFolder of path (labelled: class folders needed), or every image under it."""
    if not path.is_dir():
        raise UserError(f"no image folder at {path} (set {flag})")
    loose = [p.name for p in path.iterdir() if p.suffix.lower() in IMG_EXTENSIONS]
    if labelled and loose:
        raise UserError(f"{len(loose)} images lie directly in {path} (first: {loose[0]}), outside "
                        f"any class folder: labels are needed here (<class>/<image>)")
    try:
        return ImageFolder(str(path), transform) if labelled else ImageFiles(str(path), transform)
    except FileNotFoundError as e:
        if not labelled:
            raise UserError(f"no images under {path} ({', '.join(IMG_EXTENSIONS)})")
        raise UserError(f"{path} has no class folders with images ({first_line(e)}): labels are "
                        f"needed here (<class>/<image>); pretraining also takes unlabeled folders")
    except OSError as e:
        raise UserError(f"cannot read images under {path}: {e}")


def _torchvision_dataset(name, root, make):
    try:
        return make(download=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        pass
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints before failing offline
            return make(download=True)
    except Exception as e:
        export = (", or point --data-dir at an image-folder export (train/<class>/*, "
                  "val/<class>/*)" if name.startswith("cifar") else
                  " (torchvision's binary files), or --dataset folder for images of your own")
        raise UserError(f"{name} is not in {root} and could not be downloaded "
                        f"({type(e).__name__}); download it into --data-dir on a machine with "
                        f"network{export}")


def chw(image):
    """An image as decoded (H x W x 3) as the tensors of this project are: 3 x H x W."""
    return image.permute(2, 0, 1)


def decode(path):
    """An image file as uint8 H x W x 3 RGB, PIL's pixels (tested): JPEGs of 1 or 3 channels by
    torchvision.io (faster), the others by PIL. An unreadable file raises OSError."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\xff\xd8" and hasattr(torchvision.io, "decode_jpeg"):  # deprecated in 0.29
        try:
            x = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                           mode=torchvision.io.ImageReadMode.UNCHANGED)
        except RuntimeError:  # a damaged file: as PIL says it (below)
            x = None
        if x is not None and len(x) in (1, 3):
            return x.permute(1, 2, 0).expand(-1, -1, 3)  # gray as PIL converts it: the same Y x 3
    return pil_rgb(path)


def pil_rgb(file):
    """An image file (a path or file object) as PIL reads it in RGB: uint8 H x W x 3."""
    with Image.open(file) as image:
        return torch.from_numpy(np.array(image.convert("RGB")))


def read_encoded(path):
    """A JPEG of 1 or 3 channels as (its bytes, height, width) from its header, for the device to
    decode (device_crops); another image decoded here (decode)."""
    with Image.open(path) as image:  # the header alone
        if image.format == "JPEG" and image.mode in ("RGB", "L"):
            with open(path, "rb") as f:  # (torchvision.io.read_file's maps the file: no sharing)
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), image.height, image.width
    return decode(path)


def device_crops(items, size, views, device, data, generator=None, boxes=None):
    """--decode device: a batch of read_encoded items decoded together on the device (nvjpeg),
    then cropped as a worker does (or to boxes, n*views x 4): n x views x 3 x S x S uint8. What
    the device cannot decode PIL does; an unreadable file is replaced by the batch's first
    image and marked in data."""
    encoded = [i for i, item in enumerate(items) if isinstance(item, tuple)]
    images = [item if isinstance(item, tuple) else item.to(device, non_blocking=True) for item in items]
    if encoded:
        mode = torchvision.io.ImageReadMode.RGB
        try:
            decoded = torchvision.io.decode_jpeg([items[i][0] for i in encoded], mode=mode, device=device)
        except RuntimeError:  # one of them is damaged: one by one, PIL the judge
            decoded = [_decode_or_none(items[i][0], mode, device) for i in encoded]
        for i, x in zip(encoded, decoded):
            if x is None:
                data.mark_unreadable(data.ids.index(items[i][3]), "the device cannot decode it",
                                     "the batch's first image")
            images[i] = None if x is None else x.permute(1, 2, 0)
    first = next(x for x in images if x is not None)
    images = [first if x is None else x for x in images]
    if boxes is None:
        boxes = view_boxes(images, views, generator, device)
    crops = [crop_resize(x.permute(2, 0, 1)[None].float().expand(views, -1, -1, -1), b, size)
             for x, b in zip(images, boxes.split(views))]
    return torch.stack(crops).round_().clamp_(0, 255).to(torch.uint8)


def _decode_or_none(data, mode, device):
    try:
        return torchvision.io.decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        try:
            return chw(pil_rgb(io.BytesIO(data.numpy().tobytes()))).to(device)
        except (OSError, ValueError, SyntaxError):
            return None


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder that survives unreadable files (ImageNet has some): each is named
    on stderr and replaced by the next readable image, and marked in `unreadable` (a byte per
    file, shared with the workers; `ids`: the samples' places in it). Many in a row stop the run."""

    MAX_IN_A_ROW = 50

    def __init__(self, root, transform):
        super().__init__(root, transform)
        self.unreadable = multiprocessing.Array("b", max(1, len(self.samples)), lock=False)
        self.ids = list(range(len(self.samples)))
        self.named = set()

    def unreadable_files(self):
        return bytes(self.unreadable).count(1)

    def __getitem__(self, index):
        image, target = self.read(index)
        return self.transform(image), target

    def __getitems__(self, indices):
        """A loader's batch: the images decoded, then cropped together (WorkerCrops.batch)."""
        images, targets = zip(*(self.read(i) for i in indices))
        batch = getattr(self.transform, "batch", lambda images: [self.transform(x) for x in images])
        return list(zip(batch(list(images)), targets))

    def mark_unreadable(self, j, why, instead):
        """The file at samples[j] is unreadable: marked, and named once (on stderr)."""
        path = self.samples[j][0]
        self.unreadable[self.ids[j]] = 1
        if path not in self.named:  # one write: lines of several workers stay whole
            self.named.add(path)
            sys.stderr.write(f"warning: unreadable image {path} ({why}); using {instead} instead\n")
            sys.stderr.flush()

    def read(self, index):
        """(image, label) of the file at index, or of the next readable one: uint8 H x W x 3, or
        what the transform's reader returns (a JPEG's bytes come with the file's id)."""
        reader = getattr(self.transform, "reader", decode)
        for offset in range(self.MAX_IN_A_ROW):
            j = (index + offset) % len(self.samples)
            path, target = self.samples[j]
            try:
                item = reader(path)  # the whole file, or a JPEG's bytes
                return (*item, self.ids[j]) if isinstance(item, tuple) else item, target
            except (OSError, ValueError, SyntaxError) as e:  # what decode raises for a bad file
                self.mark_unreadable(j, f"{type(e).__name__}: {e}", "the next image")
        raise UserError(f"{self.MAX_IN_A_ROW} unreadable images in a row from "
                        f"{self.samples[index][0]} on: is {self.root} a folder of images?")


class ImageFiles(ImageFolder):
    """Every image under root at any depth (hidden files and folders aside), in path order,
    without labels (-1): pretraining's unlabeled pool. Class folders are allowed and ignored."""

    def find_classes(self, directory):
        return [], {}

    @staticmethod
    def make_dataset(directory, class_to_idx=None, extensions=None, is_valid_file=None,
                     allow_empty=False):
        files = sorted(p for p in Path(directory).rglob("*")
                       if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(directory).parts))
        if not files:
            raise FileNotFoundError(f"no images under {directory}")
        return [(str(p), -1) for p in files]


def _quiet_worker(worker_id):
    # Ctrl-C and SIGTERM reach the whole process group: the main process answers them (runs.Run)
    # and shuts its workers down, so a worker must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _items(batch):
    """--decode device's batches: the items as the workers read them (read_encoded), labels."""
    return [item for item, _ in batch], torch.tensor([label for _, label in batch])


def make_loader(dataset, batch_size, device, workers, sampler=None, drop_last=False,
                persistent=False, collate=None):
    """The DataLoader of every script: pinned memory on CUDA, workers that leave signals to the
    main process, persistent workers on request."""
    # The workers' seeds are drawn once, here, not from the random stream at every epoch (a run
    # resumed mid-epoch would diverge); a loader in order draws nothing.
    seeds = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())) if sampler else 0)
    return torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0,
        worker_init_fn=_quiet_worker, generator=seeds, collate_fn=collate)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (this rank's share of a seeded per-epoch shuffle, tail dropped) that
    can start part-way into an epoch, so a run stopped mid-epoch resumes on the next batch."""

    start = 0  # samples of the current epoch this rank has already consumed

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def save_augmentation_grid(path, data, augments, size, device, count=8):
    """A PNG at path: `count` random images of data, a row each: the original, the evaluation
    view, one view per augmentation."""
    idx = torch.randperm(len(data))[:count].tolist()
    if isinstance(data, InMemory):
        part = data.subset(idx)
        originals = list(part.images.cpu())
        evaluation, _ = next(eval_batches(part, size, len(idx), device, 0))
    else:
        part = select(data, idx)
        images = [part.read(i)[0] for i in range(len(idx))]  # H x W x 3; unreadable ones replaced
        originals = [chw(image) for image in images]
        evaluation = torch.stack([WorkerCrops(size)(image) for image in images]) / 255
    fitted = []
    for image in originals:  # uint8 3 x H x W -> the whole image in a size x size cell, on white
        scale = size / max(image.shape[1:])
        h, w = (max(1, round(scale * n)) for n in image.shape[1:])
        image = torch.nn.functional.interpolate(image[None].float() / 255, (h, w), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
        cell = torch.ones(3, size, size)
        top, left = (size - h) // 2, (size - w) // 2
        cell[:, top:top + h, left:left + w] = image.clamp(0, 1)
        fitted.append(cell)
    views, _ = next(iter(ViewLoader(part, range(len(idx)), len(idx), augments, device, 0)))
    columns = [torch.stack(fitted), evaluation.cpu(), *(v.cpu() for v in views)]
    return save_grid(path, torch.stack(columns, 1),
                     ["original", "evaluation", *(f"view {i + 1}" for i in range(len(augments)))])


def save_grid(path, images, headers, captions=None):
    """A PNG at path of images (rows x columns x 3 x S x S in [0, 1]), headers over the columns,
    captions (rows x columns strings) under the images; small images enlarged for the text."""
    rows, columns, _, size, _ = images.shape
    grid = torchvision.utils.make_grid(images.flatten(0, 1).float(), nrow=columns, padding=2,
                                       pad_value=1.0)  # 3 x H x W
    zoom, line = max(1, 96 // size), 12 if captions else 0
    cell = (size + 2) * zoom
    picture = torchvision.transforms.functional.to_pil_image(grid).resize(
        (grid.shape[2] * zoom, grid.shape[1] * zoom), Image.NEAREST)
    canvas = Image.new("RGB", (picture.width, 16 + rows * (cell + line) + 2 * zoom), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        canvas.paste(picture.crop((0, r * cell, picture.width, (r + 1) * cell)),
                     (0, 16 + r * (cell + line)))
        for c in range(columns if captions else 0):
            draw.text((c * cell + 2 * zoom, 16 + r * (cell + line) + cell),
                      captions[r][c][:cell // 6], fill="black")
    for i, title in enumerate(headers):
        draw.text((i * cell + 2 * zoom, 2), title, fill="black")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)  # what check_output recognises as this project's picture
    try:
        canvas.save(path, pnginfo=info)
    except (OSError, ValueError) as e:  # a missing folder, an unknown extension
        raise UserError(f"cannot write {path}: {first_line(e)} (give a file name such as views.png)")
    return path
