"""The SimCLR network and its optimisation, as the authors' model.py: f (resnet.py), the projection
head g, the representation read from a layer of g, v2's classifier on it, global BatchNorm, the
learning-rate schedule, LARS and its exclusions, and the kinds of checkpoint that hold such a
network. A configuration or weights that do not fit raise ValueError (runs.as_user_error).
"""
import dataclasses
import math

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn

from lars import LARS
from resnet import build_encoder

# --- The network: f, g, the representation, a classifier -------------------------------------


class ProjectionHead(nn.Module):
    """g(h) (Sec. 2.1, Fig. 8; v2 Sec. 2): linear layers without bias, with BatchNorm and ReLU,
    the last without ReLU and BN shift; middle layers keep h's width. 'nonlinear' has
    `num_layers` (2 in v1, 3 in v2), 'linear' one, 'none' none; v2 fine-tunes from layers[:k]."""

    def __init__(self, in_dim, kind="nonlinear", num_layers=2, out_dim=128):
        super().__init__()
        dims = {"none": [], "linear": [out_dim],
                "nonlinear": [in_dim] * (num_layers - 1) + [out_dim]}[kind]
        self.layers = nn.Sequential()
        for i, d in enumerate(dims):
            last = i == len(dims) - 1
            linear = nn.Linear(in_dim, d, bias=False)
            nn.init.normal_(linear.weight, std=0.01)
            bn = nn.BatchNorm1d(d)
            if last:
                bn.bias.requires_grad_(False)  # no learnable shift (official center=False)
            self.layers.append(nn.Sequential(linear, bn) if last else
                               nn.Sequential(linear, bn, nn.ReLU(inplace=True)))
            in_dim = d
        self.out_dim = in_dim

    def forward(self, h):
        return self.layers(h)


class SimCLR(nn.Module):
    """x -> (h, z): h = f(x) is the representation, z = g(h) goes into the loss."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        h = self.encoder(x)
        return h, self.head(h)


def build_model(config, state=None):
    """The SimCLR network a configuration describes (pretrain.py's Config, or the dict a
    checkpoint stores), loaded strictly from state unless None."""
    c = config if isinstance(config, dict) else dataclasses.asdict(config)
    try:
        encoder, dim = build_encoder(c["arch"], c["width_multiplier"], c["image_size"], c["sk_ratio"])
        model = SimCLR(encoder, ProjectionHead(dim, c["proj_head"], c["proj_layers"], c["proj_dim"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"does not describe a model of this project ({type(e).__name__}: {e})")
    if state is not None:
        load_state(model, state)
    return model


def load_state(module, state):
    """load_state_dict(strict=True), a mismatch as a ValueError of one line."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"does not match the model (architecture or width differs): {detail}")


V1_HEAD = dict(proj_head="nonlinear", proj_layers=2, proj_dim=128)  # pretrain.py's defaults


def head_layers(config):
    """The number of layers of the projection head a configuration describes."""
    return {"none": 0, "linear": 1}.get(config["proj_head"], config["proj_layers"])


class Representation(nn.Module):
    """x -> what the later stages read: h = f(x) (layer 0), or the output of g's first `layer`
    layers (v2 Sec. 2; all of them give z, Fig. 8). It holds model's own modules."""

    def __init__(self, model, layer=0):
        super().__init__()
        layers = list(model.head.layers)
        if not 0 <= layer <= len(layers):
            raise ValueError(f"the projection head has {len(layers)} layer(s); choose "
                             f"0{f' to {len(layers)}' if layers else ''}")
        self.encoder, self.head = model.encoder, nn.Sequential(*layers[:layer])
        self.out_dim = layers[layer - 1][0].out_features if layer else model.encoder.out_dim

    def forward(self, x):
        return self.head(self.encoder(x))  # B x out_dim


class Classifier(Representation):
    """x -> logits through f, the kept head layers (trained with it: v2 fine-tunes from s(W1 h),
    K = 1) and a linear layer (v2 Sec. 2, Eq. 4)."""

    def __init__(self, model, ft_proj_layer, num_classes):
        super().__init__(model, ft_proj_layer)
        self.fc = nn.Linear(self.out_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # official LinearLayer (tf2/model.py)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(super().forward(x))  # B x classes


def build_classifier(pretrain_config, num_classes, ft_proj_layer, state=None):
    """The SimCLR network of pretrain_config (loaded strictly from state unless None), cut after
    ft_proj_layer head layers, with a new classifier."""
    return Classifier(build_model(pretrain_config, state), ft_proj_layer, num_classes)


def finetuned_classifier(ckpt):
    """The Classifier a fine-tuned checkpoint (finetune.py's finetuned.pt) holds: distill.py's
    teacher."""
    c = ckpt["config"]
    model = build_classifier(c["pretrain"], c["num_classes"], c["ft_proj_layer"])
    load_state(model, ckpt["model"])
    return model


# What each kind of checkpoint is, the scripts that take it, and the script and file that make
# it (a run folder of that script holds that file).
KINDS = {
    "pretrain": ("a pretraining checkpoint (pretrain.py's ckpt.pt)",
                 "pretrain.py --resume, linear_eval.py --checkpoint and finetune.py --checkpoint",
                 "pretrain.py", "ckpt.pt"),
    "converted": ("a converted TensorFlow checkpoint (tf_checkpoint.py)",
                  "linear_eval.py --checkpoint and finetune.py --checkpoint", "tf_checkpoint.py", None),
    "finetuned": ("a fine-tuned network (finetune.py's finetuned.pt)",
                  "finetune.py --resume and distill.py --teacher", "finetune.py", "finetuned.pt"),
    "student": ("a distilled student (distill.py's student.pt)",
                "distill.py --resume, linear_eval.py --checkpoint and finetune.py --checkpoint",
                "distill.py", "student.pt"),
}


def checkpoint_kind(ckpt):
    """The kind (KINDS) of a checkpoint: stored in it, or, in those written before it was, told
    by what it holds."""
    if "kind" in ckpt:
        return ckpt["kind"]
    if "distill_config" in ckpt:
        return "student"
    if "pretrain" in ckpt["config"]:
        return "finetuned"
    return "converted" if "converted_from" in ckpt else "pretrain"


# --- Global BatchNorm (Sec. 2.2) -------------------------------------------------------------


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the batches of all processes (Sec. 2.2, "Global BN") on a
    CPU, where SyncBatchNorm does not run: the per-channel sums all-reduced with autograd, so
    the gradient is as if the whole batch were on one device."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))  # all but the channel dimension
        x, dtype = x.to(torch.promote_types(x.dtype, torch.float32)), x.dtype  # bf16: fp32 sums
        count = x.new_tensor([x.numel() / x.shape[1]])
        stats = dist_nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total, total_sq, n = stats[:x.shape[1]], stats[x.shape[1]:-1], stats[-1]
        mean = total / n
        var = total_sq / n - mean * mean  # biased, for normalisation
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(dtype)  # as BatchNorm


def convert_to_global_bn(module):
    """Every BatchNorm in module becomes a global one: SyncBatchNorm on CUDA, GlobalBatchNorm else."""
    if next(module.parameters()).is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum).to(module.weight)
        bn.load_state_dict(module.state_dict())
        bn.weight, bn.bias = module.weight, module.bias  # keeps requires_grad (the frozen shift)
        return bn
    for name, child in module.named_children():
        module.add_module(name, _to_global_bn(child))
    return module


# --- Optimisation: LARS / SGD / Adam, lr scaling, warmup + cosine ----------------------------


def scaled_lr(base_lr, batch_size, scaling):
    """Learning rate = base x B/256 (linear) or base x sqrt(B) (sqrt), Appendix B.1; 'none':
    as given."""
    return base_lr * {"linear": batch_size / 256, "sqrt": math.sqrt(batch_size), "none": 1}[scaling]


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warmup from 0 to peak over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model, name, lr, weight_decay, momentum=0.9, nesterov=False):
    """LARS (lars.py) or, for comparison, SGD / Adam with the same rule: no weight decay on
    biases and BatchNorm parameters (the 1-D ones)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def build_classifier_optimizers(model, name, lr, weight_decay, momentum):
    """[optimizer of f and the kept head, optimizer of the new classifier]: the official code
    excludes the supervised head from LARS's trust ratio (tiny for a fresh classifier), so it
    gets momentum SGD at the same rate, weight decay on its weights only."""
    body = build_optimizer(nn.ModuleList([model.encoder, model.head]), name, lr, weight_decay,
                           momentum)
    classifier = torch.optim.SGD([dict(params=[model.fc.weight], weight_decay=weight_decay),
                                  dict(params=[model.fc.bias], weight_decay=0.0)],
                                 lr=lr, momentum=momentum)
    return [body, classifier]
