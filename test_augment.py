"""augment.py against TensorFlow, whose ops define SimCLR's augmentation (Appendix A).

Each op is checked twice: against a float64 reference written plainly, pixel by pixel, from the
TensorFlow kernel it replaces, and against TensorFlow's own outputs. Those are stored in
fixtures/tf_augment_ops.npz, written by fixtures/make_tf_augment_ops.py with tensorflow-cpu 2.21
in a scratch environment (the tests never import TensorFlow). The crop sampler is checked
against a loop over TensorFlow's algorithm fed the same uniforms (exactly) and against 26,000
boxes drawn by TensorFlow (chi-square). The last section tests the whole view.
"""
import collections
import math

import numpy as np
import pytest
import torch

import augment as A
from conftest import ROOT

TF = np.load(ROOT / "fixtures" / "tf_augment_ops.npz")
f32 = np.float32


def nchw(a):
    """TensorFlow's NHWC float32 array -> an N x C x H x W tensor."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def edge_images(seed=0):
    """4 images of 5 x 6: random pixels, then black, white, grays, primaries, ties, hues near
    the wrap-around, and (image 3) values just outside [0, 1], as bicubic overshoot gives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 5, 6, generator=g, dtype=torch.float64)
    x[0, :, 0] = torch.tensor([[0, 0, 0], [1, 1, 1], [.5, .5, .5], [1, 0, 0], [0, 1, 0],
                               [0, 0, 1]]).T
    x[1, :, 0] = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, .01], [1, .01, 0],
                               [.3, .3, .1]]).T
    x[3] = torch.rand(3, 5, 6, generator=g, dtype=torch.float64) * 1.2 - 0.1
    x[3, :, 0, :3] = torch.tensor([[-.02, -.05, -.01], [0, -.03, 0], [0, 0, 0]]).T
    return x.float()


# ---------------------------------------------------------------------------------------------
# Crop sampler: GenerateRandomCrop in sample_distorted_bounding_box_op.cc
# ---------------------------------------------------------------------------------------------


def tf_crop_box(height, width, u_ratio, u_height, u_offset):
    """One box by TensorFlow's algorithm, a plain loop in float32 as the C++ (lrintf = np.rint)."""
    min_area = f32(f32(0.08) * f32(width)) * f32(height)
    max_area = f32(f32(1.0) * f32(width)) * f32(height)
    lo, hi = f32(3 / 4), f32(4 / 3)
    uniform = lambda u, k: int(np.floor(f32(u) * f32(k)))  # random->Uniform(k): [0, k)
    for ur, uh in zip(u_ratio, u_height):
        ratio = f32(f32(ur) * f32(hi - lo)) + lo
        h = int(np.rint(np.sqrt(f32(min_area / ratio))))
        max_h = int(np.rint(np.sqrt(f32(max_area / ratio))))
        if np.rint(f32(max_h) * ratio) > width:
            max_h = int((width + 0.5 - float(f32(1e-7))) / float(ratio))
            if np.rint(f32(max_h) * ratio) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += uniform(uh, max_h - h + 1)
        w = int(np.rint(f32(h) * ratio))
        if f32(w * h) < min_area:
            h += 1
            w = int(np.rint(f32(h) * ratio))
        if f32(w * h) > max_area:
            h -= 1
            w = int(np.rint(f32(h) * ratio))
        area = f32(w * h)
        if (area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0
                or area < 1 or f32(area / f32(width * height)) < f32(0.1)):
            continue
        top = uniform(u_offset[0], height - h) if h < height else 0
        left = uniform(u_offset[1], width - w) if w < width else 0
        return [top, left, h, w]
    return [0, 0, height, width]


@pytest.mark.parametrize("height, width", [(32, 32), (224, 224), (375, 500), (500, 333),
                                           (17, 300), (5, 5)])
def test_crop_sampler_is_tensorflows_algorithm(height, width):
    """Fed the same uniforms, the batched sampler returns TF's boxes exactly (a 17 x 300 image
    mostly falls back to the whole image: no crop of 8% of it has a 3/4-4/3 aspect ratio)."""
    g = torch.Generator().manual_seed(height * width)
    u = torch.rand(2, 300, A.ATTEMPTS, generator=g)
    u_offset = torch.rand(300, 2, generator=g)
    boxes = A._crop_boxes(u[0], u[1], u_offset, height, width)
    expected = [tf_crop_box(height, width, u[0, i].tolist(), u[1, i].tolist(), u_offset[i].tolist())
                for i in range(300)]
    assert boxes.tolist() == expected


def test_crop_sampler_of_many_images_is_the_sampler_of_each():
    """One draw for a batch of images of their own sizes (a worker's batch) gives each image the
    boxes of its own call on the same uniforms."""
    g = torch.Generator().manual_seed(7)
    sizes = torch.tensor([[375, 500], [500, 333], [17, 300], [32, 32], [5, 5], [1024, 768]])
    u = torch.rand(2, len(sizes), A.ATTEMPTS, generator=g)
    u_offset = torch.rand(len(sizes), 2, generator=g)
    boxes = A._crop_boxes(u[0], u[1], u_offset, sizes[:, 0], sizes[:, 1])
    for i, (height, width) in enumerate(sizes.tolist()):
        one = A._crop_boxes(u[0, i:i + 1], u[1, i:i + 1], u_offset[i:i + 1], height, width)
        assert boxes[i].tolist() == one[0].tolist() == tf_crop_box(
            height, width, u[0, i].tolist(), u[1, i].tolist(), u_offset[i].tolist())


def test_crop_areas_are_tensorflows_not_uniform():
    """At 32 px: mean area 0.43, median 0.39-0.40, none under 10% (torchvision: 0.49, 0.49,
    2.5% under 10%); aspect ratios 3/4-4/3 up to rounding; offsets in [0, H - h)."""
    top, left, h, w = A.sample_crop_boxes(40000, 32, 32, torch.Generator().manual_seed(0)).T
    area = (h * w).float() / 1024
    assert abs(area.mean() - 0.433) < 0.01 and 0.385 < area.median() < 0.41
    assert area.min() >= 0.1 and (w / h).min() > 0.72 and (w / h).max() < 1.37
    assert ((top + h < 32) | (h == 32)).all() and ((left + w < 32) | (w == 32)).all()
    assert (top >= 0).all() and (left >= 0).all()


def chi_square(a, b):
    """Two-sample chi-square over the cells of a and b (lists of tuples), sparse cells pooled:
    (statistic, degrees of freedom)."""
    ca, cb = collections.Counter(a), collections.Counter(b)
    ka, kb = math.sqrt(len(b) / len(a)), math.sqrt(len(a) / len(b))
    stat, df, pooled = 0.0, -1, [0, 0]
    for cell in set(ca) | set(cb):
        if (ca[cell] + cb[cell]) * min(len(a), len(b)) / (len(a) + len(b)) < 5:
            pooled[0] += ca[cell]
            pooled[1] += cb[cell]
            continue
        stat += (ca[cell] * ka - cb[cell] * kb) ** 2 / (ca[cell] + cb[cell])
        df += 1
    if sum(pooled):
        stat += (pooled[0] * ka - pooled[1] * kb) ** 2 / sum(pooled)
        df += 1
    return stat, df


@pytest.mark.parametrize("height, width", [(32, 32), (224, 224), (375, 500)])
def test_crop_sampler_matches_tensorflows_own_boxes(height, width):
    """(height, width) of our boxes against TF's sample_distorted_bounding_box (10,000 at 32 px,
    8,000 at the larger sizes, binned by 8 px of height and a quarter of aspect ratio there); at
    32 px also the offsets. The bound is about p = 1e-4 for a chi-square variable."""
    key = f"crop_boxes_{height}x{width}" if height == 32 else f"crop_shapes_{height}x{width}"
    theirs = TF[key].astype(int)
    ours = A.sample_crop_boxes(50000, height, width, torch.Generator().manual_seed(1)).numpy()
    if height == 32:
        cells = lambda b: list(map(tuple, b[:, 2:]))
        offset = lambda b: [(hw, t * 4 // (32 - hw)) for t, hw in zip(b[:, 0], b[:, 2]) if hw < 32]
        stat, df = chi_square(offset(ours), offset(theirs))
        assert stat < df + 4 * math.sqrt(2 * df), (stat, df)
    else:
        theirs = np.concatenate([np.zeros_like(theirs), theirs], 1)
        cells = lambda b: [(h // 8, w * 4 // h) for h, w in b[:, 2:]]
    stat, df = chi_square(cells(ours), cells(theirs))
    assert stat < df + 4 * math.sqrt(2 * df), (stat, df)


def test_center_crop_box_is_the_authors_centre_crop():
    """rint(0.875 x shorter side), half to even (0.875 x 44 = 38.5 -> 38); offsets round up."""
    assert A.center_crop_box(375, 500, 224) == (24, 86, 328, 328)
    assert A.center_crop_box(500, 375, 224) == (86, 24, 328, 328)
    assert A.center_crop_box(256, 256, 224) == (16, 16, 224, 224)
    assert A.center_crop_box(44, 50, 40) == (3, 6, 38, 38)
    assert A.center_crop_box(32, 32, 32) == (0, 0, 32, 32)  # data.py: no crop at 32 px or less
    # ... but an image that is not square is cut to its centred square, not squashed
    assert A.center_crop_box(100, 80, 32) == (10, 0, 80, 80)
    assert A.center_crop_box(30, 50, 16) == (0, 10, 30, 30)
    image = torch.randint(0, 256, (100, 80, 3), dtype=torch.uint8)  # as decoded: H x W x 3
    view = A.center_crop_resize(image, 32)
    assert torch.equal(view, A.center_crop_resize(image[10:90], 32))  # the centre, whole


# ---------------------------------------------------------------------------------------------
# Bicubic resize: resize_bicubic_op.cc, legacy (TF1) mode
# ---------------------------------------------------------------------------------------------


def tf1_bicubic(image, box, size):
    """crop_to_bounding_box + resize_bicubic(align_corners=False, half_pixel_centers=False),
    output pixel by output pixel: positions in float32, the fractional part looked up in a
    1025-entry table of Keys' kernel with a = -0.75, taps clamped to the crop; sums in float64."""
    top, left, h, w = box
    crop = image[:, top:top + h, left:left + w].double()
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    table = [(float(f32(near(i / 1024))), float(f32(far(i / 1024 + 1)))) for i in range(1025)]

    def taps(out, length):
        loc = f32(out) * (f32(length) / f32(size))
        base = int(np.floor(loc))
        k = int(np.rint((loc - f32(base)) * 1024))
        weights = [table[k][1], table[k][0], table[1024 - k][0], table[1024 - k][1]]
        return [(min(max(base + j, 0), length - 1), wt) for j, wt in zip((-1, 0, 1, 2), weights)]

    out = torch.zeros(image.shape[0], size, size, dtype=torch.float64)
    for y in range(size):
        for x in range(size):
            out[:, y, x] = sum(wy * wx * crop[:, iy, ix] for iy, wy in taps(y, h)
                               for ix, wx in taps(x, w))
    return out


def test_crop_resize_is_tf1_resize_bicubic():
    """Down (crops of 12-20 px to 9) and up (1-7 px to 11), each image with its own box."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 20, 17, generator=g)
    for size, boxes in ((9, [[0, 0, 20, 17], [2, 3, 12, 9], [5, 0, 15, 17], [0, 4, 20, 13],
                             [8, 8, 12, 9], [1, 1, 19, 16]]),
                        (11, [[0, 0, 1, 1], [3, 4, 7, 5], [10, 2, 2, 7], [0, 0, 1, 17],
                              [13, 10, 7, 7], [4, 4, 5, 3]])):
        out = A.crop_resize(images, torch.tensor(boxes), size)
        for image, box, o in zip(images, boxes, out):
            assert torch.allclose(o.double(), tf1_bicubic(image, box, size), atol=1e-6)


def test_crop_resize_matches_tensorflow():
    """TF's crop_to_bounding_box + tf.compat.v1.image.resize_bicubic, to 8 and 19 px; the tf2
    code's tf.image.resize differs by up to 0.6 of the range on the same crops."""
    image = nchw(TF["resize_image"][None])
    boxes = torch.from_numpy(TF["resize_boxes"])
    for size in (8, 19):
        out = A.crop_resize(image.expand(len(boxes), -1, -1, -1), boxes, size)
        assert (out - nchw(TF[f"resize_v1_{size}"])).abs().max() < 1e-6
    out = A.crop_resize(image.expand(len(boxes), -1, -1, -1), boxes, 8)
    assert (out - nchw(TF["resize_v2_8"])).abs().max() > 0.1


def test_crop_resize_of_the_whole_image_at_its_size_is_the_identity():
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(A.crop_resize(x, torch.tensor([[0, 0, 32, 32]] * 3), 32), x)


def test_worker_crops_are_the_batched_crop_rounded_to_uint8():
    """random_crops_uint8 (one full-size image, as decoded: H x W x 3) and center_crop_resize
    (evaluation)."""
    image = torch.randint(0, 256, (3, 75, 100), dtype=torch.uint8)
    g = torch.Generator().manual_seed(3)
    out = A.random_crops_uint8(image.permute(1, 2, 0), 24, 1, g)[0]
    box = A.sample_crop_boxes(1, 75, 100, torch.Generator().manual_seed(3))
    expected = A.crop_resize(image[None].float(), box, 24)[0].round().clamp(0, 255)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24) and torch.equal(out.float(), expected)
    centre = torch.tensor([A.center_crop_box(75, 100, 48)])
    expected = A.crop_resize(image[None].float(), centre, 48)[0].round().clamp(0, 255)
    assert torch.equal(A.center_crop_resize(image.permute(1, 2, 0), 48).float(), expected)
    small = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(A.center_crop_resize(small.permute(1, 2, 0), 32), small)  # data.py: no crop at 32 px


@pytest.mark.parametrize("height,width,size", [(375, 500, 224), (500, 333, 224), (120, 90, 224),
                                               (40, 61, 96), (7, 300, 64), (1, 1, 16)])
def test_the_workers_banded_resize_is_the_dense_one(height, width, size):
    """resize_crop (a worker's view: the 4-tap filter in bands) against crop_resize (dense
    matrices) on 30 random crops of each image, down and up (crops smaller than the output,
    one pixel wide), to float rounding; rounded to uint8, the same pixels but where the two sit
    within float rounding of a half."""
    g = torch.Generator().manual_seed(height)
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)
    boxes = A.sample_crop_boxes(30, height, width, g)
    boxes[0] = torch.tensor([0, 0, height, width])  # the whole image
    batch = image.permute(2, 0, 1)[None].float().expand(30, -1, -1, -1)
    dense = A._dense_crop_resize(batch, boxes, size)
    # crop_resize itself resizes banded on a CPU from 80 px (and dense below)
    assert (A.crop_resize(batch, boxes, size) - dense).abs().max() <= 2e-4
    for box, want in zip(boxes.tolist(), dense):
        got = A.resize_crop(image, box, size)
        assert (got - want).abs().max() <= 2e-4, box  # of 255: float rounding
        rounded = (A._uint8_chw(A.resize_crop(image, box, size)).float() - want.round().clamp(0, 255))
        near_half = ((want - want.floor() - 0.5).abs() < 1e-3)
        assert not rounded[~near_half].any(), box


# ---------------------------------------------------------------------------------------------
# Colour: adjust_contrast, adjust_saturation, adjust_hue, rgb_to_grayscale
# ---------------------------------------------------------------------------------------------


def per_pixel(x, params, fn):
    """Apply fn(r, g, b, param) -> (r, g, b) to every pixel in float64."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for i, p in enumerate(params):
        for y in range(x.shape[2]):
            for z in range(x.shape[3]):
                out[i, :, y, z] = torch.tensor(fn(*x[i, :, y, z].double().tolist(), float(p)))
    return out


def tf_saturation(r, g, b, factor):
    """AdjustSaturationOp (CPU): rgb_to_hsv, S * factor clipped to [0, 1], hsv_to_rgb."""
    v = max(r, g, b)
    span = v - min(r, g, b)
    s = span / v if v > 0 else 0.0
    if span <= 0:
        h = 0.0
    elif r == v:
        h = (g - b) / (6 * span)
    elif g == v:
        h = (b - r) / (6 * span) + 2 / 6
    else:
        h = (r - g) / (6 * span) + 4 / 6
    h = h + 1 if h < 0 else h
    s = min(1.0, max(0.0, s * factor))
    c = s * v
    m = v - c
    dh = h * 6
    fmod = dh % 2 if dh > 0 else dh + 2  # dh in [0, 6): the kernel's while loops
    x = c * (1 - abs(fmod - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(dh)]
    return [ch + m for ch in rgb]


def tf_hue(r, g, b, delta):
    """AdjustHueOp (CPU): hue in [0, 6) from the ordered channels, shifted, back with min/max."""
    if r < g:
        order = (g, r, b, 1) if b < r else (b, g, r, 3) if b > g else (g, b, r, 2)
    else:
        order = (r, g, b, 0) if b < g else (b, r, g, 4) if b > r else (r, b, g, 5)
    v_max, v_mid, v_min, category = order
    if v_max == v_min:
        h = 0.0
    else:
        ratio = (v_mid - v_min) / (v_max - v_min)
        h = category + (ratio if category % 2 == 0 else 1 - ratio)
    h = (h + delta * 6) % 6
    category = int(h)
    ratio = h - category if category % 2 == 0 else 1 - (h - category)
    mid = v_min + ratio * (v_max - v_min)
    return [(v_max, mid, v_min), (mid, v_max, v_min), (v_min, v_max, mid),
            (v_min, mid, v_max), (mid, v_min, v_max), (v_max, v_min, mid)][category]


def test_adjust_contrast_is_tensorflows_per_channel_formula():
    x, f = edge_images(), torch.tensor([0.2, 1.0, 1.8, 0.5])
    mean = x.double().mean((2, 3), keepdim=True)
    expected = (x.double() - mean) * f.double().view(-1, 1, 1, 1) + mean
    assert (A.adjust_contrast(x, f) - expected).abs().max() < 1e-6


def test_adjust_saturation_is_tensorflows_hsv_round_trip():
    x, f = edge_images(), torch.tensor([0.0, 0.6, 1.8, 3.0])
    assert (A.adjust_saturation(x, f) - per_pixel(x, f, tf_saturation)).abs().max() < 1e-6


@pytest.mark.parametrize("deltas", [[-0.2, 0.05, 0.2, 0.13], [0.5, -0.5, 0.0, -0.37]])
def test_adjust_hue_is_tensorflows_hue_rotation(deltas):
    x, d = edge_images(), torch.tensor(deltas)
    assert (A.adjust_hue(x, d) - per_pixel(x, d, tf_hue)).abs().max() < 1e-6


def test_to_grayscale_and_brightness():
    x = edge_images()
    gray = x[:, :1] * 0.2989 + x[:, 1:2] * 0.5870 + x[:, 2:] * 0.1140
    assert torch.equal(A.to_grayscale(x), gray.expand_as(x))
    f = torch.tensor([0.0, 0.5, 1.0, 1.8])
    assert torch.equal(A.adjust_brightness(x, f), x * f.view(-1, 1, 1, 1))


def test_colour_ops_match_tensorflow():
    """TF's kernels on 5 images of 6 x 7 (edge pixels, one image overshooting [0, 1]).

    One pixel differs, on purpose: TF's CPU saturation kernel turns (0.9, 0.1, 0.1000001) gray,
    because its hue (g - b) / 6 / range + 1 rounds to 1.0 in float32 and lands in a seventh
    sector that the kernel maps to no colour; XLA's version of the op and ours keep it red."""
    x = nchw(TF["colour_images"])
    out = A.adjust_contrast(x, torch.from_numpy(TF["contrast_factors"]))
    assert (out - nchw(TF["contrast"])).abs().max() < 1e-6
    out = A.adjust_hue(x, torch.from_numpy(TF["hue_deltas"]))
    assert (out - nchw(TF["hue"])).abs().max() < 1e-6
    assert torch.equal(A.to_grayscale(x)[:, :1], nchw(TF["grayscale"]))
    ours, theirs = A.adjust_saturation(x, torch.from_numpy(TF["saturation_factors"])), nchw(TF["saturation"])
    differs = (ours - theirs).abs().amax(1) > 1e-6
    assert differs.nonzero().tolist() == [[1, 0, 2]]
    assert torch.allclose(theirs[1, :, 0, 2], torch.tensor(0.5)) and ours[1, 0, 0, 2] > 0.89
    uint8 = torch.arange(256, dtype=torch.uint8).float() * (1 / 255)  # convert_image_dtype
    assert torch.equal(uint8, torch.from_numpy(TF["uint8_to_float"]))


def jitter_reference(x, factors, order, applied):
    """The authors' loop, one image at a time: for each round, its op, then a clip."""
    ops = [A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue]
    out = x.clone()
    for i in range(len(x)):
        if applied[i]:
            for k in order[:, i].tolist():
                out[i:i + 1] = ops[k](out[i:i + 1], factors[k][i:i + 1]).clamp(0, 1)
    return out


def test_jitter_applies_each_images_ops_in_its_own_order():
    """Both paths (sub-batches on the CPU, whole batch with a 0/1 choice elsewhere)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 5, 6, generator=g) * 1.1 - 0.05
    factors = [torch.rand(12, generator=g) + 0.4 for _ in range(3)] + [torch.rand(12, generator=g) - 0.5]
    order = torch.rand(4, 12, generator=g).argsort(0)
    applied = torch.rand(12, generator=g) < 0.8
    expected = jitter_reference(x, factors, order, applied)
    for sub_batches in (True, False):
        out = A._jitter_in_order(x, factors, order, applied, sub_batches=sub_batches)
        assert (out - expected).abs().max() < 1e-6
    assert torch.equal(out[~applied], x[~applied])  # not jittered, not clipped


def test_color_jitter_factors_are_per_image_in_the_authors_ranges():
    """On a gray image only brightness acts: 0.5 * U(0.6, 1.4) at s = 0.5; 20% of the images are
    left alone."""
    x = torch.full((4000, 3, 1, 1), 0.5)
    g = torch.Generator().manual_seed(0)
    out = A.color_jitter(x, 0.5, p=0.8, generator=g)[:, 0, 0, 0]
    assert abs((out == 0.5).float().mean() - 0.2) < 0.03
    assert 0.3 <= out.min() < 0.305 and 0.695 < out.max() <= 0.7


# ---------------------------------------------------------------------------------------------
# Blur: separable Gaussian, depthwise_conv2d with 'SAME' padding
# ---------------------------------------------------------------------------------------------


def test_gaussian_blur_is_a_zero_padded_gaussian_per_image():
    x, sigma = torch.rand(3, 3, 7, 9), torch.tensor([0.1, 1.0, 2.0])
    for kernel_size, radius in ((3, 1), (4, 2), (22, 11)):
        out = A.gaussian_blur(x, sigma, kernel_size)
        padded = torch.nn.functional.pad(x.double(), (radius,) * 4)
        for i, s in enumerate(sigma.tolist()):
            taps = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * s * s)).double()
            k = torch.outer(taps, taps) / taps.sum() ** 2
            for y in range(7):
                for z in range(9):
                    window = padded[i, :, y:y + 2 * radius + 1, z:z + 2 * radius + 1]
                    assert torch.allclose(out[i, :, y, z].double(), (window * k).sum((1, 2)), atol=1e-6)


def test_gaussian_blur_matches_tensorflow():
    x, sigma = nchw(TF["blur_images"]), torch.from_numpy(TF["blur_sigmas"])
    for kernel_size in (3, 10):
        assert (A.gaussian_blur(x, sigma, kernel_size) - nchw(TF[f"blur_{kernel_size}"])).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# The whole view
# ---------------------------------------------------------------------------------------------


def uint8_batch(n, height, width, seed=0):
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_views_are_float_images_in_the_unit_range_and_differ():
    images = uint8_batch(16, 40, 48)
    augment = A.SimCLRAugmentation(32, strength=0.5, blur=True)
    v1, v2 = augment(images), augment(images)
    assert v1.shape == v2.shape == (16, 3, 32, 32) and v1.dtype == torch.float32
    assert v1.min() >= 0 and v1.max() <= 1 and not torch.equal(v1, v2)


def test_identical_images_get_different_views():
    images = uint8_batch(1, 32, 32).expand(8, -1, -1, -1)
    views = A.SimCLRAugmentation(32, strength=0.5)(images)
    assert all(not torch.equal(views[i], views[j]) for i in range(8) for j in range(i))


def test_the_two_views_of_an_image_are_independent():
    """Brightness only acts on gray images: the two views' brightness factors are uncorrelated."""
    images = torch.full((3000, 3, 4, 4), 128, dtype=torch.uint8)
    augment = A.SimCLRAugmentation(4, crop=False, flip=False, gray=False, strength=0.5)
    g = torch.Generator().manual_seed(0)
    m1, m2 = augment(images, generator=g).mean((1, 2, 3)), augment(images, generator=g).mean((1, 2, 3))
    assert abs(torch.corrcoef(torch.stack([m1, m2]))[0, 1]) < 0.06 and m1.std() > 0.05


def test_without_crop_and_colour_a_view_is_the_image_up_to_a_flip():
    images = uint8_batch(64, 32, 32)
    x = images.float() / 255
    view = A.SimCLRAugmentation(32, crop=False, jitter=False, gray=False)(
        images, generator=torch.Generator().manual_seed(0))
    same = [(v - x[i]).abs().max() < 1e-7 for i, v in enumerate(view)]
    mirrored = [(v - x[i].flip(-1)).abs().max() < 1e-7 for i, v in enumerate(view)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(same) < 54


def test_cropped_batches_keep_their_geometry():
    """cropped=True (the workers cropped already): colour and flip only, so a horizontal ramp
    stays a monotone ramp."""
    ramp = (torch.linspace(0, 255, 24).round().to(torch.uint8)).repeat(20, 3, 24, 1)
    views = A.SimCLRAugmentation(24, strength=1.0)(ramp, cropped=True)
    assert views.shape == (20, 3, 24, 24)
    row = views.mean(1)[:, 12]
    steps = row[:, 1:] - row[:, :-1]
    assert ((steps >= -1e-6).all(1) | (steps <= 1e-6).all(1)).all()
    with pytest.raises(ValueError, match="without the crop"):
        A.SimCLRAugmentation(24, crop=False)(uint8_batch(2, 30, 30))


def test_augment_names():
    assert A.parse_augment("crop,color") == dict(crop=True, flip=True, jitter=True, gray=True)
    assert A.parse_augment("flip,gray") == dict(crop=False, flip=True, jitter=False, gray=True)
    assert A.parse_augment("") == dict(crop=False, flip=False, jitter=False, gray=False)
    with pytest.raises(ValueError, match="--augment: unknown cutout; use crop, flip"):
        A.parse_augment("crop,cutout")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_never_wait_for_the_device():
    images = uint8_batch(64, 48, 40).cuda()
    augment = A.SimCLRAugmentation(32, strength=0.5, blur=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = augment(images), augment(images[:, :, :32, :32], cropped=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda and v.shape == (64, 3, 32, 32) for v in views)
