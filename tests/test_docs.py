"""The documentation site: it builds with ``mkdocs build --strict`` (a broken link, anchor
or API reference fails), and its tables that mirror code agree with the code."""

import re
import subprocess

import pytest

from lars_tf.testing import BIN, REPO, job_env

mkdocs = pytest.importorskip("mkdocs", reason="the docs tools are installed on the default "
                             "stack only (make setup)")


@pytest.mark.multiprocess
def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "-d", str(tmp_path)],
                          cwd=REPO, env=job_env(NO_MKDOCS_2_WARNING="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for page in ("index.html", "reference/index.html", "results/index.html"):
        assert (tmp_path / page).is_file(), page
    reference = (tmp_path / "reference" / "index.html").read_text()
    assert "trust_coefficient" in reference  # LARS' docstring, rendered


def test_the_flag_table_lists_every_flag_of_lars_train():
    from absl import flags

    from lars_tf import cli

    defined = {f.name for f in flags.FLAGS.get_key_flags_for_module(cli.__name__)}
    table = (REPO / "docs" / "lars-train.md").read_text().split("| flag |")[1].split("\n\n")[0]
    documented = set()
    for row in table.splitlines()[2:]:
        documented |= set(re.findall(r"`--(\w+)`", row.split("|")[1]))
    assert documented == defined, (f"not in docs/lars-train.md: {defined - documented}; "
                                   f"not a flag: {documented - defined}")


def _block(page: str, first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / page).read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"docs/{page}: {len(found)} python blocks start {first_line!r}"
    return found[0]


def test_the_design_pages_new_source_and_optimizer_work_as_printed():
    """docs/design.md's example data source and optimizer, each one module plus a
    registration: ``--dataset=my_source`` builds 2 ranks' shards, ``--optimizer=adamw``
    builds Keras' AdamW on the run's schedule."""
    import types

    from lars_tf import data, optimizer_builders
    from lars_tf.build import build_local_optimizer
    from lars_tf.config import TrainConfig

    module = types.ModuleType("my_source")
    exec(_block("design.md", "# lars_tf/data/my_source.py"), module.__dict__)
    if "my_source" not in data.names():
        data.register(module.SOURCE)
    config = TrainConfig(dataset="my_source", global_batch_size=64)
    shards = [data.build(config, rank, 2) for rank in range(2)]
    assert {d.steps_per_epoch for d in shards} == {15}  # 1000 examples / 64
    x, y = next(iter(shards[1].train))
    assert x.shape == (32, 32, 32, 3) and y.shape == (32,)

    if "adamw" not in optimizer_builders.names():
        exec(_block("design.md", '@register("adamw")'),
             {"register": optimizer_builders.register})
    opt = build_local_optimizer(TrainConfig(optimizer="adamw", weight_decay=1e-3), 100)
    assert type(opt).__name__ == "AdamW" and opt.weight_decay == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="--optimizer='adam2': must be one of"):
        TrainConfig(optimizer="adam2")
