"""Atomic, numbered checkpoints of model + optimizer (TensorFlow only).

``MODEL_DIR/checkpoints/epoch-000012/`` holds a ``tf.train.Checkpoint`` of the model and the
whole optimizer stack (LARS momentum, step counter that drives the schedule, loss scale) and
``meta.json`` (epoch, history so far, elapsed time). A checkpoint is written in a hidden
temporary folder and renamed into place, so ``epoch-*`` folders are always complete: a crash
while writing leaves the previous checkpoint as the latest readable one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import tensorflow as tf

from lars_tf import keras_compat

SUBDIR = "checkpoints"
_NAME = re.compile(r"^epoch-(\d{6})$")


def root(model_dir: str) -> str:
    return os.path.join(model_dir, SUBDIR)


def list_checkpoints(model_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as ``(epoch, folder)``, oldest first."""
    base = root(model_dir)
    if not os.path.isdir(base):
        return []
    found = []
    for name in os.listdir(base):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(base, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(base, name)))
    return sorted(found)


def latest(model_dir: str) -> tuple[int, str] | None:
    found = list_checkpoints(model_dir)
    return found[-1] if found else None


def save(model_dir: str, epoch: int, model: tf.keras.Model, optimizer, meta: dict,
         keep: int) -> str:
    """Write the checkpoint after ``epoch`` (1-based) and keep the newest ``keep``."""
    base = root(model_dir)
    os.makedirs(base, exist_ok=True)
    for name in os.listdir(base):  # left by a writer that was killed (one writer per dir)
        if name.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    final = os.path.join(base, f"epoch-{epoch:06d}")
    tmp = tempfile.mkdtemp(dir=base, prefix=f".tmp-epoch-{epoch:06d}-")
    try:
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(tmp, "ckpt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "epoch": epoch}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # the same epoch again (e.g. a re-run): swap it out
            old = tempfile.mkdtemp(dir=base, prefix=".old-")
            os.rename(final, os.path.join(old, "x"))
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, path in list_checkpoints(model_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def state_variables(**roots) -> list:
    """Every variable that ``tf.train.Checkpoint(**roots)`` saves, found by walking its
    object graph (so nothing is missed that a checkpoint restores: model weights and
    BatchNorm statistics, optimizer slots and step counter, and the loss-scale state, which
    Keras' loss-scale optimizer keeps out of its ``variables``). In a stable order: the
    same on every rank for the same model and optimizer."""
    found, seen = [], set()
    root = tf.train.Checkpoint(**roots)  # the view holds it weakly
    for obj in tf.train.TrackableView(root).descendants():
        if keras_compat.is_variable(obj) and id(obj) not in seen:
            seen.add(id(obj))
            found.append(obj)
    return found


def restore(path: str, model: tf.keras.Model, optimizer) -> dict:
    """Load a checkpoint folder into ``model`` and a built ``optimizer``; returns meta.

    Raises ValueError naming the folder if it cannot be read or does not fit the model."""
    try:
        status = tf.train.Checkpoint(model=model, optimizer=optimizer).read(
            os.path.join(path, "ckpt"))
        status.assert_existing_objects_matched()
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except Exception as e:  # the reader raises OpError, IndexError, AssertionError...
        message = getattr(e, "message", None) or str(e)
        raise ValueError(
            f"checkpoint {path} cannot be restored: {message.splitlines()[0][:500]} (it was "
            "left as it is; move it away to resume from the one before)") from e
