"""A user's own images: unlabeled folders of any layout, held-out evaluation splits, and a wrong
setup caught in one line before any work (nothing left behind), as a new user meets them."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import linear_eval
import pretrain
from runs import load_checkpoint
from conftest import (ROOT, TINY_MODEL, error_of, make_image_folder, make_own_images,
                      run_script)
from data import build_dataset, class_balanced, dataset_labels

TINY = [*TINY_MODEL, "--workers", "0", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Class folders directly under the root, 8 images each, no val/: what people have."""
    root = make_image_folder(tmp_path_factory.mktemp("labelled"), classes=4, train_per_class=8,
                             val_per_class=0)
    shutil.rmtree(root / "val")
    for c in (root / "train").iterdir():
        c.rename(root / c.name)
    (root / "train").rmdir()
    return root


# ------------------------------------------------------------------------ unlabeled, held out


def test_an_unlabeled_folder_of_any_layout_pretrains(tmp_path):
    """Images directly in the folder and in nested ones, of mixed sizes and modes, no class
    folders: every image is used (the text file is not), the CIFAR recipe for 32 px."""
    images = make_own_images(tmp_path / "own")
    proc = run_script("pretrain.py", "--dataset", "folder", "--data-dir", images, *TINY,
                      "--batch-size", 6, "--epochs", 1, "--out-dir", tmp_path / "run")
    assert "18 images, 3 steps/epoch of 6" in proc.stdout
    assert "with the CIFAR stem (3x3, no max-pool) at 32 px" in proc.stdout
    config = load_checkpoint(tmp_path / "run")["config"]  # the run folder is enough
    assert (config["color_strength"], config["blur"], config["temperature"]) == (0.5, False, 0.5)


def test_held_out_split_is_class_balanced_disjoint_and_the_same_everywhere(labelled):
    held = build_dataset("folder", labelled, "val", None, val_fraction=0.25)
    rest = build_dataset("folder", labelled, "train", None, val_fraction=0.25)
    pool = build_dataset("folder", labelled, "pretrain", None, val_fraction=0.25)
    assert sorted(dataset_labels(held)) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(rest) == 24 and not {f for f, _ in held.samples} & {f for f, _ in rest.samples}
    assert [f for f, _ in pool.samples] == [f for f, _ in rest.samples]  # pretraining never sees them
    again = build_dataset("folder", labelled, "val", None, val_fraction=0.25)
    assert held.samples == again.samples and held.classes == rest.classes


def test_the_held_out_split_follows_the_checkpoint_into_every_later_script(labelled, tmp_path):
    """pretrain --val-fraction (its kNN monitor on the held-out images), then linear_eval and
    finetune without the flag evaluate on the same 8 images; distill takes an unlabeled folder
    as its pool."""
    proc = run_script("pretrain.py", "--dataset", "folder", "--data-dir", labelled, *TINY,
                      "--batch-size", 8, "--epochs", 1, "--val-fraction", 0.25, "--eval-every", 1,
                      "--knn-k", 200, "--out-dir", tmp_path / "pre")
    assert "24 images" in proc.stdout and "(k 24 of 24 training images)" in proc.stdout
    out = run_script("linear_eval.py", "--checkpoint", tmp_path / "pre", "--knn", 200,
                     "--epochs", 0, "--out", tmp_path / "le.json").stdout
    assert "kNN (k 24 of the 200 asked: 24 training images" in out
    result = json.loads((tmp_path / "le.json").read_text())
    assert result["knn_k"] == 24 and result["config"]["val_fraction"] == 0.25
    ft = run_script("finetune.py", "--checkpoint", tmp_path / "pre" / "ckpt.pt", "--label-fraction",
                    0.5, "--batch-size", 4, "--epochs", 1, "--out-dir", tmp_path / "ft").stdout
    assert "12 labelled images: 50% of the 24 training images, 50% of each class" in ft
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["config"]["val_fraction"] == 0.25
    pool = make_own_images(tmp_path / "pool")
    st = run_script("distill.py", "--teacher", tmp_path / "ft", "--unlabeled-dir", pool,
                    "--batch-size", 6, "--epochs", 1, "--workers", 0, "--out-dir",
                    tmp_path / "st").stdout
    assert "18 unlabeled images" in st


def test_held_out_images_never_reach_training(labelled, tmp_path):
    """An unlabeled folder that holds the evaluation images (distill.py --unlabeled-dir on the
    labelled folder), a val/ folder inside the folder pretraining reads, and another held-out
    fraction than the checkpoint's on its own data: the evaluation images stay out, or the
    command is refused."""
    proc = run_script("pretrain.py", "--dataset", "folder", "--data-dir", labelled, *TINY,
                      "--batch-size", 8, "--epochs", 1, "--val-fraction", 0.25, "--out-dir",
                      tmp_path / "pre")
    assert "24 images" in proc.stdout
    ft = run_script("finetune.py", "--checkpoint", tmp_path / "pre", "--label-fraction", 0.5,
                    "--batch-size", 4, "--epochs", 1, "--out-dir", tmp_path / "ft")
    for unlabeled in ([], ["--unlabeled-dir", labelled]):  # the same 24 either way
        st = run_script("distill.py", "--teacher", tmp_path / "ft", *unlabeled, "--batch-size", 6,
                        "--epochs", 1, "--workers", 0, "--out-dir", tmp_path / f"st{len(unlabeled)}")
        assert "24 unlabeled images" in st.stdout, st.stdout
    for script, main in (("linear_eval.py", linear_eval.main), ("finetune.py", finetune.main)):
        error = error_of(main, "--checkpoint", tmp_path / "pre", "--val-fraction", 0.5, "--out-dir"
                         if script == "finetune.py" else "--out", tmp_path / "x")
        assert error == (f"{script}: error: --val-fraction 0.5 differs from the checkpoint's 0.25: "
                         f"it was trained on images that split holds; leave --val-fraction out "
                         f"(the checkpoint's split is used), or evaluate another checkpoint")
    nested = tmp_path / "nested"  # <data-dir>/<class>/... and <data-dir>/val/<class>/..., no train/
    make_image_folder(nested, classes=2, train_per_class=6, val_per_class=3)
    for c in (nested / "train").iterdir():
        c.rename(nested / c.name)
    (nested / "train").rmdir()
    out = run_script("pretrain.py", "--dataset", "folder", "--data-dir", nested, *TINY,
                     "--batch-size", 4, "--epochs", 1, "--out-dir", tmp_path / "nested-run").stdout
    assert "12 images" in out  # not 18: val/ is the evaluation split


def test_label_fraction_says_what_it_took(labelled):
    """1% of 8 images per class is one per class, 12.5%: said so."""
    log = []
    cfg = finetune.FinetuneConfig(label_fraction=0.01, seed=0)
    train = build_dataset("folder", labelled, "train", None)
    indices = finetune.choose_labeled(cfg, train, log.append)
    assert len(indices) == 4 and indices == class_balanced(dataset_labels(train), 0.01, 0)
    assert log == ["4 labelled images: 12.5% of the 32 training images (1% asked, at least one of "
                   "each class), seed 0"]


# ------------------------------------------------------------------------ caught in one line


def no_run_folder_left(tmp_path):
    return not (tmp_path / "run").exists()


def test_no_val_folder_says_how_to_get_one(labelled, tmp_path, pretrained_checkpoint):
    message = error_of(pretrain.main, "--dataset", "folder", "--data-dir", labelled, *TINY,
                       "--eval-every", 1, "--out-dir", tmp_path / "run")
    assert "has no val/ (or test/) folder of class folders; hold out part of the training " \
           "images with --val-fraction 0.1, or give --val-dir" in message
    assert no_run_folder_left(tmp_path)


def test_labels_needed_where_there_are_none(tmp_path):
    """Held out images need classes: a folder with images outside class folders, or none."""
    images = make_own_images(tmp_path / "own")
    args = [*TINY, "--eval-every", 1, "--val-fraction", 0.2, "--out-dir", tmp_path / "run"]
    message = error_of(pretrain.main, "--dataset", "folder", "--data-dir", images, *args)
    assert "6 images lie directly in" in message and "outside any class folder" in message
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(sorted(images.rglob("img*"))):
        image.rename(flat / f"{i}{image.suffix}")
    message = error_of(pretrain.main, "--dataset", "folder", "--data-dir", flat, *args)
    assert "18 images lie directly in" in message and no_run_folder_left(tmp_path)


def test_a_batch_larger_than_the_data_says_what_to_lower_it_to(labelled, tiny_folder, tmp_path,
                                                                pretrained_checkpoint):
    """Every script, with its default batch size on a small folder (linear_eval also with --knn
    alone, which once printed '90 epochs of 0 steps' and a traceback)."""
    assert "32 images are fewer than one batch of 512: lower --batch-size to at most 32" in \
        error_of(pretrain.main, "--dataset", "folder", "--data-dir", labelled, "--image-size", 32,
                 "--out-dir", tmp_path / "run")
    for extra in ([], ["--knn", 20]):
        assert "48 training images are fewer than one batch of 512: lower --batch-size to at " \
               "most 48" in error_of(linear_eval.main, "--checkpoint", pretrained_checkpoint,
                                     "--dataset", "folder", "--data-dir", tiny_folder, *extra,
                                     "--out", tmp_path / "eval.json")  # not another test's file
    assert "labelled images are fewer than one batch of 1024: lower --batch-size to at most 4" in \
        error_of(finetune.main, "--checkpoint", pretrained_checkpoint, "--dataset", "imagenet",
                 "--data-dir", tiny_folder, "--out-dir", tmp_path / "run")
    assert no_run_folder_left(tmp_path)


def test_finetune_refuses_a_val_folder_with_other_classes(tiny_folder, tmp_path, pretrained_checkpoint):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    shutil.rmtree(data / "val" / "class3")
    message = error_of(finetune.main, "--checkpoint", pretrained_checkpoint, "--data-dir", data,
                       "--batch-size", 4, "--out-dir", tmp_path / "run")
    assert "different classes (4 vs 3; first difference: class3)" in message
    assert no_run_folder_left(tmp_path)


def test_images_that_are_not_cifar_are_not_trained_as_cifar(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1, size=64)
    message = error_of(pretrain.main, "--data-dir", data, "--out-dir", tmp_path / "run")
    assert "are 64 x 64 px, cifar10's 32 x 32: for your own images use --dataset folder" in message


def test_warmup_longer_than_the_run(tiny_folder, tmp_path):
    message = error_of(pretrain.main, "--dataset", "folder", "--data-dir", tiny_folder,
                       *TINY_MODEL, "--epochs", 1, "--out-dir", tmp_path / "run")
    assert "--warmup-epochs 10 is longer than --epochs 1" in message and no_run_folder_left(tmp_path)


def test_small_images_are_not_upscaled_4x_without_a_word(tmp_path):
    images = make_own_images(tmp_path / "own")
    message = error_of(pretrain.main, "--dataset", "folder", "--data-dir", images, "--out-dir",
                       tmp_path / "run")
    assert "are about 40 px (shorter side): --image-size 224, the folder preset's, would upscale " \
           "them 5.6x; pass --image-size 40" in message
    cfg, _ = pretrain.resolve_config(["--dataset", "folder", "--data-dir", str(images),
                                      "--image-size", "224"])  # asked for: as asked
    assert cfg.image_size == 224 and cfg.blur and cfg.color_strength == 1.0


def test_a_folder_of_small_images_gets_the_cifar_recipe(tmp_path):
    """--dataset folder --image-size 32 kept ImageNet's blur and colour strength 1.0."""
    cfg, _ = pretrain.resolve_config(["--dataset", "folder", "--data-dir", str(tmp_path),
                                      "--image-size", "32"])
    assert (cfg.blur, cfg.color_strength, cfg.temperature, cfg.batch_size) == (False, 0.5, 0.5, 512)
    cfg, _ = pretrain.resolve_config(["--dataset", "folder", "--data-dir", str(tmp_path),
                                      "--image-size", "32", "--blur"])
    assert cfg.blur


def test_checkpoints_of_the_wrong_kind_say_what_they_are(pretrained_checkpoint, finetuned_checkpoint,
                                                         tmp_path):
    """pretrain.py --resume of a fine-tuned network once said "architecture or width differs",
    of a student "the optimizer state ... does not fit"; a run folder said "no checkpoint"."""
    message = error_of(pretrain.main, "--resume", finetuned_checkpoint.parent)  # the run folder
    assert f"--resume {finetuned_checkpoint} is a fine-tuned network (finetune.py's finetuned.pt), " \
           f"fine-tuned from {pretrained_checkpoint}: finetune.py --resume and distill.py " \
           f"--teacher take it" in message
    pretrained = torch.load(pretrained_checkpoint, weights_only=True)
    for student in (dict(pretrained, kind="student"),  # what makes a student.pt one, for this check
                    dict({k: v for k, v in pretrained.items() if k != "kind"}, distill_config={})):
        torch.save(student, tmp_path / "student.pt")  # the second as written before "kind" was
        assert "is a distilled student (distill.py's student.pt): distill.py --resume, " \
               "linear_eval.py --checkpoint and finetune.py --checkpoint take it" in \
            error_of(pretrain.main, "--resume", tmp_path / "student.pt")
    (tmp_path / "empty").mkdir()
    assert "no checkpoint in the folder" in error_of(linear_eval.main, "--checkpoint",
                                                     tmp_path / "empty")


# ------------------------------------------------------------------------ the picture


@pytest.mark.parametrize("dataset", ["cifar10", "folder"])
def test_the_augmentation_picture(dataset, tiny_folder, tmp_path):
    """Original, evaluation view, view 1, view 2, under headers; written where asked (its folder
    made), no run folder made; a name that is no .png is one line."""
    path = tmp_path / "views.png"
    run_script("pretrain.py", "--dataset", dataset, "--data-dir", tiny_folder, *TINY,
               "--show-augmentations", path, "--out-dir", tmp_path / "run")
    with Image.open(path) as picture:
        pixels = torch.from_numpy(np.asarray(picture.convert("L")).copy())
    zoom, cell = 3, (32 + 2) * 3
    assert picture.width == 4 * cell + 2 * zoom and picture.height == 16 + 8 * cell + 2 * zoom
    assert (pixels[:16] < 128).any(dim=0).sum() > 20  # dark header text
    assert no_run_folder_left(tmp_path)
    assert "cannot write" in error_of(pretrain.main, "--dataset", dataset, "--data-dir", tiny_folder,
                                      *TINY, "--show-augmentations", tmp_path / "no" / "v.jpg")


def test_the_converter_asks_which_head_layer_where_nothing_tells(tmp_path):
    """The layer a classifier reads cannot be told from the shapes here (h and the hidden head
    layer are 16-d) nor from the folder: the conversion asks, and takes the answer."""
    src = ROOT / "fixtures" / "tf1_r18_cifar"
    proc = run_script("tf_checkpoint.py", src, tmp_path / "c.pt", "--classifier", check=False)
    assert proc.returncode == 1 and "--ft-proj-layer 1 for the authors' finetuned_1pct" in proc.stderr
    out = run_script("tf_checkpoint.py", src, tmp_path / "c.pt", "--classifier",
                     "--ft-proj-layer", 0).stdout
    assert "classifier of 10 classes on head layer 0" in out


# ------------------------------------------------------------------------ the README, as written

SMALLER = {  # flags appended to each README command (the last of a flag wins): seconds, not days
    "pretrain.py": ["--arch", "resnet18", "--width-multiplier", "0.0625", "--batch-size", "16",
                    "--epochs", "1", "--warmup-epochs", "0", "--workers", "0"],
    "finetune.py": ["--batch-size", "8", "--epochs", "1", "--workers", "0"],
    "distill.py": ["--batch-size", "8", "--epochs", "1", "--workers", "0"],
    "linear_eval.py": ["--batch-size", "8", "--epochs", "2", "--workers", "0"],
}


def readme_commands(section):
    """The commands of a README section's code blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(line[4:] for line in text.splitlines() if line.startswith("    "))
    return [c.split() for c in code.replace("\\\n", " ").splitlines() if c.startswith("python ")]


def test_the_readmes_own_images_commands_run_as_written(labelled, tmp_path):
    """'Your own images' on a folder of unlabeled photos and another of labelled ones (class
    folders, no val/): each command as the README writes it, made small, in order; the
    labelled folder's held-out split is its own, not the pretraining's (once refused)."""
    photos = make_own_images(tmp_path / "photos")
    commands = readme_commands("Your own images")
    assert [c[1] for c in commands] == ["pretrain.py", "pretrain.py", "finetune.py", "distill.py",
                                        "linear_eval.py"]
    for command in commands:
        args = [{"~/photos": str(photos), "~/labelled": str(labelled)}.get(a, a) for a in command[2:]]
        proc = subprocess.run([sys.executable, str(ROOT / command[1]), *args, *SMALLER[command[1]]],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr)
    assert (tmp_path / "views.png").is_file()
    results = json.loads((tmp_path / "runs" / "photos-ft" / "results.json").read_text())
    assert results["config"]["val_fraction"] == 0.1 and results["top1"] >= 0
    assert load_checkpoint(tmp_path / "runs" / "photos-student")["finished"]
    (evaluation,) = (tmp_path / "runs" / "photos").glob("linear_eval*.json")
    assert json.loads(evaluation.read_text())["knn_top1"] >= 0


def test_images_decode_as_pil_reads_them(tmp_path):
    """data.decode, the loader workers' reader: JPEGs (RGB and gray) through torchvision.io give
    PIL's convert("RGB") pixels exactly; CMYK JPEGs, PNGs with alpha and palettes go through PIL;
    a truncated JPEG is unreadable (OSError), as PIL says."""
    from data import decode
    photos = sorted(make_own_images(tmp_path / "own").rglob("*.[jJ][pP]*[gG]"))
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0, 255, (40, 50, 3)).astype(np.uint8)
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(pixels).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([pixels, pixels[..., :1]])).save(tmp_path / "alpha.png")
    files = photos + [tmp_path / n for n in ("cmyk.jpg", "gray.jpg", "palette.png", "alpha.png")]
    assert len(files) > 10
    for path in files:
        with Image.open(path) as image:
            want = torch.from_numpy(np.array(image.convert("RGB")))
        got = decode(path)
        assert got.dtype == torch.uint8 and torch.equal(got, want), path
    data = files[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(OSError):
        decode(tmp_path / "cut.jpg")


def test_the_device_decodes_and_crops_as_the_workers_do(tmp_path):
    """--decode device, run here on the CPU: the workers read a JPEG's bytes and its size (other
    images they decode), the device decodes and crops them; fed the same random stream, the
    crops are the workers' own (the same sampler draw, resize and rounding). A damaged JPEG is
    replaced by the batch's first image and counted as unreadable."""
    from data import ImageFolder, WorkerCrops, decode, device_crops
    from augment import random_crops_uint8
    photos = make_own_images(tmp_path / "own")
    rng = np.random.default_rng(2)
    Image.fromarray(rng.uniform(0, 255, (90, 70)).astype(np.uint8)).save(photos / "gray.jpg")
    folder = ImageFolder(str(photos.parent), WorkerCrops(96, views=2, on_device=True))
    folder.samples = [s for s in folder.samples if "notes" not in s[0]]
    folder.ids = list(range(len(folder.samples)))
    items = [folder.read(i)[0] for i in range(len(folder.samples))]
    assert any(isinstance(item, tuple) for item in items) and any(torch.is_tensor(item) for item in items)
    crops = device_crops(items, 96, 2, torch.device("cpu"), folder, torch.Generator().manual_seed(0))
    images = [decode(path) for path, _ in folder.samples]
    assert torch.equal(crops, random_crops_uint8(images, 96, 2, torch.Generator().manual_seed(0)))
    cut = next(i for i, item in enumerate(items) if isinstance(item, tuple))
    items[cut] = (items[cut][0][:len(items[cut][0]) // 2], *items[cut][1:])
    crops = device_crops(items, 96, 2, torch.device("cpu"), folder, torch.Generator().manual_seed(0))
    assert crops.shape == (len(items), 2, 3, 96, 96) and folder.unreadable_files() == 1
    # ... and a run of it, its workers sending the JPEGs' bytes to the main process
    run_script("pretrain.py", "--dataset", "folder", "--data-dir", photos, *TINY_MODEL, "--workers",
               1, "--decode", "device", "--batch-size", 8, "--epochs", 1, "--warmup-epochs", 0,
               "--out-dir", tmp_path / "run")
    assert load_checkpoint(tmp_path / "run")["finished"]
