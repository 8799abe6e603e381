"""Tests of finetune.py: the labelled subset, the kept head layers, the optimizer split, the
evaluation, and runs as a user would start them (from the tiny pretraining checkpoint)."""
import collections
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import finetune
from runs import UserError, load_checkpoint
from conftest import error_of, run_script
from data import InMemory, class_balanced, image_names, read_subset_file
from evaluation import evaluate
from lars import LARS
from model import build_classifier, build_classifier_optimizers, build_model, finetuned_classifier
from pretrain import Config

TINY = dict(arch="resnet18", width_multiplier=0.125, image_size=32)


# --- the labelled subset ----------------------------------------------------------------------


def test_subset_is_class_balanced_sized_and_deterministic():
    # CIFAR-10-like: 10 classes of 5000, shuffled; 1% must be exactly 50 per class
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), 5000)).tolist()
    subset = class_balanced(labels, 0.01, seed=0)
    counts = collections.Counter(labels[i] for i in subset)
    assert len(subset) == 500 and len(set(subset)) == 500
    assert counts == {c: 50 for c in range(10)}
    assert subset == sorted(subset) and 0 <= subset[0] and subset[-1] < len(labels)
    assert class_balanced(labels, 0.01, seed=0) == subset  # same seed: same images
    other = class_balanced(labels, 0.01, seed=1)
    assert other != subset and collections.Counter(labels[i] for i in other) == counts
    # 10%: 500 per class
    assert collections.Counter(labels[i] for i in class_balanced(labels, 0.1, 0)) == \
        {c: 500 for c in range(10)}


def test_subset_keeps_every_class_when_classes_are_small_or_unequal():
    labels = [0] * 1000 + [1] * 30 + [2] * 3 + [3] * 1
    counts = collections.Counter(labels[i] for i in class_balanced(labels, 0.1, seed=3))
    assert counts == {0: 100, 1: 3, 2: 1, 3: 1}  # round(0.1 n), at least one image per class
    assert len(class_balanced(labels, 1.0, 0)) == len(labels)


def test_subset_file_round_trip_and_authors_style_names(tiny_folder, tmp_path):
    train = torchvision.datasets.ImageFolder(str(tiny_folder / "train"))
    chosen = class_balanced(train.targets, 0.25, seed=0)
    names = image_names(train, chosen)
    assert names[0].count("/") == 1  # <class>/<file>: file names repeat across classes here
    (tmp_path / "subset.txt").write_text("\n".join(names) + "\n")
    assert read_subset_file(tmp_path / "subset.txt", train) == chosen
    # a bare name that exists in several classes is ambiguous; an unknown one is an error
    (tmp_path / "ambiguous.txt").write_text("000.png\n")
    with pytest.raises(UserError, match="names 4 images"):
        read_subset_file(tmp_path / "ambiguous.txt", train)
    (tmp_path / "missing.txt").write_text("class0/000.png\nclass9/nope.png\n")
    with pytest.raises(UserError, match="1 of 2 images"):
        read_subset_file(tmp_path / "missing.txt", train)
    # the authors' ImageNet lists: unique file names without the class folder
    for c in ("n01440764", "n01443537"):
        (tmp_path / "imnet" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "imnet" / c / f"{c}_{i}.JPEG")
    imnet = torchvision.datasets.ImageFolder(str(tmp_path / "imnet"))
    (tmp_path / "1percent.txt").write_text("n01443537_2.JPEG\nn01440764_0.JPEG\n")
    indices = read_subset_file(tmp_path / "1percent.txt", imnet)
    assert [imnet.samples[i][0].split("/")[-1] for i in indices] == \
        ["n01440764_0.JPEG", "n01443537_2.JPEG"]
    # torchvision's CIFAR in memory has no files: a subset is written and read as indices
    arrays = InMemory(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10), list("ab"))
    assert image_names(arrays, [3, 7]) == ["3", "7"]
    (tmp_path / "indices.txt").write_text("7\n3\n")
    assert read_subset_file(tmp_path / "indices.txt", arrays) == [3, 7]


# --- the network: encoder + K head layers + classifier ----------------------------------------


def tiny_pretrained(proj_layers):
    torch.manual_seed(0)
    config = dataclasses.asdict(Config(**TINY, proj_layers=proj_layers))
    simclr = build_model(config)
    for m in simclr.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    return config, simclr


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_ft_proj_layer_keeps_the_first_k_head_layers_and_trains_all_of_them(k):
    config, simclr = tiny_pretrained(proj_layers=3)  # v2's 3-layer head
    model = build_classifier(config, 10, k, simclr.state_dict())
    state, pretrained = model.state_dict(), simclr.state_dict()
    # exactly the encoder, head layers 0..k-1 and the classifier, with the pretrained values
    expected = {n for n in pretrained if n.startswith("encoder.")}
    expected |= {n.replace("head.layers.", "head.") for n in pretrained
                 if n.startswith("head.layers.") and int(n.split(".")[2]) < k}
    assert set(state) == expected | {"fc.weight", "fc.bias"}
    for name in expected:
        source = name if name.startswith("encoder.") else name.replace("head.", "head.layers.", 1)
        assert torch.equal(state[name], pretrained[source]), name
    h_dim = simclr.encoder.out_dim
    assert model.fc.in_features == (128 if k == 3 else h_dim)
    # in inference mode the kept layers compute the head's first k layers: for k = 3, z itself
    x = torch.rand(6, 3, 32, 32)
    simclr.eval()
    model.eval()
    with torch.no_grad():
        h = simclr.encoder(x)
        expected_features = h
        for layer in simclr.head.layers[:k]:
            expected_features = layer(expected_features)
        assert torch.allclose(model.head(model.encoder(x)), expected_features, atol=1e-5)
        if k == 3:
            assert torch.allclose(model.head(model.encoder(x)), simclr(x)[1], atol=1e-5)
    # every kept weight is trained: it gets a non-zero gradient; only the last head layer's BN
    # shift stays frozen, as in pretraining
    model.train()
    F.cross_entropy(model(x), torch.arange(6) % 10).backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == ({"head.2.1.bias"} if k == 3 else set())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ft_proj_layer_beyond_the_head_is_a_user_error():
    config, simclr = tiny_pretrained(proj_layers=2)
    with pytest.raises(ValueError, match="has 2 layer"):  # finetune.py: one line (test below)
        build_classifier(config, 10, 3, simclr.state_dict())


def test_the_new_classifier_is_outside_lars_adaptation():
    config, simclr = tiny_pretrained(proj_layers=2)
    model = build_classifier(config, 10, 1, simclr.state_dict())
    body, head = build_classifier_optimizers(model, "lars", lr=0.1, weight_decay=0.0, momentum=0.9)
    assert isinstance(body, LARS) and isinstance(head, torch.optim.SGD)
    body_ids = {id(p) for g in body.param_groups for p in g["params"]}
    head_ids = {id(p) for g in head.param_groups for p in g["params"]}
    assert head_ids == {id(model.fc.weight), id(model.fc.bias)} and not body_ids & head_ids
    assert body_ids | head_ids == {id(p) for p in model.parameters() if p.requires_grad}
    # one step: the classifier moves by lr x gradient (no trust ratio eta ||w|| / ||g||)
    before = model.fc.weight.detach().clone()
    F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.arange(4)).backward()
    grad = model.fc.weight.grad.clone()
    body.step()
    head.step()
    assert torch.allclose(model.fc.weight, before - 0.1 * grad, atol=1e-7)


def test_evaluate_matches_a_naive_top1_top5():
    torch.manual_seed(0)
    images, y = torch.randint(0, 256, (300, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 12, (300,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 12))
    data = InMemory(images, y, [str(c) for c in range(12)])
    accuracy = evaluate(model, data, 2, 64, torch.device("cpu"))
    top1, top5 = accuracy["top1"], accuracy["top5"]
    logits = model.double()(images.double() / 255).detach().numpy()  # after evaluate: float64
    ranks = (-logits).argsort(axis=1)
    assert top1 == pytest.approx(100 * np.mean(ranks[:, 0] == y.numpy()), abs=1e-4)
    assert top5 == pytest.approx(100 * np.mean([y[i].item() in ranks[i, :5] for i in range(300)]),
                                 abs=1e-4)
    assert top1 < top5 < 100


# --- runs as a user starts them ----------------------------------------------------------------

TINY_FT = ["--batch-size", "8", "--workers", "0", "--log-every", "1000"]


def test_finetune_end_to_end_from_a_pretraining_checkpoint(tiny_folder, pretrained_checkpoint,
                                                           tmp_path):
    out = tmp_path / "ft"
    proc = run_script("finetune.py", "--checkpoint", pretrained_checkpoint, "--data-dir",
                      tiny_folder, "--label-fraction", "0.5", "--epochs", "10", *TINY_FT,
                      "--out-dir", out)
    results = json.loads((out / "results.json").read_text())
    assert results["labeled_images"] == 24 and results["ft_proj_layer"] == 1
    assert results["top1"] > 50  # 4 colour classes: chance is 25%
    assert f"top-1 {results['top1']:.2f}%" in proc.stdout
    assert len([n for n in (out / "subset.txt").read_text().splitlines() if not n.startswith("#")]) == 24
    # the checkpoint is distill.py's teacher: loadable with weights_only, and it scores the same
    ckpt = load_checkpoint(out / "finetuned.pt")
    assert ckpt["config"]["num_classes"] == 4 and ckpt["config"]["pretrain"]["proj_layers"] == 2
    teacher = finetuned_classifier(load_checkpoint(out / "finetuned.pt"))
    val = torchvision.datasets.ImageFolder(str(tiny_folder / "val"),
                                           torchvision.transforms.functional.pil_to_tensor)
    assert evaluate(teacher, val, 32, 16, torch.device("cpu")) == \
        pytest.approx({"top1": results["top1"]})  # 4 classes: no top-5
    assert "top5" not in results
    # the saved list repeats the run's labelled images
    again = tmp_path / "again"
    run_script("finetune.py", "--checkpoint", pretrained_checkpoint, "--subset-file",
               out / "subset.txt", "--epochs", "1", *TINY_FT, "--out-dir", again)
    assert (again / "subset.txt").read_text() == (out / "subset.txt").read_text()


def test_from_scratch_runs_and_ignores_the_pretrained_weights(tiny_folder, pretrained_checkpoint,
                                                              tmp_path):
    out = tmp_path / "scratch"
    proc = run_script("finetune.py", "--checkpoint", pretrained_checkpoint, "--from-scratch",
                      "--label-fraction", "0.5", "--epochs", "1", "--ft-proj-layer", "0",
                      *TINY_FT, "--out-dir", out)
    assert "random init" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["from_scratch"] and 0 <= results["top1"] <= 100
    # without a checkpoint, the --arch flags give the network
    run_script("finetune.py", "--from-scratch", "--dataset", "folder", "--data-dir", tiny_folder,
               "--arch", "resnet18", "--width-multiplier", "0.125", "--image-size", "32",
               "--label-fraction", "0.5", "--epochs", "1", *TINY_FT, "--out-dir", tmp_path / "s2")
    assert load_checkpoint(tmp_path / "s2" / "finetuned.pt")["config"]["pretrain"][
        "width_multiplier"] == 0.125


@pytest.mark.parametrize("args, message", [
    (["--label-fraction", "0"], "--label-fraction must be > 0, not 0.0"),
    (["--label-fraction", "1.5"], "--label-fraction must be <= 1, not 1.5"),
    (["--ft-proj-layer", "3"], "projection head has 2 layer(s)"),
    (["--batch-size", "64"], "fewer than one batch"),
    (["--subset-file", "/nonexistent/list.txt"], "cannot read --subset-file"),
])
def test_bad_input_is_one_line_without_traceback(pretrained_checkpoint, tmp_path, args, message):
    error = error_of(finetune.main, "--checkpoint", pretrained_checkpoint, *TINY_FT,
                     "--label-fraction", "0.5", *args, "--out-dir", tmp_path / "run")
    assert error.startswith("finetune.py: error:") and message in error
    assert not (tmp_path / "run").exists()
