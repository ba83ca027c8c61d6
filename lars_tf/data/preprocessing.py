"""Pure image preprocessing: JPEG bytes in, normalised tensors out (TensorFlow only).

Training: Inception-style random-resized crop decoded straight from the JPEG (only the
crop window's pixels are decoded, and at 1/2, 1/4 or 1/8 scale by the decoder's DCT
scaling when the window is that many times larger than the output), random flip, both
drawn from a stateless seed that the pipeline derives from (seed, rank, epoch, position),
so ranks draw differently and a run is reproducible. Eval: the central 87.5%
(size / (size + 32)) of the shorter side, decoded from the JPEG, resized. Both as in the
ResNet recipes.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

# ImageNet per-channel mean and std on the 0-255 scale.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
MAX_ATTEMPTS = 10  # window draws before the central crop (TensorFlow's reference value)


def is_valid_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
    """Cheap structural check without decoding: starts with SOI (FFD8) and ends with EOI
    (FFD9). Catches non-JPEG data and truncated files."""
    n = tf.strings.length(image_bytes)
    tail = tf.strings.substr(image_bytes, tf.maximum(n - 2, 0), 2)
    return tf.logical_and(tf.io.is_jpeg(image_bytes), tf.equal(tail, b"\xff\xd9"))


def _center_window(height, width, size: int):
    """``(y, x, side, side)``: the central ``size / (size + 32)`` of the shorter side."""
    side = tf.cast(size / (size + 32) * tf.cast(tf.minimum(height, width), tf.float32),
                   tf.int32)
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


DCT_RATIOS = (1, 2, 4, 8)  # the scales libjpeg decodes at directly (TensorFlow's ``ratio``)


def dct_ratio(height: tf.Tensor, width: tf.Tensor, size: int) -> tf.Tensor:
    """The index in ``DCT_RATIOS`` of the largest ratio ``r`` with ``min(height, width) >=
    r * size``: decoding a window at ``1/r`` scale still leaves at least ``size`` pixels on
    its shorter side, so the resize after it only ever shrinks."""
    short = tf.minimum(height, width)
    return tf.reduce_sum(tf.cast(short >= tf.constant(DCT_RATIOS[1:]) * size, tf.int32))


def decode_resized(image_bytes: tf.Tensor, shape: tf.Tensor, window: tf.Tensor,
                   size: int) -> tf.Tensor:
    """The ``window`` ``[y, x, h, w]`` of the JPEG of ``shape``, decoded (only the window's
    pixels) and resized bilinearly to ``size`` x ``size``: float32 in [0, 255].

    A window at least twice ``size`` on its shorter side is decoded at the smallest DCT
    scale ``1/r`` (``dct_ratio``) that keeps ``size`` pixels: a 2400-pixel crop of a
    12-megapixel photo for a 224 output is decoded at 1/8 scale (300 pixels), which is what
    the resize would keep of it anyway. At that scale the decoder's image is ``ceil(H / r)``
    x ``ceil(W / r)`` and takes a window in its own pixels, so the decoded window covers the
    original one (start rounded down, end up) and the resize samples exactly the original
    window's extent in it (``crop_and_resize`` at the same pixel centres as
    ``tf.image.resize``), not the rounded one."""
    y, x, h, w = tf.unstack(window)

    def full():
        image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
        return tf.image.resize(image, [size, size], method="bilinear")

    def scaled(r):
        def decode():
            y0, x0 = y // r, x // r
            y1 = tf.minimum((y + h + r - 1) // r, (shape[0] + r - 1) // r)
            x1 = tf.minimum((x + w + r - 1) // r, (shape[1] + r - 1) // r)
            image = tf.image.decode_and_crop_jpeg(
                image_bytes, tf.stack([y0, x0, y1 - y0, x1 - x0]), channels=3, ratio=r)
            f = functools.partial(tf.cast, dtype=tf.float32)
            # output pixel i's centre, in the decoded window's pixels (as tf.image.resize:
            # half-pixel centres), then as crop_and_resize's box: [first, last] / (n - 1)
            first_y = f(y) / r - f(y0) + (0.5 / size) * f(h) / r - 0.5
            last_y = first_y + (size - 1) / size * f(h) / r
            first_x = f(x) / r - f(x0) + (0.5 / size) * f(w) / r - 0.5
            last_x = first_x + (size - 1) / size * f(w) / r
            dy, dx = f(y1 - y0) - 1, f(x1 - x0) - 1
            box = tf.stack([first_y / dy, first_x / dx, last_y / dy, last_x / dx])
            return tf.image.crop_and_resize(f(image)[None], box[None], [0], [size, size])[0]
        return decode

    return tf.switch_case(dct_ratio(h, w, size), [full] + [scaled(r) for r in DCT_RATIOS[1:]])


def crop_window(shape: tf.Tensor, size: int, seed: tf.Tensor, bbox: tf.Tensor | None = None,
                area_range=AREA_RANGE, aspect_ratio_range=ASPECT_RATIO_RANGE,
                max_attempts: int = MAX_ATTEMPTS) -> tf.Tensor:
    """The training crop ``[y, x, height, width]`` of an image of ``shape`` (``[H, W, C]``):
    a window covering ``area_range`` of the image (or of ``bbox``, [1, N, 4] in [ymin, xmin,
    ymax, xmax] fractions) with aspect ratio in ``aspect_ratio_range``, drawn from the
    stateless ``seed`` (shape [2]). When no window fits in ``max_attempts`` draws, the
    central crop of ``center_crop`` instead (as TensorFlow's reference ResNet preprocessing
    does), not the whole, distorted image."""
    if bbox is None:
        bbox = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=bbox, seed=seed, min_object_covered=0.1,
        aspect_ratio_range=aspect_ratio_range, area_range=area_range,
        max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop)
    # no window found: the op returns the whole image
    failed = tf.logical_and(tf.equal(h, shape[0]), tf.equal(w, shape[1]))
    center = _center_window(shape[0], shape[1], size)
    return tf.where(failed, tf.stack(center), tf.stack([y, x, h, w]))


def random_resized_crop(image_bytes: tf.Tensor, size: int, bbox: tf.Tensor | None = None,
                        area_range=AREA_RANGE, aspect_ratio_range=ASPECT_RATIO_RANGE,
                        max_attempts: int = MAX_ATTEMPTS, flip: bool = False,
                        seed: tf.Tensor | None = None) -> tf.Tensor:
    """The ``crop_window`` of the image decoded from the JPEG and resized to ``size`` x
    ``size`` (``decode_resized``: only the window's pixels, DCT-scaled when it is at least
    twice ``size``), optionally flipped left-right at random; float32 in [0, 255].

    ``seed`` (shape [2], int): the stateless seed of the crop and flip draws, so that the
    pipeline decides them from (seed, rank, epoch, position); without one, a seed is drawn
    from TensorFlow's global generator."""
    if seed is None:
        seed = tf.random.uniform([2], maxval=2 ** 31 - 1, dtype=tf.int64)
    seed = tf.cast(seed, tf.int64)
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = crop_window(shape, size, seed, bbox, area_range, aspect_ratio_range,
                         max_attempts)
    image = decode_resized(image_bytes, shape, window, size)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + [0, 1])
    return image


def center_crop(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """The central ``size / (size + 32)`` of the shorter side, decoded from the JPEG (as in
    ``decode_resized``) and resized to ``size`` x ``size``; float32 in [0, 255]."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    return decode_resized(image_bytes, shape,
                          tf.stack(_center_window(shape[0], shape[1], size)), size)


@functools.lru_cache(maxsize=16)
def _full(shape: tuple[int, ...], values: tuple[float, ...]) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.asarray(values, np.float32), shape))


def normalize(image: tf.Tensor, dtype=tf.float32, mean=IMAGENET_MEAN,
              std=IMAGENET_STD) -> tf.Tensor:
    """Per-channel ``(x - mean) / std``, then cast to ``dtype`` (the model's compute dtype,
    so that 16-bit policies move half the bytes).

    For an image of static shape the mean and 1/std are constants of the image's full shape:
    a plain element-wise op is about 4x faster on CPU than broadcasting a length-3 channel
    vector (measured in benchmarks/input_pipeline.py's development)."""
    inv_std = tuple(1.0 / s for s in std)
    if image.shape.is_fully_defined():
        shape = tuple(image.shape.as_list())
        m, k = tf.constant(_full(shape, tuple(mean))), tf.constant(_full(shape, inv_std))
    else:
        m, k = tf.constant(mean, tf.float32), tf.constant(inv_std, tf.float32)
    return tf.cast((image - m) * k, dtype)


def finish(image: tf.Tensor, dtype) -> tf.Tensor:
    """A resized image (float32 in [0, 255]) as the pipeline emits it: normalised in
    ``dtype``, or for ``tf.uint8`` the rounded pixels (``normalize`` then runs in the model:
    ``lars_tf.build.NormalizePixels``). A bilinear resize stays within [0, 255]: no
    clipping needed."""
    if tf.as_dtype(dtype) == tf.uint8:
        return tf.cast(tf.round(image), tf.uint8)
    return normalize(image, dtype)


def train_image(image_bytes, size: int, dtype=tf.float32, bbox=None, seed=None) -> tf.Tensor:
    """Random-resized crop + flip drawn from ``seed``, in ``dtype`` (see ``finish``)."""
    return finish(random_resized_crop(image_bytes, size, bbox, flip=True, seed=seed), dtype)


def eval_image(image_bytes, size: int, dtype=tf.float32) -> tf.Tensor:
    return finish(center_crop(image_bytes, size), dtype)
