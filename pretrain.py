"""SimCLR contrastive pretraining: Algorithm 1 of Chen et al. 2020 (v1), with the v2 options.

Each image is augmented twice (Sec. 3, Appendix A), both views go through a ResNet encoder f and
a projection head g (Sec. 2.1), and NT-Xent (Eq. 1) pulls the two views of an image together
while pushing away the other 2(N-1) views of the batch (train_step). h = f(x) is what the other
scripts evaluate, fine-tune and distill. The network is in model.py, the loss in objective.py,
the data in data.py and augment.py, v2's memory in memory.py, the run's life in runs.py.

    python pretrain.py --dataset cifar10 --data-dir data/cifar10      # laptop or 1 GPU
    torchrun --nproc_per_node=8 pretrain.py --dataset imagenet --data-dir /data/imagenet

--batch-size is the global batch: under torchrun each process takes its share, BatchNorm is
global (Sec. 2.2) and every view is scored against the views of all processes. Written to
--out-dir: ckpt.pt (every epoch, every --checkpoint-every minutes, on Ctrl-C or SIGTERM) and
log.jsonl; the same command continues the run (docs/long-runs.md). The CIFAR-10 preset is the
authors' recipe (ResNet-18, 1000 epochs, batch 512, LARS); --dataset folder takes it for images
of 32 px or less, ImageNet's above. RESULTS.md has what this code measured.
"""
import contextlib
import copy
import dataclasses
import datetime
import math
import sys
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
from einops import rearrange

from data import (InMemory, ResumableSampler, ViewLoader, build_augmentation, build_dataset,
                  check_same_classes, load_split, preset, save_augmentation_grid, typical_side)
from evaluation import extract_features, knn_accuracy
from memory import SHUFFLE_GROUPS, Memory, memory_momentum
from model import build_model, build_optimizer, learning_rate, scaled_lr
from objective import LOSSES, build_objective
from runs import (Done, Run, Training, UserError, as_user_error, check_picture, continue_run, opt,
                  parse_config, run_cli)

# torch.distributed.nn.functional's differentiable collectives are deprecated in favour of a
# private module; they are still the public way to gather with gradients, so keep logs clean.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.", category=FutureWarning)

# --- Configuration ---------------------------------------------------------------------------


@dataclass
class Config(Training):
    """pretrain.py's options (runs.Training adds the run's: --out-dir, --device, ...)."""
    WRITES = ("writes, in --out-dir: ckpt.pt (the previous one kept as ckpt.prev.pt) and log.jsonl "
              "(a record per epoch); with --show-augmentations only that PNG")
    # data
    dataset: str = opt("cifar10", "which data; folder: your own images, class folders or not",
                       ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_dir: str = opt("data", "dataset root, or an image-folder export (train/<class>/*, val/)",
                        path=True)
    image_size: int = opt(32, "training resolution in pixels; <= 32 selects the CIFAR stem", min=8)
    # augmentation (Sec. 3, Appendix A)
    augment: str = opt("crop,color", "augmentations on (Fig. 5), comma-separated: crop (with "
                       "flip), flip, jitter, gray, color (= jitter,gray)")
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
    minutes: float = opt(0.0, "the epochs that fit pretraining and its evaluation in this many "
                         "minutes here, the step timed first (--dataset cifar10: the laptop "
                         "recipe); 0: --epochs", min=0)
    # not a flag: what --minutes chose (the epochs, the rates they came from), kept by the run
    clock: dict = field(default_factory=dict, metadata=dict(help="", changeable=True, path=False,
                                                            derived=True))
    optimizer: str = opt("lars", "LARS as in the paper; sgd and adam for comparison",
                         ["lars", "sgd", "adam"])
    lr: float = opt(1.0, "base learning rate, scaled by --lr-scaling", above=0)
    lr_scaling: str = opt("linear", "linear: lr x B/256; sqrt: lr x sqrt(B) (better for small B)",
                          ["linear", "sqrt"])
    weight_decay: float = opt(1e-4, "L2 weight decay, not on biases and BatchNorm parameters",
                              min=0)
    momentum: float = opt(0.9, "momentum of LARS and SGD", min=0, below=1)
    warmup_epochs: float = opt(10.0, "linear warmup from 0, then cosine decay to 0", min=0)
    memory_size: int = opt(0, "v2's memory of K negatives from a momentum network (memory.py; "
                           "v2: 65536), 0: off", min=0)
    memory_momentum: float = opt(-1.0, "momentum m of the memory network's moving average; -1: "
                                 "averaged over 0.4% of the run, as v2's 0.999", min=-1, max=1)
    memory_bn: str = opt("shuffle", "the keys' BatchNorm statistics: shuffle (MoCo's), batch, "
                         "running", ["shuffle", "batch", "running"])
    val_fraction: float = opt(0.0, "hold out this class-balanced fraction of the training images "
                              "for evaluation (data without val/; later scripts too)", min=0, below=1)
    val_dir: str = opt("", "the evaluation images (<class>/<image>) instead of <data-dir>/val",
                       path=True)
    # system
    seed: int = opt(0, "random seed (initialisation and data order)")
    eval_every: int = opt(0, "kNN top-1 on the evaluation split every this many epochs, 0: off",
                          min=0, changeable=True)
    knn_k: int = opt(200, "neighbours of the kNN monitor", min=1, changeable=True)
    knn_temperature: float = opt(0.1, "temperature of the kNN monitor's weights", above=0,
                                 changeable=True)
    show_augmentations: str = opt("", "only save a PNG of 8 images and their views, e.g. views.png",
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


def parse_with_presets(argv, cls=Config):
    """(config, flags given): the flags over their dataset's preset (data.preset; with --minutes
    on CIFAR-10 the laptop recipe's); a folder's --image-size far above its images' is refused.
    cls: Config, or bench.py's."""
    description = sys.modules[cls.__module__].__doc__.splitlines()[0]
    cfg, given = parse_config(cls, argv, PRESETS, description)
    recipe = {**PRESETS[preset(cfg.dataset, cfg.image_size)],
              **(LAPTOP if cfg.minutes and cfg.dataset == "cifar10" else {})}
    if recipe != PRESETS[cfg.dataset]:  # a folder of small images, or the laptop recipe
        cfg, given = parse_config(cls, argv, {cfg.dataset: recipe}, description)
    if cfg.dataset == "folder" and "image_size" not in given and not cfg.resume:
        side = typical_side(cfg.data_dir)
        if side and cfg.image_size > 2 * side:
            raise UserError(f"the images under {cfg.data_dir} are about {side} px (shorter side): "
                            f"--image-size {cfg.image_size}, the folder preset's, would upscale them "
                            f"{cfg.image_size / side:.1f}x; pass --image-size {side} (32 or less: "
                            f"CIFAR-10's stem and recipe), or --image-size {cfg.image_size} to keep it")
    return cfg, given


def resolve_config(argv):
    """(config, the checkpoint continued or None): flags over presets, or for a run that
    continues, the changeable flags over its stored configuration (runs.continue_run)."""
    cfg, given = parse_with_presets(argv)
    if cfg.minutes and "epochs" in given:
        raise UserError(f"--minutes {cfg.minutes:g} chooses the epochs that fit the clock: give "
                        f"--minutes or --epochs {cfg.epochs}, not both")
    return continue_run(Config, cfg, given, "pretrain", f"{cfg.dataset}-{cfg.arch}")


# --- Algorithm 1: two views of each image, the step, the loop --------------------------------


def view_augmentations(cfg):
    """t and t' of Algorithm 1: the same augmentation twice; with --one-branch (Fig. 5), one
    random crop of each image, --augment's transformations on view 1 only, view 2 the crop."""
    first = build_augmentation(cfg.image_size, cfg.augment, cfg.color_strength, cfg.blur,
                               base_crop=cfg.one_branch)
    return [first, build_augmentation(cfg.image_size, "", base_crop=True) if cfg.one_branch else first]


def train_step(model, x1, x2, optimizer, objective, scaler=None, autocast=contextlib.nullcontext(),
               memory_format=torch.channels_last):
    """One step of Algorithm 1 on the two views (n x 3 x S x S each) of a batch: z = g(f(x)) for
    the 2n views, the loss objective(z1, z2) (NT-Xent, a Table 4 loss, or v2's memory around
    them), its gradient, the optimizer's step. Returns (L, contrast_acc, entropy), detached.

    It minimises 2L, the authors' loss_a + loss_b: under LARS the factor is not a learning rate,
    as the trust ratio cancels it for the weights but not for BatchNorm parameters and biases
    (with L they moved at half the authors' rate; test_authors_step.py).
    """
    x = torch.cat([x1, x2]).contiguous(memory_format=memory_format)  # 2n x 3 x S x S: [views 1; views 2]
    with autocast:
        _, z = model(x)  # BN statistics over both views, as the official code
    z1, z2 = rearrange(z, "(v b) d -> v b d", v=2)
    loss, acc, entropy = objective(z1, z2)
    optimizer.zero_grad(set_to_none=True)
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # fp16's; a no-op otherwise
    scaler.scale(2 * loss).backward()  # the authors' loss_a + loss_b
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), acc, entropy


def train(cfg, ckpt=None, started=None):
    """Pretrain as cfg says; ckpt: the checkpoint this run continues (resolve_config); started:
    when the command began (--minutes counts from it)."""
    run = Run(cfg, ckpt, "pretrain")  # device, processes, precision, workers (runs.py)
    if cfg.show_augmentations:
        check_picture(cfg.show_augmentations, "--show-augmentations")
    torch.manual_seed(cfg.seed + run.rank)  # ranks differ in augmentations; DDP syncs the weights
    with as_user_error("--loss"):  # a combination of flags the loss refuses
        objective = build_objective(cfg.loss, cfg.temperature, cfg.l2_norm, cfg.semi_hard, cfg.margin)
    augments = view_augmentations(cfg)
    crop = any(a.crop or a.base_crop for a in augments)
    split = lambda name, views=0: load_split(cfg.dataset, cfg.data_dir, name, cfg.image_size,
                                             run.device, run.workers, views, run.log, crop,
                                             cfg.val_fraction, cfg.val_dir, decode_on=cfg.decode)
    loading = time.time()
    dataset = split("pretrain", views=ViewLoader.crops_per_image(augments))
    loading = time.time() - loading
    if cfg.show_augmentations:  # the picture of what the views will be, and nothing else
        picture = save_augmentation_grid(cfg.show_augmentations, dataset, augments, cfg.image_size,
                                         run.device) if run.main else ""
        raise Done(f"saved {picture}")
    knn_sets = None
    if cfg.eval_every:  # read now: a missing evaluation split fails before the first step
        # CIFAR pretrains on its labelled training split, already in memory
        knn_sets = (dataset if cfg.dataset.startswith("cifar") else split("train"), split("val"))
        check_same_classes(*knn_sets)
    check_inputs(cfg, run, dataset, crop)
    sampler = ResumableSampler(dataset, run.world, run.rank, shuffle=True, seed=cfg.seed,
                               drop_last=True)
    loader = ViewLoader(dataset, sampler, run.local_batch, augments, run.device, run.workers)

    torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): let cuDNN pick its kernels
    with as_user_error(cfg.resume):
        model = build_model(cfg, ckpt and ckpt["model"]).to(run.device)
    warmup_steps, said = clock_schedule(cfg, run, dataset, model, objective, loader, started,
                                        loading)
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(model, cfg.optimizer, peak_lr, cfg.weight_decay, cfg.momentum)
    memory = build_memory(cfg, model, run) if cfg.memory_size else None
    state = lambda: dict(model=model.state_dict(), config=dataclasses.asdict(cfg),
                         **({"memory": memory.state_dict()} if memory else {}))
    net = run.start(model, [optimizer], state, [sampler], loader, describe(cfg, model, memory),
                    f"peak lr {peak_lr:.4g}")
    if said:  # how long the run takes (--minutes: what it chose)
        run.log(said)
    if memory:  # v2: the momentum network's keys are the candidates (memory.py)
        net, objective = memory.wrap(net, objective)

    for epoch in run.epochs():
        for (x1, x2), _ in loader:  # two augmented views of every image, on the device
            run.set_lr(learning_rate(run.step, run.total_steps, warmup_steps, peak_lr))
            loss, acc, entropy = train_step(net, x1, x2, optimizer, objective, run.scaler,
                                            run.autocast)
            run.step_done(loss=loss, contrast_acc=acc, entropy=entropy)  # log, checkpoint, stop
        knn = {}
        if knn_sets and run.evaluation_due():
            knn["knn_top1"] = knn_monitor(model.encoder, *knn_sets, cfg, run)
        run.epoch_done(**knn)  # the record, then the checkpoint
    run.finish()


# --- Around the loop: input checks, the memory, the start line, kNN, the clock ----------------


def check_inputs(cfg, run, dataset, crop):
    """What the data and the flags must agree on before any work is done."""
    if cfg.warmup_epochs > cfg.epochs:
        raise UserError(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than --epochs "
                        f"{cfg.epochs}: the learning rate would never reach its peak; lower it")
    if isinstance(dataset, InMemory) and not crop and dataset.images.shape[-1] != cfg.image_size:
        raise UserError(f"--augment without crop keeps the images' {dataset.images.shape[-1]} px: "
                        f"set --image-size {dataset.images.shape[-1]}")
    if cfg.memory_size and cfg.memory_size < 2 * cfg.batch_size:
        raise UserError(f"--memory-size {cfg.memory_size} must hold at least one batch of "
                        f"{2 * cfg.batch_size} views")
    if cfg.memory_size and cfg.memory_bn == "shuffle" and 2 * run.local_batch % SHUFFLE_GROUPS:
        raise UserError(f"--memory-bn shuffle normalises the keys in {SHUFFLE_GROUPS} groups: "
                        f"{2 * run.local_batch} views per process do not divide; use a --batch-size "
                        f"of a multiple of {SHUFFLE_GROUPS // 2 * run.world}, or --memory-bn batch")


def build_memory(cfg, model, run):
    """v2's memory (memory.py) of the model, its momentum from the run's length unless given;
    its queue as the continued run left it."""
    m = cfg.memory_momentum if cfg.memory_momentum >= 0 else memory_momentum(
        run.total_steps, cfg.memory_size / (2 * cfg.batch_size))
    memory = Memory(model, cfg.memory_size, model.head.out_dim, m, cfg.memory_bn).to(run.device)
    if run.ckpt and "memory" in run.ckpt:
        memory.load_state_dict(run.ckpt["memory"])
    return memory


def describe(cfg, model, memory):
    """The start line's network: encoder, stem, size, parameters, h, the memory."""
    n_params = sum(p.numel() for p in model.encoder.parameters())
    return (f"{cfg.arch} x{cfg.width_multiplier:g} with the {model.encoder.stem_name} at "
            f"{cfg.image_size} px, {n_params / 1e6:.2f}M parameters, h {model.encoder.out_dim}-d"
            + (f" | memory of {cfg.memory_size}, momentum {memory.momentum:.4g}" if memory else ""))


def knn_monitor(encoder, train, val, cfg, run):
    """kNN top-1 (%) of the evaluation split val, with the training split train as memory."""
    encoder.eval()
    feats = [extract_features(encoder, data, cfg.image_size, 512, run.device, run.workers, run.log,
                              f"kNN: {name}", run.autocast)
             for name, data in (("train", train), ("val", val))]
    encoder.train()
    top1 = knn_accuracy(*feats[0], *feats[1], len(train.classes), cfg.knn_k, cfg.knn_temperature)["top1"]
    run.log(f"epoch {run.epoch + 1}: kNN top-1 {top1:.2f}% (k {min(cfg.knn_k, len(train))} of "
            f"{len(train)} training images)")
    return top1


# The laptop recipe, which a clock search chose (RESULTS.md): the authors' CIFAR-10 recipe at 1/4
# width, batch 128, 24 px crops, lr 2.0 x B/256, evaluated at 40 px (FixRes). --dataset cifar10
# --minutes M runs it, its epochs the clock's.
LAPTOP = dict(width_multiplier=0.25, batch_size=128, image_size=24, epochs=30, warmup_epochs=1.0,
              lr=2.0)
LAPTOP_EVALUATION_SIZE = 40  # px
LAPTOP_EVALUATION = f"--cached-features --knn 200 --image-size {LAPTOP_EVALUATION_SIZE}"
LAPTOP_RUN = ("python pretrain.py --dataset cifar10 --data-dir {} --minutes 30, then python "
              "linear_eval.py --checkpoint <its folder> " + LAPTOP_EVALUATION)
MARGIN = 0.15  # of --minutes, left unplanned: a run's pace falls below its first steps' (3-12% here)


def clock_schedule(cfg, run, dataset, model, objective, loader, started, loading):
    """(warmup steps, a line to say) of the schedule: of --epochs, or of the epochs that fit
    --minutes, chosen once and kept in cfg.clock. A new CPU run without --minutes says how long
    it takes and, past two hours, the command sized to the time a user has."""
    run.schedule(len(dataset))  # the checks, and an epoch's steps
    said = ""
    if cfg.minutes and not cfg.clock:
        times = torch.tensor([seconds_per_step(model, cfg, objective, loader, run),
                              evaluation_seconds(model, cfg, run, len(dataset), loading),
                              time.time() - (started or time.time())], device=run.device)
        if run.world > 1:  # every process plans with the slowest one's times
            torch.distributed.all_reduce(times, torch.distributed.ReduceOp.MAX)
        step, evaluation, elapsed = times.tolist()
        epoch = step * run.steps_per_epoch
        epochs = int((60 * cfg.minutes * (1 - MARGIN) - elapsed - evaluation) // epoch)
        if epochs < 1:
            need = (elapsed + evaluation + epoch) / (60 * (1 - MARGIN))
            raise UserError(f"--minutes {cfg.minutes:g}: an epoch takes {epoch:.0f} s here and the "
                            f"evaluation about {evaluation:.0f} s: give at least --minutes "
                            f"{math.ceil(need)}")
        done = datetime.timedelta(seconds=round(elapsed + epochs * epoch + evaluation))
        cfg.clock = dict(epochs=epochs, warmup_epochs=cfg.warmup_epochs * epochs / cfg.epochs,
                         images_per_s=cfg.batch_size / step, evaluation_s=round(evaluation))
        said = (f"--minutes {cfg.minutes:g}: a step of {cfg.batch_size} takes {step:.3g} s here "
                f"({cfg.batch_size / step:.0f} images/s, views made), an epoch {epoch:.0f} s: "
                f"{epochs} epochs (warmup {cfg.clock['warmup_epochs']:.2g}), then " + (
                    f"python linear_eval.py --checkpoint {cfg.out_dir} {evaluation_flags(cfg)} "
                    f"(about {evaluation:.0f} s)" if evaluation else "no evaluation (no "
                    "evaluation images)") + f": done about {done} after the start")
    elif cfg.minutes:
        said = f"--minutes {cfg.minutes:g}: {cfg.clock['epochs']} epochs, chosen at the run's start"
    elif not run.ckpt and run.device.type == "cpu" and run.world == 1 and not cfg.compile:
        seconds = seconds_per_step(model, cfg, objective, loader, run, 16, 3) * run.last_step
        said = (f"on this CPU the run takes about {datetime.timedelta(seconds=round(seconds))} "
                f"(its step timed, views made; evaluations not counted)" + (
                    "; sized to the time you have: " + (
                        LAPTOP_RUN.format(cfg.data_dir or "DIR") if cfg.dataset == "cifar10" else
                        "the same command with --minutes M instead of --epochs")
                    if seconds > 2 * 3600 else ""))
    run.schedule(len(dataset), epochs=cfg.clock.get("epochs"))
    warmup = cfg.clock.get("warmup_epochs", cfg.warmup_epochs)
    return min(round(warmup * run.steps_per_epoch), run.total_steps), said


def seconds_per_step(model, cfg, objective, loader, run, images=0, steps=15):
    """The seconds of a step with its views made, the mean of `steps` after an untimed one (with
    images: on that many of each batch, scaled), on copies of the model and optimizer; the run's
    random streams untouched."""
    probe = copy.deepcopy(model).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(probe, cfg.optimizer, 0.0, 0.0, cfg.momentum)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    times, waited = [], loader.waited
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        batches = (batch for _ in range(steps + 1) for batch in loader)  # an epoch may be shorter
        for _ in range(steps + 1):
            sync()
            start = time.perf_counter()
            (x1, x2), _ = next(batches)
            made, n = time.perf_counter(), images or len(x1)
            train_step(probe, x1[:n], x2[:n], optimizer, objective, autocast=run.autocast)
            sync()
            times.append(made - start + (time.perf_counter() - made) * len(x1) / n)
    loader.waited = waited  # the run's own data share (runs.Run's log lines)
    return statistics.mean(times[1:])


def evaluation_flags(cfg):
    """The evaluation a --minutes run counts: the laptop recipe's (40 px) on CIFAR-10, else the
    fast CPU protocol at the pretraining's size."""
    return LAPTOP_EVALUATION if cfg.dataset == "cifar10" else "--cached-features --knn 200"


def evaluation_seconds(model, cfg, run, images, loading):
    """About how long evaluation_flags' linear_eval.py takes here: reading the images (at this
    run's pace), their features (the encoder timed on 256 images), and 15 s for the rest; 0
    without evaluation images."""
    try:
        evaluated = build_dataset(cfg.dataset, cfg.data_dir, "val", None, cfg.val_fraction,
                                  cfg.val_dir)
    except UserError:
        return 0.0
    total = images + len(evaluated)
    size = LAPTOP_EVALUATION_SIZE if cfg.dataset == "cifar10" else cfg.image_size
    encoder = copy.deepcopy(model.encoder).eval().to(memory_format=torch.channels_last)
    x = torch.full((256, 3, size, size), 0.5, device=run.device).contiguous(
        memory_format=torch.channels_last)  # the run's random streams untouched
    with torch.no_grad(), run.autocast:
        encoder(x)
        start = time.perf_counter()
        encoder(x).float().sum().item()
        features = (time.perf_counter() - start) / 256 * total
    return loading * total / images + features + 15


def main(argv=None):
    started = time.time()
    run_cli("pretrain.py", lambda: train(*resolve_config(argv), started=started))


if __name__ == "__main__":
    main()
