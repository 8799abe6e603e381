"""SimCLR contrastive pretraining: Algorithm 1 of Chen et al. 2020 (v1), with the v2 options.

Each image is augmented twice (Sec. 3, Appendix A), both views go through a ResNet encoder f and
a projection head g (Sec. 2.1, Fig. 2), and NT-Xent (Eq. 1) pulls the two views of an image
together while pushing away the other 2(N-1) views of the batch; each step minimises the
authors' loss_a + loss_b (train_step). The encoder output h = f(x) is the representation the
other scripts evaluate (linear_eval.py), fine-tune (finetune.py) and distill (distill.py); they
import the model from this file. As the authors split their code, the encoder is in resnet.py,
the loss in objective.py, the data in data.py (the augmentation in augment.py), and the
command-line plumbing (flags, errors, checkpoints, stopping) in cli.py.

    python pretrain.py --dataset cifar10 --data-dir data/cifar10      # laptop or 1 GPU
    torchrun --nproc_per_node=8 pretrain.py --dataset imagenet --data-dir /data/imagenet

--batch-size is the global batch: under torchrun each process takes batch_size / world_size
images, BatchNorm statistics are global (Sec. 2.2, "Global BN") and every process scores its
views against the views of all processes. Checkpoints go to --out-dir (default
runs/<dataset>-<arch>-<digest of the configuration>/ckpt.pt) every epoch, every
--checkpoint-every minutes and on Ctrl-C or SIGTERM; the same command continues the run
(docs/long-runs.md). On a CPU the run says before its first step how long it will take.
The CIFAR-10 preset is the authors' recipe (ResNet-18, 1000 epochs, batch 512, LARS); a
--dataset folder of images of 32 px or less takes it too, larger ones ImageNet's. RESULTS.md
lists what this code measured next to what the papers report.
"""
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from cli import (Done, Progress, Run, UserError, console, continue_run, git_revision,
                 load_model_state, opt, parse_config, per_process_batch, precision_for,
                 prepare_out_dir, restore_random_state, run_cli, setup, world_info)
from data import (InMemory, ResumableSampler, ViewLoader, build_augmentation, default_workers,
                  eval_batches, load_split, preset, save_augmentation_grid, typical_side,
                  unreadable_images)
from lars import LARS
from memory import SHUFFLE_GROUPS, Memory, memory_momentum
from objective import LOSSES, build_objective
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
    dataset: str = opt("cifar10", "which data; folder: your own images, with or without class "
                       "folders (ImageNet's recipe; CIFAR-10's at 32 px or less)",
                       ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_dir: str = opt("data", "dataset root; cifar10 may also be an image-folder export "
                        "(train/<class>/*, val/ or test/); folder: every image under it")
    out_dir: str = opt("", "where the checkpoint and log go; the same command continues the run in "
                       "it (default runs/<dataset>-<arch>-<digest of the configuration>)",
                       changeable=True)
    image_size: int = opt(32, "training resolution in pixels; <= 32 selects the CIFAR stem", min=8)
    workers: int = opt(-1, "data-loading processes per GPU (-1: CPU cores per process, at "
                       "most 8)", min=-1, changeable=True)
    # augmentation (Sec. 3, Appendix A)
    augment: str = opt("crop,color", "augmentations on, comma-separated, from crop (random "
                       "resized crop + flip), flip, jitter, gray, color (= jitter,gray); for "
                       "the paper's Fig. 5 ablations")
    color_strength: float = opt(0.5, "colour distortion strength s (Appendix A): 1.0 ImageNet, "
                                "0.5 CIFAR-10", min=0)
    blur: bool = opt(False, "Gaussian blur with p 0.5 (on for ImageNet, off for 32 px images)")
    one_branch: bool = opt(False, "Fig. 5's protocol: both views are one random crop of the "
                           "image, --augment's transformations (and --blur) go on view 1 only")
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
    # loss (Eq. 1; Sec. 5.1)
    temperature: float = opt(0.5, "NT-Xent temperature tau: 0.5 CIFAR-10, 0.1 ImageNet", above=0)
    l2_norm: bool = opt(True, "cosine similarity in the loss (--no-l2-norm: the dot product, "
                        "Table 5's ablation)")
    loss: str = opt("nt-xent", "the contrastive loss (Table 4's comparison; objective.py)",
                    list(LOSSES))
    semi_hard: bool = opt(False, "nt-logistic and margin: one semi-hard negative per anchor")
    margin: float = opt(0.5, "the margin m of --loss margin, in cosine similarity", above=0)
    # optimisation (Sec. 2.2, Appendix B)
    batch_size: int = opt(512, "global batch size N in images (each gives 2 views)", min=2)
    epochs: int = opt(1000, "training epochs; the schedule spans them", min=1)
    max_steps: int = opt(0, "stop (with a checkpoint) at this optimizer step, 0: at the end; "
                         "the schedule still spans --epochs, and the same command without it "
                         "(or --resume) continues to the end", min=0, changeable=True)
    optimizer: str = opt("lars", "LARS as in the paper; sgd and adam for comparison",
                         ["lars", "sgd", "adam"])
    lr: float = opt(1.0, "base learning rate, scaled by --lr-scaling", above=0)
    lr_scaling: str = opt("linear", "linear: lr x B/256; sqrt: lr x sqrt(B) (better for small B)",
                          ["linear", "sqrt"])
    weight_decay: float = opt(1e-4, "L2 weight decay, not on biases and BatchNorm parameters",
                              min=0)
    momentum: float = opt(0.9, "momentum of LARS and SGD", min=0, below=1)
    warmup_epochs: float = opt(10.0, "linear warmup from 0, then cosine decay to 0", min=0)
    memory_size: int = opt(0, "v2's memory (memory.py): a momentum network's projections of "
                           "the current and the last K / 2N batches are the candidates "
                           "(v2: 65536), 0: off", min=0)
    memory_momentum: float = opt(-1.0, "momentum m of the memory network's moving average; -1: "
                                 "averaged over 0.4% of the run, as v2's 0.999", min=-1, max=1)
    memory_bn: str = opt("shuffle", "the keys' BatchNorm statistics: shuffle (MoCo's), batch, "
                         "running", ["shuffle", "batch", "running"])
    val_fraction: float = opt(0.0, "hold out this class-balanced fraction of the training images "
                              "as the evaluation split (for data without val/); the later "
                              "scripts hold out the same images", min=0, below=1)
    val_dir: str = opt("", "the evaluation images (<class>/<image>) instead of <data-dir>/val")
    global_bn: bool = opt(True, "BatchNorm statistics over the global batch under torchrun "
                          "(--no-global-bn: per-GPU statistics, the paper's ablation)")
    # system
    device: str = opt("auto", "auto picks cuda, then mps, then cpu", ["auto", "cuda", "mps", "cpu"],
                      changeable=True)
    precision: str = opt("auto", "auto: bf16 autocast on CUDA and on CPUs with native bf16 "
                         "(AVX512-BF16, AMX), fp32 elsewhere; fp16 uses a "
                         "gradient scaler", ["auto", "bf16", "fp16", "fp32"], changeable=True)
    compile: bool = opt(False, "torch.compile the model (slower start, faster steps on GPU)",
                        changeable=True)
    seed: int = opt(0, "random seed (initialisation and data order)")
    log_every: int = opt(50, "print a log line every this many steps (and after the first)",
                         min=1, changeable=True)
    eval_every: int = opt(0, "kNN top-1 on the evaluation split every this many epochs, 0: off",
                          min=0, changeable=True)
    knn_k: int = opt(200, "neighbours of the kNN monitor", min=1, changeable=True)
    knn_temperature: float = opt(0.1, "temperature of the kNN monitor's weights", above=0,
                                 changeable=True)
    resume: str = opt("", "checkpoint to continue from (the same command continues its --out-dir "
                      "without it); its configuration is used, with the flags given here on "
                      "top", changeable=True)
    checkpoint_every: float = opt(10.0, "minutes between checkpoints within an epoch (a crash "
                                  "loses at most that), 0: at epoch ends only", min=0,
                                  changeable=True)
    show_augmentations: str = opt("", "save a PNG of 8 images (original, evaluation view, the "
                                  "two views) to this file and exit, e.g. views.png",
                                  changeable=True)


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
    # Paper, Sec. 2.2, B.1: ResNet-50, 224 px, B 4096, 100 epochs, lr 0.3 x B/256, wd 1e-6, tau 0.1.
    "imagenet": dict(arch="resnet50", image_size=224, batch_size=4096, epochs=100, lr=0.3,
                     lr_scaling="linear", weight_decay=1e-6, temperature=0.1, color_strength=1.0,
                     blur=True),
}
PRESETS["cifar100"] = PRESETS["cifar10"]
PRESETS["folder"] = PRESETS["imagenet"]


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


class Representation(nn.Module):
    """x -> what the later stages read: h = f(x) (v1; layer 0), or the output of the first `layer`
    layers of g (v2 Sec. 2 fine-tunes from layer 1 of a 3-layer head; all of them give z, which
    Fig. 8 compares with h). It holds model's own modules, not copies."""

    def __init__(self, model, layer=0, flag="--layer"):
        super().__init__()
        layers = list(model.head.layers)
        if not 0 <= layer <= len(layers):
            raise UserError(f"{flag} {layer}: the projection head has {len(layers)} layer(s); use "
                            f"{flag} 0{f' to {len(layers)}' if layers else ''}")
        self.encoder, self.head = model.encoder, nn.Sequential(*layers[:layer])
        self.out_dim = layers[layer - 1][0].out_features if layer else model.encoder.out_dim

    def forward(self, x):
        return self.head(self.encoder(x))  # B x out_dim


def build_model(cfg, state=None, path=""):
    """The SimCLR network described by a configuration (a Config or the dict in a checkpoint),
    loaded strictly from state (the model of the checkpoint at path) unless None."""
    c = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    try:
        encoder, dim = build_encoder(c["arch"], c["width_multiplier"], c["image_size"], c["sk_ratio"])
        model = SimCLR(encoder, ProjectionHead(dim, c["proj_head"], c["proj_layers"], c["proj_dim"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path or 'the configuration'} does not describe a model of this project "
                        f"({type(e).__name__}: {e})")
    if state is not None:
        load_model_state(model, state, path)
    return model


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
        x, dtype = x.to(torch.promote_types(x.dtype, torch.float32)), x.dtype  # bf16: fp32 sums
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
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(dtype)  # as BatchNorm


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
        with precision_for("auto", device)[1]:
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


def view_augmentations(cfg):
    """t and t' of Algorithm 1, one per view: the same augmentation twice; with --one-branch,
    Fig. 5's protocol: each image randomly cropped once, --augment's transformations on view 1
    of that crop only, view 2 left as the crop (the paper's t(x) = x)."""
    first = build_augmentation(cfg.image_size, cfg.augment, cfg.color_strength, cfg.blur,
                               base_crop=cfg.one_branch)
    return [first, build_augmentation(cfg.image_size, "", base_crop=True) if cfg.one_branch else first]


def train_step(model, x1, x2, optimizer, objective, scaler=None, autocast=contextlib.nullcontext(),
               memory=None, memory_format=torch.channels_last):
    """One step of Algorithm 1 on the two views (n x 3 x S x S each) of a batch: z = g(f(x)) for
    the 2n views, the loss, its gradient, the optimizer's step. objective(z1, z2, negatives) is
    NT-Xent (or a Table 4 loss, objective.py). Returns (L, contrast_acc, entropy), detached.

    The step minimises 2L, the authors' loss_a + loss_b, not L: the two differ by more than a
    learning rate under LARS, whose trust ratio cancels the factor for the weights' gradient
    but not for BatchNorm parameters and biases (updated by lr x g) nor for the weight decay's
    share of the adapted update. With 2L every parameter moves as in their code
    (test_authors_step.py); with L, BN parameters moved at half their rate.
    """
    x = torch.cat([x1, x2]).contiguous(memory_format=memory_format)  # 2n x 3 x S x S: [views 1; views 2]
    with autocast:
        _, z = model(x)  # BN statistics over both views, as the official code
    z1, z2 = rearrange(z, "(v b) d -> v b d", v=2)
    keys = negatives = None
    if memory is not None:  # v2: the momentum network's keys are the candidates (memory.py)
        memory.update()
        with autocast:
            keys = memory.project(x)  # 2n x d, no gradient
        negatives = memory.negatives()  # the past batches' keys, K x d
    loss, acc, entropy = objective(z1, z2, negatives, None if keys is None else
                                   tuple(rearrange(keys, "(v b) d -> v b d", v=2)))
    optimizer.zero_grad(set_to_none=True)
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # fp16's; a no-op otherwise
    scaler.scale(2 * loss).backward()  # the authors' loss_a + loss_b
    scaler.step(optimizer)
    scaler.update()
    if keys is not None:
        memory.enqueue(keys)
    return loss.detach(), acc, entropy


# The README's laptop recipe, 30 minutes on 2 cores (reproduce.py --scale laptop, RESULTS.md)
LAPTOP_RUN = ("python pretrain.py --dataset cifar10 --data-dir {} --width-multiplier 0.25 --batch-size "
              "128 --image-size 24 --epochs 30 --warmup-epochs 1 --lr 2.0, then python linear_eval.py "
              "--checkpoint <its folder> --cached-features --knn 200 --image-size 40")


def seconds_per_image(model, cfg, objective, autocast, images=16):
    """The step's time per image, timed on a copy of the model and random images (the best of
    two steps after an untimed one): a CPU run's estimate before its first step. The run's own
    weights, optimizer and random streams are not touched."""
    probe = copy.deepcopy(model)
    optimizer = build_optimizer(probe, cfg.optimizer, 0.0, 0.0, cfg.momentum)
    times = []
    with torch.random.fork_rng(devices=[]):
        x = torch.rand(2, images, 3, cfg.image_size, cfg.image_size)
        for _ in range(3):
            start = time.perf_counter()
            train_step(probe, x[0], x[1], optimizer, objective, autocast=autocast)
            times.append(time.perf_counter() - start)
    return min(times[1:]) / images


def train(cfg, ckpt=None):
    """Pretrain as cfg says; ckpt: the checkpoint of --resume, read by resolve_config."""
    device, rank, world = setup(cfg.device)
    torch.manual_seed(cfg.seed + rank)  # ranks differ in augmentations; DDP syncs the weights
    main = rank == 0
    log = console(main)

    local_batch = per_process_batch(cfg.batch_size, world)
    precision, autocast, why = precision_for(cfg.precision, device)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(world)
    try:
        objective = build_objective(cfg.loss, cfg.temperature, cfg.l2_norm, cfg.semi_hard, cfg.margin)
    except ValueError as e:
        raise UserError(str(e))
    if cfg.warmup_epochs > cfg.epochs:
        raise UserError(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than --epochs "
                        f"{cfg.epochs}: the learning rate would never reach its peak; lower it")

    # Data: two views per image (Algorithm 1, lines 3-9), made on the device (augment.py)
    augments = view_augmentations(cfg)
    crop = any(a.crop or a.base_crop for a in augments)
    split = lambda name, views=0: load_split(cfg.dataset, cfg.data_dir, name, cfg.image_size, device,
                                             workers, views, log, crop, cfg.val_fraction, cfg.val_dir)
    dataset = split("pretrain", views=ViewLoader.crops_per_image(augments))
    if isinstance(dataset, InMemory) and not crop and dataset.images.shape[-1] != cfg.image_size:
        raise UserError(f"--augment without crop keeps the images' {dataset.images.shape[-1]} px: "
                        f"set --image-size {dataset.images.shape[-1]}")
    if cfg.show_augmentations:
        if main:
            log(f"saved {save_augmentation_grid(cfg.show_augmentations, dataset, augments, cfg.image_size, device)}")
        return
    knn_sets = None
    if cfg.eval_every:  # read now: a missing evaluation split fails before the first step
        # CIFAR pretrains on its labelled training split, already in memory
        knn_sets = (dataset if cfg.dataset.startswith("cifar") else split("train"), split("val"))
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} images are fewer than one batch of {cfg.batch_size}: "
                        f"lower --batch-size to at most {len(dataset)}")
    if ckpt and ckpt.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise UserError(f"{cfg.resume} was written at {ckpt['steps_per_epoch']} steps per epoch, "
                        f"this data gives {steps_per_epoch}: resume with the same data")
    total_steps = cfg.epochs * steps_per_epoch  # the schedule's length
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    sampler = ResumableSampler(dataset, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = ViewLoader(dataset, sampler, local_batch, augments, device, workers)

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
    # NHWC, as train_step feeds it: faster convolutions on cuDNN's tensor cores and with oneDNN
    # on the CPU (RESULTS.md)
    model = model.to(memory_format=torch.channels_last)
    raw_model = model  # what checkpoints store; the momentum network copies it
    memory = None
    if cfg.memory_size:
        if cfg.memory_size < 2 * cfg.batch_size:
            raise UserError(f"--memory-size {cfg.memory_size} must hold at least one batch of "
                            f"{2 * cfg.batch_size} views")
        if cfg.memory_bn == "shuffle" and 2 * local_batch % SHUFFLE_GROUPS:
            raise UserError(f"--memory-bn shuffle normalises the keys in {SHUFFLE_GROUPS} groups: "
                            f"{2 * local_batch} views per process do not divide; use a --batch-size "
                            f"of a multiple of {SHUFFLE_GROUPS // 2 * world}, or --memory-bn batch")
        m = cfg.memory_momentum if cfg.memory_momentum >= 0 else memory_momentum(
            total_steps, cfg.memory_size / (2 * cfg.batch_size))
        memory = Memory(raw_model, cfg.memory_size, raw_model.head.out_dim, m, cfg.memory_bn).to(device)
        if ckpt and "memory" in ckpt:
            memory.load_state_dict(ckpt["memory"])
    if under_torchrun:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    out_dir = Path(cfg.out_dir)  # continue_run's choice
    if main:  # made once every check has passed: a failed start leaves no folder behind
        prepare_out_dir(out_dir)

    n_params = sum(p.numel() for p in raw_model.encoder.parameters())
    log(f"git {git_revision() or '-'} | {world} process(es) on {device.type} | {precision} ({why}) | "
        f"{'global BN | ' if under_torchrun and cfg.global_bn else ''}{cfg.arch} "
        f"x{cfg.width_multiplier:g} with the {raw_model.encoder.stem_name} at {cfg.image_size} px, "
        f"{n_params / 1e6:.2f}M parameters, h {raw_model.encoder.out_dim}-d"
        + (f" | memory of {cfg.memory_size}, momentum {memory.momentum:.4g}" if memory else ""))
    log("config " + json.dumps(dataclasses.asdict(cfg)))
    log(f"{len(dataset)} images, {steps_per_epoch} steps/epoch of {cfg.batch_size} "
        f"({local_batch} per process), {last_step} of {total_steps} steps, peak lr {peak_lr:.4g}, "
        f"out {out_dir}" + (f"; continuing {cfg.resume} from step {step}" if ckpt else ""))

    if device.type == "cpu" and not under_torchrun and not ckpt and not cfg.compile:
        seconds = seconds_per_image(raw_model, cfg, objective, autocast) * last_step * cfg.batch_size
        log(f"on this CPU the run takes about {datetime.timedelta(seconds=round(seconds))} "
            f"(its step timed on 16 images; evaluations not counted)" + (
                f"; the laptop recipe: {LAPTOP_RUN.format(cfg.data_dir or 'DIR')}"
                if seconds > 2 * 3600 else ""))

    run = Run(out_dir, "ckpt.pt", device, cfg.checkpoint_every, step)
    # loss, contrast_acc, entropy, non-finite losses: since the last log line, and this epoch's
    sums, epoch_sums = torch.zeros(4, device=device), torch.zeros(4, device=device)
    if ckpt and "epoch_sums" in ckpt:
        epoch_sums += ckpt["epoch_sums"].to(device)  # the steps of this epoch before the stop

    def state():
        return dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), epoch=step // steps_per_epoch, step=step,
                    steps_per_epoch=steps_per_epoch, config=dataclasses.asdict(cfg),
                    epoch_sums=epoch_sums.cpu(), finished=step >= total_steps,
                    **({"memory": memory.state_dict()} if memory is not None else {}))

    model.train()
    progress = Progress(log, "step", last_step, cfg.batch_size, every=cfg.log_every, start=step)
    since_log, t_start, stopping = 0, time.time(), False
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        if step >= last_step:
            break
        sampler.set_epoch(epoch)
        sampler.start = (step % steps_per_epoch) * local_batch
        t_epoch, steps_now = time.time(), step
        for (x1, x2), _ in loader:
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, acc, entropy = train_step(model, x1, x2, optimizer, objective, scaler, autocast,
                                            memory)
            step += 1
            since_log += 1
            sums += torch.stack([loss, acc, entropy, (~torch.isfinite(loss)).float()])

            stopping, saving = run.poll()  # the same answers on every process
            epoch_end = step % steps_per_epoch == 0
            # the log line, and the check for a non-finite loss before any checkpoint is written
            if progress.due(step) or epoch_end or stopping or saving:
                if world > 1:
                    dist.all_reduce(sums)
                    sums /= world
                loss_avg, acc_avg, _, bad = (sums / since_log).tolist()
                epoch_sums += sums
                sums.zero_()
                since_log = 0
                if bad > 0:
                    raise UserError(f"loss is not finite at step {step}; stopped. " + (
                        f"The last good checkpoint is {run.path}" if run.path.exists() else
                        "No checkpoint was written yet") + " (try a lower --lr)")
                progress.show(step, f"epoch {epoch + 1}/{cfg.epochs} loss {loss_avg:.4f} "
                                    f"contrast_acc {100 * acc_avg:.1f}% lr {lr:.4g}")
            if epoch_end:
                break
            if stopping or saving or step >= last_step:  # in mid-epoch: a checkpoint, no record
                run.save(state())
            if stopping:
                return run.stopped(step, log)
            if step >= last_step:
                return log(f"stopped at step {step} (--max-steps), checkpoint {run.path}; the "
                           f"same command with --max-steps 0 goes on to step {total_steps}")

        # end of epoch: the record (with the optional kNN), then the checkpoint
        loss_avg, acc_avg, entropy_avg = (epoch_sums[:3] / steps_per_epoch).tolist()
        record = dict(epoch=epoch + 1, step=step, loss=loss_avg, contrast_acc=acc_avg,
                      entropy=entropy_avg, lr=lr,
                      images_per_s=(step - steps_now) * cfg.batch_size / (time.time() - t_epoch),
                      time=time.time() - t_start)
        record.update(unreadable_images(dataset, device, log))
        if knn_sets and ((epoch + 1) % cfg.eval_every == 0 or step >= last_step):
            record["knn_top1"] = knn_accuracy(raw_model.encoder, *knn_sets, cfg, device, workers, log)
            log(f"epoch {epoch + 1}: kNN top-1 {record['knn_top1']:.2f}% (k "
                f"{min(cfg.knn_k, len(knn_sets[0]))} of {len(knn_sets[0])} training images)")
        run.record(record)
        epoch_sums.zero_()
        run.save(state())
        if stopping:
            return run.stopped(step, log)
    log(f"done: {step} steps in {datetime.timedelta(seconds=round(time.time() - t_start))}, "
        f"checkpoint {run.path}")


def parse_with_presets(argv, cls=None, presets=None, description=None):
    """(config, flags given): the flags over their dataset's preset (pretrain.py's Config and
    PRESETS, or bench.py's), where a folder of images of 32 px or less takes CIFAR-10's
    (data.preset); a folder preset's size far above the images' own is refused."""
    cls, presets = cls or Config, presets or PRESETS
    cfg, given = parse_config(cls, argv, presets, description or __doc__.splitlines()[0])
    if preset(cfg.dataset, cfg.image_size) != cfg.dataset:  # a folder of small images
        cfg, given = parse_config(cls, argv, {cfg.dataset: presets[preset(cfg.dataset, cfg.image_size)]})
    if cfg.dataset == "folder" and "image_size" not in given and not getattr(cfg, "resume", ""):
        side = typical_side(cfg.data_dir)
        if side and cfg.image_size > 2 * side:
            raise UserError(f"the images under {cfg.data_dir} are about {side} px (shorter side): "
                            f"--image-size {cfg.image_size}, the folder preset's, would upscale them "
                            f"{cfg.image_size / side:.1f}x; pass --image-size {side} (32 or less: "
                            f"CIFAR-10's stem and recipe), or --image-size {cfg.image_size} to keep it")
    return cfg, given


def resolve_config(argv):
    """Flags over presets; for a run that continues (--resume, or a checkpoint already in
    --out-dir: cli.continue_run), the changeable flags over the checkpoint's stored
    configuration. Returns (config, the checkpoint continued or None)."""
    cfg, given = parse_with_presets(argv)
    cfg, ckpt = continue_run(Config, cfg, given, "pretrain", f"{cfg.dataset}-{cfg.arch}")
    if ckpt and cfg.max_steps and ckpt["step"] >= cfg.max_steps:
        raise Done(f"{cfg.resume} is at step {ckpt['step']}, --max-steps {cfg.max_steps}: nothing "
                   f"to do (--max-steps 0 goes on to the end of its schedule)")
    return cfg, ckpt


def main(argv=None):
    run_cli("pretrain.py", lambda: train(*resolve_config(argv)))


if __name__ == "__main__":
    main()
