"""Save models compiled with the lars_tf stack, then load them in a fresh process.

    python tests/workers/save_load.py save OUT_DIR   (plain-model.{keras,h5}: LARS alone;
                                                      lars_tf-model.{keras,h5}: inside
                                                      lars_tf.DistributedOptimizer;
                                                      horovod-model.{keras,h5} (Keras 2):
                                                      inside Horovod's, as users' own
                                                      scripts do)
    python tests/workers/save_load.py load PATH...
"""

import sys

import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf import keras_compat, precision

if sys.argv[1] == "save":
    out = sys.argv[2]
    lars_tf.init()  # before TensorFlow runs anything: it fixes the thread pools
    for wrap in ("plain", "lars_tf", *([] if keras_compat.KERAS3 else ["horovod"])):
        schedule = lars_tf.WarmupPolynomialDecay(peak_learning_rate=2.0, warmup_steps=3,
                                                 total_steps=20)
        optimizer = lars_tf.LARS(learning_rate=schedule, momentum=0.8, weight_decay=1e-4)
        if wrap == "lars_tf":
            optimizer = lars_tf.DistributedOptimizer(optimizer)
        elif wrap == "horovod":
            import horovod.tensorflow.keras as hvd

            optimizer = hvd.DistributedOptimizer(optimizer)
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2, name="d")])
        # a loss object: Keras 3's .h5 loader cannot read back the name "mse"
        model.compile(optimizer=optimizer, loss=tf.keras.losses.MeanSquaredError())
        model.fit(np.ones((8, 4)), np.zeros((8, 2)), epochs=1, batch_size=4, verbose=0)
        for fmt in ("keras", "h5"):
            model.save(f"{out}/{wrap}-model.{fmt}")
else:  # a fresh process: only `import lars_tf`, no custom_objects
    for path in sys.argv[2:]:
        model = tf.keras.models.load_model(path)
        opt = precision.innermost_optimizer(model.optimizer)
        assert type(opt).__name__ == "LARS", (path, type(opt))
        assert isinstance(opt._learning_rate, lars_tf.WarmupPolynomialDecay), opt._learning_rate
        assert opt.get_config()["momentum"] == 0.8, opt.get_config()
        print("loaded", path, type(opt).__module__, int(opt.iterations.numpy()))
