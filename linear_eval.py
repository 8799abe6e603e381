"""Linear evaluation of a SimCLR encoder: the paper's main protocol (Sec. 2.3, Appendix B.6).

The encoder f of a pretraining checkpoint is frozen, BatchNorm included, and a zero-initialised
linear layer on h = f(x) is trained with cross-entropy: Nesterov SGD, lr 0.1 x B/256, cosine
decay, crop + flip (CIFAR: B 512, 100 epochs; ImageNet: B 4096, 90 epochs, weight decay 1e-6).
Top-1 and top-5 on the evaluation split go to a JSON file beside the checkpoint.

    python linear_eval.py --checkpoint runs/cifar10-resnet18-.../ckpt.pt          # paper protocol
    python linear_eval.py --checkpoint runs/.../ckpt.pt --cached-features --knn 200  # fast on CPU
    python linear_eval.py --checkpoint runs/.../ckpt.pt --random-init --cached-features  # baseline
    python linear_eval.py --checkpoint runs/.../ckpt.pt --dataset cifar100 --data-dir data/c100
    torchrun --nproc_per_node=8 linear_eval.py --checkpoint runs/.../ckpt.pt --dataset imagenet \
        --data-dir /data/imagenet

--cached-features trains on h computed once per image without augmentation: seconds instead of
hours on a CPU. --knn K adds weighted kNN top-1 on normalised h (--epochs 0: the kNN alone);
--show-neighbours nn.png draws evaluation images beside their nearest training images. Another
--dataset is transfer (Sec. 6). RESULTS.md has what it measured.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import (InMemory, ViewLoader, build_augmentation, check_same_classes, eval_batches,
                  load_split, preset, save_grid, select, stage_data)
from evaluation import extract_features, knn_accuracy, shown, topk_accuracy
from model import Representation, build_model, build_optimizer, learning_rate, scaled_lr
from runs import (Progress, Run, System, UserError, as_user_error, check_output, checkpoint_path,
                  check_picture, defaults, fingerprint, git_revision, identity, load_checkpoint, opt,
                  parse_config, precision_for, run_cli, world_info, write_json)

# --- Configuration ---------------------------------------------------------------------------


@dataclass
class LinearConfig(System):
    """linear_eval.py's options (runs.System adds --device, --precision, --workers)."""
    WRITES = ("writes one results JSON, --out or beside the checkpoint (linear_eval.json, "
              "linear_eval_e0_knn200.json ...); with --show-neighbours only that PNG")
    checkpoint: str = opt("", "pretraining checkpoint (pretrain.py's ckpt.pt, or its folder)",
                          path=True)
    # data
    dataset: str = opt("", "data to evaluate on, empty: the checkpoint's; another one is "
                       "transfer (Sec. 6)", ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_dir: str = opt("", "dataset root, empty: the checkpoint's when --dataset is its",
                        path=True)
    # protocol (Appendix B.6)
    batch_size: int = opt(512, "global batch size B in images", min=1)
    epochs: int = opt(100, "epochs of the linear layer; 0: no linear layer (kNN only)", min=0)
    lr: float = opt(0.1, "base learning rate, x B/256; cosine decay, no warmup", above=0)
    weight_decay: float = opt(0.0, "L2 weight decay on the linear layer's weights", min=0)
    momentum: float = opt(0.9, "Nesterov momentum", min=0, below=1)
    cached_features: bool = opt(False, "compute h once without augmentation and train on the "
                                "stored features (fast; not the paper's augmented protocol)")
    random_init: bool = opt(False, "evaluate the same architecture untrained: the baseline")
    image_size: int = opt(0, "evaluate at this resolution in pixels, 0: the pretraining's (FixRes, "
                          "Touvron et al. 2019: random crops enlarge objects)", min=0)
    layer: int = opt(0, "the representation: 0 h = f(x) (v1); K the output of the projection "
                     "head's layer K (v2 Sec. 2; the last layer is z, Fig. 8's h vs z)", min=0)
    knn: int = opt(0, "also report weighted kNN top-1 with K neighbours on normalised h (200 is "
                   "the common value, Wu et al. 2018); 0: off", min=0)
    knn_temperature: float = opt(0.1, "temperature of the kNN weights exp(sim / t)", above=0)
    val_fraction: float = opt(0.0, "evaluate on this class-balanced fraction of the training "
                              "images, held out (default: the checkpoint's, on its data)",
                              min=0, below=1)
    val_dir: str = opt("", "the evaluation images (<class>/<image>) instead of <data-dir>/val "
                       "(default: the checkpoint's, on its data)", path=True)
    # system
    seed: int = opt(0, "random seed (data order, augmentation, --random-init weights)")
    out: str = opt("", "results JSON, empty: beside the checkpoint, named after what was measured "
                   "(linear_eval.json: the paper's protocol)", changeable=True)
    show_neighbours: str = opt("", "only write a PNG of --queries evaluation images, each with its 8 "
                               "nearest training images by cosine similarity of h; e.g. nn.png",
                               changeable=True)
    queries: int = opt(8, "--show-neighbours: evaluation images shown, evenly spaced in the split",
                       min=1, changeable=True)


# Images per forward pass when computing features; BN is in inference mode, so only memory changes.
EXTRACT_BATCH = 512

# The official linear-evaluation settings (Appendix B.6 and the authors' code), applied before
# the command-line flags. The dataclass defaults are the CIFAR ones.
PRESETS = {
    "cifar10": dict(batch_size=512, epochs=100, weight_decay=0.0),
    "imagenet": dict(batch_size=4096, epochs=90, weight_decay=1e-6),
}
PRESETS["cifar100"] = PRESETS["stl10"] = PRESETS["cifar10"]
PRESETS["folder"] = PRESETS["imagenet"]


def resolve_config(argv):
    """(config, checkpoint): flags over the preset of the evaluation dataset, by default the
    checkpoint's."""
    cfg, given = parse_config(LinearConfig, argv, PRESETS, __doc__.splitlines()[0])
    if not cfg.checkpoint:
        raise UserError("--checkpoint is required (a ckpt.pt written by pretrain.py)")
    given["checkpoint"] = checkpoint_path(cfg.checkpoint)
    ckpt = load_checkpoint(given["checkpoint"], ("pretrain", "converted", "student"))
    data = stage_data(given, ckpt["config"])
    cfg = LinearConfig(**{**protocol_defaults(data["dataset"], ckpt["config"]["image_size"]),
                          **given, **data})
    if cfg.epochs == 0 and cfg.knn == 0 and not cfg.show_neighbours:
        raise UserError("nothing to do: --epochs 0 trains no linear layer; add --knn K")
    return cfg, ckpt


# --- Data: augmented images (the paper's protocol) or stored features (--cached-features) ----


class FeatureLoader:
    """Shuffled minibatches of stored (h, label) rows, this rank's share of each global batch
    (DistributedSampler's order, as the image loader's)."""

    def __init__(self, features, labels, batch_size, seed=0):
        rank, world = world_info()
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.sampler = torch.utils.data.DistributedSampler(range(len(features)), world, rank,
                                                           shuffle=True, seed=seed)

    def __len__(self):
        return -(-self.sampler.num_samples // self.batch_size)

    def __iter__(self):
        order = torch.tensor(list(self.sampler), device=self.features.device)
        for idx in order.split(self.batch_size):
            yield [self.features[idx]], self.labels[idx]  # one "view", as ViewLoader yields


# --- Model: frozen encoder f, zero-initialised linear layer on h -----------------------------


def load_encoder(ckpt, path, random_init=False, layer=0):
    """f from a pretraining checkpoint (loaded strictly: the classifier is the only weight it
    lacks), with the first `layer` layers of g, frozen: no gradients, BatchNorm in inference
    mode. random_init keeps the fresh initialisation."""
    with as_user_error(path):
        model = build_model(ckpt["config"], None if random_init else ckpt["model"])
    with as_user_error(f"--layer {layer}"):
        encoder = Representation(model, layer)
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder


def linear_classifier(in_dim, num_classes):
    """The linear layer on h, zero-initialised as in the official code."""
    classifier = nn.Linear(in_dim, num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    return classifier


def encoder_snapshot(encoder):
    """A copy of every weight and buffer (BN running statistics included) to check against."""
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def check_encoder_unchanged(encoder, reference):
    """Raise if any weight or BN statistic of the encoder moved: the classic linear-evaluation
    bug (a backbone that is not really frozen, or BN left in training mode) inflates results."""
    state = encoder.state_dict()
    changed = [k for k, v in reference.items() if not torch.equal(state[k].cpu(), v.cpu())]
    if changed or state.keys() != reference.keys():
        raise AssertionError(f"the frozen encoder changed during linear evaluation: "
                             f"{', '.join(changed[:5]) or 'its keys'}"
                             f"{' ...' if len(changed) > 5 else ''}")


# --- Training: cross-entropy on the linear layer only ----------------------------------------


def train_linear(classifier, encoder, loader, epochs, peak_lr, weight_decay=0.0, momentum=0.9,
                 device=torch.device("cpu"), log=print, autocast=None):
    """Train the linear layer on h = encoder(x): Nesterov SGD, cosine from peak_lr to 0, no
    warmup. loader yields images (the encoder frozen) or stored features (encoder nn.Identity()).
    Gradients are averaged over processes. Returns the last epoch's mean loss and top-1 (%).
    """
    _, world = world_info()
    optimizer = build_optimizer(classifier, "sgd", peak_lr, weight_decay, momentum, nesterov=True)
    total_steps = epochs * len(loader)
    autocast = autocast or precision_for("auto", device)[1]
    encoder.eval()  # BN uses the pretraining statistics and does not update them
    classifier.train()
    step, progress = 0, Progress(log, "epoch", epochs, len(loader.sampler), seconds=10)
    loss_avg, acc_avg = float("nan"), float("nan")
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        sums = torch.zeros(3, device=device)  # loss x n, correct, n
        for (x,), y in loader:  # on the device already
            lr = learning_rate(step, total_steps, 0, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.no_grad(), autocast:
                h = encoder(x)  # B x d
            logits = classifier(h.float())  # B x C
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # the mean over the global batch, as DDP would give
                for p in classifier.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            optimizer.step()
            step += 1
            sums[0] += loss.detach() * len(y)
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
        if world > 1:
            dist.all_reduce(sums)
        loss_avg, acc_avg = (sums[0] / sums[2]).item(), (100 * sums[1] / sums[2]).item()
        if progress.due(epoch + 1):
            progress.show(epoch + 1, f"loss {loss_avg:.4f} train top-1 {acc_avg:.2f}% lr {lr:.4g}")
    return loss_avg, acc_avg


# --- Evaluation: top-1 / top-5 of the linear layer, weighted kNN -----------------------------


@torch.no_grad()
def evaluate_linear(classifier, features, labels):
    """{'top1', 'top5' where it tells anything} of the linear layer on the evaluation features."""
    classifier.eval()
    return topk_accuracy(classifier(features), labels)


# --- main ------------------------------------------------------------------------------------


# A results file's name: (option, its part) where the option differs from the protocol's.
NAMED = [("random_init", "random"), ("layer", "layer{}"), ("cached_features", "cached"),
         ("epochs", "e{}"), ("lr", "lr{:g}"), ("batch_size", "b{}"), ("weight_decay", "wd{:g}"),
         ("momentum", "m{:g}"), ("seed", "seed{}"), ("knn", "knn{}"), ("knn_temperature", "t{:g}")]
LINEAR_ONLY, KNN_ONLY = {"cached_features", "lr", "batch_size", "weight_decay", "momentum"}, {"knn_temperature"}


def protocol_defaults(dataset, image_size):
    """The options of the protocol before any flag: the dataclass's, then the dataset's preset."""
    return {**defaults(LinearConfig), **PRESETS.get(preset(dataset, image_size), {})}


def results_path(cfg, pre):
    """--out, or beside the checkpoint a name that says what was measured: linear_eval.json for
    the paper's protocol, a part for every difference (linear_eval_e0_knn200.json, _cached,
    _40px ...; r18.pt: r18.linear_eval.json). Never over another evaluation's results (--out
    keeps both) or a file this script did not write."""
    base = protocol_defaults(cfg.dataset, pre["image_size"])
    parts = []
    if cfg.dataset != pre["dataset"]:
        parts.append(cfg.dataset)
    elif os.path.realpath(cfg.data_dir) != os.path.realpath(pre.get("data_dir", "")):
        parts.append(Path(cfg.data_dir).name)
    if cfg.image_size and cfg.image_size != pre["image_size"]:
        parts.append(f"{cfg.image_size}px")
    for name, form in NAMED:
        value = getattr(cfg, name)
        if value != base[name] and not (name in LINEAR_ONLY and not cfg.epochs) and \
                not (name in KNN_ONLY and not cfg.knn):
            parts.append(form.format(value))
    name = "_".join(["linear_eval", *parts])
    ckpt = Path(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else ckpt.parent / (
        f"{name}.json" if ckpt.name in ("ckpt.pt", "student.pt") else f"{ckpt.stem}.{name}.json")
    check_output(out, "--out", ours=lambda path: "protocol" in json.loads(path.read_text()))
    try:
        theirs = identity(LinearConfig, json.loads(out.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):  # none yet
        return out
    ours = identity(LinearConfig, cfg)
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} {theirs[k]!r} there ({ours[k]!r} here)"
                          for k in differ[:3])
        raise UserError(f"{out} holds the results of another evaluation ({shown}): pass --out "
                        f"to keep both")
    return out


def save_neighbours(path, val, train, val_f, val_l, train_f, train_l, size, device, queries, k=8):
    """The --show-neighbours picture: `queries` evaluation images, each followed by its k nearest
    training images by cosine similarity (the kNN's voters), captioned with their classes."""
    q = torch.linspace(0, len(val) - 1, queries).round().long().unique().tolist()
    k = min(k, len(train_f))  # no more neighbours than training images, as the kNN
    nearest = (F.normalize(val_f[q], dim=1) @ F.normalize(train_f, dim=1).T).topk(k, dim=1).indices
    view = lambda data, idx: next(eval_batches(select(data, idx), size, len(idx), device, 0))
    rows = torch.cat([view(val, q)[0][:, None], view(train, nearest.flatten().tolist())[0]
                      .unflatten(0, (len(q), k))], 1).cpu()
    captions = [[val.classes[y] for y in [val_l[i].item(), *train_l[n].tolist()]]
                for i, n in zip(q, nearest)]
    return save_grid(path, rows, ["query", *(f"nearest {i + 1}" for i in range(k))], captions)


def trained_for(ckpt):
    """How far the checkpoint's training got, in words: it may have stopped mid-epoch."""
    step, per_epoch = ckpt.get("step"), ckpt.get("steps_per_epoch")
    if step is None or not per_epoch:
        return f"epoch {ckpt.get('epoch', '?')}"
    return f"step {step} = epoch {step / per_epoch:.2f} of {ckpt['config']['epochs']}"


def run(cfg, ckpt):
    job = Run(cfg)  # device, processes, precision, workers (runs.py)
    device, rank, world, main, log = job.device, job.rank, job.world, job.main, job.log
    local_batch, workers, autocast = job.local_batch, job.workers, job.autocast
    pre = ckpt["config"]
    # where the results go, checked before the features: the evaluation may take hours
    out = check_picture(cfg.show_neighbours, "--show-neighbours") if cfg.show_neighbours else \
        results_path(cfg, pre)
    if cfg.show_neighbours and world > 1:
        raise UserError("--show-neighbours runs in one process: without torchrun")
    image_size = cfg.image_size or pre["image_size"]  # also for transfer datasets

    torch.manual_seed(cfg.seed)  # the same --random-init weights on every rank
    encoder = load_encoder(ckpt, cfg.checkpoint, cfg.random_init, cfg.layer)
    encoder = encoder.to(device, memory_format=torch.channels_last)  # NHWC: faster convolutions
    torch.manual_seed(cfg.seed + rank)  # ranks differ in augmentations
    # What the encoder must still be after training: the checkpoint's weights and BN statistics
    # (for --random-init, its initial state).
    reference = (encoder_snapshot(encoder) if cfg.random_init else
                 {k.replace("head.layers.", "head.", 1): v for k, v in ckpt["model"].items()
                  if k.startswith(("encoder.", *(f"head.layers.{i}." for i in range(cfg.layer))))})

    log(f"git {git_revision() or '-'} | {world} process(es) on {device.type} | {job.precision} "
        f"({job.why}) | encoder {pre['arch']} x{pre['width_multiplier']} {image_size}px, "
        f"{f'head layer {cfg.layer}' if cfg.layer else 'h'} {encoder.out_dim}-d, "
        f"{'random init' if cfg.random_init else 'pretrained'} on {pre['dataset']} "
        f"({trained_for(ckpt)})")
    log("config " + json.dumps(dataclasses.asdict(cfg)))

    # The splits first, so that a wrong setup stops before any feature is computed
    split = lambda name, views=0: load_split(cfg.dataset, cfg.data_dir, name, image_size, device,
                                             workers, views, log, True, cfg.val_fraction, cfg.val_dir,
                                             decode_on=cfg.decode)
    val, train_plain = split("val"), split("train")
    check_same_classes(train_plain, val)
    train = (train_plain if cfg.cached_features or cfg.show_neighbours or
             isinstance(train_plain, InMemory) else
             split("train", views=1))  # the paper's protocol on a folder: crops by the workers
    if cfg.epochs and not cfg.show_neighbours and len(train) < cfg.batch_size:  # the lr is scaled by a batch that must exist
        raise UserError(f"{len(train)} training images are fewer than one batch of "
                        f"{cfg.batch_size}: lower --batch-size to at most {len(train)}")
    num_classes = len(val.classes)

    # Evaluation features: the image as it is (32 px) or a centre crop (ImageNet), gathered.
    t_start = time.time()
    val_f, val_l = extract_features(encoder, val, image_size, EXTRACT_BATCH, device, workers, log,
                                    "features: val", autocast)
    train_f = train_l = None
    if cfg.cached_features or cfg.knn or cfg.show_neighbours:
        train_f, train_l = extract_features(encoder, train_plain, image_size, EXTRACT_BATCH,
                                            device, workers, log, "features: train", autocast)
        log(f"features of {len(train_plain)} training and {len(val)} evaluation images in "
            f"{time.time() - t_start:.0f}s")
    if cfg.show_neighbours:
        log("saved " + save_neighbours(cfg.show_neighbours, val, train_plain, val_f, val_l,
                                       train_f, train_l, image_size, device, cfg.queries))
        return {}
    results = dict(dataset=cfg.dataset, pretrain_dataset=pre["dataset"], checkpoint=cfg.checkpoint,
                   checkpoint_epoch=ckpt.get("epoch"), **{f"checkpoint_{k}": v for k, v in
                                                          fingerprint(ckpt).items()},
                   random_init=cfg.random_init,
                   encoder=dict(arch=pre["arch"], width_multiplier=pre["width_multiplier"],
                                sk_ratio=pre["sk_ratio"], image_size=image_size,
                                layer=cfg.layer, dim=encoder.out_dim),
                   protocol="cached-features" if cfg.cached_features else "augmented",
                   num_classes=num_classes, world_size=world, device=device.type,
                   precision=job.precision,
                   git=git_revision(), config=dataclasses.asdict(cfg))

    if cfg.knn:
        k = results["knn_k"] = min(cfg.knn, len(train_f))  # no more neighbours than images
        knn = knn_accuracy(train_f, train_l, val_f, val_l, num_classes, k, cfg.knn_temperature)
        results.update({f"knn_{key}": value for key, value in knn.items()})
        log(f"kNN (k {k}{f' of the {cfg.knn} asked: {k} training images' if k < cfg.knn else ''}"
            f", t {cfg.knn_temperature}): {shown(knn)}")

    if cfg.epochs:
        if cfg.cached_features:
            loader, trunk = FeatureLoader(train_f, train_l, local_batch, cfg.seed), nn.Identity()
        else:  # the paper's protocol: a new random crop + flip of every image every epoch
            sampler = torch.utils.data.DistributedSampler(train, world, rank, shuffle=True,
                                                          seed=cfg.seed)
            loader = ViewLoader(train, sampler, local_batch, [build_augmentation(image_size)],
                                device, workers)
            trunk = encoder
        peak_lr = scaled_lr(cfg.lr, cfg.batch_size, "linear")
        log(f"linear layer: {cfg.epochs} epochs of {len(loader)} steps, B {cfg.batch_size}, "
            f"peak lr {peak_lr:.4g}, weight decay {cfg.weight_decay}")
        classifier = linear_classifier(encoder.out_dim, num_classes).to(device)
        loss, train_top1 = train_linear(classifier, trunk, loader, cfg.epochs, peak_lr,
                                        cfg.weight_decay, cfg.momentum, device, log, autocast)
        accuracy = evaluate_linear(classifier, val_f, val_l)
        results.update(accuracy, train_loss=loss, train_top1=train_top1)
        log(f"linear evaluation: {shown(accuracy)}")

    check_encoder_unchanged(encoder, reference)
    results["time_s"] = time.time() - t_start
    if main:
        write_json(out, results, "linear_eval.py")
        log(f"wrote {out}")
    return results


def main(argv=None):
    run_cli("linear_eval.py", lambda: run(*resolve_config(argv)))


if __name__ == "__main__":
    main()
