"""What a new user runs into, tried on purpose: every way of stopping a job leaves a checkpoint
that --resume continues, unreadable images are named and skipped, and bad input is one line
before any work is done (never a traceback, never after an hour of training)."""
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linear_eval
from runs import Progress, UserError, load_checkpoint, parse_config
from conftest import ROOT, TINY_PRETRAIN, error_of, make_image_folder, run_script
from pretrain import PRESETS, Config

SCRIPTS = ["pretrain.py", "linear_eval.py", "finetune.py", "distill.py", "bench.py", "reproduce.py",
           "tf_checkpoint.py", "export.py", "curves.py"]
TINY_FT = ["--batch-size", "8", "--workers", "0", "--log-every", "1", "--label-fraction", "1.0"]


def stop_with_signal(command, tmp_path, at="step 2/", sig=signal.SIGTERM, env=None):
    """Run command in a process group of its own and send sig to the whole group (what a
    scheduler, `timeout` or Ctrl-C do) once a line containing `at` appears."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if at in line:
            os.killpg(proc.pid, sig)
            break
    out, err = proc.communicate(timeout=180)
    return proc.returncode, "".join(seen) + out, err


def script(name, *args):
    return [sys.executable, str(ROOT / name), *map(str, args)]


# ------------------------------------------------------------------------------------ stopping


def test_sigterm_to_the_process_group_checkpoints_with_loader_workers(tiny_folder, tmp_path):
    """The workers get the signal too; they must leave the stop to the main process."""
    rc, out, err = stop_with_signal(script(
        "pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", tmp_path,
        "--epochs", 50, "--workers", 2), tmp_path)
    assert rc == 0 and "stopped by signal 15" in out, err
    assert "Traceback" not in err and "killed by signal" not in err
    step = load_checkpoint(tmp_path / "ckpt.pt")["step"]
    assert 2 <= step < 150
    out = run_script("pretrain.py", "--resume", tmp_path / "ckpt.pt", "--max-steps", step + 1).stdout
    assert f"step {step + 1}/{step + 1}" in out


def test_sigterm_to_a_torchrun_job_stops_every_process_at_the_same_step(tiny_folder, tmp_path):
    """torchrun's agent passes the signal on to each process's group (process and workers):
    the processes agree on the step, all of them write their part, and the job resumes."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master-port=29512", str(ROOT / "pretrain.py")]
    args = [*TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", tmp_path, "--epochs", 50,
            "--workers", 1, "--device", "cpu"]
    rc, out, err = stop_with_signal(torchrun + list(map(str, args)), tmp_path)
    assert "stopped by signal 15" in out, err
    assert "[rank" not in err  # no process failed (torchrun itself reports the signal)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] >= 2 and len(ckpt["rng"]) == 2
    proc = subprocess.run(torchrun + list(map(str, ["--resume", tmp_path / "ckpt.pt",
                                                    "--max-steps", ckpt["step"] + 1])),
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == ckpt["step"] + 1


def check_resumed_epoch_loss(out, log_path, stopped_step, per_epoch=6, total=18):
    """The log of a run stopped in mid-epoch and continued holds each epoch once, and the record
    of the epoch it stopped in averages all of that epoch's steps, before and after the stop
    (the losses of the progress lines of both runs, --log-every 1)."""
    epoch_end = (stopped_step // per_epoch + 1) * per_epoch
    losses = {int(step): float(loss) for step, loss in re.findall(rf"step (\d+)/{total} .*? loss (\S+)", out)
              if epoch_end - per_epoch < int(step) <= epoch_end}
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, total // per_epoch + 1))
    record = next(r for r in records if r["step"] == epoch_end)
    assert len(losses) == per_epoch
    assert abs(record["loss"] - sum(losses.values()) / per_epoch) < 1e-3


def test_finetune_stopped_and_resumed_equals_the_uninterrupted_run(pretrained_checkpoint, tmp_path):
    args = ["--checkpoint", pretrained_checkpoint, *TINY_FT, "--epochs", 3]
    run_script("finetune.py", *args, "--out-dir", tmp_path / "straight")
    rc, out, err = stop_with_signal(script("finetune.py", *args, "--out-dir", tmp_path / "cut"),
                                    tmp_path, at="step 3/", sig=signal.SIGINT)
    assert rc == 0 and "stopped by signal 2" in out, err
    assert re.search(r"step 1/18 .* img/s eta \d+:\d\d:\d\d", out)  # progress: rate and ETA
    stopped = load_checkpoint(tmp_path / "cut" / "finetuned.pt")
    assert 3 <= stopped["step"] < 18 and stopped["results"] is None
    out += run_script("finetune.py", "--resume", tmp_path / "cut" / "finetuned.pt").stdout
    check_resumed_epoch_loss(out, tmp_path / "cut" / "log.jsonl", stopped["step"])
    straight = load_checkpoint(tmp_path / "straight" / "finetuned.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "finetuned.pt")
    assert resumed["step"] == 18 and resumed["results"]["top1"] == straight["results"]["top1"]
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_distill_stopped_by_sigterm_resumes(finetuned_checkpoint, tmp_path):
    rc, out, err = stop_with_signal(script(
        "distill.py", "--teacher", finetuned_checkpoint, "--batch-size", 8,
        "--epochs", 3, "--workers", 1, "--log-every", 1, "--out-dir", tmp_path / "d"), tmp_path)
    assert rc == 0 and "stopped by signal 15" in out and "eta" in out, err
    step = load_checkpoint(tmp_path / "d" / "student.pt")["step"]
    resumed = run_script("distill.py", "--resume", tmp_path / "d" / "student.pt").stdout
    assert f"step {step + 1}/18" in resumed
    out += resumed
    check_resumed_epoch_loss(out, tmp_path / "d" / "log.jsonl", step)
    assert load_checkpoint(tmp_path / "d" / "student.pt")["results"]["student_top1"] >= 0


# ------------------------------------------------------------------------------------ bad data


def test_unreadable_images_are_named_counted_and_replaced(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=2)
    good = (data / "train" / "class0" / "000.png").read_bytes()
    (data / "train" / "class0" / "truncated.png").write_bytes(good[:len(good) // 2])
    (data / "train" / "class1" / "notes.jpg").write_text("not an image")
    proc = run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", data, "--out-dir",
                      tmp_path / "run", "--batch-size", 6, "--epochs", 3, "--workers", 1)
    assert "truncated.png" in proc.stderr and "notes.jpg" in proc.stderr
    assert "2 unreadable image(s)" in proc.stdout
    # files, not replacements: each epoch replaces both again (once the count was 6 by now)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["unreadable_images"] for r in records] == [2, 2, 2] and records[0]["step"] == 3


def test_the_augmentation_picture_replaces_an_unreadable_image(tmp_path):
    """As pretraining does: the file is named, the next image takes its place, no traceback."""
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)
    for f in (data / "train").rglob("*.png"):
        f.rename(f.with_suffix(".jpg"))  # PNG bytes under .jpg: PIL reads them by content
    good = (data / "train" / "class0" / "000.jpg").read_bytes()
    for i in range(3):  # truncated files, among 8: some are among the 8 the picture shows
        (data / "train" / "class0" / f"00{i}.jpg").write_bytes(good[:len(good) // 3])
    proc = run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", data, "--show-augmentations",
                      tmp_path / "views.png", "--out-dir", tmp_path / "run", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "warning: unreadable image" in proc.stderr and (tmp_path / "views.png").is_file()


def test_a_folder_of_non_images_stops_with_one_line(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(60):
            (tmp_path / "data" / "train" / c / f"{i}.jpg").write_text("text")
    proc = run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tmp_path / "data",
                      "--out-dir", tmp_path / "run", "--workers", 1, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1  # the workers' warnings name the files
    assert re.search(r"^pretrain.py: error: 50 unreadable images in a row", proc.stderr, re.M)


# ------------------------------------------------------------------------------------ bad input


def documented_flags(script):
    """The flags that the commands of README.md and docs/ give script (continued lines joined,
    up to a comment or the next command)."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    flags = set()
    for line in text.replace("\\\n", " ").splitlines():
        if re.match(r"\s*(python|torchrun|OMP_NUM_THREADS)", line) and f" {script}" in line:
            tail = re.split(r"#|&&|\|", line.split(f" {script}", 1)[1])[0]
            flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", tail))
    return flags


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_of_every_script(name, capsys):
    """--help works (in-process: the scripts' start as a user's is in every other test), and names
    every flag that the README's and docs' commands give the script."""
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(name[:-3]).main(["--help"])
        raise SystemExit(0)  # curves.py returns after printing its docstring
    out = capsys.readouterr().out
    assert exit.value.code in (0, None) and out.startswith(("usage:", "A run's training curves"))
    assert "(default )" not in out and "default runs/<dataset>-<arch>-<time>) (" not in out
    missing = [f for f in documented_flags(name) if f not in out.replace("[no-", "[")]
    assert not missing, f"README or docs give {name} {missing}, which it does not take"
    for file in WRITES.get(name, []):  # and every file it writes
        assert file in " ".join(out.split()), (name, file)


WRITES = {"pretrain.py": ["ckpt.pt", "ckpt.prev.pt", "log.jsonl"],
          "finetune.py": ["finetuned.pt", "finetuned.prev.pt", "log.jsonl", "subset.txt",
                          "results.json"],
          "distill.py": ["student.pt", "student.prev.pt", "log.jsonl", "subset.txt", "results.json"],
          "linear_eval.py": ["linear_eval.json", "linear_eval_e0_knn200.json", "--out"]}


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be >= 2, not 0"),
    (["--batch-size", "-4"], "--batch-size must be >= 2, not -4"),
    (["--image-size", "0"], "--image-size must be >= 8, not 0"),
    (["--lr", "-1"], "--lr must be > 0, not -1.0"),
    (["--lr", "nan"], "--lr must be a finite number, not nan"),
    (["--width-multiplier", "0"], "--width-multiplier must be > 0, not 0.0"),
    (["--epochs", "0"], "--epochs must be >= 1, not 0"),
    (["--temperature", "0"], "--temperature must be > 0, not 0.0"),
    (["--momentum", "1"], "--momentum must be < 1, not 1.0"),
])
def test_nonsense_values_are_refused(args, message):
    with pytest.raises(UserError) as error:
        parse_config(Config, args, PRESETS)
    assert str(error.value) == message


def test_a_refused_value_is_one_line_before_any_work(tiny_folder):
    proc = run_script("pretrain.py", "--dataset", "folder", "--data-dir", tiny_folder,
                      "--batch-size", "0", check=False)
    assert proc.returncode == 1
    assert proc.stderr == "pretrain.py: error: --batch-size must be >= 2, not 0\n"


def test_resume_with_another_batch_size_is_refused(pretrained_checkpoint):
    proc = run_script("pretrain.py", "--resume", pretrained_checkpoint, "--batch-size", 8,
                      check=False)
    assert proc.returncode == 1 and "differs from the checkpoint's 16" in proc.stderr


def test_unwritable_or_file_out_dir_fails_before_any_work(tiny_folder, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root ignores permissions: a read-only file system
        read_only = Path("/sys/simclr-test")
    for out_dir in (a_file, read_only / "run"):
        proc = run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir",
                          out_dir, check=False)
        assert proc.returncode == 1 and "step" not in proc.stdout
        assert proc.stderr.startswith(f"pretrain.py: error: cannot write to {out_dir}")


def test_missing_evaluation_split_fails_before_the_first_step(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8)
    for f in (data / "val").rglob("*.png"):
        f.unlink()
    for d in sorted((data / "val").iterdir()):
        d.rmdir()
    (data / "val").rmdir()
    proc = run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", data, "--out-dir",
                      tmp_path / "run", "--eval-every", 1, check=False)
    assert proc.returncode == 1 and "has no val/ (or test/) folder" in proc.stderr and "step" not in proc.stdout


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A write cut short (disk full; here a file-size limit): one line, no stale .tmp, and the
    previous checkpoint untouched."""
    path = tmp_path / "ckpt.pt"
    code = f"""
import resource, signal, sys, torch
from runs import UserError, save_checkpoint
save_checkpoint({str(path)!r}, dict(model={{"w": torch.ones(10)}}, config={{}}))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_checkpoint({str(path)!r}, dict(model={{"w": torch.zeros(10**6)}}, config={{}}))
except UserError as e:
    sys.exit(str(e))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"cannot write {path}") and "previous one is intact" in proc.stderr
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(10))


def test_a_diverging_run_without_checkpoint_says_so(tiny_folder, tmp_path):
    proc = run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir",
                      tmp_path, "--lr", 1e30, check=False)
    assert proc.returncode == 1 and "No checkpoint was written yet" in proc.stderr


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100, b"PK\x03\x04 not a zip"])
def test_a_garbage_checkpoint_is_refused(content, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(content)
    with pytest.raises(UserError, match="cannot read checkpoint .*: not a checkpoint of this"):
        load_checkpoint(tmp_path / "ckpt.pt")


def test_a_garbage_checkpoint_is_one_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")  # an empty file once gave IndexError
    proc = run_script("linear_eval.py", "--checkpoint", tmp_path / "ckpt.pt", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("linear_eval.py: error: cannot read checkpoint")


def test_linear_eval_of_a_finetuned_checkpoint_names_what_to_pass(pretrained_checkpoint,
                                                                 finetuned_checkpoint):
    assert (f"is a fine-tuned network (finetune.py's finetuned.pt), fine-tuned from "
            f"{pretrained_checkpoint}: finetune.py --resume and distill.py --teacher take it"
            in error_of(linear_eval.main, "--checkpoint", finetuned_checkpoint))


def test_linear_eval_checks_its_output_before_evaluating(pretrained_checkpoint, tmp_path):
    proc = run_script("linear_eval.py", "--checkpoint", pretrained_checkpoint, "--knn", 5,
                      "--epochs", 0, "--out", tmp_path, check=False)
    assert proc.returncode == 1 and "is a folder" in proc.stderr and "features" not in proc.stdout


def test_linear_eval_names_a_mid_epoch_checkpoint_by_its_step(tiny_folder, tmp_path):
    run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", tmp_path,
               "--max-steps", 2)
    out = run_script("linear_eval.py", "--checkpoint", tmp_path / "ckpt.pt", "--epochs", 0,
                     "--knn", 5).stdout
    assert "(step 2 = epoch 0.67 of 2)" in out and "features: val 24/24 images" in out


# ------------------------------------------------------------------------------------ progress


def test_progress_is_due_first_every_and_last():
    lines = []
    progress = Progress(lines.append, "step", 10, images_per_item=4, every=4)
    assert [d for d in range(1, 11) if progress.due(d)] == [1, 4, 8, 10]
    progress.show(4, "loss 1.0")
    assert re.fullmatch(r"step 4/10 loss 1\.0 \d+ img/s eta \d+:\d\d:\d\d", lines[0])
    resumed = Progress(lines.append, "step", 10, every=0, seconds=3600, start=6)
    assert [d for d in range(7, 11) if resumed.due(d)] == [7, 10]  # first after the start, last
    batches = Progress(lines.append, "images", 1000, seconds=3600)  # counted 300 at a time
    assert [d for d in (300, 600, 900, 1000) if batches.due(d)] == [300, 1000]


def test_nothing_points_outside_the_repository():
    """Users have the repository only: no script or docstring may cite files beside it."""
    for path in ROOT.glob("*.py"):
        if not path.name.startswith(("test_", "conftest")):
            text = path.read_text()
            assert "REFERENCE.md" not in text and "../shared" not in text, path.name


def test_flags_the_loss_refuses_are_one_line(tiny_folder):
    """objective.build_objective's refusals (--semi-hard with NT-Xent, --no-l2-norm with Table 4's
    other losses) reach the user as one line, before any work."""
    import pretrain
    base = [*TINY_PRETRAIN, "--data-dir", tiny_folder]
    assert error_of(pretrain.main, *base, "--semi-hard") == (
        "pretrain.py: error: --loss: --semi-hard applies to nt-logistic and margin; NT-Xent weighs "
        "every negative by its softmax (Sec. 5.1)")
    assert "--no-l2-norm is Table 5's NT-Xent ablation" in error_of(
        pretrain.main, *base, "--loss", "margin", "--no-l2-norm")
