"""The papers' ablations, reproduced in miniature by this code: do SimCLR's findings come out of it?

Each experiment (EXPERIMENTS) is a list of runs that differ from one base recipe in one knob,
named after the table or figure it repeats. A run is pretrain.py, then linear_eval.py or
finetune.py, each a subprocess whose exact command is recorded; every finished run appends a
record (commands, seed, scale, git revision, hardware and load, wall times, metrics) to
<out>/records.jsonl. Runs shared by experiments are trained once. The same command skips what is
finished and continues an interrupted run; Ctrl-C stops the current script with a checkpoint.

    python reproduce.py --scale cpu --data-dir data/cifar10 --only base --seeds 4   # the noise
    python reproduce.py --scale cpu --data-dir data/cifar10             # every experiment, hours
    python reproduce.py --scale gpu --data-dir data/cifar10 --only table5,fig5
    python reproduce.py --scale cpu --dry-run                           # the commands, nothing run
    python reproduce.py --report --update RESULTS.md                    # tables from the records

Scales: SCALES below. --report writes, per experiment, the paper's value and ours (mean and
spread over seeds) and whether the paper's order holds at this scale (a difference within the
base recipe's spread over seeds is a tie). RESULTS.md holds what the sweep measured.
"""
import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from runs import UserError, Parser, git_revision, run_cli

ROOT = Path(__file__).parent

# --- Scales: the base recipe and the evaluations, as flags of the scripts --------------------


@dataclass
class Scale:
    about: str
    pretrain: list  # the base recipe: pretrain.py's flags (data flags added from --data-dir)
    linear: list  # linear_eval.py's flags
    finetune: dict  # label fraction -> finetune.py's flags
    dataset: str = "cifar10"
    data_dir: str = ""  # the default --data-dir
    lr: float = 1.0  # the base recipe's --lr (Fig. 9 scales it)
    batch_size: int = 256  # and its --batch-size


SCALES = {
    "smoke": Scale(
        "a tiny image folder and a ResNet-18 at 1/8 width: seconds per run, for the tests",
        ["--arch", "resnet18", "--width-multiplier", "0.125", "--image-size", "32",
         "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0"],
        ["--cached-features", "--epochs", "2", "--knn", "5", "--batch-size", "16", "--workers", "0"],
        {0.01: ["--epochs", "1", "--batch-size", "2", "--workers", "0"],
         0.1: ["--epochs", "1", "--batch-size", "2", "--workers", "0"]},
        dataset="folder", batch_size=16),
    "cpu": Scale(
        "CIFAR-10, ResNet-18 at 1/4 width (0.7M parameters), B 256, 2 epochs with 0.2 of warmup, "
        "--precision auto (bf16 autocast on CPUs with native bf16: 1.3-1.9x fp32's speed); linear "
        "layer on cached features (100 epochs) and kNN (k 200); fine-tuning 60 epochs on 1% of "
        "the labels, 10 on 10%: 10 to 30 minutes per run on one core",
        ["--width-multiplier", "0.25", "--batch-size", "256", "--epochs", "2",
         "--warmup-epochs", "0.2", "--workers", "1"],
        ["--cached-features", "--knn", "200", "--workers", "1"],
        {0.01: ["--epochs", "60", "--workers", "1"],
         0.1: ["--epochs", "10", "--workers", "1"]},
        data_dir="data/cifar10"),
    "laptop": Scale(
        "CIFAR-10 on a laptop: the README's first laptop recipe (ResNet-18 at 1/4 width, B 256, "
        "10 epochs, 1 of warmup); the clock rows change it to fit 30 minutes on 2 cores, "
        "pretraining and evaluation together; linear layer on cached features and kNN (k 200)",
        ["--width-multiplier", "0.25", "--batch-size", "256", "--epochs", "10",
         "--warmup-epochs", "1"],
        ["--cached-features", "--knn", "200"],
        {0.01: ["--epochs", "60"], 0.1: ["--epochs", "10"]},
        data_dir="data/cifar10"),
    "gpu": Scale(
        "CIFAR-10, ResNet-18 at full width, B 512, 100 epochs (the authors' CIFAR recipe, "
        "shortened); linear layer on cached features and kNN; fine-tuning as the v2 paper "
        "(60 epochs on 1%, 30 on 10%)",
        ["--batch-size", "512", "--epochs", "100"],
        ["--cached-features", "--knn", "200"],
        {0.01: [], 0.1: []},
        data_dir="data/cifar10", batch_size=512),
    "paper": Scale(
        "ImageNet, ResNet-50, B 4096, 100 epochs, LARS lr 4.8, tau 0.1, colour 1.0 with blur "
        "(the v1 ablations' settings); the paper's linear evaluation (90 augmented epochs); "
        "fine-tuning on the authors' 1% / 10% lists",
        ["--temperature", "0.1"],
        [],
        {0.01: [], 0.1: []},
        dataset="imagenet", data_dir="/data/imagenet", lr=0.3, batch_size=4096),
}

# --- Runs and experiments --------------------------------------------------------------------

# Pretraining runs: name -> pretrain.py flags on top of the scale's base recipe. A run is trained
# once per seed, whatever the number of experiments that use it.
PRETRAIN = {
    "base": [],
    # v1 Fig. 5: both views randomly cropped, the transformation(s) on view 1 only
    "one-none": ["--one-branch", "--augment", "", "--no-blur"],
    "one-crop": ["--one-branch", "--augment", "crop", "--no-blur"],
    "one-color": ["--one-branch", "--augment", "color", "--no-blur"],
    "one-blur": ["--one-branch", "--augment", "", "--blur"],
    "one-crop-color": ["--one-branch", "--augment", "crop,color", "--no-blur"],
    "one-crop-blur": ["--one-branch", "--augment", "crop", "--blur"],
    "one-color-blur": ["--one-branch", "--augment", "color", "--blur"],
    # the symmetric composition: the same augmentation on both views
    "aug-none": ["--augment", "", "--no-blur"],
    "aug-crop": ["--augment", "crop", "--no-blur"],
    "aug-color": ["--augment", "color", "--no-blur"],
    "aug-crop-color-blur": ["--augment", "crop,color", "--blur"],
    # v1 Table 1: colour strength
    "strength-1/8": ["--color-strength", "0.125", "--no-blur"],
    "strength-1/4": ["--color-strength", "0.25", "--no-blur"],
    "strength-1/2": ["--color-strength", "0.5", "--no-blur"],
    "strength-1": ["--color-strength", "1.0", "--no-blur"],
    "strength-1-blur": ["--color-strength", "1.0", "--blur"],
    # v1 Fig. 8: projection head
    "head-none": ["--proj-head", "none"],
    "head-linear": ["--proj-head", "linear"],
    # v1 Table 5: temperature, l2 norm
    "tau-0.05": ["--temperature", "0.05"],
    "tau-0.1": ["--temperature", "0.1"],
    "tau-0.5": ["--temperature", "0.5"],
    "tau-1": ["--temperature", "1.0"],
    "no-l2-tau-10": ["--no-l2-norm", "--temperature", "10"],
    "no-l2-tau-100": ["--no-l2-norm", "--temperature", "100"],
    # v1 Table 4: losses
    "loss-nt-logistic": ["--loss", "nt-logistic"],
    "loss-nt-logistic-sh": ["--loss", "nt-logistic", "--semi-hard"],
    "loss-margin": ["--loss", "margin"],
    "loss-margin-sh": ["--loss", "margin", "--semi-hard"],
    # v2: head depth, memory
    "head-3": ["--proj-layers", "3"],
    "memory": ["--memory-size", "MEMORY"],
    # at tau 0.5 (the CIFAR recipe) the memory's K logits swamp the batch's; v2 ran it at 0.1
    "memory-tau-0.1": ["--memory-size", "MEMORY", "--temperature", "0.1"],
}
# v1 Fig. 9: batch size x lr scaling at equal epochs. sqrt uses the paper's pair (0.3 linear,
# 0.075 sqrt: equal at B 4096), i.e. the base lr / 4.
for _b in (128, 256, 512, 1024):
    PRETRAIN[f"batch-{_b}-linear"] = ["--batch-size", str(_b), "--lr-scaling", "linear"]
    PRETRAIN[f"batch-{_b}-sqrt"] = ["--batch-size", str(_b), "--lr-scaling", "sqrt", "--lr", "LR/4"]

# The laptop recipe tuned to the clock (--scale laptop): each run changes the README's first
# laptop recipe so that pretraining and evaluation fit 30 minutes on 2 cores, its epochs from
# bench.py's rate on 2 threads (RESULTS.md, "The laptop recipe").
PRETRAIN.update({
    "clock-b128-e18": ["--batch-size", "128", "--epochs", "18"],
    "clock-w0.5-b128-e8": ["--width-multiplier", "0.5", "--batch-size", "128", "--epochs", "8"],
    "clock-b128-e18-tau0.2": ["--batch-size", "128", "--epochs", "18", "--temperature", "0.2"],
    "clock-b128-e18-lr2": ["--batch-size", "128", "--epochs", "18", "--lr", "2.0"],
    "clock-b128-s24-e28": ["--batch-size", "128", "--epochs", "28", "--image-size", "24"],
    "clock-b128-s24-e30-lr2": ["--batch-size", "128", "--epochs", "30", "--image-size", "24",
                               "--lr", "2.0"],
    "clock-b128-s24-e30-lr2-fp32": ["--batch-size", "128", "--epochs", "30", "--image-size", "24",
                                    "--lr", "2.0", "--precision", "fp32"],
    # the recipe sized to the clock: the README's command as it is (no base recipe under it)
    "minutes-30": ["--minutes", "30"],
    "minutes-30-fp32": ["--minutes", "30", "--precision", "fp32"],
    # what --minutes 30 chooses on a CPU that makes 206 images/s in fp32 (a 2-core AMD EPYC of
    # Zen 1, AVX2 only): 5 epochs, warmup 5/30; its accuracy measured on any machine
    "minutes-30-at-206": ["--batch-size", "128", "--epochs", "5", "--image-size", "24",
                          "--lr", "2.0", "--warmup-epochs", str(5 / 30), "--precision", "fp32"],
})


@dataclass
class Row:
    label: str
    pretrain: str  # a PRETRAIN name
    paper: float = None  # the paper's value (top-1 %), None where it prints none
    evaluation: str = "linear"  # linear, linear-layer<K>, linear-random, linear-<S>px (at S px),
    # finetune-<fraction>-layer<K>
    below: str = None  # the row the paper ranks just above this one (default: by paper value)


@dataclass
class Experiment:
    title: str
    source: str  # where the paper says it
    rows: list
    finding: str
    extra: list = field(default_factory=list)  # further metrics to show: "contrast_acc", ...
    paper_extra: dict = field(default_factory=dict)  # label -> {metric: paper value}
    scale: str = ""  # the one scale it is defined at, empty: every scale


def head_depth_rows(fraction, three_layers, two_layer):
    """v2 Fig. 4 at one label fraction: the 3-layer head fine-tuned from each layer (the paper's
    values {layer: top-1}, in its order), then the 2-layer head (the paper's best middle layer,
    layer 1) with its layers 0 and 2, read against its layer 1."""
    rows = [Row(f"3 layers, from layer {k}" + (" (h)" if k == 0 else ""), "head-3", v,
                f"finetune-{fraction}-layer{k}") for k, v in three_layers.items()]
    rows.append(Row("2 layers, from layer 1", "base", two_layer, f"finetune-{fraction}-layer1",
                    below="3 layers, from layer 1"))
    return rows + [Row(f"2 layers, from layer {k}" + (" (h)" if k == 0 else ""), "base", None,
                       f"finetune-{fraction}-layer{k}", below="2 layers, from layer 1")
                   for k in (0, 2)]


EXPERIMENTS = {
    "base": Experiment(
        "The base recipe, over seeds", "the noise every comparison is read against",
        [Row("base recipe", "base"),
         Row("the same network untrained", "base", evaluation="linear-random", below="base recipe")],
        "The untrained row is what pretraining adds to: linear_eval.py --random-init.",
        ["contrast_acc", "entropy"]),
    "fig5": Experiment(
        "Augmentation pairs, one branch", "v1 Fig. 5 (ImageNet, linear top-1)",
        [Row("crop, colour", "one-crop-color", 56.3), Row("crop, blur", "one-crop-blur", 35.0),
         Row("crop", "one-crop", 33.1), Row("colour", "one-color", 18.8),
         Row("colour, blur", "one-color-blur", 16.5), Row("blur", "one-blur", 2.6),
         Row("none (both views the crop)", "one-none", below="blur")],
        "No single transformation suffices; crop then colour is by far the best pair."),
    "fig5-symmetric": Experiment(
        "Augmentation composed on both views", "v1 Sec. 3 (no table: the finding)",
        [Row("crop + colour + blur", "aug-crop-color-blur"),
         Row("crop + colour (base)", "base", below="crop + colour + blur"),
         Row("crop", "aug-crop", below="crop + colour (base)"),
         Row("colour", "aug-color", below="crop + colour (base)"),
         Row("none", "aug-none", below="crop")],
        "Composing crop and colour is what makes the task useful; blur adds a little."),
    "table1": Experiment(
        "Colour distortion strength", "v1 Table 1 (crop + flip + colour, ImageNet)",
        [Row("1 + blur", "strength-1-blur", 64.5), Row("1", "strength-1", 63.2),
         Row("1/2", "strength-1/2", 62.6), Row("1/4", "strength-1/4", 61.0),
         Row("1/8", "strength-1/8", 59.6)],
        "Stronger colour distortion helps contrastive learning (it hurts supervised models)."),
    "fig8": Experiment(
        "Projection head, and h vs z", "v1 Fig. 8 and Sec. 4.2 (z of 128 dimensions)",
        [Row("nonlinear, on h", "base", 64.0), Row("linear, on h", "head-linear", 60.7),
         Row("none, on h", "head-none", 50.1),
         Row("nonlinear, on z = g(h)", "base", evaluation="linear-layer2",
             below="nonlinear, on h")],
        "A nonlinear head beats a linear one (about 3%) and none (over 10%); h beats z by over "
        "10%. Paper values read off Fig. 8 at 128-d."),
    "table5": Experiment(
        "l2 norm and temperature", "v1 Table 5",
        [Row("l2, tau 0.1", "tau-0.1", 64.4), Row("l2, tau 0.5", "tau-0.5", 60.7),
         Row("l2, tau 0.05", "tau-0.05", 59.7), Row("l2, tau 1", "tau-1", 58.0),
         Row("no l2, tau 10", "no-l2-tau-10", 57.2), Row("no l2, tau 100", "no-l2-tau-100", 57.0)],
        "Without the l2 norm the contrastive task is easier (higher contrastive accuracy) and the "
        "representation worse; an intermediate temperature is best.",
        ["contrast_acc", "entropy"],
        {"l2, tau 0.05": dict(entropy=1.0, contrast_acc=90.5),
         "l2, tau 0.1": dict(entropy=4.5, contrast_acc=87.8),
         "l2, tau 0.5": dict(entropy=8.2, contrast_acc=68.2),
         "l2, tau 1": dict(entropy=8.3, contrast_acc=59.1),
         "no l2, tau 10": dict(entropy=0.5, contrast_acc=91.7),
         "no l2, tau 100": dict(entropy=0.5, contrast_acc=92.1)}),
    "fig9": Experiment(
        "Batch size and lr scaling, equal epochs", "v1 Fig. 9 / Table B.1, 100 epochs",
        [Row("1024, sqrt", "batch-1024-sqrt", 64.3), Row("512, sqrt", "batch-512-sqrt", 63.8),
         Row("1024, linear", "batch-1024-linear", 62.8), Row("256, sqrt", "batch-256-sqrt", 62.8),
         Row("512, linear", "batch-512-linear", 60.7), Row("256, linear", "batch-256-linear", 57.5),
         Row("128, sqrt", "batch-128-sqrt", below="256, sqrt"),
         Row("128, linear", "batch-128-linear", below="256, linear")],
        "Bigger batches help most when training is short; sqrt scaling helps small batches. The "
        "paper starts at 256: the 128 rows are only expected below 256."),
    "table4": Experiment(
        "Loss functions", "v1 Table 4 (formulas in Table 2)",
        [Row("NT-Xent", "base", 63.9), Row("NT-Logistic, semi-hard", "loss-nt-logistic-sh", 57.9),
         Row("margin triplet, semi-hard", "loss-margin-sh", 57.5),
         Row("NT-Logistic", "loss-nt-logistic", 51.6), Row("margin triplet", "loss-margin", 50.9)],
        "NT-Xent beats the others; semi-hard negative mining helps them. The paper tuned each "
        "loss; here they run at the base recipe's temperature and margin 0.5."),
    "v2-fig4-1pct": Experiment(
        "Head depth and the layer fine-tuned from, 1% of the labels", "v2 Fig. 4 (read off)",
        head_depth_rows(0.01, {1: 57.7, 2: 53.7, 3: 47.9, 0: 46.7}, two_layer=52.2),
        "With few labels, fine-tuning from the first layer of a deeper head beats fine-tuning "
        "from h. The 2-layer values are the paper's best middle layer."),
    "v2-fig4-10pct": Experiment(
        "Head depth and the layer fine-tuned from, 10% of the labels", "v2 Fig. 4 (read off)",
        head_depth_rows(0.1, {1: 68.4, 0: 66.4, 2: 66.1, 3: 64.6}, two_layer=66.6),
        "The gain of the middle layer shrinks as labels grow."),
    "v2-memory": Experiment(
        "The memory of negatives", "v2 Appendix D (Fig. D.1, R50 linear)",
        [Row("memory", "memory", 71.7), Row("no memory", "base", 71.1),
         Row("memory, tau 0.1", "memory-tau-0.1"),
         Row("no memory, tau 0.1", "tau-0.1", below="memory, tau 0.1")],
        "About +1% in linear evaluation (and in 1% fine-tuning), at the paper's tau 0.1; the "
        "tau 0.1 rows are ours (the CIFAR recipe's tau is 0.5)."),
    "clock": Experiment(
        "The laptop recipe tuned to the clock", "ours: 30 minutes on 2 cores, --scale laptop",
        [Row("B 128, 18 epochs", "clock-b128-e18"),
         Row("B 128, 18 epochs, evaluated at 40 px", "clock-b128-e18", evaluation="linear-40px"),
         Row("B 128, 18 epochs, evaluated at 48 px", "clock-b128-e18", evaluation="linear-48px"),
         Row("width 0.5, B 128, 8 epochs", "clock-w0.5-b128-e8"),
         Row("width 0.5, B 128, 8 epochs, evaluated at 48 px", "clock-w0.5-b128-e8",
             evaluation="linear-48px"),
         Row("B 128, 18 epochs, tau 0.2", "clock-b128-e18-tau0.2"),
         Row("B 128, 18 epochs, lr 2.0 x B/256", "clock-b128-e18-lr2"),
         Row("B 128, 18 epochs, lr 2.0 x B/256, evaluated at 48 px", "clock-b128-e18-lr2",
             evaluation="linear-48px"),
         Row("B 128, 24 px, 28 epochs", "clock-b128-s24-e28"),
         Row("B 128, 24 px, 28 epochs, evaluated at 32 px", "clock-b128-s24-e28", evaluation="linear-32px"),
         Row("B 128, 24 px, 28 epochs, evaluated at 40 px", "clock-b128-s24-e28", evaluation="linear-40px"),
         Row("B 128, 24 px, 30 epochs, lr 2.0 x B/256, evaluated at 32 px", "clock-b128-s24-e30-lr2",
             evaluation="linear-32px"),
         Row("B 128, 24 px, 30 epochs, lr 2.0 x B/256, evaluated at 36 px", "clock-b128-s24-e30-lr2",
             evaluation="linear-36px"),
         Row("B 128, 24 px, 30 epochs, lr 2.0 x B/256, evaluated at 40 px", "clock-b128-s24-e30-lr2",
             evaluation="linear-40px"),
         Row("B 128, 24 px, 30 epochs, lr 2.0 x B/256, evaluated at 48 px", "clock-b128-s24-e30-lr2",
             evaluation="linear-48px"),
         Row("README's first recipe: B 256, 10 epochs", "base")],
        "Each row changes the base recipe to fit 30 minutes of pretraining and evaluation on 2 "
        "cores (its epochs from bench.py's rate there); minutes, pretraining and evaluation, are "
        "the mean over a row's seeds: one core each, two runs at a time, but the recipe's seed 1, "
        "alone on 2 cores (the runs table).", ["minutes"], scale="laptop"),
    "laptop": Experiment(
        "The laptop recipe", "the README's, chosen by the clock search: 30 epochs",
        [Row("the README's recipe (bf16 where the CPU has it), evaluated at 40 px",
             "clock-b128-s24-e30-lr2", evaluation="linear-40px"),
         Row("the same, evaluated at 32 px (the paper's protocol)", "clock-b128-s24-e30-lr2",
             evaluation="linear-32px")],
        "Seed 0 ran in the search (one core, another run on the other); seed 1 alone on 2 cores, "
        "its time the recipe's: each run's minutes are in the runs table.", scale="laptop"),
    "laptop-fp32": Experiment(
        "The laptop recipe in fp32", "--precision fp32 against auto's bf16, on two seeds",
        [Row("fp32, evaluated at 40 px", "clock-b128-s24-e30-lr2-fp32", evaluation="linear-40px"),
         Row("fp32, evaluated at 32 px", "clock-b128-s24-e30-lr2-fp32", evaluation="linear-32px")],
        "The features for the evaluation are computed as --precision auto does (bf16 here).",
        ["minutes"], scale="laptop"),
    "minutes": Experiment(
        "The laptop command sized to 30 minutes", "pretrain.py --dataset cifar10 --minutes 30, "
        "then linear_eval.py at 40 px: the epochs the clock chose on the machine at hand",
        [Row("--minutes 30 (bf16 where the CPU has it), evaluated at 40 px", "minutes-30",
             evaluation="linear-40px"),
         Row("--minutes 30 --precision fp32, evaluated at 40 px", "minutes-30-fp32",
             evaluation="linear-40px"),
         Row("the 5 epochs --minutes 30 chooses at 206 images/s (Zen 1, fp32), at 40 px",
             "minutes-30-at-206", evaluation="linear-40px")],
        "Each run's minutes (pretraining and evaluation, from the command's start) and machine are "
        "in the runs table, the epochs the clock chose in the records.", ["minutes"],
        scale="laptop"),
}


# --- Commands --------------------------------------------------------------------------------


def pretrain_flags(scale, name, data_dir):
    """pretrain.py's flags for a run: data, the base recipe, the run's own knob."""
    s = SCALES[scale]
    if "--minutes" in PRETRAIN[name]:  # the laptop command sized to the clock, as a user types it
        return ["--dataset", s.dataset, "--data-dir", data_dir, *PRETRAIN[name]]
    base, own, i = list(s.pretrain), [], 0
    while i < len(PRETRAIN[name]):  # the run's value replaces the base recipe's, in place
        flag = PRETRAIN[name][i]
        if flag.startswith("--") and flag in base:
            base[base.index(flag) + 1] = PRETRAIN[name][i + 1]
            i += 1
        else:
            own.append(flag)
        i += 1
    flags = ["--dataset", s.dataset, "--data-dir", data_dir, *base]
    batch = int(own[own.index("--batch-size") + 1]) if "--batch-size" in own else s.batch_size
    for i, v in enumerate(own):
        if v == "LR/4":
            own[i] = f"{s.lr / 4:g}"
        elif v == "MEMORY":  # 16 batches of views (at least 4096): 65,536 is 16 of ImageNet's
            own[i] = str(max(4096, 16 * 2 * batch))
    return flags + own


def command(script, flags):
    return [sys.executable, script, *flags]


def shown(cmd):
    """A command as a user types it: `python script ...`, paths relative to the repository."""
    root = str(ROOT) + os.sep
    return shlex.join(["python", *(a.removeprefix(root) for a in cmd[1:])])


@dataclass
class Job:
    """One record to make: a pretraining run (shared) and one evaluation of it."""
    scale: str
    pretrain: str
    evaluation: str
    seed: int
    out: Path

    @property
    def key(self):
        return f"{self.scale}/{self.pretrain}/{self.evaluation}/seed{self.seed}"

    @property
    def run_dir(self):
        return self.out / "runs" / self.scale / f"{self.pretrain.replace('/', '_')}-seed{self.seed}"

    def pretrain_command(self, data_dir):
        flags = pretrain_flags(self.scale, self.pretrain, data_dir)
        return command("pretrain.py", [*flags, "--seed", str(self.seed), "--out-dir",
                                       str(self.run_dir)])

    def evaluation_command(self):
        s, ckpt = SCALES[self.scale], str(self.run_dir / "ckpt.pt")
        name = self.evaluation
        if name.startswith("linear"):  # linear, linear-layer<K>, linear-random, linear-<S>px
            layer = name.removeprefix("linear-layer") if "layer" in name else "0"
            size = ["--image-size", name[7:-2]] if name.endswith("px") else []
            return command("linear_eval.py", ["--checkpoint", ckpt, *s.linear, "--layer", layer,
                                              *(["--random-init"] if "random" in name else []), *size,
                                              "--seed", str(self.seed),
                                              "--out", str(self.run_dir / f"{name}.json")])
        _, fraction, layer = name.split("-")  # finetune-<fraction>-layer<K>
        return command("finetune.py", ["--checkpoint", ckpt, "--label-fraction", fraction,
                                       "--ft-proj-layer", layer.removeprefix("layer"),
                                       *s.finetune[float(fraction)], "--seed", str(self.seed),
                                       "--out-dir", str(self.run_dir / name)])


@functools.cache
def canonical(scale, name):
    """The first PRETRAIN name whose run pretrain.py would configure exactly as this one's (the
    base recipe first): "tau-0.5" is the base recipe at the CIFAR scales, not at paper scale."""
    from pretrain import parse_with_presets  # torch: only once runs are planned

    def resolved(n):  # as pretrain.py resolves it (a folder of 32 px images: CIFAR's preset)
        return dataclasses.asdict(parse_with_presets(pretrain_flags(scale, n, "DATA"))[0])

    return next(n for n in PRETRAIN if resolved(n) == resolved(name))


def jobs_for(names, scale, seeds, out):
    """The jobs of the named experiments, each (pretrain, evaluation, seed) once, in order."""
    jobs, seen = [], set()
    for seed in range(seeds):
        for name in names:
            for row in EXPERIMENTS[name].rows:
                job = Job(scale, canonical(scale, row.pretrain), row.evaluation, seed, out)
                if job.key not in seen:
                    seen.add(job.key)
                    jobs.append(job)
    # the runs that share a pretraining run together
    order = {j.run_dir: i for i, j in reversed(list(enumerate(jobs)))}
    return sorted(jobs, key=lambda j: order[j.run_dir])


# --- Running: subprocesses, resumable, stoppable ---------------------------------------------


class Stop:
    """Ctrl-C and SIGTERM: passed on to the running script (which checkpoints and exits), then
    the sweep ends; the same command resumes it."""

    def __init__(self):
        self.signum, self.child = None, None
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum, frame):
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def hardware():
    """What the numbers ran on, and how loaded it was."""
    import torch
    from runs import native_bf16
    cpu = platform.processor() or platform.machine()
    try:  # a VM may name only the brand ("AMD EPYC"): its family and model tell the generation
        info = dict(map(str.strip, line.split(":", 1)) for line in
                    open("/proc/cpuinfo").read().split("\n\n")[0].splitlines() if ":" in line)
        cpu = f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(cpu=cpu, cores=os.cpu_count(), gpu=gpu, native_bf16=native_bf16(),
                torch=torch.__version__,
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), python=platform.python_version())


def run_script(cmd, log_path, stop):
    """Run one script to its end, its output appended to log_path; False if stopped."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shown(cmd)}\n")
        log.flush()
        stop.child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        code = stop.child.wait()
        stop.child = None
    if stop.signum is not None:
        return False
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{cmd[1]} failed (exit {code}): {tail[0]} -- see {log_path}")
    return True


def pretrain_finished(run_dir):
    """The last epoch's record of log.jsonl if the checkpoint has reached the end of its schedule
    (a stop in mid-run leaves a checkpoint to resume from), else None."""
    import torch
    ckpt_path, log = run_dir / "ckpt.pt", run_dir / "log.jsonl"
    if not ckpt_path.exists() or not log.exists():
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not ckpt.get("finished", ckpt["step"] >= ckpt["config"]["epochs"] * ckpt["steps_per_epoch"]):
        return None  # (checkpoints before "finished" was written: at the end of the schedule)
    return json.loads(log.read_text().strip().splitlines()[-1])


def locked_by(run_dir):
    """The pid of another live sweep running in run_dir, else None (two sweeps with different
    --only lists can share the cores; a run they share is trained by whichever gets it first)."""
    lock = run_dir / "reproduce.lock"
    try:
        pid = int(lock.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):  # no lock, or one left by a sweep that ended without cleaning
        return None
    return pid if pid != os.getpid() else None


def run_job(job, data_dir, stop, records, log):
    """Pretrain (unless done), evaluate, append the record; False if stopped by a signal."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    lock = job.run_dir / "reproduce.lock"
    lock.write_text(str(os.getpid()))
    try:
        return _run_job(job, data_dir, stop, records, log)
    finally:
        lock.unlink(missing_ok=True)


def _run_job(job, data_dir, stop, records, log):
    start_load, timing, git = os.getloadavg(), job.run_dir / "pretrain_seconds.json", git_revision()
    pre_cmd, ckpt = job.pretrain_command(data_dir), job.run_dir / "ckpt.pt"
    if not pretrain_finished(job.run_dir):
        if ckpt.exists():  # the same command continues it
            log(f"  continuing {ckpt}")
        t = time.time()
        if not run_script(pre_cmd, job.run_dir / "pretrain.out", stop):
            return False
        spent = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
        timing.write_text(json.dumps(dict(seconds=spent + time.time() - t)))
        if not pretrain_finished(job.run_dir):
            raise UserError(f"{job.run_dir}: pretrain.py ended before the end of its schedule "
                            f"(see {job.run_dir / 'pretrain.out'})")
    last = pretrain_finished(job.run_dir)

    eval_cmd, t = job.evaluation_command(), time.time()
    if not run_script(eval_cmd, job.run_dir / "evaluation.out", stop):  # continues a fine-tuning
        return False
    eval_seconds = time.time() - t
    pre_seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
    metrics = ({} if "random" in job.evaluation else  # the pretraining's metrics are not its
               dict(loss=last["loss"], contrast_acc=100 * last["contrast_acc"],
                    entropy=last.get("entropy")))
    if job.evaluation.startswith("linear"):
        result = json.loads((job.run_dir / f"{job.evaluation}.json").read_text())
        metrics.update(top1=result["top1"], top5=result.get("top5"), knn_top1=result.get("knn_top1"))
    else:
        result = json.loads((job.run_dir / job.evaluation / "results.json").read_text())
        metrics.update(top1=result["top1"], top5=result.get("top5"))
    if pre_seconds is not None:  # the run from start to result, its evaluation included
        metrics["minutes"] = (pre_seconds + eval_seconds) / 60
    import torch
    clock = torch.load(ckpt, map_location="cpu", weights_only=True)["config"].get("clock") or None
    record = dict(key=job.key, scale=job.scale, pretrain=job.pretrain, evaluation=job.evaluation,
                  seed=job.seed, commands=[shown(pre_cmd), shown(eval_cmd)], git=git,  # at the start
                  clock=clock,
                  hardware=hardware(), load=dict(start=start_load, end=os.getloadavg()),
                  pretrain_seconds=pre_seconds,
                  evaluation_seconds=eval_seconds, metrics=metrics,
                  finished=datetime.datetime.now().isoformat(timespec="seconds"))
    with open(records, "a") as f:
        f.write(json.dumps(record) + "\n")
    return True


def recorded_here(job, records):
    """Whether the job's record was made by a run of this clone (its run folder is here): the
    records the repository ships, made on our machines, count in the report, but a sweep runs
    them again (a fresh clone measures its own)."""
    return job.key in records and job.run_dir.is_dir()


def read_records(out):
    """The records under out, the last one of each key (a rerun after a change replaces it)."""
    path = Path(out) / "records.jsonl"
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[r["key"]] = r
    return records


# --- Report: the paper's value, ours, and whether the order holds ----------------------------


def mean_and_spread(values):
    if not values:
        return None, None
    return statistics.fmean(values), (max(values) - min(values) if len(values) > 1 else None)


def value_of(records, scale, row, metric="top1"):
    """[metric over the seeds recorded] for a row."""
    return [r["metrics"][metric] for r in records.values()
            if r["scale"] == scale and r["pretrain"] == canonical(scale, row.pretrain)
            and r["evaluation"] == row.evaluation and r["metrics"].get(metric) is not None]


def noise(records, scale, metric="top1"):
    """The base recipe's spread over seeds (max - min) at this scale: differences within it are
    ties. None with fewer than two seeds."""
    return mean_and_spread(value_of(records, scale, EXPERIMENTS["base"].rows[0], metric))[1]


def paper_order(rows):
    """{row label: the label of the row the paper ranks just above it}."""
    ranked = sorted((r for r in rows if r.paper is not None), key=lambda r: -r.paper)
    above = {b.label: a.label for a, b in zip(ranked, ranked[1:])}
    above.update({r.label: r.below for r in rows if r.below})
    return above


def verdict(ours_above, ours_below, tolerance):
    """holds / tie / reversed: is the row the paper ranks higher higher here too?"""
    if ours_above is None or ours_below is None:
        return "not run"
    difference = ours_above - ours_below
    if tolerance is not None and abs(difference) <= tolerance:
        return "tie"
    return "holds" if difference > 0 else "reversed"


def experiment_table(name, records, scale):
    """Markdown for one experiment at one scale, or '' without records."""
    exp = EXPERIMENTS[name]
    metric = "top1"
    means = {r.label: mean_and_spread(value_of(records, scale, r, metric)) for r in exp.rows}
    own = [r for r in exp.rows if means[r.label][0] is not None and (name == "base" or (
        canonical(scale, r.pretrain), r.evaluation) != ("base", "linear"))]
    if exp.scale not in ("", scale) or not own:  # the base recipe's run alone is not a result
        return ""
    tolerance = noise(records, scale, metric)
    above = paper_order(exp.rows)
    evaluation = ("fine-tuned top-1" if exp.rows[0].evaluation.startswith("finetune") else
                  "linear top-1")
    head = ["", "paper", f"ours, {evaluation}", "seeds"]
    for m in exp.extra:
        head += [f"paper {m}", f"ours {m}"]
    head += ["kNN top-1", "paper's order here"]
    # an experiment of ours (no paper value, no order to check) shows no paper columns
    keep = [i for i, h in enumerate(head) if not h.startswith("paper") or above or
            exp.paper_extra or any(r.paper is not None for r in exp.rows)]
    row_line = lambda cells: "| " + " | ".join(cells[i] for i in keep) + " |"
    lines = [f"### {exp.title} ({name}; {exp.source})", ""] + ([exp.finding, ""] if exp.finding else [])
    lines += [row_line(head), "|" + "---|" * len(keep)]
    for row in exp.rows:
        mean, spread = means[row.label]
        seeds = len(value_of(records, scale, row, metric))
        cells = [row.label, "" if row.paper is None else f"{row.paper:.1f}",
                 "not run" if mean is None else
                 f"{mean:.2f}" + (f" (spread {spread:.2f})" if spread is not None else ""),
                 str(seeds)]
        for m in exp.extra:
            paper = exp.paper_extra.get(row.label, {}).get(m)
            ours = mean_and_spread(value_of(records, scale, row, m))[0]
            cells += ["" if paper is None else f"{paper:g}", "" if ours is None else f"{ours:.2f}"]
        knn = mean_and_spread(value_of(records, scale, row, "knn_top1"))[0]
        cells.append("" if knn is None else f"{knn:.2f}")
        if row.label in above:
            cells.append(f"below {above[row.label]}: "
                         f"{verdict(means[above[row.label]][0], mean, tolerance)}")
        else:
            cells.append("")
        lines.append(row_line(cells))
    lines.append("")
    lines.append(f"Ties: differences within {tolerance:.2f} points, the base recipe's spread over "
                 f"seeds at this scale." if tolerance is not None else
                 "No tolerance: the base recipe has fewer than two seeds at this scale, so every "
                 "difference counts.")
    return "\n".join(lines) + "\n"


def summary_table(tables):
    """Per experiment, how many of the paper's orderings hold, tie or reverse here (counted from
    the tables' last column)."""
    lines = ["| experiment | holds | tie | reversed | not run |", "|---|---:|---:|---:|---:|"]
    for name, table in zip(EXPERIMENTS, tables):
        if not table or name == "base" or "paper's order here" not in table:
            continue
        cells = [line.rsplit("|", 2)[-2] for line in table.splitlines() if line.startswith("| ")]
        counts = [sum(c.strip().endswith(": " + v) for c in cells)
                  for v in ("holds", "tie", "reversed", "not run")]
        lines.append(f"| {name} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines) + "\n"


def runs_table(records, scale):
    """Each pretraining run's command, time and machine: what the tables above come from."""
    runs = {}
    for r in records.values():
        if r["scale"] == scale:
            runs.setdefault((r["pretrain"], r["seed"]), r)
    lines = ["| run | seed | pretraining command | pretraining minutes | load (1 min avg) | machine | git |",
             "|---|---|---|---:|---|---|---|"]
    for (name, seed), r in sorted(runs.items()):
        hw = r["hardware"]
        threads = f"OMP_NUM_THREADS={hw['omp_num_threads']}" if hw["omp_num_threads"] else "all threads"
        machine = hw["gpu"] or f"{hw['cpu']}, {hw['cores']} cores, {threads}"
        minutes = f"{r['pretrain_seconds'] / 60:.1f}" if r["pretrain_seconds"] else ""
        lines.append(f"| {name} | {seed} | `{r['commands'][0]}` | {minutes} | "
                     f"{r['load']['start'][0]:.1f} / {r['load']['end'][0]:.1f} | {machine} | {r['git']} |")
    return "\n".join(lines) + "\n"


def report(out, scales=None):
    """Markdown of every experiment with records, per scale."""
    records = read_records(out)
    found = sorted({r["scale"] for r in records.values()}, key=list(SCALES).index)
    parts = []
    for scale in scales or found:
        tables = [experiment_table(name, records, scale) for name in EXPERIMENTS]
        if not any(tables):
            continue
        parts.append(f"## Scale `{scale}`: {SCALES[scale].about}\n")
        summary = summary_table(tables)
        parts += [summary] if summary.count("\n") > 2 else []  # experiments with an order to check
        parts += [t for t in tables if t]
        parts.append(f"#### The runs behind the `{scale}` tables\n\n{runs_table(records, scale)}")
    return "\n".join(parts)


BEGIN, END = "<!-- reproduce.py --report: begin -->", "<!-- reproduce.py --report: end -->"


def update(path, text):
    """Replace what lies between the two markers in path with text."""
    path = Path(path)
    content = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in content or END not in content:
        raise UserError(f"{path} has no {BEGIN} ... {END} section to write the tables into")
    start, end = content.index(BEGIN) + len(BEGIN), content.index(END)
    path.write_text(content[:start] + "\n" + text + content[end:])


# --- main ------------------------------------------------------------------------------------


def parse_args(argv):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu",
                        help="how big each run is (default cpu); see the docstring")
    parser.add_argument("--only", default="", help="comma-separated experiments (default: all): "
                        + ", ".join(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of every run (default 1)")
    parser.add_argument("--data-dir", default="", help="the dataset (default: the scale's, "
                        "e.g. data/cifar10 in the repository: an image-folder export or "
                        "torchvision's download)")
    parser.add_argument("--out", default="results", help="records and runs (default results/)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--report", action="store_true", help="only write the tables from "
                        "the records")
    parser.add_argument("--update", default="", help="with --report: the file whose marked "
                        "section gets the tables (RESULTS.md)")
    args = parser.parse_args(argv)
    here = [n for n, e in EXPERIMENTS.items() if e.scale in ("", args.scale)]
    names = [n for n in args.only.split(",") if n] or here
    unknown = [n for n in names if n not in here]
    if unknown:
        raise UserError(f"--only: no experiment {unknown[0]!r} at --scale {args.scale}; choose "
                        f"from {', '.join(here)}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, not {args.seeds}")
    args.names = names
    if not args.data_dir and not SCALES[args.scale].data_dir:
        raise UserError(f"--scale {args.scale} needs --data-dir (a small image folder of "
                        f"<class>/<image>, as the tests make)")
    # the scripts run in the repository: the user's paths are made absolute from where they are
    args.data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else str(
        ROOT / SCALES[args.scale].data_dir)
    args.out = str(Path(args.out).resolve())
    return args


def main(argv=None):
    def run():
        args = parse_args(argv)
        out = Path(args.out)
        if args.report:
            text = report(out)
            if not text:
                raise UserError(f"no records in {out / 'records.jsonl'} yet")
            (out / "tables.md").write_text(text)
            print(f"wrote {out / 'tables.md'}")
            if args.update:
                update(args.update, text)
                print(f"updated {args.update}")
            return
        jobs = jobs_for(args.names, args.scale, args.seeds, out)
        if args.dry_run:
            for job in jobs:
                print(f"# {job.key}")
                print(shown(job.pretrain_command(args.data_dir)))
                print(shown(job.evaluation_command()))
            return
        if SCALES[args.scale].dataset in ("folder", "imagenet") and not Path(args.data_dir).exists():
            raise UserError(f"--data-dir {args.data_dir} does not exist")  # CIFAR-10: downloaded
        out.mkdir(parents=True, exist_ok=True)
        records, done = out / "records.jsonl", read_records(out)
        todo = [j for j in jobs if not recorded_here(j, done)]
        shipped = sum(j.key in done for j in todo)
        print(f"reproduce.py: {args.scale} scale, {len(jobs)} runs, {len(jobs) - len(todo)} "
              f"already recorded in {records}" + (f", {shipped} recorded by runs made elsewhere "
                                                   f"(the repository's) run here again" if shipped
                                                   else "") + f"; git {git_revision() or '-'}",
              flush=True)
        stop, skipped = Stop(), []
        for i, job in enumerate(todo, 1):
            if recorded_here(job, read_records(out)):  # by another sweep meanwhile
                continue
            pid = locked_by(job.run_dir)
            if pid:
                print(f"[{i}/{len(todo)}] {job.key}: skipped, process {pid} is running it", flush=True)
                skipped.append(job.key)
                continue
            print(f"[{i}/{len(todo)}] {job.key} ({job.run_dir})", flush=True)
            t = time.time()
            if not run_job(job, args.data_dir, stop, records, print):
                sys.exit(f"reproduce.py: stopped by signal {stop.signum}; the same command "
                         f"resumes the sweep")
            print(f"  done in {datetime.timedelta(seconds=round(time.time() - t))}", flush=True)
        if skipped:
            print(f"{len(skipped)} run(s) left to the other sweep; repeat the command once it ends")
        else:
            print(f"all {len(jobs)} runs recorded; python reproduce.py --report --out {out}")

    run_cli("reproduce.py", run)


if __name__ == "__main__":
    main()
