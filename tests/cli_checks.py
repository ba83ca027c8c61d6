"""lars-train's refusals in the pytest process: absl parses the flags as the command does,
then the command's checks run up to the Trainer (which would start Horovod), which must not
be reached. The command itself is tested end to end for a few cases (tests/test_trainer.py)."""

from __future__ import annotations

import logging
from unittest import mock

import pytest


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def refusal(flags: list[str]) -> tuple[int, str]:
    """(exit code, message) of lars-train refusing ``flags`` before Horovod starts: 1 and
    absl's message for a flag absl refuses (the command prints it and exits 1); otherwise
    the code the command exits with (2) and what it logged. Fails if the flags get as far as
    the Trainer."""
    from absl import flags as absl_flags

    from lars_tf import cli

    parsed = absl_flags.FLAGS
    parsed.unparse_flags()
    lines = _Lines()
    logging.getLogger("absl").addHandler(lines)
    try:
        try:
            parsed(["lars-train", *flags])
        except absl_flags.Error as e:
            return 1, str(e)
        with mock.patch("lars_tf.train.Trainer",
                        side_effect=AssertionError(f"{flags}: the Trainer was made")), \
                pytest.raises(SystemExit) as stop:
            cli._train(["lars-train"])
        return stop.value.code, "\n".join(lines.lines)
    finally:
        logging.getLogger("absl").removeHandler(lines)
        parsed.unparse_flags()
