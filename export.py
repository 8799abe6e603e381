"""Take a trained encoder out of this repository: a torch.export program, or torchvision weights.

    python export.py runs/cifar10-.../ckpt.pt encoder.pt2                     # x -> h, any program
    python export.py runs/cifar10-.../ckpt.pt encoder.pt2 --layer 1           # head layer 1's output
    python export.py runs/imagenet-.../ckpt.pt r50.pth --format torchvision   # torchvision's names

--format pt2 (the default) writes a torch.export program of the encoder (any depth, width, SK and
stem), with a dynamic batch size, that a program with torch alone runs:

    import torch
    f = torch.export.load("encoder.pt2").module()
    h = f(x)   # x: B x 3 x S x S RGB in [0, 1], no mean/std; S: the training size (32 or 224)

--format torchvision writes a state dict that torchvision.models.resnet18/34/50/101/152 loads
with only fc.* missing, for the networks torchvision can express (width 1, no SK). Two
differences from torchvision's ResNet, each one line on the model (export.py prints them):
- the stem's max-pool is TensorFlow's 'SAME' (0 pixels padded before, 1 after on the stem's even
  output size, 112 for 224 px) where torchvision's pads 1 and 1: h differs (by 2.5% and 1.5% of
  its norm for a ResNet-18 and -50 with random weights at 224 px; docs/checkpoints.md); exact with
  `model.maxpool = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.MaxPool2d(3, 2))`
  (zeros pad like -inf here: the pool follows a ReLU);
- ResNet-18/34 project the shortcut of stage 1's first block (the authors' code), which
  torchvision's has not: `model.layer1[0].downsample = torch.nn.Sequential(
  torch.nn.Conv2d(64, 64, 1, bias=False), torch.nn.BatchNorm2d(64))` before loading.
CIFAR's stem (32 px) is a 3x3 stride-1 convolution without max-pool:
`model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()`.
Then `model.fc = torch.nn.Identity()` gives h. test_export.py checks each line against h.
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn

from model import Representation, build_model
from runs import (Parser, UserError, as_user_error, checkpoint_path, load_checkpoint,
                  prepare_out_dir, run_cli)

# The lines that make a torchvision ResNet compute this project's encoder (the docstring's).
SAME_MAXPOOL = ("model.maxpool = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), "
                "torch.nn.MaxPool2d(3, 2))")
STAGE1_PROJECTION = ("model.layer1[0].downsample = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1, "
                     "bias=False), torch.nn.BatchNorm2d(64))")
CIFAR_STEM = ("model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
              "model.maxpool = torch.nn.Identity()")


def torchvision_state(model, config):
    """This encoder's weights under torchvision's names (conv1, bn1, layerN.i.convK/bnK/
    downsample, no fc), and the lines (SAME_MAXPOOL ...) that make torchvision's model compute
    it; a UserError where torchvision has no such network."""
    if config["width_multiplier"] != 1 or config["sk_ratio"]:
        raise UserError(f"torchvision has no {config['arch']} at width "
                        f"{config['width_multiplier']:g}{' with selective kernels' if config['sk_ratio'] else ''}"
                        f": export it with --format pt2")
    encoder, out = model.encoder, {}

    def put(name, module):
        for key, value in module.state_dict().items():
            out[f"{name}.{key}"] = value

    stem = encoder.stem if config["image_size"] <= 32 else encoder.stem[0]  # conv, BN, ReLU
    put("conv1", stem[0])
    put("bn1", stem[1])
    for i, stage in enumerate(encoder.stages):
        for j, block in enumerate(stage):
            base, body = f"layer{i + 1}.{j}", block.body
            convs = ([body[0][0], body[1][0], body[2]] if len(body) == 4 else [body[0][0], body[1]])
            bns = ([body[0][1], body[1][1], body[3]] if len(body) == 4 else [body[0][1], body[2]])
            for k, (conv, bn) in enumerate(zip(convs, bns), 1):
                put(f"{base}.conv{k}", conv)
                put(f"{base}.bn{k}", bn)
            if not isinstance(block.shortcut, nn.Identity):
                put(f"{base}.downsample.0", block.shortcut[0])
                put(f"{base}.downsample.1", block.shortcut[1])
    lines = [CIFAR_STEM if config["image_size"] <= 32 else SAME_MAXPOOL]
    if config["arch"] in ("resnet18", "resnet34"):
        lines.append(STAGE1_PROJECTION)
    return out, lines


def main(argv=None):
    def run():
        parser = Parser(description=__doc__.splitlines()[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("checkpoint", help="pretrain.py's ckpt.pt (or its run folder), a "
                            "student.pt, or a converted checkpoint (tf_checkpoint.py)")
        parser.add_argument("out", help="the file to write (.pt2 for --format pt2)")
        parser.add_argument("--format", choices=["pt2", "torchvision"], default="pt2",
                            help="pt2: a torch.export program (default); torchvision: "
                            "torchvision.models.resnetN's state dict")
        parser.add_argument("--layer", type=int, default=0, help="pt2: the output of this many "
                            "projection-head layers (0: h, as linear_eval.py --layer)")
        args = parser.parse_args(argv)
        path = checkpoint_path(args.checkpoint)
        ckpt = load_checkpoint(path, ("pretrain", "converted", "student"))
        config = ckpt["config"]
        with as_user_error(path):
            model = build_model(config, ckpt["model"]).eval()
        out = Path(args.out)
        if out.is_dir():
            raise UserError(f"{out} is a folder; give a file name")
        if args.format == "torchvision":
            if args.layer:
                raise UserError("--layer is for --format pt2: torchvision's model ends at h")
            state, lines = torchvision_state(model, config)
            prepare_out_dir(out.parent, "output path")
            torch.save(state, out)
            print(f"wrote {out}: torchvision.models.{config['arch']}(); " + "; ".join(lines) +
                  "; model.load_state_dict(torch.load(...), strict=False) leaves only fc.* "
                  "missing; model.fc = torch.nn.Identity() gives h")
            return
        with as_user_error(f"--layer {args.layer}"):
            f = Representation(model, args.layer).eval()
        prepare_out_dir(out.parent, "output path")
        size = config["image_size"]
        x = torch.rand(2, 3, size, size)
        batch = torch.export.Dim("batch", min=1, max=65536)
        with torch.no_grad():
            program = torch.export.export(f, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(program, out)
        print(f"wrote {out}: torch.export.load({str(out)!r}).module() maps B x 3 x {size} x {size} "
              f"images in [0, 1] to B x {f.out_dim} ({'h' if not args.layer else f'head layer {args.layer}'})")

    run_cli("export.py", run)


if __name__ == "__main__":
    main()
