#!/usr/bin/env bash
# What a GPU host runs to prove the GPU build (LARS_TF_GPU=1 make setup) on real GPUs:
#
#   tools/gpu_check.sh [--np N] [--cpu]
#
#   1. horovodrun --check-build lists TensorFlow, NCCL, Gloo and MPI;
#   2. one all-reduce of a tensor on each rank's GPU, through NCCL: the sum is exact, and
#      Horovod's timeline shows the NCCL_ALLREDUCE activity;
#   3. N ranks on N GPUs (default 2, one GPU per rank) train small_cnn for 20 steps through
#      lars_tf.DistributedOptimizer(LARS), in float32 and in mixed_float16 with loss scaling:
#      the ranks' trained weights are bit-identical at the end, and the loss went down.
#
# --cpu runs the same on the CPU (the all-reduce through Gloo, whatever the build): what our
# CI can check of this script on a machine without a GPU. Exit status 0 when every check
# passes; every failure names its check. Uses the venv of make setup (LARS_TF_VENV, default
# <repo>/.venv), whose Horovod must be the GPU build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LARS_TF_VENV:-$ROOT/.venv}"
NP=2 DEVICE=gpu
while [[ $# -gt 0 ]]; do
    case "$1" in
        --np) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check: --np needs a count" >&2; exit 2; }
              NP=$2; shift 2 ;;
        --cpu) DEVICE=cpu; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
export PATH="$VENV/bin:$PATH" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
pass() { echo "gpu_check: ok: $*"; }
[[ -x "$VENV/bin/python" ]] || fail "no venv at $VENV (run LARS_TF_GPU=1 make setup)"

# 1. the build
CHECK="$(horovodrun --check-build 2>/dev/null)" || fail "horovodrun --check-build did not run"
for want in TensorFlow NCCL Gloo MPI; do
    grep -q "\[X\] $want" <<<"$CHECK" || { echo "$CHECK" >&2; fail "the build lacks $want"; }
done
pass "horovodrun --check-build lists TensorFlow, NCCL, Gloo and MPI"

if [[ "$DEVICE" == gpu ]]; then
    GPUS="$(python -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))')"
    [[ "$GPUS" -ge "$NP" ]] || fail "TensorFlow sees $GPUS GPU(s), --np $NP needs $NP (or run --cpu)"
    pass "TensorFlow sees $GPUS GPU(s)"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/check.py" <<'EOF'
import json
import sys

import numpy as np
import tensorflow as tf

import lars_tf

device, precision, out = sys.argv[1], sys.argv[2], sys.argv[3]
world = lars_tf.init()  # one GPU per rank (its local rank's), or a share of the cores
import horovod.tensorflow as hvd  # noqa: E402

import keras  # noqa: E402

from lars_tf import models  # noqa: E402

found = {"rank": world.rank}
# 2. one all-reduce of a tensor that lives on this rank's device
with tf.device(f"/{device}:0"):
    x = tf.fill([1 << 20], float(world.rank + 1))
    total = hvd.allreduce(x, op=hvd.Sum, name="gpu_check_sum")
found["allreduce_device"] = total.device
found["allreduce_exact"] = bool(np.all(total.numpy() == world.size * (world.size + 1) / 2))

# 3. small_cnn for 20 steps, each rank on its own data
keras.utils.set_random_seed(0)  # the same initial weights on every rank
keras.mixed_precision.set_global_policy(precision)
model = models.get("small_cnn", (28, 28, 1), 10)
optimizer = lars_tf.DistributedOptimizer(lars_tf.LARS(learning_rate=0.5))
model.compile(optimizer=optimizer,
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(world.rank)
images = rng.standard_normal((20 * 64, 28, 28, 1)).astype("float32")
labels = (images.reshape(len(images), -1).mean(axis=1) > 0).astype("int32")
before = model.evaluate(images, labels, batch_size=256, verbose=0)
model.fit(images, labels, batch_size=64, epochs=1, shuffle=False, verbose=0)
after = model.evaluate(images, labels, batch_size=256, verbose=0)
found["loss_first_last"] = [float(before), float(after)]
# the trained weights (BatchNorm's moving statistics are each rank's own: lars-train averages
# them at each epoch's end, plain fit does not)
weights = np.concatenate([np.asarray(w, np.float32).ravel() for w in model.trainable_weights])
gathered = hvd.allgather(tf.constant(weights[None]), name="gpu_check_weights").numpy()
found["weights_identical"] = bool(all(np.array_equal(gathered[0], g) for g in gathered[1:]))
if world.rank == 0:
    with open(out, "w") as f:
        json.dump(found, f)
EOF

run_job() {  # run_job PRECISION: the check on NP ranks, timeline on; its JSON on stdout
    local precision=$1
    HOROVOD_TIMELINE="$WORK/timeline_$precision.json" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        horovodrun --gloo -np "$NP" -H "localhost:$NP" \
        python "$WORK/check.py" "$DEVICE" "$precision" "$WORK/out_$precision.json" \
        > "$WORK/job_$precision.log" 2>&1 || { tail -30 "$WORK/job_$precision.log" >&2; fail "the $precision job failed"; }
    cat "$WORK/out_$precision.json"
}

for precision in float32 mixed_float16; do
    [[ "$DEVICE" == cpu && "$precision" == mixed_float16 ]] && continue  # no fp16 kernels on CPUs
    res="$(run_job "$precision")"
    python - "$res" "$DEVICE" "$precision" "$WORK/timeline_$precision.json" <<'EOF' || exit 1
import json
import sys

res, device, precision, timeline = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ok = True


def check(cond, what):
    global ok
    print(f"gpu_check: {'ok' if cond else 'FAILED'}: {precision}: {what}",
          file=sys.stdout if cond else sys.stderr)
    ok &= bool(cond)


check(device.upper() in res["allreduce_device"].upper(),
      f"the all-reduced tensor is on the {device.upper()} ({res['allreduce_device']})")
check(res["allreduce_exact"], "the all-reduce sum is exact")
text = open(timeline).read()
activity = "NCCL_ALLREDUCE" if device == "gpu" else "GLOO_ALLREDUCE"
check(activity in text, f"Horovod's timeline shows {activity}")
check(res["weights_identical"], "after 20 steps the ranks' trained weights are bit-identical")
first, last = res["loss_first_last"]
check(last < first, f"the loss on the rank's data went down ({first:.3f} -> {last:.3f})")
sys.exit(0 if ok else 1)
EOF
done
echo "gpu_check: every check passed ($NP ranks, $DEVICE)"
