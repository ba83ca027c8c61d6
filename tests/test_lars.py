"""LARS against the NumPy reference of its documented rule, and its Keras behaviour."""

import re

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import LARS, WarmupPolynomialDecay, keras_compat
from tests import reference

pytestmark = pytest.mark.legacy

STEPS = 12


def _variables(rng):
    # name -> (initial value, decayed?, adapted?) under the default exclusions
    specs = {
        "dense/kernel": (rng.normal(size=(6, 4)), True, True),
        "dense/bias": (rng.normal(size=(4,)), False, False),
        "bn/gamma": (1.0 + 0.1 * rng.normal(size=(4,)), False, False),
        "bn/beta": (0.1 * rng.normal(size=(4,)), False, False),
        "conv/kernel": (np.zeros((3, 3, 2, 2)), True, True),  # zero norm: trust must be 1
    }
    return specs


@pytest.mark.parametrize("mode", ["paper", "decayed_gradient"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_reference_over_steps(mode, nesterov):
    rng = np.random.default_rng(0)
    specs = _variables(rng)
    hp = dict(momentum=0.9, wd=5e-3, eta=0.02, eps=1e-9)
    sched = WarmupPolynomialDecay(peak_learning_rate=3.0, warmup_steps=4, total_steps=STEPS)
    opt = LARS(learning_rate=sched, momentum=hp["momentum"], nesterov=nesterov,
               weight_decay=hp["wd"], trust_coefficient=hp["eta"], epsilon=hp["eps"],
               trust_ratio_mode=mode)
    tf_vars = {n: tf.Variable(v, dtype=tf.float32, name=n) for n, (v, _, _) in specs.items()}
    ref = {n: (v.astype(np.float64), np.zeros_like(v, np.float64))
           for n, (v, _, _) in specs.items()}
    for step in range(STEPS):
        grads = {n: rng.normal(size=v.shape) * (0.1 if "bias" in n else 1.0)
                 for n, (v, _, _) in specs.items()}
        # step 3: a layer with no gradient signal (zero norm): trust must fall back to 1
        if step == 3:
            grads["dense/kernel"] = np.zeros_like(grads["dense/kernel"])
        opt.apply_gradients([(tf.constant(grads[n], tf.float32), tf_vars[n]) for n in specs])
        lr = reference.schedule(step, 3.0, 4, STEPS)
        for n, (_, decay, adapt) in specs.items():
            w, m = ref[n]
            ref[n] = reference.lars_step(w, grads[n], m, lr=lr, momentum=hp["momentum"],
                                         wd=hp["wd"], eta=hp["eta"], eps=hp["eps"],
                                         decay=decay, adapt=adapt, mode=mode,
                                         nesterov=nesterov)
    for n in specs:
        np.testing.assert_allclose(tf_vars[n].numpy(), ref[n][0], rtol=2e-5, atol=2e-6,
                                   err_msg=n)
    # the reference is not trivially satisfied: every variable moved
    for n, (v, _, _) in specs.items():
        assert not np.allclose(tf_vars[n].numpy(), v), n


def test_rules_differ_when_decay_is_on():
    """The two trust-ratio rules are really different code paths."""
    out = {}
    for mode in ("paper", "decayed_gradient"):
        w = tf.Variable([[3.0, 4.0]], name="d/kernel")
        LARS(learning_rate=1.0, momentum=0.0, weight_decay=0.5, trust_ratio_mode=mode,
             trust_coefficient=0.1).apply_gradients([(tf.constant([[0.6, -0.8]]), w)])
        out[mode] = w.numpy()
    assert not np.allclose(out["paper"], out["decayed_gradient"])


def test_mixed_float16_policy_keras_model():
    """Under mixed_float16 the model computes in fp16 while LARS updates fp32 masters."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=32)
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tf.keras.Sequential([
            tf.keras.Input((8,)),
            tf.keras.layers.Dense(16, activation="relu", name="hidden"),
            tf.keras.layers.BatchNormalization(name="bn"),
            tf.keras.layers.Dense(3, dtype="float32", name="out"),
        ])
        opt = LARS(learning_rate=0.5, momentum=0.9, weight_decay=1e-3)
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        variables = model.trainable_variables
        assert all(v.dtype == tf.float32 for v in variables)
        names = [keras_compat.variable_path(v) for v in variables]
        ref = {n: (v.numpy().astype(np.float64), np.zeros(v.shape))
               for n, v in zip(names, variables)}
        for _ in range(STEPS):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                assert model.layers[0].compute_dtype == "float16"
                loss = loss_fn(y, logits)
            grads = tape.gradient(loss, variables)
            opt.apply_gradients(zip(grads, variables))
            for n, g in zip(names, grads):
                decay = adapt = re.search(r"kernel(:0)?$", n) is not None
                w, m = ref[n]
                ref[n] = reference.lars_step(w, g.numpy(), m, lr=0.5, momentum=0.9,
                                                  wd=1e-3, eta=1e-3, eps=0.0,
                                                  decay=decay, adapt=adapt)
        for n, v in zip(names, variables):
            np.testing.assert_allclose(v.numpy(), ref[n][0], rtol=1e-4, atol=1e-6, err_msg=n)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_float16_variable_norms_in_float32():
    """||w||^2 = 1e8 overflows float16 (max 65504); the trust ratio must not."""
    w0 = np.full((10000,), 100.0)
    g = np.full((10000,), 0.01)
    w = tf.Variable(w0, dtype=tf.float16, name="big/kernel")
    LARS(learning_rate=1.0, momentum=0.0, trust_coefficient=0.001).apply_gradients(
        [(tf.constant(g, tf.float16), w)])
    want, _ = reference.lars_step(w0, g, 0 * w0, lr=1.0, momentum=0.0, wd=0.0, eta=0.001,
                                  eps=0.0, decay=False, adapt=True)
    assert np.all(np.isfinite(w.numpy()))
    np.testing.assert_allclose(w.numpy().astype(np.float64), want, rtol=1e-3)
    assert not np.allclose(w.numpy(), w0)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(trust_coefficient=0.0), "trust_coefficient"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate="fast"), "learning_rate"),
    (dict(trust_ratio_mode="optax"), "trust_ratio_mode"),
    (dict(exclude_from_weight_decay=["bias("]), "exclude_from_weight_decay"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        LARS(**kwargs)


def test_config_round_trip_and_model_save_load(tmp_path):
    sched = WarmupPolynomialDecay(peak_learning_rate=2.0, warmup_steps=3, total_steps=20)
    opt = LARS(learning_rate=sched, momentum=0.8, nesterov=True, weight_decay=1e-4,
               trust_coefficient=0.01, epsilon=1e-7, exclude_from_weight_decay=["bias"],
               trust_ratio_mode="decayed_gradient")
    clone = LARS.from_config(opt.get_config())
    assert clone.get_config() == opt.get_config()
    assert isinstance(clone._learning_rate, WarmupPolynomialDecay)

    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2, name="d")])
    model.compile(optimizer=opt, loss="mse")
    x, y = np.ones((8, 4), np.float32), np.zeros((8, 2), np.float32)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    assert isinstance(loaded.optimizer, LARS)
    assert loaded.optimizer.get_config() == opt.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(loaded.optimizer.variables, opt.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # training continues identically from the restored state
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    loaded.fit(x, y, epochs=1, batch_size=4, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_fit_with_and_without_jit_compile(jit):
    tf.keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 1))).astype(np.float32)
    model = tf.keras.Sequential([tf.keras.Input((5,)), tf.keras.layers.Dense(1, name="d")])
    model.compile(optimizer=LARS(learning_rate=0.1, trust_coefficient=0.1), loss="mse",
                  jit_compile=jit)
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=20, batch_size=16, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.5 * first


def _one_step(opt, values):
    variables = [tf.Variable(v, name=n) for n, v in values.items()]
    opt.apply_gradients([(tf.ones_like(v), v) for v in variables])
    return {v.name.split(":")[0]: v.numpy() for v in variables}


def test_keras_exclude_from_weight_decay_is_honoured():
    """Keras' own ``exclude_from_weight_decay(var_names=...)`` was silently ignored."""
    values = {"dense/kernel": np.full((3, 2), 2.0, np.float32),
              "emb/embeddings": np.full((4, 2), 2.0, np.float32)}
    kw = dict(learning_rate=0.5, momentum=0.0, weight_decay=0.1,
              exclude_from_layer_adaptation=(".*",))
    decayed = _one_step(LARS(**kw), values)
    by_name = LARS(**kw)
    by_name.exclude_from_weight_decay(var_names=["emb"])
    named = _one_step(by_name, values)
    # no decay on the excluded variable: w - lr * g; the other one keeps lr * wd * w
    np.testing.assert_allclose(named["emb/embeddings"], 2.0 - 0.5, rtol=1e-6)
    np.testing.assert_allclose(named["dense/kernel"], decayed["dense/kernel"], rtol=1e-6)
    np.testing.assert_allclose(decayed["emb/embeddings"], 2.0 - 0.5 * (1 + 0.1 * 2.0),
                               rtol=1e-6)
    by_var = LARS(**kw)
    v = tf.Variable(values["dense/kernel"], name="dense/kernel")
    by_var.exclude_from_weight_decay(var_list=[v])
    by_var.apply_gradients([(tf.ones_like(v), v)])
    np.testing.assert_allclose(v.numpy(), 2.0 - 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        by_var.exclude_from_weight_decay(var_names=["dense"])


@pytest.mark.parametrize("arg", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_gradient_clipping_is_refused_with_the_reason(arg):
    with pytest.raises(ValueError, match=f"{arg} cannot bound a LARS step.*trust ratio"):
        LARS(learning_rate=0.1, **{arg: 1.0})


def test_decayed_gradient_guard_tests_the_decayed_gradient():
    """A zero gradient of a decayed variable: the decayed gradient ``wd * w`` is not zero,
    so its trust ratio is ``eta ||w|| / ||wd w||`` (as Model Garden and optax), not 1."""
    w0 = np.array([3.0, 4.0], np.float32)
    opt = LARS(learning_rate=1.0, momentum=0.0, weight_decay=0.01, trust_coefficient=0.001,
               trust_ratio_mode="decayed_gradient")
    w = tf.Variable(w0, name="dense/kernel")
    opt.apply_gradients([(tf.zeros(2), w)])
    trust = 0.001 / 0.01  # eta ||w|| / (wd ||w||)
    np.testing.assert_allclose(w.numpy(), w0 - trust * 0.01 * w0, rtol=1e-6)
    # paper mode keeps the paper's guard: ||g|| = 0 gives trust = 1
    opt = LARS(learning_rate=1.0, momentum=0.0, weight_decay=0.01, trust_coefficient=0.001)
    w = tf.Variable(w0, name="dense/kernel")
    opt.apply_gradients([(tf.zeros(2), w)])
    np.testing.assert_allclose(w.numpy(), w0 - 0.01 * w0, rtol=1e-6)


@pytest.mark.multiprocess
def test_saved_models_load_without_custom_objects(tmp_path):
    """Models compiled with LARS and the schedule (alone, inside lars_tf's
    DistributedOptimizer and, on Keras 2, inside Horovod's, as users' own scripts have it)
    and saved as .keras and .h5 load with ``tf.keras.models.load_model(path)`` after
    ``import lars_tf``, in a fresh process."""
    from lars_tf.testing import run_job

    run_job(["python", "tests/workers/save_load.py", "save", str(tmp_path)], timeout=120)
    wraps = ("plain", "lars_tf", *([] if keras_compat.KERAS3 else ["horovod"]))
    paths = [str(tmp_path / f"{wrap}-model.{fmt}") for wrap in wraps
             for fmt in ("keras", "h5")
             # Keras 3's legacy .h5 loader builds a wrapping optimizer's state wrongly and
             # starts it afresh (with a warning): with lars_tf.DistributedOptimizer, .keras
             if not (keras_compat.KERAS3 and wrap == "lars_tf" and fmt == "h5")]
    out = run_job(["python", "tests/workers/save_load.py", "load", *paths],
                  timeout=120).stdout
    for path in paths:
        assert f"loaded {path} lars_tf.optimizers 2" in out, (path, out)


def test_docstring_examples_run():
    """The usage examples in LARS' and the schedule's docstrings, as doctests."""
    import doctest

    from lars_tf import optimizers, schedules

    for module in (optimizers, schedules):
        result = doctest.testmod(module, extraglobs={"tf": tf}, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 3 and result.failed == 0, (module.__name__, result)


def test_every_normalization_layers_scale_and_offset_are_excluded_by_default():
    """Every normalisation layer Keras ships (BatchNormalization, LayerNormalization,
    GroupNormalization and, on Keras 3, RMSNormalization, whose ``scale`` got weight decay
    and a trust ratio before) has its scale and offset excluded from both; a Dense kernel
    is not."""
    import keras

    layers = [getattr(keras.layers, name) for name in dir(keras.layers)
              if name.endswith("Normalization") and name not in (
                  "SpectralNormalization",  # a wrapper: its weights are the wrapped layer's
                  "UnitNormalization",      # no weights
                  "Normalization")]         # preprocessing: non-trainable statistics
    names = {layer.__name__ for layer in layers}
    assert {"BatchNormalization", "LayerNormalization", "GroupNormalization"} <= names
    if keras_compat.KERAS3:
        assert "RMSNormalization" in names
    opt = LARS(weight_decay=1e-4)
    checked = 0
    for layer_class in layers:
        kwargs = {"groups": 2} if layer_class.__name__ == "GroupNormalization" else {}
        layer = layer_class(**kwargs)
        layer.build((None, 4))
        for v in layer.trainable_weights:
            assert not opt.uses_weight_decay(v), keras_compat.variable_path(v)
            assert not opt.uses_layer_adaptation(v), keras_compat.variable_path(v)
            checked += 1
    assert checked >= (7 if keras_compat.KERAS3 else 6)  # RMSNormalization: Keras 3 only
    dense = keras.layers.Dense(2)
    dense.build((None, 4))
    assert opt.uses_weight_decay(dense.kernel) and opt.uses_layer_adaptation(dense.kernel)
