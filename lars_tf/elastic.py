"""Elastic training: ranks leave and join a running job (``lars-train --elastic`` under
``horovodrun --min-np N --max-np M --host-discovery-script S``, Gloo).

Built on Horovod's elastic core (``horovod.common.elastic``: the driver's host updates, the
reset and re-rendezvous), not on its Keras layer, which does not run on Keras 3:

- ``TrainingState``: what a reset rolls back to and what a joining rank receives: every
  variable of the model and the optimizer stack (weights, BatchNorm statistics, slots,
  step counter, loss scale), the epoch, the update within it, the examples the epoch has
  read and the history of finished epochs. ``commit()`` keeps a copy in host memory and
  raises ``HostsUpdatedInterrupt`` on every rank alike when the driver reported new or
  lost hosts; ``sync()`` gives every rank rank 0's state.
- ``run(train)``: calls ``train(state)`` until it returns. A collective that failed because
  a rank was lost (``HorovodInternalError``) rolls back to the last commit; a host update
  resets at the commit. Then Horovod is restarted with the ranks now in the job, the state
  synced, and ``train`` called again. Any other error ends the job as it would without
  ``--elastic`` (Horovod's own ``hvd.elastic.run`` returns ``None`` for an error that does
  not name one of its three ops; this one re-raises it).
- ``CommitState`` and ``EndEpoch``: the Keras callbacks that commit every N updates (and
  count the examples read) and at each epoch's end.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging
from horovod.common.elastic import State, run_fn
from horovod.common.exceptions import HorovodInternalError

from lars_tf import checkpoint, distributed, keras_compat


def lost_a_rank(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a rank was lost, which a reset
    can recover from, rather than an error of the program or its data (which a collective
    such as a mismatched all-reduce can raise too)."""
    if isinstance(error, HorovodInternalError):
        return True
    return isinstance(error, tf.errors.OpError) and distributed.peer_lost(error.message)


class TrainingState(State):
    """The state of a training run that a reset rolls back to (``restore``) and that a rank
    joining the job receives (``sync``). ``history`` is updated in place (the trainer's
    epoch log appends to the same list)."""

    def __init__(self, model: tf.keras.Model, optimizer, epoch: int = 0, update: int = 0,
                 history: list | None = None):
        super().__init__(bcast_object=self._broadcast, get_rank=lambda: distributed.init().rank)
        self.variables = keras_compat.plain_variables(
            checkpoint.state_variables(model=model, optimizer=optimizer))
        self.epoch, self.update = epoch, update
        self.examples = 0  # read by this epoch's updates so far, over all ranks
        self.history = history if history is not None else []
        self.resets = 0
        self.save()

    @staticmethod
    def _broadcast(obj):
        return distributed.broadcast_object(obj, name="lars_tf.elastic.state")

    def _fields(self) -> tuple:
        return self.epoch, self.update, self.examples, list(self.history), self.resets

    def _set_fields(self, fields) -> None:
        self.epoch, self.update, self.examples, history, self.resets = fields
        self.history[:] = history

    @property
    def committed(self) -> tuple[int, int]:
        """(epoch, update) of the last commit: where ``restore`` goes back to."""
        fields = self._saved[1]
        return fields[0], fields[1]

    def save(self) -> None:
        self._saved = ([v.numpy() for v in self.variables], self._fields())

    def restore(self) -> None:
        values, fields = self._saved
        for v, x in zip(self.variables, values):
            v.assign(x)
        self._set_fields(fields)

    def sync(self) -> None:
        import horovod.tensorflow as hvd_tf

        hvd_tf.broadcast_variables(self.variables, root_rank=0)
        self._set_fields(self._broadcast(self._fields()))
        self.save()

    def reset(self) -> None:
        self.resets += 1


def run(train):
    """``train(state)`` run to its end across membership changes (see the module's doc)."""

    def once(state, *args, **kwargs):
        try:
            return train(state, *args, **kwargs)
        except Exception as e:
            if lost_a_rank(e) and not isinstance(e, HorovodInternalError):
                epoch, update = state.committed
                logging.warning("a collective failed (a rank was lost) at epoch %d, update "
                                "%d: rolling back to epoch %d, update %d, and resetting: %s",
                                state.epoch + 1, state.update, epoch + 1, update,
                                _what_failed(e))
                raise HorovodInternalError(e) from e
            raise

    return run_fn(once, _reset)


def _what_failed(error: BaseException) -> str:
    """The last line of ``error``'s message that is not a node name: what failed
    (TensorFlow's first line is only "Graph execution error:")."""
    lines = [ln.strip() for ln in getattr(error, "message", str(error)).splitlines()]
    return ([ln for ln in lines if ln and not ln.startswith("[[")] or ["?"])[-1][:500]


def _reset() -> None:
    world = distributed.reinit()
    logging.info("elastic reset: this process is now rank %d of %d", world.rank, world.size)


class CommitState(tf.keras.callbacks.Callback):
    """Keeps ``state`` at the training's position: commits every ``every`` updates, and
    counts the examples the epoch's updates read (``batch`` per update on this rank, summed
    over ranks at each commit and at the epoch's end, where the total goes into the epoch's
    log as ``examples``; put it before the callbacks that log). ``EndEpoch``, the last
    callback, commits the finished epoch."""

    def __init__(self, state: TrainingState, every: int, batch: int):
        super().__init__()
        self.state, self.every, self.batch = state, every, batch
        self._local = 0

    def on_train_batch_end(self, batch, logs=None):
        self.state.update += 1
        self._local += self.batch
        # not after the epoch's last update (each fit runs to its epoch's end): a rank lost in
        # the epoch's end (evaluation, checkpoint) would roll back to an epoch with no update
        # left and its end not done; EndEpoch commits once that end is done
        if self.state.update % self.every == 0 and batch + 1 < self.params["steps"]:
            self._count()
            self.state.commit()

    def on_epoch_end(self, epoch, logs=None):
        self._count()
        if logs is not None:
            logs["examples"] = float(self.state.examples)

    def _count(self) -> None:
        total = distributed.allreduce_sum([float(self._local)], name="lars_tf.elastic.examples")
        self.state.examples += int(np.round(total[0]))
        self._local = 0


class EndEpoch(tf.keras.callbacks.Callback):
    """Commits ``state`` at the start of the next epoch, once every other callback has
    finished this one (checkpoint, history): put it last."""

    def __init__(self, state: TrainingState):
        super().__init__()
        self.state = state

    def on_epoch_end(self, epoch, logs=None):
        self.state.epoch, self.state.update, self.state.examples = epoch + 1, 0, 0
        self.state.commit()
