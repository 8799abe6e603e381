"""A long run survives restarts (runs.continue_run, runs.Run): the same command continues its
folder, a finished run is left as it is, another configuration is refused, a kill -9 costs the
steps since the last checkpoint and ends with the uninterrupted run's weights, a damaged
checkpoint falls back to the previous one, and a torchrun job whose worker dies restarts and
finishes as if nothing happened."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import finetune
import pretrain
from runs import continue_run, load_checkpoint, parse_config
from conftest import ROOT, TINY_PRETRAIN, error_of, run_script
from test_distributed import free_port

EVERY_STEP = ["--checkpoint-every", "0.00001"]  # minutes: a checkpoint after every step


def files(folder):
    """{name: bytes} of every file in folder: what a command must leave unchanged."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def epochs_logged(folder):
    return [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]


def same_weights(a, b):
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def killed_at(command, at, env=None):
    """Run command and kill -9 it (no chance to write anything) once a line has `at`."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    for line in proc.stdout:
        if at in line:
            proc.kill()
            break
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL


# --------------------------------------------------------------------- the same command, again


def test_the_same_command_on_a_finished_run_changes_nothing(pretrained_checkpoint, tiny_folder):
    folder = pretrained_checkpoint.parent
    before = files(folder)
    out = run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", folder).stdout
    assert out == f"{pretrained_checkpoint} is a complete pretrain.py run (6 steps): nothing to do " \
                  f"(another --out-dir starts a new run)\n"
    assert files(folder) == before


def test_the_same_finetune_command_on_a_finished_run_says_where_its_results_are(
        pretrained_checkpoint, finetuned_checkpoint):
    folder = finetuned_checkpoint.parent
    before = files(folder)
    out = run_script("finetune.py", "--checkpoint", pretrained_checkpoint, "--label-fraction", "0.5",
                     "--epochs", "6", "--batch-size", "8", "--workers", "0", "--out-dir", folder).stdout
    assert f"is a complete finetune.py run (18 steps); its results: {folder / 'results.json'}" in out
    assert files(folder) == before


def test_another_configuration_or_script_in_the_folder_is_refused(pretrained_checkpoint,
                                                                  tiny_folder, finetuned_checkpoint):
    folder = pretrained_checkpoint.parent
    before = files(folder)
    error = error_of(pretrain.main, *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", folder,
                     "--lr", "0.4", "--epochs", "3", "--log-every", "7")  # --log-every may change
    assert error == (f"pretrain.py: error: {folder} holds a pretrain.py run of another "
                     f"configuration: --epochs 2 there (3 here), --lr 0.5 there (0.4 here); "
                     f"continue it with its flags, or choose another --out-dir")
    error = error_of(finetune.main, "--checkpoint", pretrained_checkpoint, "--out-dir", folder)
    assert error == f"finetune.py: error: {folder} holds a pretrain.py run (ckpt.pt): choose another --out-dir"
    assert files(folder) == before
    error = error_of(pretrain.main, *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir",
                     finetuned_checkpoint.parent)
    assert "holds a finetune.py run (finetuned.pt)" in error


def test_a_new_run_writes_over_no_file_it_did_not_make(pretrained_checkpoint, tmp_path):
    """A folder with the user's results.json, subset.txt or log.jsonl is refused before any
    work, the file untouched (once finetune.py replaced them); the files a killed first attempt
    of the same command left (no checkpoint yet) are its own, and it starts again."""
    folder = tmp_path / "mine"
    args = ["--checkpoint", pretrained_checkpoint, "--label-fraction", 1.0, "--epochs", 1,
            "--batch-size", 8, "--workers", 0, "--out-dir", folder]
    folder.mkdir()
    for name in ("results.json", "subset.txt", "log.jsonl"):
        (folder / name).write_text("the user's own\n")
        error = error_of(finetune.main, *args)
        assert error == f"finetune.py: error: {folder} holds {name}, which is not finetune.py's: " \
                        f"choose another --out-dir (or move the file away)"
        assert (folder / name).read_text() == "the user's own\n"
        (folder / name).unlink()
    from data import SUBSET_HEADER
    (folder / "subset.txt").write_text(SUBSET_HEADER + "\nclass0/000.png\n")  # a first attempt's
    (folder / "log.jsonl").write_text(json.dumps(dict(epoch=1, step=6, loss=1.0)) + "\n")
    run_script("finetune.py", *args)
    assert epochs_logged(folder) == [1] and load_checkpoint(folder)["finished"]


def test_the_default_folder_is_the_same_for_the_same_command(tiny_folder, tmp_path):
    """Every process, node and restart must agree on it: named by the configuration, not the
    clock; --max-steps (how far this invocation goes) does not change it, and --max-steps 0
    on a run it stopped goes on to the end of the schedule."""
    command = [sys.executable, str(ROOT / "pretrain.py"), *TINY_PRETRAIN, "--data-dir",
               str(tiny_folder), "--epochs", "1"]
    subprocess.run(command + ["--max-steps", "2"], cwd=tmp_path, check=True, capture_output=True)
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("folder-resnet18-") and load_checkpoint(folder)["step"] == 2
    out = subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert f"continuing {folder.relative_to(tmp_path) / 'ckpt.pt'} from step 2" in out
    assert list((tmp_path / "runs").iterdir()) == [folder] and load_checkpoint(folder)["step"] == 3
    # another seed is another run
    cfg, given = parse_config(pretrain.Config, TINY_PRETRAIN + ["--data-dir", str(tiny_folder)])
    other, _ = parse_config(pretrain.Config, TINY_PRETRAIN + ["--data-dir", str(tiny_folder),
                                                              "--seed", "1", "--workers", "2"])
    names = [continue_run(pretrain.Config, c, {}, "pretrain", "x")[0].out_dir for c in (cfg, other)]
    assert names[0] != names[1] and all(n.startswith("runs/x-") for n in names)


def test_a_run_stopped_by_max_steps_is_continued_to_its_end(midrun_checkpoint, tmp_path):
    """--max-steps is how far one invocation goes: --resume without it goes to the end."""
    (tmp_path / "ckpt.pt").write_bytes(midrun_checkpoint.read_bytes())
    out = run_script("pretrain.py", "--resume", tmp_path / "ckpt.pt").stdout
    assert "step 4/6" in out and "done: 6 steps" in out


def test_finetune_refuses_a_new_schedule_length_on_resume(finetuned_checkpoint, tmp_path):
    (tmp_path / "finetuned.pt").write_bytes(finetuned_checkpoint.read_bytes())
    error = error_of(finetune.main, "--resume", tmp_path / "finetuned.pt", "--epochs", "8")
    assert "--epochs 8 differs from the checkpoint's 6: its steps and learning-rate schedule count " \
           "6 epochs; continue with --epochs 6, or start a new run (another --out-dir)" in error


# --------------------------------------------------------------------- kill -9, damage


@pytest.mark.parametrize("memory", [False, True])
def test_kill_9_then_the_same_command_ends_with_the_uninterrupted_weights(
        pretrained_checkpoint, tiny_folder, tmp_path, memory):
    """No chance to write anything: the run continues from its last checkpoint (every step
    here), its log holds each epoch once, and its weights (the memory's queue and momentum
    network too) are those of the run that was never interrupted."""
    extra = ["--memory-size", "64", "--memory-bn", "shuffle"] if memory else []
    straight = pretrained_checkpoint.parent  # the same flags, without the memory
    if memory:
        straight = tmp_path / "straight"
        run_script("pretrain.py", *TINY_PRETRAIN, *extra, "--data-dir", tiny_folder, "--out-dir",
                   straight)
    command = [sys.executable, str(ROOT / "pretrain.py"), *TINY_PRETRAIN, *extra, *EVERY_STEP,
               "--data-dir", str(tiny_folder), "--out-dir", str(tmp_path / "cut")]
    killed_at(command, "step 5/6")  # in the second epoch, after the first one's record
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "continuing" in out and "done: 6 steps" in out
    assert epochs_logged(tmp_path / "cut") == [1, 2]
    assert same_weights(straight / "ckpt.pt", tmp_path / "cut" / "ckpt.pt")
    if memory:
        a, b = (load_checkpoint(p / "ckpt.pt")["memory"] for p in (straight, tmp_path / "cut"))
        assert all(torch.equal(v, b[k]) for k, v in a.items() if torch.is_tensor(v))


DOWNSTREAM = {  # the other two loops, on the tiny checkpoints: 2 epochs of 6 steps of 8 images
    "finetune.py": lambda pretrained, finetuned: ["--checkpoint", pretrained, "--label-fraction", 1.0],
    "distill.py": lambda pretrained, finetuned: ["--teacher", finetuned],
}


@pytest.mark.parametrize("script", DOWNSTREAM)
def test_finetune_and_distill_stop_at_max_steps_and_a_kill_9_costs_nothing(
        script, pretrained_checkpoint, finetuned_checkpoint, tmp_path):
    """The loop skeleton the three scripts share: --max-steps stops with a checkpoint that the
    same command continues; killed without a chance to write, the same command ends with the
    uninterrupted run's weights (the classifier's too), each epoch logged once."""
    args = [*DOWNSTREAM[script](pretrained_checkpoint, finetuned_checkpoint), "--epochs", 2,
            "--batch-size", 8, "--workers", 0, "--log-every", 1]
    run_script(script, *args, "--out-dir", tmp_path / "straight")
    command = [sys.executable, str(ROOT / script), *map(str, args), *EVERY_STEP, "--out-dir",
               str(tmp_path / "cut")]
    out = subprocess.run(command + ["--max-steps", "4"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "stopped at step 4 (--max-steps)" in out and load_checkpoint(tmp_path / "cut")["step"] == 4
    killed_at(command, "step 9/12")  # in the second epoch, after the first one's record
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "continuing" in out and "done: 12 steps" in out
    assert epochs_logged(tmp_path / "cut") == [1, 2]
    a, b = (load_checkpoint(tmp_path / run) for run in ("straight", "cut"))
    for key in ("model", "classifier") if script == "distill.py" else ("model",):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key


def test_records_written_after_the_checkpoint_are_dropped(midrun_checkpoint, tiny_folder, tmp_path):
    """A run killed between an epoch's record and its checkpoint logged an epoch it will train
    again: the record goes, so that the epoch is logged once."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt.pt", "log.jsonl"):
        (out / name).write_bytes((midrun_checkpoint.parent / name).read_bytes())
    with open(out / "log.jsonl", "a") as f:  # what the killed run had logged past its checkpoint
        f.write(json.dumps(dict(epoch=2, step=6, loss=0.0)) + "\n")
    run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", out)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["loss"] > 0


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(pretrained_checkpoint, tiny_folder,
                                                             tmp_path):
    out = tmp_path / "run"
    run_script("pretrain.py", *TINY_PRETRAIN, *EVERY_STEP, "--data-dir", tiny_folder, "--out-dir",
               out, "--max-steps", 4)
    assert load_checkpoint(out / "ckpt.prev.pt")["step"] == 3
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[:len(data) // 2])  # a copy cut short
    proc = run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", out,
                      "--max-steps", 4)  # one checkpoint: the backup must be the good step 3
    assert f"warning: cannot read checkpoint {out / 'ckpt.pt'}" in proc.stdout
    assert f"continuing from {out / 'ckpt.prev.pt'} (step 3)" in proc.stdout
    assert f"the damaged file is kept as {out / 'ckpt.damaged.pt'}" in proc.stdout
    assert (out / "ckpt.damaged.pt").read_bytes() == data[:len(data) // 2]
    assert load_checkpoint(out / "ckpt.prev.pt")["step"] == 3  # not pushed over by the damaged one
    run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", out)
    assert same_weights(out / "ckpt.pt", pretrained_checkpoint)
    (out / "ckpt.damaged.pt").unlink()
    for name in ("ckpt.pt", "ckpt.prev.pt"):  # both damaged: one line, nothing changed
        (out / name).write_bytes(b"garbage")
    before = files(out)
    error = error_of(pretrain.main, *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", out)
    assert error.startswith(f"pretrain.py: error: cannot read checkpoint {out / 'ckpt.prev.pt'}")
    assert files(out) == before


# --------------------------------------------------------------------- torchrun restarts

LAUNCH = {  # the README's launch commands, on one machine
    "static": lambda port: ["--master_addr", "127.0.0.1", "--master_port", str(port)],
    "c10d": lambda port: ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                          "--rdzv-id", "simclr-test"],
}


def torchrun_command(tiny_folder, out, launch, restarts):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--max-restarts", str(restarts), *LAUNCH[launch](free_port()), str(ROOT / "pretrain.py"),
            *TINY_PRETRAIN, *EVERY_STEP, "--data-dir", str(tiny_folder), "--device", "cpu",
            "--out-dir", str(out)]


def test_torchrun_restarts_after_a_worker_is_killed_and_ends_as_if_uninterrupted(tiny_folder,
                                                                                 tmp_path):
    """torchrun restarts every worker with the same arguments when one dies: they continue the
    checkpoint, and the job ends with the weights of the uninterrupted two-process run, with
    each launch form (before runs.restart_store such restarts finished 0 times in 3 here, with it
    6 in 6: docs/long-runs.md). The surviving process says what happened in one line, not a
    traceback (once about 40 lines of one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    proc = subprocess.run(torchrun_command(tiny_folder, straight, "static", 0), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 process(es) on cpu" in proc.stdout and proc.stdout.count("config ") == 1
    assert not any(k.startswith("module.") or "GlobalBatchNorm" in k
                   for k in load_checkpoint(straight)["model"])
    for attempt, launch in enumerate(["static", "c10d"]):
        out = tmp_path / f"{launch}{attempt}"
        proc = subprocess.Popen(torchrun_command(tiny_folder, out, launch, 1), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "step 4/6" in line and not any("continuing" in seen for seen in lines):
                workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                         text=True).stdout.split()
                os.kill(int(workers[-1]), signal.SIGKILL)  # a lost worker: no chance to write
        proc.wait(timeout=300)
        text = "".join(lines)
        assert proc.returncode == 0 and "continuing" in text and "done: 6 steps" in text, text
        assert "lost another process of the job" in text and "Traceback" not in text, text
        assert load_checkpoint(out)["rng"] and len(load_checkpoint(out)["rng"]) == 2
        assert epochs_logged(out) == [1, 2], launch
        assert same_weights(straight / "ckpt.pt", out / "ckpt.pt"), launch


def test_curves(pretrained_checkpoint, tmp_path, monkeypatch):
    """curves.py draws one panel per number the log records (kNN top-1 where some epochs have
    it), when the user asks for it: the loops draw nothing; without matplotlib the command says
    so in one line."""
    import curves
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        dict(epoch=1, step=3, loss=3.2, lr=0.1, time=1.0), dict(epoch=2, step=6, loss=3.1, lr=0.05,
                                                                 knn_top1=40.0, time=2.0)]))
    if _has_matplotlib():  # optional: CI has none
        from PIL import Image
        curves.main([str(run)])
        assert Image.open(run / "curves.png").width == 3 * 280  # loss, lr, knn_top1
        (run / "curves.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert "needs matplotlib: pip install matplotlib" in error_of(curves.main, run)
    assert not (run / "curves.png").exists()
    assert not (pretrained_checkpoint.parent / "curves.png").exists()  # not the loops' work


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------- checkpoints users have


def test_checkpoints_written_before_the_run_skeleton_still_continue_and_load(tiny_folder, tmp_path):
    """Runs on disk from before runs.Run (fixtures/legacy): a pretraining stopped by --max-steps
    and a fine-tuning stopped by Ctrl-C go on to the end of their schedules, a finished
    fine-tuned network teaches a student, and a student is evaluated."""
    legacy = ROOT / "fixtures" / "legacy"
    for name, copy in [("pretrain_step4.pt", "p/ckpt.pt"), ("finetuned_step6.pt", "f/finetuned.pt"),
                       ("finetuned.pt", "teacher/finetuned.pt"), ("student.pt", "s/student.pt")]:
        (tmp_path / copy).parent.mkdir()
        (tmp_path / copy).write_bytes((legacy / name).read_bytes())
    data = ["--data-dir", tiny_folder, "--workers", 0]
    out = run_script("pretrain.py", "--resume", tmp_path / "p" / "ckpt.pt", *data).stdout
    assert "from step 4" in out and "done: 12 steps" in out, out
    out = run_script("finetune.py", "--resume", tmp_path / "f" / "finetuned.pt", *data).stdout
    assert "from step 6" in out and "done: 24 steps" in out, out
    assert load_checkpoint(tmp_path / "f")["results"]["top1"] >= 0
    out = run_script("distill.py", "--teacher", tmp_path / "teacher", *data, "--epochs", 1,
                     "--batch-size", 8, "--out-dir", tmp_path / "d").stdout
    assert "teacher: top-1" in out and "done: 6 steps" in out, out
    run_script("linear_eval.py", "--checkpoint", tmp_path / "s", *data, "--epochs", 0, "--knn", 3)
    (results,) = (tmp_path / "s").glob("linear_eval_*_e0_knn3.json")  # on other data than its own
    assert json.loads(results.read_text())["knn_top1"] >= 0


def test_a_finished_fine_tune_of_a_checkpoint_that_has_changed_is_not_done(
        midrun_checkpoint, pretrained_checkpoint, tmp_path):
    """finetune.py ran on a pretraining checkpoint at step 3; the pretraining went on. The same
    command is then a new run (once it printed the old results as done), its first folder kept,
    and that folder given by --out-dir is refused, naming the steps. results.json records what
    was fine-tuned."""
    (tmp_path / "p").mkdir()
    shutil.copy(midrun_checkpoint, tmp_path / "p" / "ckpt.pt")
    command = [sys.executable, str(ROOT / "finetune.py"), "--checkpoint", "p/ckpt.pt",
               "--label-fraction", "1.0", "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    (first,) = (tmp_path / "runs").iterdir()
    results = json.loads((first / "results.json").read_text())
    assert results["config"]["inputs"]["checkpoint"]["step"] == 3
    shutil.copy(pretrained_checkpoint, tmp_path / "p" / "ckpt.pt")  # the pretraining went on
    out = subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert "complete" not in out and "done: 6 steps" in out
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert json.loads((first / "results.json").read_text()) == results
    proc = subprocess.run(command + ["--out-dir", str(first)], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "--checkpoint at step 3 there (step 6 here, other weights)" \
        in proc.stderr, proc.stderr
