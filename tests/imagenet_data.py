"""What the ImageNet-format tests share (tests/test_imagenet_pipeline.py,
test_lars_convert.py, test_damaged_data.py): a folder of real JPEGs, the shards lars-convert
makes of it once per session (the fixtures, made visible by tests/conftest.py), and small
helpers."""

import json
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import TrainConfig, testing
from lars_tf.data import fashion_mnist
from lars_tf.testing import BIN, job_env

FMNIST = testing.fashion_mnist_dir()
PER_CLASS = 40


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """3 classes of Fashion-MNIST images as 64x64 RGB JPEGs, plus photos (JPEG and PNG),
    plus two files no decoder can read."""
    root = tmp_path_factory.mktemp("images")
    x, y = fashion_mnist.load(FMNIST, "test")
    for label in range(3):
        folder = root / f"class_{label}"
        folder.mkdir()
        picks = np.flatnonzero(y == label)[:PER_CLASS]
        for i in picks:
            rgb = tf.image.resize(tf.image.grayscale_to_rgb(tf.constant(x[i])), [64, 64])
            jpeg = tf.io.encode_jpeg(tf.cast(rgb, tf.uint8), quality=90).numpy()
            (folder / f"fmnist_{i}.jpg").write_bytes(jpeg)
    photos = testing.photos(("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg",
                             "astronaut.png", "coffee.png", "chelsea.png"))
    for n, (name, path) in enumerate(sorted(photos.items())):
        (root / f"class_{n % 3}" / name).write_bytes(open(path, "rb").read())
    (root / "class_0" / "noise.jpg").write_bytes(os.urandom(5000))
    rocket = open(photos["rocket.jpg"], "rb").read()
    (root / "class_1" / "truncated.jpg").write_bytes(rocket[: len(rocket) // 3])
    return root


@pytest.fixture(scope="session")
def shards(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfrecords")
    for split, n in (("train", 4), ("validation", 2)):
        proc = subprocess.run(
            [str(BIN / "lars-convert"), f"--input_dir={image_folder}", f"--output_dir={out}",
             f"--split={split}", f"--num_shards={n}", "--workers=2"],
            env=job_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{n}/{n} shards" in proc.stderr  # the progress bar
    return out


def _config(shards, **kw):
    base = dict(dataset="imagenet", data_dir=str(shards), image_size=32, num_classes=3,
                global_batch_size=16, deterministic=True, shuffle_buffer=64)
    return TrainConfig(**{**base, **kw})


def _eval_images(d):
    return np.concatenate([x.numpy() for x, _ in d.eval])


def _damage(path, at=0.5):
    """Flip one byte inside a record in the middle of the file: its CRC no longer matches."""
    raw = bytearray(open(path, "rb").read())
    raw[int(len(raw) * at)] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def _copy_converted(shards, dest):
    """A copy of the converted shards and their indexes (a test may change it)."""
    import shutil

    shutil.copytree(shards, dest)
    return dest


def _edit_index(shard, **fields):
    path = f"{shard}.index.json"
    raw = json.loads(open(path).read())
    raw.update(fields)
    open(path, "w").write(json.dumps(raw))


def _epoch_labels(d, epoch):
    """The labels rank ``d`` reads in epoch ``epoch`` (0-based) of its train stream."""
    batches = d.train.skip(epoch * d.steps_per_epoch).take(d.steps_per_epoch)
    return np.concatenate([y.numpy() for _, y in batches])
