"""Two processes (gloo, CPU) must train exactly as one process on the whole batch (Sec. 2.2)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from einops import rearrange

from conftest import ROOT, TINY_PRETRAIN
from objective import nt_xent_loss
from model import build_model, convert_to_global_bn
from pretrain import Config
from test_loss import naive_contrast_acc

WORLD, N = 2, 6  # two processes, six images each


def make_model_and_batch():
    torch.manual_seed(0)
    model = build_model(Config(arch="resnet18", width_multiplier=0.125, image_size=16)).double()
    for m in model.modules():  # non-trivial BN parameters, so that their gradients are tested too
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    x1 = torch.rand(WORLD * N, 3, 16, 16, dtype=torch.float64)
    x2 = torch.rand(WORLD * N, 3, 16, 16, dtype=torch.float64) * 2  # the halves differ
    return model, x1, x2


def crossed_views():
    """Second views e_k; rank 1's first views e_k too, rank 0's lean towards rank 1's e_(k+N)."""
    e = torch.eye(WORLD * N, dtype=torch.float64)
    z1 = e.clone()
    z1[:N] = 0.5 * e[:N] + e[N:]
    return z1, e


def forward_loss(model, x1, x2):
    _, z = model(torch.cat([x1, x2]))
    z1, z2 = rearrange(z, "(v b) d -> v b d", v=2)
    return nt_xent_loss(z1, z2, 0.2)


def reference(global_bn):
    """One process, the whole batch. Without global BN each half is normalised by its own
    statistics (what per-GPU BN does) while the negatives still come from the whole batch."""
    model, x1, x2 = make_model_and_batch()
    if global_bn:
        z1, z2 = rearrange(model(torch.cat([x1, x2]))[1], "(v b) d -> v b d", v=2)
    else:
        zs = []
        for r in range(WORLD):
            s = slice(r * N, (r + 1) * N)
            zs.append(rearrange(model(torch.cat([x1[s], x2[s]]))[1], "(v b) d -> v b d", v=2))
        z1, z2 = torch.cat([z[0] for z in zs]), torch.cat([z[1] for z in zs])
    loss, acc, _ = nt_xent_loss(z1, z2, 0.2)
    assert acc.item() == pytest.approx(naive_contrast_acc(z1.detach(), z2.detach()))
    loss.backward()
    return dict(loss=loss.item(), acc=acc.item(),
                grads={k: p.grad for k, p in model.named_parameters() if p.grad is not None},
                buffers={k: b for k, b in model.named_buffers() if "running" in k})


def worker(rank, init_file, global_bn, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model, x1, x2 = make_model_and_batch()
    if global_bn:
        model = convert_to_global_bn(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    s = slice(rank * N, (rank + 1) * N)
    loss, acc, _ = forward_loss(ddp, x1[s], x2[s])
    loss.backward()  # DDP averages the gradients over the two processes
    z1, z2 = crossed_views()
    stats = torch.stack([loss.detach(), acc.detach(), nt_xent_loss(z1[s], z2[s], 0.5)[1]])
    dist.all_reduce(stats)
    if rank == 0:
        torch.save(dict(loss=stats[0].item() / WORLD, acc=stats[1].item() / WORLD,
                        crossed_acc=stats[2].item() / WORLD,
                        grads={k: p.grad for k, p in model.named_parameters() if p.grad is not None},
                        buffers={k: b for k, b in model.named_buffers() if "running" in k}), out)
    dist.destroy_process_group()


@pytest.mark.parametrize("global_bn", [True, False])
def test_two_processes_equal_one_process_on_the_whole_batch(global_bn, tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), global_bn, str(tmp_path / "out.pt")), nprocs=WORLD)
    got, want = torch.load(tmp_path / "out.pt"), reference(global_bn)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-10)
    assert got["acc"] == pytest.approx(want["acc"])
    # each rank's first views against the second views of all ranks: rank 0's first views point
    # at rank 1's second views, so a rank that looked only at its own would score 1, not 0.5
    z1, z2 = crossed_views()
    assert got["crossed_acc"] == naive_contrast_acc(z1, z2) == 0.5
    assert got["grads"].keys() == want["grads"].keys() and len(want["grads"]) > 40
    for k in want["grads"]:
        torch.testing.assert_close(got["grads"][k], want["grads"][k], rtol=1e-8, atol=1e-12, msg=k)
    if global_bn:  # the running statistics are those of the whole batch
        for k in want["buffers"]:
            torch.testing.assert_close(got["buffers"][k], want["buffers"][k], rtol=1e-8, atol=1e-12)


def test_local_negatives_would_be_caught():
    """The test above can fail: scoring each half only against its own views (a public bug)
    gives a different loss from the whole batch's."""
    _, x1, x2 = make_model_and_batch()
    z1, z2 = torch.randn(WORLD * N, 8, dtype=torch.float64), torch.randn(WORLD * N, 8, dtype=torch.float64)
    whole = nt_xent_loss(z1, z2, 0.2)[0].item()
    local = sum(nt_xent_loss(z1[r * N:(r + 1) * N], z2[r * N:(r + 1) * N], 0.2)[0].item()
                for r in range(WORLD)) / WORLD
    assert abs(whole - local) > 1e-3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "pretrain.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def test_torchrun_batch_must_divide(tiny_folder, tmp_path):
    """A refusal under torchrun: one line from rank 0 (once every rank said it, each with its
    traceback), and a non-zero exit; torchrun's own failure summary after it (with the launcher's
    traceback) names it as the cause, where it said 'To enable traceback see ...'."""
    proc = torchrun(*TINY_PRETRAIN, "--data-dir", tiny_folder, "--device", "cpu", "--batch-size", 15,
                    "--out-dir", tmp_path, check=False)
    said = "pretrain.py: error: --batch-size 15 is not divisible by 2 processes"
    assert proc.returncode != 0
    assert proc.stderr.splitlines().count(said) == 1, proc.stderr  # rank 0, once
    assert f"traceback : {said}" in proc.stderr, proc.stderr  # the summary's root cause
    assert "[rank" not in proc.stderr and "To enable traceback" not in proc.stderr, proc.stderr


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's note on dist_nn, as pretrain.py
def test_global_bn_under_bf16_autocast_is_batchnorm(tmp_path):
    """On a CPU with native bf16, --precision auto runs torchrun jobs under bf16 autocast: global
    BN then takes bf16 activations. It must give what BatchNorm gives them (bf16 out, float32
    statistics from float32 sums), not fail on its running statistics' update."""
    from model import GlobalBatchNorm
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = (torch.randn(8, 5, 6, 6) * 3 + 1).bfloat16()
        bn, gbn = nn.BatchNorm2d(5), GlobalBatchNorm(5)
        with torch.autocast("cpu", torch.bfloat16):
            want, got = bn(x), gbn(x)
    finally:
        dist.destroy_process_group()
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
    assert gbn.running_mean.dtype == torch.float32
    torch.testing.assert_close(gbn.running_mean, bn.running_mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gbn.running_var, bn.running_var, rtol=1e-3, atol=1e-4)
