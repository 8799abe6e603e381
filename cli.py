"""The command-line plumbing every script shares: flags from dataclasses with checked ranges,
one-line errors, the torchrun process group, checkpoint files, progress lines, and stopping
on a signal with a checkpoint. Nothing here is SimCLR: pretrain.py is, and imports this.
"""
import argparse
import dataclasses
import datetime
import math
import multiprocessing
import operator
import os
import signal
import subprocess
import sys
import time
from dataclasses import field
from pathlib import Path

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# Configuration: every field of a dataclass becomes a flag, with its help and valid range
# ---------------------------------------------------------------------------------------------


def opt(default, help, choices=None, **bounds):
    """A configuration field: its default, the help text that --help shows, and the range of
    valid values (min / max inclusive, above / below exclusive), checked by parse_config."""
    return field(default=default, metadata=dict(help=help, choices=choices, **bounds))


class UserError(Exception):
    """A problem with the user's input: reported as one line, with a non-zero exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UserError(message)


def parse_config(cls, argv, presets=None, description=None):
    """Build cls from the command line: its defaults, then presets[dataset], then the flags.

    Returns the config and the dict of flags given explicitly (a resumed run puts those on top of
    the stored configuration). Every field of cls becomes --field-name; booleans get --no-x.
    """
    presets = presets or {}
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        per_dataset = {d: p[f.name] for d, p in presets.items() if p.get(f.name, f.default) != f.default}
        help = f.metadata["help"]
        if f.default != "":  # an empty default is explained by the help text itself
            help += f" (default {f.default}" + "".join(f", {d}: {v}" for d, v in per_dataset.items()) + ")"
        help = help.replace("%", "%%")  # argparse formats help strings with %
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(flag, type=f.type, choices=f.metadata["choices"], help=help)
    given = vars(parser.parse_args(argv))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    dataset = given.get("dataset", defaults.get("dataset"))
    return checked(cls(**{**defaults, **presets.get(dataset, {}), **given})), given


BOUNDS = {"min": (">=", operator.ge), "above": (">", operator.gt), "max": ("<=", operator.le),
          "below": ("<", operator.lt)}


def checked(cfg):
    """cfg, if every numeric option is finite and within its field's bounds; else a UserError."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, not {value}")
        for key, (sign, holds) in BOUNDS.items():
            if key in f.metadata and not holds(value, f.metadata[key]):
                raise UserError(f"{flag} must be {sign} {f.metadata[key]}, not {value}")
    return cfg


def resumed_config(cls, stored, given, path):
    """The configuration stored in the checkpoint at path (fields of cls only) with the flags
    given now on top, checked; the output folder defaults to the checkpoint's. The batch size
    cannot change: the checkpoint's steps and schedule count batches of its size."""
    if given.get("batch_size", stored["batch_size"]) != stored["batch_size"]:
        raise UserError(f"--batch-size {given['batch_size']} differs from the checkpoint's "
                        f"{stored['batch_size']}: its steps and schedule count batches of "
                        f"{stored['batch_size']}; resume with that batch size")
    known = {f.name for f in dataclasses.fields(cls)}
    return checked(cls(**{**{k: v for k, v in stored.items() if k in known},
                          "out_dir": str(Path(path).parent), **given}))


# ---------------------------------------------------------------------------------------------
# Processes: one code path, a world of one without torchrun
# ---------------------------------------------------------------------------------------------


def setup(device_name="auto"):
    """Pick the device and, under torchrun (RANK, WORLD_SIZE set), join the process group.

    Returns (device, rank, world_size). NCCL on CUDA, gloo on CPU.
    """
    if device_name == "auto":
        device_name = ("cuda" if torch.cuda.is_available() else
                       "mps" if torch.backends.mps.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return torch.device(device_name), 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    elif device_name == "cpu":
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    else:
        raise UserError(f"torchrun needs --device cuda or cpu, not {device_name}")
    return device, rank, world


def per_process_batch(batch_size, world):
    """--batch-size is the global batch: each of the world processes takes an equal share."""
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is not divisible by {world} processes")
    return batch_size // world


def console(main):
    """print on the main process (flushed: runs are often redirected to a file), nothing elsewhere."""
    return (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)


def world_info():
    """(rank, world_size): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, plain data, loadable with weights_only=True
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint, and
    a failed write (disk full) leaves the previous checkpoint as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {getattr(e, 'strerror', None) or first_line(e)} "
                        f"(disk full?); {'the previous one is intact' if path.exists() else 'none written'}")


# What each kind of checkpoint is, and the scripts that take it.
KINDS = {
    "pretrain": ("a pretraining checkpoint (pretrain.py's ckpt.pt)",
                 "pretrain.py --resume, linear_eval.py --checkpoint and finetune.py --checkpoint"),
    "converted": ("a converted TensorFlow checkpoint (tf_checkpoint.py)",
                  "linear_eval.py --checkpoint and finetune.py --checkpoint"),
    "finetuned": ("a fine-tuned network (finetune.py's finetuned.pt)",
                  "finetune.py --resume and distill.py --teacher"),
    "student": ("a distilled student (distill.py's student.pt)",
                "distill.py --resume, linear_eval.py --checkpoint and finetune.py --checkpoint"),
}


def checkpoint_kind(ckpt):
    if "distill_config" in ckpt:
        return "student"
    if "pretrain" in ckpt["config"]:
        return "finetuned"
    return "converted" if "converted_from" in ckpt else "pretrain"


def checkpoint_path(path):
    """path, or the checkpoint in the run folder path (ckpt.pt, finetuned.pt or student.pt)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("ckpt.pt", "finetuned.pt", "student.pt") if (path / n).is_file()]
        if not found:
            raise UserError(f"no checkpoint in the folder {path} (ckpt.pt, finetuned.pt or student.pt)")
        path = found[0]
    elif not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    return str(path)


def load_checkpoint(path, accept=None, flag="--checkpoint"):
    """torch.load with weights_only=True of path (or of the checkpoint in the run folder path);
    a missing, unreadable or (with accept, a tuple of KINDS) unexpected checkpoint is one line
    that says what the file is and which scripts take it."""
    path = checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: not a checkpoint of this project, or a "
                        f"damaged one ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no model and config)")
    kind = checkpoint_kind(ckpt)
    if accept and kind not in accept:
        what, takers = KINDS[kind]
        origin = ckpt["config"].get("checkpoint") if kind == "finetuned" else None
        raise UserError(f"{flag} {path} is {what}{f', fine-tuned from {origin}' if origin else ''}"
                        f": {takers} take it")
    return ckpt


def load_model_state(model, state, path):
    """load_state_dict(strict=True), with a mismatch reported as one line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not match the model (architecture or width differs): "
                        f"{first_line(e)}")


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---------------------------------------------------------------------------------------------
# Running a job: output folder, random state, progress lines, stopping on a signal, errors
# ---------------------------------------------------------------------------------------------


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def prepare_out_dir(path, flag="--out-dir"):
    """Create the output folder and check that it takes files, before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {path}: {e.strerror}; choose another {flag}")
    return path


def random_states(device):
    """The random state of every process, in rank order (each resumes its own stream): the CPU
    generator, and the GPU's, which draws the augmentations on CUDA."""
    state = dict(cpu=torch.get_rng_state(),
                 **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}))
    _, world = world_info()
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states if world > 1 else [state]


def restore_random_state(states, device):
    rank, _ = world_info()
    state = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Progress:
    """The progress line of every long loop in every script:

        <name> <done>/<total> [<what>] <images/s> img/s eta <h:mm:ss>

    due(done) is true the first time it is asked (a line within seconds of the start), then
    every `every` items, or with every=0 every `seconds`, and at the last item. With every > 0
    the answer depends on `done` and the calls alone, so all processes of a torchrun job agree
    (the caller may synchronise there); the time rule is for loops that only print.
    """

    def __init__(self, log, name, total, images_per_item=1, every=0, seconds=30.0, start=0):
        self.log, self.name, self.total, self.per_item = log, name, total, images_per_item
        self.every, self.seconds, self.start = every, seconds, start
        self.t_start = self.t_shown = time.time()
        self.asked = False

    def due(self, done):
        first, self.asked = not self.asked, True
        if first or done >= self.total:
            return True
        return done % self.every == 0 if self.every else time.time() - self.t_shown >= self.seconds

    def show(self, done, what=""):
        now = time.time()
        rate = (done - self.start) * self.per_item / max(now - self.t_start, 1e-9)
        eta = (self.total - done) * self.per_item / max(rate, 1e-9)
        self.log(f"{self.name} {done}/{self.total}{' ' + what if what else ''} {rate:.0f} img/s "
                 f"eta {datetime.timedelta(seconds=round(eta))}")
        self.t_shown = now


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption, `timeout`, torchrun's agent, a kill
    of the process group) ask the job to stop after the current step and write a checkpoint.
    The signal reaches the processes of a torchrun job at slightly different moments, so
    calling the object makes them agree, every step, on whether any was asked: an all-reduce
    over a gloo group on the CPU, which never waits for the GPU. Loader workers ignore both
    signals (make_loader) and are shut down by their process."""

    def __init__(self):
        self.signum = None
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)
        _, world = world_info()
        self.group = dist.new_group(backend="gloo") if world > 1 else None

    def request(self, signum, frame):
        self.signum = signum

    def stopped_at(self, step, checkpoint_path, log):
        """Whether the job stops now, after its checkpoint; if so, says how to continue."""
        if not self():
            return False
        log(f"stopped by signal {self.signum} at step {step}; continue with --resume "
            f"{checkpoint_path}")
        return True

    def __call__(self):
        """Whether any process was asked to stop: the same answer on every process."""
        if self.group is None:
            return self.signum is not None
        flag = torch.tensor([self.signum or 0])  # a signal arriving after this counts next time
        dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flag) or self.signum
        return bool(flag)


def run_cli(script, fn):
    """Run a script's work: bad input (UserError) ends it with one line and exit status 1, and
    a torchrun job always leaves its process group. Shared by every script's main()."""
    try:
        fn()
    except UserError as e:
        # raised in a loader worker, the message carries the worker's traceback: its last line
        message = str(e).strip().splitlines()[-1].split("UserError: ")[-1]
        sys.exit(f"{script}: error: {message}")
    except KeyboardInterrupt:  # Ctrl-C before the training loop: nothing to save yet
        sys.exit(f"{script}: interrupted")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # Loader workers ignore SIGTERM (make_loader), which is how multiprocessing would stop
        # them at exit: workers still alive after an error are killed instead (their loader's
        # SIGCHLD check first switched off), or the exit would wait for them forever.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for worker in multiprocessing.active_children():
            worker.kill()
