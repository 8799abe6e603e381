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
    """h for every image of dataset (its evaluation view at size px), in dataset order, and the
    labels (on device). autocast: the run's precision (default: --precision auto's).

    Under torchrun each process encodes every world-th image and the pieces are gathered, so
    every process returns the whole set. The encoder must be in eval mode. With `log`, progress
    lines (this process's share) go there.
    """
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


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Top-k accuracies (%) of class scores (N x C); k is capped at C."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # N x k
    hits = top == labels.unsqueeze(1)
    return [100.0 * hits[:, :k].any(1).float().mean().item() for k in ks]


def knn_accuracy(train_f, train_l, val_f, val_l, num_classes, k, temperature):
    """(top-1, top-5) of weighted kNN (knn_predict): the training images as the memory."""
    return topk_accuracy(knn_predict(train_f, train_l, val_f, num_classes, k, temperature), val_l)


@torch.no_grad()
def evaluate(model, dataset, size, batch_size, device, workers=0, log=None, autocast=None):
    """(top-1 %, top-5 %) of a classifier (BatchNorm in inference mode) on dataset at size px.

    Under torchrun each process scores every world-th image and the counts are summed. With
    fewer than 5 classes "top-5" is top-(number of classes), i.e. 100. With `log`, progress
    lines go there.
    """
    rank, world = world_info()
    autocast = autocast or precision_for("auto", device)[1]
    was_training = model.training
    model.eval()
    share = len(range(rank, len(dataset), world))
    progress, done = Progress(log or (lambda *a: None), "evaluation", share), 0
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for x, y in eval_batches(dataset, size, batch_size, device, workers):
        done += len(y)
        if progress.due(done):
            progress.show(done, "images")
        with autocast:
            logits = model(x).float()  # b x classes
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # b x 5
        hits = top == y[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), y.new_tensor(len(y))]).float()
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    top1, top5 = (100 * counts[:2] / counts[2]).tolist()
    return round(top1, 4), round(top5, 4)
