"""Self-training / distillation with unlabeled data: SimCLRv2's third step (Sec. 2, Eq. 2 and 3).

The fine-tuned network (finetune.py) is a fixed teacher: frozen, in inference mode. It labels
every training image, without using the image's label, and a student without projection head
(encoder + linear classifier) learns to match the teacher's softmax at temperature tau:

    Eq. 2   L_distill = - sum_x sum_y P_T(y|x; tau) log P_S(y|x; tau)
    Eq. 3   L = (1 - alpha) * CE(labels on the labelled subset) + alpha * L_distill

Teacher and student see the same augmented image. The student has the teacher's architecture by
default (self-distillation) or a smaller one via --arch / --width-multiplier (big-to-small).

    python distill.py --teacher runs/finetune-cifar10-1pct-.../finetuned.pt
    python distill.py --teacher runs/.../finetuned.pt --width-multiplier 0.5      # smaller student
    python distill.py --teacher runs/.../finetuned.pt --alpha 0.5 --label-fraction 0.1   # Eq. 3
    torchrun --nproc_per_node=8 distill.py --teacher runs/.../finetuned.pt --batch-size 1024

Settings follow the authors' distillation notebook: LARS, lr 2.0 with cosine decay (used as
given, not scaled with the batch: --lr-scaling none), momentum 0.9, weight decay 1e-4 (not on
BatchNorm and biases), crop + flip, temperature 1. The batch (256) and epochs (100) are our
choice for CIFAR-10. Written to --out-dir: student.pt (the pretraining-checkpoint format, so
linear_eval.py and finetune.py --ft-proj-layer 0 load it; the classifier is under "classifier"),
results.json (teacher and student top-1/top-5 on the evaluation split) and log.jsonl.
Measured on a 2-core CPU (RESULTS.md): a ResNet-18 w0.25 student distilled for 4 epochs (16
minutes) from a teacher fine-tuned on 1% of the CIFAR-10 labels reaches 44.3% top-1, the
teacher 43.9% (two seeds: 44.3%, 44.2%); with Eq. 3 on the teacher's 500 labels (--alpha 0.5)
46.0%.
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

from cli import (Progress, Run, UserError, console, continue_run, git_revision, load_checkpoint,
                 load_model_state, opt, parse_config, per_process_batch, precision_for,
                 prepare_out_dir, restore_random_state, run_cli, setup)
from data import (ResumableSampler, ViewLoader, build_augmentation, check_same_classes,
                  default_workers, evaluation_split, load_split, select, unreadable_images)
from finetune import (build_classifier, build_finetune_optimizer, choose_labeled, epoch_totals,
                      evaluate, image_names, load_finetuned, set_lr)
from pretrain import build_model, convert_to_global_bn, learning_rate, scaled_lr
from resnet import ARCHS

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    teacher: str = opt("", "fine-tuned checkpoint (finetune.py's finetuned.pt), the fixed teacher")
    # data
    dataset: str = opt("", "which data (default: the teacher's)",
                       ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_dir: str = opt("", "dataset root (default: the teacher's)")
    out_dir: str = opt("", "where student.pt and results.json go "
                       "(default runs/distill-<dataset>-<digest of the configuration>); the same "
                       "command continues the run in it", changeable=True)
    workers: int = opt(-1, "data-loading processes per GPU (-1: CPU cores per process, at most 8)",
                       min=-1, changeable=True)
    resume: str = opt("", "student.pt to continue (the same command continues its --out-dir "
                      "without it); its configuration is used, with the flags given here on top",
                      changeable=True)
    # student (v2 Sec. 2: self-distillation or big-to-small)
    arch: str = opt("", "student encoder (default: the teacher's)", list(ARCHS))
    width_multiplier: float = opt(0.0, "student width (0: the teacher's)", min=0)
    sk_ratio: float = opt(-1.0, "student selective kernels (-1: the teacher's)", min=-1)
    unlabeled_dir: str = opt("", "the unlabeled images of Eq. 2: every image under this folder, "
                             "at any depth (default: the training images of --data-dir)")
    val_fraction: float = opt(0.0, "evaluate on this class-balanced fraction of the training "
                              "images, held out (default: the teacher's, on its data)",
                              min=0, below=1)
    val_dir: str = opt("", "the evaluation images (<class>/<image>) instead of <data-dir>/val "
                       "(default: the teacher's, on its data)")
    init: str = opt("", "a pretraining-format checkpoint (pretrain.py or a student) whose encoder "
                    "starts the student; default: random initialisation")
    # loss (Eq. 2 and 3)
    temperature: float = opt(1.0, "tau of both softmaxes in Eq. 2", above=0)
    alpha: float = opt(1.0, "weight of the distillation term in Eq. 3; 1: Eq. 2 alone, no labels",
                       min=0, max=1)
    label_fraction: float = opt(0.0, "with --alpha < 1: fraction of each class's labels for the "
                                "supervised term (as finetune.py)", min=0, max=1)
    subset_file: str = opt("", "with --alpha < 1: labelled images, one per line (as finetune.py)")
    seed: int = opt(0, "random seed: labelled subset, initialisation, data order")
    # optimisation (the authors' distillation notebook)
    batch_size: int = opt(256, "global batch size in unlabeled images (our choice)", min=2)
    epochs: int = opt(100, "epochs over the unlabeled images (our choice for CIFAR-10)", min=1)
    optimizer: str = opt("lars", "LARS as the authors (the classifier gets momentum SGD, as in "
                         "finetune.py)", ["lars", "sgd", "adam"])
    lr: float = opt(2.0, "peak learning rate, scaled by --lr-scaling; cosine decay to 0", above=0)
    lr_scaling: str = opt("none", "none: lr as given (the notebook's value); linear: lr x B/256; "
                          "sqrt: lr x sqrt(B)", ["none", "linear", "sqrt"])
    weight_decay: float = opt(1e-4, "L2 weight decay, not on biases and BatchNorm parameters",
                              min=0)
    momentum: float = opt(0.9, "momentum of LARS and SGD", min=0, below=1)
    warmup_epochs: float = opt(0.0, "linear warmup from 0, then cosine decay to 0", min=0)
    global_bn: bool = opt(True, "the student's BatchNorm statistics over the global batch under "
                          "torchrun")
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
    eval_every: int = opt(0, "student top-1 every this many epochs; 0: at the end", min=0,
                          changeable=True)


def resolve_config(argv):
    """Flags over the teacher's dataset (or, with --resume, over the interrupted run's
    configuration); returns (config, teacher, teacher checkpoint, resumed checkpoint or None)."""
    cfg, given = parse_config(DistillConfig, argv, None, __doc__.splitlines()[0])
    stored, resume = (lambda ckpt: ckpt["distill_config"]), None
    if cfg.resume:
        cfg, resume = continue_run(DistillConfig, cfg, given, "student", "", stored)
    if not cfg.teacher:
        raise UserError("--teacher is required (a finetuned.pt written by finetune.py)")
    teacher, ckpt = load_finetuned(cfg.teacher)
    tc = ckpt["config"]
    cfg.dataset = cfg.dataset or tc["dataset"]
    cfg.data_dir = cfg.data_dir or (tc["data_dir"] if cfg.dataset == tc["dataset"] else "")
    for name, value in evaluation_split(given, tc, cfg.data_dir == tc["data_dir"]).items():
        setattr(cfg, name, value)
    if not cfg.data_dir:
        raise UserError(f"--data-dir is needed: distilling on {cfg.dataset}, the teacher was "
                        f"fine-tuned on {tc['dataset']}")
    pre = tc["pretrain"]
    cfg.arch = cfg.arch or pre["arch"]
    cfg.width_multiplier = cfg.width_multiplier or pre["width_multiplier"]
    cfg.sk_ratio = pre["sk_ratio"] if cfg.sk_ratio < 0 else cfg.sk_ratio
    with_labels = bool(cfg.subset_file) or cfg.label_fraction > 0
    if cfg.alpha < 1 and not with_labels:
        raise UserError(f"--alpha {cfg.alpha} mixes in the supervised loss of Eq. 3: give "
                        f"--label-fraction or --subset-file")
    if cfg.alpha == 1 and with_labels:
        raise UserError("labels are unused with --alpha 1 (Eq. 2 alone); set --alpha < 1")
    if resume is None:
        cfg, resume = continue_run(DistillConfig, cfg, given, "student", f"distill-{cfg.dataset}",
                                   stored)
    return cfg, teacher, ckpt, resume


class LabelledDraws(torch.utils.data.Sampler):
    """Eq. 3's labelled batches: `count` indices into the n labelled images per epoch, drawn with
    replacement from a generator seeded by (seed, epoch), so a run resumed mid-epoch (start:
    the draws already used, ResumableSampler's interface) continues them exactly."""

    start = 0

    def __init__(self, n, count, seed):
        self.n, self.count, self.seed, self.epoch = n, count, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.count - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randint(self.n, (self.count,), generator=generator)[self.start:].tolist())


# ---------------------------------------------------------------------------------------------
# Model: the student, an encoder and a linear classifier (no projection head)
# ---------------------------------------------------------------------------------------------


def student_config(cfg, teacher_pretrain_config):
    """The student as a pretraining configuration with no projection head, so that build_model
    (and with it linear_eval.py and finetune.py) reads the student checkpoint."""
    return dict(teacher_pretrain_config, dataset=cfg.dataset, data_dir=cfg.data_dir,
                arch=cfg.arch, width_multiplier=cfg.width_multiplier, sk_ratio=cfg.sk_ratio,
                proj_head="none")


def build_student(config, num_classes, init=""):
    """Encoder + classifier; the encoder optionally from a pretraining-format checkpoint."""
    student = build_classifier(config, num_classes, 0)
    if init:
        ckpt = load_checkpoint(init, ("pretrain", "converted", "student"), "--init")
        source = build_model(ckpt["config"], ckpt["model"], init)
        load_model_state(student.encoder, source.encoder.state_dict(), init)
    return student


# ---------------------------------------------------------------------------------------------
# Loss: Eq. 2 and Eq. 3
# ---------------------------------------------------------------------------------------------


def distillation_loss(student_logits, teacher_logits, temperature=1.0):
    """Eq. 2, averaged over the batch: -sum_y P_T(y|x; tau) log P_S(y|x; tau).

    Its gradient with respect to the student's logits is (P_S - P_T) / tau / batch: zero when
    the student's logits equal the teacher's. Computed in float32 (bf16 logits are upcast).
    """
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=1)  # b x classes
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)  # b x classes
    return -(p_teacher * log_p_student).sum(dim=1).mean()


def semi_supervised_loss(student_logits, teacher_logits, temperature, alpha,
                         labeled_logits=None, labels=None):
    """Eq. 3: (1 - alpha) * CE(student, labels) + alpha * Eq. 2, each term a mean over its own
    batch (the paper writes sums over the labelled and the unlabeled set). The supervised term
    is at temperature 1. alpha = 1 (no labels) is Eq. 2 alone."""
    loss = alpha * distillation_loss(student_logits, teacher_logits, temperature)
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(labeled_logits.float(), labels)
    return loss


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg, teacher, teacher_ckpt, resume):
    device, rank, world = setup(cfg.device)
    main = rank == 0
    log = console(main)
    local_batch = per_process_batch(cfg.batch_size, world)
    precision, autocast, why = precision_for(cfg.precision, device)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(world)
    out_dir = Path(cfg.out_dir)  # continue_run's choice
    pre = teacher_ckpt["config"]["pretrain"]
    num_classes = teacher_ckpt["config"]["num_classes"]

    # Data: every training image, its label ignored; crop + flip, one view for both networks
    size = pre["image_size"]
    split = lambda name, views=0: load_split(cfg.dataset, cfg.data_dir, name, size, device, workers,
                                             views, log, True, cfg.val_fraction, cfg.val_dir)
    augment = build_augmentation(size)
    val_set = split("val")
    unlabeled = (load_split("folder", cfg.unlabeled_dir, "pretrain", size, device, workers, 1, log,
                            held_out=val_set)  # never the evaluation images
                 if cfg.unlabeled_dir else split("pretrain", 1))  # labels, if any, unused
    if len(val_set.classes) != num_classes:
        raise UserError(f"the teacher has {num_classes} classes, {cfg.dataset} "
                        f"{len(val_set.classes)}")
    steps_per_epoch = len(unlabeled) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(unlabeled)} unlabeled images are fewer than one batch of "
                        f"{cfg.batch_size}: lower --batch-size to at most {len(unlabeled)}")
    total_steps = cfg.epochs * steps_per_epoch
    step = resume["step"] if resume else 0
    sampler = ResumableSampler(unlabeled, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = ViewLoader(unlabeled, sampler, local_batch, [augment], device, workers)
    labeled_loader = draws = None
    if cfg.alpha < 1:  # Eq. 3: a labelled batch beside every unlabeled one, drawn with replacement
        train_set = split("train", views=1)
        check_same_classes(train_set, val_set)
        indices = choose_labeled(cfg, train_set, log)
        draws = LabelledDraws(len(indices), steps_per_epoch * local_batch, cfg.seed + 1000 * rank)
        labeled_loader = ViewLoader(select(train_set, indices), draws, local_batch, [augment],
                                    device, workers)

    # Models: the frozen teacher, the student (encoder + classifier)
    teacher = teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the same fresh student on every process
    config = student_config(cfg, pre)
    raw_student = build_student(config, num_classes, cfg.init).to(device, memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed + rank)  # processes differ in augmentation
    peak_lr = cfg.lr if cfg.lr_scaling == "none" else scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    optimizers = build_finetune_optimizer(raw_student, cfg.optimizer, peak_lr, cfg.weight_decay,
                                          cfg.momentum)
    history = []
    if resume:
        load_model_state(raw_student, {**resume["model"], **{
            "fc." + k: v for k, v in resume["classifier"].items()}}, cfg.resume)
        for optimizer, state in zip(optimizers, resume["optimizers"]):
            optimizer.load_state_dict(state)
        history = resume["history"]
        restore_random_state(resume["rng"], device)
    student = raw_student
    if dist.is_initialized():  # under torchrun, even with one process
        if cfg.global_bn:
            student = convert_to_global_bn(student)
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device] if device.type == "cuda" else None)
    if main:  # made once every check has passed: a failed start leaves no folder behind
        prepare_out_dir(out_dir)
        if cfg.alpha < 1:
            (out_dir / "subset.txt").write_text("\n".join(image_names(train_set, indices)) + "\n")

    log(f"git {git_revision() or '-'} | {world} process(es) on {device.type} | {precision} ({why}) | "
        f"teacher {pre['arch']} x{pre['width_multiplier']:g} | student {cfg.arch} "
        f"x{cfg.width_multiplier:g} ({'from ' + cfg.init if cfg.init else 'random init'}) | "
        f"{sum(p.numel() for p in raw_student.parameters()) / 1e6:.2f}M student parameters")
    log("config " + json.dumps(dataclasses.asdict(cfg)))
    teacher_top1, teacher_top5 = evaluate(teacher, val_set, size, 256, device, workers, log)
    log(f"teacher: top-1 {teacher_top1:.2f}% top-5 {teacher_top5:.2f}%")
    log(f"{len(unlabeled)} unlabeled images, {steps_per_epoch} steps/epoch of {cfg.batch_size}, "
        f"{total_steps} steps, peak lr {peak_lr:.4g}, tau {cfg.temperature:g}, alpha "
        f"{cfg.alpha:g}, out {out_dir}")

    run = Run(out_dir, "student.pt", device, cfg.checkpoint_every, step)
    sums = torch.zeros(3, device=device)  # this epoch's loss, student-teacher agreement, non-finite
    if resume and "epoch_sums" in resume:
        sums += resume["epoch_sums"].to(device)

    def state(results=None):
        """student.pt in the pretraining-checkpoint format (model: encoder.* only, config:
        build_model's), the classifier under its own key, and what continuing needs."""
        weights = raw_student.state_dict()
        return dict(model={k: v for k, v in weights.items() if k.startswith("encoder.")},
                    classifier={k[len("fc."):]: v for k, v in weights.items() if k.startswith("fc.")},
                    config=config, num_classes=num_classes, classes=list(val_set.classes),
                    teacher=cfg.teacher, distill_config=dataclasses.asdict(cfg),
                    epoch=step // steps_per_epoch, step=step, results=results,
                    finished=results is not None, history=history, epoch_sums=sums.cpu(),
                    optimizers=[o.state_dict() for o in optimizers])

    student.train()
    progress = Progress(log, "step", total_steps, cfg.batch_size, every=cfg.log_every, start=step)
    t_start = time.time()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        for s in (sampler, draws) if draws else (sampler,):
            s.set_epoch(epoch)
            s.start = (step % steps_per_epoch) * local_batch
        labeled_batches = iter(labeled_loader) if labeled_loader else None
        for (x,), _ in loader:  # the labels of the unlabeled images are never used
            lr = learning_rate(step, total_steps, round(cfg.warmup_epochs * steps_per_epoch), peak_lr)
            set_lr(optimizers, lr)
            with torch.no_grad(), autocast:
                teacher_logits = teacher(x).float()  # b x classes, inference mode
            labels, inputs = None, x
            if labeled_batches is not None:
                (x_l,), labels = next(labeled_batches)
                inputs = torch.cat([x, x_l])  # (b + b_l) x 3 x H x W
            with autocast:
                logits = student(inputs).float()  # BN statistics over both batches
            loss = semi_supervised_loss(logits[:len(x)], teacher_logits, cfg.temperature,
                                        cfg.alpha, logits[len(x):], labels)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            step += 1
            agree = (logits[:len(x)].argmax(1) == teacher_logits.argmax(1)).float().mean()
            sums += torch.stack([loss.detach(), agree, (~torch.isfinite(loss.detach())).float()])
            if progress.due(step):
                progress.show(step, f"epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.4f} "
                                    f"agreement {100 * agree.item():.1f}% lr {lr:.4g}")
            stopping, saving = run.poll()
            if step % steps_per_epoch and (stopping or saving):  # in mid-epoch: no record
                epoch_totals(sums, world, epoch)
                run.save(state())
                if stopping:
                    return run.stopped(step, log)

        # end of epoch: the record (with the evaluation when due), then the checkpoint
        totals = epoch_totals(sums, world, epoch) / (world * steps_per_epoch)  # means of steps
        record = dict(epoch=epoch + 1, step=step, loss=totals[0].item(),
                      agreement=100 * totals[1].item(), lr=lr, time=time.time() - t_start)
        sums.zero_()
        record.update(unreadable_images(unlabeled, device, log))
        if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or epoch + 1 == cfg.epochs:
            record["top1"], record["top5"] = evaluate(raw_student, val_set, size, 256, device,
                                                      workers, log)
            log(f"epoch {epoch + 1}: student top-1 {record['top1']:.2f}% top-5 "
                f"{record['top5']:.2f}% (teacher {teacher_top1:.2f}%)")
        history.append(record)
        run.record(record)
        if epoch + 1 < cfg.epochs:
            run.save(state())
            if stopping:
                return run.stopped(step, log)

    results = dict(teacher_top1=teacher_top1, teacher_top5=teacher_top5,
                   student_top1=history[-1]["top1"], student_top5=history[-1]["top5"],
                   agreement=history[-1]["agreement"], teacher=cfg.teacher, init=cfg.init,
                   unlabeled_images=len(unlabeled), epochs=cfg.epochs, steps=step,
                   train_seconds=round(time.time() - t_start), world_size=world,
                   device=device.type, git=git_revision(), config=dataclasses.asdict(cfg))
    run.save(state(results))
    if main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done in {datetime.timedelta(seconds=round(time.time() - t_start))}: student top-1 "
        f"{results['student_top1']:.2f}% top-5 {results['student_top5']:.2f}%, teacher "
        f"{teacher_top1:.2f}% / {teacher_top5:.2f}%; {run.path}")
    return results


def main(argv=None):
    run_cli("distill.py", lambda: train(*resolve_config(argv)))


if __name__ == "__main__":
    main()
