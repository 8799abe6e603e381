"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017), as the SimCLR code uses it.

With batches of up to 8192 images plain momentum SGD is unstable; LARS scales each layer's step
by eta * ||w|| / ||g|| (v1 Sec. 2.2). The update of the authors' lars_optimizer.py, per
parameter w with gradient g:

    g <- g + weight_decay * w                      skipped for biases and BatchNorm parameters
    trust = eta * ||w|| / ||g||  if both > 0, else 1,   and 1 for biases and BatchNorm parameters
    v <- momentum * v + lr * trust * g             (the learning rate sits inside the buffer)
    w <- w - v

Biases and BatchNorm parameters, the 1-D ones (as MoCo v3 finds them), are excluded from both
weight decay and the trust ratio: forgetting that is a common reimplementation bug. Each line of
the update is one torch._foreach_* call over all parameters, and nothing waits on the GPU.
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
            params = [w for w in group["params"] if w.grad is not None]
            for w in params:
                if "momentum_buffer" not in self.state[w]:
                    self.state[w]["momentum_buffer"] = torch.zeros_like(w)
            # conv and linear weights: decay and adapt; 1-D (bias, BN): neither
            adapted = [w for w in params if w.ndim > 1]
            plain = [w for w in params if w.ndim <= 1]
            if adapted:
                g = torch._foreach_add([w.grad for w in adapted], adapted, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(adapted))  # one norm per tensor
                g_norm = torch.stack(torch._foreach_norm(g))
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    group["trust_coefficient"] * w_norm / g_norm,
                                    torch.ones_like(w_norm))
                torch._foreach_mul_(g, list(trust.unbind()))
                self._momentum_step(adapted, g, group)
            if plain:
                self._momentum_step(plain, [w.grad for w in plain], group)
        return loss

    def _momentum_step(self, params, grads, group):
        """v <- momentum * v + lr * g;  w <- w - v, for every parameter at once."""
        v = [self.state[w]["momentum_buffer"] for w in params]
        torch._foreach_mul_(v, group["momentum"])
        torch._foreach_add_(v, grads, alpha=group["lr"])
        torch._foreach_sub_(params, v)
