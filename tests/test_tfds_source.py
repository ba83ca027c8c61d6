"""--dataset tfds:imagenet2012, prepared from small manual tars made here (no download)."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import TrainConfig
from lars_tf import data as data_lib
from lars_tf.testing import launcher, run_job

TRAIN_PER_CLASS, CLASSES, VAL = 4, 3, 6


def _jpeg(seed):
    rng = np.random.default_rng(seed)
    return tf.io.encode_jpeg(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).numpy()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    """ILSVRC2012_img_train.tar (a tar of per-synset tars) and ILSVRC2012_img_val.tar, in the
    layout of the real archives, with a few random-pixel JPEGs each."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    synsets = open(imagenet_common.label_names_file()).read().split()
    root = tmp_path_factory.mktemp("manual")
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c in range(CLASSES):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(TRAIN_PER_CLASS):
                    _add(inner, f"{synsets[c]}_{i}.JPEG", _jpeg(10 * c + i))
            _add(outer, f"{synsets[c]}.tar", buf.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, VAL + 1):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(100 + i))
    return root


def _config(data_dir, manual=None, **kw):
    return TrainConfig(**{**dict(dataset="tfds:imagenet2012", data_dir=str(data_dir),
                                 manual_dir=str(manual) if manual else None, image_size=32,
                                 global_batch_size=4, deterministic=True), **kw})


def test_unprepared_dataset_without_manual_dir_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="--manual_dir"):
        data_lib.prepare(_config(tmp_path))
    with pytest.raises(ValueError, match="no dataset 'imagenet2013'"):
        data_lib.prepare(_config(tmp_path, dataset="tfds:imagenet2013"))


def test_prepare_from_manual_tars_and_read_sharded(manual_dir, tmp_path):
    config = _config(tmp_path / "tfds", manual_dir)
    data_lib.prepare(config)
    parts = [data_lib.build(config, rank, 2) for rank in range(2)]
    assert parts[0].num_classes == 1000
    assert parts[0].steps_per_epoch == TRAIN_PER_CLASS * CLASSES // 2 // 2
    x, y = next(iter(parts[0].train))
    assert x.shape == (2, 32, 32, 3) and set(y.numpy()) <= set(range(CLASSES))
    # validation: 6 images, 3 per rank, none twice; labels from tfds' validation label file
    seen = [np.concatenate([y.numpy() for _, y in p.eval]) for p in parts]
    assert [len(s) for s in seen] == [VAL // 2, VAL // 2]
    one = np.concatenate([y.numpy() for _, y in data_lib.build(config, 0, 1).eval])
    assert sorted(np.concatenate(seen).tolist()) == sorted(one.tolist()) and len(one) == VAL


@pytest.mark.multiprocess
def test_two_rank_run_prepares_once(manual_dir, tmp_path):
    run_job(launcher("gloo") + [
        "lars-train", "--dataset=tfds:imagenet2012", f"--data_dir={tmp_path / 'tfds'}",
        f"--manual_dir={manual_dir}", "--image_size=32", "--model=small_cnn",
        "--global_batch_size=4", "--epochs=1", "--warmup_epochs=0", "--learning_rate=0.1",
        f"--model_dir={tmp_path / 'run'}", "--noprogress_bar"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["history"][-1]["test_examples"] == VAL
    assert os.path.isdir(tmp_path / "tfds" / "imagenet2012")
