"""Elastic training (``--elastic``): the data re-cut over a changing number of ranks, the
unequal batches' weighting, the refusals, and real jobs (local ranks here; hosts that
leave and join in tests/test_cluster.py)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import data as data_lib
from lars_tf import testing
from lars_tf.config import TrainConfig
from lars_tf.data import elastic, imagenet, record_table
from lars_tf.testing import BIN, LAUNCH, fashion_mnist_dir, launcher, run_job

pytestmark = pytest.mark.legacy  # make test-legacy runs it on Keras 2 too


def _read(examples, global_batch, seed, rank, size, epoch, update, updates):
    """What rank ``rank`` of ``size`` reads for ``updates`` updates from (epoch, update)."""
    ds = elastic.index_batches(examples, global_batch, seed, rank, size, epoch, update)
    return [b.numpy() for b in ds.take(updates)]


@pytest.mark.parametrize("global_batch", [96, 100])
def test_an_epoch_split_over_3_then_2_then_3_ranks_reads_each_example_once(global_batch):
    """The pipeline's own index datasets, as the trainer builds them after each reset: 3
    ranks from the epoch's start, 2 from the update where the third was lost, 3 again from
    where it came back. Every update reads the whole global batch (34+33+33 of 100 when it
    does not split evenly), no example is read twice in the epoch, and the epoch reads
    exactly the first updates x G positions of its order, which is that of one rank."""
    n, seed, epoch = 1000, 7, 2
    updates = elastic.updates_per_epoch(n, global_batch)
    plan = [(3, 0, 4), (2, 4, 3), (3, 7, updates - 7)]  # (ranks, from update, updates)
    seen = []
    for size, start, count in plan:
        per_rank = [_read(n, global_batch, seed, r, size, epoch, start, count)
                    for r in range(size)]
        for u in range(count):
            batch = np.concatenate([per_rank[r][u] for r in range(size)])
            assert len(batch) == global_batch
            seen.append(batch)
    seen = np.concatenate(seen)
    assert len(seen) == len(set(seen.tolist())) == updates * global_batch
    one_rank = np.concatenate(_read(n, global_batch, seed, 0, 1, epoch, 0, updates))
    np.testing.assert_array_equal(seen, one_rank)
    # the next epoch is another order of the same examples
    after = np.concatenate(_read(n, global_batch, seed, 0, 1, epoch + 1, 0, updates))
    assert not np.array_equal(after, one_rank)


def test_rank_slices_cover_the_global_batch_and_weigh_it_exactly():
    for size in (1, 2, 3, 7):
        slices = [elastic.rank_slice(100, r, size) for r in range(size)]
        assert [o for o, _ in slices] == list(np.cumsum([0] + [c for _, c in slices])[:-1])
        assert sum(c for _, c in slices) == 100
        assert max(c for _, c in slices) - min(c for _, c in slices) <= 1
        shares = [elastic.batch_share(100, r, size) for r in range(size)]
        assert sum(shares) / size == pytest.approx(1.0)
    with pytest.raises(ValueError, match="smaller than the 8 ranks"):
        elastic.rank_slice(7, 0, 8)


@pytest.mark.parametrize("changes, message", [
    (dict(dataset="tfds:mnist"), "--elastic: --dataset=tfds:mnist"),
    (dict(dataset="imagenet", cache=True), "--elastic with --cache"),
    (dict(backward_passes_per_step=2), "--backward_passes_per_step=2"),
    (dict(noise_scale_every=5), "--noise_scale_every=5"),
    (dict(elastic_commit_every=0), "--elastic_commit_every"),
])
def test_elastic_refuses_what_it_cannot_keep_exact(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(elastic=True, **changes)


def _imagenet_config(root, **kw):
    return TrainConfig(**{**dict(dataset="imagenet", data_dir=str(root), image_size=24,
                                 num_classes=40, global_batch_size=10, elastic=True, seed=3),
                          **kw})


def test_imagenet_shards_re_cut_over_3_then_2_then_3_ranks_read_what_one_process_reads(
        tmp_path):
    """lars-convert-indexed shards (3 files of 40 records, each record's label its id), an
    epoch of 4 updates of 10: 3 ranks for the first update (4 + 3 + 3 records), 2 from the
    second (5 + 5), 3 again from the fourth, as the trainer rebuilds the data after each
    reset. Every update reads 10 records, the epoch reads each record exactly once, and the
    records and their random crops are those one process reads: bit for bit."""
    root = testing.id_shards(tmp_path / "shards", 3, records=40, indexed=True)
    config, epoch = _imagenet_config(root), 1
    plan = [(3, 0, 1), (2, 1, 2), (3, 3, 1)]  # (ranks, from update, updates)
    images, labels = [], []
    for size, start, count in plan:
        per_rank = [list(data_lib.build_elastic(config, r, size, epoch, start)
                         .train.take(count)) for r in range(size)]
        for u in range(count):
            x = np.concatenate([per_rank[r][u][0].numpy() for r in range(size)])
            y = np.concatenate([per_rank[r][u][1].numpy() for r in range(size)])
            assert len(y) == 10, (size, start + u, len(y))
            images.append(x)
            labels.append(y)
    labels = np.concatenate(labels)
    assert sorted(labels.tolist()) == list(range(40)), labels
    one = list(data_lib.build_elastic(config, 0, 1, epoch, 0).train.take(4))
    np.testing.assert_array_equal(labels, np.concatenate([y.numpy() for _, y in one]))
    np.testing.assert_array_equal(np.concatenate(images),
                                  np.concatenate([x.numpy() for x, _ in one]))
    # the next epoch: the same records in another order, with other crops
    after = list(data_lib.build_elastic(config, 0, 1, epoch + 1, 0).train.take(4))
    later = np.concatenate([y.numpy() for _, y in after])
    assert sorted(later.tolist()) == list(range(40)) and not np.array_equal(later, labels)


def test_elastic_imagenet_needs_shards_lars_convert_indexed(tmp_path):
    root = testing.id_shards(tmp_path / "plain", 2, records=8)
    with pytest.raises(ValueError, match="train-00000-of-00002 is not .no index"):
        data_lib.build_elastic(_imagenet_config(root, num_classes=8), 0, 2, 0, 0)
    # the positional reader's own checks, for a shard damaged past its index's fingerprint
    root = testing.id_shards(tmp_path / "indexed", 1, records=4, indexed=True)
    shard = str(root / "train-00000-of-00001")
    table = record_table.RecordTable([shard], [4])
    assert [int(tf.io.parse_single_example(r, imagenet.FEATURES)["image/class/label"])
            for r in table.read(np.array([3, 0, 2]))] == [3, 0, 2]
    with pytest.raises(ValueError, match="index promises 5 records, the file holds 4"):
        record_table.RecordTable([shard], [5])
    with open(shard, "ab") as f:  # a header whose record is missing
        f.write(b"\x40" + b"\x00" * 11)
    with pytest.raises(ValueError, match=r"train-00000-of-00001: the record at byte offset "
                                         r"\d+ claims 64 bytes, past the end"):
        record_table.RecordTable([shard])


def test_the_data_of_every_elastic_epoch_shares_one_copy_of_the_training_set():
    """The trainer builds the data again at every epoch (and reset) and its callbacks keep
    the old datasets alive: 7 epochs' Fashion-MNIST data must not hold 7 copies of the
    47 MB training set. (Each held its own tensor before: 340 MB more after 7 epochs, and a
    16-epoch elastic job's ranks grew to 1.5x the memory of a non-elastic one's.)"""
    import gc
    import os

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    config = TrainConfig(elastic=True, global_batch_size=1024,
                         data_dir=fashion_mnist_dir())
    held = []
    for epoch in range(7):
        held.append(data_lib.build_elastic(config, 0, 1, epoch, 0))
        next(iter(held[-1].train))
        gc.collect()
        if epoch == 0:
            first = rss_mb()
    assert rss_mb() - first < 3 * 47, f"{rss_mb() - first:.0f} MB more after 7 epochs"


def test_commits_never_leave_an_epoch_with_no_update_left(monkeypatch):
    """Commits every 3 updates of an epoch of 6 (a fit of 6 steps): after updates 3 and
    then only at the epoch's end, never after update 6 before it. A rank lost in epoch 2's
    evaluation (after update 30 of 30, commits every 3) rolled the job back to "update 30",
    which no data can start from, and every rank stopped (seen in a fresh clone's suite)."""
    from lars_tf import elastic as elastic_lib

    monkeypatch.setattr(elastic_lib.distributed, "allreduce_sum",
                        lambda values, name: np.asarray(values, dtype=np.float64))
    commits = []

    class State:
        epoch, update, examples = 0, 0, 0

        def commit(self):
            commits.append((self.epoch, self.update))

    state = State()
    commit, end = elastic_lib.CommitState(state, every=3, batch=4), elastic_lib.EndEpoch(state)
    for callback in (commit, end):
        callback.set_params({"steps": 6, "epochs": 1})
    for batch in range(6):
        commit.on_train_batch_end(batch)
    logs = {}
    commit.on_epoch_end(0, logs)
    end.on_epoch_end(0, logs)
    assert commits == [(0, 3), (1, 0)]
    assert logs["examples"] == 24.0


def test_a_partial_batch_split_is_reported_per_rank():
    config = TrainConfig(elastic=True, global_batch_size=100)
    assert [config.per_rank_batch_size(3, r) for r in range(3)] == [34, 33, 33]


def _weights(model_dir, epoch):
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / f"epoch-{epoch:06d}"
                                          / "ckpt"))
    # every float variable: the model's (saved under the optimizer's trainable variables)
    # and the optimizer's slots
    return {k: reader.get_tensor(k) for k in sorted(reader.get_variable_to_shape_map())
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and reader.get_tensor(k).dtype.kind == "f"}


IMAGENET = ["--model=mlp", "--dataset=imagenet", "--image_size=24", "--num_classes=40",
            "--global_batch_size=10", "--epochs=2", "--learning_rate=0.5",
            "--warmup_epochs=0.5", "--deterministic", "--noprogress_bar", "--elastic",
            "--elastic_commit_every=2"]


@pytest.mark.multiprocess
def test_three_ranks_of_unequal_batches_train_as_one_process_on_the_global_batch(tmp_path):
    """--elastic on 3 local ranks (Gloo) on lars-convert shards of 40 records with a global
    batch that 3 does not divide (10 = 4 + 3 + 3): each rank's gradient is weighted by its
    slice, so the weights after 2 epochs equal those of one process reading the same global
    batches, and each epoch's log counts exactly its updates x the global batch.
    (Fashion-MNIST's elastic jobs: tests/test_elastic_cluster.py, with real resets.)"""
    root = testing.id_shards(tmp_path / "shards", 3, records=40, indexed=True)
    args = IMAGENET + [f"--data_dir={root}"]
    run_job([str(BIN / "horovodrun"), "--gloo", "-np", "3", "-H", "localhost:3",
             str(BIN / "lars-train"), f"--model_dir={tmp_path / 'three'}", *args],
            timeout=600)
    run_job([str(BIN / "lars-train"), f"--model_dir={tmp_path / 'one'}", *args], timeout=600)
    three, one = _weights(tmp_path / "three", 2), _weights(tmp_path / "one", 2)
    assert three.keys() == one.keys() and len(three) > 4
    for k in three:
        np.testing.assert_allclose(three[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    summary = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert summary["world_size"] == 3
    assert [h["examples"] for h in summary["history"]] == [40.0, 40.0]
    assert summary["elastic_resets"] == 0


@pytest.mark.multiprocess
def test_the_launcher_starts_an_elastic_job_and_refuses_a_wrong_one(tmp_path):
    discover = tmp_path / "discover.sh"
    discover.write_text("#!/bin/sh\necho localhost:2\n")
    discover.chmod(0o755)
    dry = run_job([str(LAUNCH / "horovodrun_gpu.sh"), "--elastic", "--host-discovery-script",
                   str(discover), "-np", "2", "--min-np", "1", "--max-np", "3", "--dry-run",
                   "--", "--model=mlp"]).stdout
    command = dry.split("# command")[1]
    for part in ("horovodrun --gloo -np 2 --min-np 1", "--max-np 3",
                 f"--host-discovery-script {discover}", "lars-train --model=mlp --elastic"):
        assert part in command, command
    for args, message in [
        (["--elastic", "-np", "2"], "needs --host-discovery-script"),
        (["--elastic", "--host-discovery-script", str(discover), "-H", "a:1"],
         "not -H/--hostfile"),
        (["--elastic", "--host-discovery-script", str(tmp_path / "none.sh"), "-np", "2"],
         "not an executable file"),
        (["--elastic", "--mpi", "--host-discovery-script", str(discover), "-np", "2"],
         "runs under Gloo"),
        (["--elastic", "--host-discovery-script", str(discover), "-np", "2", "--min-np", "3"],
         "--min-np=3"),
        (["--min-np", "1", "-H", "a:1"], "--min-np needs --elastic"),
    ]:
        proc = run_job([str(LAUNCH / "horovodrun_gpu.sh"), *args, "--dry-run"], check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


REINIT = """
import horovod.tensorflow as hvd
import tensorflow as tf
for _ in range(3):  # what every elastic reset does
    hvd.init()
    total = hvd.allreduce(tf.constant([1.0]), op=hvd.Sum).numpy()[0]
    assert total == hvd.size() == 2, total
    hvd.shutdown()
print("reinit ok")
"""


@pytest.mark.multiprocess
def test_horovod_starts_again_in_a_process_with_fusion_and_cycle_time_set():
    """An elastic reset calls hvd.init() again in the same process. With the fusion
    threshold and cycle time fixed by the environment (as every preset of the launchers
    fixes them), Horovod 0.28.1's second init wrote past the end of its autotuner's vector
    and crashed (tools/patches/horovod-0.28.1-elastic-reinit-fixed-parameters.patch)."""
    proc = run_job(launcher("gloo") + ["python", "-c", REINIT], timeout=300,
                   HOROVOD_FUSION_THRESHOLD=33554432, HOROVOD_CYCLE_TIME=2)
    assert proc.stdout.count("reinit ok") == 2, proc.stdout
