"""pretrain.py as a user sees it: augmentations, the networks, checkpoints, resume, bad input."""
import copy
import json
import signal
import subprocess
import sys

import pytest
import torch

import pretrain
from runs import UserError, parse_config, precision_for
from conftest import ROOT, TINY_PRETRAIN, error_of, run_script
from data import InMemory, ResumableSampler, ViewLoader, build_augmentation, load_split
from model import ProjectionHead, build_model
from pretrain import PRESETS, Config
from resnet import ARCHS, SamePool, build_encoder

# ---------------------------------------------------------------------------------- data


@pytest.mark.parametrize("dataset", ["cifar10", "folder"])
def test_both_data_paths_make_two_views_on_the_device(dataset, tiny_folder):
    """CIFAR (here its image-folder export) is decoded once into memory and augmented there;
    a folder is cropped by the loader workers. Either way: two float views in [0, 1] per image,
    different from each other, and the labels."""
    data = load_split(dataset, tiny_folder, "pretrain", 32, torch.device("cpu"), workers=1,
                      views=2, log=lambda *a: None)
    assert isinstance(data, InMemory) == (dataset == "cifar10") and len(data) == 48
    if dataset == "cifar10":
        assert data.images.dtype == torch.uint8 and data.images.shape == (48, 3, 32, 32)
    sampler = ResumableSampler(data, 1, 0, shuffle=True, seed=0, drop_last=True)
    views = ViewLoader(data, sampler, 16, [build_augmentation(32, "crop,color", 0.5)] * 2,
                       torch.device("cpu"), workers=1)
    batches = list(views)
    assert len(batches) == len(views) == 3
    (v1, v2), labels = batches[0]
    assert v1.shape == v2.shape == (16, 3, 32, 32) and v1.dtype == torch.float32
    assert 0 <= v1.min() and v1.max() <= 1 and not torch.equal(v1, v2)
    # pretraining on a folder reads every image without labels (-1); CIFAR keeps its classes
    assert labels.shape == (16,) and set(labels.tolist()) <= ({-1} if dataset == "folder" else {0, 1, 2, 3})


def test_one_branch_leaves_view_2_as_the_plain_crop():
    """Fig. 5's protocol, as the loader gives it: each image is randomly cropped once; view 2 is
    that crop and nothing else (the paper's t(x) = x), view 1 is that same crop followed by
    --augment's transformations, here a second crop and the flip (the "crop" cell). Against the
    crop and flip ops composed by hand from the same random stream."""
    from augment import crop_resize, random_flip, sample_crop_boxes
    from data import InMemory, ViewLoader
    from pretrain import view_augmentations
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    data = InMemory(images, torch.zeros(6, dtype=torch.long), ["a"])
    first, second = view_augmentations(Config(one_branch=True, augment="crop"))
    torch.manual_seed(0)
    (view1, view2), _ = next(iter(ViewLoader(data, range(6), 6, [first, second], "cpu", 0)))
    torch.manual_seed(0)
    crop = crop_resize(images.float(), sample_crop_boxes(6, 32, 32), 32) * (1 / 255)
    assert torch.equal(view2, crop.clamp(0, 1))
    twice = random_flip(crop_resize(crop, sample_crop_boxes(6, 32, 32), 32)).clamp(0, 1)
    assert torch.equal(view1, twice)
    with pytest.raises(ValueError, match="shared crop"):  # only ever on the shared crop
        second(images)
    # colour alone on view 1: the crop's geometry, new colours; without --one-branch, one object
    colour, plain = view_augmentations(Config(one_branch=True, augment="color"))
    assert colour.jitter and not colour.crop and not plain.jitter and plain.base_crop
    same = view_augmentations(Config())
    assert same[0] is same[1] and not same[0].base_crop


def test_one_branch_views_share_the_crop_on_folders_too(tiny_folder):
    """An image folder's loader workers crop each image once under --one-branch: with nothing
    on view 1 (the "none" cell) the two views are equal, where two crops would differ."""
    from data import ViewLoader, load_split
    from pretrain import view_augmentations
    augments = view_augmentations(Config(one_branch=True, augment="", image_size=32))
    cpu = torch.device("cpu")
    data = load_split("folder", str(tiny_folder), "pretrain", 32, cpu, views=1)
    (view1, view2), _ = next(iter(ViewLoader(data, range(8), 8, augments, cpu, 0)))
    assert torch.equal(view1, view2) and view1.std() > 0


def test_unknown_augmentation_is_refused():
    with pytest.raises(UserError, match="unknown cutout"):
        build_augmentation(32, "crop,cutout")


# ---------------------------------------------------------------------------------- networks

R50_PARAMS_M = {1: 24, 2: 94, 4: 375}  # official table, encoder without head, millions


@pytest.mark.parametrize("width", [1, 2, 4])
def test_resnet50_parameter_counts_match_the_official_table(width):
    with torch.device("meta"):  # shapes only: a 375M-parameter network costs no memory
        encoder, h_dim = build_encoder("resnet50", width, 224)
    n = sum(p.numel() for p in encoder.parameters())
    assert abs(n / 1e6 - R50_PARAMS_M[width]) <= 0.5
    assert h_dim == 2048 * width  # every layer is widened, so h is 4096-d at 2x


def test_resnet18_has_the_authors_projection_shortcut_in_stage_1():
    """Their first block of every stage projects, even at 64 -> 64 channels: the CIFAR-10
    ResNet-18 has 4,224 parameters (a 64x64 conv and a BN) more than the textbook 11,168,832."""
    with torch.device("meta"):
        encoder, h_dim = build_encoder("resnet18", 1, 32)
    assert sum(p.numel() for p in encoder.parameters()) == 11_173_056 and h_dim == 512
    firsts = [stage[0] for stage in encoder.stages]
    assert all(not isinstance(b.shortcut, torch.nn.Identity) for b in firsts)
    assert all(isinstance(b.shortcut, torch.nn.Identity) for stage in encoder.stages for b in stage[1:])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_depth_runs_at_a_fractional_width(arch):
    encoder, h_dim = build_encoder(arch, 0.125, 32)
    h = encoder(torch.rand(2, 3, 32, 32))
    assert h.shape == (2, h_dim)


def test_cifar_stem_for_small_images_only():
    small, _ = build_encoder("resnet18", 0.25, 32)
    large, _ = build_encoder("resnet18", 0.25, 64)
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert not any(isinstance(m, SamePool) for m in small.modules())  # no max-pool
    assert large.stem[0][0].kernel_size == (7, 7)
    # the CIFAR stem keeps 32 px: the last stage sees 4x4, ImageNet's would see 1x1
    assert small.stages(small.stem(torch.rand(1, 3, 32, 32))).shape[-1] == 4


def test_blocks_start_as_identity_last_bn_gamma_zero():
    encoder, _ = build_encoder("resnet50", 0.25, 64)
    blocks = [m for m in encoder.modules() if hasattr(m, "body")]
    assert len(blocks) == 16
    assert all(torch.all(b.body[-1].weight == 0) for b in blocks)


@pytest.mark.parametrize("kind,layers,expect", [("none", 2, []), ("linear", 2, [128]),
                                                ("nonlinear", 2, [64, 128]),
                                                ("nonlinear", 3, [64, 64, 128])])
def test_projection_head_shapes(kind, layers, expect):
    head = ProjectionHead(64, kind, layers, 128)
    assert [layer[0].out_features for layer in head.layers] == expect
    for i, layer in enumerate(head.layers):
        assert layer[0].bias is None  # linear layers without bias
        last = i == len(head.layers) - 1
        assert layer[1].bias.requires_grad == (not last)  # last BN: no learnable shift
        assert isinstance(layer[-1], torch.nn.ReLU) == (not last)
    z = head(torch.randn(5, 64))
    assert z.shape == (5, expect[-1] if expect else 64)


def test_model_returns_h_and_z():
    cfg = Config(arch="resnet18", width_multiplier=0.125, image_size=32)
    h, z = build_model(cfg)(torch.rand(4, 3, 32, 32))
    assert h.shape == (4, 64) and z.shape == (4, 128)


# ---------------------------------------------------------------------------------- configuration


def test_presets_then_flags():
    cfg, given = parse_config(Config, ["--dataset", "imagenet", "--temperature", "0.2"], PRESETS)
    assert (cfg.arch, cfg.batch_size, cfg.blur, cfg.color_strength) == ("resnet50", 4096, True, 1.0)
    assert cfg.temperature == 0.2 and given == {"dataset": "imagenet", "temperature": 0.2}
    cfg, _ = parse_config(Config, ["--no-global-bn"], PRESETS)
    assert (cfg.arch, cfg.batch_size, cfg.temperature, cfg.global_bn) == ("resnet18", 512, 0.5, False)


# ---------------------------------------------------------------------------------- end to end


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_pretraining_writes_a_checkpoint_and_a_log(pretrained_checkpoint):
    ckpt = load(pretrained_checkpoint)  # weights_only=True: plain data only
    assert ckpt["step"] == 6 and ckpt["epoch"] == 2  # 48 images / 16 = 3 steps per epoch
    assert ckpt["config"]["width_multiplier"] == 0.125 and ckpt["config"]["dataset"] == "folder"
    assert {"model", "optimizers", "scaler", "rng"} <= set(ckpt)
    log = [json.loads(line) for line in open(pretrained_checkpoint.parent / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r["loss"] > 0 and 0 <= r["contrast_acc"] <= 1 for r in log)


def test_resume_continues_exactly(pretrained_checkpoint, tiny_folder, tmp_path):
    """Stop after one epoch, resume: the same steps and bit-for-bit the same weights as the
    uninterrupted two-epoch run of the fixture (same data order, augmentations and schedule)."""
    run_script("pretrain.py", *TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", tmp_path,
               "--max-steps", 3)
    assert load(tmp_path / "ckpt.pt")["step"] == 3
    out = run_script("pretrain.py", "--resume", tmp_path / "ckpt.pt", "--max-steps", 0).stdout
    assert "step 4/6" in out
    resumed, straight = load(tmp_path / "ckpt.pt"), load(pretrained_checkpoint)
    assert resumed["step"] == 6
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_ctrl_c_checkpoints_after_the_step_and_resumes(tiny_folder, tmp_path):
    args = [*TINY_PRETRAIN, "--data-dir", tiny_folder, "--out-dir", tmp_path, "--epochs", 50]
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for the second logged step, then interrupt
        if "step 2/" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by signal" in out and "Traceback" not in err
    step = load(tmp_path / "ckpt.pt")["step"]
    assert 2 <= step < 150
    out = run_script("pretrain.py", "--resume", tmp_path / "ckpt.pt", "--max-steps", step + 2).stdout
    assert f"step {step + 1}/{step + 2}" in out
    assert load(tmp_path / "ckpt.pt")["step"] == step + 2


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/data"], "no image folder at /nonexistent/data"),
    (["--dataset", "cifar10", "--data-dir", "EMPTY"], "cifar10 is not in EMPTY and could not be downloaded"),
    (["--dataset", "stl10", "--data-dir", "EMPTY"], "download it into --data-dir on a machine with "
     "network (torchvision's binary files), or --dataset folder for images of your own"),
    (["--dataset", "cifar100", "--data-dir", "TINY"], "has 4 classes: not cifar100's 100; --dataset "
     "cifar10, or --dataset folder"),
    (["--dataset", "folder", "--data-dir", "TINY", "--val-dir", "TINY/train", "--warmup-epochs", "0",
      "--image-size", "32"],
     "there are no images to train on: every image is in the evaluation split"),
    (["--resume", "/nonexistent/ckpt.pt"], "no checkpoint at /nonexistent/ckpt.pt"),
    (["--batch-size", "x"], "invalid int value"),
    (["--augment", "crop,sobel"], "unknown sobel"),
    (["--optimizer", "sgd", "--resume", "MIDRUN"], "does not fit --optimizer sgd"),
    (["--epochs", "4", "--resume", "MIDRUN"], "--epochs 4 differs from the checkpoint's 2: its "
     "steps and learning-rate schedule count 2 epochs; continue with --epochs 2, or start a new run"),
])
def test_bad_input_gives_one_clear_line(args, message, tiny_folder, midrun_checkpoint, tmp_path):
    names = {"MIDRUN": str(midrun_checkpoint), "EMPTY": str(tmp_path / "cifar"),
             "TINY": str(tiny_folder)}
    args = [names.get(a, a).replace("TINY", str(tiny_folder)) for a in args]
    message = message.replace("EMPTY", names["EMPTY"])
    if "--data-dir" not in args:
        args = args + ["--data-dir", str(tiny_folder), "--image-size", "32"]
    assert message in error_of(pretrain.main, *args, "--out-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(midrun_checkpoint, tmp_path):
    good = tmp_path / "ckpt.pt"
    good.write_bytes(midrun_checkpoint.read_bytes())
    proc = run_script("pretrain.py", "--resume", good, "--lr", 1e30, check=False)
    assert proc.returncode != 0 and "loss is not finite" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = load(good)
    assert after["step"] == 3 and all(torch.isfinite(v).all() for v in after["model"].values()
                                      if v.is_floating_point())


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_where_the_cpu_computes_it_natively(native, expected, monkeypatch):
    """AVX512-BF16 or AMX: bf16 autocast (faster there); elsewhere fp32 (bf16 is emulated)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    precision, autocast, why = precision_for("auto", torch.device("cpu"))
    assert precision == expected and autocast.fast_dtype == torch.bfloat16
    assert autocast._enabled == native and why.startswith("auto: ")
    assert precision_for("fp32", torch.device("cpu"))[0] == "fp32"  # asked for, kept


def test_bf16_autocast_steps_follow_the_fp32_steps():
    """A step of Algorithm 1 under bf16 autocast on the CPU, from the same weights and views as
    an fp32 step: the loss within 0.5%, the update of the weights in the same direction (cosine
    above 0.98; 0.992 measured) and of the same size within 5% (1.6%). bf16 keeps 8 bits of
    mantissa; the loss and LARS run in fp32 either way."""
    torch.manual_seed(0)
    start = build_model(pretrain.Config(arch="resnet18", width_multiplier=0.125, image_size=32))
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(32, 3, 32, 32, generator=g), torch.rand(32, 3, 32, 32, generator=g)
    result = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(start).to(memory_format=torch.channels_last)
        optimizer = pretrain.build_optimizer(model, "lars", 0.5, 1e-4)
        objective = pretrain.build_objective("nt-xent", 0.5)
        loss = pretrain.train_step(model, x1, x2, optimizer, objective, None,
                                   precision_for(precision, torch.device("cpu"))[1])[0].item()
        update = torch.cat([(p.detach() - p0).flatten() for p, p0 in
                            zip(model.parameters(), start.parameters())])
        result[precision] = loss, update
    (loss32, update32), (loss16, update16) = result["fp32"], result["bf16"]
    assert abs(loss16 - loss32) <= 0.005 * loss32 and loss16 != loss32  # bf16 really ran
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0) > 0.98
    assert abs(update16.norm() / update32.norm() - 1) < 0.05


def test_a_long_cpu_run_says_how_long_and_what_fits_the_time_you_have(tiny_folder, tmp_path,
                                                                      monkeypatch, capsys):
    """Before its first step a CPU run prints its time at the probed rate (the probe leaves the
    run's weights, buffers and random stream as they were) and, past two hours, the command
    sized to the time a user has: --minutes, never the command being run."""
    model = build_model(Config(arch="resnet18", width_multiplier=0.125, image_size=32))
    before, rng = copy.deepcopy(model.state_dict()), torch.random.get_rng_state()
    cfg = Config(arch="resnet18", width_multiplier=0.125, image_size=32, batch_size=16)
    data = load_split("cifar10", tiny_folder, "pretrain", 32, torch.device("cpu"), log=print)
    loader = ViewLoader(data, range(48), 16, [build_augmentation(32, "crop,color", 0.5)] * 2,
                        torch.device("cpu"), workers=0)
    run = type("Run", (), dict(device=torch.device("cpu"), autocast=precision_for(
        "fp32", torch.device("cpu"))[1]))
    assert pretrain.seconds_per_step(model, cfg, pretrain.build_objective("nt-xent", 0.5),
                                     loader, run, images=8) > 0
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for per_step, long in ((1e-6, False), (1e4, True)):  # --max-steps 1: 1e4 s
        monkeypatch.setattr(pretrain, "seconds_per_step", lambda *a, s=per_step: s)
        pretrain.main([*TINY_PRETRAIN, "--epochs", "1000", "--data-dir", str(tiny_folder),
                       "--max-steps", "1", "--out-dir", str(tmp_path / str(long))])
        out = capsys.readouterr().out
        assert "on this CPU the run takes about" in out
        assert ("the same command with --minutes M instead of --epochs" in out) == long


TINY_CLOCK = [f for i, f in enumerate(TINY_PRETRAIN) if "--epochs" not in TINY_PRETRAIN[max(i - 1, 0):i + 1]]


def test_minutes_chooses_the_epochs_that_fit_and_a_relaunch_keeps_them(tiny_folder, tmp_path,
                                                                      monkeypatch, capsys):
    """--minutes 10, a step timed at 100/3 s (an epoch of 3 steps: 100 s) and an evaluation at
    20 s: 4 epochs fit the 510 s the clock leaves (15% kept back), warming up for the share of the
    schedule --warmup-epochs had of --epochs. The choice is stored; a run stopped and relaunched
    with the same command keeps it without timing again, and ends with the weights of the run
    that was never stopped."""
    monkeypatch.setattr(pretrain, "seconds_per_step", lambda *a, **k: 100 / 3)
    monkeypatch.setattr(pretrain, "evaluation_seconds", lambda *a: 20.0)
    flags = [*TINY_CLOCK, "--data-dir", str(tiny_folder), "--minutes", "10", "--warmup-epochs", "100"]
    epochs = pretrain.parse_with_presets(flags)[0].epochs  # the preset's
    pretrain.main([*flags, "--out-dir", str(tmp_path / "straight")])
    out = capsys.readouterr().out
    assert "--minutes 10: a step of 16 takes 33.3 s here" in out
    assert "an epoch 100 s: 4 epochs (warmup 0.4)" in out and "(about 20 s)" in out
    ckpt = load(tmp_path / "straight" / "ckpt.pt")
    clock = ckpt["config"]["clock"]
    assert clock["epochs"] == 4 and clock["warmup_epochs"] == pytest.approx(100 * 4 / epochs)
    assert clock["images_per_s"] == pytest.approx(0.48) and clock["evaluation_s"] == 20
    assert ckpt["step"] == 12 and ckpt["config"]["epochs"] == epochs
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "straight" / "log.jsonl").read_text().split("\n") if r]
    assert len(lrs) == 4 and lrs[-1] < lrs[1]  # a cosine over 4 epochs, not over 1000
    pretrain.main([*flags, "--out-dir", str(tmp_path / "cut"), "--max-steps", "4"])
    monkeypatch.setattr(pretrain, "seconds_per_step", lambda *a, **k: pytest.fail("timed again"))
    pretrain.main([*flags, "--out-dir", str(tmp_path / "cut")])
    assert "done: 12 steps" in capsys.readouterr().out
    cut = load(tmp_path / "cut" / "ckpt.pt")
    assert cut["config"]["clock"] == clock
    assert all(torch.equal(v, cut["model"][k]) for k, v in ckpt["model"].items())


def test_minutes_timed_for_real_plans_the_steps_of_its_epochs(tiny_folder, tmp_path):
    """The step timed for real on the run's own loader: the run's first steps are those of
    --epochs E with the E it chose (the probe drew from none of the run's random streams or
    batches)."""
    common = [*TINY_CLOCK, "--data-dir", tiny_folder, "--max-steps", 2]
    run_script("pretrain.py", *common, "--minutes", 2, "--out-dir", tmp_path / "clock")
    epochs = load(tmp_path / "clock" / "ckpt.pt")["config"]["clock"]["epochs"]
    run_script("pretrain.py", *common, "--epochs", epochs, "--out-dir", tmp_path / "epochs")
    a, b = (load(tmp_path / name / "ckpt.pt")["model"] for name in ("clock", "epochs"))
    assert epochs > 1 and all(torch.equal(v, b[k]) for k, v in a.items())


def test_minutes_too_short_or_with_epochs_is_refused(tiny_folder, monkeypatch):
    flags = [*TINY_CLOCK, "--data-dir", tiny_folder, "--minutes", 1]
    assert "give --minutes or --epochs 2, not both" in error_of(pretrain.main, *flags, "--epochs", 2)
    monkeypatch.setattr(pretrain, "seconds_per_step", lambda *a, **k: 20.0)  # an epoch: 60 s
    monkeypatch.setattr(pretrain, "evaluation_seconds", lambda *a: 30.0)
    assert "give at least --minutes 2" in error_of(pretrain.main, *flags)
