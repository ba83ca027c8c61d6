"""Warmup + polynomial decay and the batch-size scaling rules."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import WarmupPolynomialDecay, scale_learning_rate
from tests import reference


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_schedule_matches_formula(power):
    s = WarmupPolynomialDecay(peak_learning_rate=4.0, warmup_steps=7, total_steps=50,
                              end_learning_rate=0.1, power=power)
    for step in range(0, 60):
        want = reference.schedule(step, 4.0, 7, 50, end=0.1, power=power)
        assert float(s(step)) == pytest.approx(want, rel=1e-5, abs=1e-6), step
    assert float(s(7)) == pytest.approx(4.0)   # peak right after warmup
    assert float(s(500)) == pytest.approx(0.1)  # held at the end value


def test_schedule_no_warmup_and_serialization():
    s = WarmupPolynomialDecay(peak_learning_rate=1.0, warmup_steps=0, total_steps=10)
    assert float(s(0)) == pytest.approx(1.0)
    clone = tf.keras.optimizers.schedules.deserialize(
        tf.keras.optimizers.schedules.serialize(s))
    assert isinstance(clone, WarmupPolynomialDecay)
    assert clone.get_config() == s.get_config()
    steps = np.arange(12)
    np.testing.assert_allclose([float(clone(t)) for t in steps], [float(s(t)) for t in steps])


@pytest.mark.parametrize("kwargs, word", [
    (dict(peak_learning_rate=0.0, warmup_steps=1, total_steps=2), "peak_learning_rate"),
    (dict(peak_learning_rate=1.0, warmup_steps=5, total_steps=2), "warmup_steps"),
    (dict(peak_learning_rate=1.0, warmup_steps=1, total_steps=0), "total_steps"),
    (dict(peak_learning_rate=1.0, warmup_steps=1, total_steps=2, power=0), "power"),
    (dict(peak_learning_rate=1.0, warmup_steps=1, total_steps=2, end_learning_rate=2.0),
     "end_learning_rate"),
])
def test_schedule_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        WarmupPolynomialDecay(**kwargs)


def test_scaling_rules():
    assert scale_learning_rate(0.1, 256, 8192) == pytest.approx(3.2)
    assert scale_learning_rate(0.1, 256, 8192, rule="sqrt") == pytest.approx(0.1 * math.sqrt(32))
    with pytest.raises(ValueError, match="rule"):
        scale_learning_rate(0.1, 256, 8192, rule="cubic")
    with pytest.raises(ValueError, match="batch"):
        scale_learning_rate(0.1, 0, 8192)
