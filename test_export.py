"""The encoder outside this repository: export.py's torch.export program run by a Python that
cannot import the repository, torchvision's ResNet with export.py's weights and lines against
h, the refusals, and hubconf.py's entry points through torch.hub itself."""
import dataclasses
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

import export
from conftest import ROOT, error_of, run_script
from model import Representation, build_model, finetuned_classifier
from pretrain import Config
from runs import load_checkpoint


def encoder_of(path, layer=0):
    ckpt = load_checkpoint(path)
    return Representation(build_model(ckpt["config"], ckpt["model"]), layer).eval()


def test_pt2_runs_without_the_repository(pretrained_checkpoint, tmp_path):
    """h and head layer 1 from the exported programs, at two batch sizes and an image size the
    export never saw, in `python -I` from another folder (no repository on sys.path), equal the
    checkpoint's."""
    torch.manual_seed(0)
    x = {(n, size): torch.rand(n, 3, size, size) for n, size in ((1, 32), (5, 32), (2, 40))}
    for layer in (0, 1):
        out = tmp_path / f"layer{layer}.pt2"
        run_script("export.py", pretrained_checkpoint, out, "--layer", layer)
        torch.save(x, tmp_path / "x.pt")
        program = (
            "import sys, torch\n"
            "try:\n    import pretrain\nexcept ImportError:\n    pass\n"
            "else:\n    sys.exit('the repository is importable')\n"
            f"f = torch.export.load({str(out)!r}).module()\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"torch.save({{n: f(v) for n, v in x.items()}}, {str(tmp_path / 'y.pt')!r})\n")
        proc = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        y, f = torch.load(tmp_path / "y.pt"), encoder_of(pretrained_checkpoint, layer)
        with torch.no_grad():
            for (n, size), v in x.items():
                assert y[n, size].shape == (n, f.out_dim)
                torch.testing.assert_close(y[n, size], f(v), rtol=1e-4, atol=1e-5)


def random_encoder(arch, size):
    """A width-1 network with random weights and BN statistics far from (0, 1), so that a
    misplaced BN or padding shows in h."""
    cfg = Config(arch=arch, image_size=size, width_multiplier=1.0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model, dataclasses.asdict(cfg)


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("resnet18", 64), ("resnet50", 64)])
def test_torchvision_with_the_lines_computes_h(arch, size):
    """torchvision's ResNet, the printed lines applied, loads the weights with only fc.* missing
    and computes h; without the 'SAME' pool (the ImageNet stem) it does not."""
    model, config = random_encoder(arch, size)
    state, lines = export.torchvision_state(model, config)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))

    def torchvision_h(lines):
        tv = getattr(torchvision.models, arch)()
        for line in lines:
            exec(line, {"torch": torch, "model": tv})
        result = tv.load_state_dict(state, strict=False)
        assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
        tv.fc = torch.nn.Identity()
        with torch.no_grad():
            return tv.eval()(x)

    with torch.no_grad():
        h = model.encoder(x)
    torch.testing.assert_close(torchvision_h(lines), h, rtol=1e-4, atol=1e-4)
    if size > 32:  # torchvision's own max-pool pads 1 on both sides: other features
        plain = torchvision_h([line for line in lines if line != export.SAME_MAXPOOL])
        assert (plain - h).norm() > 0.01 * h.norm()


def test_refusals(pretrained_checkpoint, finetuned_checkpoint, tmp_path):
    """One line and no file where torchvision has no such network, for --layer with it or out of
    range, for a folder or an unwritable path as the output, for a checkpoint that is not an
    encoder."""
    out = tmp_path / "r18.pth"
    assert "torchvision has no resnet18 at width 0.125" in error_of(
        export.main, pretrained_checkpoint, out)
    assert "--layer is for .pt2" in error_of(export.main, pretrained_checkpoint, out, "--layer", 1)
    assert "is a folder" in error_of(export.main, pretrained_checkpoint, tmp_path)
    assert "reads projection-head layer 1, which torchvision's ResNet has not" in error_of(
        export.main, finetuned_checkpoint, out)
    assert "--layer" in error_of(export.main, pretrained_checkpoint, out, "--layer", 7)
    (tmp_path / "a file").write_text("")
    assert "a file" in error_of(export.main, pretrained_checkpoint, tmp_path / "a file" / "x.pt2")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a file"]


def test_the_output_follows_its_extension_and_replaces_only_an_export(pretrained_checkpoint,
                                                                     finetuned_checkpoint, tmp_path):
    """export.py onto the checkpoint it reads, onto its backup or onto a file of the user's: one
    line, the file untouched; the extension says the format; the same command twice replaces its own export. A fine-tuned network exports as
    its classifier, which runs at a batch size and an image size the export never saw."""
    model, config = random_encoder("resnet18", 32)  # one torchvision can take
    run = tmp_path / "run"
    run.mkdir()
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        torch.save(dict(model=model.state_dict(), config=config, step=0), run / name)
    (tmp_path / "mine.pth").write_bytes(b"the user's own file")
    (tmp_path / "mine.pt2").write_bytes(b"the user's own file")
    for target in (run / "ckpt.pt", run / "ckpt.prev.pt", tmp_path / "mine.pth", tmp_path / "mine.pt2"):
        before = target.read_bytes()
        assert "exists and is not a file this command writes" in error_of(export.main, run, target)
        assert target.read_bytes() == before
    assert "name a .pt2 file" in error_of(export.main, run, tmp_path / "x.onnx")
    for _ in range(2):  # the same command twice
        run_script("export.py", run, tmp_path / "again.pt2")
    run_script("export.py", run, tmp_path / "again.pth")  # torchvision's names, a second time
    run_script("export.py", run, tmp_path / "again.pth")
    run_script("export.py", finetuned_checkpoint, tmp_path / "classifier.pt2")
    f = torch.export.load(tmp_path / "classifier.pt2").module()
    reference = finetuned_classifier(load_checkpoint(finetuned_checkpoint)).eval()
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(3))  # trained at 32 px
    with torch.no_grad():
        torch.testing.assert_close(f(x), reference(x), rtol=1e-4, atol=1e-5)


def test_hub_entry_points(pretrained_checkpoint, finetuned_checkpoint):
    """torch.hub.load on this clone gives the checkpoint's encoder (its run folder as well) and
    the fine-tuned classifier, in eval mode."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    f = torch.hub.load(str(ROOT), "encoder", checkpoint=str(pretrained_checkpoint.parent),
                       layer=1, source="local")
    assert not f.training and f.image_size == 32
    g = torch.hub.load(str(ROOT), "classifier", checkpoint=str(finetuned_checkpoint),
                       source="local")
    reference = finetuned_classifier(load_checkpoint(finetuned_checkpoint)).eval()
    with torch.no_grad():
        torch.testing.assert_close(f(x), encoder_of(pretrained_checkpoint, 1)(x))
        torch.testing.assert_close(g(x), reference(x))
    assert g(x).shape == (3, 4) and not g.training
