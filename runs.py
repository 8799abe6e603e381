"""The life of a run, shared by every script: options with checked ranges, one-line errors, the
torchrun process group, precision, atomic checkpoints, continuing a run, and Run, the skeleton of
the three training loops. Nothing here belongs to one stage: the scripts pass in their options,
checkpoint kinds (model.KINDS) and files.
"""
import argparse
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from model import KINDS, checkpoint_kind, convert_to_global_bn

# --- Options: every field of a dataclass becomes a flag, with its help and valid range -------


def opt(default, help, choices=None, changeable=False, path=False, **bounds):
    """An option: its default, its --help text, its valid range (min / max inclusive, above /
    below exclusive). changeable: how this invocation runs (workers, device, log cadence), not
    what the run is: it may differ when a run continues. path: compared as an absolute path."""
    return field(default=default, metadata=dict(help=help, choices=choices, changeable=changeable,
                                                path=path, **bounds))


@dataclass
class System:
    """How every script uses the machine; a run may continue on another one."""
    device: str = opt("auto", "auto picks cuda, then mps, then cpu", ["auto", "cuda", "mps", "cpu"],
                      changeable=True)
    precision: str = opt("auto", "auto: bf16 autocast on CUDA and on CPUs with native bf16 "
                         "(AVX512-BF16, AMX), fp32 elsewhere; fp16 uses a gradient scaler",
                         ["auto", "bf16", "fp16", "fp32"], changeable=True)
    workers: int = opt(-1, "data-loading processes per GPU (-1: CPU cores per process, at most 8)",
                       min=-1, changeable=True)
    decode: str = opt("workers", "where an image folder's JPEGs are decoded and cropped: workers, "
                      "or device (nvjpeg: for too few cores per GPU)", ["workers", "device"],
                      changeable=True)


@dataclass
class Training(System):
    """The options of every training loop's run (Run)."""
    out_dir: str = opt("", "the run's folder, where the same command continues it (default "
                       "runs/<stage>-<dataset>-...-<digest of the configuration>)", changeable=True)
    resume: str = opt("", "a checkpoint of this script to continue, with its configuration (the "
                      "flags given here on top)", changeable=True)
    max_steps: int = opt(0, "stop with a checkpoint at this step, 0: at the end; the schedule "
                         "still spans --epochs", min=0, changeable=True)
    log_every: int = opt(50, "print a log line every this many steps (and after the first)", min=1,
                         changeable=True)
    checkpoint_every: float = opt(10.0, "minutes between checkpoints within an epoch, 0: at epoch "
                                  "ends only", min=0, changeable=True)
    global_bn: bool = opt(True, "BatchNorm statistics over the global batch under torchrun "
                          "(--no-global-bn: per-GPU statistics, the paper's ablation)")
    compile: bool = opt(False, "torch.compile the model (slower start, faster steps on GPU)",
                        changeable=True)
    # not a flag: what the run starts from, {option: fingerprint of that checkpoint}, set by the
    # script; a run is of another configuration when the file at the same path changed
    inputs: dict = field(default_factory=dict, metadata=dict(help="", changeable=False, path=False,
                                                             derived=True))


class UserError(Exception):
    """A problem with the user's input: reported as one line, with a non-zero exit."""


class Done(Exception):
    """The work ends here as it should: said in one line, exit status 0 (run_cli)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UserError(message)


def parse_config(cls, argv, presets=None, description=None):
    """(config, the flags given) from cls's defaults, then presets[dataset], then the flags: every
    field becomes --field-name (booleans also --no-x), the shared ones listed last."""
    presets = presets or {}
    parser = Parser(description=description, argument_default=argparse.SUPPRESS,
                    epilog=getattr(cls, "WRITES", None))  # the files the script writes
    shared = {f.name for f in dataclasses.fields(Training)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared):
        if f.metadata.get("derived"):
            continue
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
    dataset = given.get("dataset", defaults(cls).get("dataset"))
    return checked(cls(**{**defaults(cls), **presets.get(dataset, {}), **given})), given


def defaults(cls):
    """{option: its default} of a configuration class."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)}


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
    """The configuration stored in the checkpoint at path with the flags given now on top, its
    folder the checkpoint's, --max-steps none unless given. The batch size and the epochs cannot
    change: the checkpoint's steps and place in its schedule count them."""
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


# --- Processes: one code path, a world of one without torchrun -------------------------------


def setup(device_name="auto"):
    """(device, rank, world_size): the device and, under torchrun, the process group joined (NCCL
    on CUDA, gloo on CPU)."""
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
    """Where the processes of a torchrun job meet: the agent's store, under a prefix of each
    restart's own. Without it a restarted job (--max-restarts) can read the addresses the failed
    attempt left there and fail ('Gloo connectFullMesh failed') or hang (pytorch/pytorch #135712,
    #167288). torchrun restarts every node's workers together, so the counts agree."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(store=dist.PrefixStore(f"simclr/attempt{attempt}", store), rank=rank,
                world_size=world)


def native_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is
    faster than fp32 (RESULTS.md); elsewhere it is emulated, and slower."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def precision_for(asked, device):
    """(precision, its autocast context, why): --precision auto is bf16 autocast on CUDA and on
    CPUs with native bf16, fp32 elsewhere; fp16 is autocast with a gradient scaler (Run's)."""
    if asked == "auto":
        native = device.type == "cpu" and native_bf16()
        asked = "bf16" if device.type == "cuda" or native else "fp32"
        why = ("auto: CUDA" if device.type == "cuda" else "auto: this CPU computes bf16 natively"
               if native else f"auto: no native bf16 on this {device.type}")
    else:
        why = "--precision"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(asked)
    return asked, torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None), why


def default_workers(world_size):
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def world_info():
    """(rank, world_size): (0, 1) outside torchrun."""
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextlib.contextmanager
def as_user_error(prefix):
    """Inside, what a model or data function raises about the input it was given (ValueError,
    KeyError, TypeError: a configuration or weights that do not fit) is one line after prefix."""
    try:
        yield
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{prefix}: {first_line(e)}")


# --- Checkpoints: atomic writes, plain data, loadable with weights_only=True -----------------


def save_checkpoint(path, state, keep_previous=False):
    """Written to a temporary file, then renamed: a crash or a failed write (disk full) leaves the
    previous checkpoint as it was. keep_previous: the one it replaces stays as <name>.prev.pt,
    for a run whose newest checkpoint is damaged later (newest_checkpoint)."""
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


def checkpoint_path(path):
    """path, or the checkpoint in the run folder path (the one .pt file that is no .prev.pt)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.glob("*.pt") if not p.name.endswith(".prev.pt"))
        if len(found) != 1:
            raise UserError(f"no checkpoint in the folder {path}" if not found else
                            f"{len(found)} checkpoints in the folder {path} "
                            f"({', '.join(p.name for p in found)}): name one")
        path = found[0]
    elif not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    return str(path)


def load_checkpoint(path, accept=None, flag="--checkpoint"):
    """torch.load with weights_only=True of path (or of the checkpoint in the run folder path);
    a missing, unreadable or (with accept, kinds of model.KINDS) unexpected checkpoint is one
    line that says what the file is and which scripts take it."""
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
        what, takers = KINDS[kind][:2]
        origin = ckpt["config"].get("checkpoint") if kind == "finetuned" else None
        raise UserError(f"{flag} {path} is {what}{f', fine-tuned from {origin}' if origin else ''}"
                        f": {takers} take it")
    return ckpt


def fingerprint(ckpt):
    """What a checkpoint holds, in short: its step and a digest of its weights. A results file,
    or a run started from it, records it: the same path may later hold other weights."""
    digest = hashlib.sha1()
    for name, tensor in sorted(ckpt["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return dict(step=ckpt.get("step"), digest=digest.hexdigest()[:12])


# --- Outputs: never over a checkpoint, a backup, or a file this project did not write --------

SOFTWARE = "simclr (this repository)"  # the mark on the pictures and results files it writes


def check_output(path, flag, ours):
    """path, checked before any work (its folder made): a file is written where nothing is, or
    over one this project wrote for the same purpose (ours(path); raising: not ours), never over
    a checkpoint, its backup or a file of the user's."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.exists():
        try:
            mine = ours(path)
        except Exception:
            mine = False
        if not mine:
            raise UserError(f"{flag} {path} exists and is not a file this command writes: choose "
                            f"another name, or move it away first")
    prepare_out_dir(path.parent, flag)
    return path


def is_run_log(path):
    """Whether path is a log.jsonl of the loops: one record per line, each with epoch and step."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return all({"epoch", "step"} <= set(record) for record in records)


def written_by(script):
    """ours for check_output: a JSON results file whose "written_by" is script."""
    return lambda path: json.loads(Path(path).read_text()).get("written_by") == script


def check_picture(path, flag):
    """check_output for a picture: a .png name, and only over a PNG this project drew (its
    Software text is SOFTWARE)."""
    from PIL import Image

    def drawn_here(path):
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == SOFTWARE

    if Path(path).suffix.lower() != ".png":
        raise UserError(f"cannot write {flag} {path}: give a file name ending in .png")
    return check_output(path, flag, drawn_here)


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


class Progress:
    """The progress line of every long loop: <name> <done>/<total> [<what>] <images/s> img/s eta
    <h:mm:ss>. due(done): at the first call, then every `every` items (or, with every=0, every
    `seconds`: for loops that only print, as processes would disagree), and at the last item.
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


# --- Continuing a run: a folder per run, found again by the same command ---------------------


def identity(cls, config):
    """What makes a run what it is: every option of cls that is not changeable, paths resolved
    (data/cifar10 and ./data/cifar10 are one folder), from a config object or a stored dict."""
    values = {**defaults(cls), **(config if isinstance(config, dict) else dataclasses.asdict(config))}
    out = {}
    for f in dataclasses.fields(cls):
        if not f.metadata["changeable"]:
            v = values[f.name]
            out[f.name] = os.path.realpath(v) if f.metadata["path"] and v else v
    return out


def continue_run(cls, cfg, given, kind, prefix, stored=lambda ckpt: ckpt["config"], files=None):
    """(config, checkpoint or None) of the run this command continues, as torchtitan does:
    --resume's checkpoint, or the one in --out-dir (default runs/<prefix>-<digest of the
    configuration>: one name for every process, node and restart), its stored configuration
    with the changeable flags given now on top. Refused before any work: a folder of another
    configuration or script, or a new run among files it did not write (log.jsonl,
    results.json, files: {name: whether the file is this script's}). A complete run is Done."""
    script, name = KINDS[kind][2:]
    if cfg.resume:
        path = checkpoint_path(cfg.resume)
        ckpt = load_checkpoint(path, (kind,), "--resume")
        cfg = resumed_config(cls, stored(ckpt), given, path)
    else:
        digest = hashlib.sha1(json.dumps(identity(cls, cfg), sort_keys=True).encode()).hexdigest()
        out = Path(cfg.out_dir or f"runs/{prefix}-{digest[:8]}")
        cfg.out_dir = str(out)
        for other in KINDS.values():
            if other[3] and other[3] != name and (out / other[3]).exists():
                raise UserError(f"{out} holds a {other[2]} run ({other[3]}): choose another --out-dir")
        path, ckpt = newest_checkpoint(out / name, kind)
        if ckpt is None:
            ours = {"log.jsonl": is_run_log, "results.json": written_by(script), **(files or {})}
            for file, mine in ours.items():
                try:
                    theirs = (out / file).exists() and not mine(out / file)
                except Exception:
                    theirs = True
                if theirs:
                    raise UserError(f"{out} holds {file}, which is not {script}'s: choose another "
                                    f"--out-dir (or move the file away)")
            return cfg, None
        theirs, ours = identity(cls, stored(ckpt)), identity(cls, cfg)
        differ = [k for k in ours if ours[k] != theirs[k] and k in stored(ckpt)]  # older: fewer
        if differ:
            shown = ", ".join(
                f"--{k.replace('_', '-')} {theirs[k]!r} there ({ours[k]!r} here)" if k != "inputs"
                else "; ".join(f"--{name} at step {theirs[k].get(name, {}).get('step')} there (step "
                               f"{ours[k].get(name, {}).get('step')} here, other weights)"
                               for name in sorted(set(ours[k]) | set(theirs[k])))
                for k in differ[:3])
            raise UserError(f"{out} holds a {script} run of another configuration: {shown}"
                            f"{' ...' if len(differ) > 3 else ''}; continue it with its flags, or "
                            f"choose another --out-dir")
        cfg = resumed_config(cls, stored(ckpt), given, path)
        cfg.resume = str(path)
    if cfg.max_steps and ckpt["step"] >= cfg.max_steps:
        raise Done(f"{path} is at step {ckpt['step']}, --max-steps {cfg.max_steps}: nothing to do "
                   f"(--max-steps 0 goes on to the end of its schedule)")
    if ckpt.get("finished"):
        results = Path(path).parent / "results.json"
        raise Done(f"{path} is a complete {script} run ({ckpt['step']} steps)"
                   f"{f'; its results: {results}' if results.exists() else ''}"
                   f": nothing to do (another --out-dir starts a new run)")
    return cfg, ckpt


def newest_checkpoint(path, kind):
    """(path, checkpoint) of a run folder's checkpoint, or (said in a line) of the .prev one kept
    before it if the newest is damaged, which is moved aside (<name>.damaged.pt) so that the next
    save does not push it over that backup; (path, None) if there is none."""
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
        aside = path.with_name(path.stem + ".damaged" + path.suffix)
        if path.exists() and os.environ.get("RANK", "0") == "0":
            os.replace(path, aside)
        print(f"warning: {damaged}; continuing from {previous} (step {ckpt['step']}); the damaged "
              f"file is kept as {aside}", flush=True)
        return previous, ckpt


# --- Run: the skeleton of the three training loops -------------------------------------------


class Run:
    """The skeleton of the three training loops (pretrain, finetune, distill):

        run = Run(cfg, ckpt, kind)             # start: device, processes, precision, workers
        run.schedule(len(data), "images")      # steps per epoch, the schedule's length
        net = run.start(model, optimizers, state, samplers, loader, describe)  # continue, wrap
        for epoch in run.epochs():
            for batch in loader:
                run.set_lr(...); ...; run.step_done(loss=loss, ...)  # log, checkpoint, stop
            run.epoch_done(**evaluation)       # the record, then the checkpoint
        run.finish(results)                    # the last checkpoint, results.json

    Metrics are summed on the device after each step (no wait) and, at each log line, averaged
    over processes and steps, checked (a non-finite loss stops the run, the last good checkpoint
    in place) and printed with the share of the time spent waiting for data. Checkpoints: every
    --checkpoint-every minutes, at epoch ends, at --max-steps and when asked to stop.

    Ctrl-C and SIGTERM (preemption, `timeout`, torchrun's agent) stop the run after the current
    step with a checkpoint (Done, exit status 0); poll() makes the processes of a torchrun job
    agree on it every step over a gloo group, which never waits for the GPU. After a crash the
    same command continues from the last checkpoint (continue_run), and the log records written
    after it are dropped, so that log.jsonl holds each epoch once.
    """

    def __init__(self, cfg, ckpt=None, kind=None):
        self.cfg, self.ckpt, self.kind = cfg, ckpt, kind
        self.device, self.rank, self.world = setup(cfg.device)
        self.main = self.rank == 0
        self.log = (lambda *a: print(*a, flush=True)) if self.main else (lambda *a: None)
        self.precision, self.autocast, self.why = precision_for(cfg.precision, self.device)
        self.workers = cfg.workers if cfg.workers >= 0 else default_workers(self.world)
        if cfg.batch_size % self.world:  # --batch-size is the global batch
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = ckpt["step"] if ckpt else 0

    # --- start ------------------------------------------------------------------------------

    def schedule(self, images, what="images", epochs=None):
        """Steps per epoch (the tail dropped), the schedule's length (--epochs, or epochs) and where
        this invocation stops (--max-steps); a run continues only on data of its length."""
        cfg, ckpt = self.cfg, self.ckpt
        self.total_epochs = epochs or cfg.epochs
        self.steps_per_epoch = images // cfg.batch_size
        if images == 0:
            raise UserError(f"there are no {what} to train on: every image is in the evaluation "
                            f"split (--val-dir, --val-fraction or the folder's val/)")
        if self.steps_per_epoch == 0:
            raise UserError(f"{images} {what} are fewer than one batch of {cfg.batch_size}: lower "
                            f"--batch-size to at most {images}")
        if ckpt and ckpt.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            raise UserError(f"{cfg.resume} was written at {ckpt['steps_per_epoch']} steps per epoch, "
                            f"this data gives {self.steps_per_epoch}: resume with the same data")
        self.total_steps = self.total_epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        self.what = f"{images} {what}"
        return self.steps_per_epoch

    def start(self, model, optimizers, state, samplers, loader, describe="", details=""):
        """The model to train: the saved state continued, wrapped, the folder made, the start
        said. model: its weights loaded; state(): what the checkpoint holds beyond the optimizers,
        step and random state; samplers: set to each epoch; loader: the steps' ViewLoader."""
        cfg, ckpt = self.cfg, self.ckpt
        self.optimizers, self.state, self.samplers, self.loader = optimizers, state, samplers, loader
        self.data = loader.data
        self.epoch_sums = None
        if ckpt:  # continue: the optimizers, the loss scale, the random streams, this epoch's sums
            for optimizer, saved in zip(optimizers, ckpt.get("optimizers") or [ckpt["optimizer"]]):
                try:
                    optimizer.load_state_dict(saved)
                except (ValueError, KeyError) as e:
                    raise UserError(f"the optimizer state in {cfg.resume} does not fit --optimizer "
                                    f"{cfg.optimizer}: {e}")
            if "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
            restore_random_state(ckpt["rng"], self.device)
            if checkpoint_kind(ckpt) == "pretrain" or "kind" in ckpt:  # older ones summed otherwise
                self.epoch_sums = ckpt["epoch_sums"].to(self.device)
        # wrap: global BN, NHWC (faster convolutions on cuDNN's tensor cores and with oneDNN on
        # the CPU), DDP under torchrun (even with one process: the path of eight), compile
        net = model
        if dist.is_initialized() and cfg.global_bn:
            net = convert_to_global_bn(net)
        net = net.to(memory_format=torch.channels_last)
        if dist.is_initialized():
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device] if self.device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)
        net.train()
        self.out_dir = Path(cfg.out_dir)  # continue_run's choice
        if self.main:  # made once every check has passed: a failed start leaves no folder behind
            prepare_out_dir(self.out_dir)
        self.log(f"git {git_revision() or '-'} | {self.world} process(es) on {self.device.type} | "
                 f"{self.precision} ({self.why}) | "
                 f"{'global BN | ' if dist.is_initialized() and cfg.global_bn else ''}{describe}")
        self.log("config " + json.dumps(dataclasses.asdict(cfg)))
        self.log(f"{self.what}, {self.steps_per_epoch} steps/epoch of {cfg.batch_size} "
                 f"({self.local_batch} per process), {self.last_step} of {self.total_steps} steps"
                 f"{', ' + details if details else ''}, out {self.out_dir}"
                 + (f"; continuing {cfg.resume} from step {self.step}" if ckpt else ""))
        self.path, self.log_path = self.out_dir / KINDS[self.kind][3], self.out_dir / "log.jsonl"
        if self.main and self.log_path.exists():  # what was logged after the checkpoint goes
            lines = self.log_path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= self.step]
            if len(kept) != len(lines):
                self.log_path.write_text("".join(line + "\n" for line in kept))
        self.signum, self.last_save, self.t_start = None, time.time(), time.time()
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)
        self.group = dist.new_group(backend="gloo") if self.world > 1 else None
        self.progress = Progress(self.log, "step", self.last_step, cfg.batch_size,
                                 every=cfg.log_every, start=self.step)
        self.sums, self.since_log, self.lr, self.stopping = None, 0, 0.0, False
        self.waited, self.t_line, self.warned = loader.waited, time.time(), False
        self.since_first_line = False  # the first line's wait holds the workers' start
        return net

    # --- each step ----------------------------------------------------------------------------

    def epochs(self):
        """The epochs left, each sampler set to its epoch and to the batches not yet taken."""
        for epoch in range(self.step // self.steps_per_epoch, self.total_epochs):
            if self.step >= self.last_step:
                return
            self.epoch, self.t_epoch, self.steps_before = epoch, time.time(), self.step
            for sampler in self.samplers:
                sampler.set_epoch(epoch)
                sampler.start = (self.step % self.steps_per_epoch) * self.local_batch
            yield epoch

    def set_lr(self, lr):
        """This step's learning rate in every optimizer."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.lr = lr
        return lr

    def optimize(self, loss):
        """The gradient of loss, and a step of every optimizer (fp16: through the loss scale)."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def step_done(self, **metrics):
        """After a step: its metrics (0-d tensors, the loss first) are summed where they are; a
        log line, a checkpoint or a stop when due."""
        self.step += 1
        self.since_log += 1
        values = [v.detach().float() for v in metrics.values()]
        values.append((~torch.isfinite(values[0])).float())  # non-finite losses
        if self.sums is None:
            self.names, self.sums = list(metrics), torch.zeros(len(values), device=self.device)
            if self.epoch_sums is None or len(self.epoch_sums) != len(values):
                self.epoch_sums = torch.zeros_like(self.sums)
        self.sums += torch.stack(values)
        self.stopping, saving = self.poll()
        epoch_end = self.step % self.steps_per_epoch == 0
        last = self.step >= self.last_step
        if self.progress.due(self.step) or epoch_end or self.stopping or saving or last:
            self.flush()
        if epoch_end:
            return
        if self.stopping or saving or last:  # in mid-epoch: a checkpoint, no record
            self.save()
        self.stop_if_asked()
        if last:
            raise Done(f"stopped at step {self.step} (--max-steps), checkpoint {self.path}; the "
                       f"same command with --max-steps 0 goes on to step {self.total_steps}")

    def flush(self):
        """The metrics since the last line, averaged over processes and steps, into this epoch's
        sums; checked (before any checkpoint: the last good one stays) and shown."""
        if self.world > 1:
            dist.all_reduce(self.sums)
            self.sums /= self.world
        *means, bad = (self.sums / self.since_log).tolist()
        self.epoch_sums += self.sums
        self.sums.zero_()
        self.since_log = 0
        if bad > 0:
            raise UserError(f"loss is not finite at step {self.step}; stopped. " + (
                f"The last good checkpoint is {self.path}" if self.path.exists() else
                "No checkpoint was written yet") + " (try a lower --lr)")
        shown = " ".join(f"{name} {value:.4f}" for name, value in zip(self.names, means))
        self.progress.show(self.step, f"epoch {self.epoch + 1}/{self.total_epochs} {shown} "
                                      f"lr {self.lr:.4g}{self.data_wait()}")

    def data_wait(self):
        """' data 12%': the share of the time since the last line the loop waited for the
        loader's workers (none for data in memory), with, once, what to do where it is high."""
        if self.loader.loader is None:
            return ""
        now = time.time()
        share = (self.loader.waited - self.waited) / max(now - self.t_line, 1e-9)
        self.waited, self.t_line = self.loader.waited, now
        if share > 0.3 and self.since_first_line and not self.warned:
            self.warned = True
            self.log(f"warning: the steps waited for data {100 * share:.0f}% of the time: "
                     f"{self.workers} loader worker(s) per process do not keep up with this "
                     f"{self.device.type}; give more --workers (cores), or --decode device on a GPU")
        self.since_first_line = True
        return f" data {100 * share:.0f}%"

    def request(self, signum, frame):
        self.signum = signum

    def poll(self):
        """(stop, checkpoint): whether any process was asked to stop, and whether a checkpoint is
        due; the same answers on every process."""
        due = self.cfg.checkpoint_every > 0 and time.time() - self.last_save >= 60 * self.cfg.checkpoint_every
        if self.group is None:
            return self.signum is not None, due
        flags = torch.tensor([self.signum or 0, int(due)])  # a later signal counts next time
        dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flags[0]) or self.signum
        return bool(flags[0]), bool(flags[1])

    def stop_if_asked(self):
        if self.stopping:
            raise Done(f"stopped by signal {self.signum} at step {self.step}, checkpoint "
                       f"{self.path}; the same command continues the run")

    # --- the epoch end --------------------------------------------------------------------------

    def evaluation_due(self):
        """Whether this epoch ends with an evaluation: every --eval-every epochs, and at the end."""
        every = self.cfg.eval_every
        return bool(every and (self.epoch + 1) % every == 0) or self.step >= self.last_step

    def epoch_done(self, **extra):
        """The epoch's record in log.jsonl (its metrics averaged over its steps, and extra: an
        evaluation), then the checkpoint (the last one: finish's)."""
        means = (self.epoch_sums / self.steps_per_epoch).tolist()
        self.record = dict(epoch=self.epoch + 1, step=self.step, **dict(zip(self.names, means)),
                           lr=self.lr, images_per_s=(self.step - self.steps_before) *
                           self.cfg.batch_size / (time.time() - self.t_epoch),
                           time=time.time() - self.t_start, **self.unreadable(), **extra)
        if self.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(self.record) + "\n")
        self.epoch_sums.zero_()
        if self.step < self.last_step:  # the last one is finish's
            self.save()
            self.stop_if_asked()

    def unreadable(self):
        """{'unreadable_images': the files of an image folder found unreadable so far, by any
        process (data.ImageFolder marks each once)}."""
        marks = getattr(getattr(self.data, "dataset", self.data), "unreadable", None)
        if marks is None:
            return {}
        marks = torch.frombuffer(bytearray(marks), dtype=torch.int8).to(self.device, torch.int32)
        if self.world > 1:
            dist.all_reduce(marks, dist.ReduceOp.MAX)
        count = marks.sum()
        if count.item():
            self.log(f"{count.item()} unreadable image(s) so far, each replaced by the next image "
                     f"(named on stderr)")
        return {"unreadable_images": count.item()}

    def save(self, results=None):
        """The checkpoint: the script's state, the optimizers, the step, this epoch's sums and every
        process's random state; every process calls it at the same step."""
        state = dict(self.state(), optimizers=[o.state_dict() for o in self.optimizers],
                     scaler=self.scaler.state_dict(), kind=self.kind, step=self.step,
                     epoch=self.step // self.steps_per_epoch, steps_per_epoch=self.steps_per_epoch,
                     epoch_sums=self.epoch_sums.cpu(), results=results,
                     finished=self.step >= self.total_steps, rng=random_states(self.device))
        if self.main:
            save_checkpoint(self.path, state, keep_previous=True)
        self.last_save = time.time()

    def finish(self, results=None):
        """The end of the schedule: the last checkpoint, with results, and results.json; or, at
        --max-steps on an epoch's end, a checkpoint to continue from."""
        took = datetime.timedelta(seconds=round(time.time() - self.t_start))
        if self.step < self.total_steps:
            self.save()
            raise Done(f"stopped at step {self.step} (--max-steps), checkpoint {self.path}; the "
                       f"same command with --max-steps 0 goes on to step {self.total_steps}")
        results = results and dict(results, git=git_revision())
        self.save(results)
        if self.main and results is not None:
            write_json(self.out_dir / "results.json", results, KINDS[self.kind][2])
        self.log(f"done: {self.step} steps in {took}, checkpoint {self.path}"
                 + (f", results {self.out_dir / 'results.json'}" if results is not None else ""))
        return results


def write_json(path, data, script=None):
    """data as indented JSON at path, atomically (a crash leaves the old file or the new one),
    marked as script's (written_by) if given."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        tmp.write_text(json.dumps(dict(data, written_by=script) if script else data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror}")


def elastic_error(message):
    """Under torchrun, message in this process's error file: the launcher's failure summary,
    which follows its own traceback (torchrun's, not the script's), shows it as the cause."""
    with contextlib.suppress(KeyError, OSError):
        Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(
            json.dumps({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": str(int(time.time()))}}}))


def run_cli(script, fn):
    """Every script's main(): bad input (UserError), or a collective that failed because another
    process of the job died, ends it with one line (rank 0's under torchrun) and exit status 1;
    a torchrun job always leaves its process group."""
    main = os.environ.get("RANK", "0") == "0"
    try:
        fn()
    except Done as done:
        if main:
            print(done, flush=True)
    except UserError as e:
        # raised in a loader worker, the message carries the worker's traceback: its last line
        message = f"{script}: error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1]
        elastic_error(message)
        sys.exit(message if main else 1)
    except KeyboardInterrupt:  # Ctrl-C before the training loop: nothing to save yet
        sys.exit(f"{script}: interrupted")
    except RuntimeError as e:
        lost = isinstance(e, dist.DistError) or "gloo" in str(e) or "NCCL" in str(e)  # a peer gone
        if not (dist.is_available() and dist.is_initialized() and lost):
            raise
        message = (f"{script}: error: rank {os.environ.get('RANK')} lost another process of the "
                   f"job ({first_line(e)[:100]}...); torchrun --max-restarts restarts the job, "
                   f"which continues from the last checkpoint")
        elastic_error(message)
        sys.exit(message)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # Loader workers ignore SIGTERM (make_loader): after an error they are killed, or the
        # exit would wait for them forever (their loader's SIGCHLD check switched off first).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for worker in multiprocessing.active_children():
            worker.kill()
