"""A model with float64, bfloat16 and float32 variables, and its data: shared by the
2-rank worker (keras_api.py dtypes) and the one-process reference in test_keras_api."""

import keras
import numpy as np


def dtypes_model():
    """Layers of three variable dtypes: the gradients cross the wire in each."""
    keras.utils.set_random_seed(7)
    return keras.Sequential([keras.Input((8,)),
                             keras.layers.Dense(8, activation="tanh", dtype="float64"),
                             keras.layers.Dense(8, activation="tanh", dtype="bfloat16"),
                             keras.layers.Dense(3, dtype="float32")])


def dtypes_data():
    """32 examples: rank r of 2 takes rows r::2 (8 a step), one process all (16 a step)."""
    rng = np.random.default_rng(3)
    return rng.normal(size=(48, 8)).astype(np.float32), rng.integers(0, 3, size=(48,))
