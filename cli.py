"""The command-line plumbing every script shares: flags from dataclasses with checked ranges,
one-line errors, the torchrun process group, checkpoint files, progress lines, and stopping
on a signal with a checkpoint. Nothing here is SimCLR: pretrain.py is, and imports this.
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
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


def opt(default, help, choices=None, changeable=False, **bounds):
    """A configuration field: its default, the help text that --help shows, and the range of
    valid values (min / max inclusive, above / below exclusive), checked by parse_config.
    changeable: how this invocation runs (workers, device, log cadence), not what the run is;
    it may differ when a run continues (continue_run)."""
    return field(default=default, metadata=dict(help=help, choices=choices, changeable=changeable,
                                                **bounds))


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
    given now on top, checked; the output folder defaults to the checkpoint's, and --max-steps
    to none (a continued run goes to the end of its schedule unless told otherwise). The batch
    size and the schedule's length cannot change: the checkpoint's steps, and where it stands
    in its learning-rate schedule, count batches of its size over its epochs."""
    for name in ("batch_size", "epochs"):
        if name in stored and given.get(name, stored[name]) != stored[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {given[name]} differs from the checkpoint's {stored[name]}: "
                            f"its steps and learning-rate schedule count {stored[name]} "
                            f"{'images a batch' if name == 'batch_size' else 'epochs'}; continue "
                            f"with {flag} {stored[name]}, or start a new run (another --out-dir)")
    known = {f.name for f in dataclasses.fields(cls)}
    return checked(cls(**{**{k: v for k, v in stored.items() if k in known},
                          "out_dir": str(Path(path).parent),
                          **({"max_steps": 0} if "max_steps" in known else {}), **given}))


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
    timeout = datetime.timedelta(minutes=30)
    if device_name == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout,
                                **restart_store(rank, world, timeout))
    elif device_name == "cpu":
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout, **restart_store(rank, world, timeout))
    else:
        raise UserError(f"torchrun needs --device cuda or cpu, not {device_name}")
    return device, rank, world


def restart_store(rank, world, timeout):
    """Where the processes of a torchrun job meet: in the agent's store (torchrun's own choice)
    under a prefix of each restart's own. Without it, the processes of a restarted job
    (--max-restarts) can read the addresses the failed attempt left in that store and fail
    ('Gloo connectFullMesh failed ... Connection refused') or hang (pytorch/pytorch #135712,
    #167288). Each agent counts its own restarts: across nodes they agree when every node's
    workers are restarted together, which is what torchrun does when one fails."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(store=dist.PrefixStore(f"simclr/attempt{attempt}", store), rank=rank,
                world_size=world)


def native_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is
    faster than fp32 (1.3-1.9x in bench.py's step, RESULTS.md); elsewhere it is emulated, and
    slower."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def precision_for(asked, device):
    """(precision, its autocast context, why): --precision auto is bf16 autocast on CUDA and on
    CPUs with native bf16, fp32 elsewhere; fp16 is autocast with a gradient scaler (the
    caller's)."""
    if asked == "auto":
        native = device.type == "cpu" and native_bf16()
        asked = "bf16" if device.type == "cuda" or native else "fp32"
        why = ("auto: CUDA" if device.type == "cuda" else "auto: this CPU computes bf16 natively"
               if native else f"auto: no native bf16 on this {device.type}")
    else:
        why = "--precision"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(asked)
    return asked, torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None), why


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


def save_checkpoint(path, state, keep_previous=False):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint, and
    a failed write (disk full) leaves the previous checkpoint as it was. keep_previous: the
    checkpoint it replaces stays beside it as <name>.prev (previous_path), for a run whose
    newest checkpoint was damaged after it was written (continue_run)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {getattr(e, 'strerror', None) or first_line(e)} "
                        f"(disk full?); {'the previous one is intact' if path.exists() else 'none written'}")


def previous_path(path):
    return Path(path).with_suffix(".prev" + Path(path).suffix)  # ckpt.pt -> ckpt.prev.pt


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


# ---------------------------------------------------------------------------------------------
# Runs: a folder per run, continued by the same command; checkpoints however the run ends
# ---------------------------------------------------------------------------------------------

# What each training script leaves, by the kind of its checkpoint (checkpoint_kind).
RUNS = {"pretrain": ("pretrain.py", "ckpt.pt"), "finetuned": ("finetune.py", "finetuned.pt"),
        "student": ("distill.py", "student.pt")}
PATH_FIELDS = ("data_dir", "val_dir", "unlabeled_dir", "checkpoint", "teacher", "init", "subset_file")


class Done(Exception):
    """The run is complete: nothing to do, said in one line, exit status 0 (run_cli)."""


def identity(cls, config):
    """What makes a run what it is: every field of cls that is not changeable, paths resolved
    (data/cifar10 and ./data/cifar10 are one folder), from a config object or a stored dict."""
    values = config if isinstance(config, dict) else dataclasses.asdict(config)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.metadata["changeable"]:
            v = values.get(f.name, f.default)
            out[f.name] = os.path.realpath(v) if f.name in PATH_FIELDS and v else v
    return out


def continue_run(cls, cfg, given, kind, prefix, stored=lambda ckpt: ckpt["config"]):
    """The run this command continues, as torchtitan and VISSL do: --resume's checkpoint, or the
    one already in --out-dir (default runs/<prefix>-<digest of the configuration>, one name that
    every process, node and restart agrees on). A folder that holds another configuration or
    another script's run is refused before any work, naming what differs; a complete run is
    Done. Returns (config, checkpoint or None); the configuration is the stored one with the
    changeable flags given now on top (resumed_config)."""
    script, name = RUNS[kind]
    if cfg.resume:
        path = checkpoint_path(cfg.resume)
        ckpt = load_checkpoint(path, (kind,), "--resume")
        cfg = resumed_config(cls, stored(ckpt), given, path)
    else:
        digest = hashlib.sha1(json.dumps(identity(cls, cfg), sort_keys=True).encode()).hexdigest()
        out = Path(cfg.out_dir or f"runs/{prefix}-{digest[:8]}")
        cfg.out_dir = str(out)
        for other, (other_script, other_name) in RUNS.items():
            if other != kind and (out / other_name).exists():
                raise UserError(f"{out} holds a {other_script} run ({other_name}): choose "
                                f"another --out-dir")
        path, ckpt = newest_checkpoint(out / name, kind)
        if ckpt is None:
            return cfg, None
        theirs, ours = identity(cls, stored(ckpt)), identity(cls, cfg)
        differ = [k for k in ours if ours[k] != theirs[k]]
        if differ:
            shown = ", ".join(f"--{k.replace('_', '-')} {theirs[k]!r} there ({ours[k]!r} here)"
                              for k in differ[:3])
            raise UserError(f"{out} holds a {script} run of another configuration: {shown}"
                            f"{' ...' if len(differ) > 3 else ''}; continue it with its flags, or "
                            f"choose another --out-dir")
        cfg = resumed_config(cls, stored(ckpt), given, path)
        cfg.resume = str(path)
    if ckpt.get("finished"):
        raise Done(f"{path} is a complete {script} run ({ckpt['step']} steps)"
                   f"{'; its results: ' + str(Path(path).parent / 'results.json') if kind != 'pretrain' else ''}"
                   f": nothing to do (another --out-dir starts a new run)")
    return cfg, ckpt


def newest_checkpoint(path, kind):
    """(path, checkpoint) of a run folder's checkpoint, or of the one kept before it (.prev) if
    the newest is damaged, with a line that says so; (path, None) if there is none."""
    previous = previous_path(path)
    if not path.exists() and not previous.exists():
        return path, None
    try:
        return path, load_checkpoint(path, (kind,))
    except UserError as damaged:
        if not previous.exists():
            raise UserError(f"{damaged}; no earlier checkpoint is kept beside it: move it away to "
                            f"start the run over")
        ckpt = load_checkpoint(previous, (kind,))
        print(f"warning: {damaged}; continuing from {previous} (step {ckpt['step']})", flush=True)
        return previous, ckpt


class Run:
    """What a training loop leaves in its folder, however it ends: the checkpoint (atomic, the
    previous one kept), every --checkpoint-every minutes and at epoch ends, and log.jsonl, one
    record per epoch.

    Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption, `timeout`, torchrun's agent, a kill
    of the process group) ask the run to stop after the current step with a checkpoint. The
    signal reaches the processes of a torchrun job at slightly different moments, and their
    clocks differ, so poll() makes them agree, every step, on whether to stop and whether to
    checkpoint: one all-reduce over a gloo group on the CPU, which never waits for the GPU. A
    crash or kill -9 loses at most the steps since the last checkpoint; the same command then
    continues from it (continue_run), and the log records written after it are dropped, so that
    log.jsonl holds each epoch once. Loader workers ignore both signals (make_loader).
    """

    def __init__(self, out_dir, name, device, minutes, step=0):
        self.path, self.log_path = Path(out_dir) / name, Path(out_dir) / "log.jsonl"
        self.device, self.seconds, self.last_save = device, 60 * minutes, time.time()
        self.main = world_info()[0] == 0
        self.signum = None
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)
        self.group = dist.new_group(backend="gloo") if world_info()[1] > 1 else None
        if self.main and self.log_path.exists():  # what was logged after the checkpoint goes
            lines = self.log_path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            if len(kept) != len(lines):
                self.log_path.write_text("".join(line + "\n" for line in kept))

    def request(self, signum, frame):
        self.signum = signum

    def poll(self):
        """(stop, checkpoint): whether any process was asked to stop, and whether a checkpoint is
        due; the same answers on every process."""
        due = self.seconds > 0 and time.time() - self.last_save >= self.seconds
        if self.group is None:
            return self.signum is not None, due
        flags = torch.tensor([self.signum or 0, int(due)])  # a later signal counts next time
        dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flags[0]) or self.signum
        return bool(flags[0]), bool(flags[1])

    def save(self, state):
        """The checkpoint: state, and the random state of every process (each continues its own
        augmentation stream). Every process calls it at the same step."""
        states = random_states(self.device)
        if self.main:
            save_checkpoint(self.path, dict(state, rng=states), keep_previous=True)
        self.last_save = time.time()

    def record(self, record):
        """One line of log.jsonl (an epoch's, written before that epoch's checkpoint), and the
        run's curves.png where matplotlib is importable (curves.py)."""
        if self.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            import curves  # here: curves.py is a script that imports this module
            curves.plot_if_possible(self.log_path.parent)

    def stopped(self, step, log):
        log(f"stopped by signal {self.signum} at step {step}, checkpoint {self.path}; the same "
            f"command continues the run")


def run_cli(script, fn):
    """Run a script's work: bad input (UserError) ends it with one line and exit status 1, and
    a torchrun job always leaves its process group. Shared by every script's main()."""
    try:
        fn()
    except Done as done:
        if os.environ.get("RANK", "0") == "0":
            print(done, flush=True)
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
