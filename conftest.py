"""Shared test fixtures: a tiny image folder, a way to run a script as a user would, and a tiny
pretraining checkpoint that the tests of the downstream scripts start from."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).parent

if os.environ.get("PYTEST_XDIST_WORKER"):  # several test processes share the cores: one thread
    os.environ["OMP_NUM_THREADS"] = "1"  # each, their scripts' too (oversubscribed threads ran
    torch.set_num_threads(1)  # 10x slower here)

# A ResNet-18 at 1/8 width on 32 px images: a few steps take seconds on two CPU cores.
TINY_MODEL = ["--arch", "resnet18", "--width-multiplier", "0.125", "--image-size", "32"]
TINY_PRETRAIN = ["--dataset", "folder", *TINY_MODEL, "--batch-size", "16", "--epochs", "2",
                 "--warmup-epochs", "0", "--lr", "0.5", "--temperature", "0.5", "--no-blur",
                 "--workers", "0", "--log-every", "1"]


def make_image_folder(root, classes=4, train_per_class=12, val_per_class=6, size=32, seed=0):
    """train/<class>/*.png and val/<class>/*.png, each class a colour plus noise, so that even a
    tiny model can tell the classes apart."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0, 255, size=(classes, 3))
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = Path(root) / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = colours[c] + rng.normal(0, 40, size=(size, size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return Path(root)


def run_script(script, *args, check=True, timeout=600, env=None):
    """Run one of the scripts in a fresh interpreter, as a user would; returns the process."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def pretrained_checkpoint(tiny_folder, tmp_path_factory):
    """A pretraining checkpoint of the tiny model on the tiny folder (2 epochs of 3 steps)."""
    out = tmp_path_factory.mktemp("pretrain")
    run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", out)
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def midrun_checkpoint(tiny_folder, tmp_path_factory):
    """The tiny pretraining run stopped after its first epoch (--max-steps 3 of 6): a run to
    continue."""
    out = tmp_path_factory.mktemp("midrun")
    run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", out,
               "--max-steps", 3)
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def finetuned_checkpoint(pretrained_checkpoint, tmp_path_factory):
    """The tiny pretrained network fine-tuned on half the labels (6 epochs of 3 steps): a
    teacher for distill.py, results.json beside it."""
    out = tmp_path_factory.mktemp("finetuned")
    run_script("finetune.py", "--checkpoint", pretrained_checkpoint, "--label-fraction", "0.5",
               "--epochs", "6", "--batch-size", "8", "--workers", "0", "--out-dir", out)
    return out / "finetuned.pt"


def error_of(main, *args):
    """The one line a script's main() exits with when it refuses its input (run in-process:
    no interpreter to start)."""
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in args])
    assert exit.value.code not in (None, 0)
    return str(exit.value.code)


def make_own_images(root, seed=0):
    """What a user's own unlabeled folder looks like: images directly in it and in nested folders,
    of mixed sizes, JPEG and PNG, a grayscale and a transparent one, and a file that is not an
    image."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for i, (sub, size, mode, ext) in enumerate([
            ("", (40, 30), "RGB", "jpg"), ("", (64, 64), "L", "png"), ("trip/day1", (50, 70), "RGB", "jpg"),
            ("trip/day1", (33, 33), "RGBA", "png"), ("trip/day2", (48, 40), "RGB", "JPEG"),
            ("misc", (36, 44), "RGB", "png")] * 3):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.uniform(0, 255, size=(size[1], size[0], len(mode))).astype(np.uint8)
        Image.fromarray(pixels.squeeze()).save(folder / f"img{i:02d}.{ext}")
    (root / "notes.txt").write_text("not an image")
    return root
