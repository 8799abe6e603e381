"""Shared test fixtures: a tiny image folder, a way to run a script as a user would, and a tiny
pretraining checkpoint that the tests of the downstream scripts start from."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).parent

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
