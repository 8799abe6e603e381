"""Self-training / distillation with unlabeled data: SimCLRv2's third step (Sec. 2, Eq. 2 and 3).

The fine-tuned network (finetune.py) is a fixed teacher, in inference mode, whose softmax at
temperature tau on every training image (its label unused) a student (encoder + classifier) learns:

    Eq. 2   L_distill = - sum_x sum_y P_T(y|x; tau) log P_S(y|x; tau)
    Eq. 3   L = (1 - alpha) * CE(labels on the labelled subset) + alpha * L_distill

Both see the same augmented image. The student has the teacher's architecture (self-
distillation) or a smaller one via --arch / --width-multiplier (big-to-small).

    python distill.py --teacher runs/finetune-cifar10-1pct-.../finetuned.pt
    python distill.py --teacher runs/.../finetuned.pt --width-multiplier 0.5      # smaller student
    python distill.py --teacher runs/.../finetuned.pt --alpha 0.5 --label-fraction 0.1   # Eq. 3
    torchrun --nproc_per_node=8 distill.py --teacher runs/.../finetuned.pt --batch-size 1024

Settings follow the authors' distillation notebook: LARS, lr 2.0 unscaled, cosine decay, weight
decay 1e-4, crop + flip, temperature 1; B 256 and 100 epochs are our choice for CIFAR-10. Written
to --out-dir: student.pt (the pretraining format, which linear_eval.py and finetune.py load),
results.json, subset.txt (Eq. 3's labels) and log.jsonl. RESULTS.md has what it measured.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import (ResumableSampler, ViewLoader, build_augmentation, check_same_classes,
                  choose_labeled, load_split, save_subset, select, stage_data, subset_is_ours)
from evaluation import evaluate, shown
from model import build_classifier, build_classifier_optimizers, build_model, finetuned_classifier, \
    learning_rate, load_state, scaled_lr
from resnet import ARCHS
from runs import (Run, Training, UserError, as_user_error, continue_run, fingerprint,
                  load_checkpoint, opt, parse_config, run_cli)

# --- Configuration ---------------------------------------------------------------------------


@dataclass
class DistillConfig(Training):
    """distill.py's options (runs.Training adds the run's: --out-dir, --resume, ...)."""
    WRITES = ("writes, in --out-dir: student.pt (the previous one kept as student.prev.pt), "
              "log.jsonl, results.json, and with --alpha < 1 subset.txt (the labelled images)")
    teacher: str = opt("", "fine-tuned checkpoint (finetune.py's finetuned.pt), the fixed teacher",
                       path=True)
    # data
    dataset: str = opt("", "which data (default: the teacher's)",
                       ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_dir: str = opt("", "dataset root (default: the teacher's)", path=True)
    # student (v2 Sec. 2: self-distillation or big-to-small)
    arch: str = opt("", "student encoder (default: the teacher's)", list(ARCHS))
    width_multiplier: float = opt(0.0, "student width (0: the teacher's)", min=0)
    sk_ratio: float = opt(-1.0, "student selective kernels (-1: the teacher's)", min=-1)
    unlabeled_dir: str = opt("", "Eq. 2's unlabeled images: every image under this folder "
                             "(default: the training images of --data-dir)", path=True)
    val_fraction: float = opt(0.0, "evaluate on this class-balanced fraction of the training "
                              "images, held out (default: the teacher's, on its data)",
                              min=0, below=1)
    val_dir: str = opt("", "the evaluation images (<class>/<image>) instead of <data-dir>/val "
                       "(default: the teacher's, on its data)", path=True)
    init: str = opt("", "a pretraining-format checkpoint (pretrain.py or a student) whose encoder "
                    "starts the student; default: random initialisation", path=True)
    # loss (Eq. 2 and 3)
    temperature: float = opt(1.0, "tau of both softmaxes in Eq. 2", above=0)
    alpha: float = opt(1.0, "weight of the distillation term in Eq. 3; 1: Eq. 2 alone, no labels",
                       min=0, max=1)
    label_fraction: float = opt(0.0, "with --alpha < 1: fraction of each class's labels for the "
                                "supervised term (as finetune.py)", min=0, max=1)
    subset_file: str = opt("", "with --alpha < 1: labelled images, one per line (as finetune.py)",
                           path=True)
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
    # system
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
    ckpt = load_checkpoint(cfg.teacher, ("finetuned",), "--teacher")
    with as_user_error(cfg.teacher):
        teacher = finetuned_classifier(ckpt)
    tc = ckpt["config"]
    for name, value in stage_data({**given, "dataset": cfg.dataset, "data_dir": cfg.data_dir},
                                  tc).items():  # a continued run keeps its own data
        setattr(cfg, name, value)
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
    if resume is None:  # a run is of its teacher's weights (and --init's), not only of their paths
        given["inputs"] = cfg.inputs = {"teacher": fingerprint(ckpt), **(
            {"init": fingerprint(load_checkpoint(cfg.init, flag="--init"))} if cfg.init else {})}
        cfg, resume = continue_run(DistillConfig, cfg, given, "student", f"distill-{cfg.dataset}",
                                   stored, files={"subset.txt": subset_is_ours})
    return cfg, teacher, ckpt, resume


class LabelledDraws(torch.utils.data.Sampler):
    """Eq. 3's labelled batches: `count` indices into the n labelled images per epoch, drawn with
    replacement, seeded by (seed, epoch): a run resumed mid-epoch (start) continues them exactly."""

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


# --- Model: the student, an encoder and a linear classifier (no projection head) -------------


def student_config(cfg, teacher_pretrain_config):
    """The student as a pretraining configuration with no projection head, so that build_model
    (and with it linear_eval.py and finetune.py) reads the student checkpoint."""
    return dict(teacher_pretrain_config, dataset=cfg.dataset, data_dir=cfg.data_dir,
                arch=cfg.arch, width_multiplier=cfg.width_multiplier, sk_ratio=cfg.sk_ratio,
                proj_head="none")


def build_student(config, num_classes, init="", ckpt=None, path=""):
    """Encoder + classifier: from the checkpoint at path of the run it continues (ckpt), or with
    the encoder of a pretraining-format checkpoint (--init), or random."""
    student = build_classifier(config, num_classes, 0)
    if ckpt:  # student.pt: the encoder under "model", the classifier under "classifier"
        with as_user_error(path):
            load_state(student, {**ckpt["model"], **{"fc." + k: v for k, v in ckpt["classifier"].items()}})
    elif init:
        source = load_checkpoint(init, ("pretrain", "converted", "student"), "--init")
        with as_user_error(init):
            load_state(student.encoder, build_model(source["config"], source["model"]).encoder.state_dict())
    return student


# --- Loss: Eq. 2 and Eq. 3 -------------------------------------------------------------------


def distillation_loss(student_logits, teacher_logits, temperature=1.0):
    """Eq. 2, averaged over the batch in float32: -sum_y P_T(y|x; tau) log P_S(y|x; tau). Its
    gradient in the student's logits is (P_S - P_T) / tau / batch."""
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


# --- Training --------------------------------------------------------------------------------


def train(cfg, teacher, teacher_ckpt, ckpt):
    """Distil the teacher into a student as cfg says, or continue ckpt."""
    run = Run(cfg, ckpt, "student")  # device, processes, precision, workers (runs.py)
    pre, num_classes = teacher_ckpt["config"]["pretrain"], teacher_ckpt["config"]["num_classes"]
    size = pre["image_size"]
    val_set, unlabeled, train_set, indices = load_data(cfg, run, size, teacher_ckpt["config"])
    steps_per_epoch = run.schedule(len(unlabeled), "unlabeled images")
    augment = build_augmentation(size)  # crop + flip, one view for both networks
    samplers = [ResumableSampler(unlabeled, run.world, run.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)]
    loader = ViewLoader(unlabeled, samplers[0], run.local_batch, [augment], run.device, run.workers)
    if indices:  # Eq. 3: a labelled batch beside every unlabeled one, drawn with replacement
        samplers.append(LabelledDraws(len(indices), steps_per_epoch * run.local_batch,
                                      cfg.seed + 1000 * run.rank))
        labeled_loader = ViewLoader(select(train_set, indices), samplers[1], run.local_batch,
                                    [augment], run.device, run.workers)

    teacher = teacher.to(run.device, memory_format=torch.channels_last).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the same fresh student on every process
    config = student_config(cfg, pre)
    model = build_student(config, num_classes, cfg.init, ckpt, cfg.resume).to(run.device)
    torch.manual_seed(cfg.seed + run.rank)  # processes differ in augmentation
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    optimizers = build_classifier_optimizers(model, cfg.optimizer, peak_lr, cfg.weight_decay,
                                             cfg.momentum)
    student = run.start(model, optimizers, lambda: student_state(model, config, val_set, cfg),
                        samplers, loader, describe(cfg, pre, model),
                        f"peak lr {peak_lr:.4g}, tau {cfg.temperature:g}, alpha {cfg.alpha:g}")
    if run.main and indices:
        save_subset(run.out_dir / "subset.txt", train_set, indices)
    teacher_top = evaluate(teacher, val_set, size, 256, run.device, run.workers, run.log,
                           run.autocast)
    run.log(f"teacher: {shown(teacher_top)}")

    for epoch in run.epochs():
        labeled_batches = iter(labeled_loader) if indices else None
        for (x,), _ in loader:  # the labels of the unlabeled images are never used
            run.set_lr(learning_rate(run.step, run.total_steps, warmup_steps, peak_lr))
            with torch.no_grad(), run.autocast:
                teacher_logits = teacher(x).float()  # b x classes, inference mode
            inputs, labels = x, None
            if labeled_batches:
                (x_l,), labels = next(labeled_batches)
                inputs = torch.cat([x, x_l])  # (b + b_l) x 3 x H x W
            with run.autocast:
                logits = student(inputs).float()  # BN statistics over both batches
            loss = semi_supervised_loss(logits[:len(x)], teacher_logits, cfg.temperature, cfg.alpha,
                                        logits[len(x):], labels)
            run.optimize(loss)
            agree = (logits[:len(x)].argmax(1) == teacher_logits.argmax(1)).float().mean()
            run.step_done(loss=loss, agreement=100 * agree)
        top = {}
        if run.evaluation_due():
            top = evaluate(model, val_set, size, 256, run.device, run.workers, run.log, run.autocast)
            run.log(f"epoch {epoch + 1}: student {shown(top)} (teacher {shown(teacher_top)})")
        run.epoch_done(**top)  # the record, then the checkpoint

    results = dict(**{f"teacher_{k}": v for k, v in teacher_top.items()},
                   **{f"student_{k}": v for k, v in top.items()}, agreement=run.record["agreement"], teacher=cfg.teacher, init=cfg.init,
                   unlabeled_images=len(unlabeled), epochs=cfg.epochs, steps=run.step,
                   train_seconds=round(run.record["time"]), world_size=run.world,
                   device=run.device.type, config=dataclasses.asdict(cfg))
    run.finish(results)
    run.log(f"student {shown(top)}, teacher {shown(teacher_top)}")
    return results


def load_data(cfg, run, size, teacher):
    """(the evaluation split, the unlabeled images of Eq. 2, and for Eq. 3 the labelled training
    split and the indices of its labelled images, else None, []). The evaluation split must name
    the teacher's classes (teacher: its configuration), or its logits would be read as others."""
    split = lambda name, views=0: load_split(cfg.dataset, cfg.data_dir, name, size, run.device,
                                             run.workers, views, run.log, True, cfg.val_fraction,
                                             cfg.val_dir, decode_on=cfg.decode)
    val_set = split("val")
    classes, theirs = list(val_set.classes), teacher.get("classes") or []  # converted: no names
    if len(classes) != teacher["num_classes"] or (theirs and classes != list(theirs)):
        raise UserError(f"the teacher was fine-tuned on {teacher['num_classes']} classes "
                        f"({', '.join(theirs[:4]) or 'names unknown'}{' ...' if len(theirs) > 4 else ''}),"
                        f" the evaluation images have {len(classes)} ({', '.join(classes[:4])}"
                        f"{' ...' if len(classes) > 4 else ''}): its answers would be read as "
                        f"other classes")
    unlabeled = (load_split("folder", cfg.unlabeled_dir, "pretrain", size, run.device, run.workers,
                            1, run.log, held_out=val_set, decode_on=cfg.decode)  # never val's
                 if cfg.unlabeled_dir else split("pretrain", 1))  # labels, if any, unused
    if cfg.alpha == 1:
        return val_set, unlabeled, None, []
    train_set = split("train", views=1)
    check_same_classes(train_set, val_set)
    return val_set, unlabeled, train_set, choose_labeled(cfg, train_set, run.log)


def describe(cfg, pre, model):
    """The start line's networks: the teacher's, and the student's with its initialisation."""
    return (f"teacher {pre['arch']} x{pre['width_multiplier']:g} | student {cfg.arch} "
            f"x{cfg.width_multiplier:g} ({'from ' + cfg.init if cfg.init else 'random init'}) | "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M student parameters")


def student_state(model, config, val_set, cfg):
    """student.pt in the pretraining-checkpoint format (model: encoder.* only, config:
    build_model's), the classifier under its own key, and what continuing needs."""
    weights = model.state_dict()
    return dict(model={k: v for k, v in weights.items() if k.startswith("encoder.")},
                classifier={k[len("fc."):]: v for k, v in weights.items() if k.startswith("fc.")},
                config=config, num_classes=model.fc.out_features, classes=list(val_set.classes),
                teacher=cfg.teacher, distill_config=dataclasses.asdict(cfg))


def main(argv=None):
    run_cli("distill.py", lambda: train(*resolve_config(argv)))


if __name__ == "__main__":
    main()
