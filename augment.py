"""SimCLR's data augmentation t ~ T (v1 Sec. 3 and Appendix A), as batched tensor code.

A view is a random crop resized to the output size, a horizontal flip, a colour distortion
(brightness, contrast, saturation and hue in an order drawn per image, then grayscale) and, on
ImageNet, a Gaussian blur. Appendix A and the authors' code (data_util.py) call TensorFlow ops,
so TensorFlow's kernels are the definition: each function reproduces one, named in its
docstring (test_augment.py: against float64 loops over the kernels' formulas and TensorFlow's
outputs). torchvision's differ: other crops, contrast and saturation blended with grayscale.
Each image draws its own parameters on the input's device, and the host never waits for it:

    augment = SimCLRAugmentation(32, strength=0.5)       # the CIFAR-10 recipe
    view1, view2 = augment(images), augment(images)      # uint8 n x 3 x H x W -> float [0, 1]

Full-resolution images are cropped in the loader workers (random_crops_uint8(image, 224,
views=2)) and the device does the rest: SimCLRAugmentation(224, blur=True)(crops, cropped=True).

Departures from the authors' code, on purpose: the blur's sigma is drawn per image (the paper's
wording; their code draws one per batch); worker crops are rounded to uint8 (0.5/255 at most);
TF's CPU saturation kernel's slip (a pixel turned gray where red is the max and green 1e-7
below blue) is not copied.
"""
import functools
from dataclasses import dataclass

import torch

# --- Crop: tf.image.sample_distorted_bounding_box, then tf.image.resize_bicubic --------------

AREA_RANGE = (0.08, 1.0)  # fraction of the image (data_util.crop_and_resize)
ASPECT_RANGE = (3 / 4, 4 / 3)  # crop width / height, for a square output
MIN_COVERED = 0.1  # min_object_covered: a crop must hold 10% of the image, which beats 0.08
ATTEMPTS = 100  # max_attempts; the whole image if every attempt fails
CROP_PROPORTION = 0.875  # evaluation: centre crop of 87.5% of the shorter side (ImageNet)
CPU_CHUNK_PIXELS = 2 ** 17  # a CPU batch goes through in chunks of 128 32-px or 2 224-px images


def _f32(value):
    """value rounded to float32, as TensorFlow stores a float attribute (0.1 -> 0.100000001)."""
    return torch.tensor(value, dtype=torch.float32).item()


def sample_crop_boxes(n, height, width, generator=None, device=None):
    """n random crops (top, left, height, width), n x 4, of a height x width image (or n images:
    n heights and widths): TensorFlow's GenerateRandomCrop with the authors' arguments, its 100
    attempts drawn for all n at once. The areas are not uniform (at 32 px: mean 0.43, none < 0.1).
    """
    u = torch.rand(2, n, ATTEMPTS, generator=generator, device=device)
    u_offset = torch.rand(n, 2, generator=generator, device=device)
    return _crop_boxes(u[0], u[1], u_offset, height, width)


def _crop_boxes(u_ratio, u_height, u_offset, height, width):
    """GenerateRandomCrop on given uniforms (n x attempts, n x attempts, n x 2), in float32 as TF;
    height, width: ints, or n each."""
    height = torch.as_tensor(height, device=u_ratio.device).reshape(-1, 1)  # n or 1 x 1
    width = torch.as_tensor(width, device=u_ratio.device).reshape(-1, 1)
    min_area = torch.tensor(AREA_RANGE[0]) * width * height  # float32, as the kernel
    max_area = torch.tensor(AREA_RANGE[1]) * width * height
    lo, hi = _f32(ASPECT_RANGE[0]), _f32(ASPECT_RANGE[1])
    ratio = u_ratio * _f32(hi - lo) + lo  # aspect ratio of each attempt, uniform
    # Heights from the area bounds (lrintf rounds half to even, as torch.round); when the
    # tallest crop's rounded width overflows, TF takes the tallest height whose width fits.
    h_lo = torch.sqrt(min_area / ratio).round()
    h_hi = torch.sqrt(max_area / ratio).round()
    fit = ((width + 0.5 - _f32(1e-7)) / ratio.double()).floor().float()  # double, as in C++
    fit = fit - ((fit * ratio).round() > width).float()
    h_hi = torch.minimum(torch.where((h_hi * ratio).round() > width, fit, h_hi), height)
    h_lo = torch.minimum(h_lo, h_hi)
    h = h_lo + (u_height * (h_hi - h_lo + 1)).floor()  # uniform over the allowed integers
    w = (h * ratio).round()
    h = h + (w * h < min_area).float()  # rounding made it too small: one row more,
    w = (h * ratio).round()
    h = h - (w * h > max_area).float()  # too large: one row less
    w = (h * ratio).round()
    area = w * h
    valid = ((area >= min_area) & (area <= max_area) & (w <= width) & (h <= height) & (w > 0)
             & (h > 0) & (area / (width * height).float() >= _f32(MIN_COVERED)))
    first = valid.int().argmax(1, keepdim=True)  # the first valid attempt (argmax: first max)
    found = valid.any(1)
    height, width = height[:, 0].float(), width[:, 0].float()
    h = torch.where(found, h.gather(1, first)[:, 0], height)
    w = torch.where(found, w.gather(1, first)[:, 0], width)
    # random->Uniform(H - h) is in [0, H - h): a smaller crop never touches the bottom or right
    top = (u_offset[:, 0] * (height - h)).floor()
    left = (u_offset[:, 1] * (width - w)).floor()
    return torch.stack([top, left, h, w], 1).long()


def center_crop_box(height, width, size, proportion=CROP_PROPORTION):
    """The evaluation crop (data_util.center_crop): a centred square of rint(proportion x the
    shorter side), offsets rounded up; at size <= 32 the whole image (its centred square), as the
    authors' data.py. Returns 4 ints."""
    side = min(height, width) if size <= 32 else int(
        (torch.tensor(proportion) * min(height, width)).round())
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def _keys_cubic(x, a=-0.75):
    """The cubic convolution kernel at distance 0 <= x <= 2 (Keys 1981; TF's legacy a = -0.75)."""
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, far)


# Keys' kernel at the 1025 fractional positions resize_bicubic_op.cc tabulates: 1025 x 4 weights
# of the taps at -1, 0, 1, 2 from a position's floor
_FRACTION = torch.arange(1025, dtype=torch.float64) / 1024
_TABLE = _keys_cubic(torch.stack([1 + _FRACTION, _FRACTION, 1 - _FRACTION, 2 - _FRACTION], -1)).float()


def _taps(start, length, size):
    """The bicubic taps of crops [start, start + length) of a line resized to size, as
    resize_bicubic_op.cc (legacy scaler): (input positions n x size x 4, weights n x size x 4)."""
    scale = length.float() / size  # in / out, float32
    loc = torch.arange(size, device=start.device) * scale[:, None]  # n x size, no half-pixel
    base = loc.floor()
    weights = _TABLE.to(start.device)[((loc - base) * 1024).round().long()]  # TF's table lookup
    taps = base.long()[..., None] + torch.arange(-1, 3, device=start.device)  # n x size x 4
    # TF crops, then clamps taps to the crop: the border pixel repeats, nothing outside is read
    return torch.minimum(taps.clamp(min=0), (length - 1)[:, None, None]) + start[:, None, None], weights


def _resize_matrix(start, length, size, extent):
    """n x size x extent: row o holds the bicubic weights (_taps) of output pixel o over the line."""
    taps, weights = _taps(start, length, size)
    return torch.zeros(len(start), size, extent, device=start.device).scatter_add_(2, taps, weights)


def crop_resize(images, boxes, size):
    """Crop each image to its box (top, left, height, width) and resize it to size x size, not
    clipped: n x C x H x W float -> n x C x size x size.

    tf.image.crop_to_bounding_box then tf.compat.v1.image.resize_bicubic, as the TF1 code that
    made the v1 results and the released checkpoints: no half-pixel centres, a = -0.75, taps
    clamped to the crop, positions quantised to 1/1024 (the tf2/ code's tf.image.resize differs
    by 4.7/255 on average on CIFAR-10 crops). On a CPU from BANDED_FROM px up, image by image
    (resize_crop), where the dense products cost several times more.
    """
    if images.device.type == "cpu" and size >= BANDED_FROM:
        return torch.stack([resize_crop(image.permute(1, 2, 0), box, size)
                            for image, box in zip(images, boxes.tolist())])
    return _dense_crop_resize(images, boxes, size)


def _dense_crop_resize(images, boxes, size):
    """crop_resize as two batched products with dense resize matrices."""
    _, _, height, width = images.shape
    rows = _resize_matrix(boxes[:, 0], boxes[:, 2], size, height)  # n x S x H
    cols = _resize_matrix(boxes[:, 1], boxes[:, 3], size, width)  # n x S x W
    return _separable(images, rows, cols)


def _separable(x, rows, cols):
    """rows_i @ x_ic @ cols_i^T for every image i and channel c: a separable linear filter, as
    two batched matrix products (n x C x H x W, n x P x H, n x Q x W -> n x C x P x Q). Needs
    full float32 matmuls: outside autocast, without TF32 (torch's defaults)."""
    n, c, height, width = x.shape
    out = x.reshape(n, c * height, width) @ cols.transpose(1, 2)  # n x (C H) x Q
    return rows[:, None] @ out.view(n, c, height, cols.shape[1])  # n x C x P x Q


# A loader worker's crops, one image at a time: the same filter as a banded product (a dense one
# costs 60 times the 4 taps' work at 224 px), in blocks of outputs, each reading the input span
# its taps reach, cached by line length.
BLOCK = 8
BANDED_FROM = 80  # px: crop_resize's output size from which a CPU resizes image by image


@functools.lru_cache(maxsize=4096)
def _banded(length, size):
    """A line of length pixels resized to size, as blocks of BLOCK outputs: (their weights over
    the span of input each block reads, nb x BLOCK x span; the input pixel of each span row,
    nb * span)."""
    taps, weights = (t[0] for t in _taps(torch.zeros(1, dtype=torch.long), torch.tensor([length]), size))
    pad = -size % BLOCK  # the last block's missing outputs read its last pixel with weight 0
    taps = torch.cat([taps, taps[-1:].expand(pad, 4)])
    weights = torch.cat([weights, weights.new_zeros(pad, 4)])
    first = taps[::BLOCK, 0]  # taps only move forward: each block's first is its lowest
    local = taps - first.repeat_interleave(BLOCK)[:, None]
    span = int(local.max()) + 1
    blocks = torch.zeros(len(taps), span).scatter_add_(1, local, weights)
    reads = (first[:, None] + torch.arange(span)).clamp(max=length - 1).flatten()
    return blocks.view(-1, BLOCK, span), reads


def resize_crop(image, box, size):
    """crop_resize of one box of an H x W x C image (uint8 or float), as loader workers run it:
    float C x size x size, equal to crop_resize's to float rounding."""
    top, left, h, w = box
    c = image.shape[2]
    rows, reads = _banded(h, size)
    x = image[:, left:left + w].index_select(0, reads + top).float()  # nb*span x w x C
    t = torch.bmm(rows, x.view(len(rows), -1, w * c)).view(-1, w * c)[:size]  # S(y) x (w C)
    t = t.t().contiguous().view(w, c * size)  # the lines of the second pass: w x (C S(y))
    cols, reads = _banded(w, size)
    t = torch.bmm(cols, t.index_select(0, reads).view(len(cols), -1, c * size))  # S(x)' x (C S(y))
    return t.view(-1, c, size)[:size].permute(1, 2, 0)  # C x S(y) x S(x)


def _uint8_chw(resized):
    """resize_crop's float C x y x x as uint8: rounding (and clipping the bicubic overshoot) is
    the one departure from TF, which keeps floats: 0.5/255 at most."""
    return resized.round().clamp_(0, 255).to(torch.uint8)


def random_crops_uint8(images, size, views=1, generator=None):
    """`views` random crops of each uint8 image H x W x 3 (a list, or one) -> uint8 images x views
    x 3 x size x size (or views x ...), one draw of the sampler for all: the loader workers'."""
    one = torch.is_tensor(images)
    images = [images] if one else images
    boxes = view_boxes(images, views, generator).tolist()
    out = torch.empty(len(boxes), 3, size, size, dtype=torch.uint8)
    for i, box in enumerate(boxes):  # rounded as _uint8_chw, straight into the batch
        out[i].copy_(resize_crop(images[i // views], box, size).round_().clamp_(0, 255))
    out = out.view(len(images), views, 3, size, size)
    return out[0] if one else out


def view_boxes(images, views, generator=None, device=None):
    """The crop boxes of `views` random views of each image H x W x C, one draw of the sampler
    for all: len(images) * views x 4, image by image (workers and --decode device alike)."""
    sides = torch.tensor([image.shape[:2] for image in images]).repeat_interleave(views, 0)
    return sample_crop_boxes(len(sides), sides[:, 0], sides[:, 1], generator, device)


def center_crop_resize(image, size, proportion=CROP_PROPORTION):
    """The evaluation view (data_util.preprocess_for_eval) of a uint8 image H x W x 3 -> uint8
    3 x size x size; a 32 px CIFAR image comes back as it is (a same-size resize is exact)."""
    box = center_crop_box(image.shape[0], image.shape[1], size, proportion)
    return _uint8_chw(resize_crop(image, box, size))


# --- Flip: tf.image.random_flip_left_right ---------------------------------------------------


def random_flip(x, generator=None):
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(x), 1, 1, 1, generator=generator, device=x.device) < 0.5
    return torch.lerp(x, x.flip(-1), flip.to(x.dtype))  # lerp by 0/1: exact, faster than where


# --- Colour distortion: data_util.color_jitter (random order) and to_grayscale ---------------


def _per_image(value, x):
    """The ops take x n x 3 x H x W and n values (one per image) and do not clip, unless the TF
    op does (adjust_saturation clips S): color_jitter clips after each op, as the authors."""
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def adjust_brightness(x, factor):
    """The authors' brightness, x * factor: the default of both codes (the v1 paper's pseudocode
    and tf2's 'simclrv1' option add a shift instead)."""
    return x * _per_image(factor, x)


def adjust_contrast(x, factor):
    """tf.image.adjust_contrast: (x - mean) * factor + mean, each channel's mean over the image
    (torchvision uses the grayscale mean instead)."""
    mean = x.mean((2, 3), keepdim=True)  # n x 3 x 1 x 1
    return (x - mean) * _per_image(factor, x) + mean


def adjust_saturation(x, factor):
    """tf.image.adjust_saturation: to HSV, S * factor clipped to [0, 1], back to RGB. Hue and
    value are kept, so x' = V - (V - x) * S' / S, without the round trip; S = 0 where V <= 0."""
    tiny = torch.finfo(x.dtype).tiny
    v = x.amax(1, keepdim=True)  # n x 1 x H x W
    s = (v - x.amin(1, keepdim=True)) / v.clamp(min=tiny)
    ratio = (s * _per_image(factor, x)).clamp(0, 1) / s.clamp(min=tiny)  # S' / S, 0 where S = 0
    return v - (v - x) * ratio


def adjust_hue(x, delta):
    """tf.image.adjust_hue: the hue (in turns) rotated by delta, max and min kept (AdjustHueOp):
    H in sixths of a turn as TF's rgb_to_hv_range, back with HSV's piecewise-linear curves."""
    r, g, b = x.unbind(1)  # n x H x W each
    v, lo = x.amax(1), x.amin(1)
    span = v - lo
    inv = 1 / span.clamp(min=torch.finfo(x.dtype).tiny)  # grays: H = 0, span 0 keeps them gray
    h = (r - g) * inv + 4  # blue is the max
    h = h + (g == v) * ((b - r) * inv + 2 - h)  # green (wins over blue, as TF's branches)
    h = h + (r == v) * ((g - b) * inv - h)  # red
    h = torch.remainder(h + 6 * _per_image(delta, x)[:, 0], 6)  # rotated, in [0, 6]
    # red rises from the min where green and blue fall from the max (H = 0 and 6 agree)
    red = lo + span * ((h - 3).abs() - 1).clamp(0, 1)
    green = v - span * ((h - 2).abs() - 1).clamp(0, 1)
    blue = v - span * ((h - 4).abs() - 1).clamp(0, 1)
    return torch.stack([red, green, blue], 1)


def to_grayscale(x):
    """tf.image.rgb_to_grayscale (weights 0.2989, 0.5870, 0.1140), tiled to 3 channels."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.5870 + b * 0.1140)[:, None].expand_as(x)


def color_jitter(x, strength, generator=None, p=1.0):
    """data_util.color_jitter of strength s on each image with probability p (0.8 in the recipe):
    brightness, contrast and saturation factors ~ U(1 - 0.8s, 1 + 0.8s) (brightness from max(0,
    1 - 0.8s)), hue shift ~ U(-0.2s, 0.2s), in an order drawn per image, clipping after each op.
    """
    if not 0 <= strength <= 1.25:  # as tf.image.random_contrast: a factor may not go below 0
        raise ValueError(f"colour strength {strength} outside [0, 1.25]")
    u = torch.rand(9, len(x), generator=generator, device=x.device)
    s = 0.8 * strength
    factors = [max(1 - s, 0) + (1 + s - max(1 - s, 0)) * u[0], 1 - s + 2 * s * u[1],
               1 - s + 2 * s * u[2], (2 * u[3] - 1) * 0.2 * strength]
    order = u[4:8].argsort(0)  # 4 x n: a uniform random permutation of the ops per image
    return _jitter_in_order(x, factors, order, u[8] < p)


def _jitter_in_order(x, factors, order, applied, sub_batches=None):
    """Round r applies op order[r, i] to image i where applied[i], clipping each result. On the
    CPU each op runs on its images only; on a GPU (where sub-batch sizes would make the host
    wait) on the whole batch, each image keeping its own by an exact 0/1 lerp."""
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    if sub_batches is None:
        sub_batches = x.device.type == "cpu"
    x = x.clone()
    for step in order:  # step[i]: the op that image i takes in this round
        mine = [(step == k) & applied for k in range(len(ops))]
        if sub_batches:  # in place: the images of a round's ops are disjoint
            for op, factor, m in zip(ops, factors, mine):
                i = m.nonzero()[:, 0]
                x.index_copy_(0, i, op(x.index_select(0, i), factor[i]).clamp(0, 1))
        else:
            out = x
            for op, factor, m in zip(ops, factors, mine):
                out = torch.lerp(out, op(x, factor).clamp(0, 1), m.to(x.dtype).view(-1, 1, 1, 1))
            x = out
    return x


# --- Blur: data_util.gaussian_blur / batch_random_blur (ImageNet only) -----------------------


def gaussian_blur(x, sigma, kernel_size):
    """data_util.gaussian_blur: a separable Gaussian of std sigma (per image), 2 * (kernel_size //
    2) + 1 taps, zero 'SAME' padding (borders darken as in TF), as products with banded matrices
    (faster than a grouped convolution on a CPU, and float32 on CUDA, not TF32)."""
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-taps ** 2 / (2 * _per_image(sigma, x).view(-1, 1) ** 2))  # n x K
    kernel = kernel / kernel.sum(1, keepdim=True)

    def band(size):  # n x size x size: output pixel i takes input pixel j with tap j - i
        i = torch.arange(size, device=x.device)
        tap = i[None, :] - i[:, None] + radius
        return kernel[:, tap.clamp(0, 2 * radius)] * ((tap >= 0) & (tap <= 2 * radius))

    return _separable(x, band(x.shape[2]), band(x.shape[3]))


# --- The pipeline: data_util.preprocess_for_train, then model.py's batch_random_blur ---------


def parse_augment(augment):
    """--augment's comma-separated names -> SimCLRAugmentation's switches: crop (random crop and
    flip), flip, jitter, gray, color (= jitter,gray). Unknown names raise ValueError."""
    names = set(augment.replace("color", "jitter,gray").split(",")) - {""}
    unknown = names - {"crop", "flip", "jitter", "gray"}
    if unknown:
        raise ValueError(f"--augment: unknown {', '.join(sorted(unknown))}; "
                         "use crop, flip, jitter, gray, color")
    return dict(crop="crop" in names, flip=bool(names & {"crop", "flip"}),
                jitter="jitter" in names, gray="gray" in names)


@dataclass
class SimCLRAugmentation:
    """One random view of each image of a batch; two calls give Algorithm 1's two views.

    Fine-tuning and linear evaluation use crop and flip only (jitter=False, gray=False).
    """

    size: int  # output side, px
    crop: bool = True  # random crop resized to size (sample_distorted_bounding_box, bicubic)
    flip: bool = True  # left-right with p 0.5
    jitter: bool = True  # colour jitter with p 0.8
    gray: bool = True  # grayscale with p 0.2
    strength: float = 1.0  # colour strength s: 1.0 ImageNet, 0.5 CIFAR-10
    blur: bool = False  # Gaussian blur with p 0.5, sigma ~ U(0.1, 2.0): ImageNet only
    base_crop: bool = False  # Fig. 5's protocol: the input is the crop both views share, the rest follows

    def __call__(self, images, cropped=False, generator=None):
        """uint8 n x 3 x H x W (any device) -> float32 n x 3 x size x size in [0, 1]. cropped: the
        images are crops already (the workers'; with base_crop the one both views share, which
        crop crops again)."""
        if self.base_crop and not cropped:
            raise ValueError("base_crop: pass the views' shared crop, cropped=True (ViewLoader)")
        n, _, height, width = images.shape
        chunk = max(1, CPU_CHUNK_PIXELS // (height * width))
        if images.device.type == "cpu" and n > chunk:  # keep the temporaries in cache
            return torch.cat([self(part, cropped, generator) for part in images.split(chunk)])
        coin = lambda p: (torch.rand(n, 1, 1, 1, generator=generator, device=images.device)
                          < p).float()
        with torch.autocast(images.device.type, enabled=False):  # TF's ops are float32
            x = images.float() * (1 / 255)  # tf.image.convert_image_dtype
            if self.crop and (self.base_crop or not cropped):
                boxes = sample_crop_boxes(n, *x.shape[2:], generator, images.device)
                x = crop_resize(x, boxes, self.size)
            if x.shape[2:] != (self.size, self.size):
                raise ValueError(f"{height} x {width} images make no {self.size} px views "
                                 "without the crop")
            if self.flip:
                x = random_flip(x, generator)
            if self.jitter:
                x = color_jitter(x, self.strength, generator, p=0.8)
            if self.gray:
                x = torch.lerp(x, to_grayscale(x), coin(0.2))
            x = x.clamp(0, 1)
            if self.blur:  # the authors draw one sigma per batch; the paper samples it per image
                sigma = 0.1 + 1.9 * torch.rand(n, generator=generator, device=images.device)
                x = torch.lerp(x, gaussian_blur(x, sigma, self.size // 10), coin(0.5)).clamp(0, 1)
        return x
