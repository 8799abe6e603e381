"""Tests of distill.py: Eq. 2 and Eq. 3 against a naive float64 computation, their gradients,
a student converging to a fixed teacher, and the whole chain pretrain -> finetune -> distill as
a user runs it on a tiny image folder."""
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn

import distill
from conftest import error_of, run_script
from distill import distillation_loss, semi_supervised_loss
from model import build_model, load_state
from runs import load_checkpoint


# --- Eq. 2 and Eq. 3 --------------------------------------------------------------------------


def naive_eq2(student, teacher, tau):
    """-1/n sum_x sum_y P_T(y|x; tau) log P_S(y|x; tau), in float64 with plain loops."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        z_t = sum(math.exp(t / tau) for t in t_row)
        log_z_s = math.log(sum(math.exp(s / tau) for s in s_row))
        total -= sum(math.exp(t / tau) / z_t * (s / tau - log_z_s) for s, t in zip(s_row, t_row))
    return total / len(student)


def naive_ce(logits, labels):
    return -sum(row[y] - math.log(sum(math.exp(v) for v in row))
                for row, y in zip(logits.tolist(), labels.tolist())) / len(labels)


@pytest.mark.parametrize("tau", [1.0, 0.1, 2.0])
def test_distillation_loss_is_eq2(tau):
    torch.manual_seed(0)
    student, teacher = 3 * torch.randn(7, 10), 3 * torch.randn(7, 10)
    assert distillation_loss(student, teacher, tau).item() == \
        pytest.approx(naive_eq2(student, teacher, tau), rel=1e-5)
    # bf16 logits (CUDA autocast) are upcast, not computed in bf16
    assert distillation_loss(student.bfloat16(), teacher.bfloat16(), tau).dtype == torch.float32


def test_eq3_mixes_the_supervised_and_the_distillation_terms():
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labeled, labels = torch.randn(4, 5), torch.tensor([0, 3, 4, 1])
    for alpha in (0.0, 0.3, 1.0):
        expected = (1 - alpha) * naive_ce(labeled, labels) + alpha * naive_eq2(student, teacher, 2.0)
        assert semi_supervised_loss(student, teacher, 2.0, alpha, labeled, labels).item() == \
            pytest.approx(expected, rel=1e-5)
    # alpha 1: no labels needed
    assert semi_supervised_loss(student, teacher, 1.0, 1.0).item() == \
        pytest.approx(naive_eq2(student, teacher, 1.0), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gradient_is_zero_when_the_student_matches_the_teacher(tau):
    torch.manual_seed(2)
    teacher = 4 * torch.randn(8, 10)
    student = teacher.clone().requires_grad_()
    distillation_loss(student, teacher, tau).backward()
    assert student.grad.abs().max() < 1e-7
    # and elsewhere it is (P_S - P_T) / (tau n): the student is pulled towards the teacher
    student = torch.randn(8, 10, requires_grad=True)
    distillation_loss(student, teacher, tau).backward()
    expected = (torch.softmax(student.detach().double() / tau, 1)
                - torch.softmax(teacher.double() / tau, 1)) / (tau * 8)
    assert torch.allclose(student.grad.double(), expected, atol=1e-7)
    # in Eq. 3 only the supervised term is left to pull when the distillation term is satisfied
    student = teacher.clone().requires_grad_()
    labeled = torch.randn(3, 10, requires_grad=True)
    semi_supervised_loss(student, teacher, tau, 0.5, labeled, torch.tensor([1, 2, 3])).backward()
    assert student.grad.abs().max() < 1e-7 and labeled.grad.abs().max() > 1e-3


def test_a_student_trained_on_a_fixed_teacher_comes_to_agree_with_it():
    torch.manual_seed(3)
    x = torch.randn(64, 16)  # tiny "unlabeled data"
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5)).requires_grad_(False)
    teacher_logits = 3 * teacher(x)
    student = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 5))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9)
    first = distillation_loss(student(x), teacher_logits).item()
    for _ in range(500):
        loss = distillation_loss(student(x), teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    entropy = distillation_loss(teacher_logits, teacher_logits).item()  # the minimum of Eq. 2
    assert loss.item() - entropy < 0.02 * (first - entropy)
    agreement = (student(x).argmax(1) == teacher_logits.argmax(1)).float().mean().item()
    assert agreement >= 0.95


# --- pretrain -> finetune -> distill on a tiny image folder ----------------------------------

TINY_RUN = ["--workers", "0", "--log-every", "1000"]


def test_distill_end_to_end(tiny_folder, finetuned_checkpoint, tmp_path):
    out = tmp_path / "student"
    proc = run_script("distill.py", "--teacher", finetuned_checkpoint, "--epochs", "2",
                      "--batch-size", "16", *TINY_RUN, "--out-dir", out)
    results = json.loads((out / "results.json").read_text())
    teacher = json.loads((finetuned_checkpoint.parent / "results.json").read_text())
    # the frozen teacher scores what finetune.py measured
    assert results["teacher_top1"] == pytest.approx(teacher["top1"])
    assert 0 <= results["student_top1"] <= 100 and results["unlabeled_images"] == 48
    assert f"student top-1 {results['student_top1']:.2f}%" in proc.stdout
    # student.pt has the pretraining-checkpoint format: what linear_eval.py loads
    ckpt = load_checkpoint(out / "student.pt")
    assert ckpt["config"]["proj_head"] == "none" and all(k.startswith("encoder.")
                                                         for k in ckpt["model"])
    model = build_model(ckpt["config"])
    load_state(model, ckpt["model"])  # strict
    assert ckpt["classifier"]["weight"].shape == (4, model.encoder.out_dim)
    # ... and finetune.py fine-tunes it with its defaults (no projection head: layer 0), as its
    # --help says (once the default --ft-proj-layer 1 was refused)
    run_script("finetune.py", "--checkpoint", out / "student.pt", "--label-fraction", "0.5",
               "--epochs", "1", "--batch-size", "8", *TINY_RUN, "--out-dir", tmp_path / "ft-student")
    assert load_checkpoint(tmp_path / "ft-student")["config"]["ft_proj_layer"] == 0


def test_distill_with_labels_and_a_smaller_student(finetuned_checkpoint, tmp_path):
    out = tmp_path / "eq3"
    run_script("distill.py", "--teacher", finetuned_checkpoint, "--alpha", "0.5",
               "--label-fraction", "0.25", "--width-multiplier", "0.0625", "--epochs", "1",
               "--batch-size", "16", *TINY_RUN, "--out-dir", out)
    names = [n for n in (out / "subset.txt").read_text().splitlines() if not n.startswith("#")]
    assert len(names) == 12  # 3 of each class's 12
    ckpt = load_checkpoint(out / "student.pt")
    assert ckpt["config"]["width_multiplier"] == 0.0625 and ckpt["distill_config"]["alpha"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["--alpha", "0.5"], "give --label-fraction or --subset-file"),
    (["--label-fraction", "0.1"], "labels are unused with --alpha 1"),
    (["--temperature", "0"], "--temperature must be > 0, not 0.0"),
    (["--alpha", "1.5"], "--alpha must be <= 1, not 1.5"),
])
def test_bad_input_is_one_line_without_traceback(finetuned_checkpoint, tmp_path, args, message):
    error = error_of(distill.main, "--teacher", finetuned_checkpoint, *args, *TINY_RUN,
                     "--out-dir", tmp_path / "run")
    assert error.startswith("distill.py: error:") and message in error
    assert not (tmp_path / "run").exists()


def test_a_pretraining_checkpoint_is_not_a_teacher(pretrained_checkpoint, tmp_path):
    error = error_of(distill.main, "--teacher", pretrained_checkpoint, "--out-dir", tmp_path)
    assert "is a pretraining checkpoint (pretrain.py's ckpt.pt): " \
        "pretrain.py --resume, linear_eval.py --checkpoint and finetune.py --checkpoint take it" in error


def test_a_teacher_of_other_classes_is_refused(finetuned_checkpoint, tiny_folder, tmp_path):
    """As many classes under other names: the teacher's logits would be read as the wrong
    classes (once it printed a top-1 and exited 0)."""
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    for split in ("train", "val"):
        for i, name in enumerate(["airplane", "bird", "ship", "truck"]):
            (other / split / f"class{i}").rename(other / split / name)
    error = error_of(distill.main, "--teacher", finetuned_checkpoint, "--data-dir", other,
                     *TINY_RUN, "--out-dir", tmp_path / "run")
    assert "the teacher was fine-tuned on 4 classes (class0, class1, class2, class3), the " \
           "evaluation images have 4 (airplane, bird, ship, truck)" in error
    assert not (tmp_path / "run").exists()
