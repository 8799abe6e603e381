"""SimCLRv2's memory of negatives (v2 Sec. 2 and Appendix D, after MoCo, He et al. 2020).

- v2's paper: a memory of 64K negatives and a momentum network with decay 0.999, "as MoCo";
  their code was never released.
- Ting Chen's answer (google-research/simclr issue #115): "the contrasting examples are from
  momentum encoder from current and past batches". So the anchors are the online network's z of
  the 2N views, and every candidate (the positive included) is the momentum network's z, of
  this batch's views (the anchor's own left out, as in Eq. 1) or the queue's past batches.
- MoCo's: the FIFO queue, theta_m <- m theta_m + (1 - m) theta, and shuffled BN (the keys'
  statistics from another part of the batch, or "the model appears to cheat"; here 8 groups of
  each process's permuted views, for MoCo's 8 GPUs).
- Ours: the queue starts empty (MoCo's random fill outweighs the first real negatives), and the
  momentum follows the run's length (memory_momentum): 0.999 over a 390-step run would hand out
  positives from a mostly untrained network. RESULTS.md ("The memory") has the experiments.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from objective import gather_with_grad

SHUFFLE_GROUPS = 8  # MoCo's 8 GPUs: the keys' BN statistics over one eighth of the views


def memory_momentum(total_steps, queue_steps):
    """m = 1 - 1/T, an average over T steps: 0.4% of the run, as v2's 0.999 of its 250,000 steps,
    but at least the queue's span (its keys should come from one network: MoCo's consistency)."""
    horizon = max(0.004 * total_steps, queue_steps, 1.0)
    return 1.0 - 1.0 / horizon


class GroupedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics of each of `groups` consecutive slices of the batch, as per-GPU BN
    (MoCo's shuffled BN, once the batch is permuted); bn's parameters, no running statistics."""

    def __init__(self, bn, groups):
        super().__init__(bn.num_features, bn.eps, track_running_stats=False)
        self.weight, self.bias, self.groups = bn.weight, bn.bias, groups

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        g, n, c = self.groups, x.shape[0], x.shape[1]
        grouped = x.unflatten(0, (g, n // g)).transpose(0, 1).flatten(1, 2)  # n/g x (g c) x ...
        y = F.batch_norm(grouped, None, None, self.weight.repeat(g), self.bias.repeat(g), True,
                         0.0, self.eps)
        return y.unflatten(1, (g, c)).transpose(0, 1).flatten(0, 1)  # n x c x ...


def _grouped(module, groups):
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            module.add_module(name, GroupedBatchNorm(child, groups))
        else:
            _grouped(child, groups)
    return module


class Memory(nn.Module):
    """The momentum network (a copy of f and g following a moving average of the trained one) and
    a FIFO queue of its projections, entering Algorithm 1 as MoCo's builder does: wrap(net,
    objective) gives what train_step uses unchanged. Each step: update() moves the momentum
    network, project(x) gives the keys of the 2n views, enqueue(keys) adds every process's, and
    negatives() are the queue's. bn, the keys' BatchNorm statistics: 'shuffle' (MoCo's),
    'batch' (the views' own, as the anchors') or 'running' (the online network's).
    """

    def __init__(self, model, size, dim, momentum=0.999, bn="shuffle"):
        super().__init__()
        self.model = copy.deepcopy(model).requires_grad_(False)
        if bn == "shuffle":
            _grouped(self.model, SHUFFLE_GROUPS)
        if bn == "running":
            self.model.eval()
        object.__setattr__(self, "online", model)  # what it follows: not a submodule
        self.momentum, self.bn = momentum, bn
        self.register_buffer("queue", torch.zeros(size, dim))  # K x d
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # next row to write
        self.keys = None  # the keys of the current step's views (WithKeys), 2n x d
        self.filled = 0  # rows holding keys: a number on the host, so no step waits for the device

    def get_extra_state(self):
        return {"filled": self.filled}

    def set_extra_state(self, state):
        self.filled = state["filled"]

    @torch.no_grad()
    def update(self):
        """theta_m <- m * theta_m + (1 - m) * theta, for every parameter; with bn 'running' the
        BN statistics are the online network's."""
        torch._foreach_lerp_(list(self.model.parameters()), list(self.online.parameters()),
                             1 - self.momentum)
        if self.bn == "running":
            for mine, theirs in zip(self.model.buffers(), self.online.buffers()):
                mine.copy_(theirs)

    @torch.no_grad()
    def project(self, x):
        """The keys: the momentum network's z of the views x (2n x 3 x S x S), 2n x d, in x's
        order. With shuffled BN the views are permuted first (and the keys put back)."""
        if self.bn != "shuffle":
            return self.model(x)[1].float()
        order = torch.randperm(len(x), device=x.device)
        return self.model(x[order])[1].float()[order.argsort()]

    def negatives(self):
        """The queue's keys (past batches), or None while it is empty."""
        return self.queue[:self.filled] if self.filled else None

    @torch.no_grad()
    def enqueue(self, keys):
        """Overwrite the oldest rows with keys (every process's, 2N x d), wrapping around."""
        rows = (self.position + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[rows] = keys.to(self.queue.dtype)
        self.position.copy_((self.position + len(keys)) % len(self.queue))
        self.filled = min(self.filled + len(keys), len(self.queue))

    def wrap(self, net, objective):
        """(net, objective) with the memory inside: the forward also moves the momentum network
        and takes its keys of the views; the objective scores the anchors against every process's
        keys, in the batch's order, and the queue, then queues the keys."""

        def with_memory(z1, z2):
            keys = gather_with_grad(self.keys)  # 2N x d, no gradient
            negatives = self.negatives()
            candidates = keys if negatives is None else torch.cat([keys, negatives])  # (2N+K) x d
            out = objective(z1, z2, candidates=candidates)
            self.enqueue(keys)
            return out

        return WithKeys(net, self), with_memory


class WithKeys(nn.Module):
    """The online network; each forward (inside the step's autocast) also leaves the momentum
    network's keys of its input on the memory (Memory.wrap)."""

    def __init__(self, net, memory):
        super().__init__()
        self.net = net
        object.__setattr__(self, "memory", memory)  # not a submodule: train() leaves it as it is

    def forward(self, x):
        out = self.net(x)
        self.memory.update()
        self.memory.keys = self.memory.project(x)  # 2n x d
        return out
