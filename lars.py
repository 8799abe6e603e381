"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017), as the SimCLR code uses it.

SimCLR trains with batches of up to 8192 images, where plain SGD with momentum is unstable; LARS
rescales each layer's step by eta * ||w|| / ||g|| so that no layer moves too far relative to its
weights (v1 paper, Sec. 2.2 "Training with large batch size"). This file follows the update of the
authors' TensorFlow optimizer (google-research/simclr, lars_optimizer.py), per parameter w with
gradient g:

    g <- g + weight_decay * w                      skipped for biases and BatchNorm parameters
    trust = eta * ||w|| / ||g||  if both > 0, else 1,   and 1 for biases and BatchNorm parameters
    v <- momentum * v + lr * trust * g             (the learning rate sits inside the buffer)
    w <- w - v

Biases and BatchNorm parameters are exactly the 1-D parameters of every network in this project,
so they are recognised by shape (as MoCo v3 does), and excluded from both weight decay and the
trust ratio; forgetting these exclusions is a common reimplementation bug. The step has no
data-dependent Python branch, so it never waits on the GPU.
"""
import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if w.ndim > 1:  # conv and linear weights: decay and adapt; 1-D (bias, BN): neither
                    g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                w.sub_(v)
        return loss
