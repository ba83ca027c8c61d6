"""Warmup + polynomial decay and the batch-size scaling rules."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import WarmupPolynomialDecay, scale_learning_rate
from tests import reference

pytestmark = pytest.mark.legacy


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


def test_a_schedule_saved_for_horovods_accumulation_is_refused_with_the_rewrite():
    """Earlier versions saved ``backward_passes_per_step`` (Horovod's Keras 2 optimizer
    stepped the schedule every backward pass); lars_tf.DistributedOptimizer counts updates,
    so such a schedule would run k times too fast. 1 (the default) still loads."""
    config = WarmupPolynomialDecay(peak_learning_rate=1.0, warmup_steps=4,
                                   total_steps=40).get_config()
    old = WarmupPolynomialDecay.from_config({**config, "backward_passes_per_step": 1})
    assert old.get_config() == config
    with pytest.raises(ValueError, match="backward_passes_per_step=4.*divided by 4"):
        WarmupPolynomialDecay.from_config({**config, "backward_passes_per_step": 4})


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


def test_warmup_can_start_above_zero():
    s = WarmupPolynomialDecay(peak_learning_rate=32.0, warmup_steps=400, total_steps=4000,
                              warmup_start_learning_rate=1.0)
    assert float(s(0)) == pytest.approx(1.0)
    assert float(s(200)) == pytest.approx(16.5)
    assert float(s(400)) == pytest.approx(32.0)
    assert s.get_config()["warmup_start_learning_rate"] == 1.0
    with pytest.raises(ValueError, match="warmup_start_learning_rate"):
        WarmupPolynomialDecay(peak_learning_rate=1.0, warmup_steps=1, total_steps=2,
                              warmup_start_learning_rate=2.0)


# (preset, warmup iterations and peak rate as the source solver files give them)
@pytest.mark.parametrize("name, iterations, peak", [
    ("alexnet_bn-8k", 600, 10.0), ("alexnet_bn-16k", 400, 24.0), ("alexnet_bn-32k", 400, 32.0),
])
def test_alexnet_presets_reproduce_the_source_warmup(name, iterations, peak):
    from lars_tf import TrainConfig
    from lars_tf.build import build_schedule

    config = TrainConfig.from_preset(name)
    assert config.preset == name and config.model == "alexnet_bn"
    # one backward pass per update here: an epoch of ImageNet-1k in updates, remainder dropped
    schedule = build_schedule(config, 1281167 // config.global_batch_size)
    assert abs(schedule.warmup_steps - iterations) <= 0.01 * iterations
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(schedule.warmup_steps)) == pytest.approx(peak)


def test_presets_are_valid_configs_and_flags_win():
    from lars_tf import TrainConfig
    from lars_tf.presets import PRESETS

    assert {"resnet50-8k", "resnet50-16k", "resnet50-32k"} <= set(PRESETS)
    for name, p in PRESETS.items():
        config = TrainConfig.from_preset(name)   # validates every field
        assert config.global_batch_size == int(name.split("-")[1][:-1]) * 1024
        assert p.source and p.differences
    config = TrainConfig.from_preset("resnet50-32k", learning_rate=20.0, data_dir="/d")
    assert (config.learning_rate, config.warmup_epochs, config.data_dir) == (20.0, 12, "/d")
    with pytest.raises(ValueError, match="--preset='resnet50-1k'"):
        TrainConfig.from_preset("resnet50-1k")
    with pytest.raises(ValueError, match="--preset='nope'"):
        TrainConfig(preset="nope")


# As the source gives them: peak rate and warmup epochs by batch (lars_util.py), and 90
# epochs in its steps (run.sh: 14074 at 8K, 3519 at 32K; 16K and 64K the same way)
@pytest.mark.parametrize("name, peak, warmup_epochs, source_steps", [
    ("resnet50-8k", 16.0, 3, 14074), ("resnet50-16k", 25.0, 5, 7037),
    ("resnet50-32k", 34.0, 12, 3519), ("resnet50-64k", 35.0, 34, 1760),
])
def test_resnet50_presets_follow_the_source_schedule(name, peak, warmup_epochs, source_steps):
    from lars_tf import TrainConfig
    from lars_tf.build import build_schedule

    config = TrainConfig.from_preset(name)
    batch = config.global_batch_size
    ours = build_schedule(config, 1281167 // batch)   # drops each epoch's partial batch
    # the same fraction of the run in both: within 0.5% of the peak rate everywhere
    steps = np.arange(ours.total_steps + 1)
    theirs = [reference.tpu_poly_schedule(round(t * source_steps / ours.total_steps), peak,
                                          warmup_epochs, batch, source_steps) for t in steps]
    worst = np.max(np.abs(ours(tf.constant(steps)).numpy() - theirs))
    assert worst < 0.005 * peak
