"""Pure image preprocessing: JPEG bytes in, normalised tensors out (TensorFlow only).

Training: Inception-style random-resized crop decoded straight from the JPEG (only the
crop window's pixels are decoded), random flip, both drawn from a stateless seed that the
pipeline derives from (seed, rank, epoch, position), so ranks draw differently and a run is
reproducible. Eval: the central 87.5% (size / (size + 32))
of the shorter side, decoded from the JPEG, resized. Both as in the ResNet recipes.
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
    """The ``crop_window`` of the image decoded from the JPEG (only the window's pixels),
    optionally flipped left-right at random (on the small uint8 crop, before the resize),
    and resized to ``size`` x ``size``; float32 in [0, 255].

    ``seed`` (shape [2], int): the stateless seed of the crop and flip draws, so that the
    pipeline decides them from (seed, rank, epoch, position); without one, a seed is drawn
    from TensorFlow's global generator."""
    if seed is None:
        seed = tf.random.uniform([2], maxval=2 ** 31 - 1, dtype=tf.int64)
    seed = tf.cast(seed, tf.int64)
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = crop_window(shape, size, seed, bbox, area_range, aspect_ratio_range,
                         max_attempts)
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + [0, 1])
    return tf.image.resize(image, [size, size], method="bilinear")


def center_crop(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """The central ``size / (size + 32)`` of the shorter side, decoded from the JPEG and
    resized to ``size`` x ``size``; float32 in [0, 255]."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    image = tf.image.decode_and_crop_jpeg(
        image_bytes, tf.stack(_center_window(shape[0], shape[1], size)), channels=3)
    return tf.image.resize(image, [size, size], method="bilinear")


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


def train_image(image_bytes, size: int, dtype=tf.float32, bbox=None, seed=None) -> tf.Tensor:
    """Random-resized crop + flip drawn from ``seed``, normalised, in ``dtype``."""
    return normalize(random_resized_crop(image_bytes, size, bbox, flip=True, seed=seed),
                     dtype)


def eval_image(image_bytes, size: int, dtype=tf.float32) -> tf.Tensor:
    return normalize(center_crop(image_bytes, size), dtype)
