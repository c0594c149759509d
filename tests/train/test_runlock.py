"""One writer per run folder: a second process gets a one-line error naming the first."""

from __future__ import annotations

import os

import pytest

from lmforge.train.runlock import LOCK_FILE, run_lock


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert f"pid {os.getpid()}" in (run / LOCK_FILE).read_text()
        busy = rf"{run} is in use by another process \(pid {os.getpid()}"
        with pytest.raises(RuntimeError, match=busy), run_lock(run):
            pass
    assert not (run / LOCK_FILE).exists()  # released and removed: the folder holds only the run's files
    with run_lock(run):  # free again
        pass
