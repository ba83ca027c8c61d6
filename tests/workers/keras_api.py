"""The Keras Python API as a user writes it: plain ``model.compile`` and ``model.fit``
around ``lars_tf.DistributedOptimizer``, nothing of the Trainer.

    horovodrun -np 2 python tests/workers/keras_api.py MODE OUT_DIR

MODE:
  overflow   mixed_float16 policy, Keras' default compile (auto_scale_loss, jit 'auto');
             rank 1 alone feeds a float16-overflowing batch at step 2 of 4. Each rank
             records its loss scale and weights after every step, then saves the model
             (.keras), loads it back and records the loaded optimizer state.
  broadcast  ranks seeded differently, a subclassed model built lazily (in the first
             step), lars_tf.BroadcastState: each rank records its final state.
  mismatch   rank 1 builds its layers in another order (equal-shaped biases trade places):
             the first update must stop both ranks, naming the variable.
  dtypes     a model with float64, bfloat16 and float32 variables (dtypes_model), 3 SGD
             steps of 8 examples a rank: each rank records its weights.
"""

import sys

import keras
import numpy as np

import lars_tf
from lars_tf import keras_compat
from tests.workers.dtypes_case import dtypes_data, dtypes_model

mode, out_dir = sys.argv[1], sys.argv[2]
world = lars_tf.init()
rng = np.random.default_rng(100 + world.rank)
x = rng.normal(size=(32, 8)).astype(np.float32)
y = rng.integers(0, 3, size=(32,))


class Record(keras.callbacks.Callback):
    """The loss scale and the weights after every step."""

    def __init__(self):
        super().__init__()
        self.rows = {}

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        self.rows[f"scale{batch}"] = float(opt.dynamic_scale.numpy())
        for i, w in enumerate(self.model.trainable_variables):
            self.rows[f"p{batch}_w{i}"] = w.numpy()


def state(optimizer) -> dict:
    """Every variable of the optimizer stack (the wrapped LARS' too), in a stable order."""
    from lars_tf import checkpoint

    return {f"opt{i}": np.asarray(v)
            for i, v in enumerate(checkpoint.state_variables(optimizer=optimizer))}


if mode == "overflow":
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    # a start scale at which these data do not overflow by themselves (2^15 does, once)
    optimizer = lars_tf.DistributedOptimizer(lars_tf.LARS(1.0, weight_decay=1e-4),
                                             initial_scale=2.0 ** 10)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert model.optimizer is optimizer, type(model.optimizer)  # not wrapped by Keras
    if world.rank == 1:
        x[16:24] *= 1e6  # batch 2: float16 activations overflow to inf
    record = Record()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[lars_tf.BroadcastState(), record])
    out = dict(record.rows, lars_iterations=int(optimizer.inner_optimizer.iterations.numpy()),
               **state(optimizer))
    path = f"{out_dir}/model{world.rank}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    out.update({f"loaded_{k}": v for k, v in state(loaded.optimizer).items()})
    out["loaded_type"] = type(loaded.optimizer).__name__
    np.savez(f"{out_dir}/rank{world.rank}.npz", **out)

elif mode == "broadcast":
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.norm = keras.layers.BatchNormalization()
            self.out = keras.layers.Dense(3)

        def call(self, inputs, training=False):
            return self.out(self.norm(self.hidden(inputs), training=training))

    keras.utils.set_random_seed(world.rank)  # different starting weights on each rank
    model = Net()
    model.compile(optimizer=lars_tf.DistributedOptimizer(lars_tf.LARS(0.5, momentum=0.9)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert not model.built
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[lars_tf.BroadcastState()])
    np.savez(f"{out_dir}/rank{world.rank}.npz",
             **{f"w{i}": w.numpy() for i, w in enumerate(model.trainable_variables)},
             **state(model.optimizer))

elif mode == "mismatch":
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8,))
    a, b = keras.layers.Dense(4, name="a"), keras.layers.Dense(4, name="b")
    first, second = (a, b) if world.rank == 0 else (b, a)
    h = first(inputs)   # the same functional graph, but layers built (and listed) in
    h = second(h)       # another order on rank 1: a.bias and b.bias trade places
    model = keras.Model(inputs, keras.layers.Dense(3, name="c")(h))
    model.compile(optimizer=lars_tf.DistributedOptimizer(keras.optimizers.SGD(0.1)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    print("variables:", [keras_compat.variable_path(v) for v in model.trainable_variables])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    raise SystemExit("trained with mismatched variables")
elif mode == "dtypes":
    model = dtypes_model()
    model.compile(optimizer=lars_tf.DistributedOptimizer(keras.optimizers.SGD(0.5)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dx, dy = dtypes_data()
    model.fit(dx[world.rank::2], dy[world.rank::2], batch_size=8, epochs=1, shuffle=False,
              verbose=0)
    np.savez(f"{out_dir}/rank{world.rank}.npz",
             **{f"w{i}": np.asarray(w, np.float64) for i, w in enumerate(model.weights)})
else:
    raise SystemExit(f"unknown mode {mode}")
