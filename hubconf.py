"""torch.hub entry points: a SimCLR encoder or classifier of this project in one line.

    import torch
    f = torch.hub.load("path/to/this/clone", "encoder", checkpoint="runs/cifar10-.../ckpt.pt",
                       source="local")                      # x -> h, in eval mode
    g = torch.hub.load("path/to/this/clone", "classifier", checkpoint="runs/.../finetuned.pt",
                       source="local")                      # x -> logits
    # once the repository is public: torch.hub.load("<owner>/<name>", "encoder", checkpoint=...)

Inputs are RGB float tensors B x 3 x S x S in [0, 1], without mean/std (as the authors' code);
S, the training size, is the module's `.image_size`. Without this repository: export.py.
"""
from pathlib import Path

dependencies = ["torch", "torchvision", "einops"]


def encoder(checkpoint, layer=0):
    """The encoder f, in eval mode: x -> h = f(x), B x d (layer K: the projection head's first K
    layers, as linear_eval.py --layer). checkpoint: pretrain.py's ckpt.pt or its run folder, a
    student.pt, a converted checkpoint, or the authors' TensorFlow checkpoint (converted here)."""
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
    """A classifier, in eval mode: x -> logits, B x classes, named by `.classes` where the
    checkpoint does. checkpoint: finetune.py's finetuned.pt or its run folder, a student.pt, a
    converted checkpoint with the authors' supervised head, or their TensorFlow checkpoint
    (ft_proj_layer: the head layer it reads, tf_checkpoint.classifier_layer)."""
    import torch
    from model import build_classifier, checkpoint_kind, finetuned_classifier
    from runs import UserError, as_user_error, checkpoint_path, load_checkpoint
    import tf_checkpoint

    if is_tensorflow(checkpoint):
        _, cfg, model, *_ = tf_checkpoint.convert(checkpoint, ft_proj_layer=ft_proj_layer,
                                                  need_classifier=True)
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
