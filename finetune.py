"""Semi-supervised fine-tuning with few labels: SimCLR v1 Sec. 6 and SimCLRv2 Sec. 2.

The pretrained encoder f and the first K layers of the projection head g (v2, "fine-tuning from
a middle layer of the projection head"; K = 0 drops the head as in v1) get a new linear
classifier on top, and the whole network is trained with cross-entropy on a class-balanced
fraction of the training labels (1% or 10%, drawn with a fixed --seed, or the authors' ImageNet
lists via --subset-file). --from-scratch trains the same network from a random initialisation:
the supervised baseline the papers compare against. The fine-tuned network is distill.py's
teacher (v2 Sec. 2, Eq. 2).

    python finetune.py --checkpoint runs/cifar10-resnet18-.../ckpt.pt --label-fraction 0.01
    python finetune.py --checkpoint runs/.../ckpt.pt --label-fraction 0.01 --from-scratch
    python finetune.py --checkpoint runs/.../ckpt.pt --subset-file runs/ft-1pct/subset.txt
    torchrun --nproc_per_node=8 finetune.py --checkpoint runs/imagenet-.../ckpt.pt \
        --dataset imagenet --data-dir /data/imagenet --subset-file imagenet_subsets/1percent.txt

The dataset and data directory default to the checkpoint's. Settings are the authors' (v2 paper
and official code): LARS, lr 0.005 x sqrt(B), weight decay 0, no warmup, cosine decay,
crop + flip, global BatchNorm under torchrun; ImageNet B 1024, 60 epochs for 1% and 30 for 10%.
CIFAR uses B 64 (1% of CIFAR-10 is only 500 images) and the same epoch rule. Written to
--out-dir: finetuned.pt (the teacher for distill.py), results.json (top-1/top-5 on the
evaluation split), subset.txt (the labelled images, to repeat the run with --subset-file) and
log.jsonl. Measured on a 2-core CPU (RESULTS.md): from a 5-epoch CIFAR-10 checkpoint of ResNet-18
at width 0.25, 1% of the labels give 43.9% top-1 in 2 minutes (31.1% from scratch), 10% give
50.2% in 10 epochs (37.2% from scratch).
"""
import dataclasses
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cli import (Progress, Run, UserError, checkpoint_path, console, continue_run, git_revision,
                 load_checkpoint, load_model_state, opt, parse_config, per_process_batch,
                 precision_for, prepare_out_dir, restore_random_state, run_cli, setup, world_info)
from data import (ResumableSampler, ViewLoader, build_augmentation, check_same_classes,
                  class_balanced, dataset_labels, default_workers, eval_batches, evaluation_split,
                  load_split, preset, select, unreadable_images)
from pretrain import (Config, Representation, build_model, build_optimizer, convert_to_global_bn,
                      learning_rate, scaled_lr)

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    checkpoint: str = opt("", "pretraining checkpoint (pretrain.py's ckpt.pt, or a student of "
                          "distill.py); with --from-scratch only its architecture is used")
    from_scratch: bool = opt(False, "random initialisation instead of the checkpoint's weights: "
                             "the supervised baseline")
    # data
    dataset: str = opt("", "which data (default: the checkpoint's)",
                       ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_dir: str = opt("", "dataset root (default: the checkpoint's)")
    out_dir: str = opt("", "where finetuned.pt, results.json and subset.txt go "
                       "(default runs/finetune-<dataset>-<labels>-<digest of the configuration>); "
                       "the same command continues the run in it", changeable=True)
    workers: int = opt(-1, "data-loading processes per GPU (-1: CPU cores per process, at most 8)",
                       min=-1, changeable=True)
    resume: str = opt("", "finetuned.pt to continue (the same command continues its --out-dir "
                      "without it); its configuration is used, with the flags given here on top",
                      changeable=True)
    # labels (v2 Sec. 3: 1% and 10% of ImageNet, class-balanced)
    label_fraction: float = opt(0.01, "fraction of each class's training images whose labels "
                                "are used: 0.01, 0.1 or 1.0", above=0, max=1)
    subset_file: str = opt("", "labelled images, one name per line, instead of "
                           "--label-fraction: the authors' ImageNet lists (file names such as "
                           "n01440764_10026.JPEG) or a subset.txt this script wrote")
    seed: int = opt(0, "random seed: which images are labelled, initialisation, data order")
    # model (v2 Sec. 2)
    ft_proj_layer: int = opt(1, "keep this many projection-head layers under the classifier: "
                             "0 drops the head (v1), 1 is v2's choice", min=0)
    arch: str = opt("resnet18", "encoder for --from-scratch without --checkpoint",
                    ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    width_multiplier: float = opt(1.0, "width for --from-scratch without --checkpoint", above=0)
    sk_ratio: float = opt(0.0, "selective kernels for --from-scratch without --checkpoint", min=0)
    image_size: int = opt(32, "input size for --from-scratch without --checkpoint (else the "
                          "checkpoint's)", min=8)
    # optimisation (v2 Appendix; official fine-tuning flags)
    batch_size: int = opt(64, "global batch size B in images", min=2)
    epochs: int = opt(0, "training epochs; 0: 60 for <= 1% of the labels, 30 above (v2)", min=0)
    optimizer: str = opt("lars", "LARS for the network as in the paper (the new classifier "
                         "always gets momentum SGD, see build_finetune_optimizer)",
                         ["lars", "sgd", "adam"])
    lr: float = opt(0.005, "base learning rate, scaled by --lr-scaling", above=0)
    lr_scaling: str = opt("sqrt", "sqrt: lr x sqrt(B) (the authors' fine-tuning choice); "
                          "linear: lr x B/256", ["linear", "sqrt"])
    weight_decay: float = opt(0.0, "L2 weight decay, not on biases and BatchNorm parameters",
                              min=0)
    momentum: float = opt(0.9, "momentum of LARS and SGD", min=0, below=1)
    warmup_epochs: float = opt(0.0, "linear warmup from 0, then cosine decay to 0", min=0)
    global_bn: bool = opt(True, "BatchNorm statistics over the global batch under torchrun")
    # system
    device: str = opt("auto", "auto picks cuda, then mps, then cpu", ["auto", "cuda", "mps", "cpu"],
                      changeable=True)
    precision: str = opt("auto", "auto: bf16 autocast on CUDA and on CPUs with native bf16, "
                         "fp32 elsewhere",
                         ["auto", "bf16", "fp32"], changeable=True)
    log_every: int = opt(50, "print a log line every this many steps (and after the first)",
                         min=1, changeable=True)
    checkpoint_every: float = opt(10.0, "minutes between checkpoints within an epoch (a crash "
                                  "loses at most that), 0: at epoch ends only", min=0,
                                  changeable=True)
    eval_every: int = opt(0, "top-1 on the evaluation split every this many epochs; 0: at the end",
                          min=0, changeable=True)
    val_fraction: float = opt(0.0, "evaluate on this class-balanced fraction of the training "
                              "images, held out (default: the checkpoint's, on its data)",
                              min=0, below=1)
    val_dir: str = opt("", "the evaluation images (<class>/<image>) instead of <data-dir>/val "
                       "(default: the checkpoint's, on its data)")


# Per-dataset presets, applied before the flags. ImageNet: the authors' fine-tuning batch. CIFAR:
# a batch of 64 gives 1% of CIFAR-10 (500 images) 7 steps per epoch (ImageNet 1% at B 1024: 12).
PRESETS = {
    "cifar10": dict(batch_size=64, image_size=32),
    "imagenet": dict(batch_size=1024, image_size=224),
}
PRESETS["cifar100"] = PRESETS["cifar10"]
PRESETS["stl10"] = dict(batch_size=64, image_size=96)
PRESETS["folder"] = PRESETS["imagenet"]
ARCH_FLAGS = ("arch", "width_multiplier", "sk_ratio", "image_size")


def resolve_config(argv):
    """Flags over the preset of the dataset, which defaults to the checkpoint's.

    Returns (config, pretraining configuration dict, weights to start from or None, the
    checkpoint of an interrupted run or None). The pretraining configuration describes the
    network (build_model); without --checkpoint (--from-scratch only) it is pretrain.py's
    default head on the --arch flags. With --resume everything comes from that checkpoint.
    """
    cfg, given = parse_config(FinetuneConfig, argv, PRESETS, __doc__.splitlines()[0])
    if cfg.resume:
        cfg, resume = continue_run(FinetuneConfig, cfg, given, "finetuned", "")
        if "optimizers" not in resume:
            raise UserError(f"--resume {cfg.resume} is a converted network, not one of an "
                            f"interrupted finetune.py run: nothing to continue")
        return cfg, resume["config"]["pretrain"], None, resume
    ckpt, pre = None, {}
    if cfg.checkpoint:
        given["checkpoint"] = checkpoint_path(cfg.checkpoint)
        ckpt = load_checkpoint(given["checkpoint"], ("pretrain", "converted", "student"))
        pre = ckpt["config"]
        clash = [f for f in ARCH_FLAGS if f in given and given[f] != pre.get(f)]
        if clash:
            raise UserError(f"--{clash[0].replace('_', '-')} differs from the checkpoint's "
                            f"{pre.get(clash[0])}: the architecture comes from --checkpoint")
    elif not cfg.from_scratch:
        raise UserError("--checkpoint is required (a ckpt.pt written by pretrain.py); "
                        "--from-scratch alone trains the --arch network from random weights")
    dataset = cfg.dataset or pre.get("dataset", "")
    data_dir = cfg.data_dir or (pre.get("data_dir", "") if dataset == pre.get("dataset") else "")
    if not dataset or not data_dir:
        raise UserError("--dataset and --data-dir are needed")
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    size = pre.get("image_size", given.get("image_size", defaults["image_size"]))
    cfg = FinetuneConfig(**{**defaults, **PRESETS.get(preset(dataset, size), {}), **given,
                            "dataset": dataset, "data_dir": data_dir,
                            **evaluation_split(given, pre, data_dir == pre.get("data_dir"))})
    if ckpt is None:  # --from-scratch without a checkpoint: pretrain.py's network on the flags
        pre = dataclasses.asdict(Config(dataset=dataset, data_dir=data_dir,
                                        **{f: getattr(cfg, f) for f in ARCH_FLAGS}))
    for f in ARCH_FLAGS:  # the network actually trained, for the printed and stored config
        setattr(cfg, f, pre[f])
    if cfg.epochs == 0:  # v2: 60 epochs for 1% of ImageNet, 30 for 10%
        cfg.epochs = 60 if (cfg.label_fraction <= 0.01 and not cfg.subset_file) else 30
    labels = Path(cfg.subset_file).stem if cfg.subset_file else f"{100 * cfg.label_fraction:g}pct"
    cfg, resume = continue_run(FinetuneConfig, cfg, given, "finetuned", f"finetune-{dataset}-"
                               f"{labels}{'-scratch' if cfg.from_scratch else ''}")
    if resume:
        return cfg, resume["config"]["pretrain"], None, resume
    return cfg, pre, None if cfg.from_scratch else ckpt["model"], None


# ---------------------------------------------------------------------------------------------
# Data: a class-balanced labelled subset of the training split
# ---------------------------------------------------------------------------------------------


def image_names(dataset, indices):
    """What subset.txt stores: <class>/<file> for image folders, the index for other datasets."""
    if getattr(dataset, "samples", None) is None:  # torchvision arrays (in memory or not)
        return [str(i) for i in indices]
    return [Path(dataset.samples[i][0]).relative_to(dataset.root).as_posix() for i in indices]


def read_subset_file(path, dataset):
    """Indices of the images a subset file names, one per line.

    A line may be <class>/<file> (what image_names writes) or a bare file name, as in the
    authors' ImageNet lists (n01440764_10026.JPEG), matched on the file's base name; for
    datasets that are not image folders (torchvision's CIFAR) lines are indices.
    """
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


# ---------------------------------------------------------------------------------------------
# Model: encoder f + the first K layers of g + a new linear classifier
# ---------------------------------------------------------------------------------------------


class Classifier(Representation):
    """x -> logits through f, the kept head layers and a linear layer (v2 Sec. 2, Eq. 4).

    v2 writes the head as g(h) = W3 s(W2 s(W1 h)) and fine-tunes from s(W1 h) (K = 1): the kept
    layers are part of the network being fine-tuned, not a frozen feature extractor. The last
    head layer's BatchNorm keeps its frozen shift (requires_grad False) when all are kept.
    """

    def __init__(self, model, ft_proj_layer, num_classes):
        super().__init__(model, ft_proj_layer, "--ft-proj-layer")
        self.fc = nn.Linear(self.out_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # official LinearLayer (tf2/model.py)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(super().forward(x))  # B x classes


def build_classifier(pretrain_config, num_classes, ft_proj_layer, state=None, path=""):
    """The SimCLR network of pretrain_config (loaded strictly from state unless None), cut after
    ft_proj_layer head layers, with a new classifier."""
    return Classifier(build_model(pretrain_config, state, path), ft_proj_layer, num_classes)


def load_finetuned(path):
    """A finetune.py checkpoint as (Classifier, checkpoint): distill.py's teacher."""
    ckpt = load_checkpoint(path, ("finetuned",), "--teacher")
    c = ckpt["config"]
    model = build_classifier(c["pretrain"], c["num_classes"], c["ft_proj_layer"])
    load_model_state(model, ckpt["model"], path)
    return model, ckpt


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------


def build_finetune_optimizer(model, name, lr, weight_decay, momentum):
    """[optimizer of f and the kept head, optimizer of the new classifier].

    The official code excludes the supervised head ('head_supervised') from LARS's trust ratio:
    for a freshly initialised classifier eta * ||w|| / ||g|| is tiny and would keep it near its
    initialisation. So the classifier gets plain momentum SGD at the same learning rate, with
    weight decay on its weights only (the official code adds it as an L2 loss). The official
    LARS keeps lr inside its momentum buffer and SGD outside; with a constant rate they agree.
    """
    body = build_optimizer(nn.ModuleList([model.encoder, model.head]), name, lr, weight_decay,
                           momentum)
    classifier = torch.optim.SGD([dict(params=[model.fc.weight], weight_decay=weight_decay),
                                  dict(params=[model.fc.bias], weight_decay=0.0)],
                                 lr=lr, momentum=momentum)
    return [body, classifier]


def set_lr(optimizers, lr):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# Evaluation: top-1 / top-5 on the evaluation split
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, dataset, size, batch_size, device, workers=0, log=None):
    """(top-1 %, top-5 %) of model (BatchNorm in inference mode) on dataset at size px.

    Under torchrun each process scores every world-th image and the counts are summed. With
    fewer than 5 classes "top-5" is top-(number of classes), i.e. 100. With `log`, progress
    lines go there.
    """
    rank, world = world_info()
    was_training = model.training
    model.eval()
    share = len(range(rank, len(dataset), world))
    progress, done = Progress(log or (lambda *a: None), "evaluation", share), 0
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for x, y in eval_batches(dataset, size, batch_size, device, workers):
        done += len(y)
        if progress.due(done):
            progress.show(done, "images")
        with precision_for("auto", device)[1]:
            logits = model(x).float()  # b x classes
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # b x 5
        hits = top == y[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), y.new_tensor(len(y))]).float()
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    top1, top5 = (100 * counts[:2] / counts[2]).tolist()
    return round(top1, 4), round(top5, 4)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


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


def train(cfg, pretrain_config, weights, resume):
    device, rank, world = setup(cfg.device)
    main = rank == 0
    log = console(main)
    local_batch = per_process_batch(cfg.batch_size, world)
    precision, autocast, why = precision_for(cfg.precision, device)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(world)
    out_dir = Path(cfg.out_dir)  # continue_run's choice

    # Data: crop + flip on the labelled subset (the fine-tuning augmentation)
    split = lambda name, views=0: load_split(cfg.dataset, cfg.data_dir, name, cfg.image_size,
                                             device, workers, views, log, True, cfg.val_fraction,
                                             cfg.val_dir)
    train_set, val_set = split("train", views=1), split("val")
    check_same_classes(train_set, val_set)
    num_classes = len(train_set.classes)
    indices = resume["subset"] if resume else choose_labeled(cfg, train_set, log)
    labeled = select(train_set, indices)
    steps_per_epoch = len(labeled) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(labeled)} labelled images are fewer than one batch of "
                        f"{cfg.batch_size}: lower --batch-size to at most {len(labeled)}")
    total_steps = cfg.epochs * steps_per_epoch
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    sampler = ResumableSampler(labeled, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = ViewLoader(labeled, sampler, local_batch, [build_augmentation(cfg.image_size)],
                        device, workers)

    # Model: pretrained (or fresh) f + K head layers + classifier; all of it is trained
    torch.manual_seed(cfg.seed)  # the same fresh weights on every process
    raw_model = build_classifier(pretrain_config, num_classes, cfg.ft_proj_layer, weights,
                                 cfg.checkpoint).to(device, memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed + rank)  # processes differ in augmentation
    optimizers = build_finetune_optimizer(raw_model, cfg.optimizer, peak_lr, cfg.weight_decay,
                                          cfg.momentum)
    step, history = 0, []
    if resume:
        load_model_state(raw_model, resume["model"], cfg.resume)
        for optimizer, state in zip(optimizers, resume["optimizers"]):
            optimizer.load_state_dict(state)
        step, history = resume["step"], resume["history"]
        restore_random_state(resume["rng"], device)
    model = raw_model
    if dist.is_initialized():  # under torchrun, even with one process
        if cfg.global_bn:
            model = convert_to_global_bn(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    if main:  # made once every check has passed: a failed start leaves no folder behind
        prepare_out_dir(out_dir)
        (out_dir / "subset.txt").write_text("\n".join(image_names(train_set, indices)) + "\n")

    n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    log(f"git {git_revision() or '-'} | {world} process(es) on {device.type} | {precision} ({why}) | "
        f"{'random init' if cfg.from_scratch else cfg.checkpoint} | "
        f"{cfg.ft_proj_layer} head layer(s) kept | {n_params / 1e6:.2f}M trained parameters | "
        f"{num_classes} classes")
    log("config " + json.dumps(dataclasses.asdict(cfg)))
    log(f"{steps_per_epoch} steps/epoch of {cfg.batch_size}, {total_steps} steps, peak lr "
        f"{peak_lr:.4g}, out {out_dir}" + (f"; continuing {cfg.resume} from step {step}" if resume
                                           else ""))

    run = Run(out_dir, "finetuned.pt", device, cfg.checkpoint_every, step)
    sums = torch.zeros(3, device=device)  # this epoch's loss x images, top-1 hits, non-finite losses
    if resume and "epoch_sums" in resume:
        sums += resume["epoch_sums"].to(device)

    def state(results=None):
        """finetuned.pt: distill.py's teacher when complete, where the run continues from always."""
        return dict(model=raw_model.state_dict(), epoch=step // steps_per_epoch, step=step,
                    results=results, finished=results is not None, epoch_sums=sums.cpu(),
                    optimizers=[o.state_dict() for o in optimizers], subset=indices,
                    history=history, config=dict(dataclasses.asdict(cfg), pretrain=pretrain_config,
                                                 num_classes=num_classes,
                                                 classes=list(train_set.classes)))

    model.train()
    progress = Progress(log, "step", total_steps, cfg.batch_size, every=cfg.log_every, start=step)
    t_start = time.time()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        sampler.start = (step % steps_per_epoch) * local_batch
        for (x,), y in loader:  # one augmented view, on the device
            lr = learning_rate(step, total_steps, round(cfg.warmup_epochs * steps_per_epoch), peak_lr)
            set_lr(optimizers, lr)
            with autocast:
                logits = model(x)  # b x classes
            loss = F.cross_entropy(logits.float(), y)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            step += 1
            sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float(),
                                 (~torch.isfinite(loss.detach())).float()])
            if progress.due(step):
                progress.show(step, f"epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.4f} "
                                    f"lr {lr:.4g}")
            stopping, saving = run.poll()
            if step % steps_per_epoch and (stopping or saving):  # in mid-epoch: no record
                epoch_totals(sums, world, epoch)
                run.save(state())
                if stopping:
                    return run.stopped(step, log)

        # end of epoch: the record (with the evaluation when due), then the checkpoint
        totals, seen = epoch_totals(sums, world, epoch), steps_per_epoch * cfg.batch_size
        record = dict(epoch=epoch + 1, step=step, loss=totals[0].item() / seen,
                      train_top1=100 * totals[1].item() / seen, lr=lr, time=time.time() - t_start)
        sums.zero_()
        record.update(unreadable_images(train_set, device, log))
        if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or epoch + 1 == cfg.epochs:
            record["top1"], record["top5"] = evaluate(raw_model, val_set, cfg.image_size, 256,
                                                      device, workers, log)
            log(f"epoch {epoch + 1}: top-1 {record['top1']:.2f}% top-5 {record['top5']:.2f}%")
        history.append(record)
        run.record(record)
        if epoch + 1 < cfg.epochs:
            run.save(state())
            if stopping:
                return run.stopped(step, log)

    # The finished checkpoint (distill.py's teacher) and results
    results = dict(top1=history[-1]["top1"], top5=history[-1]["top5"], labeled_images=len(indices),
                   label_fraction=None if cfg.subset_file else cfg.label_fraction,
                   subset=str(out_dir / "subset.txt"), from_scratch=cfg.from_scratch,
                   checkpoint=cfg.checkpoint, ft_proj_layer=cfg.ft_proj_layer, epochs=cfg.epochs,
                   steps=step, train_seconds=round(time.time() - t_start), world_size=world,
                   device=device.type, git=git_revision(), config=dataclasses.asdict(cfg))
    run.save(state(results))
    if main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done in {datetime.timedelta(seconds=round(time.time() - t_start))}: top-1 "
        f"{results['top1']:.2f}% top-5 {results['top5']:.2f}% with {len(indices)} labels; "
        f"{run.path}, {out_dir / 'results.json'}")
    return results


def epoch_totals(sums, world, epoch):
    """This epoch's sums so far over every process, checked before any checkpoint (which keeps
    the last good weights): the last counts non-finite losses."""
    totals = sums.clone()
    if world > 1:
        dist.all_reduce(totals)
    if totals[-1].item() > 0:
        raise UserError(f"loss is not finite in epoch {epoch + 1}; try a lower --lr")
    return totals


def main(argv=None):
    run_cli("finetune.py", lambda: train(*resolve_config(argv)))


if __name__ == "__main__":
    main()
