"""The authors' network and checkpoints: tf_checkpoint.py's reader, and our ResNet against the
outputs of the authors' own TensorFlow code (fixtures/, made by fixtures/make_tf_fixtures.py)."""
import contextlib
import copy
import functools
import io
import json
import math
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from runs import UserError
from conftest import ROOT, make_image_folder, run_script
from resnet import SamePool, build_encoder
import tf_checkpoint
from tf_checkpoint import (CorruptFile, TFCheckpoint, convert, masked_crc32c, parse_proto,
                           read_block, read_table, read_varint)

FIXTURES = ROOT / "fixtures"
# name: (conversion options, arch, width, SK, stem size, head layers, classifier on head layer)
CASES = {  # the head layer is given: these folders do not say (classifier_layer)
    "tf1_r50_sk": ({"ft_proj_layer": 0}, "resnet50", 1 / 32, 0.0625, 224, 3, 0),
    "tf1_r18_cifar": ({"ft_proj_layer": 0}, "resnet18", 1 / 32, 0.0, 32, 2, 0),
    "tf1_r18_cifar-ema": ({"ema": True, "ft_proj_layer": 0}, "resnet18", 1 / 32, 0.0, 32, 2, 0),
    "tf2_r50_ft": ({"ft_proj_layer": 1}, "resnet50", 1 / 32, 0.0, 224, 3, 1),
    "tf2_r18_sk_savedmodel": ({"ft_proj_layer": 0}, "resnet18", 1 / 32, 0.0625, 224, 3, 0),
}


@functools.cache
def converted(case):
    return convert(FIXTURES / case.split("-")[0], verify_crc=True, **CASES[case][0])


def fixture(case):
    """The converted model and classifier (copies), TensorFlow's outputs and its input x (NCHW,
    uint8)."""
    model, cfg, classifier, k, meta = copy.deepcopy(converted(case))
    tf = dict(np.load(FIXTURES / f"{case.split('-')[0]}.npz"))
    if case.endswith("-ema"):  # the EMA network; its classifier is the online one
        tf = {k[4:]: v for k, v in tf.items() if k.startswith("ema_")} | {"x": tf["x"]}
    return model, cfg, classifier, k, meta, tf, torch.from_numpy(tf["x"]).permute(0, 3, 1, 2)


def relative_error(ours, theirs):
    theirs = torch.from_numpy(theirs)
    return ((ours.to(theirs.dtype) - theirs).abs().max() / theirs.abs().max()).item()


def outputs(model, classifier, x, dtype):
    with torch.no_grad():
        h, z = model.to(dtype)(x.to(dtype) / 255)
        logits = classifier.to(dtype)(x.to(dtype) / 255) if classifier is not None else None
    return dict(h=h, z=z, logits=logits)


# ------------------------------------------------------------------- against TensorFlow's outputs


@pytest.mark.parametrize("case", list(CASES))
def test_converted_network_computes_what_tensorflow_computes(case):
    """In float64 (their layers in float64 on the same values) ours equals theirs to rounding
    (1e-10): every padding, pool and shortcut is theirs. In float32 ours is 1e-5 from theirs, or
    within 4x TensorFlow's own float32 error where these narrow random networks amplify
    rounding (TensorFlow's float32 outputs are up to 1.6e-4 from its float64 ones here)."""
    model, cfg, classifier, k, meta, tf, x = fixture(case)
    _, arch, width, sk, size, layers, on_layer = CASES[case]
    assert (cfg.arch, cfg.width_multiplier, cfg.sk_ratio, cfg.image_size, cfg.proj_layers, k) == \
        (arch, width, sk, size, layers, on_layer)
    ours64, ours32 = (outputs(model, classifier, x, dtype) for dtype in (torch.float64, torch.float32))
    for key in ("h", "z", "logits"):
        if key in tf:  # the EMA fixture has no EMA classifier
            assert relative_error(ours64[key], tf[key + "64"]) < 1e-10, key
            own = relative_error(torch.from_numpy(tf[key]).double(), tf[key + "64"])
            assert relative_error(ours32[key], tf[key]) < max(1e-5, 4 * own), (key, own)


def variant(case, change):
    """Float64 relative error of h after replacing one detail of the authors' network."""
    model, *_, tf, x = fixture(case)
    change(model.encoder)
    return relative_error(outputs(model, None, x, torch.float64)["h"], tf["h64"])


def test_point_1_stem_max_pool_pads_like_tensorflow_same():
    """112 px: the max-pool sees 56 x 56; 'SAME' pads 0 before and 1 after, not 1 and 1."""
    assert variant("tf2_r50_ft", lambda e: None) < 1e-10
    assert variant("tf2_r50_ft", lambda e: e.stem.__setitem__(-1, nn.MaxPool2d(3, 2, 1))) > 1e-3


def test_point_2_resnet18_projects_in_stage_1():
    first = lambda e: e.stages[0][0]
    assert not isinstance(first(fixture("tf1_r18_cifar")[0].encoder).shortcut, nn.Identity)
    assert variant("tf1_r18_cifar", lambda e: setattr(first(e), "shortcut", nn.Identity())) > 1e-3


def test_point_3_sk_shortcut_pools_at_stride_1():
    no_pool = lambda e: e.stages[0][0].shortcut.__setitem__(0, nn.Identity())
    assert variant("tf1_r50_sk", no_pool) > 1e-3
    assert variant("tf2_r18_sk_savedmodel", no_pool) > 1e-3  # in basic blocks too (tf2)


def test_point_4_sk_strided_pool_pads_odd_sizes_with_counted_zeros():
    """At 112 px stage 4's strided shortcut pools 7 x 7: theirs pads a zero row and column after
    and averages over 4; a pool that leaves the padding out of the count, or none, differs."""
    assert variant("tf1_r50_sk", lambda e: None) < 1e-10
    ceil = lambda e: e.stages[3][0].shortcut.__setitem__(0, nn.AvgPool2d(2, 2, ceil_mode=True))
    assert variant("tf1_r50_sk", ceil) > 1e-3
    with pytest.raises(RuntimeError):  # the old nn.AvgPool2d(2, 2): 3 x 3 against the main path's 4 x 4
        variant("tf1_r50_sk", lambda e: e.stages[3][0].shortcut.__setitem__(0, nn.AvgPool2d(2, 2)))


@pytest.mark.parametrize("size", [112, 80, 97])
def test_sk_encoder_runs_at_sizes_with_odd_feature_maps(size):
    encoder, h_dim = build_encoder("resnet50", 1 / 32, size, 0.0625)
    assert encoder(torch.rand(2, 3, size, size)).shape == (2, h_dim)


def tf_same_pool(x, kind, k, s):
    """TensorFlow's padding='SAME' pooling written out with loops, in float64."""
    n, c, height, width = x.shape
    out_h, out_w = math.ceil(height / s), math.ceil(width / s)
    top = max((out_h - 1) * s + k - height, 0) // 2
    left = max((out_w - 1) * s + k - width, 0) // 2
    out = torch.empty(n, c, out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        for j in range(out_w):
            rows = [r for r in range(i * s - top, i * s - top + k) if 0 <= r < height]
            cols = [q for q in range(j * s - left, j * s - left + k) if 0 <= q < width]
            window = x[:, :, rows][:, :, :, cols].double().flatten(2)
            out[:, :, i, j] = window.amax(2) if kind == "max" else window.mean(2)
    return out


@pytest.mark.parametrize("kind,k,s", [("max", 3, 2), ("avg", 2, 1), ("avg", 3, 2), ("max", 2, 1)])
@pytest.mark.parametrize("size", [(6, 6), (7, 7), (5, 8)])
def test_same_pool_equals_tensorflow_same_padding(kind, k, s, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64) - 2  # padding with 0 would win a max
    torch.testing.assert_close(SamePool(kind, k, s)(x), tf_same_pool(x, kind, k, s))


# ------------------------------------------------------------------------------------ the reader


def test_varint_and_protobuf_fields():
    assert read_varint(b"\xac\x02", 0) == (300, 2) and read_varint(b"\x7f", 0) == (127, 1)
    with pytest.raises(CorruptFile):
        read_varint(b"\xff\xff", 0)
    # field 1 varint 150, field 2 string "hi", field 6 fixed32
    msg = b"\x08\x96\x01" + b"\x12\x02hi" + b"\x35" + (7).to_bytes(4, "little")
    assert parse_proto(msg) == {1: [150], 2: [b"hi"], 6: [7]}


def varint(n):
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def make_block(entries, restart_every=2):
    """A table block written the LevelDB way: keys share prefixes except at restart points."""
    out, restarts, previous = b"", [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_every:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    return out + b"".join(r.to_bytes(4, "little") for r in restarts) + len(restarts).to_bytes(4, "little")


def make_table(blocks):
    """A table file: data blocks (each a list of entries), the index block, the footer."""
    data, index = b"", []

    def add(block):
        nonlocal data
        handle = varint(len(data)) + varint(len(block))
        data += block + b"\x00" + masked_crc32c(block + b"\x00").to_bytes(4, "little")
        return handle

    for entries in blocks:
        index.append((entries[-1][0], add(make_block(entries))))
    meta, top = add(make_block([])), add(make_block(index, 1))
    footer = (meta + top).ljust(40, b"\x00") + (0xDB4775248B80FB57).to_bytes(8, "little")
    return data + footer


def test_block_with_restart_points_and_shared_prefixes():
    entries = [(b"base_model/conv2d/kernel", b"1"), (b"base_model/conv2d_1/kernel", b"22"),
               (b"base_model/conv2d_10/kernel", b""), (b"head/x", b"4444"), (b"head/y", b"5")]
    block = make_block(entries)
    assert block[:1] == b"\x00" and len(block) < sum(len(k) + len(v) for k, v in entries) + 40
    assert read_block(block) == entries
    body = block[:-4 - 4 * 3]  # the entries; 3 restart points follow
    second = 3 + len(entries[0][0]) + len(entries[0][1])  # where the second entry starts
    bad = body + b"".join(i.to_bytes(4, "little") for i in (0, second, 2))
    with pytest.raises(CorruptFile):  # a restart point there, but that entry shares a prefix
        read_block(bad)


def test_table_with_several_blocks_and_checksums():
    blocks = [[(b"a", b"1"), (b"ab", b"2")], [(b"b", b"3")], [(b"c/d", b"4"), (b"c/e", b"55")]]
    table = make_table(blocks)
    assert read_table(table) == {k: v for block in blocks for k, v in block}
    damaged = bytearray(table)
    damaged[1] ^= 0xFF
    with pytest.raises(CorruptFile, match="checksum"):
        read_table(bytes(damaged))
    with pytest.raises(CorruptFile):
        read_table(table[:-1])
    assert masked_crc32c(b"123456789") == 0xC78AB0E5  # crc32c 0xE3069283, masked


def test_reader_reads_tensorflows_files_and_checks_tensor_checksums(tmp_path):
    ckpt = TFCheckpoint(FIXTURES / "tf1_r18_cifar" / "model.ckpt-1234")
    assert ckpt.entries["global_step"]["shape"] == () and ckpt.tensor("global_step").item() == 0
    kernel = ckpt.tensor("base_model/conv2d/kernel", verify_crc=True)
    assert kernel.shape == (3, 3, 3, 2) and kernel.dtype == torch.float32
    assert any(name.endswith("/Momentum") for name in ckpt.entries)  # optimizer slots are there
    shutil.copytree(FIXTURES / "tf1_r18_cifar", tmp_path / "c")
    data = tmp_path / "c" / "model.ckpt-1234.data-00000-of-00001"
    offset = TFCheckpoint(tmp_path / "c" / "model.ckpt-1234").entries["base_model/conv2d/kernel"]["offset"]
    raw = bytearray(data.read_bytes())
    raw[offset + 5] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum mismatch in variable base_model/conv2d/kernel"):
        TFCheckpoint(tmp_path / "c" / "model.ckpt-1234").tensor("base_model/conv2d/kernel", verify_crc=True)


# ------------------------------------------------------------------------ the scripts, end to end


def convert_cli(*args, check=True):
    """tf_checkpoint.py's command line, run in this process (no interpreter to start): what it
    printed, what it exited with (run_cli's one line goes to stderr as the interpreter puts it)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tf_checkpoint.main([str(a) for a in args])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
            if isinstance(exit.code, str):
                err.write(exit.code + "\n")
    proc = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and code:
        raise AssertionError(f"tf_checkpoint.py exited {code}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_a_checkpoint_is_found_from_what_a_user_may_pass(tmp_path):
    """The folder (its 'checkpoint' file may record the training machine's absolute path), the
    prefix, the .index or a data shard."""
    folder = tmp_path / "r18"
    shutil.copytree(FIXTURES / "tf1_r18_cifar", folder)
    (folder / "checkpoint").write_text('model_checkpoint_path: "gs://bucket/run/model.ckpt-1234"\n')
    prefix = folder / "model.ckpt-1234"
    for path in (folder, prefix, f"{prefix}.index", f"{prefix}.data-00000-of-00001"):
        assert convert(path)[0].encoder.out_dim == 16


def test_the_classifier_layer_follows_the_authors_folders_or_is_asked_for(tmp_path):
    """finetuned_1pct / finetuned_10pct folders put the classifier on head layer 1 (v2 paper),
    however the path is spelled; where nothing tells (the shapes fit layers 0 and 1, the folder
    is not the authors'), no classifier is guessed: --classifier asks for --ft-proj-layer."""
    folder = tmp_path / "finetuned_1pct" / "r50_1x_sk0"
    shutil.copytree(FIXTURES / "tf2_r50_ft", folder)
    *_, k, meta = convert(folder)
    assert k == 1 and meta["ft_proj_layer"] == 1 and meta["layout"] == "tf2" and meta["step"] == 1234
    proc = subprocess.run([sys.executable, str(ROOT / "tf_checkpoint.py"), "r50_1x_sk0", "../a.pt",
                           "--classifier"], cwd=folder.parent, capture_output=True, text=True)
    assert proc.returncode == 0 and "classifier of 10 classes on head layer 1" in proc.stdout
    assert "note: the classifier is on head layer 1, as in the authors' finetuned_1pct models" in proc.stdout
    bare = tmp_path / "r50_1x_sk0"  # what `gsutil cp -r gs://.../finetuned_1pct/r50_1x_sk0 .` makes
    shutil.copytree(FIXTURES / "tf2_r50_ft", bare)
    model, _, classifier, k, meta = convert(bare)
    assert classifier is None and k is None and "--ft-proj-layer 1" in meta["note"]
    proc = convert_cli(bare, tmp_path / "b.pt", "--classifier", check=False)
    assert proc.returncode == 1 and not (tmp_path / "b.pt").exists()
    assert proc.stderr == ("tf_checkpoint.py: error: the supervised head fits head layer 0, 1 or 2 "
                           "(each 64-d) and the weights cannot tell which it was trained on: pass "
                           "--ft-proj-layer 1 for the authors' finetuned_1pct and finetuned_10pct "
                           "models, 0 for finetuned_100pct and pretrained ones\n")
    out = convert_cli(bare, tmp_path / "c.pt").stdout  # the network alone: the classifier left out
    assert "note: the supervised head fits head layer 0, 1 or 2" in out and "the classifier was left out" in out
    assert "classifier" not in torch.load(tmp_path / "c.pt", weights_only=True)
    assert convert(bare, ft_proj_layer=1)[3] == 1
    with pytest.raises(UserError, match="--ft-proj-layer 3: the supervised head takes 64 inputs, "
                                        "which head layer 0, 1 or 2 gives"):
        convert(bare, ft_proj_layer=3)


def test_converted_checkpoints_go_through_linear_eval_finetune_and_distill(tmp_path, capsys):
    """The CIFAR ResNet-18 fixture (10 classes) as linear_eval.py, finetune.py and distill.py
    take our own checkpoints; --evaluate scores its supervised head."""
    data = make_image_folder(tmp_path / "data", classes=10, train_per_class=2, val_per_class=1)
    src = FIXTURES / "tf1_r18_cifar"
    out = convert_cli(src, tmp_path / "pre.pt", "--evaluate", data, "--ft-proj-layer", 0).stdout
    assert "tf1 checkpoint: resnet18 x0.03125, h 16-d, 2 head layer(s) -> 16, classifier of 10" in out
    assert "supervised head on" in out
    ckpt = torch.load(tmp_path / "pre.pt", weights_only=True)
    assert ckpt["converted_from"]["layout"] == "tf1" and ckpt["classifier"]["weight"].shape == (10, 16)
    import distill, finetune, linear_eval  # in this process: no interpreter to start
    script = lambda module, *args: module.main([str(a) for a in args])
    script(linear_eval, "--checkpoint", tmp_path / "pre.pt", "--dataset", "folder",
           "--data-dir", data, "--cached-features", "--epochs", 2, "--batch-size", 10, "--workers", 0,
           "--out", tmp_path / "lin.json")
    assert 0 <= json.loads((tmp_path / "lin.json").read_text())["top1"] <= 100
    script(finetune, "--checkpoint", tmp_path / "pre.pt", "--dataset", "folder",
           "--data-dir", data, "--label-fraction", 1.0, "--epochs", 1, "--batch-size", 10,
           "--workers", 0, "--out-dir", tmp_path / "ft")
    convert_cli(src, tmp_path / "teacher.pt", "--classifier", "--ft-proj-layer", 0)
    teacher = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert teacher["config"]["num_classes"] == 10 and teacher["config"]["ft_proj_layer"] == 0
    capsys.readouterr()
    script(distill, "--teacher", tmp_path / "teacher.pt", "--dataset", "folder",
           "--data-dir", data, "--epochs", 1, "--batch-size", 10, "--workers", 0,
           "--out-dir", tmp_path / "distill")
    assert "teacher: top-1" in capsys.readouterr().out and (tmp_path / "distill" / "student.pt").is_file()


def rewrite_bundle(src_prefix, dst_prefix, change):
    """A copy of a TF1 checkpoint through this test's own writer, after change(dict of tensors)."""
    ckpt = TFCheckpoint(src_prefix)
    tensors = change({n: ckpt.tensor(n) for n in ckpt.entries})
    data, entries = b"", []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.numpy().tobytes()
        shape = b"".join(b"\x12" + varint(len(d)) + d for d in (b"\x08" + varint(s) for s in t.shape))
        entry = (b"\x08" + varint({torch.float32: 1, torch.int64: 9}[t.dtype]) + b"\x12" +
                 varint(len(shape)) + shape + b"\x20" + varint(len(data)) + b"\x28" + varint(len(raw)) +
                 b"\x35" + masked_crc32c(raw).to_bytes(4, "little"))
        entries.append((name.encode(), entry))
        data += raw
    header = (b"", b"\x08\x01")  # one shard, little-endian
    dst_prefix.parent.mkdir(parents=True, exist_ok=True)
    (dst_prefix.parent / (dst_prefix.name + ".index")).write_bytes(make_table([[header] + entries]))
    (dst_prefix.parent / (dst_prefix.name + ".data-00000-of-00001")).write_bytes(data)
    return dst_prefix


@pytest.mark.parametrize("problem,message", [
    ("not_a_checkpoint", "damaged or not a TensorFlow checkpoint index"),
    ("no_index", "is not a TensorFlow checkpoint: no"),
    ("truncated", "damaged or not a TensorFlow checkpoint index"),
    ("flipped_byte", "damaged or not a TensorFlow checkpoint index (block checksum mismatch)"),
    ("missing_shard", "missing data shard model.ckpt-1234.data-00000-of-00001"),
    ("unknown_variable", "1 variable(s) this converter does not know, first 'other_head/kernel'"),
    ("unexplained_shapes", "match no ResNet-18/34/50/101/152"),
    ("missing_head_bn", "head_contrastive/nl_0/batch_normalization/beta is missing"),
    ("ema_on_tf2", "--ema: the authors' tf2 checkpoints keep no moving average"),
    ("no_classifier", "has no supervised head"),
    ("wrong_classes", "the supervised head has 10 classes"),
])
def test_bad_checkpoints_give_one_clear_line(problem, message, tmp_path):
    shutil.copytree(FIXTURES / "tf1_r18_cifar", tmp_path / "c")
    prefix, extra = tmp_path / "c" / "model.ckpt-1234", []
    index = tmp_path / "c" / "model.ckpt-1234.index"
    if problem == "not_a_checkpoint":
        index.write_bytes(b"hello" * 20)
    elif problem == "no_index":
        index.unlink()
    elif problem == "truncated":
        index.write_bytes(index.read_bytes()[:-100])
    elif problem == "flipped_byte":
        raw = bytearray(index.read_bytes())
        raw[100] ^= 0x01
        index.write_bytes(bytes(raw))
    elif problem == "missing_shard":
        (tmp_path / "c" / "model.ckpt-1234.data-00000-of-00001").unlink()
    elif problem == "unknown_variable":
        prefix = rewrite_bundle(prefix, tmp_path / "d" / "model.ckpt-1",
                                lambda t: t | {"other_head/kernel": torch.ones(2)})
    elif problem == "unexplained_shapes":
        prefix = rewrite_bundle(prefix, tmp_path / "d" / "model.ckpt-1",
                                lambda t: t | {"base_model/conv2d_3/kernel": torch.ones(3, 3, 2, 5)})
    elif problem == "missing_head_bn":
        prefix = rewrite_bundle(prefix, tmp_path / "d" / "model.ckpt-1", lambda t: {
            n: v for n, v in t.items() if n != "head_contrastive/nl_0/batch_normalization/beta"})
    elif problem == "ema_on_tf2":
        prefix, extra = FIXTURES / "tf2_r50_ft", ["--ema"]
    elif problem == "wrong_classes":
        extra = ["--ft-proj-layer", "0", "--evaluate", str(make_image_folder(
            tmp_path / "data", classes=3, train_per_class=1, val_per_class=1))]
    elif problem == "no_classifier":
        prefix = rewrite_bundle(prefix, tmp_path / "d" / "model.ckpt-1", lambda t: {
            n: v for n, v in t.items() if not n.startswith("head_supervised")})
        extra = ["--classifier"]
    with pytest.raises(SystemExit) as stop:  # run_cli's exit: one line, status 1
        tf_checkpoint.main([str(prefix), str(tmp_path / "out.pt"), *extra])
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code
    assert stop.value.code.startswith("tf_checkpoint.py: error: ") and message in stop.value.code
    assert not (tmp_path / "out.pt").exists()


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    proc = convert_cli(tmp_path / "nothing" / "model.ckpt-1", tmp_path / "out.pt", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"tf_checkpoint.py: error: {tmp_path / 'nothing' / 'model.ckpt-1'} is not a TensorFlow "
        f"checkpoint: no model.ckpt-1.index"]


def test_rewritten_checkpoint_converts_like_the_original(tmp_path):
    """The test's own writer is sound: a verbatim copy converts to the same network."""
    prefix = rewrite_bundle(FIXTURES / "tf1_r18_cifar" / "model.ckpt-1234", tmp_path / "model.ckpt-1",
                            lambda t: t)
    a, b = convert(FIXTURES / "tf1_r18_cifar")[0], convert(prefix, verify_crc=True)[0]
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
