"""TrainConfig validation and the Fashion-MNIST source, on the real Debian files."""

import gzip
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from lars_tf import TrainConfig, testing
from lars_tf import data as data_lib
from lars_tf.data import fashion_mnist

FMNIST = testing.fashion_mnist_dir()


@pytest.mark.parametrize("changes, flag", [
    (dict(global_batch_size=0), "--global_batch_size"),
    (dict(global_batch_size=-8), "--global_batch_size"),
    (dict(epochs=0), "--epochs"),
    (dict(optimizer="adam"), "--optimizer"),
    (dict(learning_rate=0.0), "--learning_rate"),
    (dict(warmup_epochs=-1.0), "--warmup_epochs"),
    (dict(warmup_epochs=40.0, epochs=30), "--warmup_epochs"),
    (dict(momentum=1.0), "--momentum"),
    (dict(weight_decay=-1e-4), "--weight_decay"),
    (dict(trust_coefficient=0.0), "--trust_coefficient"),
    (dict(eval_every=0), "--eval_every"),
    (dict(end_learning_rate=100.0), "--end_learning_rate"),
])
def test_bad_config_names_the_flag(changes, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**changes)


def test_model_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="--model_dir"):
        TrainConfig(model_dir=str(f))


def test_batch_must_split_evenly_over_ranks():
    assert TrainConfig(global_batch_size=4096).per_rank_batch_size(2) == 2048
    with pytest.raises(ValueError, match="--global_batch_size=4097"):
        TrainConfig(global_batch_size=4097).per_rank_batch_size(2)


def test_fashion_mnist_real_files():
    x, y = fashion_mnist.load(FMNIST, "train")
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (60000,) and set(np.unique(y)) == set(range(10))
    tx, ty = fashion_mnist.load(FMNIST, "test")
    assert tx.shape == (10000, 28, 28, 1) and np.bincount(ty).tolist() == [1000] * 10


def _pixels(normalised: np.ndarray) -> Counter:
    """The multiset of images, as uint8 pixel rows recovered from normalised batches."""
    raw = np.rint((normalised * fashion_mnist.STD + fashion_mnist.MEAN) * 255.0)
    return Counter(row.tobytes() for row in raw.astype(np.uint8).reshape(len(raw), -1))


def test_rank_shards_cover_their_examples_once_with_equal_steps():
    config = TrainConfig(global_batch_size=1000, data_dir=FMNIST)
    parts = [data_lib.build(config, rank, 2, eval_batch_size=999) for rank in range(2)]
    assert parts[0].steps_per_epoch == parts[1].steps_per_epoch == 60  # 30000 / 500
    x, _ = fashion_mnist.load(FMNIST, "train")
    tx, _ = fashion_mnist.load(FMNIST, "test")
    for rank, p in enumerate(parts):
        # one training epoch of a rank is exactly its shard, each example once
        batches = [b.numpy() for b, _ in p.train.take(p.steps_per_epoch)]
        assert all(b.shape == (500, 28, 28, 1) for b in batches)
        assert _pixels(np.concatenate(batches)) == Counter(
            row.tobytes() for row in x[rank::2].reshape(30000, -1))
    # eval: over both ranks, every test example exactly once
    seen = sum((_pixels(np.concatenate([b.numpy() for b, _ in p.eval])) for p in parts),
               Counter())
    assert seen == Counter(row.tobytes() for row in tx.reshape(10000, -1))
    assert sum(p.eval_examples for p in parts) == 10000
    # normalised to roughly zero mean, unit variance
    x0 = next(iter(parts[0].train))[0].numpy()
    assert abs(x0.mean()) < 0.1 and 0.8 < x0.std() < 1.2


def test_each_epoch_is_reshuffled_and_seeded():
    config = TrainConfig(global_batch_size=6000, data_dir=FMNIST, seed=5, deterministic=True)
    d = data_lib.build(config, 0, 1)
    steps = d.steps_per_epoch
    labels = [y.numpy() for _, y in d.train.take(2 * steps)]
    assert not np.array_equal(labels[0], labels[steps])  # epoch 2 is in another order
    again = [y.numpy() for _, y in data_lib.build(config, 0, 1).train.take(2 * steps)]
    for a, b in zip(labels, again):
        np.testing.assert_array_equal(a, b)  # same seed, same order


def test_missing_and_broken_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        fashion_mnist.load(str(tmp_path / "nope"), "train")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        fashion_mnist.load(str(tmp_path), "train")
    # a truncated image file: the error names the file
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(os.path.join(FMNIST, stem + ".gz"), tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        fashion_mnist.load(str(tmp_path), "train")


def test_batch_larger_than_dataset():
    config = TrainConfig(global_batch_size=70000, data_dir=FMNIST)
    with pytest.raises(ValueError, match="--global_batch_size=70000"):
        data_lib.build(config, 0, 1)


@pytest.mark.parametrize("value, kwargs, message", [
    (0, dict(lo=1, integer=True), "--n=0: must be an integer >= 1"),
    (2.0, dict(lo=1, integer=True), "--n=2.0: must be an integer"),
    (True, dict(lo=0), "--n=True: must be a number"),
    (float("nan"), dict(lo=0), "--n=nan: must be a number"),
    (0.0, dict(lo=0, lo_open=True), "--n=0.0: must be > 0"),
    (1.0, dict(lo=0, hi=1, hi_open=True), r"--n=1.0: must be in \[0, 1\)"),
    (0, dict(hi=0, hi_open=True), "--n=0: must be < 0"),
])
def test_one_validation_helper_names_what_is_at_fault(value, kwargs, message):
    from lars_tf.validation import check_number

    with pytest.raises(ValueError, match=f"^{message}$"):
        check_number("--n", value, **kwargs)
    check_number("--n", 1 if kwargs.get("integer") else 0.5, lo=0, hi=1)  # in range: silent
