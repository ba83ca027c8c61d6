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
        backward_passes_per_step=4, gradient_predivide_factor=2.0)
    clone = lars_tf.DistributedOptimizer.from_config(opt.get_config())
    assert isinstance(clone.inner_optimizer, lars_tf.LARS)
    assert clone.inner_optimizer.get_config()["weight_decay"] == 1e-4
    assert (clone.compression, clone.backward_passes_per_step,
            clone.gradient_predivide_factor, clone.sparse_as_dense) == ("fp16", 4, 2.0, True)
    assert isinstance(keras.optimizers.deserialize(keras.optimizers.serialize(opt)),
                      lars_tf.DistributedOptimizer)
