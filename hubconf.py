"""torch.hub entry points: a SimCLR encoder or classifier of this project in one line.

    import torch
    f = torch.hub.load("path/to/this/clone", "encoder", checkpoint="runs/cifar10-.../ckpt.pt",
                       source="local")                      # x -> h, in eval mode
    g = torch.hub.load("path/to/this/clone", "classifier", checkpoint="runs/.../finetuned.pt",
                       source="local")                      # x -> logits
    # once the repository is public: torch.hub.load("<owner>/<name>", "encoder", checkpoint=...)

Inputs are RGB images as float tensors B x 3 x S x S with values in [0, 1], without mean/std
normalisation (the authors' code feeds images so). S is the checkpoint's training size, kept as
`.image_size` on the module (32 for CIFAR's 3x3 stem, 224 for ImageNet's); other sizes run, as
the network ends in a global average pool, but it was trained at S. For a program without this
repository: export.py (a torch.export program, or torchvision's weights).
"""
from pathlib import Path

dependencies = ["torch", "torchvision", "einops"]


def encoder(checkpoint, layer=0):
    """The encoder f of a SimCLR run: x (B x 3 x S x S, values in [0, 1], no normalisation) ->
    h = f(x), B x d; with layer K, the output of the projection head's first K layers (v2 fine-
    tunes from layer 1; the last layer gives z), as linear_eval.py --layer. In eval mode:
    BatchNorm uses the pretraining's running statistics.

    checkpoint: pretrain.py's ckpt.pt or its run folder, distill.py's student.pt, a converted
    checkpoint (tf_checkpoint.py), or a folder of the authors' TensorFlow checkpoint (converted
    in memory)."""
    from model import Representation, build_model
    from runs import as_user_error, load_checkpoint
    import tf_checkpoint

    if is_tensorflow(checkpoint):
        model, cfg, *_ = tf_checkpoint.convert(checkpoint)
        size = cfg.image_size
    else:
        ckpt = load_checkpoint(checkpoint, ("pretrain", "converted", "student"))
        with as_user_error(checkpoint):
            model, size = build_model(ckpt["config"], ckpt["model"]), ckpt["config"]["image_size"]
    with as_user_error(f"layer {layer}"):
        f = Representation(model, layer).eval()
    f.image_size = size
    return f


def classifier(checkpoint, ft_proj_layer=-1):
    """A classifier of this project: x (B x 3 x S x S, values in [0, 1], no normalisation) ->
    logits, B x classes, in eval mode; `.classes` names them where the checkpoint does (an
    image folder's class folders in sorted order; ImageNet's: sorted synsets).

    checkpoint: finetune.py's finetuned.pt or its run folder, distill.py's student.pt, a
    converted checkpoint with the authors' supervised head (tf_checkpoint.py), or a folder of
    the authors' TensorFlow checkpoint; ft_proj_layer: the head layer its supervised head
    reads, where the folder does not tell (tf_checkpoint.classifier_layer)."""
    import torch
    from model import build_classifier, checkpoint_kind, finetuned_classifier
    from runs import UserError, as_user_error, checkpoint_path, load_checkpoint
    import tf_checkpoint

    if is_tensorflow(checkpoint):
        _, cfg, model, _, meta = tf_checkpoint.convert(checkpoint, ft_proj_layer=ft_proj_layer)
        if model is None:
            raise UserError(meta["note"] if meta["supervised_head"] else
                            f"{checkpoint} has no supervised head (head_supervised)")
        model.classes, model.image_size = None, cfg.image_size
        return model.eval()
    path = checkpoint_path(checkpoint)
    ckpt = load_checkpoint(path, ("finetuned", "student", "converted"))
    if checkpoint_kind(ckpt) == "finetuned":
        with as_user_error(path):
            model = finetuned_classifier(ckpt)
        config = ckpt["config"]["pretrain"]
    elif "classifier" in ckpt:  # a student, or a converted network with its supervised head
        config = ckpt["config"]
        with as_user_error(path):
            model = build_classifier(config, ckpt["num_classes"], ckpt.get("ft_proj_layer", 0),
                                     ckpt["model"])
        with torch.no_grad():
            model.fc.weight.copy_(ckpt["classifier"]["weight"])
            model.fc.bias.copy_(ckpt["classifier"]["bias"])
    else:
        raise UserError(f"{path} has no classifier (converted without the authors' supervised "
                        f"head): hubconf.encoder takes it")
    model.classes = ckpt.get("classes") or ckpt["config"].get("classes")
    model.image_size = config["image_size"]
    return model.eval()


def is_tensorflow(path):
    """Whether path is the authors' TensorFlow checkpoint (not one of this project's files)."""
    p = Path(path)
    if p.is_file():
        return not p.suffix == ".pt"
    if not p.is_dir():
        return Path(str(p) + ".index").is_file()  # a checkpoint prefix, model.ckpt-NNNN
    return not any((p / n).is_file() for n in ("ckpt.pt", "finetuned.pt", "student.pt"))
