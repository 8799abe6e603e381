"""Our training step against the authors' own: two pretraining steps of their tf2 code (model,
add_contrastive_loss, LARSOptimizer; fixtures/tf2_train_step*, made by
fixtures/make_tf_train_step.py) on a ResNet-18 at width 1/8, 16 images, two fixed views each.

Both run in float64 from the same float32 starting weights. Compared is each tensor's change: the
largest difference between our value after step k and theirs, over the largest change of theirs.
What separates the two, per change: the fixture stores their changes rounded to float32 (up to
2^-24 = 6e-8), and their float64 run keeps two constants in float32, the learning rate
(0.02 * (1 - 2.2e-8)) and BN's 1 - decay (0.1 * (1 + 1.5e-8)). Seen: at most 7.6e-8; with those
two constants and float64-stored changes (made once, too large to keep) ours equals theirs to
4e-12. Hence the bound 3e-7. In float32 a step's changes are up to 7e-2 from the float64 ones,
theirs and ours alike: a float32 comparison would be a hundred thousand times looser.
"""
import copy
import functools

import numpy as np
import torch
import torch.nn as nn

import pretrain
import tf_checkpoint
from conftest import ROOT
from objective import build_objective

FIXTURE = ROOT / "fixtures" / "tf2_train_step"
DATA = dict(np.load(ROOT / "fixtures" / "tf2_train_step.npz"))
TOLERANCE = 3e-7


class TheirWeightsAfter(tf_checkpoint.Source):
    """The fixture's checkpoint (their starting weights) plus their change after `step` steps,
    in float64, read by tf_checkpoint.load_into like any checkpoint of theirs."""

    def __init__(self, step):
        super().__init__(FIXTURE)
        self.step = step

    def read(self, full, verify_crc=False):
        self.used.add(full)
        key = self.keys[full]
        change = DATA[f"delta{self.step}/{key}"] if self.step else 0
        return self.ckpt.tensor(key).double() + torch.from_numpy(np.asarray(change, np.float64))


@functools.cache
def converted():
    return tf_checkpoint.convert(FIXTURE)


@functools.cache
def their_states():
    """Their state dicts at the start and after steps 1 and 2, in our names."""
    cfg, states = converted()[1], []
    for step in range(3):
        model = pretrain.build_model(cfg).double()
        tf_checkpoint.load_into(model, TheirWeightsAfter(step), cfg)
        states.append(model.state_dict())
    return states


def our_states(loss_factor=1.0):
    """Our state dicts at the start and after two pretrain.train_step calls (their settings:
    LARS, lr 0.02, weight decay 1e-4, momentum 0.9, NT-Xent at temperature 0.5), our losses, the
    config, and the number of values each BN layer averages over. loss_factor scales the
    objective: 0.5 makes the step minimise L instead of 2L."""
    model, cfg, *_ = copy.deepcopy(converted())
    model = model.double().train()
    optimizer = pretrain.build_optimizer(model, "lars", lr=0.02, weight_decay=1e-4, momentum=0.9)
    nt_xent = build_objective("nt-xent", temperature=0.5)

    def objective(z1, z2, candidates=None):
        loss, acc, entropy = nt_xent(z1, z2, candidates=candidates)
        return loss * loss_factor, acc, entropy

    counts = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(
                lambda m, args, name=name: counts.__setitem__(name, args[0].numel() // args[0].shape[1]))
    x1, x2 = (torch.from_numpy(DATA[k]).permute(0, 3, 1, 2).double() / 255 for k in ("x1", "x2"))
    states, losses = [{k: v.clone() for k, v in model.state_dict().items()}], []
    for _ in range(2):
        loss, _, _ = pretrain.train_step(model, x1, x2, optimizer, objective)
        losses.append(loss.item() / loss_factor)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states, losses, cfg, counts


def kind(name, tensor):
    if name.endswith(("running_mean", "running_var")):
        return name.rsplit(".", 1)[1]
    if tensor.ndim > 1:
        return "head linear weight" if name.startswith("head.") else "conv weight"
    return "head BN" if name.startswith("head.") else "BN"


def differences(ours, theirs, counts):
    """{tensor name: max |ours - theirs| / max |their change|} after each step (a list of two).
    Our running_var averages the unbiased batch variance, theirs the biased one (as Keras does):
    their batch variances are recovered from their moving averages and given Bessel's
    correction before comparing."""
    steps = []
    expected_var = {}
    for k in (1, 2):
        errors = {}
        for name, value in theirs[k].items():
            if name.endswith("num_batches_tracked"):
                continue
            start = theirs[0][name]
            if name.endswith("running_var"):
                n = counts[name.rsplit(".", 1)[0]]
                batch_var = (value - 0.9 * theirs[k - 1][name]) / 0.1
                previous = expected_var.get(name, start)
                value = expected_var[name] = 0.9 * previous + 0.1 * batch_var * n / (n - 1)
            scale = (value - start).abs().max()
            error = (ours[k][name] - value).abs().max()
            if scale > 0:
                errors[name] = (error / scale).item()
            else:  # unchanged (the last head BN's fixed zero shift): ours must not move either
                errors[name] = float("inf") if error > 0 else 0.0
        steps.append(errors)
    return steps


def worst_by_kind(errors, states):
    worst = {}
    for name, error in errors.items():
        key = kind(name, states[0][name])
        worst[key] = max(worst.get(key, 0.0), error)
    return worst


def test_our_step_moves_every_parameter_as_the_authors_step():
    """pretrain.train_step (on 2L) with LARS takes their steps: every conv, linear and BN
    parameter and every BN running statistic matches theirs after steps 1 and 2 to 3e-7 of the
    change, and the loss it reports is half of theirs (L, the mean over the 2N anchors): to
    rounding at step 1, to their float32 learning rate's effect (7e-10) at step 2."""
    ours, losses, cfg, counts = our_states()
    assert (cfg.arch, cfg.width_multiplier, cfg.image_size, cfg.proj_layers, cfg.proj_dim) == \
        ("resnet18", 1 / 8, 32, 2, 128)
    theirs = their_states()
    assert set(ours[0]) == set(theirs[0])
    for name in ours[0]:  # the same start: the conversion is exact
        assert torch.equal(ours[0][name], theirs[0][name]), name
    for k, errors in enumerate(differences(ours, theirs, counts), 1):
        bad = {name: e for name, e in errors.items() if not e < TOLERANCE}
        assert not bad, (k, bad)
    np.testing.assert_allclose(losses[0], DATA["loss"][0] / 2, rtol=1e-12)
    np.testing.assert_allclose(losses[1], DATA["loss"][1] / 2, rtol=1e-8)


def test_a_step_on_L_instead_of_2L_is_caught():
    """The comparison's power: a step on L (half their loss) moves BN parameters by half their
    change at step 1 (LARS updates them by lr x g), a million times the bound, and changes the
    weights' update too (their trust ratio absorbs the factor, not weight decay's share): by
    2.6e-4 of the conv weights' change at step 1, 0.28 at step 2."""
    ours, _, _, counts = our_states(loss_factor=0.5)
    theirs = their_states()
    first, second = (worst_by_kind(e, ours) for e in differences(ours, theirs, counts))
    assert 0.45 < first["BN"] < 0.55 and 0.45 < first["head BN"] < 0.55
    assert first["conv weight"] > 100 * TOLERANCE and second["conv weight"] > 100 * TOLERANCE
