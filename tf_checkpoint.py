"""The authors' released SimCLR checkpoints (TensorFlow) in this project's format, without TensorFlow.

Reads a TensorFlow checkpoint (the `.index` table and its `.data-*-of-*` shards) in plain Python,
maps the authors' variables onto pretrain.py's network (whose ResNet is theirs, detail for detail)
and writes a checkpoint that linear_eval.py, finetune.py and distill.py take as they take ours.
Architecture, width, selective kernels and projection head are read from the variables' shapes.

    gsutil -m cp -r gs://simclr-checkpoints/simclrv2/pretrained/r50_1x_sk0 .   # buckets: docs/checkpoints.md
    python tf_checkpoint.py r50_1x_sk0 r50_1x_sk0.pt              # the folder or model.ckpt-<step>
    python tf_checkpoint.py r50_1x_sk0 r50_1x_sk0_ema.pt --ema    # the moving-average weights
    python linear_eval.py --checkpoint r50_1x_sk0.pt --dataset imagenet --data-dir /data/imagenet
    python tf_checkpoint.py finetuned_1pct/r50_1x_sk0 teacher.pt --classifier --evaluate /data/imagenet
    python tf_checkpoint.py r50_1x_sk0/saved_model r50.pt         # the tf2 bucket's SavedModels

Both layouts of the authors' code are read: TF1 (run.py: base_model/conv2d_12/kernel, ...,
ema_model/...) and tf2 (tf.train.Checkpoint and SavedModel object-graph paths). Optimizer slots,
global_step and the v2 memory queue are skipped; anything else unmapped, a missing shard, a
damaged file or shapes no network explains ends the run with one line and nothing written. h, z
and logits equal TensorFlow's to 1e-12 in float64 (test_tf_checkpoint.py, on networks the
authors' code saved). The supervised head becomes a classifier on the head layer the authors'
folder implies (classifier_layer); its class k is the k-th ImageNet synset in sorted order, as
torchvision's ImageFolder numbers them (docs/checkpoints.md). Inputs are in [0, 1], no mean/std.
"""
import dataclasses
import re
from pathlib import Path

import torch
import torch.nn as nn

from data import load_split
from evaluation import evaluate, shown
from finetune import FinetuneConfig
from model import Classifier, build_model
from pretrain import PRESETS, Config
from runs import Parser, UserError, check_output, default_workers, run_cli, save_checkpoint
from resnet import ARCHS, Bottleneck, SamePool, SelectiveKernel

# --- The file format: an SSTable of BundleEntryProto records, the tensors' bytes in data shards ---
# The index file is a LevelDB table: data blocks of prefix-compressed (key, value) entries, an
# index block pointing at them, and a 48-byte footer ending in a magic number. Each block is
# followed by a compression byte and a masked crc32c. TensorFlow writes the blocks uncompressed.
# Keys are variable names; each value is a BundleEntryProto: dtype, shape, shard, offset, size
# and crc32c of the tensor's little-endian bytes in <prefix>.data-<shard>-of-<shards>.

TABLE_MAGIC = 0xDB4775248B80FB57
DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8, 5: torch.int16,
          6: torch.int8, 9: torch.int64, 10: torch.bool, 14: torch.bfloat16, 19: torch.float16}


class CorruptFile(UserError):
    pass


def read_varint(buf, pos):
    """(value, next position) of the base-128 varint at buf[pos]."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CorruptFile("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def parse_proto(buf):
    """{field number: [values]} of a serialized protobuf message: varints as ints, fixed32/64
    as ints, length-delimited fields (strings, sub-messages) as bytes for the caller to parse."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        else:
            raise CorruptFile(f"protobuf wire type {wire}")
        if pos > len(buf):
            raise CorruptFile("truncated protobuf message")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def _crc_table():
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (0x82F63B78 if n & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(n)
    return table


CRC_TABLE = _crc_table()


def masked_crc32c(data):
    """crc32c of data, masked as LevelDB and TensorFlow store it. Pure Python: about 7 MB/s."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_block(block):
    """The (key, value) entries of a table block. Each entry stores how many leading bytes its
    key shares with the previous key, the rest of the key, and the value; a trailing array of
    restart points (entries that share nothing) ends the block."""
    if len(block) < 4:
        raise CorruptFile("block too short")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise CorruptFile("bad restart count")
    points = {int.from_bytes(block[end + 4 * i:end + 4 * i + 4], "little") for i in range(restarts)}
    entries, key, pos = [], b"", 0
    while pos < end:
        start = pos
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        length, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + length > end or (start in points and shared):
            raise CorruptFile("bad block entry")
        key = key[:shared] + bytes(block[pos:pos + unshared])
        entries.append((key, bytes(block[pos + unshared:pos + unshared + length])))
        pos += unshared + length
    return entries


def read_table(data):
    """{key: value} of a whole table file (bytes), checking the footer and every block's crc."""
    if len(data) < 48 or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise CorruptFile("no table footer (not a TensorFlow checkpoint index)")

    def block(handle, pos):
        offset, pos = read_varint(handle, pos)
        size, pos = read_varint(handle, pos)
        if offset + size + 5 > len(data) - 48:
            raise CorruptFile("a block lies outside the file (truncated?)")
        contents, kind = data[offset:offset + size], data[offset + size]
        if masked_crc32c(data[offset:offset + size + 1]) != int.from_bytes(
                data[offset + size + 1:offset + size + 5], "little"):
            raise CorruptFile("block checksum mismatch")
        if kind != 0:
            raise CorruptFile("compressed blocks (TensorFlow < 1.2?) are not supported")
        return contents, pos

    footer = data[-48:]
    _, pos = read_varint(footer, read_varint(footer, 0)[1])  # skip the (empty) metaindex handle
    index, _ = block(footer, pos)
    table = {}
    for _, handle in read_block(index):
        table.update(read_block(block(handle, 0)[0]))
    return table


class TFCheckpoint:
    """The tensors of a TensorFlow checkpoint <prefix>.index + <prefix>.data-*-of-*."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        index = Path(self.prefix + ".index")
        if not index.is_file():
            raise UserError(f"{prefix} is not a TensorFlow checkpoint: no {index.name}")
        try:
            table = read_table(index.read_bytes())
            header = parse_proto(table.pop(b""))
            self.entries = {k.decode(): self._entry(v) for k, v in table.items()}
        except (CorruptFile, KeyError, UnicodeDecodeError) as e:
            raise UserError(f"{index} is damaged or not a TensorFlow checkpoint index ({e})")
        if header.get(2, [0])[0] != 0:
            raise UserError(f"{index}: big-endian checkpoints are not supported")
        shards = header.get(1, [1])[0]
        self.shards = [Path(f"{self.prefix}.data-{i:05d}-of-{shards:05d}") for i in range(shards)]
        missing = [p.name for p in self.shards if not p.is_file()]
        if missing:
            raise UserError(f"missing data shard {missing[0]} of {prefix} (download all "
                            f"{shards} .data-*-of-{shards:05d} files beside the .index)")

    @staticmethod
    def _entry(value):
        e = parse_proto(value)
        if 7 in e:
            raise CorruptFile("partitioned (sliced) variables are not supported")
        dims = [parse_proto(d).get(1, [0])[0] for d in parse_proto(e.get(2, [b""])[0]).get(2, [])]
        return dict(dtype=e.get(1, [0])[0], shape=tuple(dims), shard=e.get(3, [0])[0],
                    offset=e.get(4, [0])[0], size=e.get(5, [0])[0], crc=e.get(6, [0])[0])

    def raw(self, name, verify_crc=False):
        e = self.entries[name]
        with open(self.shards[e["shard"]], "rb") as f:
            f.seek(e["offset"])
            data = f.read(e["size"])
        if len(data) != e["size"]:
            raise UserError(f"{self.shards[e['shard']]} is truncated (variable {name})")
        if verify_crc and masked_crc32c(data) != e["crc"]:
            raise UserError(f"{self.shards[e['shard']]}: checksum mismatch in variable {name}")
        return data

    def tensor(self, name, verify_crc=False):
        e = self.entries[name]
        if e["dtype"] not in DTYPES:
            raise UserError(f"variable {name} has TensorFlow dtype {e['dtype']}, not a number")
        dtype = DTYPES[e["dtype"]]
        data = self.raw(name, verify_crc)
        if len(data) != dtype.itemsize * torch.Size(e["shape"]).numel():
            raise UserError(f"{self.prefix}: variable {name} has {len(data)} bytes for shape {e['shape']}")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(e["shape"])

    def string(self, name):
        """A scalar string tensor: a varint length, a 4-byte checksum of it, the bytes."""
        data = self.raw(name)
        length, pos = read_varint(data, 0)
        return data[pos + 4:pos + 4 + length]


def object_graph_names(ckpt):
    """tf2 checkpoints name variables by one path through the object graph (a SavedModel by the
    shortest, e.g. trainable_variables_list/17). Returns {model/<attribute path>: key}, the
    paths through named attributes below the Keras model (the object holding resnet_model)."""
    nodes = [parse_proto(n) for n in parse_proto(ckpt.string("_CHECKPOINTABLE_OBJECT_GRAPH")).get(1, [])]
    children = [[(parse_proto(c).get(1, [0])[0], parse_proto(c).get(2, [b""])[0].decode())
                 for c in n.get(1, [])] for n in nodes]
    lists = {"variables", "trainable_variables", "non_trainable_variables", "weights",
             "trainable_weights", "non_trainable_weights", "trainable_variables_list", "keras_api"}
    roots = [i for i, ch in enumerate(children) if any(name == "resnet_model" for _, name in ch)]
    if not roots:
        raise UserError(f"{ckpt.prefix}: a tf2 checkpoint without a resnet_model")
    names, stack, seen = {}, [(roots[0], "model")], set()
    while stack:
        node, path = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for attribute in nodes[node].get(2, []):
            a = parse_proto(attribute)
            if a.get(1, [b""])[0] == b"VARIABLE_VALUE":
                names[path] = a.get(3, [b""])[0].decode()
        stack += [(child, f"{path}/{name}") for child, name in children[node] if name not in lists]
    return names


# --- The authors' variable names for our modules ---------------------------------------------


def variable_names(model, layout, head_mode="nonlinear"):
    """{TF variable name without /kernel, /gamma...: module} for every conv, BN and linear layer
    of a SimCLR model. tf2 names are paths in tf2/resnet.py's and tf2/model.py's objects; TF1
    numbers conv2d_N and batch_normalization_N inside base_model/ in the order resnet.py creates
    the layers, which is the order of this walk."""
    tf2, r = layout == "tf2", "model/resnet_model/"
    names, count = {}, {"conv2d": 0, "batch_normalization": 0}

    def add(module, path):
        if tf2:
            names[path] = module
        else:
            kind = "conv2d" if isinstance(module, nn.Conv2d) else "batch_normalization"
            names[f"base_model/{kind}{f'_{count[kind]}' if count[kind] else ''}"] = module
            count[kind] += 1

    def conv_bn(pair, path, conv_at, bn_at):
        add(pair[0], f"{path}/{conv_at}/conv2d")
        add(pair[1], f"{path}/{bn_at}/bn")

    stem, first = model.encoder.stem, r + "initial_conv_relu_max_pool"
    if isinstance(stem[0], nn.Conv2d):  # CIFAR: conv, identity, BN, identity
        conv_bn(stem, first, 0, 2)
    elif len(stem) == 4:  # ResNet-D: conv, BN, conv, BN, conv, identity, BN, max-pool
        for i, (c, b) in enumerate([(0, 1), (2, 3), (4, 6)]):
            conv_bn(stem[i], first, c, b)
    else:  # conv, identity, BN, max-pool
        conv_bn(stem[0], first, 0, 2)
    for g, stage in enumerate(model.encoder.stages):
        for b, block in enumerate(stage):
            base, bottleneck = f"{r}block_groups/{g}/layers/{b}/", isinstance(block, Bottleneck)
            if not isinstance(block.shortcut, nn.Identity):  # theirs: [pad], [pool], conv, BN
                at = 0 if len(block.shortcut) == 2 else 1 if isinstance(block.shortcut[0], SamePool) else 2
                conv_bn(block.shortcut[-2:], base + ("projection_layers" if bottleneck else
                                                    "shortcut_layers"), at, at + 1)
            if not bottleneck:  # conv, BN, conv, BN
                conv_bn(block.body[0], base + "conv2d_bn_layers", 0, 1)
                conv_bn(block.body[1:], base + "conv2d_bn_layers", 2, 3)
                continue
            body = base + "conv_relu_dropblock_layers"  # a dropblock follows every conv-BN
            conv_bn(block.body[0], body, 0, 1)
            middle = block.body[1]
            if isinstance(middle, SelectiveKernel):  # one layer, at index 3
                add(middle.streams[0], f"{body}/3/conv2d_fixed_padding/conv2d")
                add(middle.streams[1], f"{body}/3/batch_norm_relu/bn")
                add(middle.attention[1][0], f"{body}/3/conv2d_0")
                add(middle.attention[1][1], f"{body}/3/batch_norm_relu_1/bn")
                add(middle.attention[2], f"{body}/3/conv2d_1")
                conv_bn(block.body[2:], body, 5, 6)
            else:
                conv_bn(middle, body, 3, 4)
                conv_bn(block.body[2:], body, 6, 7)
    for j, layer in enumerate(model.head.layers):
        path = (f"model/_projection_head/linear_layers/{j}/" if tf2 else
                f"head_contrastive/{'l_0' if head_mode == 'linear' else f'nl_{j}'}/")
        names[path + "dense"] = layer[0]
        names[path + ("bn_relu/bn" if tf2 else "batch_normalization")] = layer[1]
    return names


def expected_shapes(names):
    """{variable: shape} the modules need, in TensorFlow's layouts (HWIO kernels, dense (in, out))."""
    shapes = {}
    for base, m in names.items():
        if isinstance(m, nn.Conv2d):
            shapes[base + "/kernel"] = tuple(m.weight.permute(2, 3, 1, 0).shape)
        elif isinstance(m, nn.Linear):
            shapes[base + "/kernel"] = (m.in_features, m.out_features)
            if m.bias is not None:
                shapes[base + "/bias"] = (m.out_features,)
        else:
            for v in ("gamma", "beta", "moving_mean", "moving_variance"):
                shapes[f"{base}/{v}"] = (m.num_features,)
    return shapes


# --- Reading a checkpoint into our network ---------------------------------------------------

# Not weights of the network: optimizer slots, step counters, v2's memory queue (the authors'
# loading notebook leaves out 'memory' too), tf2's optimizer object.
SKIPPED = re.compile(r"(^|/)(Momentum|Adam(_1)?|global_step|save_counter)$|memory|^optimizer/|"
                     r"\.OPTIMIZER_SLOT")


class Source:
    """The variables of one TF1 or tf2 checkpoint under logical names (TF1: the names; tf2: the
    object-graph paths model/...), with the prefix of the weights to use (ema_model/ or none)."""

    def __init__(self, path, ema=False):
        self.ckpt = TFCheckpoint(find_prefix(path))
        if "_CHECKPOINTABLE_OBJECT_GRAPH" in self.ckpt.entries:
            self.layout = "tf2"
            self.keys = object_graph_names(self.ckpt)
            if ema:
                raise UserError("--ema: the authors' tf2 checkpoints keep no moving average")
        else:
            self.layout = "tf1"
            self.keys = {n: n for n in self.ckpt.entries}
        self.prefix = "ema_model/" if ema else ""
        if ema and not any(n.startswith("ema_model/base_model/") for n in self.keys):
            raise UserError(f"--ema: {path} has no ema_model/ weights")
        # the weights not used: skipped names, and the other copy (online or EMA) of TF1 models
        self.unused = {n for n in self.keys if SKIPPED.search(n) or
                       (self.layout == "tf1" and n.startswith("ema_model/") != ema)}
        self.used = set()

    def name(self, logical):
        """The full name of a variable of the chosen copy (TF1 EMA: under ema_model/)."""
        return self.prefix + logical if self.layout == "tf1" else logical

    def shape(self, logical):
        key = self.keys.get(self.name(logical))
        return None if key is None else self.ckpt.entries[key]["shape"]

    def tensor(self, logical, verify_crc=False):
        return self.read(self.name(logical), verify_crc)

    def read(self, full, verify_crc=False):
        self.used.add(full)
        return self.ckpt.tensor(self.keys[full], verify_crc).float()

    def names_under(self, logical_prefix):
        start = self.name(logical_prefix)
        return {n[len(self.prefix):] if self.layout == "tf1" else n: self.shape_of(n)
                for n in self.keys if n.startswith(start) and n not in self.unused}

    def shape_of(self, full):
        return self.ckpt.entries[self.keys[full]]["shape"]


def find_prefix(path):
    """The checkpoint prefix from what a user may pass: the prefix itself, its .index or a data
    shard, a folder with a 'checkpoint' state file or one .index, or a SavedModel folder."""
    p = Path(path)
    if p.is_dir():
        if (p / "variables" / "variables.index").is_file():
            return p / "variables" / "variables"
        state = p / "checkpoint"
        if state.is_file():
            match = re.search(r'^model_checkpoint_path: "(.*)"', state.read_text(), re.M)
            if match:  # the path it records may be absolute, from the machine that trained
                return p / Path(match.group(1)).name
        indexes = sorted(p.glob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_suffix("")
        raise UserError(f"{path}: a folder without one checkpoint (found {len(indexes)} .index files)")
    return re.sub(r"(\.index|\.data-\d{5}-of-\d{5})$", "", str(p))


def infer_config(src):
    """The pretrain.Config whose network has exactly the checkpoint's variables and shapes: the
    names fix depth, stem and selective kernels, h's width fixes the width multiplier."""
    tf1 = src.layout == "tf1"
    encoder = "base_model/" if tf1 else "model/resnet_model/"
    found = src.names_under(encoder)
    if not found:
        raise UserError(f"{src.ckpt.prefix}: no {src.prefix}{encoder} variables: not a checkpoint "
                        f"of the authors' SimCLR code")
    head = "head_contrastive/" if tf1 else "model/_projection_head/linear_layers/"
    dense = (lambda j: f"{head}nl_{j}/dense/kernel") if tf1 else (lambda j: f"{head}{j}/dense/kernel")
    layers = 0
    while src.shape(dense(layers)):
        layers += 1
    linear = src.shape(f"{head}l_0/dense/kernel") if tf1 else None  # TF1's one-layer 'linear' head
    kind = "linear" if linear else "nonlinear" if layers else "none"
    out_dim = linear[1] if linear else src.shape(dense(layers - 1))[1] if layers else 128
    explained = []  # TF1 ResNet-18/34 look the same with SK (which their TF1 code cannot run)
    for arch in ARCHS:
        for sk in (0.0, 0.0625):
            for size in (224, 32):
                cfg = dict(arch=arch, sk_ratio=sk, image_size=size, proj_head=kind,
                           proj_layers=layers or 2, proj_dim=out_dim)
                with torch.device("meta"):  # names and shapes only
                    unit = build_model(Config(**cfg, width_multiplier=1.0))
                names = [n for n in expected_shapes(variable_names(unit, src.layout, kind))
                         if n.startswith(encoder)]  # in the walk's order
                if set(found) != set(names):
                    continue
                last_bn = [n for n in names if n.endswith("/gamma")][-1]  # the last block's: h
                width = found[last_bn][0] / unit.encoder.out_dim
                with torch.device("meta"):
                    model = build_model(Config(**cfg, width_multiplier=width))
                shapes = expected_shapes(variable_names(model, src.layout, kind))
                if all(shapes[n] == s for n, s in found.items()):
                    explained.append(Config(**{**PRESETS["cifar10" if size == 32 else "imagenet"],
                                               **cfg, "width_multiplier": width, "data_dir": "",
                                               "dataset": "cifar10" if size == 32 else "imagenet"}))
    if not explained:
        raise UserError(f"{src.ckpt.prefix}: the shapes of its {len(found)} encoder variables match "
                        f"no ResNet-18/34/50/101/152 (with or without selective kernels) of the "
                        f"authors' code at any width")
    return explained[0]


def load_into(model, src, cfg, verify_crc=False):
    """Copy every variable of the network into our modules, converting layouts: HWIO kernels to
    OIHW, dense kernels transposed, BN moving statistics to running_mean / running_var."""
    shapes = expected_shapes(variable_names(model, src.layout, cfg.proj_head))
    for name, shape in shapes.items():
        have = src.shape(name)
        if have is None and not name.endswith("/beta"):
            raise UserError(f"{src.ckpt.prefix}: variable {src.name(name)} is missing")
        if have is not None and tuple(have) != shape:
            raise UserError(f"{src.ckpt.prefix}: {src.name(name)} has shape {have}, the network "
                            f"needs {shape}")
    get = lambda name: src.tensor(name, verify_crc)
    with torch.no_grad():
        for base, m in variable_names(model, src.layout, cfg.proj_head).items():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(get(base + "/kernel").permute(3, 2, 0, 1))  # HWIO -> OIHW
            elif isinstance(m, nn.Linear):
                m.weight.copy_(get(base + "/kernel").T)  # (in, out) -> (out, in)
            else:
                m.weight.copy_(get(base + "/gamma"))
                if src.shape(base + "/beta") is not None:
                    m.bias.copy_(get(base + "/beta"))
                elif m.bias.requires_grad:
                    raise UserError(f"{src.ckpt.prefix}: {src.name(base)}/beta is missing")
                else:  # the last head layer: the authors' BN has no shift (center=False)
                    m.bias.zero_()
                m.running_mean.copy_(get(base + "/moving_mean"))
                m.running_var.copy_(get(base + "/moving_variance"))


def supervised_head(src, verify_crc=False):
    """(weight, bias) of the authors' head_supervised (a linear layer with bias), or None, and a
    note. With --ema: the EMA copy if the checkpoint has one, else the online one, noted."""
    base = ("head_supervised/linear_layer/dense/" if src.layout == "tf1" else
            "model/supervised_head/linear_layer/dense/")
    full, note = src.name(base), ""
    if full + "kernel" not in src.keys and base + "kernel" in src.keys:
        full, note = base, "the checkpoint has no EMA classifier: the online one is used"
    if full + "kernel" not in src.keys:
        return None, note
    return (src.read(full + "kernel", verify_crc).T, src.read(full + "bias", verify_crc)), note


def classifier_layer(path, model, inputs, asked=-1):
    """(K, why): the head layer the authors' supervised head (of `inputs` inputs) reads, or (None,
    why). The shapes tell where one layer alone has `inputs` outputs; else (every hidden layer
    has h's width) the authors' folder in the real path: finetuned_1pct and finetuned_10pct 1 (as
    v2 fine-tunes), finetuned_100pct and pretrained 0; elsewhere --ft-proj-layer must say."""
    fits = [k for k in range(len(model.head.layers) + 1)
            if (model.head.layers[k - 1][0].out_features if k else model.encoder.out_dim) == inputs]
    choices = " or ".join(filter(None, [", ".join(map(str, fits[:-1])), str(fits[-1])])) if fits else ""
    if asked >= 0:
        if asked not in fits:
            raise UserError(f"--ft-proj-layer {asked}: the supervised head takes {inputs} inputs, "
                            f"which head layer {choices or '(none)'} gives")
        return asked, ""
    if len(fits) == 1:
        return fits[0], ""
    if not fits:
        raise UserError(f"the supervised head takes {inputs} inputs: no head layer gives that many")
    folder = re.search(r"finetuned_(\d+)pct|pretrained", str(Path(path).resolve()))
    k = None if folder is None else 1 if folder.group(1) in ("1", "10") else 0
    if k in fits:
        return k, f"the classifier is on head layer {k}, as in the authors' {folder.group(0)} models"
    return None, (f"the supervised head fits head layer {choices} (each {inputs}-d) and the "
                  f"weights cannot tell which it was trained on: pass --ft-proj-layer 1 for the "
                  f"authors' finetuned_1pct and finetuned_10pct models, 0 for finetuned_100pct "
                  f"and pretrained ones")


# --- main: convert, write our format, optionally evaluate the classifier ---------------------


def convert(path, ema=False, ft_proj_layer=-1, verify_crc=False, need_classifier=False):
    """Returns (SimCLR model, Config, classifier or None, K, metadata) read from a checkpoint;
    need_classifier: a UserError where there is none."""
    src = Source(path, ema)
    cfg = infer_config(src)
    model = build_model(cfg)
    load_into(model, src, cfg, verify_crc)
    head, note = supervised_head(src, verify_crc)
    classifier = k = None
    if head is not None:
        k, why = classifier_layer(path, model, head[0].shape[1], ft_proj_layer)
        note = "; ".join(filter(None, [note, why]))
    if k is not None:
        classifier = Classifier(model, k, len(head[1]))
        with torch.no_grad():
            classifier.fc.weight.copy_(head[0])
            classifier.fc.bias.copy_(head[1])
    if need_classifier and classifier is None:
        raise UserError(note if head is not None else f"{path} has no supervised head (head_supervised)")
    leftover = sorted(set(src.keys) - src.used - src.unused)
    if leftover:
        raise UserError(f"{src.ckpt.prefix}: {len(leftover)} variable(s) this converter does not "
                        f"know, first {leftover[0]!r}; nothing written")
    step_key = next((name for name in ("global_step", "global_step/.ATTRIBUTES/VARIABLE_VALUE")
                     if name in src.ckpt.entries), None)
    step = int(src.ckpt.tensor(step_key).item()) if step_key else 0
    meta = dict(path=str(path), layout=src.layout, ema=ema, step=step, variables=len(src.used),
                skipped=len(src.unused), supervised_head=head is not None, ft_proj_layer=k,
                note=note)
    return model.eval(), cfg, classifier, k, meta


def parse_args(argv):
    parser = Parser(description=__doc__.splitlines()[0])  # errors: one line
    parser.add_argument("checkpoint", help="TF checkpoint prefix (model.ckpt-NNNN), its .index, "
                        "a folder with one, or a tf2 SavedModel folder")
    parser.add_argument("out", help="where to write this project's checkpoint (.pt)")
    parser.add_argument("--ema", action="store_true", help="the moving-average weights "
                        "(ema_model/) instead of the trained ones (TF1 checkpoints)")
    parser.add_argument("--classifier", action="store_true", help="write finetune.py's "
                        "finetuned.pt format (encoder, kept head layers, the authors' supervised "
                        "head): distill.py --teacher takes it")
    parser.add_argument("--ft-proj-layer", type=int, default=-1, help="projection-head layers "
                        "under the supervised head; -1: what the shapes or the authors' folder "
                        "(finetuned_1pct/10pct: 1, finetuned_100pct, pretrained: 0) tell, else "
                        "the conversion asks for it")
    parser.add_argument("--evaluate", default="", metavar="DATA_DIR", help="top-1/top-5 of the "
                        "supervised head on DATA_DIR/val/<synset>/* (ImageNet order: sorted synsets)")
    parser.add_argument("--verify-crc", action="store_true", help="check the crc32c of every "
                        "tensor read (pure Python, about 7 MB/s: 20 s for a ResNet-50 1x)")
    return parser.parse_args(argv)


def main(argv=None):
    def run():
        args = parse_args(argv)
        # before the work: a new file, or a conversion of the same source into this project's
        check_output(args.out, "output path", lambda p: torch.load(p, weights_only=True)[
            "converted_from"]["path"] == str(args.checkpoint))
        model, cfg, classifier, k, meta = convert(args.checkpoint, args.ema, args.ft_proj_layer,
                                                  args.verify_crc, args.classifier or args.evaluate)
        config = dataclasses.asdict(cfg)
        results = None
        if args.evaluate:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            val = load_split("folder", args.evaluate, "val", cfg.image_size, device,
                             default_workers(1))
            if len(val.classes) != classifier.fc.out_features:
                raise UserError(f"the supervised head has {classifier.fc.out_features} classes, "
                                f"{args.evaluate}/val has {len(val.classes)}")
            accuracy = evaluate(classifier.to(device), val, cfg.image_size, 256, device,
                                  default_workers(1), print)
            classifier.cpu()
            results = dict(accuracy, data_dir=args.evaluate)
            print(f"supervised head on {args.evaluate}/val: {shown(accuracy)}")
        if args.classifier:
            ft = FinetuneConfig(checkpoint=args.checkpoint, dataset=cfg.dataset, ft_proj_layer=k,
                                **{f: config[f] for f in ("arch", "width_multiplier", "sk_ratio",
                                                          "image_size")})
            state = dict(model=classifier.state_dict(), epoch=0, step=meta["step"], results=results,
                         config=dict(dataclasses.asdict(ft), pretrain=config,
                                     num_classes=classifier.fc.out_features, classes=None))
        else:
            state = dict(model=model.state_dict(), config=config, epoch=0, step=meta["step"],
                         results=results)
            if classifier is not None:  # kept beside the network, as distill.py's student.pt
                state.update(classifier=classifier.fc.state_dict(), ft_proj_layer=k,
                             num_classes=classifier.fc.out_features)
        save_checkpoint(args.out, dict(state, converted_from=meta))
        head = f"{cfg.proj_layers if cfg.proj_head == 'nonlinear' else 1} head layer(s) -> " \
               f"{cfg.proj_dim}" if cfg.proj_head != "none" else "no projection head"
        cls = (f", classifier of {classifier.fc.out_features} classes on head layer {k}"
               if classifier is not None else "")
        print(f"{meta['layout']} checkpoint{' (EMA weights)' if args.ema else ''}: {cfg.arch} "
              f"x{cfg.width_multiplier:g}{' SK' if cfg.sk_ratio else ''}, h "
              f"{model.encoder.out_dim}-d, {head}{cls}; {meta['variables']} variables read, "
              f"{meta['skipped']} skipped (optimizer, step, memory{', online' if args.ema else ', EMA'}"
              f"); wrote {args.out}{' (finetuned.pt format)' if args.classifier else ''}")
        if meta["note"]:
            left_out = classifier is None and meta["supervised_head"]
            print(f"note: {meta['note']}{'; the classifier was left out' if left_out else ''}")

    run_cli("tf_checkpoint.py", run)


if __name__ == "__main__":
    main()
