"""The encoder f of SimCLR (v1 Sec. 2.1; v2 Sec. 2): a ResNet whose output h is the global
average pool, with the width multiplier of the papers (every layer's channels x w, the stem
included: ResNet-50 2x gives a 4096-d h) and v2's selective kernels.

It is the authors' resnet.py detail for detail, so their released checkpoints load and compute
what they compute (tf_checkpoint.py, tested against their TensorFlow code), also where that is
not textbook ResNet: TensorFlow's 'SAME' pools (the stem's max-pool pads 0 before and 1 after on
an even size), a projection shortcut in every stage's first block (ResNet-18/34 stage 1 too),
and with SK a ResNet-D stem and shortcuts that average-pool before their 1x1 convolution (at
stride 1 in stage 1). Images of 32 px or less get the CIFAR stem (3x3, stride 1, no max-pool).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def conv(c_in, c_out, kernel, stride=1):  # theirs pads (k - 1) // 2 and the rest: k // 2, k odd
    return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False)


def conv_bn_relu(c_in, c_out, kernel, stride=1):
    return nn.Sequential(conv(c_in, c_out, kernel, stride), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SamePool(nn.Module):
    """TensorFlow's padding='SAME' max or average pooling: ceil(size / stride) outputs, the
    padding split total // 2 before and the rest after (the stem's max-pool: 0 and 1 on an even
    size, where nn.MaxPool2d(3, 2, 1) pads 1 and 1); padded cells never count."""

    def __init__(self, kind, kernel, stride):
        super().__init__()
        self.kind, self.kernel, self.stride = kind, kernel, stride

    def forward(self, x):
        k, s, pads = self.kernel, self.stride, []
        for n in (x.shape[3], x.shape[2]):  # F.pad lists the last dimension first
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]
        if self.kind == "max":
            return F.max_pool2d(F.pad(x, pads, value=-math.inf), k, s)
        real = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), pads), k, s)  # share of real cells
        return F.avg_pool2d(F.pad(x, pads), k, s) / real


class SelectiveKernel(nn.Module):
    """SK convolution (Li et al. 2019, as SimCLRv2's code does it), replacing a 3x3 convolution.

    One 3x3 convolution makes two streams of c channels; their sum, pooled and squeezed to
    max(c * ratio, 32) channels, gives per-channel softmax weights across the two streams.
    """

    def __init__(self, c_in, c, stride, ratio):
        super().__init__()
        self.streams = conv_bn_relu(c_in, 2 * c, 3, stride)
        mid = max(int(c * ratio), 32)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(c, mid, 1),
                                       conv(mid, 2 * c, 1))

    def forward(self, x):
        streams = rearrange(self.streams(x), "b (s c) h w -> s b c h w", s=2)
        weights = rearrange(self.attention(streams.sum(0)), "b (s c) 1 1 -> s b c 1 1", s=2)
        return (streams * weights.softmax(dim=0)).sum(0)  # b c h w


class Subsampling(nn.Conv2d):
    """A 1x1 convolution at stride s, computed as a stride-1 one on every s-th pixel (the same
    numbers): torch 2.14's CPU backward of the strided 1x1 convolution on channels-last input
    with 2 to 7 channels (ResNet-18 at width 1/16) corrupts memory and kills the process."""

    def __init__(self, c_in, c_out, stride):
        super().__init__(c_in, c_out, 1, bias=False)
        self.step = stride

    def forward(self, x):
        return super().forward(x[:, :, ::self.step, ::self.step])


def shortcut(c_in, c_out, stride, sk):
    """A stage's first block projects: 1x1 conv + BN. With SK (ResNet-D) an average pool comes
    first: strided, after zeros padded 0 before, 1 after (an odd size rounds up as the main path
    does); at stride 1, a 2x2 'SAME' pool. The 1x1 conv then has stride 1."""
    if not sk:
        return nn.Sequential(Subsampling(c_in, c_out, stride), nn.BatchNorm2d(c_out))
    pool = (nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.AvgPool2d(2)) if stride > 1
            else SamePool("avg", 2, 1))
    return nn.Sequential(pool, conv(c_in, c_out, 1), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, c, stride, sk_ratio, projection):
        super().__init__()
        self.shortcut = shortcut(c_in, c, stride, sk_ratio > 0) if projection else nn.Identity()
        self.body = nn.Sequential(conv_bn_relu(c_in, c, 3, stride), conv(c, c, 3), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, c, stride, sk_ratio, projection):
        super().__init__()
        self.shortcut = shortcut(c_in, 4 * c, stride, sk_ratio > 0) if projection else nn.Identity()
        middle = (SelectiveKernel(c, c, stride, sk_ratio) if sk_ratio > 0
                  else conv_bn_relu(c, c, 3, stride))  # stride on the 3x3, as the official code
        self.body = nn.Sequential(conv_bn_relu(c_in, c, 1), middle, conv(c, 4 * c, 1),
                                  nn.BatchNorm2d(4 * c))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
         "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3]),
         "resnet152": (Bottleneck, [3, 8, 36, 3])}


class ResNet(nn.Module):
    """f(x): a ResNet whose output h is the global average pool (Sec. 2.1, "base encoder")."""

    def __init__(self, block, layers, width_multiplier=1.0, cifar_stem=False, sk_ratio=0.0):
        super().__init__()
        w = lambda c: max(1, round(c * width_multiplier))  # every layer is widened, stem included
        if cifar_stem:  # 32 px: 3x3 stride-1 stem, no max-pool (paper, Appendix B.9)
            self.stem, self.stem_name = conv_bn_relu(3, w(64), 3), "CIFAR stem (3x3, no max-pool)"
        elif sk_ratio > 0:  # ResNet-D stem, as the v2 code uses with SK
            self.stem = nn.Sequential(conv_bn_relu(3, w(64) // 2, 3, 2),
                                      conv_bn_relu(w(64) // 2, w(64) // 2, 3),
                                      conv_bn_relu(w(64) // 2, w(64), 3), SamePool("max", 3, 2))
            self.stem_name = "ResNet-D stem (three 3x3, max-pool)"
        else:
            self.stem = nn.Sequential(conv_bn_relu(3, w(64), 7, 2), SamePool("max", 3, 2))
            self.stem_name = "ImageNet stem (7x7 stride 2, max-pool)"
        stages, c_in = [], w(64)
        for i, n in enumerate(layers):
            c = w(64 * 2 ** i)
            blocks = []
            for j in range(n):  # the first block of a stage: stride (after stage 1), projection
                blocks.append(block(c_in, c, 2 if (i > 0 and j == 0) else 1, sk_ratio, j == 0))
                c_in = c * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.out_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the official variance scaling: fan-in, truncated at 2 std
                std = (m.weight[0].numel() ** -0.5) / 0.87962566103423978  # std after truncation
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        for blk in self.stages.modules():
            if isinstance(blk, (BasicBlock, Bottleneck)):
                nn.init.zeros_(blk.body[-1].weight)  # last BN gamma = 0: each block starts as identity

    def forward(self, x):
        x = self.stages(self.stem(x))  # B x C x H' x W'
        return x.mean(dim=(2, 3))  # B x C: h


def build_encoder(arch="resnet50", width_multiplier=1.0, image_size=224, sk_ratio=0.0):
    """f: returns (module, dimension of h). Images of 32 px or less get the CIFAR stem."""
    block, layers = ARCHS[arch]
    encoder = ResNet(block, layers, width_multiplier, cifar_stem=image_size <= 32, sk_ratio=sk_ratio)
    return encoder, encoder.out_dim
