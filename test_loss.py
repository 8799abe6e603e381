"""NT-Xent (Eq. 1), the losses of Table 2 / 4, LARS and the learning-rate schedule against
independent slow references."""
import math

import pytest
import torch

import torch.nn.functional as F

from lars import LARS
from objective import build_objective, margin_triplet_loss, nt_logistic_loss, nt_xent_loss
from model import learning_rate, scaled_lr


def cosine(u, v):
    return (u @ v) / (u.norm() * v.norm())


def interleaved(z1, z2):
    """Algorithm 1's numbering, in float64: z_{2k-1}, z_{2k} are the two views of image k."""
    z = []
    for a, b in zip(z1.double(), z2.double()):
        z += [a, b]
    return z


def naive_nt_xent(z1, z2, tau, negatives=(), sim=cosine):
    """Algorithm 1 literally, in float64: L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)] with l from
    Eq. 1; `negatives` (v2's memory) join every denominator; sim=dot: Table 5 without the l2
    norm. Returns (L, the authors' contrast_acc)."""
    z = interleaved(z1, z2)
    negatives = [q.double() for q in negatives]

    def l(i, j):
        denominator = sum(torch.exp(sim(z[i], z[k]) / tau) for k in range(len(z)) if k != i)
        denominator = denominator + sum(torch.exp(sim(z[i], q) / tau) for q in negatives)
        return -torch.log(torch.exp(sim(z[i], z[j]) / tau) / denominator)

    n = len(z1)
    loss = sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)
    return loss, naive_contrast_acc(z1, z2)


def naive_contrast_acc(z1, z2):
    """The authors' contrastive accuracy (metrics.py, on logits_ab), in float64: the share of
    first views z1[k] whose cosine similarity is higher with z2[k] than with every other z2[j]."""
    z1, z2 = z1.double(), z2.double()
    sim = lambda u, v: (u @ v) / (u.norm() * v.norm())
    n = len(z1)
    return sum(all(sim(z1[k], z2[k]) > sim(z1[k], z2[j]) for j in range(n) if j != k)
               for k in range(n)) / n


@pytest.mark.parametrize("n,d,tau", [(1, 3, 0.5), (4, 8, 0.1), (7, 16, 0.5), (16, 5, 1.0)])
def test_nt_xent_equals_naive_eq1(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    loss, acc, _ = nt_xent_loss(z1, z2, tau)
    ref_loss, ref_acc = naive_nt_xent(z1, z2, tau)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert acc.item() == pytest.approx(float(ref_acc))


@pytest.mark.parametrize("k", [1, 5, 40])
def test_nt_xent_with_memory_negatives_equals_naive(k):
    g = torch.Generator().manual_seed(k)
    z1, z2 = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    queue = torch.randn(k, 6, generator=g) * 3  # not unit length: the loss normalises them
    loss, acc, _ = nt_xent_loss(z1, z2, 0.3, candidates=torch.cat([z1, z2, queue]))
    ref_loss, ref_acc = naive_nt_xent(z1, z2, 0.3, negatives=queue)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert acc.item() == pytest.approx(float(ref_acc))
    assert loss.item() > nt_xent_loss(z1, z2, 0.3)[0].item()  # more negatives, larger loss


@pytest.mark.parametrize("tau", [10.0, 100.0])
def test_nt_xent_without_l2_norm_equals_naive_dot_product(tau):
    """Table 5's ablation: the dot product z_i . z_k instead of the cosine (vectors of norm up to
    about 10, so that at tau 10 the two losses differ a lot)."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = 3 * torch.randn(6, 8, generator=g), 3 * torch.randn(6, 8, generator=g)
    loss, acc, _ = nt_xent_loss(z1, z2, tau, l2_norm=False)
    ref_loss, _ = naive_nt_xent(z1, z2, tau, sim=lambda u, v: u @ v)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert loss.item() != pytest.approx(nt_xent_loss(z1, z2, tau)[0].item(), rel=1e-2)
    dot_acc = sum(all(z1[k] @ z2[k] > z1[k] @ z2[j] for j in range(6) if j != k) for k in range(6)) / 6
    assert acc.item() == pytest.approx(float(dot_acc))


def test_entropy_is_the_authors_metric():
    """metrics.py: the mean entropy (with their 1e-8 inside the log) of the softmax of each
    first view over the N second views, at the loss's temperature."""
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for name, kwargs in [("nt-xent", {}), ("nt-logistic", {}), ("margin", {"semi_hard": True})]:
        _, _, entropy = build_objective(name, 0.2, **kwargs)(z1, z2)
        ref = 0.0
        for k in range(5):
            logits = [cosine(z1[k].double(), z2[j].double()) / 0.2 for j in range(5)]
            total = sum(math.exp(x) for x in logits)
            ref -= sum(math.exp(x) / total * math.log(math.exp(x) / total + 1e-8) for x in logits)
        assert entropy.item() == pytest.approx(ref / 5, rel=1e-5), name


def naive_semi_hard(z, i, p, negatives):
    """Schroff et al.'s semi-hard negative as TensorFlow's triplet_semihard_loss picks it, on
    squared Euclidean distances of the unit vectors: the nearest negative farther from the
    anchor than the positive; if none is farther, the farthest negative."""
    unit = [v / v.norm() for v in z]
    d = lambda a, b: ((unit[a] - unit[b]) ** 2).sum()
    farther = [k for k in negatives if d(i, k) > d(i, p)]
    if farther:
        return [min(farther, key=lambda k: d(i, k))]
    return [max(negatives, key=lambda k: d(i, k))]


def naive_pair_loss(z1, z2, term, semi_hard):
    """mean over the 2N anchors i of term(sim(i, p), [sim(i, k) for the negatives k]), Table 2's
    formulas looped in float64; p is the other view of i's image."""
    z = interleaved(z1, z2)
    total = 0.0
    for i in range(len(z)):
        p = i + 1 if i % 2 == 0 else i - 1
        negatives = [k for k in range(len(z)) if k not in (i, p)]
        if semi_hard:
            negatives = naive_semi_hard(z, i, p, negatives)
        total = total + term(cosine(z[i], z[p]), [cosine(z[i], z[k]) for k in negatives])
    return total / len(z)


@pytest.mark.parametrize("semi_hard", [False, True])
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_nt_logistic_equals_naive_table2(semi_hard, tau):
    """Table 2: log sigmoid(u.v+ / tau) + log sigmoid(-u.v- / tau), negated, the negative term
    averaged over the negatives; value and gradient."""
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    log_sigmoid = lambda x: -torch.log1p(torch.exp(-x))
    term = lambda pos, negs: -log_sigmoid(pos / tau) - sum(log_sigmoid(-s / tau) for s in negs) / len(negs)
    loss = nt_logistic_loss(z1, z2, tau, semi_hard=semi_hard)[0]
    ref = naive_pair_loss(z1, z2, term, semi_hard)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    grads = torch.autograd.grad(loss, [z1, z2])
    for a, b in zip(grads, torch.autograd.grad(ref, [z1, z2])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("semi_hard", [False, True])
def test_margin_triplet_equals_naive_table2(semi_hard):
    """Table 2: max(u.v- - u.v+ + m, 0), averaged over the negatives (or the semi-hard one)."""
    g = torch.Generator().manual_seed(6)
    z1 = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    m = 0.4
    term = lambda pos, negs: sum(torch.clamp(s - pos + m, min=0) for s in negs) / len(negs)
    loss = margin_triplet_loss(z1, z2, m, semi_hard=semi_hard)[0]
    ref = naive_pair_loss(z1, z2, term, semi_hard)
    assert 0 < loss.item() == pytest.approx(ref.item(), rel=1e-9)
    grads = torch.autograd.grad(loss, [z1, z2])
    for a, b in zip(grads, torch.autograd.grad(ref, [z1, z2])):
        torch.testing.assert_close(a, b)


def test_semi_hard_mining_picks_tensorflows_negative():
    """Both of TensorFlow's cases: images 0-3 have a positive nearer than every negative (the
    nearest negative is picked), image 4's positive is its antipode, farther than every negative
    (the farthest negative is picked). Margin 2 keeps every hinge active, so the loss tells which
    negative was picked."""
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(8, 6, generator=g)
    z2 = torch.randn(8, 6, generator=g)
    z2[:4] = z1[:4] + 0.01 * torch.randn(4, 6, generator=g)
    z2[4] = -z1[4]
    hinge = lambda pos, negs: sum(s - pos + 2.0 for s in negs) / len(negs)
    ours = margin_triplet_loss(z1.double(), z2.double(), 2.0, semi_hard=True)[0]
    assert ours.item() == pytest.approx(naive_pair_loss(z1, z2, hinge, True).item(), rel=1e-9)
    everything = margin_triplet_loss(z1.double(), z2.double(), 2.0)[0]
    assert ours.item() != pytest.approx(everything.item(), rel=1e-3)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_gradient_equals_naive(tau):
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    nt_xent_loss(z1, z2, tau)[0].backward()
    grads = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    naive_nt_xent(z1, z2, tau)[0].backward()
    torch.testing.assert_close(grads[0], z1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], z2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [2, 8, 64])
def test_identical_embeddings_give_log_2n_minus_1(n):
    z = torch.ones(n, 4)
    loss = nt_xent_loss(z, z.clone(), 0.5)[0]
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)


def test_nt_xent_invariant_to_permuting_pairs_and_swapping_views():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(9, 12, generator=g), torch.randn(9, 12, generator=g)
    perm = torch.randperm(9, generator=g)
    loss = nt_xent_loss(z1, z2, 0.2)[0]
    assert nt_xent_loss(z1[perm], z2[perm], 0.2)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    assert nt_xent_loss(z2, z1, 0.2)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # but breaking the pairing changes it: the loss really depends on which views are positives
    assert nt_xent_loss(z1, z2[perm], 0.2)[0].item() != pytest.approx(loss.item(), rel=1e-3)


def test_contrast_acc_is_the_authors_metric_not_the_2n_anchor_one():
    """First views crowded around one direction u, each a little towards its own second view:
    among the N second views every first view finds its positive (the authors' metric: 1), but
    among all 2N - 1 views the first views find each other (that metric: 0.5)."""
    e = torch.eye(8)
    z1, z2 = e[7] + 0.1 * e[:6], e[:6]  # u = e_7, orthogonal to every second view
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    over_2n_anchors = ((z @ z.T - 1e9 * torch.eye(12)).argmax(1) == (torch.arange(12) + 6) % 12)
    assert over_2n_anchors.float().mean().item() == 0.5
    assert nt_xent_loss(z1, z2, 0.5)[1].item() == 1.0 == naive_contrast_acc(z1, z2)


def test_nt_xent_perfect_pairs_are_ranked_first():
    z = torch.eye(8)  # 8 orthogonal images, both views identical
    loss, acc, _ = nt_xent_loss(z, z.clone(), 0.1)
    assert acc.item() == 1.0
    assert loss.item() < 0.01


@pytest.mark.parametrize("wd", [0.01, 0.0])
def test_lars_matches_hand_computed_official_update(wd):
    """Several weights of different shapes (each must get its own trust ratio), biases, a zero
    weight and, without weight decay, a zero gradient (trust ratio 1 for both), a parameter
    without gradient (left alone), over several steps, against the official rule written out
    one tensor at a time in float64."""
    torch.manual_seed(0)
    shapes = {"w": (3, 4), "conv": (2, 3, 3, 3), "b": (3,), "gamma": (2,), "z": (2, 2), "zg": (4, 2)}
    params = {k: torch.randn(s, dtype=torch.float64, requires_grad=True) for k, s in shapes.items()}
    with torch.no_grad():
        params["z"].zero_()  # zero weight: trust ratio 1
    frozen = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)  # no gradient: untouched
    lr, momentum, eta = 0.7, 0.9, 0.001
    opt = LARS([*params.values(), frozen], lr=lr, momentum=momentum, weight_decay=wd,
               trust_coefficient=eta)
    ref = {k: v.detach().clone() for k, v in params.items()}
    vel = {k: torch.zeros_like(v) for k, v in ref.items()}
    frozen_before = frozen.detach().clone()
    for step in range(4):
        grads = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
        if step == 0:
            grads["z"].zero_()
        grads["zg"].zero_()  # zero gradient: with wd 0, ||g|| = 0 and the trust ratio is 1
        for k, p in params.items():
            p.grad = grads[k].clone()
        opt.step()
        for k in ref:  # the official rule, written out tensor by tensor
            g = grads[k]
            if len(shapes[k]) > 1:
                g = g + wd * ref[k]
                wn, gn = ref[k].norm().item(), g.norm().item()
                trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
            else:
                trust = 1.0
            vel[k] = momentum * vel[k] + lr * trust * g
            ref[k] = ref[k] - vel[k]
        for k, p in params.items():
            torch.testing.assert_close(p.detach(), ref[k], msg=k)
    assert torch.equal(frozen.detach(), frozen_before) and frozen not in opt.state


def test_lars_bias_step_is_plain_momentum_sgd():
    """A bias must not be adapted: with trust 0.001 it would barely move."""
    b = torch.ones(5, requires_grad=True)
    opt = LARS([b], lr=0.1, weight_decay=0.5)
    b.grad = torch.ones(5)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.full((5,), 0.9))


def test_learning_rate_warmup_then_cosine():
    peak, warmup, total = 2.0, 10, 110
    lrs = [learning_rate(s, total, warmup, peak) for s in range(total + 1)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1.0) and lrs[10] == pytest.approx(peak)
    assert lrs[60] == pytest.approx(peak / 2)  # cosine is half-way down half-way through
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
