"""The contrastive objective (v1 Sec. 2.1, Eq. 1; Sec. 5.1, Tables 2 and 4), as the authors keep
it in objective.py: NT-Xent, and the two losses the paper compares it with.

Every loss scores each of this process's 2n views (anchors) against the 2N views of the whole
global batch (gathered with gradient under torchrun), its candidates (v2's memory supplies others:
its keys of the 2N views, then K past keys, memory.py):

    sim(i, k) = z_i . z_k / (||z_i|| ||z_k||)        (cosine: the l2 norm of Sec. 5.1, Table 5;
                                                      l2_norm=False drops it, z_i . z_k)
    NT-Xent      l(i) = -log exp(sim(i, p) / tau) / sum_{k != i} exp(sim(i, k) / tau)     (Eq. 1)
    NT-Logistic  l(i) = -log sigmoid(sim(i, p) / tau) - mean_{k in neg} log sigmoid(-sim(i, k) / tau)
    Margin       l(i) = mean_{k in neg} max(sim(i, k) - sim(i, p) + m, 0)

p is the other view of anchor i's image and neg the 2N - 2 other views (and the K past keys);
each loss is the mean of l over the anchors. Table 2 writes NT-Logistic and the margin triplet
for one negative; over many we average (the paper does not say). semi_hard=True keeps one
negative per anchor, as TensorFlow's triplet_semihard_loss picks it (Sec. 5.1): the most similar
of those less similar than the positive, else the least similar. The authors' loss_a + loss_b is
2x the mean returned here: pretrain.train_step minimises that.
"""
import functools

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

LOSSES = ("nt-xent", "nt-logistic", "margin")  # --loss; Table 4's rows, with --semi-hard


def _world():
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


def gather_with_grad(x):
    """Concatenate x from every process (rank order), passing gradients back to their owners."""
    return x if _world()[1] == 1 else torch.cat(dist_nn.all_gather(x))


def pairwise_logits(z1, z2, temperature, l2_norm=True, candidates=None):
    """(logits 2n x (2N+K): the similarity of every anchor with every candidate over tau, float32
    or wider, the anchor's own column -inf; positive: the column of its other view, 2n). z1[k],
    z2[k] (n x d): the two views of image k. candidates: the global batch's 2N views, [view 1;
    view 2] of each rank in order (gathered with gradient), or v2's memory's keys of them, then
    its queue."""
    rank, _ = _world()
    n = z1.shape[0]
    wide = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # bf16 -> fp32
    unit = lambda t: F.normalize(t, dim=1) if l2_norm else t
    z = unit(wide(torch.cat([z1, z2])))  # 2n x d: [view 1; view 2]
    candidates = gather_with_grad(z) if candidates is None else unit(candidates.to(z.dtype))
    logits = z @ candidates.T / temperature  # 2n x (2N+K)
    anchor = torch.arange(2 * n, device=z.device)
    positive = rank * 2 * n + (anchor + n) % (2 * n)  # view 1 <-> view 2 of the same image
    own = F.one_hot(rank * 2 * n + anchor, logits.shape[1]).bool()
    return logits.masked_fill(own, float("-inf")), positive


def contrast_stats(logits):
    """The authors' monitoring (metrics.py), on logits_ab: each first view of this process
    against the N second views of the global batch. Returns (contrast_acc, the share whose own
    second view ranks first; entropy, the mean entropy of the softmax over those N)."""
    rank, world = _world()
    n = len(logits) // 2
    second_views = (torch.arange(0, 2 * n * world, 2 * n, device=logits.device)[:, None] + n
                    + torch.arange(n, device=logits.device)).flatten()  # N
    logits_ab = logits[:n, second_views].detach()  # n x N
    acc = (logits_ab.argmax(1) == rank * n + torch.arange(n, device=logits.device)).float().mean()
    p = logits_ab.softmax(1)
    entropy = -(p * torch.log(p + 1e-8)).sum(1).mean()  # the authors' 1e-8
    return acc, entropy


def nt_xent_loss(z1, z2, temperature, l2_norm=True, candidates=None):
    """NT-Xent, Eq. 1, averaged over all 2N anchors: L of Algorithm 1.

        l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)
        L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)],   sim = cosine similarity

    z1[k], z2[k] (n x d): the two views of image k. Under torchrun each process's 2n anchors are
    scored against all 2N views, so with DDP the gradient is the one-process one. l2_norm=False:
    z_i . z_k (Table 5). Returns (L over this process's anchors, contrast_acc, entropy).
    """
    logits, positive = pairwise_logits(z1, z2, temperature, l2_norm, candidates)  # 2n x 2N
    return (F.cross_entropy(logits, positive), *contrast_stats(logits))


def _negatives_mask(logits, positive):
    """2n x (2N+K), True at every candidate that is neither the anchor nor its positive."""
    mask = torch.isfinite(logits)
    return mask.scatter(1, positive[:, None], False)


def _semi_hard(logits, positive, neg):
    """One negative per anchor (TF's triplet_semihard_loss rule, on similarities): the most
    similar of the negatives less similar than the positive, else the least similar negative.
    Returns a mask like neg with one True per row."""
    pos = logits.gather(1, positive[:, None])  # 2n x 1
    easier = neg & (logits < pos)
    best_easier = logits.masked_fill(~easier, float("-inf")).argmax(1)
    least_similar = logits.masked_fill(~neg, float("inf")).argmin(1)
    choice = torch.where(easier.any(1), best_easier, least_similar)
    return F.one_hot(choice, logits.shape[1]).bool()


def nt_logistic_loss(z1, z2, temperature, semi_hard=False, candidates=None):
    """NT-Logistic (Table 2): -log sigmoid(sim(i, p) / tau) - mean over the negatives k of
    log sigmoid(-sim(i, k) / tau), averaged over the 2N anchors; semi_hard: one negative per
    anchor (module docstring). Returns (loss, contrast_acc, entropy)."""
    logits, positive = pairwise_logits(z1, z2, temperature, True, candidates)
    neg = _negatives_mask(logits, positive)
    if semi_hard:
        neg = _semi_hard(logits.detach(), positive, neg)
    pos_term = -F.logsigmoid(logits.gather(1, positive[:, None]))[:, 0]  # 2n
    neg_terms = -F.logsigmoid(-logits.masked_fill(~neg, 0.0))  # 2n x (2N+K)
    neg_term = (neg_terms * neg).sum(1) / neg.sum(1).clamp(min=1)
    return ((pos_term + neg_term).mean(), *contrast_stats(logits))


def margin_triplet_loss(z1, z2, margin, semi_hard=False, temperature=1.0, candidates=None):
    """Margin triplet (Table 2): mean over the negatives k of max(sim(i, k) - sim(i, p) + m, 0),
    averaged over the 2N anchors; semi_hard: one negative per anchor (module docstring).
    temperature only scales the logits of the monitoring (contrast_acc, entropy).
    Returns (loss, contrast_acc, entropy)."""
    sim, positive = pairwise_logits(z1, z2, 1.0, True, candidates)  # cosines
    neg = _negatives_mask(sim, positive)
    if semi_hard:
        neg = _semi_hard(sim.detach(), positive, neg)
    hinge = (sim - sim.gather(1, positive[:, None]) + margin).clamp(min=0)
    hinge = hinge.masked_fill(~neg, 0.0)
    loss = (hinge.sum(1) / neg.sum(1).clamp(min=1)).mean()
    return (loss, *contrast_stats(sim / temperature))


def build_objective(name="nt-xent", temperature=0.5, l2_norm=True, semi_hard=False, margin=0.5):
    """The loss of --loss as a function (z1, z2, candidates=None) -> (loss, contrast_acc,
    entropy)."""
    if name == "nt-xent":
        if semi_hard:
            raise ValueError("--semi-hard applies to nt-logistic and margin; NT-Xent weighs "
                             "every negative by its softmax (Sec. 5.1)")
        return functools.partial(nt_xent_loss, temperature=temperature, l2_norm=l2_norm)
    if not l2_norm:
        raise ValueError(f"--no-l2-norm is Table 5's NT-Xent ablation; {name} uses cosine "
                         f"similarity, as every loss of Table 4")
    if name == "nt-logistic":
        return functools.partial(nt_logistic_loss, temperature=temperature, semi_hard=semi_hard)
    if name == "margin":
        return functools.partial(margin_triplet_loss, margin=margin, semi_hard=semi_hard,
                                 temperature=temperature)
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
