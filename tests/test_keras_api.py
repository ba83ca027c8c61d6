"""The Keras Python API as users write it (plain compile and fit around
lars_tf.DistributedOptimizer): it trains right, or refuses with a message, and never hangs.

The 2-rank jobs run tests/workers/keras_api.py under Horovod (Gloo); the rest run in this
process, where DistributedOptimizer is a world of one (no launcher, no lars_tf.init()).
"""

import warnings

import numpy as np
import pytest

from lars_tf import keras_compat
from lars_tf.testing import launcher, run_job

pytestmark = pytest.mark.legacy
keras3_only = pytest.mark.keras3_only  # Keras 3's API


def _ranks(out, n=2):
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(n)]


@pytest.fixture
def fp16_policy():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _model(seed=3):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(3)])


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8)).astype(np.float32), rng.integers(0, 3, size=(n,))


def _fit(model, optimizer, steps=1, **compile_kwargs):
    import keras

    x, y = _data(8 * steps)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  **compile_kwargs)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model


# -- 2 ranks ---------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_mixed_float16_with_a_plain_compile_skips_an_overflow_on_every_rank(tmp_path):
    """Keras' default compile under mixed_float16 (auto_scale_loss=True): Keras must not
    wrap the optimizer in a loss-scale optimizer of its own (that one checked each rank's
    local gradients, so only the overflowing rank skipped its all-reduce, and the job hung).
    Rank 1 alone overflows at step 2: both ranks skip it, halve the same scale, stay
    bit-identical, and the schedule still counts the skipped update. The saved .keras
    model loads back with its complete optimizer state."""
    run_job(launcher("gloo", 2) + ["python", "tests/workers/keras_api.py", "overflow",
                                   str(tmp_path)], timeout=240)
    ranks = _ranks(tmp_path)
    for r, rec in enumerate(ranks):
        assert [rec[f"scale{b}"] for b in range(4)] == [2.0 ** 10] * 2 + [2.0 ** 9] * 2, r
        assert int(rec["lars_iterations"]) == 4  # 3 updates and 1 skipped, all counted
        assert str(rec["loaded_type"]) == "DistributedOptimizer"
        n = len([k for k in rec if k.startswith("opt")])
        assert n == len([k for k in rec if k.startswith("loaded_opt")]) and n > 4
        for i in range(n):
            np.testing.assert_array_equal(rec[f"opt{i}"], rec[f"loaded_opt{i}"],
                                          err_msg=f"optimizer variable {i} after loading")
    for key in ranks[0]:
        if key.startswith("p"):
            np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    nw = len([k for k in ranks[0] if k.startswith("p0_w")])
    w = [[ranks[0][f"p{p}_w{i}"] for i in range(nw)] for p in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(w[1], w[2]))  # step 2 skipped
    assert not all(np.array_equal(a, b) for a, b in zip(w[2], w[3]))  # step 3 updates


@pytest.mark.multiprocess
def test_the_broadcast_callback_makes_differently_seeded_ranks_identical(tmp_path):
    """A subclassed model built lazily in the first step, started from different weights
    on each rank: with lars_tf.BroadcastState both ranks end bit-identical, weights and
    optimizer state alike."""
    run_job(launcher("gloo", 2) + ["python", "tests/workers/keras_api.py", "broadcast",
                                   str(tmp_path)], timeout=240)
    a, b = _ranks(tmp_path)
    assert len(a) > 6
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.multiprocess
def test_variables_in_another_order_on_one_rank_stop_both_ranks_naming_it(tmp_path):
    """Gradients are all-reduced by position: two equal-shaped variables that trade places
    on one rank would be summed into each other in silence. The first update stops both
    ranks with a message naming the first variable that differs."""
    done = run_job(launcher("gloo", 2) + ["python", "tests/workers/keras_api.py", "mismatch",
                                          str(tmp_path)], timeout=240, check=False)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "trained with mismatched variables" not in out
    tail = "" if keras_compat.KERAS3 else ":0"  # Keras 2's variable names
    message = (f"variable 0 is 'a/kernel{tail}' [8, 4] float32 on rank 0 but "
               f"'b/kernel{tail}' [8, 4] float32 on rank 1")
    assert out.count(message) >= 2, out[-3000:]  # raised on both ranks


# -- one process (a world of one) --------------------------------------------------------
def test_wrap_optimizer_under_mixed_float16_scales_the_loss_once(fp16_policy):
    """wrap_optimizer(..., precision="mixed_float16") with a plain compile: the step
    equals Keras' own loss scaling around the same SGD (before, Keras added a second
    loss-scale optimizer and every step came out 32768x too small)."""
    import keras

    from lars_tf import build

    ours = _fit(_model(), build.wrap_optimizer(keras.optimizers.SGD(0.5),
                                                     precision="mixed_float16"))
    keras_own = _fit(_model(), keras.optimizers.SGD(0.5))
    assert isinstance(keras_own.optimizer, keras_compat.LOSS_SCALE_CLASSES)
    init = _model()
    for a, b, w0 in zip(ours.trainable_variables, keras_own.trainable_variables,
                        init.trainable_variables):
        step_ours, step_keras = np.asarray(a) - np.asarray(w0), np.asarray(b) - np.asarray(w0)
        path = keras_compat.variable_path(a)
        assert np.abs(step_keras).max() > 1e-4, path
        np.testing.assert_allclose(step_ours, step_keras, rtol=2e-2, atol=1e-5, err_msg=path)


def test_a_saved_model_loads_and_trains_in_a_plain_process(tmp_path):
    """A model saved with the distributed optimizer, loaded in a process that no launcher
    started and that never called lars_tf.init(), trains as a world of one (it failed with
    "Horovod has not been initialized"), the broadcast callback included."""
    import keras

    import lars_tf

    model = _fit(_model(), lars_tf.DistributedOptimizer(lars_tf.LARS(0.5)), steps=2)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert int(loaded.optimizer.iterations.numpy()) == 2
    before = [np.asarray(v) for v in loaded.trainable_variables]
    x, y = _data(16)
    loaded.fit(x, y, batch_size=8, verbose=0, callbacks=[lars_tf.BroadcastState()])
    assert int(loaded.optimizer.iterations.numpy()) == 4
    assert not all(np.array_equal(a, np.asarray(b))
                   for a, b in zip(before, loaded.trainable_variables))


def test_a_rank_of_a_launched_job_without_init_is_told_to_call_it(monkeypatch):
    import lars_tf

    monkeypatch.setenv("HOROVOD_SIZE", "2")
    with pytest.raises(ValueError, match=r"one of 2 ranks.*call lars_tf.init\(\)"):
        _fit(_model(), lars_tf.DistributedOptimizer(lars_tf.LARS(0.5)))


@keras3_only
def test_jit_compile_true_is_refused_at_compile_time():
    import lars_tf

    model = _model()
    with pytest.raises(ValueError, match="jit_compile=True with lars_tf.Distributed"):
        model.compile(optimizer=lars_tf.DistributedOptimizer(lars_tf.LARS(0.5)), loss="mse",
                      jit_compile=True)


@keras3_only
def test_jit_compile_auto_is_turned_off_with_one_warning_where_a_gpu_is_found(monkeypatch):
    """Keras' 'auto' turns XLA on where it finds a GPU; lars_tf turns it off for a model
    with the distributed optimizer, and warns once. (A fake GPU: this machine has none.)"""
    import keras
    import tensorflow as tf

    import lars_tf

    class FakeGPU:
        device_type = "GPU"

    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: real(kind) + ([FakeGPU()] if kind is None else []))
    plain = _model()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    assert plain.jit_compile is True  # Keras' own choice, untouched for other optimizers
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer=lars_tf.DistributedOptimizer(lars_tf.LARS(0.5)), loss="mse")
    assert model.jit_compile is False
    assert sum("has no XLA kernel" in str(w.message) for w in caught) == 1


def test_an_xla_compiled_custom_step_is_refused_when_traced():
    import tensorflow as tf

    import lars_tf

    opt = lars_tf.DistributedOptimizer(lars_tf.LARS(0.5))
    w = tf.Variable([1.0, 2.0])

    @tf.function(jit_compile=True)
    def step():
        opt.apply_gradients([(tf.constant([0.1, 0.1]), w)])

    with pytest.raises(ValueError, match="jit_compile=True with lars_tf.Distributed"):
        step()


@pytest.mark.parametrize("kwargs", [dict(clipnorm=1.0), dict(use_ema=True),
                                    dict(weight_decay=1e-4), dict(global_clipnorm=2.0),
                                    dict(gradient_accumulation_steps=2)])
def test_base_optimizer_arguments_are_refused_not_ignored(kwargs):
    import lars_tf

    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"DistributedOptimizer\\({name}=.*give {name} to "
                                         "the optimizer it wraps"):
        lars_tf.DistributedOptimizer(lars_tf.LARS(0.5), **kwargs)


def test_saving_in_the_middle_of_an_accumulation_window_is_refused(tmp_path):
    """An epoch of 3 backward passes with 2 per update ends with a half-summed window:
    saving it would store half-accumulated gradients, so it is refused naming the fix;
    at a window's end the same model saves."""
    import lars_tf

    model = _fit(_model(), lars_tf.DistributedOptimizer(lars_tf.LARS(0.5),
                                                        backward_passes_per_step=2), steps=3)
    with pytest.raises(ValueError, match="middle of an accumulation window.*multiple of 2"):
        model.save(tmp_path / "mid.keras")
    x, y = _data(8)
    model.fit(x, y, batch_size=8, verbose=0)  # pass 4 ends the window
    model.save(tmp_path / "end.keras")


def test_loss_scale_option(fp16_policy):
    """'auto' follows the global policy; the wrapped optimizer's own loss scaling is not
    doubled; a bad value is refused."""
    import keras

    import lars_tf

    assert lars_tf.DistributedOptimizer(lars_tf.LARS(0.5)).scales_loss
    assert not lars_tf.DistributedOptimizer(lars_tf.LARS(0.5), loss_scale="none").scales_loss
    inner = keras.mixed_precision.LossScaleOptimizer(lars_tf.LARS(0.5))
    assert not lars_tf.DistributedOptimizer(inner).scales_loss
    with pytest.raises(ValueError, match="scale it twice"):
        lars_tf.DistributedOptimizer(inner, loss_scale="dynamic")
    with pytest.raises(ValueError, match="loss_scale='static'"):
        lars_tf.DistributedOptimizer(lars_tf.LARS(0.5), loss_scale="static")
    keras.mixed_precision.set_global_policy("float32")
    assert not lars_tf.DistributedOptimizer(lars_tf.LARS(0.5)).scales_loss


@pytest.mark.multiprocess
def test_float64_bfloat16_and_float32_gradients_all_reduce_on_2_ranks(tmp_path):
    """One model with variables of three dtypes (the single grouped all-reduce crashed on
    more than one dtype, and Horovod's op takes no bfloat16): 2 ranks x 8 examples end
    identical, and equal one process that took the 16 examples of each step at once."""
    import keras
    import tensorflow as tf

    import lars_tf
    from tests.workers import dtypes_case

    run_job(launcher("gloo", 2) + ["python", "tests/workers/keras_api.py", "dtypes",
                                   str(tmp_path)], timeout=240)
    a, b = _ranks(tmp_path)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    model = dtypes_case.dtypes_model()
    assert {tf.as_dtype(w.dtype).name for w in model.weights} == {"float64", "bfloat16",
                                                                   "float32"}
    initial = [np.asarray(w, np.float64) for w in model.weights]
    model.compile(optimizer=lars_tf.DistributedOptimizer(keras.optimizers.SGD(0.5)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = dtypes_case.dtypes_data()
    order = np.concatenate([np.stack([np.arange(0, 48, 2)[s:s + 8],
                                      np.arange(1, 48, 2)[s:s + 8]]).ravel()
                            for s in range(0, 24, 8)])  # step s: rank 0's 8, rank 1's 8
    model.fit(x[order], y[order], batch_size=16, epochs=1, shuffle=False, verbose=0)
    for i, w in enumerate(model.weights):
        want, got = np.asarray(w, np.float64), a[f"w{i}"]
        moved, err = np.linalg.norm(want - initial[i]), np.linalg.norm(got - want)
        # bfloat16 rounds sums over 8 and over 16 examples differently, and its rounding
        # reaches the gradients of the layers before it: far below a step, not to 1e-5
        assert moved > 1e-3 and err < 0.02 * moved, (w.path, moved, err)
