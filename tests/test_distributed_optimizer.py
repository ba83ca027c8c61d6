"""lars_tf.DistributedOptimizer (both stacks'): what it refuses, in one process.

Its all-reduce is proved by the 2-rank jobs of test_composition (LARS, Keras' SGD and Adam,
accumulation, predivide, loss scaling, float16 on the wire) and test_distributed_training.
"""

import pytest

from lars_tf import keras_compat

pytestmark = pytest.mark.legacy


def test_an_optimizer_wrapped_by_horovods_keras_layer_is_refused():
    """Horovod's Keras 2 DistributedOptimizer around a Keras 3 optimizer builds without a
    word and all-reduces nothing (on Keras 2 it would all-reduce a second time); lars_tf
    refuses it wherever it takes an optimizer, saying which harm it would do."""
    import horovod.tensorflow.keras as hvd
    import keras

    import lars_tf
    from lars_tf import build

    wrapped = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1))
    harm = "all-reduces no gradient" if keras_compat.KERAS3 else "all-reduced twice"
    with pytest.raises(ValueError, match=harm):
        lars_tf.DistributedOptimizer(wrapped)
    with pytest.raises(ValueError, match=harm):
        build.wrap_optimizer(wrapped)
    with pytest.raises(ValueError, match=harm):
        build.wrap_optimizer(wrapped, precision="mixed_float16")


@pytest.mark.parametrize("kwargs, message", [
    (dict(compression="fp8"), "compression='fp8'"),
    (dict(backward_passes_per_step=0), "--backward_passes_per_step=0"),
    (dict(backward_passes_per_step=1.5), "--backward_passes_per_step=1.5"),
    (dict(gradient_predivide_factor=0.0), "--gradient_predivide_factor=0.0"),
    (dict(bucket_mb=-1), "--bucket_mb=-1"),
])
def test_bad_options_are_refused(kwargs, message):
    import keras

    import lars_tf

    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        lars_tf.DistributedOptimizer(keras.optimizers.SGD(0.1), **kwargs)


def test_only_keras_optimizers_are_wrapped():
    import lars_tf

    with pytest.raises(ValueError, match="wraps a Keras optimizer"):
        lars_tf.DistributedOptimizer(object())


def test_config_round_trip():
    """get_config / from_config keep the wrapped optimizer and every option."""
    import keras

    import lars_tf

    opt = lars_tf.DistributedOptimizer(
        lars_tf.LARS(learning_rate=0.5, weight_decay=1e-4), compression="fp16",
        backward_passes_per_step=4, gradient_predivide_factor=2.0, bucket_mb=0.5)
    clone = lars_tf.DistributedOptimizer.from_config(opt.get_config())
    assert isinstance(clone.inner_optimizer, lars_tf.LARS)
    assert clone.inner_optimizer.get_config()["weight_decay"] == 1e-4
    assert (clone.compression, clone.backward_passes_per_step,
            clone.gradient_predivide_factor, clone.sparse_as_dense, clone.bucket_mb) == (
                "fp16", 4, 2.0, True, 0.5)
    assert isinstance(keras.optimizers.deserialize(keras.optimizers.serialize(opt)),
                      lars_tf.DistributedOptimizer)


def test_buckets_go_last_layer_first_one_dtype_each_closed_at_the_cap():
    """The all-reduce's buckets: the gradients in reverse order (the backward pass's), a
    bucket per dtype, closed once it holds the cap; those left open go last, in the order
    the backward pass completes them."""
    import tensorflow as tf

    from lars_tf.distributed_optimizer import buckets

    kib = 1024
    sizes = [(kib, tf.float32), (2 * kib, tf.float32), (8, tf.float64), (kib, tf.float32),
             (1, tf.float32)]  # float32 elements: 4 bytes each
    dense = [(i, tf.zeros([n], dtype)) for i, (n, dtype) in enumerate(sizes)]

    def positions(cap):
        return [[item[0] for item in b] for b in buckets(dense, cap)]

    assert positions(0) == [[4], [3], [2], [1], [0]]  # every gradient alone
    assert positions(8 * kib) == [[4, 3, 1], [2], [0]]  # 4 B + 4 KiB + 8 KiB closes one
    assert positions(64 * kib) == [[2], [4, 3, 1, 0]]  # none closed: one per dtype
