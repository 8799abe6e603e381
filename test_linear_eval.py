"""Tests of linear_eval.py: the linear protocol on features whose answer is known, the frozen-
encoder guard, kNN against a naive loop, and end-to-end runs from a tiny pretraining checkpoint."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from augment import center_crop_resize, crop_resize

from runs import UserError, load_checkpoint, precision_for
import linear_eval
from conftest import ROOT, error_of, make_image_folder, run_script
from data import load_split, stage_data
from linear_eval import (FeatureLoader, check_encoder_unchanged, encoder_snapshot, evaluate_linear,
                         knn_accuracy, linear_classifier, load_encoder, main, train_linear)
from evaluation import extract_features
from model import build_model
from resnet import build_encoder

CPU = torch.device("cpu")


def quiet(*args, **kwargs):
    pass


def fit(features, labels, epochs=10, batch_size=100, lr=1.0, weight_decay=0.0):
    """The script's routine on stored features (the --cached-features path)."""
    classifier = linear_classifier(features.shape[1], int(labels.max()) + 1)
    train_linear(classifier, nn.Identity(), FeatureLoader(features, labels, batch_size), epochs,
                 lr, weight_decay, log=quiet)
    return classifier


# --- the linear protocol where the answer is known --------------------------------------------


def separable(n, dim=32, classes=5, seed=0):
    """Points labelled by a fixed random linear rule, kept only with a clear margin."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(123))
    x = torch.randn(4 * n, dim, generator=g)
    scores = x @ w
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1] > 1.0).nonzero().squeeze(1)[:n]
    return x[keep], scores[keep].argmax(1)


def test_linearly_separable_features_reach_100_percent():
    x, y = separable(1000)
    x_val, y_val = separable(500, seed=1)
    classifier = fit(x, y)
    accuracy = evaluate_linear(classifier, x_val, y_val)
    assert accuracy["top1"] >= 99.0, accuracy
    assert "top5" not in accuracy  # 5 classes: a top-5 of 100% would tell nothing


def test_random_labels_stay_at_chance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 32, generator=g), torch.randint(0, 10, (1000,), generator=g)
    x_val, y_val = torch.randn(2000, 32, generator=g), torch.randint(0, 10, (2000,), generator=g)
    accuracy = evaluate_linear(fit(x, y), x_val, y_val)
    assert 6.0 < accuracy["top1"] < 14.0, accuracy  # chance is 10%, sd 0.7% on 2000 queries
    assert 44.0 < accuracy["top5"] < 56.0, accuracy


def test_two_steps_equal_nesterov_sgd_in_float64():
    """Zero init, lr at its peak on the first step (no warmup), cosine (half the peak halfway),
    Nesterov momentum, weight decay on the weight but not the bias: a float64 hand computation."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    peak, wd, m = 0.5, 0.1, 0.9
    classifier = linear_classifier(6, 3)
    assert classifier.weight.abs().sum() == 0 and classifier.bias.abs().sum() == 0
    # one full batch per epoch, two epochs: two steps at lr peak and peak * (1 + cos(pi/2)) / 2
    train_linear(classifier, nn.Identity(), FeatureLoader(x, y, 40), 2, peak, wd, m, log=quiet)

    xd, onehot = x.double(), torch.eye(3, dtype=torch.float64)[y]
    w, b = torch.zeros(3, 6, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    buf_w = buf_b = None
    for lr in (peak, peak * 0.5 * (1 + math.cos(math.pi / 2))):
        p = torch.softmax(xd @ w.T + b, dim=1)
        grad_w = (p - onehot).T @ xd / len(x) + wd * w
        grad_b = (p - onehot).mean(0)
        buf_w = grad_w if buf_w is None else m * buf_w + grad_w
        buf_b = grad_b if buf_b is None else m * buf_b + grad_b
        w = w - lr * (grad_w + m * buf_w)
        b = b - lr * (grad_b + m * buf_b)
    torch.testing.assert_close(classifier.weight.double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(classifier.bias.double(), b, rtol=1e-5, atol=1e-6)


# --- the frozen encoder -------------------------------------------------------------------------


class StuckInTrainMode(nn.Module):
    """The classic bug: an encoder whose BatchNorm keeps training mode (and so its statistics
    move with every batch) although the evaluation code calls .eval()."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def train(self, mode=True):
        return super().train(True)

    def forward(self, x):
        return self.encoder(x)


def tiny_encoder():
    torch.manual_seed(0)
    encoder, dim = build_encoder("resnet18", 0.125, 32)
    return encoder.requires_grad_(False).eval(), dim


def test_frozen_encoder_check_passes_for_a_frozen_encoder():
    encoder, dim = tiny_encoder()
    reference = encoder_snapshot(encoder)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 2, (16,))
    train_linear(linear_classifier(dim, 2), encoder, FeatureLoader(images, labels, 8), 1, 0.1,
                 log=quiet)
    check_encoder_unchanged(encoder, reference)


def test_frozen_encoder_check_catches_bn_in_training_mode():
    encoder, dim = tiny_encoder()
    reference = encoder_snapshot(encoder)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 2, (16,))
    train_linear(linear_classifier(dim, 2), StuckInTrainMode(encoder),
                 FeatureLoader(images, labels, 8), 1, 0.1, log=quiet)
    with pytest.raises(AssertionError, match="running_mean"):
        check_encoder_unchanged(encoder, reference)


# --- kNN ----------------------------------------------------------------------------------------


def naive_knn_top1(train_f, train_l, val_f, val_l, num_classes, k, temperature):
    """Weighted kNN, one query at a time in float64: cosine similarity, the k most similar
    training images vote for their class with weight exp(sim / t)."""
    train_f, val_f = train_f.double(), val_f.double()
    correct = 0
    for q, label in zip(val_f, val_l.tolist()):
        sims = [(float(q @ t / (q.norm() * t.norm())), c)
                for t, c in zip(train_f, train_l.tolist())]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, c in sims[:k]:
            votes[c] += math.exp(sim / temperature)
        correct += max(range(num_classes), key=lambda c: votes[c]) == label
    return 100.0 * correct / len(val_l)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layer_k_is_the_output_of_the_first_k_head_layers(layer, pretrained_checkpoint):
    """--layer 0 is h; 1 is ReLU(BN(W1 h)) in inference mode, written out here; 2 (the last of
    the tiny model's 2) is z = g(h), what the loss sees. The frozen module holds exactly the
    checkpoint's tensors it uses."""
    ckpt = load_checkpoint(pretrained_checkpoint)
    encoder = load_encoder(ckpt, pretrained_checkpoint, layer=layer)
    model = build_model(ckpt["config"], ckpt["model"]).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        h, z = model(x)
        linear, bn = model.head.layers[0][0], model.head.layers[0][1]
        first = F.relu((h @ linear.weight.T - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
                       * bn.weight + bn.bias)
        expected = [h, first, z][layer]
        torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-5)
    assert encoder.out_dim == expected.shape[1] and not encoder.training
    kept = {k for k in ckpt["model"] if k.startswith("encoder.") or
            any(k.startswith(f"head.layers.{i}.") for i in range(layer))}
    assert len(encoder.state_dict()) == len(kept)
    with pytest.raises(UserError, match="--layer 3: the projection head has 2 layer"):
        load_encoder(ckpt, pretrained_checkpoint, layer=3)


def test_knn_equals_naive_weighted_knn():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    train_l = torch.randint(0, 4, (300,), generator=g)
    val_l = torch.randint(0, 4, (100,), generator=g)
    train_f = centres[train_l] + 1.5 * torch.randn(300, 16, generator=g)
    val_f = centres[val_l] + 1.5 * torch.randn(100, 16, generator=g)
    for k in (1, 20, 200):
        top1 = knn_accuracy(train_f, train_l, val_f, val_l, 4, k, 0.1)["top1"]
        expected = naive_knn_top1(train_f, train_l, val_f, val_l, 4, k, 0.1)
        assert abs(top1 - expected) < 1e-4, (k, top1, expected)
    assert 40 < expected < 100  # neither trivial nor chance, so the comparison means something


# --- end to end from a pretraining checkpoint ---------------------------------------------------


def read_json(path):
    return json.loads(path.read_text())


def test_full_protocol_end_to_end(pretrained_checkpoint, tiny_folder):
    proc = run_script("linear_eval.py", "--checkpoint", pretrained_checkpoint, "--epochs", "2",
                      "--batch-size", "16", "--workers", "0")
    # beside the checkpoint, named after what differs from the paper's protocol
    result = read_json(pretrained_checkpoint.parent / "linear_eval_e2_b16.json")
    assert result["protocol"] == "augmented" and result["random_init"] is False
    assert result["dataset"] == "folder" and result["num_classes"] == 4
    assert 0 <= result["top1"] <= 100 and "top5" not in result  # 4 classes: top-5 tells nothing
    # a folder of 32 px images takes CIFAR-10's preset (weight decay 0), not ImageNet's (1e-6)
    assert result["config"]["epochs"] == 2 and result["config"]["weight_decay"] == 0.0
    assert "epoch 2/2" in proc.stdout and "top-1" in proc.stdout


def test_cached_features_end_to_end(pretrained_checkpoint, tmp_path):
    out = tmp_path / "cached.json"
    run_script("linear_eval.py", "--checkpoint", pretrained_checkpoint, "--cached-features",
               "--knn", "5", "--epochs", "30", "--batch-size", "16", "--lr", "2", "--workers", "0",
               "--out", out)
    result = read_json(out)
    assert result["protocol"] == "cached-features"
    # the tiny folder's classes are colours: any encoder separates them, linearly and by kNN
    assert result["top1"] >= 75.0 and result["knn_top1"] >= 75.0, result


def test_image_size_evaluates_at_that_resolution(pretrained_checkpoint, tiny_folder, tmp_path,
                                                 monkeypatch):
    """--image-size 24 on an encoder pretrained at 32 px: the features are the frozen encoder's
    on each evaluation image resized whole to 24 px by TF's bicubic resize (augment.crop_resize,
    itself tested against TensorFlow), computed here image by image, and the results say 24."""
    seen = []

    def spy(encoder, dataset, size, *args, **kwargs):
        feats, labels = extract_features(encoder, dataset, size, *args, **kwargs)
        seen.append((encoder, dataset, size, feats))
        return feats, labels

    monkeypatch.setattr(linear_eval, "extract_features", spy)
    results = linear_eval.run(*linear_eval.resolve_config([
        "--checkpoint", str(pretrained_checkpoint), "--epochs", "0", "--knn", "5",
        "--image-size", "24", "--workers", "0", "--out", str(tmp_path / "r.json")]))
    assert results["encoder"]["image_size"] == 24 and read_json(tmp_path / "r.json")["knn_top1"] >= 0
    encoder, val, size, feats = seen[0]
    assert size == 24 and feats.shape[0] == len(val.samples)
    for i in (0, len(val.samples) - 1):
        with Image.open(val.samples[i][0]) as picture:
            image = pil_to_tensor(picture.convert("RGB"))
        box = torch.tensor([[0, 0, 32, 32]])
        x = crop_resize(image[None].float(), box, 24).round().clamp(0, 255) / 255  # 1 x 3 x 24 x 24
        with torch.no_grad(), precision_for("auto", torch.device("cpu"))[1]:
            h = encoder(x.contiguous(memory_format=torch.channels_last)).float()[0]
        assert (h - feats[i]).norm() <= 2e-2 * h.norm()


def test_the_evaluation_view_in_memory_is_clipped_as_the_authors_and_the_folders():
    """Images in memory resized for the evaluation (here 32 -> 40 and 32 -> 24 px) are clipped
    to [0, 1] after the bicubic resize, as the authors' preprocess_for_eval and as the image
    folders' uint8 view (center_crop_resize), which they equal to its rounding; noise makes the
    resize overshoot by far more than that."""
    from data import InMemory, eval_batches
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    data = InMemory(images, torch.zeros(6, dtype=torch.long), ["a"])
    for size in (40, 24):
        x, _ = next(eval_batches(data, size, 6, CPU, 0))
        raw = crop_resize(images.float() / 255, torch.tensor([[0, 0, 32, 32]] * 6), size)
        assert raw.min() < -0.05 and raw.max() > 1.05  # what the clip is there for
        assert x.shape == (6, 3, size, size) and x.min() >= 0 and x.max() <= 1
        folder = torch.stack([center_crop_resize(image.permute(1, 2, 0), size) for image in images]) / 255
        assert (x - folder).abs().max() <= 0.5 / 255 + 1e-6


def test_results_of_two_checkpoints_in_one_folder_or_two_evaluations_stay_apart(
        pretrained_checkpoint, tmp_path):
    """Converted checkpoints share a folder (r18.pt, r18sk.pt): each has its own results file;
    another evaluation of the same checkpoint goes to a file named after what it measured,
    beside the first (no flag needed); the same evaluation again replaces its own; a file of
    that name holding another evaluation (--out), a checkpoint or a file of the user's is not
    written over."""
    for name in ("r18.pt", "r18b.pt"):
        shutil.copy(pretrained_checkpoint, tmp_path / name)
        run_script("linear_eval.py", "--checkpoint", tmp_path / name, "--epochs", 0, "--knn", 5,
                   "--workers", 0)
    first, second = tmp_path / "r18.linear_eval_e0_knn5.json", tmp_path / "r18b.linear_eval_e0_knn5.json"
    assert read_json(first)["checkpoint"] == str(tmp_path / "r18.pt")
    assert read_json(second)["checkpoint"] == str(tmp_path / "r18b.pt")
    ckpt = load_checkpoint(tmp_path / "r18.pt")
    assert read_json(first)["checkpoint_step"] == ckpt["step"] and read_json(first)["checkpoint_digest"]
    before = first.read_bytes()
    run_script("linear_eval.py", "--checkpoint", tmp_path / "r18.pt", "--epochs", 0, "--knn", 7,
               "--workers", 0)
    assert first.read_bytes() == before and read_json(tmp_path / "r18.linear_eval_e0_knn7.json")["knn_k"] == 7
    error = error_of(linear_eval.main, "--checkpoint", tmp_path / "r18.pt", "--epochs", 0,
                     "--knn", 7, "--workers", 0, "--out", first)
    assert error == (f"linear_eval.py: error: {first} holds the results of another evaluation "
                     f"(--knn 5 there (7 here)): pass --out to keep both")
    assert first.read_bytes() == before
    run_script("linear_eval.py", "--checkpoint", tmp_path / "r18.pt", "--epochs", 0, "--knn", 5,
               "--workers", 1)  # how it runs may differ
    assert read_json(first)["config"]["workers"] == 1
    (tmp_path / "notes.json").write_text("{}")
    for target in (tmp_path / "r18.pt", tmp_path / "notes.json"):
        before = target.read_bytes()
        error = error_of(linear_eval.main, "--checkpoint", tmp_path / "r18.pt", "--epochs", 0,
                         "--knn", 5, "--workers", 0, "--out", target)
        assert f"--out {target} exists and is not a file this command writes" in error
        assert target.read_bytes() == before


def test_cached_features_refuse_a_batch_larger_than_the_data(pretrained_checkpoint, tmp_path):
    """Its learning rate is scaled by the batch: one that cannot exist is refused, as without
    --cached-features."""
    for cached in ([], ["--cached-features"]):
        error = error_of(linear_eval.main, "--checkpoint", pretrained_checkpoint, *cached,
                         "--epochs", 1, "--out", tmp_path / "x.json")
        assert "48 training images are fewer than one batch of 512: lower --batch-size to at most " \
               "48" in error
    assert not (tmp_path / "x.json").exists()


def test_random_init_transfer_and_knn_end_to_end(pretrained_checkpoint, tmp_path):
    """--random-init on another folder of 48 px images (resized to the encoder's 32 px) whose
    training labels are shuffled, so kNN is far from 100% and its exact value is a real check:
    the script's --knn equals the naive loop on features computed here independently."""
    other = make_image_folder(tmp_path / "other", classes=3, train_per_class=10, val_per_class=10,
                              size=48, seed=5)
    files = sorted((other / "train").glob("*/*.png"))
    for i, j in enumerate(torch.randperm(len(files), generator=torch.Generator().manual_seed(0))):
        files[i].rename(files[i].parent.parent / f"class{j.item() % 3}" / f"shuffled{i:03d}.png")
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    shutil.copy(pretrained_checkpoint, ckpt_dir / "ckpt.pt")
    run_script("linear_eval.py", "--checkpoint", ckpt_dir / "ckpt.pt", "--random-init",
               "--cached-features", "--knn", "3", "--epochs", "1", "--batch-size", "8",
               "--workers", "0", "--data-dir", other)
    result = read_json(ckpt_dir / "linear_eval_other_random_cached_e1_b8_knn3.json")  # beside it
    assert result["random_init"] is True and result["num_classes"] == 3
    assert result["encoder"]["image_size"] == 32

    torch.manual_seed(0)  # --seed 0: the script's random initialisation
    encoder = load_encoder(load_checkpoint(pretrained_checkpoint), "", random_init=True)
    train, val = (load_split("folder", other, split, 32, CPU) for split in ("train", "val"))
    train_f, train_l = extract_features(encoder, train, 32, 64, CPU)
    val_f, val_l = extract_features(encoder, val, 32, 64, CPU)
    assert train_f.shape == (30, 64)
    expected = naive_knn_top1(train_f, train_l, val_f, val_l, 3, 3, 0.1)
    assert abs(result["knn_top1"] - expected) < 1e-4, (result["knn_top1"], expected)
    assert expected < 90


def test_torchrun_matches_one_process(pretrained_checkpoint, tmp_path):
    """Two processes (gradients averaged, features gathered) give the single-process result."""
    args = ["--checkpoint", pretrained_checkpoint, "--cached-features", "--knn", "5", "--epochs",
            "3", "--batch-size", "16", "--lr", "1", "--workers", "0", "--device", "cpu"]
    run_script("linear_eval.py", *args, "--out", tmp_path / "one.json")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(ROOT / "linear_eval.py"), *map(str, args),
                           "--out", str(tmp_path / "two.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = read_json(tmp_path / "one.json"), read_json(tmp_path / "two.json")
    assert two["world_size"] == 2
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-5
    for key in ("top1", "knn_top1", "train_top1"):
        assert abs(one[key] - two[key]) < 1e-4, key


# --- bad checkpoints: one line, non-zero exit ---------------------------------------------------


def error_line(argv):
    """The message main() exits with (what the user sees on stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("linear_eval.py: error: ")
    assert "\n" not in message
    return message


def test_missing_checkpoint_gives_one_line(tmp_path):
    proc = run_script("linear_eval.py", "--checkpoint", tmp_path / "nope.pt", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no checkpoint at" in lines[0], proc.stderr
    assert "--checkpoint is required" in error_line([])


def test_bad_checkpoints_give_one_line(pretrained_checkpoint, tiny_folder, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    assert "cannot read checkpoint" in error_line(["--checkpoint", str(garbage)])

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pretrained_checkpoint.read_bytes()[:5000])
    assert "cannot read checkpoint" in error_line(["--checkpoint", str(truncated)])

    weights_only = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, weights_only)
    assert "not a checkpoint" in error_line(["--checkpoint", str(weights_only)])

    ckpt = load_checkpoint(pretrained_checkpoint)
    ckpt["config"]["width_multiplier"] = 0.25  # stored weights are 0.125 wide
    other_arch = tmp_path / "other_arch.pt"
    torch.save(ckpt, other_arch)
    assert "does not match the model" in error_line(
        ["--checkpoint", str(other_arch), "--data-dir", str(tiny_folder), "--workers", "0"])

    ckpt["config"]["arch"] = "vgg16"
    unknown = tmp_path / "unknown_arch.pt"
    torch.save(ckpt, unknown)
    assert "does not describe a model" in error_line(
        ["--checkpoint", str(unknown), "--data-dir", str(tiny_folder), "--workers", "0"])


# --- the neighbours picture -------------------------------------------------------------------


def test_neighbours_are_the_nearest_by_cosine(monkeypatch):
    """Each query's row holds the 8 training images of highest cosine similarity, in order (a
    naive float64 loop), and every caption is the image's class."""
    from data import InMemory
    g = torch.Generator().manual_seed(0)
    classes = ["cat", "dog", "frog"]
    train = InMemory(torch.randint(0, 256, (30, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.arange(30) % 3, classes)
    val = InMemory(torch.randint(0, 256, (10, 3, 32, 32), generator=g, dtype=torch.uint8),
                   torch.arange(10) % 3, classes)
    train_f, val_f = torch.randn(30, 5, generator=g), torch.randn(10, 5, generator=g)
    shown = {}
    monkeypatch.setattr(linear_eval, "save_grid", lambda path, rows, headers, captions:
                        shown.update(rows=rows, headers=headers, captions=captions) or path)
    linear_eval.save_neighbours("nn.png", val, train, val_f, val.labels, train_f, train.labels, 32,
                                CPU, queries=4)
    queries = [0, 3, 6, 9]  # evenly spaced in the split
    assert shown["rows"].shape == (4, 9, 3, 32, 32) and len(shown["headers"]) == 9
    for row, q in enumerate(queries):
        cos = [float(val_f[q].double() @ train_f[i].double() /
                     (val_f[q].double().norm() * train_f[i].double().norm())) for i in range(30)]
        nearest = sorted(range(30), key=lambda i: -cos[i])[:8]
        expected = torch.stack([val.images[q], *train.images[nearest]]).float() / 255
        torch.testing.assert_close(shown["rows"][row], expected)
        assert shown["captions"][row] == [classes[q % 3], *(classes[i % 3] for i in nearest)]


def test_show_neighbours_writes_the_picture_only(pretrained_checkpoint, tmp_path):
    """The command writes one PNG (queries rows of query + 8 neighbours) and no results file;
    a path in a missing folder is made, an unknown extension is one line."""
    from PIL import Image
    out = tmp_path / "pictures" / "nn.png"
    before = sorted(pretrained_checkpoint.parent.iterdir())
    run_script("linear_eval.py", "--checkpoint", pretrained_checkpoint, "--show-neighbours", out,
               "--queries", 3, "--workers", 0)
    assert sorted(pretrained_checkpoint.parent.iterdir()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["nn.png"]
    picture = Image.open(out)
    assert picture.width == (9 * 34 + 2) * 3 and picture.height > 3 * 34 * 3  # 32 px cells, 3x
    assert "cannot write" in error_of(main, "--checkpoint", pretrained_checkpoint, "--workers", 0,
                                      "--show-neighbours", tmp_path / "nn.unknown")


def test_accuracies_that_tell_nothing_are_not_reported(pretrained_checkpoint, tmp_path):
    """A top-k only below the number of classes (top-5 of 3 classes is always 100%) and, for
    kNN, within its k neighbours (one neighbour scores one class); a folder of one class is
    refused by every script that classifies (every answer would be right)."""
    import finetune
    g = torch.Generator().manual_seed(0)
    train_f, val_f = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    train_l, val_l = torch.randint(0, 12, (200,), generator=g), torch.randint(0, 12, (50,), generator=g)
    assert set(knn_accuracy(train_f, train_l, val_f, val_l, 12, 1, 0.1)) == {"top1"}
    assert set(knn_accuracy(train_f, train_l, val_f, val_l, 12, 5, 0.1)) == {"top1", "top5"}
    assert set(knn_accuracy(train_f, train_l % 3, val_f, val_l % 3, 3, 20, 0.1)) == {"top1"}
    one = make_image_folder(tmp_path / "one", classes=1, train_per_class=16, val_per_class=4)
    for main, args in ((linear_eval.main, ["--knn", 5, "--epochs", 0]),
                       (finetune.main, ["--label-fraction", 1.0, "--out-dir", tmp_path / "ft"])):
        error = error_of(main, "--checkpoint", pretrained_checkpoint, "--data-dir", one, *args,
                         "--batch-size", 8, "--workers", 0)
        assert "the evaluation images are of 1 class (class0): classifying needs two or more" \
            in error, error


def test_later_stages_take_the_checkpoints_data_unless_told(tmp_path):
    """linear_eval, finetune and distill read --dataset, --data-dir and the evaluation split from
    the checkpoint's configuration (data.stage_data); other data needs its folder, and a held-out
    fraction other than the checkpoint's, on its own data, would evaluate on trained images."""
    stored = dict(dataset="folder", data_dir=str(tmp_path), val_fraction=0.1, val_dir="")
    assert stage_data({}, stored) == stored
    assert stage_data({"data_dir": str(tmp_path / "other")}, stored)["val_fraction"] == 0.0
    with pytest.raises(UserError, match="--data-dir is needed: cifar100 is not the checkpoint's"):
        stage_data({"dataset": "cifar100"}, stored)
    with pytest.raises(UserError, match="--val-fraction 0.2 differs from the checkpoint's 0.1"):
        stage_data({"val_fraction": 0.2}, stored)
