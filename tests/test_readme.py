"""The examples of the README and the docs run as printed: a user copies them, so they must
work."""

import json
import re

import pytest

from lars_tf.testing import REPO, launcher, run_job

pytestmark = pytest.mark.multiprocess


def _python_block(first_line: str) -> str:
    """The python code block that starts with ``first_line``, in the README or the docs
    (``docs/*.md``): found at least once, and the same wherever it is printed."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = {b for page in pages
             for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
             if b.startswith(first_line)}
    assert len(found) == 1, (f"{len(found)} different python blocks start {first_line!r} "
                             "in README.md and docs/")
    return found.pop()


def test_the_python_api_example_trains_a_custom_model_on_2_ranks(tmp_path):
    # in a folder of its own, as a user's script: it writes runs/mine/ where it runs
    script = tmp_path / "my_train.py"
    script.write_text(_python_block("# my_train.py"))
    run_job(launcher("gloo") + ["python", str(script)], cwd=tmp_path)
    summary = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_done"] == summary["epochs"] == 5
    assert summary["global_batch_size"] == 1024
    # trained: Fashion-MNIST's 10 classes start at 10%
    assert summary["final_test_accuracy"] > 0.8
    assert len(summary["history"]) == 5
    assert (tmp_path / "runs" / "mine" / "checkpoints" / "epoch-000005").is_dir()


def test_the_plain_keras_example_trains_in_mixed_float16_on_2_ranks(tmp_path):
    """The README's plain-Keras example (mixed_float16, DistributedOptimizer, the broadcast
    callback) as printed: the model it saves loads back, in a process of its own, with its
    optimizer state and loss scale, and has learnt Fashion-MNIST."""
    import keras

    import lars_tf
    from lars_tf.data import fashion_mnist

    script = tmp_path / "keras_train.py"
    script.write_text(_python_block("# keras_train.py"))
    run_job(launcher("gloo") + ["python", str(script)], cwd=tmp_path, timeout=240)
    model = keras.models.load_model(tmp_path / "mine.keras")
    opt = model.optimizer
    assert isinstance(opt, lars_tf.DistributedOptimizer) and opt.scales_loss
    assert int(opt.iterations.numpy()) == 3 * 118  # 30000 images a rank, in 256s
    assert float(opt.dynamic_scale.numpy()) >= 1.0
    x, y = fashion_mnist.load(lars_tf.TrainConfig().resolved_data_dir(), "test")
    logits = model.predict(x[:2000] / 255.0, verbose=0)
    assert (logits.argmax(-1) == y[:2000]).mean() > 0.8
