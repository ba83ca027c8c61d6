"""The documentation site: it builds with ``mkdocs build --strict`` (a broken link, anchor
or API reference fails), and its tables that mirror code agree with the code."""

import re
import subprocess

import pytest

from lars_tf.testing import BIN, REPO, job_env

mkdocs = pytest.importorskip("mkdocs", reason="the docs tools are installed on the default "
                             "stack only (make setup)")


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
