"""Take a trained network out of this repository: a torch.export program, or torchvision weights.

    python export.py runs/cifar10-.../ckpt.pt encoder.pt2              # x -> h, any program
    python export.py runs/cifar10-.../ckpt.pt encoder.pt2 --layer 1    # head layer 1's output
    python export.py runs/finetune-.../finetuned.pt classifier.pt2     # x -> logits
    python export.py runs/imagenet-.../ckpt.pt r50.pth                 # torchvision's names

The extension says the format. A .pt2 file is a torch.export program of the encoder (any
network; of a fine-tuned checkpoint, its classifier), with a dynamic batch and image size, that
a program with torch alone runs:

    import torch
    f = torch.export.load("encoder.pt2").module()
    h = f(x)   # x: B x 3 x H x W RGB in [0, 1], no mean/std; trained at the checkpoint's size

A .pth file is a state dict that torchvision.models.resnetN loads with only fc.* missing (width
1, no SK), and export.py prints the lines that make torchvision's ResNet compute this encoder
(TensorFlow's 'SAME' max-pool in the stem, ResNet-18/34's projection in stage 1, CIFAR's stem:
SAME_MAXPOOL ... below; docs/checkpoints.md). It never writes over a file it did not write.
"""
import argparse
import json
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from model import Classifier, Representation, build_model, checkpoint_kind, finetuned_classifier
from runs import (Parser, UserError, as_user_error, check_output, checkpoint_path, load_checkpoint,
                  run_cli)

# The lines that make a torchvision ResNet compute this project's encoder (test_export.py).
SAME_MAXPOOL = ("model.maxpool = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), "
                "torch.nn.MaxPool2d(3, 2))")
STAGE1_PROJECTION = ("model.layer1[0].downsample = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1, "
                     "bias=False), torch.nn.BatchNorm2d(64))")
CIFAR_STEM = ("model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
              "model.maxpool = torch.nn.Identity()")


def torchvision_state(model, config, fc=None):
    """This encoder's weights under torchvision's names (conv1, bn1, layerN.i.convK/bnK/
    downsample; fc: a classifier on h, else none), and the lines (SAME_MAXPOOL ...) that make
    torchvision's model compute it; a UserError where torchvision has no such network."""
    if isinstance(model, Classifier) and len(model.head):
        raise UserError(f"the classifier reads projection-head layer {len(model.head)}, which "
                        f"torchvision's ResNet has not: export it as .pt2")
    if config["width_multiplier"] != 1 or config["sk_ratio"]:
        raise UserError(f"torchvision has no {config['arch']} at width "
                        f"{config['width_multiplier']:g}{' with selective kernels' if config['sk_ratio'] else ''}"
                        f": export it as .pt2")
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
    if fc is not None:
        put("fc", fc)
    lines = [CIFAR_STEM if config["image_size"] <= 32 else SAME_MAXPOOL]
    if config["arch"] in ("resnet18", "resnet34"):
        lines.append(STAGE1_PROJECTION)
    return out, lines


def main(argv=None):
    def run():
        parser = Parser(description=__doc__.splitlines()[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("checkpoint", help="pretrain.py's ckpt.pt (or its run folder), a "
                            "student.pt or a converted checkpoint (the encoder), or finetune.py's "
                            "finetuned.pt (the classifier)")
        parser.add_argument("out", help="the file to write: .pt2 (a torch.export program) or .pth "
                            "(torchvision's state dict); never a file this script did not write")
        parser.add_argument("--layer", type=int, default=0, help="pt2 of an encoder: the output "
                            "of this many projection-head layers (0: h, as linear_eval.py --layer)")
        args = parser.parse_args(argv)
        out = Path(args.out)
        if out.is_dir():
            raise UserError(f"{out} is a folder; give a file name")
        fmt = {".pt2": "pt2", ".pth": "torchvision", ".pt": "torchvision"}.get(out.suffix)
        if fmt is None:
            raise UserError(f"{out}: name a .pt2 file (a torch.export program) or a .pth file "
                            f"(torchvision's weights)")
        path = checkpoint_path(args.checkpoint)
        ckpt = load_checkpoint(path, ("pretrain", "converted", "student", "finetuned"))
        network, config = exported_network(ckpt, path, args.layer)
        if fmt == "torchvision":
            if args.layer:
                raise UserError("--layer is for .pt2: torchvision's model ends at h")
            fc = network.fc if isinstance(network, Classifier) else None
            state, lines = torchvision_state(network, config, fc)
            check_output(out, "output path", lambda p: set(torch.load(p, weights_only=True)) == set(state))
            torch.save(state, out)
            print(f"wrote {out}: torchvision.models.{config['arch']}(); " + "; ".join(lines) +
                  "; model.load_state_dict(torch.load(...)" + (
                      ") gives its classifier" if fc is not None else ", strict=False) leaves only "
                      "fc.* missing; model.fc = torch.nn.Identity() gives h"))
            return
        check_output(out, "output path", lambda p: any(
            name.endswith("extra/simclr.json") for name in zipfile.ZipFile(p).namelist()))
        size = config["image_size"]
        x = torch.rand(2, 3, size, size)
        dims = {0: torch.export.Dim("batch", min=1, max=65536), 2: torch.export.Dim.AUTO,
                3: torch.export.Dim.AUTO}  # any batch, any image size the network takes
        with torch.no_grad():
            program = torch.export.export(network, (x,), dynamic_shapes=(dims,))
        what = ("logits" if isinstance(network, Classifier) else
                f"{'h' if not args.layer else f'head layer {args.layer}'}")
        torch.export.save(program, out, extra_files={"simclr.json": json.dumps(dict(
            checkpoint=path, output=what, image_size=size))})
        print(f"wrote {out}: torch.export.load({str(out)!r}).module() maps B x 3 x H x W images "
              f"in [0, 1] (trained at {size} x {size}) to B x {network.out_dim if what != 'logits' else network.fc.out_features} ({what})")

    run_cli("export.py", run)


def exported_network(ckpt, path, layer):
    """(what export writes, in eval mode: the classifier of a fine-tuned checkpoint, else the
    encoder read at head layer `layer`; the pretraining configuration of its network)."""
    if checkpoint_kind(ckpt) == "finetuned":
        if layer:
            raise UserError(f"--layer {layer}: {path} is a fine-tuned network, exported as its "
                            f"classifier (x -> logits); --layer is for encoders")
        with as_user_error(path):
            return finetuned_classifier(ckpt).eval(), ckpt["config"]["pretrain"]
    with as_user_error(path):
        model = build_model(ckpt["config"], ckpt["model"])
    with as_user_error(f"--layer {layer}"):
        return Representation(model, layer).eval(), ckpt["config"]


if __name__ == "__main__":
    main()
