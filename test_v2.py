"""SimCLRv2's networks and memory: selective kernels, the official parameter table, MoCo memory."""
import copy
import json

import pytest
import torch

from conftest import TINY_PRETRAIN, run_script
from memory import SHUFFLE_GROUPS, Memory, memory_momentum
from objective import nt_xent_loss
from model import build_model
from pretrain import Config
from resnet import SamePool, SelectiveKernel, build_encoder

# The official table of encoder sizes (millions of parameters, projection head excluded):
# (depth, width multiplier, selective kernels) -> M
OFFICIAL_PARAMS_M = {
    ("resnet50", 1, False): 24, ("resnet50", 1, True): 35, ("resnet50", 2, False): 94,
    ("resnet50", 2, True): 140, ("resnet50", 4, False): 375, ("resnet101", 1, False): 43,
    ("resnet101", 1, True): 65, ("resnet101", 2, False): 170, ("resnet101", 2, True): 257,
    ("resnet152", 1, False): 58, ("resnet152", 1, True): 89, ("resnet152", 2, False): 233,
    ("resnet152", 2, True): 354, ("resnet152", 3, True): 795,
}


@pytest.mark.parametrize("arch,width,sk", list(OFFICIAL_PARAMS_M))
def test_parameter_counts_match_the_official_table(arch, width, sk):
    with torch.device("meta"):  # shapes only: R152-3x-SK would take 3 GB in float32
        encoder, _ = build_encoder(arch, width, 224, 0.0625 if sk else 0.0)
    millions = sum(p.numel() for p in encoder.parameters()) / 1e6
    # the table rounds to whole millions; R152-2x counts 232.3M against a listed 233
    assert abs(millions - OFFICIAL_PARAMS_M[arch, width, sk]) <= max(0.5, 0.005 * millions), millions


def test_selective_kernel_shapes_and_attention_over_two_streams():
    torch.manual_seed(0)
    sk = SelectiveKernel(16, 24, stride=2, ratio=0.0625)
    x = torch.randn(3, 16, 8, 8)
    assert sk(x).shape == (3, 24, 4, 4)
    assert sk.attention[1][0].out_channels == 32  # max(24 * 0.0625, 32)
    streams = sk.streams(x).unflatten(1, (2, 24))  # b x 2 x c x h x w
    weights = sk.attention(streams.sum(1)).unflatten(1, (2, 24)).softmax(dim=1)
    torch.testing.assert_close(weights.sum(1), torch.ones(3, 24, 1, 1))
    torch.testing.assert_close(sk(x), (streams * weights).sum(1))


@pytest.mark.parametrize("arch,image_size", [("resnet18", 32), ("resnet50", 32), ("resnet50", 64)])
def test_sk_networks_run_with_both_stems(arch, image_size):
    encoder, h_dim = build_encoder(arch, 0.125, image_size, sk_ratio=0.0625)
    assert encoder(torch.rand(2, 3, image_size, image_size)).shape == (2, h_dim)
    has_sk = any(isinstance(m, SelectiveKernel) for m in encoder.modules())
    assert has_sk == (arch == "resnet50")  # SK replaces the 3x3 of bottlenecks only
    # ResNet-D: each stage's first shortcut average-pools, also stage 1's at stride 1 (the
    # authors' code), in every block type
    pools = [type(stage[0].shortcut[0]) for stage in encoder.stages]
    assert pools == [SamePool, torch.nn.Sequential, torch.nn.Sequential, torch.nn.Sequential]


def make_memory(size=10, dim=4, momentum=0.9, bn="batch"):
    torch.manual_seed(0)
    model = build_model(Config(arch="resnet18", width_multiplier=0.125, image_size=16, proj_dim=dim))
    return model, Memory(model, size, dim, momentum, bn)


def test_memory_network_follows_the_ema_rule_and_gets_no_gradient():
    model, memory = make_memory()
    before = [p.clone() for p in memory.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    x = torch.rand(8, 3, 16, 16)
    keys = memory.project(x)
    model(x)[1].sum().backward()
    memory.update()
    for p_m, old, p in zip(memory.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(p_m, 0.9 * old + 0.1 * p.detach())
        assert p_m.grad is None and not p_m.requires_grad
    assert not keys.requires_grad
    assert "online" not in dict(memory.named_modules())  # the online network is not stored twice


def test_memory_queue_is_fifo_wraps_around_and_starts_empty():
    _, memory = make_memory(size=10, dim=4)
    assert memory.negatives() is None  # no random vectors stand in for keys
    batches = [torch.full((4, 4), float(i + 1)) for i in range(3)]
    memory.enqueue(batches[0])
    assert memory.negatives().tolist() == batches[0].tolist()
    for b in batches[1:]:
        memory.enqueue(b)
    # 12 keys into 10 rows: the third batch's last two overwrite rows 0 and 1
    assert memory.queue[:, 0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]
    assert memory.position.item() == 2 and len(memory.negatives()) == 10
    restored = make_memory(size=10, dim=4)[1]
    restored.load_state_dict(memory.state_dict())  # a checkpoint keeps how full it is
    assert restored.filled == 10 and torch.equal(restored.negatives(), memory.negatives())


def naive_memory_loss(z1, z2, k1, k2, queue, tau):
    """v2's memory as its author describes it, literally, in float64: anchor z_i (online) against
    the momentum network's keys of every view of the batch but its own, and the queue; the
    positive is the key of its other view. The mean over the 2n anchors."""
    z, k = [v.double() for v in (*z1, *z2)], [v.double() for v in (*k1, *k2)]
    queue = [q.double() for q in queue]
    cos = lambda u, v: (u @ v) / (u.norm() * v.norm())
    n, total = len(z1), 0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        denominator = sum(torch.exp(cos(z[i], k[j]) / tau) for j in range(2 * n) if j != i)
        denominator = denominator + sum(torch.exp(cos(z[i], q) / tau) for q in queue)
        total = total - torch.log(torch.exp(cos(z[i], k[p]) / tau) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("k", [0, 7])
def test_memory_loss_and_its_gradient_equal_a_float64_loop(k):
    g = torch.Generator().manual_seed(k)
    z1, z2, k1, k2 = (torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(4))
    queue = torch.randn(k, 6, generator=g, dtype=torch.float64)
    z1.requires_grad_(), z2.requires_grad_()
    loss, acc, _ = nt_xent_loss(z1, z2, 0.3, candidates=torch.cat([k1, k2, queue]))
    grads = torch.autograd.grad(loss, (z1, z2))
    ref = naive_memory_loss(z1, z2, k1, k2, queue, 0.3)
    ref_grads = torch.autograd.grad(ref, (z1, z2))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # contrast_acc ranks each first view's positive key among the batch's second-view keys
    sim = torch.nn.functional.normalize(z1, dim=1) @ torch.nn.functional.normalize(k2, dim=1).T
    assert acc.item() == pytest.approx((sim.argmax(1) == torch.arange(5)).double().mean().item())


def test_the_memory_enters_the_step_through_the_network_and_the_objective():
    """Memory.wrap as train_step uses it: the wrapped network gives the online z and, having moved
    the momentum network, leaves its keys of the same views; the wrapped objective is the float64
    loop of v2's memory loss over those keys and the queue, and the keys join the queue after."""
    from objective import build_objective
    model, memory = make_memory(size=64, dim=8, momentum=0.5, bn="batch")
    memory.enqueue(torch.randn(16, 8))  # the keys of a past batch
    queue = memory.negatives().clone()
    before = [p.clone() for p in memory.model.parameters()]
    net, objective = memory.wrap(model, build_objective("nt-xent", 0.5))
    x = torch.rand(16, 3, 16, 16)
    _, z = net(x)
    for p_m, old, p in zip(memory.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(p_m, 0.5 * old + 0.5 * p.detach())
    keys = memory.keys
    torch.testing.assert_close(keys, memory.model(x)[1])
    (z1, z2), (k1, k2) = z.chunk(2), keys.chunk(2)
    loss, _, _ = objective(z1, z2)
    assert loss.item() == pytest.approx(naive_memory_loss(z1, z2, k1, k2, queue, 0.5).item(), rel=1e-5)
    assert len(memory.negatives()) == 32 and torch.equal(memory.negatives()[16:], keys)


def test_momentum_network_equal_to_the_online_one_with_an_empty_queue_is_plain_nt_xent():
    model, memory = make_memory(size=64, dim=8, momentum=0.0)  # m 0: the online weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    memory.update()
    x = torch.rand(16, 3, 16, 16)
    z1, z2 = model(x)[1].chunk(2)
    k1, k2 = memory.project(x).chunk(2)  # the same views' BN statistics: the same z
    with_memory = nt_xent_loss(z1, z2, 0.5, candidates=torch.cat([k1, k2]))  # the queue is empty
    assert memory.negatives() is None
    plain = nt_xent_loss(z1, z2, 0.5)
    for a, b in zip(with_memory, plain):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_shuffled_bn_is_per_process_bn_of_the_permuted_batch():
    """MoCo's shuffled BN: the keys equal those of 8 processes with ordinary BN, each given one
    slice of the permuted views, put back in the views' order."""
    model, memory = make_memory(size=64, dim=8, bn="shuffle")
    x = torch.rand(32, 3, 16, 16)
    torch.manual_seed(5)
    keys = memory.project(x)
    torch.manual_seed(5)
    order = torch.randperm(32)
    plain = copy.deepcopy(model).requires_grad_(False)  # ordinary BN, training mode
    for p_m, p in zip(memory.model.parameters(), plain.parameters()):
        assert torch.equal(p_m, p)
    parts = [plain(x[idx])[1] for idx in order.split(32 // SHUFFLE_GROUPS)]  # one per process
    expected = torch.empty_like(keys)
    expected[order] = torch.cat(parts)
    torch.testing.assert_close(keys, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(keys, plain(x)[1], atol=1e-3)  # not the whole batch's statistics


def test_momentum_follows_the_run_length():
    # v2: 800 epochs of ImageNet at B 4096 (250,000 steps), 64K keys = 8 batches: v2's 0.999
    assert memory_momentum(250_000, 65536 / 8192) == pytest.approx(0.999)
    # the cpu scale: 390 steps, 8192 keys = 16 batches of 512 views: averaged over the queue
    assert memory_momentum(390, 16) == pytest.approx(1 - 1 / 16)
    assert memory_momentum(10, 0.5) == 0.0  # never an average over less than one step


def test_sk_network_with_memory_pretrains_resumes_and_evaluates(tiny_folder, tmp_path):
    """A short CPU run with selective kernels, a small width and the memory, through linear_eval.py."""
    run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", tmp_path,
               "--memory-size", 40, "--max-steps", 3, "--sk-ratio", 0.0625, "--arch", "resnet50",
               "--width-multiplier", 0.0625)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["memory"]["position"].item() == (3 * 32) % 40
    assert ckpt["config"]["sk_ratio"] == 0.0625
    assert any(".attention." in k for k in ckpt["model"])  # the SK weights are in the checkpoint
    out = run_script("pretrain.py", "--resume", tmp_path / "ckpt.pt", "--max-steps", 4).stdout
    assert "step 4/" in out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["memory"]["position"].item() == (4 * 32) % 40
    run_script("linear_eval.py", "--checkpoint", tmp_path / "ckpt.pt", "--cached-features",
               "--epochs", 2, "--knn", 5, "--batch-size", 16, "--workers", 0)
    result = json.loads((tmp_path / "linear_eval_cached_e2_b16_knn5.json").read_text())
    assert result["encoder"]["sk_ratio"] == 0.0625 and 0 <= result["top1"] <= 100
