"""What the stages measure on an evaluation split: the features h of every image, weighted kNN
(Wu et al. 2018) on them, top-k accuracy, and a classifier's accuracy. pretrain.py's kNN monitor,
linear_eval.py, finetune.py and distill.py share them.
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from data import eval_batches
from runs import Progress, precision_for, world_info


@torch.no_grad()
def extract_features(encoder, dataset, size, batch_size, device, workers=0, log=None,
                     name="features", autocast=None):
    """(h, labels) of every image of dataset (its evaluation view at size px) in order, on device;
    under torchrun each process encodes every world-th image and all get the whole set. The
    encoder must be in eval mode; autocast: the run's precision (default --precision auto's)."""
    rank, world = world_info()
    autocast = autocast or precision_for("auto", device)[1]
    progress = Progress(log or (lambda *a: None), name, len(range(rank, len(dataset), world)))
    feats, labels, done = [], [], 0
    for x, y in eval_batches(dataset, size, batch_size, device, workers):
        with autocast:
            feats.append(encoder(x).float())
        labels.append(y)
        done += len(y)
        if progress.due(done):
            progress.show(done, "images")
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world == 1:
        return feats, labels
    rows = -(-len(dataset) // world)  # pad every piece to the same length for all_gather
    pad = lambda t: torch.cat([t, t.new_zeros((rows - len(t),) + t.shape[1:])])
    out_f = feats.new_empty((len(dataset),) + feats.shape[1:])
    out_l = labels.new_empty(len(dataset))
    for r, (f, l) in enumerate(zip(dist_nn.all_gather(pad(feats)), dist_nn.all_gather(pad(labels)))):
        count = len(range(r, len(dataset), world))
        out_f[r::world], out_l[r::world] = f[:count], l[:count]
    return out_f, out_l


@torch.no_grad()
def knn_predict(train_feats, train_labels, query_feats, num_classes, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018) on cosine similarity: each of the k nearest training images
    votes for its class with weight exp(sim / temperature). Returns class scores, Q x C."""
    train_feats = F.normalize(train_feats, dim=1)
    k = min(k, len(train_feats))
    scores = []
    for q in F.normalize(query_feats, dim=1).split(1024):
        sim, idx = (q @ train_feats.T).topk(k, dim=1)  # q x k
        votes = F.one_hot(train_labels[idx], num_classes).float()  # q x k x C
        scores.append((votes * (sim / temperature).exp().unsqueeze(-1)).sum(1))
    return torch.cat(scores)


def telling(ks, num_classes, votes=None):
    """The k of ks whose top-k accuracy can tell anything: fewer than the classes (top-C is
    always 100%), and with a kNN of `votes` neighbours at most that many (the others score 0)."""
    return [k for k in ks if k < num_classes and (votes is None or k <= votes)]


def topk_accuracy(scores, labels, ks=(1, 5), votes=None):
    """{'top<k>': accuracy (%)} of class scores (N x C), for the k that tell anything."""
    ks = telling(ks, scores.shape[1], votes)
    if not ks:
        return {}
    hits = scores.topk(max(ks), dim=1).indices == labels.unsqueeze(1)  # N x k
    return {f"top{k}": 100.0 * hits[:, :k].any(1).float().mean().item() for k in ks}


def knn_accuracy(train_f, train_l, val_f, val_l, num_classes, k, temperature):
    """{'top1', 'top5' where it tells anything} of weighted kNN (knn_predict): the training
    images as the memory, k neighbours (at most as many as there are)."""
    k = min(k, len(train_f))
    return topk_accuracy(knn_predict(train_f, train_l, val_f, num_classes, k, temperature), val_l,
                         votes=k)


def shown(accuracy):
    """'top-1 61.20% top-5 90.00%' of what an accuracy dict holds."""
    return " ".join(f"top-{k[3:]} {v:.2f}%" for k, v in accuracy.items())


@torch.no_grad()
def evaluate(model, dataset, size, batch_size, device, workers=0, log=None, autocast=None):
    """{'top1', 'top5' where it tells anything} in % of a classifier (in inference mode) on
    dataset at size px; under torchrun each process scores every world-th image."""
    rank, world = world_info()
    autocast = autocast or precision_for("auto", device)[1]
    was_training = model.training
    model.eval()
    share = len(range(rank, len(dataset), world))
    progress, done = Progress(log or (lambda *a: None), "evaluation", share), 0
    ks = telling((1, 5), len(dataset.classes))
    if not ks:  # one class: nothing to tell
        return {}
    counts = torch.zeros(len(ks) + 1, device=device)  # top-k hits for each k, images
    for x, y in eval_batches(dataset, size, batch_size, device, workers):
        done += len(y)
        if progress.due(done):
            progress.show(done, "images")
        with autocast:
            logits = model(x).float()  # b x classes
        hits = logits.topk(max(ks), dim=1).indices == y[:, None]  # b x max(ks)
        counts += torch.stack([*(hits[:, :k].any(1).sum() for k in ks), y.new_tensor(len(y))]).float()
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return {f"top{k}": round(v, 4) for k, v in zip(ks, (100 * counts[:-1] / counts[-1]).tolist())}
