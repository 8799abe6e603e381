"""Semi-supervised fine-tuning with few labels: SimCLR v1 Sec. 6 and SimCLRv2 Sec. 2.

The pretrained f and the first K layers of the projection head g (v2: "fine-tuning from a middle
layer of the projection head"; K = 0 as v1) get a new linear classifier, and the whole network is
trained with cross-entropy on a class-balanced fraction of the labels (1% or 10%, or the authors'
ImageNet lists: --subset-file). --from-scratch is the supervised baseline. The fine-tuned network
is distill.py's teacher.

    python finetune.py --checkpoint runs/cifar10-resnet18-.../ckpt.pt --label-fraction 0.01
    python finetune.py --checkpoint runs/.../ckpt.pt --label-fraction 0.01 --from-scratch
    python finetune.py --checkpoint runs/.../ckpt.pt --subset-file runs/ft-1pct/subset.txt
    torchrun --nproc_per_node=8 finetune.py --checkpoint runs/imagenet-.../ckpt.pt \
        --dataset imagenet --data-dir /data/imagenet --subset-file imagenet_subsets/1percent.txt

Settings are the authors': LARS, lr 0.005 x sqrt(B), no weight decay or warmup, cosine decay,
crop + flip; ImageNet B 1024, 60 epochs for 1% and 30 for 10% (CIFAR: B 64, 1% of CIFAR-10 being
500 images). Written to --out-dir: finetuned.pt, results.json, subset.txt (the labelled images,
for --subset-file) and log.jsonl. RESULTS.md has what it measured.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (ResumableSampler, ViewLoader, build_augmentation, check_same_classes,
                  choose_labeled, load_split, preset, save_subset, select, stage_data,
                  subset_is_ours)
from evaluation import evaluate, shown
from model import (V1_HEAD, build_classifier, build_classifier_optimizers, head_layers,
                   learning_rate, load_state, scaled_lr)
from runs import (Run, Training, UserError, as_user_error, checkpoint_path, continue_run,
                  defaults, fingerprint, load_checkpoint, opt, parse_config, run_cli)

# --- Configuration ---------------------------------------------------------------------------


@dataclass
class FinetuneConfig(Training):
    """finetune.py's options (runs.Training adds the run's: --out-dir, --resume, ...)."""
    WRITES = ("writes, in --out-dir: finetuned.pt (distill.py's teacher; the previous one kept as "
              "finetuned.prev.pt), log.jsonl, subset.txt (the labelled images) and results.json")
    checkpoint: str = opt("", "pretraining checkpoint (pretrain.py's ckpt.pt, or a student.pt); "
                          "with --from-scratch its architecture", path=True)
    from_scratch: bool = opt(False, "random initialisation instead of the checkpoint's weights: "
                             "the supervised baseline")
    # data
    dataset: str = opt("", "which data (default: the checkpoint's)",
                       ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_dir: str = opt("", "dataset root (default: the checkpoint's)", path=True)
    # labels (v2 Sec. 3: 1% and 10% of ImageNet, class-balanced)
    label_fraction: float = opt(0.01, "fraction of each class's training images whose labels "
                                "are used: 0.01, 0.1 or 1.0", above=0, max=1)
    subset_file: str = opt("", "labelled images, one name per line, instead of "
                           "--label-fraction: the authors' ImageNet lists (file names such as "
                           "n01440764_10026.JPEG) or a subset.txt this script wrote", path=True)
    seed: int = opt(0, "random seed: which images are labelled, initialisation, data order")
    # model (v2 Sec. 2)
    ft_proj_layer: int = opt(1, "keep this many projection-head layers under the classifier: 0 "
                             "as v1, 1 as v2 (0 for a network without a head)", min=0)
    arch: str = opt("resnet18", "encoder for --from-scratch without --checkpoint",
                    ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    width_multiplier: float = opt(1.0, "width for --from-scratch without --checkpoint", above=0)
    sk_ratio: float = opt(0.0, "selective kernels for --from-scratch without --checkpoint", min=0)
    image_size: int = opt(32, "input size for --from-scratch without --checkpoint (else the "
                          "checkpoint's)", min=8)
    # optimisation (v2 Appendix; official fine-tuning flags)
    batch_size: int = opt(64, "global batch size B in images", min=2)
    epochs: int = opt(0, "training epochs; 0: 60 for <= 1% of the labels, 30 above (v2)", min=0)
    optimizer: str = opt("lars", "for the network, as the paper (the classifier gets momentum "
                         "SGD)", ["lars", "sgd", "adam"])
    lr: float = opt(0.005, "base learning rate, scaled by --lr-scaling", above=0)
    lr_scaling: str = opt("sqrt", "sqrt: lr x sqrt(B) (the authors' fine-tuning choice); "
                          "linear: lr x B/256", ["linear", "sqrt"])
    weight_decay: float = opt(0.0, "L2 weight decay, not on biases and BatchNorm parameters",
                              min=0)
    momentum: float = opt(0.9, "momentum of LARS and SGD", min=0, below=1)
    warmup_epochs: float = opt(0.0, "linear warmup from 0, then cosine decay to 0", min=0)
    # system
    eval_every: int = opt(0, "top-1 on the evaluation split every this many epochs; 0: at the end",
                          min=0, changeable=True)
    val_fraction: float = opt(0.0, "evaluate on this class-balanced fraction of the training "
                              "images, held out (default: the checkpoint's, on its data)",
                              min=0, below=1)
    val_dir: str = opt("", "the evaluation images (<class>/<image>) instead of <data-dir>/val "
                       "(default: the checkpoint's, on its data)", path=True)


# Per-dataset presets. CIFAR: B 64 gives 1% of CIFAR-10 7 steps per epoch (ImageNet's 1%: 12).
PRESETS = {
    "cifar10": dict(batch_size=64, image_size=32),
    "imagenet": dict(batch_size=1024, image_size=224),
}
PRESETS["cifar100"] = PRESETS["cifar10"]
PRESETS["stl10"] = dict(batch_size=64, image_size=96)
PRESETS["folder"] = PRESETS["imagenet"]
ARCH_FLAGS = ("arch", "width_multiplier", "sk_ratio", "image_size")


def resolve_config(argv):
    """(config, the pretraining configuration of the network, weights to start from or None,
    the checkpoint of an interrupted run or None): flags over the preset of the dataset (by
    default the checkpoint's); --from-scratch without --checkpoint: v1's head on --arch."""
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
        given["inputs"] = {} if cfg.from_scratch else {"checkpoint": fingerprint(ckpt)}
        clash = [f for f in ARCH_FLAGS if f in given and given[f] != pre.get(f)]
        if clash:
            raise UserError(f"--{clash[0].replace('_', '-')} differs from the checkpoint's "
                            f"{pre.get(clash[0])}: the architecture comes from --checkpoint")
        layers = head_layers(pre)
        if "ft_proj_layer" not in given:  # v2's layer 1 where there is one (a student has none)
            given["ft_proj_layer"] = cfg.ft_proj_layer = min(cfg.ft_proj_layer, layers)
        if cfg.ft_proj_layer > layers:
            raise UserError(f"--ft-proj-layer {cfg.ft_proj_layer}: the projection head has {layers} "
                            f"layer(s); use --ft-proj-layer 0{f' to {layers}' if layers else ''}")
    elif not cfg.from_scratch:
        raise UserError("--checkpoint is required (a ckpt.pt written by pretrain.py); "
                        "--from-scratch alone trains the --arch network from random weights")
    data = stage_data(given, pre)
    size = pre.get("image_size", given.get("image_size", FinetuneConfig.image_size))
    cfg = FinetuneConfig(**{**defaults(FinetuneConfig), **PRESETS.get(preset(data["dataset"], size), {}),
                            **given, **data})
    if ckpt is None:  # --from-scratch without a checkpoint: v1's head on the --arch flags
        pre = dict(dataset=cfg.dataset, data_dir=cfg.data_dir, **V1_HEAD,
                   **{f: getattr(cfg, f) for f in ARCH_FLAGS})
    for f in ARCH_FLAGS:  # the network actually trained, for the printed and stored config
        setattr(cfg, f, pre[f])
    if cfg.epochs == 0:  # v2: 60 epochs for 1% of ImageNet, 30 for 10%
        cfg.epochs = 60 if (cfg.label_fraction <= 0.01 and not cfg.subset_file) else 30
    labels = Path(cfg.subset_file).stem if cfg.subset_file else f"{100 * cfg.label_fraction:g}pct"
    cfg, resume = continue_run(FinetuneConfig, cfg, given, "finetuned", f"finetune-{cfg.dataset}-"
                               f"{labels}{'-scratch' if cfg.from_scratch else ''}",
                               files={"subset.txt": subset_is_ours})
    if resume:
        return cfg, resume["config"]["pretrain"], None, resume
    return cfg, pre, None if cfg.from_scratch else ckpt["model"], None


# --- Fine-tuning: cross-entropy on the labelled subset, the whole network trained ------------


def train(cfg, pretrain_config, weights, ckpt):
    """Fine-tune as cfg says from weights (the pretraining's, or None: random), or continue ckpt."""
    run = Run(cfg, ckpt, "finetuned")  # device, processes, precision, workers (runs.py)
    split = lambda name, views=0: load_split(cfg.dataset, cfg.data_dir, name, cfg.image_size,
                                             run.device, run.workers, views, run.log, True,
                                             cfg.val_fraction, cfg.val_dir, decode_on=cfg.decode)
    train_set, val_set = split("train", views=1), split("val")
    check_same_classes(train_set, val_set)
    indices = ckpt["subset"] if ckpt else choose_labeled(cfg, train_set, run.log)
    labeled = select(train_set, indices)  # crop + flip on the labelled subset
    steps_per_epoch = run.schedule(len(labeled), "labelled images")
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    sampler = ResumableSampler(labeled, run.world, run.rank, shuffle=True, seed=cfg.seed,
                               drop_last=True)
    loader = ViewLoader(labeled, sampler, run.local_batch, [build_augmentation(cfg.image_size)],
                        run.device, run.workers)

    # The network: pretrained (or fresh) f + K head layers + a new classifier, all of it trained
    torch.manual_seed(cfg.seed)  # the same fresh weights on every process
    num_classes = len(train_set.classes)
    with as_user_error(cfg.resume or cfg.checkpoint):
        model = build_classifier(pretrain_config, num_classes, cfg.ft_proj_layer, weights)
        if ckpt:
            load_state(model, ckpt["model"])
    model = model.to(run.device)
    torch.manual_seed(cfg.seed + run.rank)  # processes differ in augmentation
    optimizers = build_classifier_optimizers(model, cfg.optimizer, peak_lr, cfg.weight_decay,
                                             cfg.momentum)
    config = dict(dataclasses.asdict(cfg), pretrain=pretrain_config, num_classes=num_classes,
                  classes=list(train_set.classes))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    net = run.start(model, optimizers, lambda: dict(model=model.state_dict(), subset=indices,
                                                     config=config), [sampler], loader,
                    f"{'random init' if cfg.from_scratch else cfg.checkpoint} | {cfg.ft_proj_layer} "
                    f"head layer(s) kept | {n_params / 1e6:.2f}M trained parameters | "
                    f"{num_classes} classes", f"peak lr {peak_lr:.4g}")
    if run.main:
        save_subset(run.out_dir / "subset.txt", train_set, indices)

    for epoch in run.epochs():
        for (x,), y in loader:  # one augmented view, on the device
            run.set_lr(learning_rate(run.step, run.total_steps, warmup_steps, peak_lr))
            with run.autocast:
                logits = net(x)  # b x classes
            loss = F.cross_entropy(logits.float(), y)
            run.optimize(loss)
            run.step_done(loss=loss, train_top1=100 * (logits.argmax(1) == y).float().mean())
        top = {}
        if run.evaluation_due():
            top = evaluate(model, val_set, cfg.image_size, 256, run.device, run.workers, run.log,
                           run.autocast)
            run.log(f"epoch {epoch + 1}: {shown(top)}")
        run.epoch_done(**top)  # the record, then the checkpoint

    results = dict(**top, labeled_images=len(indices),
                   label_fraction=None if cfg.subset_file else cfg.label_fraction,
                   subset=str(run.out_dir / "subset.txt"), from_scratch=cfg.from_scratch,
                   checkpoint=cfg.checkpoint, ft_proj_layer=cfg.ft_proj_layer, epochs=cfg.epochs,
                   steps=run.step, train_seconds=round(run.record["time"]), world_size=run.world,
                   device=run.device.type, config=dataclasses.asdict(cfg))
    run.finish(results)
    run.log(f"{shown(top)} with {len(indices)} labels")
    return results


def main(argv=None):
    run_cli("finetune.py", lambda: train(*resolve_config(argv)))


if __name__ == "__main__":
    main()
